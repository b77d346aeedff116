//! vCPU and VM state capture/restore against real KVM: a tiny long-mode
//! guest counts in RBX and in memory, a second VM gets its memory and
//! state, and carries on counting.
//!
//! The VMs are built with the project's `vm::create_vm` (in-kernel irqchip
//! and PIT, as every VM the VMM runs) and the boot helpers in
//! `arch::x86_64::regs`, but without `Machine`: these tests drive
//! `KVM_RUN` themselves.

use std::path::PathBuf;
use std::time::Duration;

use kvm_bindings::{kvm_clock_data, kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::regs::{
    setup_boot_regs, setup_fpu, setup_lint, setup_msrs, write_gdt, write_page_tables, Entry,
};
use vmm::memory::Memory;
use vmm::state::vcpu::{finish_pending_io, FpuState, MSR_IA32_TSC};
use vmm::state::{read_state_file, write_state_file, VcpuState, VmState};

const MEM_SIZE: u64 = 2 << 20;
const CODE_ADDR: u64 = 0x1_0000;
const COUNTER_ADDR: u64 = 0x1_1000;
const DEBUG_PORT: u16 = 0xe9;
/// The guest reports on `DEBUG_PORT` every this many increments.
const REPORT_EVERY: u64 = 256;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// Canonical, or `wrmsr` faults.
const GS_BASE_VALUE: u64 = 0x0000_7654_3210_abcd;
/// Put in XMM3 by the VMM (the guest cannot touch SSE here), so the
/// FPU/XSAVE state is not all reset values.
const XMM3_PATTERN: [u8; 16] = *b"snapshot-xmm3-ok";
/// LAPIC register LVT1, set to NMI by `setup_lint` (reset: masked, fixed).
const APIC_LVT1: usize = 0x360;
/// Offset of the `jmp` after the `out`: where RIP is once the `out` is done.
const AFTER_OUT: u64 = 0x2a;

/// ```text
/// 0x00  mov ecx, 0xc0000102      ; IA32_KERNEL_GS_BASE
/// 0x05  mov eax, 0x3210abcd
/// 0x0a  mov edx, 0x00007654
/// 0x0f  wrmsr                    ; once, before the loop
/// 0x11  xor ebx, ebx
/// 0x13  inc rbx                  ; loop:
/// 0x16  mov [0x11000], rbx
/// 0x1e  test ebx, 0xff
/// 0x24  jnz loop
/// 0x26  mov eax, ebx
/// 0x28  out 0xe9, eax            ; every 256 increments
/// 0x2a  jmp loop
/// ```
const GUEST_CODE: &[u8] = &[
    0xb9, 0x02, 0x01, 0x00, 0xc0, 0xb8, 0xcd, 0xab, 0x10, 0x32, 0xba, 0x54, 0x76, 0x00, 0x00, 0x0f,
    0x30, 0x31, 0xdb, 0x48, 0xff, 0xc3, 0x48, 0x89, 0x1c, 0x25, 0x00, 0x10, 0x01, 0x00, 0xf7, 0xc3,
    0xff, 0x00, 0x00, 0x00, 0x75, 0xed, 0x89, 0xd8, 0xe7, 0xe9, 0xeb, 0xe7,
];

/// ```text
/// 0x00  in eax, 0xe9
/// 0x02  mov ebx, eax
/// 0x04  jmp $
/// ```
const IN_CODE: &[u8] = &[0xe5, 0xe9, 0x89, 0xc3, 0xeb, 0xfe];
const IN_VALUE: u32 = 0x5eed_1234;

struct TestVm {
    vm: VmFd,
    vcpu: VcpuFd,
    mem: Memory,
}

/// A VM like the VMM's (irqchip, PIT), 2 MiB of RAM, one vCPU with `cpuid`.
fn new_vm(kvm: &Kvm, cpuid: &CpuId) -> TestVm {
    let mem = Memory::new(MEM_SIZE, false).unwrap();
    let vm = vmm::vm::create_vm(kvm, 1, &mem.guest).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(cpuid).unwrap();
    TestVm { vm, vcpu, mem }
}

fn supported_cpuid(kvm: &Kvm) -> CpuId {
    // The state code's log lines (what this host's KVM refused) show with
    // `--nocapture`.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("vmm=debug")
        .with_test_writer()
        .try_init();
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap()
}

/// A VM whose vCPU enters `GUEST_CODE` in long mode.
fn booted_vm(kvm: &Kvm, cpuid: &CpuId) -> TestVm {
    booted_vm_with(kvm, cpuid, GUEST_CODE)
}

/// A VM whose vCPU enters `code` in long mode.
fn booted_vm_with(kvm: &Kvm, cpuid: &CpuId, code: &[u8]) -> TestVm {
    let t = new_vm(kvm, cpuid);
    write_gdt(&t.mem.guest).unwrap();
    write_page_tables(&t.mem.guest, MEM_SIZE).unwrap();
    t.mem
        .guest
        .write_slice(code, GuestAddress(CODE_ADDR))
        .unwrap();
    let entry = Entry::Linux64 {
        rip: CODE_ADDR,
        zero_page: 0,
    };
    setup_msrs(&t.vcpu).unwrap();
    setup_lint(&t.vcpu).unwrap();
    setup_fpu(&t.vcpu).unwrap();
    let mut fpu = t.vcpu.get_fpu().unwrap();
    fpu.xmm[3] = XMM3_PATTERN;
    t.vcpu.set_fpu(&fpu).unwrap();
    setup_boot_regs(&t.vcpu, entry).unwrap();
    t
}

/// Runs until the guest has reported `reports` times; returns the last
/// value reported. That `out` is left pending, as after any I/O exit.
fn run_until_reports(vcpu: &mut VcpuFd, reports: u32) -> u64 {
    let mut last = 0;
    let mut seen = 0;
    while seen < reports {
        let unexpected = match vcpu.run() {
            Ok(VcpuExit::IoOut(DEBUG_PORT, data)) => {
                last = u32::from_le_bytes(data.try_into().unwrap()).into();
                seen += 1;
                continue;
            }
            Ok(exit) => format!("{exit:?}"),
            Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => continue,
            Err(e) => format!("KVM_RUN error {e}"),
        };
        panic!(
            "unexpected exit {unexpected}: {:#x?} {:#x?}",
            vcpu.get_regs(),
            vcpu.get_sregs()
        );
    }
    last
}

/// Like [`run_until_reports`], then completes the last `out`, as the VMM
/// must before saving, so the state is whole.
fn run_reports(vcpu: &mut VcpuFd, reports: u32) -> u64 {
    let last = run_until_reports(vcpu, reports);
    finish_pending_io(vcpu).unwrap();
    vcpu.set_kvm_immediate_exit(0);
    last
}

/// Runs to the guest's `in` and answers it with `value`.
fn answer_one_in(vcpu: &mut VcpuFd, value: u32) {
    match vcpu.run() {
        Ok(VcpuExit::IoIn(DEBUG_PORT, data)) => data.copy_from_slice(&value.to_le_bytes()),
        Ok(exit) => panic!("unexpected exit {exit:?}"),
        Err(e) => panic!("KVM_RUN: {e}"),
    }
}

fn snapshot_memory(t: &TestVm) -> Vec<u8> {
    let mut buf = vec![0; MEM_SIZE as usize];
    t.mem.guest.read_slice(&mut buf, GuestAddress(0)).unwrap();
    buf
}

fn read_msr(vcpu: &VcpuFd, index: u32) -> u64 {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
    msrs.as_slice()[0].data
}

/// Saved state of a guest paused after `reports` reports.
struct Saved {
    vcpu: VcpuState,
    vm: VmState,
    memory: Vec<u8>,
    counter: u64,
}

fn run_and_save(kvm: &Kvm, cpuid: &CpuId, reports: u32) -> Saved {
    let mut t = booted_vm(kvm, cpuid);
    let counter = run_reports(&mut t.vcpu, reports);
    Saved {
        vcpu: VcpuState::save(&t.vcpu, kvm).unwrap(),
        vm: VmState::save(&t.vm),
        memory: snapshot_memory(&t),
        counter,
    }
}

fn restored_vm(kvm: &Kvm, cpuid: &CpuId, saved: &Saved) -> TestVm {
    let t = new_vm(kvm, cpuid);
    t.mem
        .guest
        .write_slice(&saved.memory, GuestAddress(0))
        .unwrap();
    saved.vm.restore(&t.vm).unwrap();
    saved.vcpu.restore(&t.vcpu, kvm).unwrap();
    t
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-vcpu-state-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The parts of a vCPU's state that do not move while it sits paused:
/// everything but the TSC.
fn stable(s: &VcpuState) -> VcpuState {
    let mut s = s.clone();
    s.msrs.retain(|m| m.index != MSR_IA32_TSC);
    s
}

#[test]
fn restored_vcpu_continues_counting_where_the_saved_one_stopped() {
    let kvm = Kvm::new().unwrap();
    let cpuid = supported_cpuid(&kvm);
    let saved = run_and_save(&kvm, &cpuid, 4);

    let mut t = restored_vm(&kvm, &cpuid, &saved);
    let next = run_reports(&mut t.vcpu, 1);

    assert_eq!(saved.counter, 4 * REPORT_EVERY);
    assert_eq!(next, saved.counter + REPORT_EVERY);
    let in_memory: u64 = t.mem.guest.read_obj(GuestAddress(COUNTER_ADDR)).unwrap();
    assert_eq!(in_memory, next);
    assert_eq!(t.vcpu.get_regs().unwrap().rbx, next);
}

#[test]
fn restored_vcpu_resumes_at_the_saved_rip_with_the_guest_written_msr() {
    let kvm = Kvm::new().unwrap();
    let cpuid = supported_cpuid(&kvm);
    let saved = run_and_save(&kvm, &cpuid, 2);

    let t = restored_vm(&kvm, &cpuid, &saved);

    assert_eq!(saved.vcpu.regs.rip, CODE_ADDR + AFTER_OUT);
    assert_eq!(t.vcpu.get_regs().unwrap().rip, CODE_ADDR + AFTER_OUT);
    assert_eq!(saved.vcpu.msr(MSR_KERNEL_GS_BASE), Some(GS_BASE_VALUE));
    assert_eq!(read_msr(&t.vcpu, MSR_KERNEL_GS_BASE), GS_BASE_VALUE);
}

#[test]
fn pending_in_lands_in_rax_without_running_the_guest_further() {
    let kvm = Kvm::new().unwrap();
    let cpuid = supported_cpuid(&kvm);
    let mut t = booted_vm_with(&kvm, &cpuid, IN_CODE);
    answer_one_in(&mut t.vcpu, IN_VALUE);

    finish_pending_io(&mut t.vcpu).unwrap();

    let regs = t.vcpu.get_regs().unwrap();
    assert_eq!(regs.rax, u64::from(IN_VALUE));
    assert_eq!(regs.rip, CODE_ADDR + 2);
    assert_eq!(regs.rbx, 0);
}

fn lapic_reg(vcpu: &VcpuFd, offset: usize) -> u32 {
    let lapic = vcpu.get_lapic().unwrap();
    let bytes: Vec<u8> = lapic.regs[offset..offset + 4]
        .iter()
        .map(|&b| b as u8)
        .collect();
    u32::from_le_bytes(bytes.try_into().unwrap())
}

#[test]
fn restored_vcpu_has_the_vmm_set_fpu_and_lapic_state() {
    let kvm = Kvm::new().unwrap();
    let cpuid = supported_cpuid(&kvm);
    let first = booted_vm(&kvm, &cpuid);
    let lvt1 = lapic_reg(&first.vcpu, APIC_LVT1);
    let saved = VcpuState::save(&first.vcpu, &kvm).unwrap();
    let second = new_vm(&kvm, &cpuid);
    let reset_lvt1 = lapic_reg(&second.vcpu, APIC_LVT1);

    saved.restore(&second.vcpu, &kvm).unwrap();

    let fpu = second.vcpu.get_fpu().unwrap();
    assert_eq!(fpu.xmm[3], XMM3_PATTERN);
    assert_eq!(FpuState::from(&fpu), saved.fpu);
    assert_eq!(lapic_reg(&second.vcpu, APIC_LVT1), lvt1);
    assert_ne!(reset_lvt1, lvt1);
}

#[test]
fn state_files_round_trip_and_restore_to_equal_state() {
    let kvm = Kvm::new().unwrap();
    let cpuid = supported_cpuid(&kvm);
    let saved = run_and_save(&kvm, &cpuid, 1);
    let dir = temp_dir("roundtrip");
    write_state_file(&dir.join("vcpu0"), &saved.vcpu).unwrap();
    write_state_file(&dir.join("vm"), &saved.vm).unwrap();

    let vcpu: VcpuState = read_state_file(&dir.join("vcpu0")).unwrap();
    let vm: VmState = read_state_file(&dir.join("vm")).unwrap();
    let loaded = Saved {
        vcpu,
        vm,
        memory: saved.memory.clone(),
        counter: saved.counter,
    };
    let t = restored_vm(&kvm, &cpuid, &loaded);
    let again = VcpuState::save(&t.vcpu, &kvm).unwrap();
    let vm_again = VmState::save(&t.vm);

    assert_eq!(loaded.vcpu, saved.vcpu);
    assert_eq!(loaded.vm, saved.vm);
    assert_eq!(stable(&again), stable(&saved.vcpu));
    let chips = |v: &VmState| VmState {
        pit: None,
        clock: None,
        ..*v
    };
    assert_eq!(chips(&vm_again), chips(&saved.vm));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kvm_clock_resumes_at_the_saved_value() {
    let kvm = Kvm::new().unwrap();
    let cpuid = supported_cpuid(&kvm);
    let first = new_vm(&kvm, &cpuid);
    let an_hour = Duration::from_secs(3600).as_nanos() as u64;
    first
        .vm
        .set_clock(&kvm_clock_data {
            clock: an_hour,
            ..Default::default()
        })
        .unwrap();
    let saved = VmState::save(&first.vm);
    let second = new_vm(&kvm, &cpuid);

    saved.restore(&second.vm).unwrap();
    let clock = second.vm.get_clock().unwrap().clock;

    let saved_clock = saved.clock.unwrap().clock;
    assert!(saved_clock >= an_hour);
    assert!(
        (saved_clock..saved_clock + 5_000_000_000).contains(&clock),
        "restored clock {clock} vs saved {saved_clock}"
    );
}
