//! The fixed workloads and one measurement.

/// A workload: access pattern, block size, queue depth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Name used in tables and on the command line.
    pub name: &'static str,
    /// Writes instead of reads.
    pub write: bool,
    /// Random offsets instead of sequential.
    pub random: bool,
    /// Block size in bytes.
    pub bs: u32,
    /// Requests kept in flight.
    pub qd: usize,
}

const ALL: [Workload; 5] = [
    Workload {
        name: "randread-4k-qd1",
        write: false,
        random: true,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "randread-4k-qd32",
        write: false,
        random: true,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "randwrite-4k-qd1",
        write: true,
        random: true,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "randwrite-4k-qd32",
        write: true,
        random: true,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "seqread-128k-qd16",
        write: false,
        random: false,
        bs: 128 << 10,
        qd: 16,
    },
];

impl Workload {
    /// Every workload, in table order.
    pub fn all() -> &'static [Workload] {
        &ALL
    }

    /// Looks a workload up by name.
    pub fn by_name(name: &str) -> Option<Workload> {
        ALL.iter().copied().find(|w| w.name == name)
    }
}

/// One measured run.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Who was measured (blk-backend, qemu-storage-daemon, host-fio).
    pub label: String,
    /// Workload name.
    pub workload: String,
    /// I/Os per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mbps: f64,
    /// Median completion latency in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency in microseconds.
    pub p99_us: f64,
    /// CPU seconds of the measured process per million I/Os (NaN if unknown).
    pub cpu_s_per_mio: f64,
}

impl Sample {
    /// Tab-separated form.
    pub fn to_line(&self) -> String {
        format!(
            "{}\t{}\t{:.0}\t{:.1}\t{:.1}\t{:.1}\t{:.2}",
            self.label,
            self.workload,
            self.iops,
            self.mbps,
            self.p50_us,
            self.p99_us,
            self.cpu_s_per_mio
        )
    }

    /// Parses [`Self::to_line`] output.
    pub fn from_line(line: &str) -> Option<Sample> {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 7 {
            return None;
        }
        let n = |i: usize| f[i].parse::<f64>().ok();
        Some(Sample {
            label: f[0].into(),
            workload: f[1].into(),
            iops: n(2)?,
            mbps: n(3)?,
            p50_us: n(4)?,
            p99_us: n(5)?,
            cpu_s_per_mio: n(6)?,
        })
    }
}

/// A small xorshift generator for offsets.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// Next value below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Percentile `p` (0..=100) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_line_round_trips() {
        let s = Sample {
            label: "x".into(),
            workload: "randread-4k-qd1".into(),
            iops: 1000.0,
            mbps: 4.1,
            p50_us: 10.5,
            p99_us: 20.0,
            cpu_s_per_mio: 3.25,
        };

        assert_eq!(Sample::from_line(&s.to_line()), Some(s));
    }

    #[test]
    fn percentile_picks_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();

        assert_eq!((percentile(&v, 50.0), percentile(&v, 99.0)), (51.0, 99.0));
    }
}
