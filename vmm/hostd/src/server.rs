//! The HTTP server: hyper per connection on a current-thread tokio
//! runtime, every vmm request on the blocking pool (each asks vmm sockets
//! with blocking I/O), one task per connection.

use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;

use crate::auth::{self, Verdict};
use crate::{exporter, web, Config, HostdError};

type Reply = Response<Full<Bytes>>;

const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Action bodies are empty; anything larger is refused.
const MAX_BODY: usize = 4096;

fn reply(status: StatusCode, kind: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn text(status: StatusCode, msg: &str) -> Reply {
    reply(status, "text/plain; charset=utf-8", format!("{msg}\n"))
}

fn json(v: &Value) -> Reply {
    reply(StatusCode::OK, "application/json", v.to_string())
}

fn failure(e: &web::WebError) -> Reply {
    text(
        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY),
        &vmm::error_chain(e),
    )
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

async fn route(req: Request<Incoming>, cfg: Arc<Config>) -> Reply {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    match (&method, parts.as_slice()) {
        (&Method::GET, [""]) | (&Method::GET, ["index.html"]) => asset(""),
        (&Method::GET, ["assets", name]) => asset(name),
        (&Method::GET, ["metrics"]) => {
            match blocking(|| exporter::render(&crate::collect::read_all())).await {
                Some(t) => reply(StatusCode::OK, "text/plain; version=0.0.4", t),
                None => text(StatusCode::INTERNAL_SERVER_ERROR, "Cannot collect"),
            }
        }
        (&Method::GET, ["api", "vms"]) => match blocking(web::vms).await {
            Some(v) => json(&v),
            None => text(StatusCode::INTERNAL_SERVER_ERROR, "Cannot collect"),
        },
        (&Method::GET, ["api", "vms", name, "console"]) => {
            let from = query
                .iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("from=")?.parse().ok())
                .unwrap_or(0u64);
            let name = name.to_string();
            match blocking(move || web::console(&name, from)).await {
                Some(Ok(body)) => reply(StatusCode::OK, "application/json", body),
                Some(Err(e)) => failure(&e),
                None => text(StatusCode::INTERNAL_SERVER_ERROR, "Cannot read"),
            }
        }
        (&Method::POST, ["api", "vms", name, action]) => {
            if !req.headers().contains_key(web::ACTION_HEADER) {
                return text(StatusCode::FORBIDDEN, "Actions need the X-Vmm-Hostd header");
            }
            if Limited::new(req.into_body(), MAX_BODY)
                .collect()
                .await
                .is_err()
            {
                return text(StatusCode::PAYLOAD_TOO_LARGE, "Actions take no body");
            }
            let (name, action) = (name.to_string(), action.to_string());
            let dir = cfg.snapshot_dir.clone();
            match blocking(move || web::action(&name, &action, &dir)).await {
                Some(Ok(v)) => json(&v),
                Some(Err(e)) => failure(&e),
                None => text(StatusCode::INTERNAL_SERVER_ERROR, "Action failed"),
            }
        }
        (_, ["api", ..]) | (_, ["metrics"]) | (_, ["assets", ..]) | (_, [""]) => {
            text(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed")
        }
        _ => text(StatusCode::NOT_FOUND, "Unknown path"),
    }
}

fn asset(name: &str) -> Reply {
    match web::asset(name) {
        Some((kind, bytes)) => reply(StatusCode::OK, kind, Bytes::from_static(bytes)),
        None => text(StatusCode::NOT_FOUND, "Unknown asset"),
    }
}

async fn handle(req: Request<Incoming>, cfg: Arc<Config>) -> Result<Reply, Infallible> {
    let verdict = auth::check(cfg.token.as_deref(), req.headers(), req.uri().query());
    if verdict == Verdict::Denied {
        return Ok(text(StatusCode::UNAUTHORIZED, "A valid token is needed"));
    }
    let token = cfg.token.clone();
    let mut r = route(req, cfg).await;
    if let (Verdict::AllowedSetCookie, Some(t)) = (verdict, token) {
        let cookie = format!(
            "{}={t}; HttpOnly; SameSite=Strict; Path=/",
            auth::COOKIE_NAME
        );
        if let Ok(v) = header::HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    Ok(r)
}

fn serve_connection<S>(stream: S, cfg: Arc<Config>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| handle(req, cfg.clone())),
        );
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection ended");
        }
    });
}

/// Binds the unix socket at `path` mode 0600, replacing a stale one.
fn bind_unix(path: &std::path::Path) -> Result<std::os::unix::net::UnixListener, HostdError> {
    let shown = path.display().to_string();
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    // SAFETY: umask only swaps the process's file-creation mask; it is
    // restored right after the bind, before any other file is created.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = bound.map_err(|e| HostdError::Listen(shown.clone(), e))?;
    l.set_nonblocking(true)
        .map_err(|e| HostdError::Listen(shown, e))?;
    Ok(l)
}

/// Serves until the process is stopped. Prints `vmm-hostd: serving
/// http://ADDR/` on stdout once listening.
pub fn run(cfg: Config) -> Result<(), HostdError> {
    let tcp = std::net::TcpListener::bind(cfg.listen)
        .map_err(|e| HostdError::Listen(cfg.listen.to_string(), e))?;
    tcp.set_nonblocking(true)
        .map_err(|e| HostdError::Listen(cfg.listen.to_string(), e))?;
    let unix = cfg.socket.as_deref().map(bind_unix).transpose()?;
    let addr = tcp
        .local_addr()
        .map_err(|e| HostdError::Listen(cfg.listen.to_string(), e))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(HostdError::Runtime)?;
    let cfg = Arc::new(cfg);
    rt.block_on(async move {
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(HostdError::Runtime)?;
        let unix = unix
            .map(tokio::net::UnixListener::from_std)
            .transpose()
            .map_err(HostdError::Runtime)?;
        println!("vmm-hostd: serving http://{addr}/");
        let _ = std::io::stdout().flush();
        tracing::info!(%addr, "serving");
        loop {
            tokio::select! {
                accepted = tcp.accept() => match accepted {
                    Ok((s, _)) => serve_connection(s, cfg.clone()),
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                accepted = async { unix.as_ref().expect("guarded").accept().await }, if unix.is_some() => match accepted {
                    Ok((s, _)) => serve_connection(s, cfg.clone()),
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    })
}
