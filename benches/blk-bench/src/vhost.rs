//! Driving a vhost-user-blk socket with the synthetic frontend, one queue,
//! at the workload's queue depth; completions arrive on the call eventfd.

use std::path::Path;
use std::time::{Duration, Instant};

use backends::frontend::blk::{BlkDriver, BlkReq, S_OK};
use backends::frontend::{FrontendConfig, FrontendError, SyntheticFrontend};
use thiserror::Error;

use crate::workload::{percentile, Rng, Sample, Workload};

const MAX_IO: u32 = 128 << 10;
const MAX_QD: usize = 32;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of a vhost-user benchmark run.
#[derive(Debug, Error)]
pub enum VhostBenchError {
    /// The synthetic frontend failed.
    #[error("Synthetic frontend failed")]
    Frontend(#[from] FrontendError),
    /// The backend has no config space.
    #[error("Backend reports no capacity")]
    NoCapacity,
    /// A request failed.
    #[error("Request failed with status {0}")]
    Status(u8),
}

/// A connected benchmark driver.
pub struct VhostBench {
    drv: BlkDriver,
    capacity: u64,
}

/// User+system CPU seconds of a process, from /proc.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

impl VhostBench {
    /// Connects and negotiates one queue.
    pub fn connect(socket: &Path) -> Result<Self, VhostBenchError> {
        let cfg = FrontendConfig {
            mem_size: 64 << 20,
            num_queues: 1,
            queue_size: 256,
            ..Default::default()
        };
        let fe = SyntheticFrontend::connect(socket, cfg)?;
        let c = fe.config_space();
        let sectors = c
            .get(0..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes);
        let capacity = sectors
            .filter(|&s| s > 0)
            .ok_or(VhostBenchError::NoCapacity)?
            * 512;
        let drv = BlkDriver::new(fe, MAX_QD, MAX_IO)?;
        Ok(VhostBench { drv, capacity })
    }

    /// Runs `w` for `runtime` seconds.
    pub fn run(
        &mut self,
        w: &Workload,
        label: &str,
        runtime: u64,
        pid: Option<u32>,
    ) -> Result<Sample, VhostBenchError> {
        let blocks = self.capacity / u64::from(w.bs);
        let sectors_per_block = u64::from(w.bs / 512);
        let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ u64::from(w.bs) ^ w.qd as u64);
        let mut seq = 0u64;
        let mut sent_at = vec![Instant::now(); MAX_QD];
        let mut lat_us: Vec<f64> = Vec::with_capacity(1 << 20);
        let mut done = Vec::new();
        let mut in_flight = 0usize;
        let kind = if w.write {
            backends::frontend::blk::T_OUT
        } else {
            backends::frontend::blk::T_IN
        };
        let cpu0 = pid.and_then(process_cpu_seconds);
        let start = Instant::now();
        let end = start + Duration::from_secs(runtime);
        let mut ios = 0u64;
        while Instant::now() < end || in_flight > 0 {
            while in_flight < w.qd.min(MAX_QD) && Instant::now() < end {
                let block = if w.random {
                    rng.below(blocks)
                } else {
                    seq % blocks
                };
                seq += 1;
                let req = BlkReq {
                    kind,
                    sector: block * sectors_per_block,
                    len: w.bs,
                    data: None,
                    flags: 0,
                };
                let Some(slot) = self.drv.submit(0, &req)? else {
                    break;
                };
                sent_at[slot] = Instant::now();
                in_flight += 1;
            }
            self.drv.kick_if_needed(0);
            done.clear();
            self.drv.wait(0, TIMEOUT, &mut done)?;
            let now = Instant::now();
            for d in &done {
                if d.status != S_OK {
                    return Err(VhostBenchError::Status(d.status));
                }
                in_flight -= 1;
                if now <= end {
                    ios += 1;
                    lat_us.push((now - sent_at[d.slot]).as_secs_f64() * 1e6);
                }
            }
        }
        let secs = runtime as f64;
        let cpu = match (cpu0, pid.and_then(process_cpu_seconds)) {
            (Some(a), Some(b)) if ios > 0 => (b - a) / ios as f64 * 1e6,
            _ => f64::NAN,
        };
        lat_us.sort_by(f64::total_cmp);
        Ok(Sample {
            label: label.into(),
            workload: w.name.into(),
            iops: ios as f64 / secs,
            mbps: ios as f64 * f64::from(w.bs) / secs / 1e6,
            p50_us: percentile(&lat_us, 50.0),
            p99_us: percentile(&lat_us, 99.0),
            cpu_s_per_mio: cpu,
        })
    }
}
