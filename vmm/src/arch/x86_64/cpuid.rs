//! Per-vCPU CPUID: what KVM supports, with the topology of this VM and the
//! features the user chose to hide.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use crate::config::ConfigError;

/// A CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
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

/// Features that can be hidden by name (`--cpu-features -cx16,-clwb`).
pub const FEATURES: &[Feature] = &[
    f("monitor", 1, 0, Reg::Ecx, 3),
    f("ssse3", 1, 0, Reg::Ecx, 9),
    f("fma", 1, 0, Reg::Ecx, 12),
    f("cx16", 1, 0, Reg::Ecx, 13),
    f("pcid", 1, 0, Reg::Ecx, 17),
    f("sse4_1", 1, 0, Reg::Ecx, 19),
    f("sse4_2", 1, 0, Reg::Ecx, 20),
    f("x2apic", 1, 0, Reg::Ecx, 21),
    f("movbe", 1, 0, Reg::Ecx, 22),
    f("popcnt", 1, 0, Reg::Ecx, 23),
    f("tsc_deadline", 1, 0, Reg::Ecx, 24),
    f("aes", 1, 0, Reg::Ecx, 25),
    f("xsave", 1, 0, Reg::Ecx, 26),
    f("avx", 1, 0, Reg::Ecx, 28),
    f("f16c", 1, 0, Reg::Ecx, 29),
    f("rdrand", 1, 0, Reg::Ecx, 30),
    f("fsgsbase", 7, 0, Reg::Ebx, 0),
    f("bmi1", 7, 0, Reg::Ebx, 3),
    f("hle", 7, 0, Reg::Ebx, 4),
    f("avx2", 7, 0, Reg::Ebx, 5),
    f("smep", 7, 0, Reg::Ebx, 7),
    f("bmi2", 7, 0, Reg::Ebx, 8),
    f("erms", 7, 0, Reg::Ebx, 9),
    f("invpcid", 7, 0, Reg::Ebx, 10),
    f("rtm", 7, 0, Reg::Ebx, 11),
    f("avx512f", 7, 0, Reg::Ebx, 16),
    f("rdseed", 7, 0, Reg::Ebx, 18),
    f("adx", 7, 0, Reg::Ebx, 19),
    f("smap", 7, 0, Reg::Ebx, 20),
    f("clflushopt", 7, 0, Reg::Ebx, 23),
    f("clwb", 7, 0, Reg::Ebx, 24),
    f("sha", 7, 0, Reg::Ebx, 29),
    f("umip", 7, 0, Reg::Ecx, 2),
    f("la57", 7, 0, Reg::Ecx, 16),
    f("rdpid", 7, 0, Reg::Ecx, 22),
    f("xsaveopt", 0xd, 1, Reg::Ebx, 0),
    f("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0),
    f("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    f("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    f("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
];

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

/// Bits needed to number `n` items (the x2APIC ID shift).
fn id_bits(n: u8) -> u32 {
    (n as u32).next_power_of_two().trailing_zeros()
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Builds the CPUID of one vCPU from KVM's supported set.
pub fn vcpu_cpuid(supported: &CpuId, topo: Topology, hidden: &[&Feature]) -> Vec<kvm_cpuid_entry2> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| e.function != 0xb && e.function != 0x1f)
        .copied()
        .collect();
    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
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

    for feat in hidden {
        for e in entries
            .iter_mut()
            .filter(|e| e.function == feat.leaf && e.index == feat.subleaf)
        {
            *reg_mut(e, feat.reg) &= !(1 << feat.bit);
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0x1f,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ecx: (1 << 13) | (1 << 31),
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: 1 << 24,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                ebx: 99,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn find(e: &[kvm_cpuid_entry2], leaf: u32, sub: u32) -> kvm_cpuid_entry2 {
        *e.iter()
            .find(|x| x.function == leaf && x.index == sub)
            .unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_and_count() {
        let e = vcpu_cpuid(
            &supported(),
            Topology {
                apic_id: 3,
                cpus: 4,
            },
            &[],
        );
        let l1 = find(&e, 1, 0);
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
            &[],
        );
        for leaf in [0xb, 0x1f] {
            let smt = find(&e, leaf, 0);
            let core = find(&e, leaf, 1);
            assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 2));
            assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 3, 2, 2));
            assert_eq!(find(&e, leaf, 2).ecx >> 8, 0);
        }
        assert_eq!(e.iter().filter(|x| x.function == 0xb).count(), 3);
    }

    #[test]
    fn hidden_features_are_cleared() {
        let hidden = [
            feature_by_name("cx16").unwrap(),
            feature_by_name("clwb").unwrap(),
        ];
        let e = vcpu_cpuid(
            &supported(),
            Topology {
                apic_id: 0,
                cpus: 1,
            },
            &hidden,
        );
        assert_eq!(find(&e, 1, 0).ecx & (1 << 13), 0);
        assert_ne!(find(&e, 1, 0).ecx & (1 << 31), 0);
        assert_eq!(find(&e, 7, 0).ebx & (1 << 24), 0);
    }
}
