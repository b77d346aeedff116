//! The metrics endpoint of a backend daemon (`--metrics-socket PATH`): HTTP/1.1
//! on a unix socket, served by hyper on a current-thread tokio runtime in a
//! thread of its own. It only reads the queues' atomic counters (through a
//! [`CounterSource`]), so it never blocks or slows a queue worker.
//!
//! - `GET /counters`: JSON ([`counters::to_json`]).
//! - `GET /metrics`: Prometheus text 0.0.4 ([`counters::to_prometheus`]).
//! - another path: 404; another method on a known path: 405; a request hyper
//!   cannot parse: 400.
//!
//! The socket is created with mode 0600 (bound under a temporary name,
//! chmod-ed, then renamed into place). A live socket at the path is an error,
//! a stale one is replaced. It is removed when the [`MetricsServer`] is
//! dropped, and on SIGTERM or SIGINT, after which the process exits with
//! status 0. A client gets [`HEADER_TIMEOUT`] to send its request head and
//! [`CONNECTION_TIMEOUT`] in all; at most [`MAX_CONNECTIONS`] are served at
//! once (more are closed at once), so a silent client blocks nobody.

use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{oneshot, Semaphore};

use crate::counters::{self, CounterSource};
use crate::ratelimit::LogLimiter;
use crate::seccomp::{self, ThreadKind};

/// Time a client has to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a connection may stay open in all.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Content type of `GET /metrics`.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Errors starting the metrics endpoint.
#[derive(Debug, Error)]
pub enum MetricsServerError {
    /// Another process answers on the socket.
    #[error("Metrics socket {0} is in use")]
    InUse(String),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket")]
    NotASocket(String),
    /// Removing a stale socket failed.
    #[error("Cannot remove the stale socket {0}")]
    RemoveStale(String, #[source] io::Error),
    /// Binding the socket failed.
    #[error("Cannot listen on {0}")]
    Bind(String, #[source] io::Error),
    /// Setting the socket's mode or moving it into place failed.
    #[error("Cannot set up the socket file {0}")]
    SocketFile(String, #[source] io::Error),
    /// The tokio runtime could not be built.
    #[error("Cannot start the metrics runtime")]
    Runtime(#[source] io::Error),
    /// SIGTERM/SIGINT could not be watched.
    #[error("Cannot watch termination signals")]
    Signal(#[source] io::Error),
    /// The server thread could not be spawned.
    #[error("Cannot spawn the metrics thread")]
    Thread(#[source] io::Error),
}

/// The running endpoint; dropping it stops the thread and removes the socket.
pub struct MetricsServer {
    path: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `path` and serves `source`'s counters on a thread of its own.
    pub fn start(path: &Path, source: Arc<dyn CounterSource>) -> Result<Self, MetricsServerError> {
        BoundMetrics::bind(path, source, false)?.start()
    }

    /// Like [`Self::start`], and on SIGTERM or SIGINT removes the socket and
    /// exits the process with status 0: for a daemon's `main` (tokio keeps
    /// the signal handlers installed for the rest of the process).
    pub fn start_for_daemon(
        path: &Path,
        source: Arc<dyn CounterSource>,
    ) -> Result<Self, MetricsServerError> {
        Self::bind_for_daemon(path, source)?.start()
    }

    /// [`Self::start_for_daemon`] in two steps: the socket is bound and the
    /// signals watched now, the thread starts with [`BoundMetrics::start`]
    /// (after the daemon dropped privileges, which it must do with one thread).
    pub fn bind_for_daemon(
        path: &Path,
        source: Arc<dyn CounterSource>,
    ) -> Result<BoundMetrics, MetricsServerError> {
        BoundMetrics::bind(path, source, true)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A metrics endpoint whose socket is bound and whose thread is not started.
pub struct BoundMetrics {
    path: PathBuf,
    rt: tokio::runtime::Runtime,
    listener: tokio::net::UnixListener,
    signals: Option<[Signal; 2]>,
    source: Arc<dyn CounterSource>,
}

impl BoundMetrics {
    fn bind(
        path: &Path,
        source: Arc<dyn CounterSource>,
        exit_on_signal: bool,
    ) -> Result<Self, MetricsServerError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(MetricsServerError::Runtime)?;
        let guard = rt.enter();
        // The signal handlers go in before the socket appears, so whoever
        // sees the socket can rely on SIGTERM removing it.
        let signals = if exit_on_signal {
            let term = signal(SignalKind::terminate()).map_err(MetricsServerError::Signal)?;
            let int = signal(SignalKind::interrupt()).map_err(MetricsServerError::Signal)?;
            Some([term, int])
        } else {
            None
        };
        let listener = bind(path)?;
        let listener = listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(listener));
        drop(guard);
        let listener = match listener {
            Ok(listener) => listener,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(MetricsServerError::Bind(path.display().to_string(), e));
            }
        };
        Ok(BoundMetrics {
            path: path.to_path_buf(),
            rt,
            listener,
            signals,
            source,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts serving on a thread of its own, which confines itself
    /// ([`ThreadKind::Metrics`]) before its first request.
    pub fn start(self) -> Result<MetricsServer, MetricsServerError> {
        let BoundMetrics {
            path,
            rt,
            listener,
            signals,
            source,
        } = self;
        let (tx, rx) = oneshot::channel();
        let file = path.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                seccomp::apply_or_exit(ThreadKind::Metrics);
                rt.block_on(accept_loop(listener, source, rx, signals, file))
            });
        let thread = match thread {
            Ok(thread) => thread,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(MetricsServerError::Thread(e));
            }
        };
        tracing::info!(socket = %path.display(), "metrics endpoint listening");
        Ok(MetricsServer {
            path,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` with mode 0600: refuses a live socket or a non-socket file,
/// replaces a stale socket.
fn bind(path: &Path) -> Result<UnixListener, MetricsServerError> {
    let shown = || path.display().to_string();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(MetricsServerError::NotASocket(shown()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(MetricsServerError::InUse(shown()));
        }
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(socket = %path.display(), "replaced a stale metrics socket"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(MetricsServerError::RemoveStale(shown(), e)),
        }
    }
    bind_private(path).map_err(|e| match e {
        PrivateBindError::Bind(e) => MetricsServerError::Bind(shown(), e),
        PrivateBindError::Place(e) => MetricsServerError::SocketFile(shown(), e),
    })
}

/// Why [`bind_private`] failed.
pub(crate) enum PrivateBindError {
    /// bind(2) failed.
    Bind(io::Error),
    /// chmod or rename failed.
    Place(io::Error),
}

/// Listens on `path` with mode 0600, replacing whatever is there: bound
/// under a temporary name and renamed, so the socket is never reachable at
/// `path` with a wider mode.
pub(crate) fn bind_private(path: &Path) -> Result<UnixListener, PrivateBindError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(PrivateBindError::Bind)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(PrivateBindError::Place(e));
    }
    Ok(listener)
}

async fn accept_loop(
    listener: tokio::net::UnixListener,
    source: Arc<dyn CounterSource>,
    mut shutdown: oneshot::Receiver<()>,
    signals: Option<[Signal; 2]>,
    path: PathBuf,
) {
    let [mut term, mut int] = signals.map_or([None, None], |[t, i]| [Some(t), Some(i)]);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let log = Arc::new(Mutex::new(LogLimiter::new(5)));
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            Some(_) = recv(&mut term) => exit_on_signal(&path, "SIGTERM"),
            Some(_) = recv(&mut int) => exit_on_signal(&path, "SIGINT"),
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if allow(&log) {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                }
                // EMFILE and the like: give the other connections time to end.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if allow(&log) {
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    "metrics endpoint: too many connections, closing one"
                );
            }
            continue;
        };
        let source = source.clone();
        let log = log.clone();
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(stream, source, &log).await;
        });
    }
}

/// The next delivery of `sig`; never, without it.
async fn recv(sig: &mut Option<Signal>) -> Option<()> {
    match sig {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

fn exit_on_signal(path: &Path, name: &str) -> ! {
    let _ = std::fs::remove_file(path);
    tracing::info!(signal = name, "terminating, metrics socket removed");
    std::process::exit(0);
}

fn allow(log: &Mutex<LogLimiter>) -> bool {
    log.lock().map(|mut l| l.allow()).unwrap_or(false)
}

async fn serve_connection(
    stream: tokio::net::UnixStream,
    source: Arc<dyn CounterSource>,
    log: &Mutex<LogLimiter>,
) {
    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
        let reply = respond(req.method(), req.uri().path(), source.as_ref());
        async move { Ok::<_, Infallible>(reply) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            if allow(log) {
                tracing::debug!(error = %e, "metrics endpoint: connection failed");
            }
        }
        Err(_) => {
            if allow(log) {
                tracing::debug!("metrics endpoint: connection timed out");
            }
        }
    }
}

/// The answer to `method path`.
pub fn respond(method: &Method, path: &str, source: &dyn CounterSource) -> Response<Full<Bytes>> {
    let render: fn(&counters::Counters) -> String = match path {
        "/counters" => counters::to_json,
        "/metrics" => counters::to_prometheus,
        _ => return plain(StatusCode::NOT_FOUND, "Not found\n"),
    };
    if method != Method::GET {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed\n");
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET"));
        return r;
    }
    let content_type = if path == "/counters" {
        "application/json"
    } else {
        PROMETHEUS_CONTENT_TYPE
    };
    let mut r = Response::new(Full::new(Bytes::from(render(&source.counters()))));
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// An HTTP answer read by [`request`].
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// The header lines, as sent.
    pub head: String,
    /// The body.
    pub body: String,
}

/// A minimal blocking HTTP/1.1 client for tests and tools: sends `raw` as
/// is on `socket` and reads the answer until the server closes (send
/// `Connection: close`).
pub fn request(socket: &Path, raw: &[u8], timeout: Duration) -> io::Result<Reply> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(raw)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not an HTTP answer");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok(Reply {
        status,
        head: head.into(),
        body: body.into(),
    })
}

/// `GET target` with `Connection: close` through [`request`].
pub fn get(socket: &Path, target: &str, timeout: Duration) -> io::Result<Reply> {
    let raw = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    request(socket, raw.as_bytes(), timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::{Counters, Metric, QueueCounters, Sample};

    static REQUESTS: Metric = Metric::counter("requests", "Requests taken.");

    struct Fixed;

    impl CounterSource for Fixed {
        fn counters(&self) -> Counters {
            Counters {
                device: "test",
                queues: vec![QueueCounters {
                    queue: 0,
                    kind: None,
                    samples: vec![Sample::new(&REQUESTS, 5)],
                }],
            }
        }
    }

    #[test]
    fn get_counters_is_json() {
        let r = respond(&Method::GET, "/counters", &Fixed);

        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
    }

    #[test]
    fn get_metrics_is_prometheus_text() {
        let r = respond(&Method::GET, "/metrics", &Fixed);

        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[CONTENT_TYPE], PROMETHEUS_CONTENT_TYPE);
    }

    #[test]
    fn unknown_path_is_404_whatever_the_method() {
        let get = respond(&Method::GET, "/nope", &Fixed);
        let post = respond(&Method::POST, "/nope", &Fixed);

        assert_eq!(
            (get.status(), post.status()),
            (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND)
        );
    }

    #[test]
    fn post_to_a_known_path_is_405_with_allow() {
        let r = respond(&Method::POST, "/metrics", &Fixed);

        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[ALLOW], "GET");
    }

    #[test]
    fn a_regular_file_at_the_path_is_refused() {
        let path = std::env::temp_dir().join(format!("ms-file-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();

        let r = MetricsServer::start(&path, Arc::new(Fixed));

        assert!(matches!(r, Err(MetricsServerError::NotASocket(_))));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn serves_over_the_socket_and_removes_it_when_dropped() {
        let path = std::env::temp_dir().join(format!("ms-serve-{}.sock", std::process::id()));
        let server = MetricsServer::start(&path, Arc::new(Fixed)).unwrap();

        let r = get(&path, "/counters", Duration::from_secs(5)).unwrap();
        drop(server);

        assert_eq!(r.status, 200);
        assert!(r.body.contains("\"requests\":5"), "{}", r.body);
        assert!(!path.exists());
    }
}
