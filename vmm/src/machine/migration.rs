//! The VM event loop's part in an outgoing migration: starting pre-copy,
//! and the last step once it converged (pause, state, last pages, hand
//! the backends over), or putting everything back if it failed.

use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use mio::unix::SourceFd;
use mio::Interest;
use tokio::sync::oneshot;

use super::{Machine, Token};
use crate::api::{ApiFailure, ApiReply, ApiResponse};
use crate::devices::bus::lock;
use crate::events;
use crate::exit::ExitReason;
use crate::migration::send::{
    abandon, send_runs, stop_backend_logs, Converged, Outgoing, Pace, SendMigrationConfig, Source,
};
use crate::migration::stream::{self, Kind};
use crate::migration::MigrationError;

/// How long the source waits for the destination to build and resume
/// the VM after `Complete`.
const COMPLETE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

impl Machine {
    /// vm.send-migration: starts pre-copy on its own thread; `reply` is
    /// answered when the migration ends (or now, if it cannot start).
    pub(super) fn start_migration(&mut self, body: &[u8], reply: oneshot::Sender<ApiResponse>) {
        let refuse = |reply: oneshot::Sender<ApiResponse>, status, msg: String| {
            let _ = reply.send(Err(ApiFailure::new(status, msg)));
        };
        if self.outgoing.is_some() {
            return refuse(reply, 405, "A migration is already running".into());
        }
        let request = match crate::api::config::parse::<SendMigrationConfig>(body)
            .map_err(|e| crate::error_chain(&e))
            .and_then(|c| c.check().map_err(|e| crate::error_chain(&e)))
        {
            Ok(r) => r,
            Err(e) => return refuse(reply, 400, e),
        };
        let source = Source {
            vm: self.vm.clone(),
            mem: self.memory.guest.clone(),
            memfd: self.memory.file.clone(),
            config: self.config.clone(),
            devices: self.platform.virtio.clone(),
            ids: self.ids.clone(),
        };
        let url = request.url.to_string();
        let local = request.local;
        let outgoing = match Outgoing::start(request, source) {
            Ok(o) => o,
            Err(e) => return refuse(reply, 500, crate::error_chain(&e)),
        };
        let fd = outgoing.done.as_raw_fd();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token::Migration.mio(),
            Interest::READABLE,
        ) {
            let mut o = outgoing;
            let _ = o.join(true);
            return refuse(reply, 500, format!("Cannot poll the migration: {e}"));
        }
        events::emit(
            "migration",
            "started",
            &[("url", url.clone()), ("local", local.to_string())],
        );
        tracing::info!(%url, local, "migration started");
        self.outgoing = Some((outgoing, reply));
    }

    /// The pre-copy thread ended: finish the migration (the VM then ends
    /// here) or answer its failure (the VM goes on).
    pub(super) fn migration_ended(&mut self) -> Option<ExitReason> {
        let (mut outgoing, reply) = self.outgoing.take()?;
        let fd = outgoing.done.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        let result = outgoing.join(false).and_then(|c| self.finish_migration(c));
        match result {
            Ok(_) => {
                let _ = reply.send(Ok(ApiReply::Empty));
                Some(ExitReason::Migrated)
            }
            Err(e) => {
                let msg = crate::error_chain(&e);
                tracing::warn!(error = %msg, "migration failed; the VM goes on here");
                events::emit("migration", "failed", &[("error", msg.clone())]);
                let _ = reply.send(Err(ApiFailure::new(
                    500,
                    format!("Migration failed: {msg}"),
                )));
                None
            }
        }
    }

    /// The VM is ending during a migration: stop it and answer.
    pub(super) fn cancel_migration(&mut self) {
        if let Some((mut outgoing, reply)) = self.outgoing.take() {
            if let Ok(mut c) = outgoing.join(true) {
                abandon(&mut c.conn);
            }
            stop_backend_logs(&self.platform.virtio);
            let _ = reply.send(Err(ApiFailure::new(
                500,
                crate::error_chain(&MigrationError::VmStopped),
            )));
        }
    }

    /// Pauses, sends the last pages and the state, hands the backends
    /// over and waits for the destination to run the VM; returns the
    /// downtime in ms. On failure the VM is as before (running if it ran).
    fn finish_migration(&mut self, mut c: Converged) -> Result<f64, MigrationError> {
        let was_running = !self.paused;
        let paused_at = Instant::now();
        if was_running {
            self.pause();
        }
        let sent = self.send_last(&mut c);
        let state = match sent {
            Ok(s) => s,
            Err(e) => {
                abandon(&mut c.conn);
                self.migration_failed(c, was_running, None);
                return Err(e);
            }
        };
        // The destination connects to the backends: let go of them.
        for d in &self.platform.virtio {
            lock(d).device_mut().detach_backend();
        }
        // Shared memory: this VM's KVM must not write into it (steal time,
        // pvclock at its vCPUs' teardown) once the destination runs.
        let local = c.log.is_none();
        if local {
            if let Err(e) = crate::vm::unregister_memory(&self.vm, &self.memory.guest) {
                let _ = crate::vm::register_memory(&self.vm, &self.memory.guest);
                self.migration_failed(c, was_running, Some(state.backends));
                return Err(MigrationError::Vm(crate::error_chain(&e)));
            }
        }
        let done = c
            .conn
            .set_read_timeout(Some(COMPLETE_TIMEOUT))
            .map_err(MigrationError::Io)
            .and_then(|()| {
                stream::write_frame(&mut c.conn, Kind::Complete, &[u8::from(was_running)])
            })
            .and_then(|()| stream::expect_ok(&mut c.conn));
        if let Err(e) = done {
            if local {
                if let Err(e) = crate::vm::register_memory(&self.vm, &self.memory.guest) {
                    tracing::error!(error = %crate::error_chain(&e), "cannot give the VM its memory back");
                }
            }
            self.migration_failed(c, was_running, Some(state.backends));
            return Err(e);
        }
        let downtime_ms = paused_at.elapsed().as_secs_f64() * 1e3;
        let total_ms = c.started.elapsed().as_secs_f64() * 1e3;
        events::emit(
            "migration",
            "completed",
            &[
                ("downtime_ms", format!("{downtime_ms:.3}")),
                ("total_ms", format!("{total_ms:.1}")),
            ],
        );
        tracing::info!(
            downtime_ms,
            total_ms,
            "migration completed: the VM runs on the destination"
        );
        Ok(downtime_ms)
    }

    /// With the VM paused: its state (which stops the backends' rings, so
    /// their last writes are logged), the pages dirty since the last round
    /// and the state itself, acknowledged by the destination.
    fn send_last(
        &mut self,
        c: &mut Converged,
    ) -> Result<crate::snapshot::SnapshotState, MigrationError> {
        let state = self.save_state().map_err(MigrationError::Vm)?;
        if let Some(log) = &c.log {
            log.take(&mut c.pending)?;
            let never = AtomicBool::new(false);
            let pace = Pace {
                limit: None,
                cancel: &never,
                deadline: None,
                progress: None,
            };
            send_runs(
                &mut c.conn,
                &self.memory.guest,
                &self.memory.file,
                &c.pending.runs(),
                &pace,
            )?;
        }
        stream::write_state(&mut c.conn, Kind::State, &state)?;
        stream::expect_ok(&mut c.conn)?;
        Ok(state)
    }

    /// Puts the VM back as it was: logging off, backends reconnected (with
    /// the state they gave) if they were handed over, running if it ran.
    fn migration_failed(
        &mut self,
        c: Converged,
        was_running: bool,
        handed_over: Option<Vec<Option<Vec<u8>>>>,
    ) {
        stop_backend_logs(&self.platform.virtio);
        drop(c);
        if let Some(states) = handed_over {
            for (d, s) in self.platform.virtio.iter().zip(states) {
                lock(d).device_mut().reattach_backend(s);
            }
        }
        if was_running {
            self.resume();
        }
    }
}
