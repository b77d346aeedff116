//! An API connection that also receives fds (`SCM_RIGHTS`), as libvirt
//! sends tap fds with `vm.add-net`: the fds that arrive with a request's
//! bytes are kept for the connection ([`ReceivedFds`]) until its handler
//! takes them; whatever nobody takes is closed with the connection.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;

use super::ApiRequest;

/// Most fds one read takes; more in one message are closed by the kernel
/// (`MSG_CTRUNC`, logged).
const MAX_FDS: usize = 64;

/// The fds a connection received and nobody took yet.
#[derive(Clone, Default)]
pub struct ReceivedFds(Arc<Mutex<Vec<OwnedFd>>>);

impl ReceivedFds {
    /// Takes every fd received so far.
    pub fn take(&self) -> Vec<OwnedFd> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn push(&self, fd: OwnedFd) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(fd);
    }
}

/// A unix stream whose reads use `recvmsg` and keep the fds that come.
pub struct FdStream {
    inner: UnixStream,
    fds: ReceivedFds,
}

impl FdStream {
    pub fn new(inner: UnixStream, fds: ReceivedFds) -> Self {
        Self { inner, fds }
    }
}

/// One `recvmsg` into `buf`; received fds go to `fds` (close-on-exec).
fn recv_with_fds(fd: RawFd, buf: &mut [u8], fds: &ReceivedFds) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; (MAX_FDS * 4 + 64) / 8];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at `iov` (into `buf`) and `control`, both live
    // and writable for the lengths given; MSG_CMSG_CLOEXEC marks every
    // received fd close-on-exec.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        tracing::warn!(
            max = MAX_FDS,
            "API client sent too many fds: some were dropped"
        );
    }
    // SAFETY: the CMSG_* macros walk the control buffer the kernel just
    // filled, within `msg.msg_controllen`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a valid header inside the control buffer.
        let c = unsafe { &*cmsg };
        if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a constant computation.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (c.cmsg_len as usize - header) / std::mem::size_of::<RawFd>();
            // SAFETY: the data of an SCM_RIGHTS message is `count` fds.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: within the message's data; possibly unaligned.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel installed this fd for us just now;
                // nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: as above, the next header or null at the end.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(n as usize)
}

/// The body a request goes on with, and the fds that came with it, to be
/// kept open until it is answered. A vm.add-net gets them in its body as
/// `fds` (their numbers in this process, as Cloud Hypervisor does), so
/// only fds that really came with the request are ever used: `fds` written
/// in a body by the client is refused, in vm.add-net and in vm.create's
/// `net`. Fds sent with any other request are closed.
pub fn attach_fds(
    request: ApiRequest,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
) -> Result<(Vec<u8>, Vec<OwnedFd>), String> {
    let given = |v: &Value| v.get("fds").is_some_and(|f| !f.is_null());
    match request {
        ApiRequest::VmAddNet => {
            let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(&body) else {
                // Not an object: the body's parser says what is wrong.
                return Ok((body, Vec::new()));
            };
            if given(&Value::Object(map.clone())) {
                return Err(FDS_IN_BODY.into());
            }
            if fds.is_empty() {
                return Ok((body, fds));
            }
            let numbers: Vec<Value> = fds.iter().map(|f| f.as_raw_fd().into()).collect();
            map.insert("fds".into(), Value::Array(numbers));
            let body = serde_json::to_vec(&map).map_err(|e| e.to_string())?;
            Ok((body, fds))
        }
        ApiRequest::VmCreate => {
            let nets = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("net").cloned());
            if let Some(Value::Array(nets)) = nets {
                if nets.iter().any(given) {
                    return Err(FDS_IN_BODY.into());
                }
            }
            Ok((body, Vec::new()))
        }
        _ => Ok((body, Vec::new())),
    }
}

const FDS_IN_BODY: &str =
    "net fds are passed with the vm.add-net request (SCM_RIGHTS), not written in the body";

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let fd = this.inner.as_raw_fd();
            let dst = buf.initialize_unfilled();
            match this
                .inner
                .try_io(Interest::READABLE, || recv_with_fds(fd, dst, &this.fds))
            {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    #[test]
    fn fds_sent_with_the_bytes_are_kept_for_the_handler() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        a.send_with_fds(&[&b"PUT"[..]], &[file.as_raw_fd()])
            .unwrap();
        b.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let fds = ReceivedFds::default();

        let got = rt.block_on(async {
            let mut s = FdStream::new(UnixStream::from_std(b).unwrap(), fds.clone());
            let mut buf = [0u8; 3];
            let mut rb = ReadBuf::new(&mut buf);
            std::future::poll_fn(|cx| Pin::new(&mut s).poll_read(cx, &mut rb))
                .await
                .unwrap();
            let n = rb.filled().len();
            assert_eq!(n, 3);
            buf
        });

        assert_eq!(&got, b"PUT");
        let taken = fds.take();
        assert_eq!(taken.len(), 1);
        assert!(fds.take().is_empty());
    }

    #[test]
    fn add_net_gets_the_received_fds_in_its_body() {
        let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let n = fd.as_raw_fd();

        let (body, kept) = attach_fds(
            ApiRequest::VmAddNet,
            br#"{"id":"net_0"}"#.to_vec(),
            vec![fd],
        )
        .unwrap();

        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["fds"], serde_json::json!([n]));
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn fds_written_in_a_body_are_refused() {
        let add = attach_fds(ApiRequest::VmAddNet, br#"{"fds":[3]}"#.to_vec(), Vec::new());
        let create = attach_fds(
            ApiRequest::VmCreate,
            br#"{"net":[{"fds":[0,1]}]}"#.to_vec(),
            Vec::new(),
        );

        assert!(add.is_err());
        assert!(create.is_err());
    }
}
