//! What the two VMMs said about one migration: the source's event monitor
//! file (`migration` `round`/`completed` events) and both logs
//! (`VMM_LOG=info,vmm::machine=debug`: `tracing`'s lines, stamped with
//! the wall clock, so the two processes' lines can be put on one axis).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The source's `migration`/`completed` event and its rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Completed {
    pub downtime: Duration,
    pub total: Duration,
    /// `round` events since the migration started (0 for local).
    pub rounds: u32,
    /// The source's `vm` `pausing` -> `paused` events: every vCPU out of
    /// the guest (part of the downtime).
    pub pause: Duration,
}

/// Reads the last migration's events from an event monitor file.
pub fn completed(events: &str) -> Option<Completed> {
    let parsed: Vec<serde_json::Value> = events
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let is = |v: &serde_json::Value, event: &str| v["source"] == "migration" && v["event"] == event;
    let started = parsed.iter().rposition(|v| is(v, "started"))?;
    let last = &parsed[started..];
    let done = last.iter().find(|v| is(v, "completed"))?;
    let ms = |k: &str| {
        done["properties"][k]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .map(|m| Duration::from_secs_f64(m / 1e3))
    };
    let vm_event = |event: &str| {
        let v = last
            .iter()
            .find(|v| v["source"] == "vm" && v["event"] == event)?;
        let t = &v["timestamp"];
        Some(Duration::new(
            t["secs"].as_u64()?,
            t["nanos"].as_u64()? as u32,
        ))
    };
    Some(Completed {
        downtime: ms("downtime_ms")?,
        total: ms("total_ms")?,
        rounds: last.iter().filter(|v| is(v, "round")).count() as u32,
        pause: vm_event("paused")?.saturating_sub(vm_event("pausing")?),
    })
}

/// Where the downtime went, from both logs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Breakdown {
    /// When the source paused the VM and the destination resumed it,
    /// seconds of the day (UTC).
    pub paused_at: f64,
    pub resumed_at: f64,
    /// Source: the VM paused -> destination: the VM resumed (the state,
    /// the last dirty pages, the destination building the VM).
    pub paused_to_resumed: Duration,
    /// Of that, the destination building the VM (its `VM built` line).
    pub build: Duration,
    /// Destination resumed -> source: migration completed (the `Ok` back).
    pub resumed_to_done: Duration,
    /// Guest RAM bytes the destination received in all.
    pub bytes: u64,
    /// Of those, sent while the VM was paused (all minus pre-copy's).
    pub last_bytes: u64,
    /// The last pre-copy round's bandwidth, bytes per second.
    pub bandwidth: u64,
}

/// The breakdown of the latest migration out of `source` into `dest`;
/// `None` if a line is missing.
pub fn breakdown(source: &[String], dest: &[String]) -> Option<Breakdown> {
    let started = source
        .iter()
        .rposition(|l| l.contains("migration started"))?;
    let source = &source[started..];
    let received = dest
        .iter()
        .rposition(|l| l.contains("migration received"))?;
    let dest = &dest[..=received];
    let last =
        |lines: &[String], what: &str| lines.iter().rev().find(|l| l.contains(what)).cloned();
    let paused = wall(&last(source, "VM paused")?)?;
    let done = wall(&last(source, "migration completed")?)?;
    let resumed = wall(&last(dest, "VM resumed")?)?;
    let built_us: u64 = field(&last(dest, "VM built")?, "vcpus_us")?.parse().ok()?;
    let bytes: u64 = field(&dest[received], "memory_bytes")?.parse().ok()?;
    let rounds: Vec<&String> = source
        .iter()
        .filter(|l| l.contains("pre-copy round done"))
        .collect();
    let precopy: u64 = rounds
        .iter()
        .filter_map(|l| field(l, "sent")?.parse::<u64>().ok())
        .sum();
    let bandwidth = rounds
        .last()
        .and_then(|l| field(l, "bandwidth")?.parse().ok())
        .unwrap_or(0);
    Some(Breakdown {
        paused_at: paused,
        resumed_at: resumed,
        paused_to_resumed: between(paused, resumed),
        build: Duration::from_micros(built_us),
        resumed_to_done: between(resumed, done),
        bytes,
        last_bytes: bytes.saturating_sub(precopy),
        bandwidth,
    })
}

/// `later - earlier`, seconds of the day, across midnight.
fn between(earlier: f64, later: f64) -> Duration {
    Duration::from_secs_f64((later - earlier).rem_euclid(86_400.0))
}

/// `later - earlier` in seconds, either sign, seconds of the day, across
/// midnight.
pub fn signed(earlier: f64, later: f64) -> f64 {
    let d = (later - earlier).rem_euclid(86_400.0);
    if d > 43_200.0 {
        d - 86_400.0
    } else {
        d
    }
}

/// The second of the day (UTC) of `at`, on the clock of `tracing`'s
/// stamps, given one moment `now` read on both clocks.
pub fn second_of_day(at: std::time::Instant, now: (std::time::Instant, SystemTime)) -> f64 {
    let wall = if at <= now.0 {
        now.1 - (now.0 - at)
    } else {
        now.1 + (at - now.0)
    };
    wall.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64().rem_euclid(86_400.0))
}

/// The seconds of the day (UTC) a `tracing` line was written at: it
/// starts `2026-01-02T03:04:05.123456Z`.
fn wall(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?;
    let (_, time) = t.split_once('T')?;
    let time = time.strip_suffix('Z')?;
    let mut p = time.split(':');
    let h: f64 = p.next()?.parse().ok()?;
    let m: f64 = p.next()?.parse().ok()?;
    let s: f64 = p.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The value of ` key=value` in a `tracing` line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split_whitespace().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENTS: &str = r#"{"timestamp":{"secs":0,"nanos":1},"source":"migration","event":"received","properties":null}
{"timestamp":{"secs":1,"nanos":2},"source":"migration","event":"started","properties":{"local":"false","url":"tcp:127.0.0.1:1"}}
{"timestamp":{"secs":2,"nanos":3},"source":"migration","event":"round","properties":{"round":"0"}}
{"timestamp":{"secs":2,"nanos":4},"source":"migration","event":"round","properties":{"round":"1"}}
{"timestamp":{"secs":2,"nanos":999000000},"source":"vm","event":"pausing","properties":null}
{"timestamp":{"secs":3,"nanos":1000},"source":"vm","event":"paused","properties":null}
{"timestamp":{"secs":2,"nanos":5},"source":"migration","event":"completed","properties":{"downtime_ms":"98.091","total_ms":"2046.8"}}
"#;

    #[test]
    fn the_completed_event_gives_downtime_total_and_rounds() {
        let c = completed(EVENTS).unwrap();

        assert_eq!(c.downtime, Duration::from_secs_f64(0.098091));
        assert_eq!(c.total, Duration::from_secs_f64(2.0468));
        assert_eq!(c.rounds, 2);
        assert_eq!(c.pause, Duration::from_micros(1001));
    }

    #[test]
    fn a_migration_not_completed_gives_nothing() {
        assert!(completed(&EVENTS[..EVENTS.find("completed").unwrap() - 30]).is_none());
    }

    #[test]
    fn both_logs_give_the_downtime_breakdown_and_the_bytes() {
        let source: Vec<String> = [
            "2026-12-02T12:51:51.705153Z  INFO vmm::machine::migration: migration started url=tcp:127.0.0.1:7777 local=false",
            "2026-12-02T12:51:53.701091Z  INFO vmm::migration::send: pre-copy round done round=0 sent=266711040 remaining=18952192 bandwidth=138517599",
            "2026-12-02T12:51:53.701370Z  INFO vmm::machine: VM paused",
            "2026-12-02T12:51:53.799479Z  INFO vmm::machine::migration: migration completed: the VM runs on the destination downtime_ms=98.09 total_ms=2046.7",
        ]
        .map(String::from)
        .to_vec();
        let dest: Vec<String> = [
            "2026-12-02T12:51:51.775168Z  INFO vmm::migration::receive: receiving a migration local=false from=0.1.0 memory=268435456",
            "2026-12-02T12:51:53.792279Z DEBUG vmm::machine: VM built boot_or_state_us=20 platform_us=56 vcpus_us=1036",
            "2026-12-02T12:51:53.792402Z  INFO vmm::machine: VM resumed",
            "2026-12-02T12:51:53.792524Z  INFO vmm::api::controller: migration received: the VM runs here memory_bytes=285663232 local=false",
        ]
        .map(String::from)
        .to_vec();

        let b = breakdown(&source, &dest).unwrap();

        let near = |d: Duration, s: f64| (d.as_secs_f64() - s).abs() < 1e-6;
        assert!(near(b.paused_to_resumed, 0.091_032), "{b:?}");
        assert_eq!(b.build, Duration::from_micros(1036));
        assert!(near(b.resumed_to_done, 0.007_077), "{b:?}");
        assert_eq!(b.bytes, 285_663_232);
        assert_eq!(b.last_bytes, 285_663_232 - 266_711_040);
        assert_eq!(b.bandwidth, 138_517_599);
    }

    #[test]
    fn a_gap_across_midnight_is_still_positive() {
        assert_eq!(between(86_399.5, 0.25), Duration::from_millis(750));
        assert_eq!(wall("2026-12-02T00:00:01.5Z  INFO x"), Some(1.5));
        assert_eq!(signed(0.25, 86_399.5), -0.75);
    }
}
