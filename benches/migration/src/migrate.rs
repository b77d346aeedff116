//! One migration between two real VMMs, measured: the running VM's VMM
//! sends it to a fresh, empty one, which then holds the VM for the next.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use bench_harness::stats::ms;
use bench_harness::vmm::{self, boot_command, ConsoleLine, Vmm};

use crate::logs::{self, Breakdown, Completed};
use crate::ticks::{self, Gaps};
use crate::{BenchError, Transport};

/// What both VMMs log: `info`, plus `vmm::machine`'s `VM built` timing.
const VMM_LOG: &str = "info,vmm::machine=debug";
/// How long the source may take to exit once the migration is done.
const EXIT_LIMIT: Duration = Duration::from_secs(30);
/// How long the destination may take to be listening.
const LISTEN_LIMIT: Duration = Duration::from_secs(10);

/// A VMM of the chain with its event monitor file.
pub struct Node {
    pub vmm: Vmm,
    events: PathBuf,
}

/// Everything measured in one migration.
pub struct Sample {
    pub completed: Completed,
    pub gaps: Gaps,
    pub breakdown: Breakdown,
    /// The source's last tick read -> the source pausing the VM (its
    /// log), ms: negative while the guest still ran after its last tick
    /// (up to one normal gap); larger when the guest stalled before the
    /// VMM paused it.
    pub before_pause_ms: f64,
    /// The destination resuming the VM -> its first tick read, ms.
    pub after_resume_ms: f64,
    /// From the migration request: the largest gap's end, the source
    /// pausing the VM, the source process seen ended.
    pub max_end_ms: f64,
    pub paused_ms: f64,
    pub exited_ms: f64,
}

/// Makes the VMMs of one chain in `scratch`, numbered.
pub struct Chain<'a> {
    pub vmm: &'a Path,
    pub scratch: &'a Path,
    pub next: usize,
}

impl Chain<'_> {
    fn spawn(&mut self, mut cmd: Command) -> Result<Node, BenchError> {
        self.next += 1;
        let events = self.scratch.join(format!("events-{}.jsonl", self.next));
        let _ = std::fs::remove_file(&events);
        cmd.env("VMM_LOG", VMM_LOG)
            .arg("--event-monitor")
            .arg(format!("path={}", events.display()));
        let socket = self.scratch.join(format!("vmm-{}.sock", self.next));
        Ok(Node {
            vmm: Vmm::start(cmd, socket)?,
            events,
        })
    }

    /// Boots the test guest.
    pub fn boot(&mut self, guest: &Path, memory: &str, cmdline: &str) -> Result<Node, BenchError> {
        self.spawn(boot_command(self.vmm, guest, memory, cmdline))
    }

    /// Migrates the VM on `from` to a new VMM over `transport`, `settle`
    /// of tick lines before and after; returns that VMM and the sample.
    pub fn migrate(
        &mut self,
        mut from: Node,
        transport: Transport,
        downtime_ms: u64,
        settle: Duration,
        limit: Duration,
    ) -> Result<(Node, Sample), BenchError> {
        let to = self.spawn(Command::new(self.vmm))?;
        let url = match transport {
            Transport::Tcp => format!("tcp:127.0.0.1:{}", free_port()?),
            Transport::Unix | Transport::Local => {
                format!("unix:{}", self.scratch.join("migration.sock").display())
            }
        };
        let receiving = {
            let socket = to.vmm.socket().to_path_buf();
            let body = serde_json::json!({ "receiver_url": url }).to_string();
            std::thread::spawn(move || {
                vmm::timed(&socket, "PUT", "vm.receive-migration", &body, 204, limit)
            })
        };
        wait_listening(&to.events, &url)?;

        from.vmm.skip_lines();
        std::thread::sleep(settle);
        let body = serde_json::json!({
            "destination_url": url,
            "local": transport == Transport::Local,
            "downtime_ms": downtime_ms,
        })
        .to_string();
        let sent = vmm::timed(
            from.vmm.socket(),
            "PUT",
            "vm.send-migration",
            &body,
            204,
            limit,
        );
        let start = match sent {
            Ok((start, _)) => start,
            Err(e) => {
                // Stopping the destination ends its wait for the source.
                drop(to);
                let _ = receiving.join();
                return Err(e.into());
            }
        };
        receiving.join().map_err(|_| BenchError::Thread)??;
        let status = from.vmm.wait_exit(EXIT_LIMIT)?;
        let exited = Instant::now();
        if !status.success() {
            return Err(BenchError::SourceExit(status.to_string()));
        }
        std::thread::sleep(settle);
        let sample = Sample::of(&from, &to, start, exited)?;
        Ok((to, sample))
    }
}

impl Sample {
    /// One line for the progress output.
    pub fn line(&self) -> String {
        format!(
            "VMM downtime {:.1} ms; guest gap at the switch {:.1} ms, largest {:.1} ms{}; \
             paused at +{:.0} ms, source gone at +{:.0} ms; total {:.0} ms; {} MiB received",
            ms(self.completed.downtime),
            ms(self.gaps.switch),
            ms(self.gaps.max),
            if self.gaps.max_at_switch {
                String::new()
            } else {
                format!(" (ending at +{:.0} ms)", self.max_end_ms)
            },
            self.paused_ms,
            self.exited_ms,
            ms(self.completed.total),
            self.breakdown.bytes >> 20
        )
    }

    /// What the consoles, the event file and the logs of `from` (ended)
    /// and `to` show of the migration requested at `start`.
    fn of(from: &Node, to: &Node, start: Instant, exited: Instant) -> Result<Self, BenchError> {
        let source_lines = drain(&from.vmm);
        let dest_lines: Vec<ConsoleLine> = to.vmm.console().try_iter().collect();
        let gaps = ticks::analyse(&source_lines, &dest_lines, start)
            .ok_or(BenchError::Measure("no tick line on one side"))?;
        let events = std::fs::read_to_string(&from.events)
            .map_err(|e| BenchError::Scratch(from.events.clone(), e))?;
        let completed =
            logs::completed(&events).ok_or(BenchError::Measure("no migration completed event"))?;
        let breakdown = logs::breakdown(&from.vmm.log(), &to.vmm.log())
            .ok_or(BenchError::Measure("a log line is missing"))?;
        let now = (Instant::now(), SystemTime::now());
        let wall = |at| logs::second_of_day(at, now);
        let since_start = |at: Instant| ms(at.saturating_duration_since(start));
        Ok(Self {
            completed,
            gaps,
            before_pause_ms: logs::signed(wall(gaps.last_source), breakdown.paused_at) * 1e3,
            after_resume_ms: logs::signed(breakdown.resumed_at, wall(gaps.first_dest)) * 1e3,
            max_end_ms: since_start(gaps.max_end),
            paused_ms: logs::signed(wall(start), breakdown.paused_at) * 1e3,
            exited_ms: since_start(exited),
            breakdown,
        })
    }
}

/// The console lines of a VMM that has exited, to the end of its output.
fn drain(vmm: &Vmm) -> Vec<ConsoleLine> {
    let mut lines = Vec::new();
    while let Ok(l) = vmm.console().recv_timeout(EXIT_LIMIT) {
        lines.push(l);
    }
    lines
}

/// Waits until the destination listens on `url`: its `receiving` event
/// is written just before it binds, then the unix socket exists (for TCP,
/// a short grace: a probe connection would be taken as the migration).
fn wait_listening(events: &Path, url: &str) -> Result<(), BenchError> {
    let deadline = Instant::now() + LISTEN_LIMIT;
    let unix = url.strip_prefix("unix:").map(Path::new);
    loop {
        let said =
            std::fs::read_to_string(events).is_ok_and(|e| e.contains("\"event\":\"receiving\""));
        if said && unix.is_none_or(Path::exists) {
            if unix.is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::NotListening(url.to_string()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A free TCP port on the loopback.
fn free_port() -> Result<u16, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(BenchError::Port)
}
