//! What runs where: the disks, the workloads, the order of the runs, and
//! the L1 and L2 shell scripts that carry them out.
//!
//! L1 fills two files of the same size in its `/tmp` (tmpfs), marks each
//! one's first sector with its name, serves one with blk-backend and the
//! other with qemu-storage-daemon, and boots one L2 with both as virtio-blk
//! disks. L2 finds which device is which from the marks and runs fio on
//! them in turn, one `RIGFIO-RUN` line per run.

use std::fmt::Write as _;
use std::time::Duration;

/// One of the two L2 disks, by the daemon serving it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Disk {
    Blk,
    Qsd,
}

impl Disk {
    pub const ALL: [Disk; 2] = [Disk::Blk, Disk::Qsd];

    /// The short name used in the scripts and on the console.
    pub fn key(self) -> &'static str {
        match self {
            Disk::Blk => "blk",
            Disk::Qsd => "qsd",
        }
    }

    /// The daemon's name, for the table.
    pub fn label(self) -> &'static str {
        match self {
            Disk::Blk => "blk-backend",
            Disk::Qsd => "qemu-storage-daemon",
        }
    }

    pub fn from_key(s: &str) -> Option<Disk> {
        Disk::ALL.into_iter().find(|d| d.key() == s)
    }
}

/// A fio workload inside L2 (libaio, direct=1, 4 KiB blocks, one job).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Workload {
    #[value(name = "randread-4k-qd1")]
    RandRead4kQd1,
    #[value(name = "randread-4k-qd32")]
    RandRead4kQd32,
    #[value(name = "randwrite-4k-qd32")]
    RandWrite4kQd32,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::RandRead4kQd1 => "randread-4k-qd1",
            Workload::RandRead4kQd32 => "randread-4k-qd32",
            Workload::RandWrite4kQd32 => "randwrite-4k-qd32",
        }
    }

    /// fio's `--rw`.
    fn rw(self) -> &'static str {
        match self {
            Workload::RandRead4kQd1 | Workload::RandRead4kQd32 => "randread",
            Workload::RandWrite4kQd32 => "randwrite",
        }
    }

    fn iodepth(self) -> u32 {
        match self {
            Workload::RandRead4kQd1 => 1,
            Workload::RandRead4kQd32 | Workload::RandWrite4kQd32 => 32,
        }
    }
}

/// The round number of the warm-up runs (not in the table).
pub const WARMUP_ROUND: u32 = 0;
/// The workload name of the warm-up runs.
pub const WARMUP: &str = "warmup";

/// One fio run in L2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub round: u32,
    pub disk: Disk,
    pub workload: Workload,
}

/// The benchmark's shape, from the command line.
#[derive(Clone, Debug)]
pub struct Plan {
    pub rounds: u32,
    /// Measured seconds per run.
    pub runtime_s: u32,
    /// Seconds fio runs before it starts measuring, per run.
    pub ramp_s: u32,
    /// Seconds of 4k random reads at QD32 on each disk before round 1.
    pub warmup_s: u32,
    /// Size of each disk's file in MiB.
    pub size_mib: u32,
    pub workloads: Vec<Workload>,
    /// More blk-backend arguments (checked by `main`: words of
    /// `[A-Za-z0-9_.,:=/-]` only, as they go into a shell script).
    pub blk_args: String,
}

impl Plan {
    /// The disks of round `round` (from 1) in the order they run: the
    /// first disk alternates from round to round.
    pub fn order(round: u32) -> [Disk; 2] {
        if round % 2 == 1 {
            [Disk::Blk, Disk::Qsd]
        } else {
            [Disk::Qsd, Disk::Blk]
        }
    }

    /// Every measured run, in the order L2 makes them: round by round,
    /// workload by workload, both disks back to back.
    pub fn steps(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        for round in 1..=self.rounds {
            for w in &self.workloads {
                for disk in Self::order(round) {
                    steps.push(Step {
                        round,
                        disk,
                        workload: *w,
                    });
                }
            }
        }
        steps
    }

    /// An upper bound of L2's whole run: boot, warm-up and every run with
    /// fio's start-up and end under TCG, generously.
    pub fn l2_limit(&self) -> Duration {
        let per_run = u64::from(self.runtime_s + self.ramp_s) + 60;
        let runs = self.steps().len() as u64;
        Duration::from_secs(600 + 2 * (u64::from(self.warmup_s) + 60) + runs * per_run)
    }

    /// The L2 script (run as `/init`'s `run=` command).
    pub fn l2_script(&self) -> String {
        let mut s = String::from(L2_PRELUDE);
        if self.warmup_s > 0 {
            for disk in Disk::ALL {
                let _ = writeln!(
                    s,
                    "run {WARMUP_ROUND} {} {WARMUP} randread 32 {} 0",
                    disk.key(),
                    self.warmup_s
                );
            }
        }
        for step in self.steps() {
            let w = step.workload;
            let _ = writeln!(
                s,
                "run {} {} {} {} {} {} {}",
                step.round,
                step.disk.key(),
                w.name(),
                w.rw(),
                w.iodepth(),
                self.runtime_s,
                self.ramp_s
            );
        }
        s.push_str(L2_EPILOGUE);
        s
    }

    /// The L1 script: the two files, the two daemons, one L2.
    pub fn l1_script(&self) -> String {
        format!(
            r#"
L2_TIMEOUT={timeout}
for d in blk qsd; do
    dd if=/dev/zero of=/tmp/$d.img bs=1M count={size} 2>/dev/null
    printf 'rigfio-disk=%s\n' $d | dd of=/tmp/$d.img conv=notrunc 2>/dev/null
done
echo "L1-TMP $(grep ' /tmp ' /proc/mounts | cut -d' ' -f1-3) blk.img=$(wc -c </tmp/blk.img) qsd.img=$(wc -c </tmp/qsd.img)"
NO_COLOR=1 RUST_LOG=info blk-backend --socket /tmp/blk.sock --image /tmp/blk.img --queues 1 {blk_args}>/tmp/blk.log 2>&1 &
# tmpfs has no O_DIRECT on this kernel: the page cache is the storage.
qemu-storage-daemon \
    --blockdev driver=file,node-name=f,filename=/tmp/qsd.img,aio=io_uring,cache.direct=off \
    --blockdev driver=raw,node-name=d,file=f \
    --export type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=/tmp/qsd.sock,writable=on,num-queues=1 \
    >/tmp/qsd.log 2>&1 &
for s in /tmp/blk.sock /tmp/qsd.sock; do
    n=0; until [ -S $s ] || [ $n -gt 300 ]; do sleep 0.1; n=$((n + 1)); done
    [ -S $s ] || echo "L1-ERROR no socket $s"
done
l2 fio --kernel $L2_KERNEL --memory 512M --cpus 2 \
    --disk socket=/tmp/blk.sock,queues=1 --disk socket=/tmp/qsd.sock,queues=1 \
    --cmdline "console=ttyS0 reboot=k panic=1 run=/l2/fio.sh" </dev/null
sed 's/^/L1-BLK-LOG /' /tmp/blk.log | tail -n 20
sed 's/^/L1-QSD-LOG /' /tmp/qsd.log | tail -n 20
kill $(pidof blk-backend) $(pidof qemu-storage-daemon)
sleep 1
"#,
            timeout = self.l2_limit().as_secs(),
            size = self.size_mib,
            blk_args = if self.blk_args.is_empty() {
                String::new()
            } else {
                format!("{} ", self.blk_args)
            },
        )
    }
}

/// L2: find the disks by their marks, define `run`.
///
/// `run ROUND DISK WORKLOAD RW IODEPTH SECONDS RAMP` makes one fio run on
/// DISK's device and prints `RIGFIO-RUN round= disk= dev= workload= rc=`
/// followed by what fio's terse line (version 3) says: `err=` (fio's error
/// field), `iops=`, `p50_us=` and `p99_us=` (completion latency), or
/// `terse=missing` / `terse=unexpected`. A failed run's messages follow as
/// `RIGFIO-FIO-ERR` lines. Terse fields: 5 error; reads from 6 (8 IOPS,
/// 18 and 19 the two percentiles asked for), writes 41 fields later.
const L2_PRELUDE: &str = r#"#!/bin/sh
echo "RIGFIO-L2 nproc=$(nproc) memtotal_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
blk= qsd=
for d in $(ls /sys/block | grep '^vd'); do
    case "$(dd if=/dev/$d bs=512 count=1 2>/dev/null | head -n 1)" in
        rigfio-disk=blk) blk=$d ;;
        rigfio-disk=qsd) qsd=$d ;;
    esac
done
echo "RIGFIO-DISKS blk=${blk:-none} qsd=${qsd:-none} blk_queues=$(ls /sys/block/$blk/mq 2>/dev/null | wc -l) qsd_queues=$(ls /sys/block/$qsd/mq 2>/dev/null | wc -l)"
if [ -z "$blk" ] || [ -z "$qsd" ]; then
    echo "RIGFIO-ERROR the guest cannot tell its disks apart"
    poweroff -f
fi
TERSE='{
    o = (rw == "randwrite") ? 41 : 0
    p50 = $(18 + o); p99 = $(19 + o)
    if (index(p50, "50.000000%=") != 1 || index(p99, "99.000000%=") != 1) { print "terse=unexpected"; exit }
    sub(/.*=/, "", p50); sub(/.*=/, "", p99)
    printf "err=%s iops=%s p50_us=%s p99_us=%s\n", $5, $(8 + o), p50, p99
}'
run() {
    eval dev=\$$2
    fio --name=$3 --filename=/dev/$dev --rw=$4 --bs=4k --iodepth=$5 --ioengine=libaio --direct=1 \
        --time_based --runtime=$6 --ramp_time=$7 --norandommap \
        --output-format=terse --terse-version=3 --percentile_list=50:99 >/tmp/fio.out 2>/tmp/fio.err
    rc=$?
    res=$(grep '^3;' /tmp/fio.out | tail -n 1 | awk -F';' -v rw=$4 "$TERSE")
    echo "RIGFIO-RUN round=$1 disk=$2 dev=$dev workload=$3 rc=$rc ${res:-terse=missing}"
    [ $rc = 0 ] || grep -hv '^3;' /tmp/fio.err /tmp/fio.out | head -n 5 | sed 's/^/RIGFIO-FIO-ERR /'
}
"#;

const L2_EPILOGUE: &str = r#"echo "RIGFIO-IOERRORS=$(dmesg | grep -ci 'i/o error')"
echo RIGFIO-DONE
poweroff -f
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(rounds: u32) -> Plan {
        Plan {
            rounds,
            runtime_s: 5,
            ramp_s: 1,
            warmup_s: 3,
            size_mib: 256,
            blk_args: String::new(),
            workloads: vec![Workload::RandRead4kQd1, Workload::RandWrite4kQd32],
        }
    }

    #[test]
    fn first_disk_alternates_between_rounds() {
        let firsts: Vec<Disk> = (1..=4).map(|r| Plan::order(r)[0]).collect();

        assert_eq!(firsts, [Disk::Blk, Disk::Qsd, Disk::Blk, Disk::Qsd]);
    }

    #[test]
    fn steps_run_both_disks_back_to_back_per_workload() {
        let steps = plan(2).steps();

        let seen: Vec<(u32, &str, &str)> = steps
            .iter()
            .map(|s| (s.round, s.disk.key(), s.workload.name()))
            .collect();
        assert_eq!(
            seen,
            [
                (1, "blk", "randread-4k-qd1"),
                (1, "qsd", "randread-4k-qd1"),
                (1, "blk", "randwrite-4k-qd32"),
                (1, "qsd", "randwrite-4k-qd32"),
                (2, "qsd", "randread-4k-qd1"),
                (2, "blk", "randread-4k-qd1"),
                (2, "qsd", "randwrite-4k-qd32"),
                (2, "blk", "randwrite-4k-qd32"),
            ]
        );
    }

    #[test]
    fn l2_script_warms_both_disks_then_runs_every_step() {
        let script = plan(1).l2_script();

        let runs: Vec<&str> = script.lines().filter(|l| l.starts_with("run ")).collect();
        assert_eq!(
            runs,
            [
                "run 0 blk warmup randread 32 3 0",
                "run 0 qsd warmup randread 32 3 0",
                "run 1 blk randread-4k-qd1 randread 1 5 1",
                "run 1 qsd randread-4k-qd1 randread 1 5 1",
                "run 1 blk randwrite-4k-qd32 randwrite 32 5 1",
                "run 1 qsd randwrite-4k-qd32 randwrite 32 5 1",
            ]
        );
    }
}
