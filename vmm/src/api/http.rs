//! The HTTP/1.1 server on the API unix socket: a current-thread tokio
//! runtime on its own thread (`vmm-api`), hyper per connection, one task
//! per connection so a silent client never holds up another. Routing is
//! one table, [`ROUTES`], checked against `openapi.yaml` by a unit test.
//!
//! The socket is created mode 0600. A live socket at the path (one that
//! accepts a connection) is an error; a stale one is replaced. Dropping
//! the [`ApiServer`] stops the server, lets in-flight answers go out and
//! removes the socket.

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use thiserror::Error;
use tokio::sync::oneshot;

use super::fd_stream::{attach_fds, FdStream, ReceivedFds};
use super::registry::Registration;
use super::{ApiReply, ApiRequest, ApiSender};

/// Every served path is below this prefix.
pub const API_PREFIX: &str = "/api/v1/";

/// (endpoint, method, request): the whole routing table.
pub const ROUTES: &[(&str, &str, ApiRequest)] = &[
    ("vmm.ping", "GET", ApiRequest::VmmPing),
    ("vmm.shutdown", "PUT", ApiRequest::VmmShutdown),
    ("vm.info", "GET", ApiRequest::VmInfo),
    ("vm.pause", "PUT", ApiRequest::VmPause),
    ("vm.resume", "PUT", ApiRequest::VmResume),
    ("vm.power-button", "PUT", ApiRequest::VmPowerButton),
    ("vm.reboot", "PUT", ApiRequest::VmReboot),
    ("vm.snapshot", "PUT", ApiRequest::VmSnapshot),
    ("vm.restore", "PUT", ApiRequest::VmRestore),
    ("vm.shutdown", "PUT", ApiRequest::VmShutdown),
    ("vm.create", "PUT", ApiRequest::VmCreate),
    ("vm.boot", "PUT", ApiRequest::VmBoot),
    ("vm.delete", "PUT", ApiRequest::VmDelete),
    ("vm.add-disk", "PUT", ApiRequest::VmAddDisk),
    ("vm.add-net", "PUT", ApiRequest::VmAddNet),
    ("vm.counters", "GET", ApiRequest::VmCounters),
    ("vm.metrics", "GET", ApiRequest::VmMetrics),
    ("vm.console", "GET", ApiRequest::VmConsole),
    ("vm.send-migration", "PUT", ApiRequest::VmSendMigration),
    (
        "vm.receive-migration",
        "PUT",
        ApiRequest::VmReceiveMigration,
    ),
    ("vm.swap-backend", "PUT", ApiRequest::VmSwapBackend),
];

/// Largest request body read (a VmConfig is a few KiB); larger is 413.
pub const MAX_BODY: usize = 64 << 10;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long answers already being written may take once the VMM stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors setting up the API socket and server.
#[derive(Debug, Error)]
pub enum HttpError {
    #[error("API socket {0} is in use by another process")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket")]
    NotSocket(PathBuf),
    #[error("Cannot remove the stale API socket {0}")]
    RemoveStale(PathBuf, #[source] io::Error),
    #[error("Cannot create the API socket {0}")]
    Bind(PathBuf, #[source] io::Error),
    #[error("Cannot start the API server")]
    Runtime(#[source] io::Error),
}

/// The (method, endpoint) that carries `request`.
pub fn route_of(request: ApiRequest) -> (&'static str, &'static str) {
    ROUTES
        .iter()
        .find(|r| r.2 == request)
        .map(|r| (r.1, r.0))
        .expect("every request has a route")
}

/// A bound API socket, not yet served; removed when dropped if vmm
/// bound it (not one a manager handed over, see [`super::manager`]).
pub struct ApiSocket {
    path: Option<PathBuf>,
    listener: Option<UnixListener>,
    _registration: Option<Registration>,
}

/// Registers `path` for host-wide tools (see [`super::registry`]); a
/// registry that cannot be written is logged, never fatal.
fn register(path: &Path) -> Option<Registration> {
    Registration::new(path)
        .inspect_err(
            |e| tracing::warn!(error = %crate::error_chain(e), "API socket not registered"),
        )
        .ok()
}

impl ApiSocket {
    /// Creates the socket at `path`, mode 0600, replacing a stale one.
    pub fn bind(path: &Path) -> Result<Self, HttpError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if UnixStream::connect(path).is_ok() {
                return Err(HttpError::InUse(path.into()));
            }
            if !meta.file_type().is_socket() {
                return Err(HttpError::NotSocket(path.into()));
            }
            std::fs::remove_file(path).map_err(|e| HttpError::RemoveStale(path.into(), e))?;
        }
        // SAFETY: umask only swaps the process's file-creation mask; it is
        // restored right after the bind, before any other file is created.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(|e| HttpError::Bind(path.into(), e))?;
        Ok(Self {
            path: Some(path.into()),
            listener: Some(listener),
            _registration: register(path),
        })
    }

    /// Serves a socket someone else bound and listens on; its path stays,
    /// made owner-only.
    pub fn adopt(listener: UnixListener) -> Self {
        let path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf));
        if let Some(p) = &path {
            if let Err(e) = super::registry::restrict(p) {
                tracing::warn!(error = %e, path = %p.display(), "cannot make the API socket owner-only");
            }
        }
        Self {
            path: None,
            listener: Some(listener),
            _registration: path.as_deref().and_then(register),
        }
    }

    /// Serves the API on a new thread until the returned server is dropped.
    /// Call it from a thread whose signal mask the server thread should
    /// inherit (the VMM blocks its signals before starting threads).
    pub fn serve(mut self, api: ApiSender) -> Result<ApiServer, HttpError> {
        let listener = self.listener.take().expect("served once");
        listener.set_nonblocking(true).map_err(HttpError::Runtime)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(HttpError::Runtime)?;
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("vmm-api".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Api);
                rt.block_on(serve(listener, Arc::new(api), stopped))
            })
            .map_err(HttpError::Runtime)?;
        Ok(ApiServer {
            _socket: self,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The running server; dropping it stops the thread and removes the socket.
pub struct ApiServer {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    _socket: ApiSocket,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(listener: UnixListener, api: Arc<ApiSender>, mut stop: oneshot::Receiver<()>) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the API socket");
            return;
        }
    };
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let api = api.clone();
                    // Fds sent with a request (libvirt's tap fds).
                    let fds = ReceivedFds::default();
                    let stream = FdStream::new(stream, fds.clone());
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(
                            TokioIo::new(stream),
                            service_fn(move |req| handle(req, api.clone(), fds.clone())),
                        );
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "API connection ended");
                        }
                    });
                }
                Err(e) => {
                    // Out of fds, say: back off rather than spin and log.
                    tracing::debug!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = &mut stop => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
}

type Reply = Response<Full<Bytes>>;

fn text(status: StatusCode, msg: &str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}

fn json(body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Finds the request for (path, method): Err is the status to answer.
fn route(path: &str, method: &Method) -> Result<ApiRequest, StatusCode> {
    let name = path.strip_prefix(API_PREFIX).ok_or(StatusCode::NOT_FOUND)?;
    let mut found = ROUTES.iter().filter(|r| r.0 == name).peekable();
    found.peek().ok_or(StatusCode::NOT_FOUND)?;
    found
        .find(|r| r.1 == method.as_str())
        .map(|r| r.2)
        .ok_or(StatusCode::METHOD_NOT_ALLOWED)
}

async fn handle(
    req: Request<Incoming>,
    api: Arc<ApiSender>,
    fds: ReceivedFds,
) -> Result<Reply, Infallible> {
    let query = req.uri().query().map(str::to_string);
    let request = match route(req.uri().path(), req.method()) {
        Ok(r) => r,
        Err(StatusCode::NOT_FOUND) => return Ok(text(StatusCode::NOT_FOUND, "Unknown path")),
        Err(s) => return Ok(text(s, "Method not allowed on this path")),
    };
    let too_large = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY as u64);
    let too_large_reply = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("Request body larger than {MAX_BODY} bytes"),
        )
    };
    if too_large {
        return Ok(too_large_reply());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Ok(too_large_reply()),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read an API request body");
            return Ok(text(
                StatusCode::BAD_REQUEST,
                "Cannot read the request body",
            ));
        }
    };
    // Kept open until the request is answered.
    let (body, _fds) = match attach_fds(request, body, fds.take()) {
        Ok(b) => b,
        Err(msg) => return Ok(text(StatusCode::BAD_REQUEST, &msg)),
    };
    tracing::debug!(?request, "API request");
    match request {
        ApiRequest::VmMetrics => return Ok(metrics(&api).await),
        ApiRequest::VmConsole => return Ok(console(query.as_deref())),
        _ => {}
    }
    Ok(match api.call(request, body).await {
        Ok(Ok(ApiReply::Empty)) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Ok(Ok(ApiReply::Json(body))) => json(body),
        Ok(Ok(ApiReply::Counters(plan))) => match resolve(plan).await {
            Ok(map) => match serde_json::to_string(&map) {
                Ok(body) => json(body),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            },
            Err(r) => r,
        },
        Ok(Err(f)) => text(
            StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &f.message,
        ),
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    })
}

/// Resolves a counters plan: backends are asked on the blocking pool,
/// never on this loop.
async fn resolve(
    plan: super::counters::CountersPlan,
) -> Result<std::collections::BTreeMap<String, super::counters::Counters>, Reply> {
    tokio::task::spawn_blocking(move || plan.resolve())
        .await
        .map_err(|_| {
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Cannot collect the counters",
            )
        })
}

/// vm.metrics: vm.info's state and vm.counters as Prometheus text.
async fn metrics(api: &ApiSender) -> Reply {
    let state = match api.call(ApiRequest::VmInfo, Vec::new()).await {
        Ok(Ok(ApiReply::Json(body))) => serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| Some(v.get("state")?.as_str()?.to_string())),
        _ => None,
    };
    let map = match api.call(ApiRequest::VmCounters, Vec::new()).await {
        Ok(Ok(ApiReply::Counters(plan))) => match resolve(plan).await {
            Ok(map) => map,
            Err(r) => return r,
        },
        Ok(Err(f)) => {
            return text(
                StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                &f.message,
            )
        }
        Ok(Ok(_)) => Default::default(),
        Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let mut r = Response::new(Full::new(Bytes::from(super::metrics::render(
        state.as_deref(),
        &map,
    ))));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// vm.console?from=N: the serial output kept from byte N on, as JSON
/// `{"from": first byte's offset, "total": bytes so far, "data": text}`.
fn console(query: Option<&str>) -> Reply {
    let from = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("from=")?.parse::<u64>().ok())
        .unwrap_or(0);
    let (start, data, total) = crate::console::output_since(from);
    json(
        serde_json::json!({
            "from": start,
            "total": total,
            "data": String::from_utf8_lossy(&data),
        })
        .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (path, method) pairs in `openapi.yaml`: two-space-indented path
    /// keys, four-space-indented method keys below them.
    fn openapi_routes() -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut path = None;
        for line in include_str!("openapi.yaml").lines() {
            let depth = line.len() - line.trim_start().len();
            if depth < 4 {
                path = (depth == 2)
                    .then(|| line.trim().strip_prefix('/')?.strip_suffix(':'))
                    .flatten()
                    .map(str::to_string);
            } else if let (Some(p), Some(m)) = (
                &path,
                line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')),
            ) {
                if ["get", "put", "post", "delete", "patch"].contains(&m) {
                    out.push((p.clone(), m.to_uppercase()));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn routing_table_matches_the_openapi_file() {
        let mut table: Vec<_> = ROUTES
            .iter()
            .map(|r| (r.0.to_string(), r.1.to_string()))
            .collect();
        table.sort();
        assert_eq!(table, openapi_routes());
    }

    #[test]
    fn unknown_path_is_404_and_wrong_method_is_405() {
        assert_eq!(
            route("/api/v1/vm.info", &Method::GET),
            Ok(ApiRequest::VmInfo)
        );
        assert_eq!(
            route("/api/v1/vm.nope", &Method::GET),
            Err(StatusCode::NOT_FOUND)
        );
        assert_eq!(route("/vm.info", &Method::GET), Err(StatusCode::NOT_FOUND));
        assert_eq!(
            route("/api/v1/vm.info", &Method::PUT),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
    }

    #[test]
    fn every_request_has_one_route() {
        for r in ROUTES {
            assert_eq!(route_of(r.2), (r.1, r.0));
        }
    }
}
