//! One vCPU's KVM state: what `KVM_GET_*` gives for a paused vCPU and the
//! order `KVM_SET_*` must put it back in.
//!
//! Save only a vCPU that is out of `KVM_RUN` with no I/O half done: after a
//! `KVM_EXIT_IO`/`KVM_EXIT_MMIO` the instruction completes (RIP moves on,
//! an `in` lands in RAX) only on the next `KVM_RUN`. So the vCPU thread,
//! having handled its last exit, must re-enter once with `immediate_exit`
//! set, which completes the instruction and returns `EINTR` without
//! running the guest: [`finish_pending_io`]. Without it a restored guest
//! would execute that `out`/`in`/MMIO access a second time.
//!
//! State this host's KVM cannot give (no `KVM_CAP_XSAVE`, `KVM_CAP_XCRS`,
//! debug registers, TSC frequency; MSRs in the index list that do not read)
//! is left out with one log line; restore then leaves those at the fresh
//! vCPU's values.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, Xsave, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, KvmNestedStateBuffer, VcpuFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, info, warn};
use vmm_sys_util::fam;
use zerocopy::IntoBytes;

/// `IA32_TSC`: written before the deadline below.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_FEATURE_CONTROL`: enables VMX; set before nested VMX state.
const MSR_IA32_FEATURE_CONTROL: u32 = 0x3a;
/// `IA32_TSC_DEADLINE`: KVM arms the LAPIC timer from it by comparing with
/// the guest TSC, so it must be written after `IA32_TSC` (and after the
/// LAPIC is in TSC-deadline mode) or the pending timer is lost.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// TSC frequencies closer than this (parts per million) count as equal,
/// as in QEMU and Firecracker: calibration differs run to run.
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// MSRs per `KVM_GET_MSRS`/`KVM_SET_MSRS`: the kernel refuses
/// `nmsrs >= MAX_IO_MSRS` (256) with `E2BIG`, one less than kvm-bindings'
/// `KVM_MAX_MSR_ENTRIES` suggests.
const MSR_BATCH: usize = KVM_MAX_MSR_ENTRIES - 1;

/// Size of the legacy `struct kvm_xsave` (its 4 KiB `region`).
const XSAVE_LEGACY_BYTES: usize = std::mem::size_of::<kvm_xsave>();
const XSAVE_LEGACY_WORDS: usize = XSAVE_LEGACY_BYTES / 4;

/// Errors saving or restoring a vCPU's state.
#[derive(Debug, Error)]
pub enum VcpuStateError {
    #[error("Cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("Cannot allocate a KVM {0} buffer")]
    Buffer(&'static str, #[source] fam::Error),
    #[error(
        "Saved XSAVE area is {saved} bytes, larger than the {host} bytes this host's KVM takes"
    )]
    XsaveTooLarge { saved: usize, host: usize },
    #[error("KVM_RUN with immediate_exit set ran the guest: {0}")]
    UnexpectedExit(String),
    #[error("Saved nested state is {saved} bytes, larger than KVM's {max}-byte buffer")]
    NestedTooLarge { saved: usize, max: usize },
}

type Result<T> = std::result::Result<T, VcpuStateError>;

/// Everything KVM holds for one x86 vCPU, as plain serializable data.
///
/// CPUID is not here: the VMM derives it from the configuration and sets
/// it on the new vCPU before [`VcpuState::restore`], as on a fresh boot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// `None` where KVM has no XSAVE.
    pub xsave: Option<XsaveState>,
    /// `None` where KVM has no `KVM_CAP_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    pub lapic: kvm_lapic_state,
    /// Every MSR of `KVM_GET_MSR_INDEX_LIST` that this vCPU could read.
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    /// `None` where KVM refused `KVM_GET_DEBUGREGS`.
    pub debug_regs: Option<kvm_debugregs>,
    /// Guest TSC frequency; `None` where KVM refused `KVM_GET_TSC_KHZ`.
    pub tsc_khz: Option<u32>,
    /// VMX/SVM state of a guest hypervisor; `None` where the guest has none
    /// or KVM cannot give it.
    pub nested: Option<NestedState>,
}

/// `KVM_GET_NESTED_STATE`'s buffer, cut to the size KVM reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NestedState {
    pub bytes: Vec<u8>,
}

/// `struct kvm_fpu` (x87 and SSE state), which kvm-bindings does not
/// serialize, mirrored field by field (the padding is dropped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The XSAVE area in KVM's uncompacted layout: the 4 KiB legacy `region`
/// followed by whatever `KVM_GET_XSAVE2` returned past it (AMX tiles and
/// other dynamically enabled features), as 32-bit words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XsaveState {
    pub words: Vec<u32>,
}

impl XsaveState {
    /// Size of the area in bytes.
    pub fn len_bytes(&self) -> usize {
        self.words.len() * 4
    }
}

impl VcpuState {
    /// Reads the state of the paused vCPU `fd`. `kvm` gives the MSR index
    /// list and the XSAVE size.
    ///
    /// Read order (Firecracker's reasoning, from the kernel): MP state
    /// first, because `KVM_GET_MP_STATE` runs `kvm_apic_accept_events()`,
    /// which may change LAPIC and vCPU state that later reads must see;
    /// vCPU events last, because other GET ioctls may still move a pending
    /// interrupt or exception into them.
    pub fn save(fd: &VcpuFd, kvm: &Kvm) -> Result<Self> {
        let mp_state = fd
            .get_mp_state()
            .map_err(|e| VcpuStateError::Kvm("get MP state", e))?;
        let regs = fd
            .get_regs()
            .map_err(|e| VcpuStateError::Kvm("get registers", e))?;
        let sregs = fd
            .get_sregs()
            .map_err(|e| VcpuStateError::Kvm("get special registers", e))?;
        let fpu = fd
            .get_fpu()
            .map_err(|e| VcpuStateError::Kvm("get FPU", e))?;
        let xsave = save_xsave(fd, kvm)?;
        let xcrs = optional("XCRs", fd.get_xcrs());
        let debug_regs = optional("debug registers", fd.get_debug_regs());
        let lapic = fd
            .get_lapic()
            .map_err(|e| VcpuStateError::Kvm("get LAPIC", e))?;
        let tsc_khz = optional("TSC frequency", fd.get_tsc_khz());
        let msrs = save_msrs(fd, kvm)?;
        let nested = save_nested(fd, kvm);
        let events = fd
            .get_vcpu_events()
            .map_err(|e| VcpuStateError::Kvm("get vCPU events", e))?;
        Ok(Self {
            regs,
            sregs,
            fpu: FpuState::from(&fpu),
            xsave,
            xcrs,
            lapic,
            msrs,
            events,
            mp_state,
            debug_regs,
            tsc_khz,
            nested,
        })
    }

    /// Puts this state into the fresh vCPU `fd`, whose CPUID the caller
    /// has already set (CPUID decides which MSRs and XSAVE features KVM
    /// accepts, and whether this vCPU is the BSP). `kvm` gives this host's
    /// XSAVE size.
    ///
    /// Set order, and why (Firecracker's, with nested state where QEMU puts
    /// it):
    /// 1. TSC frequency: the TSC MSR below is written in guest cycles, so
    ///    the scaling ratio must already be the saved one.
    /// 2. MP state: early, like every ioctl that depends on whether the
    ///    vCPU is the BSP.
    /// 3. Special registers: they carry the APIC base MSR (APIC enabled,
    ///    x2APIC mode), which the LAPIC state must land on, and EFER.SVME,
    ///    which nested SVM state needs.
    /// 4. Nested state, after `IA32_FEATURE_CONTROL` (VMX must be enabled
    ///    there first): it may switch the vCPU into guest mode, and the
    ///    registers saved then are the nested guest's, so they go after it.
    /// 5. Registers: `KVM_SET_REGS` drops any pending exception, so it must
    ///    come before the vCPU events that carry it.
    /// 6. FPU, then XSAVE (the superset, written over it), then XCRs.
    /// 7. Debug registers.
    /// 8. LAPIC: after the special registers (APIC base), before the MSRs
    ///    (`IA32_TSC_DEADLINE` is only taken with the LAPIC timer in
    ///    TSC-deadline mode).
    /// 9. MSRs, `IA32_TSC_DEADLINE` in a last batch after `IA32_TSC`.
    /// 10. vCPU events last: pending exception, interrupt, NMI and SMI,
    ///     which the sets above may have cleared.
    ///
    /// Then `KVM_KVMCLOCK_CTRL` tells a kvm-clock guest it was paused, so
    /// its soft-lockup watchdog does not fire.
    pub fn restore(&self, fd: &VcpuFd, kvm: &Kvm) -> Result<()> {
        self.restore_tsc_khz(fd)?;
        fd.set_mp_state(self.mp_state)
            .map_err(|e| VcpuStateError::Kvm("set MP state", e))?;
        fd.set_sregs(&self.sregs)
            .map_err(|e| VcpuStateError::Kvm("set special registers", e))?;
        if let Some(nested) = &self.nested {
            let feature_control: Vec<_> = self
                .msrs
                .iter()
                .filter(|m| m.index == MSR_IA32_FEATURE_CONTROL)
                .copied()
                .collect();
            write_msrs(fd, &feature_control)?;
            restore_nested(fd, nested)?;
        }
        fd.set_regs(&self.regs)
            .map_err(|e| VcpuStateError::Kvm("set registers", e))?;
        fd.set_fpu(&kvm_fpu::from(&self.fpu))
            .map_err(|e| VcpuStateError::Kvm("set FPU", e))?;
        if let Some(xsave) = &self.xsave {
            restore_xsave(fd, kvm, xsave)?;
        }
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs)
                .map_err(|e| VcpuStateError::Kvm("set XCRs", e))?;
        }
        if let Some(debug_regs) = &self.debug_regs {
            fd.set_debug_regs(debug_regs)
                .map_err(|e| VcpuStateError::Kvm("set debug registers", e))?;
        }
        fd.set_lapic(&self.lapic)
            .map_err(|e| VcpuStateError::Kvm("set LAPIC", e))?;
        restore_msrs(fd, &self.msrs)?;
        fd.set_vcpu_events(&self.events)
            .map_err(|e| VcpuStateError::Kvm("set vCPU events", e))?;
        if let Err(e) = fd.kvmclock_ctrl() {
            // EINVAL: the guest has not enabled kvm-clock; nothing to tell.
            debug!(error = %e, "KVM_KVMCLOCK_CTRL not applied");
        }
        Ok(())
    }

    /// The saved value of MSR `index`, if it was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }

    fn restore_tsc_khz(&self, fd: &VcpuFd) -> Result<()> {
        let Some(saved) = self.tsc_khz else {
            return Ok(());
        };
        let current = fd.get_tsc_khz().ok();
        if current.is_some_and(|c| tsc_khz_close(c, saved)) {
            return Ok(());
        }
        debug!(saved, ?current, "Setting the saved TSC frequency");
        fd.set_tsc_khz(saved)
            .map_err(|e| VcpuStateError::Kvm("set TSC frequency", e))
    }
}

fn tsc_khz_close(a: u32, b: u32) -> bool {
    u64::from(a.abs_diff(b)) * 1_000_000 <= u64::from(b) * TSC_KHZ_TOLERANCE_PPM
}

/// Completes an I/O or MMIO instruction whose exit was handled, without
/// running the guest further: one `KVM_RUN` with `immediate_exit` set,
/// which KVM answers with `EINTR` after finishing it. Call it on the vCPU
/// thread after pausing and before [`VcpuState::save`]; it is harmless
/// when nothing is pending. `immediate_exit` is left set: the vCPU loop
/// clears it when it resumes.
pub fn finish_pending_io(fd: &mut VcpuFd) -> Result<()> {
    fd.set_kvm_immediate_exit(1);
    match fd.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(VcpuStateError::Kvm("complete pending I/O", e)),
        Ok(exit) => Err(VcpuStateError::UnexpectedExit(format!("{exit:?}"))),
    }
}

/// `Some(value)`, or `None` with one log line when KVM refused.
fn optional<T>(what: &str, r: std::result::Result<T, kvm_ioctls::Error>) -> Option<T> {
    r.inspect_err(|e| warn!(error = %e, "KVM cannot give the {what}; not saved"))
        .ok()
}

/// Bytes `KVM_GET_XSAVE2`/`KVM_SET_XSAVE` use on this host; 0 without
/// XSAVE support at all.
fn host_xsave_bytes(kvm: &Kvm) -> usize {
    match kvm.check_extension_int(Cap::Xsave2) {
        n if n > 0 => (n as usize).max(XSAVE_LEGACY_BYTES),
        _ if kvm.check_extension(Cap::Xsave) => XSAVE_LEGACY_BYTES,
        _ => 0,
    }
}

/// A zeroed `Xsave` buffer of at least `bytes`.
fn xsave_buffer(bytes: usize) -> Result<Xsave> {
    let extra_words = bytes.saturating_sub(XSAVE_LEGACY_BYTES).div_ceil(4);
    Xsave::new(extra_words).map_err(|e| VcpuStateError::Buffer("XSAVE", e))
}

fn save_xsave(fd: &VcpuFd, kvm: &Kvm) -> Result<Option<XsaveState>> {
    let bytes = host_xsave_bytes(kvm);
    if bytes == 0 {
        warn!("KVM has no XSAVE; the XSAVE area is not saved");
        return Ok(None);
    }
    let mut xsave = xsave_buffer(bytes)?;
    // SAFETY: `xsave` holds at least the KVM_CAP_XSAVE2 size (or the legacy
    // 4 KiB when KVM predates XSAVE2), which is what KVM_GET_XSAVE2 writes;
    // this process enables no dynamic XSAVE feature (arch_prctl) that could
    // grow it after the size was read.
    let got = unsafe { fd.get_xsave2(&mut xsave) };
    let got = match got {
        Err(e) if e.errno() == libc::EINVAL || e.errno() == libc::ENOTTY => {
            // KVM before 5.17: no KVM_GET_XSAVE2, the legacy ioctl is all.
            fd.get_xsave().map(|legacy| legacy.region.to_vec())
        }
        r => r.map(|()| {
            let f = xsave.as_fam_struct_ref();
            let mut words = f.xsave.region.to_vec();
            words.extend_from_slice(xsave.as_slice());
            words
        }),
    };
    Ok(optional("XSAVE area", got).map(|words| XsaveState { words }))
}

fn restore_xsave(fd: &VcpuFd, kvm: &Kvm, saved: &XsaveState) -> Result<()> {
    let host = host_xsave_bytes(kvm);
    if saved.len_bytes() > host {
        return Err(VcpuStateError::XsaveTooLarge {
            saved: saved.len_bytes(),
            host,
        });
    }
    let mut xsave = xsave_buffer(host)?;
    let (region, extra) = saved
        .words
        .split_at(saved.words.len().min(XSAVE_LEGACY_WORDS));
    // SAFETY: only the `region` array is written; the FAM length field
    // `len`, which the wrapper relies on, is left as allocated.
    let header = unsafe { xsave.as_mut_fam_struct() };
    header.xsave.region[..region.len()].copy_from_slice(region);
    xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
    // SAFETY: `xsave` holds at least this host's KVM_CAP_XSAVE2 size, which
    // is what KVM_SET_XSAVE reads from it; the saved area is no larger
    // (checked above) and the rest is zeroes.
    unsafe { fd.set_xsave2(&xsave) }.map_err(|e| VcpuStateError::Kvm("set XSAVE area", e))
}

/// The nested (VMX/SVM) state, if the vCPU runs a guest hypervisor.
fn save_nested(fd: &VcpuFd, kvm: &Kvm) -> Option<NestedState> {
    if !kvm.check_extension(Cap::NestedState) {
        debug!("KVM has no KVM_CAP_NESTED_STATE; nested state not saved");
        return None;
    }
    let mut buf = KvmNestedStateBuffer::empty();
    match fd.nested_state(&mut buf) {
        Ok(Some(len)) => Some(NestedState {
            bytes: buf.as_bytes()[..len.get().min(buf.as_bytes().len())].to_vec(),
        }),
        Ok(None) => None,
        Err(e) => {
            info!(error = %e, "KVM cannot give the nested state; not saved");
            None
        }
    }
}

fn restore_nested(fd: &VcpuFd, nested: &NestedState) -> Result<()> {
    let mut buf = KvmNestedStateBuffer::empty();
    let dst = buf.as_mut_bytes();
    let dst = dst
        .get_mut(..nested.bytes.len())
        .ok_or(VcpuStateError::NestedTooLarge {
            saved: nested.bytes.len(),
            max: std::mem::size_of::<KvmNestedStateBuffer>(),
        })?;
    dst.copy_from_slice(&nested.bytes);
    fd.set_nested_state(&buf)
        .map_err(|e| VcpuStateError::Kvm("set nested state", e))
}

/// Reads every MSR in KVM's index list; logs those that do not read.
fn save_msrs(fd: &VcpuFd, kvm: &Kvm) -> Result<Vec<kvm_msr_entry>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| VcpuStateError::Kvm("get MSR index list", e))?;
    let (saved, skipped) = read_msrs(fd, list.as_slice())?;
    if !skipped.is_empty() {
        info!(
            msrs = %hex_list(&skipped),
            "{} MSRs in KVM's index list do not read on this vCPU; not saved",
            skipped.len()
        );
    }
    Ok(saved)
}

/// Reads `indices` in batches. `KVM_GET_MSRS` stops at the first MSR it
/// cannot read and returns how many it read: keep those, skip the failing
/// one, go on after it. Returns what was read and what was skipped.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<(Vec<kvm_msr_entry>, Vec<u32>)> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    let mut pending = indices;
    while !pending.is_empty() {
        let batch = &pending[..pending.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| VcpuStateError::Buffer("MSR", e))?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|e| VcpuStateError::Kvm("get MSRs", e))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        pending = skip_failed(batch, read, pending, &mut skipped, |&i| i);
    }
    Ok((saved, skipped))
}

/// Writes `msrs`, `IA32_TSC_DEADLINE` last; logs those KVM refuses.
fn restore_msrs(fd: &VcpuFd, msrs: &[kvm_msr_entry]) -> Result<()> {
    let (deadline, rest): (Vec<_>, Vec<_>) =
        msrs.iter().partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    let mut skipped = write_msrs(fd, &rest)?;
    skipped.extend(write_msrs(fd, &deadline)?);
    if !skipped.is_empty() {
        warn!(
            msrs = %hex_list(&skipped),
            "KVM refused {} saved MSRs; left at their reset values",
            skipped.len()
        );
    }
    Ok(())
}

/// Writes `msrs` in batches, skipping each one KVM refuses as
/// [`read_msrs`] does; returns the refused indices.
fn write_msrs(fd: &VcpuFd, msrs: &[kvm_msr_entry]) -> Result<Vec<u32>> {
    let mut skipped = Vec::new();
    let mut pending = msrs;
    while !pending.is_empty() {
        let batch = &pending[..pending.len().min(MSR_BATCH)];
        let set = Msrs::from_entries(batch).map_err(|e| VcpuStateError::Buffer("MSR", e))?;
        let done = fd
            .set_msrs(&set)
            .map_err(|e| VcpuStateError::Kvm("set MSRs", e))?;
        pending = skip_failed(batch, done, pending, &mut skipped, |m| m.index);
    }
    Ok(skipped)
}

/// After KVM processed `done` of `batch` (the head of `pending`): records
/// the entry it stopped at, if any, and returns what is left after it.
fn skip_failed<'a, T>(
    batch: &[T],
    done: usize,
    pending: &'a [T],
    skipped: &mut Vec<u32>,
    index: impl Fn(&T) -> u32,
) -> &'a [T] {
    if done < batch.len() {
        skipped.push(index(&batch[done]));
        &pending[done + 1..]
    } else {
        &pending[done..]
    }
}

fn hex_list(indices: &[u32]) -> String {
    indices
        .iter()
        .map(|i| format!("{i:#x}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_frequencies_within_250_ppm_are_equal() {
        assert!(tsc_khz_close(2_000_000, 2_000_500));
        assert!(!tsc_khz_close(2_000_000, 2_001_000));
    }

    #[test]
    fn fpu_mirror_keeps_every_field() {
        let fpu = kvm_fpu {
            fpr: [[1; 16]; 8],
            fcw: 0x37f,
            fsw: 2,
            ftwx: 3,
            last_opcode: 4,
            last_ip: 5,
            last_dp: 6,
            xmm: [[7; 16]; 16],
            mxcsr: 0x1f80,
            ..Default::default()
        };

        let back = kvm_fpu::from(&FpuState::from(&fpu));

        assert_eq!(back, fpu);
    }

    fn vcpu() -> (Kvm, kvm_ioctls::VmFd, VcpuFd) {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        (kvm, vm, fd)
    }

    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const NO_SUCH_MSR: u32 = 0x4b56_4dff;

    #[test]
    fn unreadable_msr_is_skipped_and_the_rest_still_read() {
        let (_kvm, _vm, fd) = vcpu();

        let (read, skipped) =
            read_msrs(&fd, &[MSR_IA32_TSC, NO_SUCH_MSR, MSR_KERNEL_GS_BASE]).unwrap();

        let indices: Vec<u32> = read.iter().map(|m| m.index).collect();
        assert_eq!(indices, [MSR_IA32_TSC, MSR_KERNEL_GS_BASE]);
        assert_eq!(skipped, [NO_SUCH_MSR]);
    }

    #[test]
    fn refused_msr_write_is_skipped_and_the_rest_still_written() {
        let (_kvm, _vm, fd) = vcpu();
        let entry = |index, data| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };

        let skipped = write_msrs(
            &fd,
            &[entry(NO_SUCH_MSR, 1), entry(MSR_KERNEL_GS_BASE, 0x7000)],
        )
        .unwrap();

        assert_eq!(skipped, [NO_SUCH_MSR]);
        let (read, _) = read_msrs(&fd, &[MSR_KERNEL_GS_BASE]).unwrap();
        assert_eq!(read[0].data, 0x7000);
    }

    #[test]
    fn more_msrs_than_one_batch_all_read() {
        let (_kvm, _vm, fd) = vcpu();
        let indices = vec![MSR_KERNEL_GS_BASE; 2 * MSR_BATCH + 3];

        let (read, skipped) = read_msrs(&fd, &indices).unwrap();

        assert_eq!(read.len(), indices.len());
        assert!(skipped.is_empty());
    }

    #[test]
    fn xsave_area_larger_than_the_hosts_is_refused() {
        let (kvm, _vm, fd) = vcpu();
        let host = host_xsave_bytes(&kvm);
        let saved = XsaveState {
            words: vec![0; host / 4 + 1],
        };

        let err = restore_xsave(&fd, &kvm, &saved).unwrap_err();

        assert!(
            matches!(err, VcpuStateError::XsaveTooLarge { saved, host: h }
                if saved == host + 4 && h == host),
            "{err:?}"
        );
    }

    #[test]
    fn xsave_area_round_trips_through_a_vcpu() {
        let (kvm, _vm, fd) = vcpu();
        let mut saved = save_xsave(&fd, &kvm).unwrap().unwrap();
        saved.words[40] = 0x5a5a_5a5a; // XMM0 bytes 0..4 (legacy area offset 160)
        saved.words[128] |= 0b10; // XSTATE_BV: SSE state present

        restore_xsave(&fd, &kvm, &saved).unwrap();

        assert_eq!(save_xsave(&fd, &kvm).unwrap().unwrap(), saved);
    }

    #[test]
    fn nested_state_larger_than_kvms_buffer_is_refused() {
        let (_kvm, _vm, fd) = vcpu();
        let nested = NestedState {
            bytes: vec![0; std::mem::size_of::<KvmNestedStateBuffer>() + 1],
        };

        let err = restore_nested(&fd, &nested).unwrap_err();

        assert!(
            matches!(err, VcpuStateError::NestedTooLarge { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn hex_list_joins_indices() {
        assert_eq!(hex_list(&[0x10, 0xc000_0102]), "0x10,0xc0000102");
    }
}
