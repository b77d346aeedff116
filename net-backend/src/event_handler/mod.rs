//! Per-queue frame processing, driven by the `backends` worker threads.
//!
//! - [`rx`]: tap → guest. io_uring reads into bounce buffers, copied into
//!   the guest's RX chains (mergeable buffers: one frame over several chains).
//! - [`tx`]: guest → tap. Chains become iovecs straight into guest memory,
//!   written to the tap with io_uring.
//! - [`ctrl`]: the control queue (MQ, RX mode, MAC), answered synchronously.

pub mod ctrl;
pub mod rx;
pub mod tx;

use std::os::fd::RawFd;

/// Makes the worker poll `notifier` (an eventfd) again, so it reaps
/// completions the handler produced by itself.
pub(crate) fn wake(notifier: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: `notifier` is the ring's open eventfd and `one` is 8 readable bytes.
    let _ = unsafe { libc::write(notifier, one.as_ptr().cast(), one.len()) };
}
