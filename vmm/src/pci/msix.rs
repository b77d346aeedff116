//! MSI-X: the capability, the vector table and the pending-bit array.
//! Every vector is a KVM GSI routed to the message the guest programmed and
//! an irqfd; the irqfd is attached only while the vector may fire (MSI-X
//! enabled, function and vector unmasked). While masked, a signal stays
//! counted in the eventfd and KVM delivers it when the irqfd is attached
//! again, which is the pending-then-deliver behaviour the spec asks for.
//!
//! Saved state ([`MsixState`]) is the table, the message control and the
//! pending bits. Restoring it into a freshly built [`Msix`] re-creates the
//! GSI routes and attaches the irqfds of the live vectors; a pending bit is
//! restored as a signal counted in the new vector's eventfd, so it is
//! delivered when the guest unmasks the vector, as before the save. GSI
//! numbers are host-side only (the guest sees the messages), so a
//! restored table may sit on other GSIs than the saved one.

use std::io;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::config::PciConfig;
use crate::interrupts::{InterruptError, MsiMessage, Router};

pub const MSIX_CAP_ID: u8 = 0x11;
const ENTRY_SIZE: u64 = 16;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;

/// Errors restoring MSI-X state.
#[derive(Debug, Error)]
pub enum MsixError {
    #[error("Saved MSI-X state has {saved} vectors, the device {device}")]
    Count { saved: usize, device: usize },
    #[error("Cannot mark MSI-X vector {0} pending")]
    Pending(usize, #[source] io::Error),
}

/// One vector table entry, as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    /// Vector control: bit 0 masks the vector.
    pub control: u32,
}

/// What a function's MSI-X holds, for snapshot and migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<Entry>,
    /// The capability's message control as last picked up (enable and
    /// function mask bits).
    pub control: u16,
    /// The pending bit of each vector: signalled while it could not fire.
    pub pending: Vec<bool>,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & 1 != 0
    }
}

/// One device's MSI-X vectors.
pub struct Msix {
    entries: Vec<Entry>,
    /// Signalled by whoever raises the vector (a backend's call fd).
    pub irqfds: Vec<EventFd>,
    attached: Vec<bool>,
    gsi_base: u32,
    control: u16,
    cap_offset: usize,
    vm: Arc<VmFd>,
    router: Arc<Router>,
}

impl Msix {
    /// `count` vectors with the table at `table_off` and the PBA at
    /// `pba_off` of BAR `bar`; adds the capability to `config`.
    pub fn new(
        count: u16,
        config: &mut PciConfig,
        bar: u8,
        table_off: u32,
        pba_off: u32,
        vm: Arc<VmFd>,
        router: Arc<Router>,
    ) -> Result<Self, InterruptError> {
        let gsi_base = router.allocate(count.into())?;
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(count - 1).to_le_bytes());
        body.extend_from_slice(&(table_off | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_off | u32::from(bar)).to_le_bytes());
        let cap_offset = config.add_capability(MSIX_CAP_ID, &body, &[0, 0xc0]);
        let irqfds = (0..count)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| InterruptError::OutOfGsis(count.into()))?;
        Ok(Self {
            entries: vec![
                Entry {
                    control: 1,
                    ..Default::default()
                };
                count.into()
            ],
            irqfds,
            attached: vec![false; count.into()],
            gsi_base,
            control: 0,
            cap_offset,
            vm,
            router,
        })
    }

    /// The vectors' state, for a snapshot. The VM must be paused and the
    /// device quiesced, so that no signal arrives while it is read.
    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            control: self.control,
            pending: (0..self.entries.len())
                .map(|v| !self.attached[v] && self.pending(v))
                .collect(),
        }
    }

    /// Puts `state` into vectors just built by [`Self::new`] for the same
    /// function: re-routes every vector, attaches the irqfds of those that
    /// may fire and marks the pending ones. The message control in the
    /// configuration space is restored with the rest of that space.
    pub fn restore(&mut self, state: &MsixState) -> Result<(), MsixError> {
        let count = self.entries.len();
        if state.entries.len() != count || state.pending.len() != count {
            return Err(MsixError::Count {
                saved: state.entries.len().max(state.pending.len()),
                device: count,
            });
        }
        for (v, _) in state.pending.iter().enumerate().filter(|(_, p)| **p) {
            self.irqfds[v]
                .write(1)
                .map_err(|e| MsixError::Pending(v, e))?;
        }
        self.entries = state
            .entries
            .iter()
            .map(|e| Entry {
                control: e.control & 1,
                ..*e
            })
            .collect();
        self.control = state.control;
        self.sync_all();
        Ok(())
    }

    /// Where the capability sits in the configuration space.
    pub fn cap_offset(&self) -> usize {
        self.cap_offset
    }

    pub fn count(&self) -> usize {
        self.entries.len()
    }

    pub fn enabled(&self) -> bool {
        self.control & CTRL_ENABLE != 0
    }

    /// Picks up a guest write to the capability's message control.
    pub fn config_written(&mut self, config: &PciConfig) {
        let mut b = [0u8; 2];
        config.read_bytes(self.cap_offset + 2, &mut b);
        let control = u16::from_le_bytes(b);
        if control != self.control {
            self.control = control;
            self.sync_all();
        }
    }

    /// Table reads (16-byte entries, 32-bit or 64-bit accesses).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(e) = self.entries.get((offset / ENTRY_SIZE) as usize) else {
            return;
        };
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        let start = (offset % ENTRY_SIZE) as usize;
        let end = (start + data.len()).min(16);
        data[..end - start].copy_from_slice(&bytes[start..end]);
    }

    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let idx = (offset / ENTRY_SIZE) as usize;
        let Some(e) = self.entries.get_mut(idx) else {
            return;
        };
        let start = (offset % ENTRY_SIZE) as usize;
        if start + data.len() > 16 {
            return;
        }
        let mut bytes = [0u8; 16];
        for (i, w) in [e.addr_lo, e.addr_hi, e.data, e.control].iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        bytes[start..start + data.len()].copy_from_slice(data);
        let w = |i: usize| u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
        *e = Entry {
            addr_lo: w(0),
            addr_hi: w(1),
            data: w(2),
            control: w(3) & 1,
        };
        self.sync(idx);
    }

    /// Pending bits: a masked vector whose eventfd has been signalled.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            for bit in 0..8 {
                let v = ((offset as usize) + i) * 8 + bit;
                if v < self.entries.len() && !self.attached[v] && self.pending(v) {
                    *b |= 1 << bit;
                }
            }
        }
    }

    fn pending(&self, v: usize) -> bool {
        // Peek without consuming: poll the eventfd for readability.
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.irqfds[v]),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    fn sync_all(&mut self) {
        for i in 0..self.entries.len() {
            self.sync(i);
        }
    }

    /// Brings the route and irqfd of vector `i` in line with the guest's view.
    fn sync(&mut self, i: usize) {
        let e = self.entries[i];
        let gsi = self.gsi_base + i as u32;
        let live = self.enabled() && self.control & CTRL_FUNCTION_MASK == 0 && !e.masked();
        let msg = MsiMessage {
            addr: (u64::from(e.addr_hi) << 32) | u64::from(e.addr_lo),
            data: e.data,
        };
        if let Err(err) = self.router.set_msi(gsi, self.enabled().then_some(msg)) {
            tracing::warn!(error = %err, gsi, "cannot route MSI-X vector");
            return;
        }
        if live != self.attached[i] {
            let res = if live {
                self.vm.register_irqfd(&self.irqfds[i], gsi)
            } else {
                self.vm.unregister_irqfd(&self.irqfds[i], gsi)
            };
            match res {
                Ok(()) => self.attached[i] = live,
                Err(err) => tracing::warn!(error = %err, gsi, "cannot change MSI-X irqfd"),
            }
        }
    }
}

impl Drop for Msix {
    fn drop(&mut self) {
        for i in 0..self.entries.len() {
            if self.attached[i] {
                let _ = self
                    .vm
                    .unregister_irqfd(&self.irqfds[i], self.gsi_base + i as u32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::PciId;

    fn setup() -> (Msix, PciConfig) {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let router = Arc::new(Router::new(vm.clone()));
        let mut cfg = PciConfig::new(
            PciId {
                vendor: 0x1af4,
                device: 0x1042,
                revision: 1,
                class: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            },
            0,
        );
        let m = Msix::new(2, &mut cfg, 0, 0x8000, 0xc000, vm, router).unwrap();
        (m, cfg)
    }

    fn program(m: &mut Msix, v: u64, masked: bool) {
        m.table_write(v * 16, &0xfee0_0000u32.to_le_bytes());
        m.table_write(v * 16 + 4, &0u32.to_le_bytes());
        m.table_write(v * 16 + 8, &(0x40 + v as u32).to_le_bytes());
        m.table_write(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    fn enable(m: &mut Msix, cfg: &mut PciConfig, control: u16) {
        let off = m.cap_offset + 2;
        cfg.write(off / 4, off % 4, &control.to_le_bytes());
        m.config_written(cfg);
    }

    #[test]
    fn table_reads_back_what_was_written() {
        let (mut m, _) = setup();
        program(&mut m, 1, false);
        let mut e = [0u8; 16];
        m.table_read(16, &mut e);
        assert_eq!(u32::from_le_bytes(e[0..4].try_into().unwrap()), 0xfee0_0000);
        assert_eq!(u32::from_le_bytes(e[8..12].try_into().unwrap()), 0x41);
        assert_eq!(u32::from_le_bytes(e[12..16].try_into().unwrap()), 0);
    }

    #[test]
    fn irqfd_attached_only_while_enabled_and_unmasked() {
        let (mut m, mut cfg) = setup();
        program(&mut m, 0, false);
        assert_eq!(m.attached, [false, false], "MSI-X still disabled");
        enable(&mut m, &mut cfg, CTRL_ENABLE);
        assert_eq!(m.attached, [true, false], "vector 1 is masked at reset");
        enable(&mut m, &mut cfg, CTRL_ENABLE | CTRL_FUNCTION_MASK);
        assert_eq!(m.attached, [false, false]);
        enable(&mut m, &mut cfg, CTRL_ENABLE);
        program(&mut m, 0, true);
        assert_eq!(m.attached, [false, false]);
    }

    #[test]
    fn masked_vector_shows_pending_then_delivers_on_unmask() {
        let (mut m, mut cfg) = setup();
        program(&mut m, 0, true);
        enable(&mut m, &mut cfg, CTRL_ENABLE);
        m.irqfds[0].write(1).unwrap();
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0] & 1, 1, "signal while masked is pending");
        program(&mut m, 0, false);
        assert!(m.attached[0]);
        // KVM consumed the pending signal when the irqfd was attached.
        std::thread::sleep(std::time::Duration::from_millis(50));
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0] & 1, 0);
    }

    /// Vectors restored from `m`'s state on a VM of their own.
    fn restored(m: &Msix) -> Msix {
        let (mut r, _) = setup();
        r.restore(&m.state()).unwrap();
        r
    }

    fn table(m: &Msix) -> Vec<u8> {
        let mut t = vec![0u8; 32];
        for (i, c) in t.chunks_mut(4).enumerate() {
            m.table_read(i as u64 * 4, c);
        }
        t
    }

    #[test]
    fn restored_vectors_read_back_the_same_table() {
        let (mut m, mut cfg) = setup();
        program(&mut m, 0, false);
        program(&mut m, 1, true);
        enable(&mut m, &mut cfg, CTRL_ENABLE);

        let r = restored(&m);

        assert_eq!(table(&r), table(&m));
        assert_eq!(r.state(), m.state());
    }

    #[test]
    fn restored_vectors_are_routed_and_attached_as_before() {
        let (mut m, mut cfg) = setup();
        program(&mut m, 0, false);
        program(&mut m, 1, true);
        enable(&mut m, &mut cfg, CTRL_ENABLE);

        let r = restored(&m);

        assert_eq!(r.attached, m.attached);
        assert_eq!(r.router.msi_routes(), m.router.msi_routes());
        assert_eq!(r.router.msi_routes().len(), 2);
    }

    #[test]
    fn restored_function_mask_keeps_vectors_detached() {
        let (mut m, mut cfg) = setup();
        program(&mut m, 0, false);
        enable(&mut m, &mut cfg, CTRL_ENABLE | CTRL_FUNCTION_MASK);

        let r = restored(&m);

        assert_eq!(r.attached, [false, false]);
    }

    #[test]
    fn restored_pending_vector_is_pending_then_delivers_on_unmask() {
        let (mut m, mut cfg) = setup();
        program(&mut m, 0, true);
        enable(&mut m, &mut cfg, CTRL_ENABLE);
        m.irqfds[0].write(1).unwrap();
        let mut r = restored(&m);
        let mut pba = [0u8; 8];
        r.pba_read(0, &mut pba);
        let before = pba[0];

        program(&mut r, 0, false);
        std::thread::sleep(std::time::Duration::from_millis(50));
        r.pba_read(0, &mut pba);

        assert_eq!((before & 1, pba[0] & 1), (1, 0));
        assert!(r.attached[0]);
    }

    #[test]
    fn saved_state_with_another_vector_count_is_refused() {
        let (m, _) = setup();
        let mut state = m.state();
        state.entries.push(Entry::default());
        state.pending.push(false);
        let (mut r, _) = setup();

        let err = r.restore(&state).unwrap_err();

        assert!(
            matches!(
                err,
                MsixError::Count {
                    saved: 3,
                    device: 2
                }
            ),
            "{err:?}"
        );
    }
}
