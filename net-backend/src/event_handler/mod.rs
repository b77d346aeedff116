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
