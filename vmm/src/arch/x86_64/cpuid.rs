//! Per-vCPU CPUID: what KVM supports, with the topology of this VM, the
//! KVM paravirtual leaves, and the features the user chose to hide.
//!
//! On top of `KVM_GET_SUPPORTED_CPUID` (as Cloud Hypervisor's
//! `generate_common_cpuid` and Firecracker's CPUID normalization do):
//! - CPUID.1:ECX.hypervisor is set, which is what makes a guest look at
//!   the leaves from 0x4000_0000 (older KVMs leave it to the VMM), and
//!   TSC-deadline when KVM emulates that timer;
//! - 0x4000_0000 carries the "KVMKVMKVM" signature and the highest
//!   hypervisor leaf; 0x4000_0001 the PV features KVM offers (kvm-clock,
//!   async PF, PV EOI, ...) as KVM reports them;
//! - 0x4000_0010, the timing leaf: TSC frequency and local APIC bus
//!   frequency in kHz (KVM's APIC timer runs at 1 GHz);
//! - hiding a feature hides what depends on it (AVX2 with AVX, AVX with
//!   XSAVE, ...), and leaf 0xD then lists only the XSAVE state components
//!   whose features remain, with the area sizes recomputed: a guest checks
//!   those sizes against the components it enables (Linux warns in
//!   `fpu__init_system_xstate` and drops XSAVE when they disagree).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

use crate::config::ConfigError;

/// A CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A feature bit that can be hidden from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

const FMA: Feature = f("fma", 1, 0, Reg::Ecx, 12);
const XSAVE: Feature = f("xsave", 1, 0, Reg::Ecx, 26);
const AVX: Feature = f("avx", 1, 0, Reg::Ecx, 28);
const F16C: Feature = f("f16c", 1, 0, Reg::Ecx, 29);
const AVX2: Feature = f("avx2", 7, 0, Reg::Ebx, 5);
const MPX: Feature = f("mpx", 7, 0, Reg::Ebx, 14);
const AVX512F: Feature = f("avx512f", 7, 0, Reg::Ebx, 16);
const AVX512BW: Feature = f("avx512bw", 7, 0, Reg::Ebx, 30);
const AVX512VL: Feature = f("avx512vl", 7, 0, Reg::Ebx, 31);
const PKU: Feature = f("pku", 7, 0, Reg::Ecx, 3);
const AMX_TILE: Feature = f("amx_tile", 7, 0, Reg::Edx, 24);
const XSAVEOPT: Feature = f("xsaveopt", 0xd, 1, Reg::Eax, 0);
const XSAVEC: Feature = f("xsavec", 0xd, 1, Reg::Eax, 1);
const XGETBV1: Feature = f("xgetbv1", 0xd, 1, Reg::Eax, 2);
const XSAVES: Feature = f("xsaves", 0xd, 1, Reg::Eax, 3);
const XFD: Feature = f("xfd", 0xd, 1, Reg::Eax, 4);

/// Features that can be hidden by name (`--cpu-features -cx16,-clwb`).
pub const FEATURES: &[Feature] = &[
    f("monitor", 1, 0, Reg::Ecx, 3),
    f("ssse3", 1, 0, Reg::Ecx, 9),
    FMA,
    f("cx16", 1, 0, Reg::Ecx, 13),
    f("pcid", 1, 0, Reg::Ecx, 17),
    f("sse4_1", 1, 0, Reg::Ecx, 19),
    f("sse4_2", 1, 0, Reg::Ecx, 20),
    f("x2apic", 1, 0, Reg::Ecx, 21),
    f("movbe", 1, 0, Reg::Ecx, 22),
    f("popcnt", 1, 0, Reg::Ecx, 23),
    f("tsc_deadline", 1, 0, Reg::Ecx, 24),
    f("aes", 1, 0, Reg::Ecx, 25),
    XSAVE,
    AVX,
    F16C,
    f("rdrand", 1, 0, Reg::Ecx, 30),
    f("fsgsbase", 7, 0, Reg::Ebx, 0),
    f("bmi1", 7, 0, Reg::Ebx, 3),
    f("hle", 7, 0, Reg::Ebx, 4),
    AVX2,
    f("smep", 7, 0, Reg::Ebx, 7),
    f("bmi2", 7, 0, Reg::Ebx, 8),
    f("erms", 7, 0, Reg::Ebx, 9),
    f("invpcid", 7, 0, Reg::Ebx, 10),
    f("rtm", 7, 0, Reg::Ebx, 11),
    AVX512F,
    f("rdseed", 7, 0, Reg::Ebx, 18),
    f("adx", 7, 0, Reg::Ebx, 19),
    f("smap", 7, 0, Reg::Ebx, 20),
    f("clflushopt", 7, 0, Reg::Ebx, 23),
    f("clwb", 7, 0, Reg::Ebx, 24),
    f("sha", 7, 0, Reg::Ebx, 29),
    f("umip", 7, 0, Reg::Ecx, 2),
    PKU,
    f("la57", 7, 0, Reg::Ecx, 16),
    f("rdpid", 7, 0, Reg::Ecx, 22),
    XSAVEOPT,
    XSAVEC,
    XSAVES,
    f("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0),
    f("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    f("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    f("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
];

/// `(feature, what it needs)`: a feature is hidden when what it needs is
/// (after Linux's `cpuid-deps.c`, for the features whose state or encoding
/// lives in XSAVE; F16C and FMA are VEX-encoded, so they go with AVX).
const DEPENDS: &[(Feature, Feature)] = &[
    (AVX, XSAVE),
    (MPX, XSAVE),
    (PKU, XSAVE),
    (XSAVEOPT, XSAVE),
    (XSAVEC, XSAVE),
    (XGETBV1, XSAVE),
    (XSAVES, XSAVE),
    (XFD, XSAVES),
    (XFD, XGETBV1),
    (AMX_TILE, XFD),
    (f("amx_bf16", 7, 0, Reg::Edx, 22), AMX_TILE),
    (f("amx_int8", 7, 0, Reg::Edx, 25), AMX_TILE),
    (FMA, AVX),
    (F16C, AVX),
    (AVX2, AVX),
    (AVX512F, AVX),
    (f("vaes", 7, 0, Reg::Ecx, 9), AVX),
    (f("vpclmulqdq", 7, 0, Reg::Ecx, 10), AVX),
    (f("avx_vnni", 7, 1, Reg::Eax, 4), AVX2),
    (f("avx512dq", 7, 0, Reg::Ebx, 17), AVX512F),
    (f("avx512ifma", 7, 0, Reg::Ebx, 21), AVX512F),
    (f("avx512pf", 7, 0, Reg::Ebx, 26), AVX512F),
    (f("avx512er", 7, 0, Reg::Ebx, 27), AVX512F),
    (f("avx512cd", 7, 0, Reg::Ebx, 28), AVX512F),
    (AVX512BW, AVX512F),
    (AVX512VL, AVX512F),
    (f("avx512vbmi", 7, 0, Reg::Ecx, 1), AVX512F),
    (f("avx512_vpopcntdq", 7, 0, Reg::Ecx, 14), AVX512F),
    (f("avx512_4vnniw", 7, 0, Reg::Edx, 2), AVX512F),
    (f("avx512_4fmaps", 7, 0, Reg::Edx, 3), AVX512F),
    (f("avx512_vbmi2", 7, 0, Reg::Ecx, 6), AVX512VL),
    (f("avx512_vnni", 7, 0, Reg::Ecx, 11), AVX512VL),
    (f("avx512_bitalg", 7, 0, Reg::Ecx, 12), AVX512VL),
    (f("avx512_vp2intersect", 7, 0, Reg::Edx, 8), AVX512VL),
    (f("avx512_bf16", 7, 1, Reg::Eax, 5), AVX512VL),
    (f("avx512_fp16", 7, 0, Reg::Edx, 23), AVX512BW),
];

/// XSAVE state components (bit numbers in XCR0) and the feature that uses
/// each, as Linux's `xsave_cpuid_features`. x87 and SSE need only XSAVE;
/// components not listed here are kept as KVM reports them.
const XSTATE_FEATURES: &[(u32, Feature)] = &[
    (2, AVX),
    (3, MPX),
    (4, MPX),
    (5, AVX512F),
    (6, AVX512F),
    (7, AVX512F),
    (9, PKU),
    (17, AMX_TILE),
    (18, AMX_TILE),
];

/// The legacy area (512 bytes) and the XSAVE header (64): where the first
/// extended component may start, and the size of an x87+SSE-only area.
const XSAVE_LEGACY_SIZE: u32 = 512 + 64;

/// Leaf 0x4000_0000: the highest hypervisor leaf and the KVM signature.
pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// Leaf 0x4000_0001: KVM's paravirtual features.
pub const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
/// Leaf 0x4000_0010: TSC and local APIC bus frequencies in kHz.
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// KVM's local APIC timer counts at 1 GHz (`APIC_BUS_CYCLE_NS` = 1).
const APIC_BUS_KHZ: u32 = 1_000_000;

const HYPERVISOR_BIT: u32 = 1 << 31;
const TSC_DEADLINE_BIT: u32 = 1 << 24;

/// Looks up a hideable feature by name.
pub fn feature_by_name(name: &str) -> Result<&'static Feature, ConfigError> {
    FEATURES.iter().find(|f| f.name == name).ok_or_else(|| {
        let known: Vec<_> = FEATURES.iter().map(|f| f.name).collect();
        ConfigError::UnknownCpuFeature(name.to_string(), known.join(","))
    })
}

/// Topology facts for one vCPU.
#[derive(Clone, Copy, Debug)]
pub struct Topology {
    /// This vCPU's APIC ID (equal to its index).
    pub apic_id: u8,
    /// vCPUs in the VM: one package, one thread per core.
    pub cpus: u8,
}

/// What KVM tells about time on this host, for the timer bits and leaves.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    /// The vCPU's TSC frequency; `None` leaves out leaf 0x4000_0010.
    pub tsc_khz: Option<u32>,
    /// KVM emulates the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline: bool,
}

/// Asks KVM for the timing facts of vCPU `id`. A missing TSC frequency is
/// logged for vCPU 0 only (every vCPU of a VM has the same answer).
pub fn timing(kvm: &Kvm, vcpu: &VcpuFd, id: u8) -> Timing {
    let tsc = vcpu.get_tsc_khz();
    let tsc_khz = tsc.as_ref().ok().copied().filter(|&khz| khz > 0);
    if tsc_khz.is_none() && id == 0 {
        tracing::warn!(answer = ?tsc, "no TSC frequency from KVM: no CPUID timing leaf");
    }
    Timing {
        tsc_khz,
        tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
    }
}

/// Bits needed to number `n` items (the x2APIC ID shift).
fn id_bits(n: u8) -> u32 {
    (n as u32).next_power_of_two().trailing_zeros()
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

fn find(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
}

fn find_mut(
    entries: &mut [kvm_cpuid_entry2],
    leaf: u32,
    subleaf: u32,
) -> Option<&mut kvm_cpuid_entry2> {
    entries
        .iter_mut()
        .find(|e| e.function == leaf && e.index == subleaf)
}

fn reg(e: &kvm_cpuid_entry2, r: Reg) -> u32 {
    match r {
        Reg::Eax => e.eax,
        Reg::Ebx => e.ebx,
        Reg::Ecx => e.ecx,
        Reg::Edx => e.edx,
    }
}

fn has(entries: &[kvm_cpuid_entry2], feat: &Feature) -> bool {
    find(entries, feat.leaf, feat.subleaf).is_some_and(|e| reg(e, feat.reg) & (1 << feat.bit) != 0)
}

fn clear(entries: &mut [kvm_cpuid_entry2], feat: &Feature) {
    if let Some(e) = find_mut(entries, feat.leaf, feat.subleaf) {
        *reg_mut(e, feat.reg) &= !(1 << feat.bit);
    }
}

/// Builds the CPUID of one vCPU from KVM's supported set.
pub fn vcpu_cpuid(
    supported: &CpuId,
    topo: Topology,
    timing: Timing,
    hidden: &[&Feature],
) -> Vec<kvm_cpuid_entry2> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| e.function != 0xb && e.function != 0x1f && e.function != TIMING_LEAF)
        .copied()
        .collect();
    let max_basic = find(&entries, 0, 0).map_or(0, |e| e.eax);
    let core_bits = id_bits(topo.cpus);
    let apic = u32::from(topo.apic_id);

    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // Initial APIC ID and logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (apic << 24) | (1 << core_bits << 16);
                if topo.cpus > 1 {
                    e.edx |= 1 << 28; // HTT: the count field is valid.
                }
                e.ecx |= HYPERVISOR_BIT;
                if timing.tsc_deadline {
                    e.ecx |= TSC_DEADLINE_BIT;
                }
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; caches are per core,
                // except the last level which the package shares.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 {
                    (1u32 << core_bits) - 1
                } else {
                    0
                };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | (((1 << core_bits) - 1) << 26);
            }
            _ => {}
        }
    }

    // Extended topology: an SMT level (one thread per core) and a core level.
    for leaf in [0xb, 0x1f] {
        if max_basic < leaf {
            continue;
        }
        let levels = [(0u32, 1u32, 1u32), (core_bits, u32::from(topo.cpus), 2)];
        for (sub, (shift, count, kind)) in levels.iter().enumerate() {
            entries.push(kvm_cpuid_entry2 {
                function: leaf,
                index: sub as u32,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: *shift,
                ebx: *count,
                ecx: (kind << 8) | sub as u32,
                edx: apic,
                ..Default::default()
            });
        }
        entries.push(kvm_cpuid_entry2 {
            function: leaf,
            index: 2,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            ecx: 2,
            edx: apic,
            ..Default::default()
        });
    }

    hypervisor_leaves(&mut entries, timing.tsc_khz);

    for feat in hidden {
        clear(&mut entries, feat);
    }
    hide_dependents(&mut entries);
    fit_xsave_leaf(&mut entries);
    entries
}

/// The KVM signature leaf, the PV feature leaf as KVM reports it, and the
/// timing leaf when the TSC frequency is known.
fn hypervisor_leaves(entries: &mut Vec<kvm_cpuid_entry2>, tsc_khz: Option<u32>) {
    for leaf in [KVM_SIGNATURE_LEAF, KVM_FEATURES_LEAF] {
        if find(entries, leaf, 0).is_none() {
            entries.push(kvm_cpuid_entry2 {
                function: leaf,
                ..Default::default()
            });
        }
    }
    let max = if tsc_khz.is_some() {
        TIMING_LEAF
    } else {
        KVM_FEATURES_LEAF
    };
    if let Some(e) = find_mut(entries, KVM_SIGNATURE_LEAF, 0) {
        [e.eax, e.ebx, e.ecx, e.edx] = [max, KVM_SIGNATURE[0], KVM_SIGNATURE[1], KVM_SIGNATURE[2]];
    }
    if let Some(khz) = tsc_khz {
        entries.push(kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: khz,
            ebx: APIC_BUS_KHZ,
            ..Default::default()
        });
    }
}

/// Clears every feature whose prerequisite is clear, to a fixed point.
fn hide_dependents(entries: &mut [kvm_cpuid_entry2]) {
    let mut changed = true;
    while changed {
        changed = false;
        for (feat, needs) in DEPENDS {
            if has(entries, feat) && !has(entries, needs) {
                clear(entries, feat);
                changed = true;
            }
        }
    }
}

/// The size of an XSAVE area holding the components in `mask`: the
/// standard format places each at its fixed offset (subleaf EBX), the
/// compacted one packs them in order, 64-byte aligned where subleaf ECX[1]
/// says so. Components without a subleaf count for nothing.
fn xsave_size(entries: &[kvm_cpuid_entry2], mask: u64, compacted: bool) -> u32 {
    let mut size = XSAVE_LEGACY_SIZE;
    for i in (2..64u32).filter(|&i| mask & (1u64 << i) != 0) {
        let Some(c) = find(entries, 0xd, i) else {
            continue;
        };
        size = if compacted {
            let start = if c.ecx & 2 != 0 {
                size.next_multiple_of(64)
            } else {
                size
            };
            start.saturating_add(c.eax)
        } else {
            size.max(c.ebx.saturating_add(c.eax))
        };
    }
    size
}

/// Makes leaf 0xD list only the state components whose features the guest
/// sees (x87 and SSE alone without XSAVE), each with its subleaf, and the
/// area sizes that follow from them. KVM still rewrites subleaf 0 EBX (and
/// subleaf 1 EBX) for the XCR0 the guest sets, from the same subleaves.
fn fit_xsave_leaf(entries: &mut Vec<kvm_cpuid_entry2>) {
    let Some(l0) = find(entries, 0xd, 0).copied() else {
        return;
    };
    let l1 = find(entries, 0xd, 1).copied().unwrap_or_default();
    let xsave = has(entries, &XSAVE);
    let mut allowed = !0u64;
    for (component, feat) in XSTATE_FEATURES {
        if !has(entries, feat) {
            allowed &= !(1 << component);
        }
    }
    for i in 2..64 {
        if !xsave || find(entries, 0xd, i).is_none() {
            allowed &= !(1u64 << i);
        }
    }
    let xcr0 = (u64::from(l0.edx) << 32 | u64::from(l0.eax)) & allowed;
    let xss = (u64::from(l1.edx) << 32 | u64::from(l1.ecx)) & allowed;
    let kept = |i: u32| 1u64.checked_shl(i).is_some_and(|b| (xcr0 | xss) & b != 0);
    entries.retain(|e| e.function != 0xd || e.index < 2 || kept(e.index));

    let standard = xsave_size(entries, xcr0, false);
    let compacted = xsave_size(entries, xcr0 | xss, true);
    if let Some(e) = find_mut(entries, 0xd, 0) {
        [e.eax, e.edx] = [xcr0 as u32, (xcr0 >> 32) as u32];
        [e.ebx, e.ecx] = [standard, standard];
    }
    if let Some(e) = find_mut(entries, 0xd, 1) {
        let compacting = e.eax & ((1 << XSAVEC.bit) | (1 << XSAVES.bit)) != 0;
        [e.ecx, e.edx] = [xss as u32, (xss >> 32) as u32];
        e.ebx = if compacting { compacted } else { 0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if matches!(function, 4 | 7 | 0xb | 0xd) {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A host like an older KVM reports: no hypervisor bit, cx16 in leaf
    /// 1, clwb in leaf 7, a stale 0xB and the KVM leaves.
    fn supported() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, [0x1f, 0, 0, 0]),
            entry(1, 0, [0, 0xff00_0800, 1 << 13, 0]),
            entry(7, 0, [0, 1 << 24, 0, 0]),
            entry(0xb, 0, [0, 99, 0, 0]),
            entry(
                KVM_SIGNATURE_LEAF,
                0,
                [KVM_FEATURES_LEAF, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            entry(KVM_FEATURES_LEAF, 0, [0x0100_7efb, 0, 0, 0]),
        ])
        .unwrap()
    }

    const XSAVE_ALL: u32 = 0x2e7; // x87 SSE YMM opmask ZMM_Hi256 Hi16_ZMM PKRU

    /// A host with XSAVE, AVX, AVX2, AVX-512F and PKU, and leaf 0xD with
    /// the usual standard-format offsets.
    fn xsave_host() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, [0xd, 0, 0, 0]),
            entry(1, 0, [0, 0, (1 << 26) | (1 << 28) | (1 << 12), 0]),
            entry(7, 0, [0, (1 << 5) | (1 << 16) | (1 << 17), 1 << 3, 0]),
            entry(0xd, 0, [XSAVE_ALL, 2696, 2696, 0]),
            entry(0xd, 1, [0xf, 2440, 0, 0]),
            entry(0xd, 2, [256, 576, 0, 0]),
            entry(0xd, 5, [64, 1088, 0, 0]),
            entry(0xd, 6, [512, 1152, 0, 0]),
            entry(0xd, 7, [1024, 1664, 0, 0]),
            entry(0xd, 9, [8, 2688, 0, 0]),
        ])
        .unwrap()
    }

    fn one_cpu() -> Topology {
        Topology {
            apic_id: 0,
            cpus: 1,
        }
    }

    fn tsc(khz: u32) -> Timing {
        Timing {
            tsc_khz: Some(khz),
            tsc_deadline: false,
        }
    }

    fn build(supported: &CpuId, hidden: &[&str]) -> Vec<kvm_cpuid_entry2> {
        let hidden: Vec<_> = hidden.iter().map(|n| feature_by_name(n).unwrap()).collect();
        vcpu_cpuid(supported, one_cpu(), Timing::default(), &hidden)
    }

    fn get(e: &[kvm_cpuid_entry2], leaf: u32, sub: u32) -> kvm_cpuid_entry2 {
        *find(e, leaf, sub).unwrap()
    }

    fn xsave_subleaves(e: &[kvm_cpuid_entry2]) -> Vec<u32> {
        e.iter()
            .filter(|x| x.function == 0xd && x.index >= 2)
            .map(|x| x.index)
            .collect()
    }

    #[test]
    fn leaf1_carries_apic_id_and_count() {
        let e = vcpu_cpuid(
            &supported(),
            Topology {
                apic_id: 3,
                cpus: 4,
            },
            Timing::default(),
            &[],
        );
        let l1 = get(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.edx & (1 << 28), 0);
    }

    #[test]
    fn extended_topology_reports_x2apic_id_and_core_level() {
        let e = vcpu_cpuid(
            &supported(),
            Topology {
                apic_id: 2,
                cpus: 3,
            },
            Timing::default(),
            &[],
        );
        for leaf in [0xb, 0x1f] {
            let smt = get(&e, leaf, 0);
            let core = get(&e, leaf, 1);
            assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 2));
            assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 3, 2, 2));
            assert_eq!(get(&e, leaf, 2).ecx >> 8, 0);
        }
        assert_eq!(e.iter().filter(|x| x.function == 0xb).count(), 3);
    }

    #[test]
    fn hidden_features_are_cleared() {
        let e = build(&supported(), &["cx16", "clwb"]);
        assert_eq!(get(&e, 1, 0).ecx & (1 << 13), 0);
        assert_eq!(get(&e, 7, 0).ebx & (1 << 24), 0);
    }

    #[test]
    fn hypervisor_bit_is_set() {
        let e = build(&supported(), &[]);
        assert_ne!(get(&e, 1, 0).ecx & (1 << 31), 0);
    }

    #[test]
    fn kvm_signature_leaf_names_kvm_and_the_timing_leaf() {
        let e = vcpu_cpuid(&supported(), one_cpu(), tsc(2_596_122), &[]);
        let sig = get(&e, KVM_SIGNATURE_LEAF, 0);
        let bytes: Vec<u8> = [sig.ebx, sig.ecx, sig.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(bytes, b"KVMKVMKVM\0\0\0");
        assert_eq!(sig.eax, 0x4000_0010);
    }

    #[test]
    fn timing_leaf_gives_tsc_and_apic_bus_khz() {
        let e = vcpu_cpuid(&supported(), one_cpu(), tsc(2_596_122), &[]);
        let t = get(&e, TIMING_LEAF, 0);
        assert_eq!((t.eax, t.ebx), (2_596_122, 1_000_000));
    }

    #[test]
    fn unknown_tsc_frequency_leaves_out_the_timing_leaf() {
        let e = build(&supported(), &[]);
        assert!(find(&e, TIMING_LEAF, 0).is_none());
        assert_eq!(get(&e, KVM_SIGNATURE_LEAF, 0).eax, KVM_FEATURES_LEAF);
    }

    #[test]
    fn pv_features_are_kvms() {
        let e = build(&supported(), &[]);
        assert_eq!(get(&e, KVM_FEATURES_LEAF, 0).eax, 0x0100_7efb);
    }

    #[test]
    fn kvm_leaves_are_added_when_kvm_omits_them() {
        let bare = CpuId::from_entries(&[entry(0, 0, [1, 0, 0, 0]), entry(1, 0, [0; 4])]).unwrap();
        let e = vcpu_cpuid(&bare, one_cpu(), tsc(1_000_000), &[]);
        assert_eq!(get(&e, KVM_SIGNATURE_LEAF, 0).ebx, 0x4b4d_564b);
        assert_eq!(get(&e, KVM_FEATURES_LEAF, 0).eax, 0);
        assert_eq!(e.iter().filter(|x| x.function == TIMING_LEAF).count(), 1);
    }

    #[test]
    fn tsc_deadline_is_set_when_kvm_emulates_it_unless_hidden() {
        let timing = Timing {
            tsc_khz: None,
            tsc_deadline: true,
        };
        let shown = vcpu_cpuid(&supported(), one_cpu(), timing, &[]);
        let hidden = vcpu_cpuid(
            &supported(),
            one_cpu(),
            timing,
            &[feature_by_name("tsc_deadline").unwrap()],
        );
        assert_ne!(get(&shown, 1, 0).ecx & (1 << 24), 0);
        assert_eq!(get(&hidden, 1, 0).ecx & (1 << 24), 0);
    }

    #[test]
    fn xsave_leaf_is_kept_when_nothing_is_hidden() {
        let e = build(&xsave_host(), &[]);
        let l0 = get(&e, 0xd, 0);
        assert_eq!((l0.eax, l0.ebx, l0.ecx), (XSAVE_ALL, 2696, 2696));
        assert_eq!(get(&e, 0xd, 1).ebx, 2440);
        assert_eq!(xsave_subleaves(&e), [2, 5, 6, 7, 9]);
    }

    #[test]
    fn hiding_avx512f_drops_its_components_and_shrinks_the_compacted_area() {
        let e = build(&xsave_host(), &["avx512f"]);
        let l0 = get(&e, 0xd, 0);
        assert_eq!((l0.eax, l0.ebx, l0.ecx), (0x207, 2696, 2696));
        assert_eq!(get(&e, 0xd, 1).ebx, 576 + 256 + 8);
        assert_eq!(xsave_subleaves(&e), [2, 9]);
        assert_eq!(get(&e, 7, 0).ebx & (1 << 17), 0); // avx512dq went too
    }

    #[test]
    fn hiding_avx_hides_what_needs_it_and_the_ymm_state() {
        let e = build(&xsave_host(), &["avx", "pku"]);
        let l0 = get(&e, 0xd, 0);
        assert_eq!((l0.eax, l0.ebx, l0.ecx), (0x3, 576, 576));
        assert_eq!(get(&e, 1, 0).ecx & (1 << 12), 0); // fma
        assert_eq!(get(&e, 7, 0).ebx & ((1 << 5) | (1 << 16)), 0); // avx2, avx512f
        assert_eq!(xsave_subleaves(&e), Vec::<u32>::new());
    }

    #[test]
    fn hiding_xsave_leaves_only_x87_and_sse_in_leaf_0xd() {
        let e = build(&xsave_host(), &["xsave"]);
        let l0 = get(&e, 0xd, 0);
        let l1 = get(&e, 0xd, 1);
        assert_eq!((l0.eax, l0.ebx, l0.ecx, l0.edx), (0x3, 576, 576, 0));
        assert_eq!((l1.eax, l1.ebx, l1.ecx, l1.edx), (0, 0, 0, 0));
        assert_eq!(get(&e, 1, 0).ecx & (1 << 28), 0);
        assert_eq!(get(&e, 7, 0).ecx & (1 << 3), 0);
        assert_eq!(xsave_subleaves(&e), Vec::<u32>::new());
    }

    #[test]
    fn hiding_xsaveopt_clears_subleaf_1_eax_not_the_size() {
        let e = build(&xsave_host(), &["xsaveopt"]);
        let l1 = get(&e, 0xd, 1);
        assert_eq!((l1.eax, l1.ebx), (0xe, 2440));
    }

    #[test]
    fn hiding_xsavec_and_xsaves_zeroes_the_compacted_size() {
        let e = build(&xsave_host(), &["xsavec", "xsaves"]);
        let l1 = get(&e, 0xd, 1);
        assert_eq!((l1.eax, l1.ebx), (0x5, 0));
    }

    #[test]
    fn xsave_components_without_xsave_are_dropped() {
        // This host's KVM (kvm_pvm) lists AVX and AVX-512 state in 0xD but
        // neither XSAVE nor AVX in leaf 1.
        let pvm = CpuId::from_entries(&[
            entry(0, 0, [0x1c, 0, 0, 0]),
            entry(1, 0, [0x00b0_0f21, 0x0102_0800, 0x8120_2000, 0x078b_fbff]),
            entry(7, 0, [1, 0x0180_0002, 0x104, 0x2000_0000]),
            entry(0xd, 0, [0xe7, 0x980, 0x980, 0]),
            entry(0xd, 1, [0, 0, 0, 0]),
            entry(0xd, 2, [0x100, 0x240, 0, 0]),
            entry(0xd, 5, [0x40, 0x340, 0, 0]),
            entry(0xd, 6, [0x200, 0x380, 0, 0]),
            entry(0xd, 7, [0x400, 0x580, 0, 0]),
        ])
        .unwrap();
        let e = build(&pvm, &["cx16", "clwb"]);
        let l0 = get(&e, 0xd, 0);
        assert_eq!((l0.eax, l0.ebx, l0.ecx), (0x3, 576, 576));
        assert_eq!(xsave_subleaves(&e), Vec::<u32>::new());
    }

    #[test]
    fn no_hideable_feature_leaves_its_xsave_component_behind() {
        for feat in FEATURES {
            let e = build(&xsave_host(), &[feat.name]);
            let xcr0 = u64::from(get(&e, 0xd, 0).eax);
            let orphans: Vec<u32> = XSTATE_FEATURES
                .iter()
                .filter(|(c, needs)| xcr0 & (1 << c) != 0 && !has(&e, needs))
                .map(|(c, _)| *c)
                .collect();
            assert_eq!(orphans, Vec::<u32>::new(), "hiding {}", feat.name);
            assert_eq!(get(&e, 0xd, 0).ebx, xsave_size(&e, xcr0, false));
        }
    }
}
