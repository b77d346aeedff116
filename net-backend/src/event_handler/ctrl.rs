//! The control queue: `VIRTIO_NET_CTRL_MQ` (queue pairs in use), RX mode and
//! MAC filter commands (acknowledged: the tap delivers every frame and the
//! guest filters). Anything else is answered with an error.

use std::sync::Arc;

use backends::desc::{walk_chain, Descriptor};
use backends::memory::GuestMemRef;
use backends::ratelimit::LogLimiter;
use backends::{QueueHandler, Used};
use vm_memory::{Bytes, GuestAddress};

use crate::metrics::{DropReason as Why, NetQueueMetrics};

/// VIRTIO_NET_OK.
pub const OK: u8 = 0;
/// VIRTIO_NET_ERR.
pub const ERR: u8 = 1;
/// VIRTIO_NET_CTRL_RX.
pub const CLASS_RX: u8 = 0;
/// VIRTIO_NET_CTRL_MAC.
pub const CLASS_MAC: u8 = 1;
/// VIRTIO_NET_CTRL_MQ.
pub const CLASS_MQ: u8 = 4;
/// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET.
pub const MQ_VQ_PAIRS_SET: u8 = 0;

/// Answers one command: `cmd` is the device-readable part of the chain.
pub fn answer(cmd: &[u8], max_pairs: u16) -> u8 {
    match cmd {
        [CLASS_MQ, MQ_VQ_PAIRS_SET, lo, hi, ..] => {
            let pairs = u16::from_le_bytes([*lo, *hi]);
            if (1..=max_pairs).contains(&pairs) {
                OK
            } else {
                ERR
            }
        }
        [CLASS_RX, 0..=5, _, ..] => OK,
        [CLASS_MAC, 0..=1, ..] => OK,
        _ => ERR,
    }
}

/// The control queue processor.
pub struct CtrlQueue {
    max_pairs: u16,
    descs: Vec<Descriptor>,
    net: Arc<NetQueueMetrics>,
    log: LogLimiter,
}

impl CtrlQueue {
    /// A control queue for a device of `max_pairs` queue pairs.
    pub fn new(max_pairs: u16, net: Arc<NetQueueMetrics>) -> Self {
        CtrlQueue {
            max_pairs,
            descs: Vec::new(),
            net,
            log: LogLimiter::default(),
        }
    }

    fn bad(&mut self, head: u16) -> Option<u32> {
        self.net.dropped(Why::BadChain);
        if self.log.allow() {
            tracing::warn!(head, "malformed control chain");
        }
        Some(0)
    }
}

impl QueueHandler for CtrlQueue {
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    fn start(
        &mut self,
        mem: &GuestMemRef,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
    ) -> Option<u32> {
        if walk_chain(mem.as_ref(), desc_table, queue_size, head, &mut self.descs).is_err() {
            return self.bad(head);
        }
        let Some(ack) = self.descs.last().filter(|d| d.writable && d.len >= 1) else {
            return self.bad(head);
        };
        let ack = ack.addr;
        let mut cmd = Vec::with_capacity(64);
        for d in self.descs.iter().filter(|d| !d.writable) {
            let n = (d.len as usize).min(4096 - cmd.len().min(4096));
            let start = cmd.len();
            cmd.resize(start + n, 0);
            if mem.read_slice(&mut cmd[start..], d.addr).is_err() {
                return self.bad(head);
            }
        }
        let status = answer(&cmd, self.max_pairs);
        if status == OK {
            self.net.frame(cmd.len());
        }
        tracing::debug!(?cmd, status, "control command");
        if mem.write_obj(status, ack).is_err() {
            return self.bad(head);
        }
        Some(1)
    }

    fn submit(&mut self) {}

    fn reap(&mut self, _done: &mut Vec<Used>) {}

    fn in_flight(&self) -> usize {
        0
    }

    fn wait(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mq_pairs_within_range_is_ok() {
        assert_eq!(answer(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 2, 0], 2), OK);
    }

    #[test]
    fn mq_pairs_zero_or_too_many_is_err() {
        assert_eq!(answer(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 0, 0], 2), ERR);
        assert_eq!(answer(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 3, 0], 2), ERR);
    }

    #[test]
    fn promisc_is_acknowledged_and_unknown_class_is_err() {
        assert_eq!(answer(&[CLASS_RX, 0, 1], 1), OK);
        assert_eq!(answer(&[9, 0], 1), ERR);
        assert_eq!(answer(&[], 1), ERR);
    }
}
