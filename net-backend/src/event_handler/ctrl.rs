//! The control queue: `VIRTIO_NET_CTRL_MQ` (queue pairs in use), RX mode and
//! MAC filter commands. Each accepted command is recorded in the device's
//! [`CtrlSettings`] (shown on the metrics endpoint, saved with the device
//! state); RX mode and MAC filters are not enforced (the tap delivers every
//! frame and the guest filters). Anything else is answered with an error.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use backends::desc::{walk_chain, Descriptor};
use backends::memory::GuestMemRef;
use backends::ratelimit::LogLimiter;
use backends::{DirtyLogger, QueueHandler, Used};
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
/// VIRTIO_NET_CTRL_MAC_TABLE_SET.
pub const MAC_TABLE_SET: u8 = 0;
/// VIRTIO_NET_CTRL_MAC_ADDR_SET.
pub const MAC_ADDR_SET: u8 = 1;

/// A MAC address.
pub type Mac = [u8; 6];

/// What the driver set through the control queue. Kept in the device, so
/// it outlives a frontend reconnect, and saved with the device state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtrlSettings {
    /// Queue pairs in use (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET); 0 until the
    /// driver sets it, which means one.
    pub queue_pairs: u16,
    /// RX mode: bit n is VIRTIO_NET_CTRL_RX command n switched on (PROMISC,
    /// ALLMULTI, ALLUNI, NOMULTI, NOUNI, NOBCAST).
    pub rx_mode: u8,
    /// Address set with VIRTIO_NET_CTRL_MAC_ADDR_SET.
    pub mac: Option<Mac>,
    /// Unicast filter (VIRTIO_NET_CTRL_MAC_TABLE_SET).
    pub unicast: Vec<Mac>,
    /// Multicast filter (VIRTIO_NET_CTRL_MAC_TABLE_SET).
    pub multicast: Vec<Mac>,
}

/// Splits one `struct virtio_net_ctrl_mac` (le32 count, then the entries)
/// off the front of `data`.
fn mac_table(data: &[u8]) -> Option<(Vec<Mac>, &[u8])> {
    let (count, rest) = data.split_first_chunk::<4>()?;
    let len = (u32::from_le_bytes(*count) as usize).checked_mul(6)?;
    let entries = rest.get(..len)?;
    let macs = entries
        .chunks_exact(6)
        .map(|m| m.try_into().unwrap_or_default())
        .collect();
    Some((macs, &rest[len..]))
}

/// Answers one command and records what it set: `cmd` is the
/// device-readable part of the chain. A refused command changes nothing.
pub fn answer(cmd: &[u8], max_pairs: u16, settings: &mut CtrlSettings) -> u8 {
    match cmd {
        [CLASS_MQ, MQ_VQ_PAIRS_SET, lo, hi, ..] => {
            let pairs = u16::from_le_bytes([*lo, *hi]);
            if !(1..=max_pairs).contains(&pairs) {
                return ERR;
            }
            settings.queue_pairs = pairs;
        }
        [CLASS_RX, bit @ 0..=5, on, ..] => {
            let mask = 1u8 << bit;
            match on {
                0 => settings.rx_mode &= !mask,
                _ => settings.rx_mode |= mask,
            }
        }
        [CLASS_MAC, MAC_ADDR_SET, mac @ ..] => match <Mac>::try_from(mac) {
            Ok(mac) => settings.mac = Some(mac),
            Err(_) => return ERR,
        },
        [CLASS_MAC, MAC_TABLE_SET, tables @ ..] => {
            let Some((unicast, rest)) = mac_table(tables) else {
                return ERR;
            };
            let Some((multicast, [])) = mac_table(rest) else {
                return ERR;
            };
            settings.unicast = unicast;
            settings.multicast = multicast;
        }
        _ => return ERR,
    }
    OK
}

/// The control queue processor.
pub struct CtrlQueue {
    max_pairs: u16,
    settings: Arc<Mutex<CtrlSettings>>,
    descs: Vec<Descriptor>,
    net: Arc<NetQueueMetrics>,
    log: LogLimiter,
    dirty: DirtyLogger,
}

impl CtrlQueue {
    /// A control queue for a device of `max_pairs` queue pairs, recording
    /// accepted commands in `settings`.
    pub fn new(
        max_pairs: u16,
        settings: Arc<Mutex<CtrlSettings>>,
        net: Arc<NetQueueMetrics>,
    ) -> Self {
        CtrlQueue {
            max_pairs,
            settings,
            descs: Vec::new(),
            net,
            log: LogLimiter::default(),
            dirty: DirtyLogger::default(),
        }
    }

    /// Marks the acks this queue writes to guest memory in `dirty`.
    pub fn with_dirty_log(mut self, dirty: DirtyLogger) -> Self {
        self.dirty = dirty;
        self
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
        let status = match self.settings.lock() {
            Ok(mut settings) => answer(&cmd, self.max_pairs, &mut settings),
            Err(_) => ERR,
        };
        if status == OK {
            self.net.frame(cmd.len());
        }
        tracing::debug!(?cmd, status, "control command");
        if mem.write_obj(status, ack).is_err() {
            return self.bad(head);
        }
        self.dirty.mark(ack, 1);
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

    fn run(cmd: &[u8], max_pairs: u16) -> (u8, CtrlSettings) {
        let mut s = CtrlSettings::default();
        let status = answer(cmd, max_pairs, &mut s);
        (status, s)
    }

    #[test]
    fn mq_pairs_within_range_is_ok_and_recorded() {
        let (status, s) = run(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 2, 0], 2);

        assert_eq!((status, s.queue_pairs), (OK, 2));
    }

    #[test]
    fn mq_pairs_zero_or_too_many_is_err_and_changes_nothing() {
        assert_eq!(
            run(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 0, 0], 2),
            (ERR, CtrlSettings::default())
        );
        assert_eq!(
            run(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 3, 0], 2),
            (ERR, CtrlSettings::default())
        );
    }

    #[test]
    fn promisc_is_recorded_and_unknown_class_is_err() {
        assert_eq!(run(&[CLASS_RX, 0, 1], 1).1.rx_mode, 1);
        assert_eq!(run(&[9, 0], 1).0, ERR);
        assert_eq!(run(&[], 1).0, ERR);
    }

    #[test]
    fn rx_mode_off_clears_only_its_bit() {
        let mut s = CtrlSettings {
            rx_mode: 0b11,
            ..Default::default()
        };

        let status = answer(&[CLASS_RX, 1, 0], 1, &mut s);

        assert_eq!((status, s.rx_mode), (OK, 0b01));
    }

    #[test]
    fn mac_table_set_records_both_tables() {
        let mut cmd = vec![CLASS_MAC, MAC_TABLE_SET, 1, 0, 0, 0];
        cmd.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        cmd.extend_from_slice(&[2, 0, 0, 0]);
        cmd.extend_from_slice(&[1, 0, 0x5e, 0, 0, 1, 1, 0, 0x5e, 0, 0, 2]);

        let (status, s) = run(&cmd, 1);

        assert_eq!(status, OK);
        assert_eq!(s.unicast, vec![[2, 0, 0, 0, 0, 1]]);
        assert_eq!(s.multicast.len(), 2);
    }

    #[test]
    fn mac_table_with_a_short_count_is_err() {
        let cmd = [CLASS_MAC, MAC_TABLE_SET, 2, 0, 0, 0, 2, 0, 0, 0, 0, 1];

        assert_eq!(run(&cmd, 1), (ERR, CtrlSettings::default()));
    }

    #[test]
    fn mac_addr_set_records_the_address() {
        let (status, s) = run(&[CLASS_MAC, MAC_ADDR_SET, 2, 0, 0, 0, 0, 9], 1);

        assert_eq!((status, s.mac), (OK, Some([2, 0, 0, 0, 0, 9])));
    }
}
