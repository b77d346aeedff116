//! Host fio with io_uring, O_DIRECT or through the page cache: the limit the
//! backends are compared to.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use thiserror::Error;

use crate::workload::{Sample, Workload};

/// Errors running fio.
#[derive(Debug, Error)]
pub enum FioError {
    /// fio could not be started.
    #[error("Cannot run fio")]
    Spawn(#[source] std::io::Error),
    /// fio exited with an error.
    #[error("fio failed: {0}")]
    Failed(String),
    /// fio's JSON output is not what we expect.
    #[error("Unexpected fio output")]
    Parse,
}

/// Runs one workload with fio on `file`, with O_DIRECT if `direct`.
pub fn run(
    file: &Path,
    w: &Workload,
    label: &str,
    runtime: u64,
    direct: bool,
) -> Result<Sample, FioError> {
    let rw = match (w.write, w.random) {
        (false, true) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (true, false) => "write",
    };
    let out = Command::new("fio")
        .arg("--name=bench")
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--direct={}", u8::from(direct)))
        .args([
            "--ioengine=io_uring",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", w.bs))
        .arg(format!("--iodepth={}", w.qd))
        .arg(format!("--runtime={runtime}"))
        .output()
        .map_err(FioError::Spawn)?;
    if !out.status.success() {
        return Err(FioError::Failed(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    parse(&String::from_utf8_lossy(&out.stdout), w, label)
}

/// Parses fio's JSON output for workload `w`.
pub fn parse(json: &str, w: &Workload, label: &str) -> Result<Sample, FioError> {
    // fio may print notes before the JSON document.
    let start = json.find('{').ok_or(FioError::Parse)?;
    let v: Value = serde_json::from_str(&json[start..]).map_err(|_| FioError::Parse)?;
    let job = &v["jobs"][0];
    let dir = &job[if w.write { "write" } else { "read" }];
    let num = |v: &Value| v.as_f64().ok_or(FioError::Parse);
    let iops = num(&dir["iops"])?;
    let bw = num(&dir["bw_bytes"])?;
    let pct = &dir["clat_ns"]["percentile"];
    let runtime_s = num(&dir["runtime"])? / 1000.0;
    let ios = num(&dir["total_ios"])?;
    let cpu_s = (num(&job["usr_cpu"])? + num(&job["sys_cpu"])?) / 100.0 * runtime_s;
    Ok(Sample {
        label: label.into(),
        workload: w.name.into(),
        iops,
        mbps: bw / 1e6,
        p50_us: num(&pct["50.000000"])? / 1000.0,
        p99_us: num(&pct["99.000000"])? / 1000.0,
        cpu_s_per_mio: if ios > 0.0 {
            cpu_s / ios * 1e6
        } else {
            f64::NAN
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_json_is_parsed() {
        let json = r#"note: x
        {"jobs":[{"usr_cpu":10.0,"sys_cpu":40.0,"read":{"iops":1000.0,"bw_bytes":4096000,
        "runtime":2000,"total_ios":2000,"clat_ns":{"percentile":{"50.000000":20000,"99.000000":90000}}}}]}"#;
        let w = Workload::by_name("randread-4k-qd1").unwrap();

        let s = parse(json, &w, "host-fio").unwrap();

        assert_eq!(
            (s.iops, s.p50_us, s.p99_us, s.cpu_s_per_mio),
            (1000.0, 20.0, 90.0, 500.0)
        );
    }
}
