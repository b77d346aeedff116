//! One real `vmm` serving the control API with the test guest held idle
//! (`tg.hold`), and timed requests on its socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bench_harness::vmm::{boot_command, Vmm, VmmError};

use crate::BenchError;

/// How long the guest may take to be idle once the API answers.
const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// What the VM is started with.
pub struct VmSpec<'a> {
    pub vmm: &'a Path,
    pub guest: &'a Path,
    pub cpus: u8,
    pub memory: &'a str,
    pub cpu_features: Option<&'a str>,
}

/// A running `vmm`, stopped when dropped.
pub struct Vm(Vmm);

impl Vm {
    /// Starts the VMM and waits until the guest is idle (`TG: HOLD`).
    pub fn start(spec: &VmSpec, socket: PathBuf) -> Result<Self, BenchError> {
        let mut cmd = boot_command(spec.vmm, spec.guest, spec.memory, "console=ttyS0 tg.hold");
        cmd.args(["--cpus", &spec.cpus.to_string()]);
        if let Some(f) = spec.cpu_features {
            cmd.args(["--cpu-features", f]);
        }
        // A count this host cannot run is skipped; a missing binary is not.
        let not_idle = |why| match why {
            VmmError::Spawn(..) => BenchError::Vmm(why),
            why => BenchError::NotIdle {
                cpus: spec.cpus,
                why,
            },
        };
        let mut vmm = Vmm::start(cmd, socket).map_err(not_idle)?;
        vmm.wait_line("TG: HOLD", IDLE_LIMIT).map_err(not_idle)?;
        Ok(Self(vmm))
    }

    /// Sends `method endpoint`, checks the status is `expect`, and returns
    /// the time from connect to the end of the response.
    pub fn timed(
        &self,
        method: &'static str,
        endpoint: &'static str,
        expect: u16,
    ) -> Result<Duration, BenchError> {
        Ok(self.0.timed(method, endpoint, "", expect)?.1)
    }

    /// The body of `GET vm.info`.
    pub fn info(&self) -> Result<String, BenchError> {
        Ok(self.0.get("vm.info")?)
    }
}
