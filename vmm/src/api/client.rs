//! A small blocking HTTP/1.1 client for the API socket, shared by `vmctl`
//! and the tests: one request per connection (`Connection: close`).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::http::{route_of, API_PREFIX};
use super::ApiRequest;

/// How long a request may take end to end (a pause waits for every vCPU).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Errors talking to the API socket.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("Cannot connect to {0}")]
    Connect(PathBuf, #[source] io::Error),
    #[error("Cannot exchange the request")]
    Io(#[source] io::Error),
    #[error("Malformed HTTP response")]
    Malformed,
    #[error("{message} (HTTP {status})")]
    Server { status: u16, message: String },
}

/// A raw response: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// Sends `method path` (path relative to `/api/v1/`) with an empty body.
pub fn raw(socket: &Path, method: &str, endpoint: &str) -> Result<Reply, ClientError> {
    raw_with_body(socket, method, endpoint, &[])
}

/// Sends `method path` with a JSON `body` (none when empty).
pub fn raw_with_body(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: &[u8],
) -> Result<Reply, ClientError> {
    exchange(
        socket,
        method,
        &format!("{API_PREFIX}{endpoint}"),
        body,
        TIMEOUT,
    )
}

/// `GET path` (absolute, e.g. `/counters`) on any HTTP unix socket, the
/// whole exchange bounded by `timeout` per read and write.
pub fn get(socket: &Path, path: &str, timeout: Duration) -> Result<Reply, ClientError> {
    exchange(socket, "GET", path, &[], timeout)
}

fn exchange(
    socket: &Path,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<Reply, ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|e| ClientError::Connect(socket.into(), e))?;
    s.set_read_timeout(Some(timeout)).map_err(ClientError::Io)?;
    s.set_write_timeout(Some(timeout))
        .map_err(ClientError::Io)?;
    let kind = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n\
         {kind}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .map_err(ClientError::Io)?;
    s.write_all(body).map_err(ClientError::Io)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(ClientError::Io)?;
    parse(&String::from_utf8_lossy(&buf))
}

fn parse(resp: &str) -> Result<Reply, ClientError> {
    let (head, body) = resp.split_once("\r\n\r\n").ok_or(ClientError::Malformed)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(ClientError::Malformed)?;
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    let body = match len {
        Some(n) => body.get(..n).ok_or(ClientError::Malformed)?,
        None => body,
    };
    Ok(Reply {
        status,
        body: body.to_string(),
    })
}

/// Sends `request`; a non-2xx answer is [`ClientError::Server`]. Returns
/// the body (empty for 204).
pub fn call(socket: &Path, request: ApiRequest) -> Result<String, ClientError> {
    call_with(socket, request, &[])
}

/// [`call`] with a JSON request body.
pub fn call_with(socket: &Path, request: ApiRequest, body: &[u8]) -> Result<String, ClientError> {
    call_with_timeout(socket, request, body, TIMEOUT)
}

/// [`call_with`] for requests that take long (a migration): each read
/// and write bounded by `timeout`.
pub fn call_with_timeout(
    socket: &Path,
    request: ApiRequest,
    body: &[u8],
    timeout: Duration,
) -> Result<String, ClientError> {
    let (method, endpoint) = route_of(request);
    let r = exchange(
        socket,
        method,
        &format!("{API_PREFIX}{endpoint}"),
        body,
        timeout,
    )?;
    if (200..300).contains(&r.status) {
        Ok(r.body)
    } else {
        Err(ClientError::Server {
            status: r.status,
            message: r.body.trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_takes_status_and_sized_body() {
        let r =
            parse("HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!(r.status, 405);
        assert_eq!(r.body, "abc");
    }

    #[test]
    fn parse_rejects_a_response_without_headers_end() {
        assert!(matches!(parse("HTTP/1.1 200"), Err(ClientError::Malformed)));
    }
}
