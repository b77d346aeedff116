//! The guest-seen pause: the gaps between the test guest's `t N` tick
//! lines (`tg.tick`) as the host read them, first from the source VMM's
//! console and then from the destination's. The guest's own clocks
//! cannot show it (TSC and kvm-clock are restored across a migration).

use std::time::{Duration, Instant};

use bench_harness::stats::Summary;
use bench_harness::vmm::ConsoleLine;

/// What the tick lines around one migration show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gaps {
    /// The largest gap between consecutive ticks from the migration's
    /// start on (pre-copy, the switch, and after).
    pub max: Duration,
    /// The gap between the last tick the source printed and the first the
    /// destination printed.
    pub switch: Duration,
    /// When the source's last and the destination's first tick were read.
    pub last_source: Instant,
    pub first_dest: Instant,
    /// Whether `max` is that gap.
    pub max_at_switch: bool,
    /// When the tick that ended the `max` gap was read.
    pub max_end: Instant,
    /// The median gap before the migration started (the guest's normal
    /// rhythm), and how many gaps that is.
    pub normal_p50: Duration,
    pub normal_n: usize,
    /// Consecutive ticks whose numbers do not follow (a line lost,
    /// doubled or garbled).
    pub breaks: usize,
}

/// A tick: when its line was read, its number, whether from the source.
type Tick = (Instant, u64, bool);

/// Analyses the source's lines then the destination's, the migration
/// having been asked for at `start`. `None` without a tick on each side.
///
/// The source may have stopped mid-line (the vCPU paused between two
/// bytes); its unterminated tail is joined to the destination's first
/// line, which the guest finished there.
pub fn analyse(source: &[ConsoleLine], dest: &[ConsoleLine], start: Instant) -> Option<Gaps> {
    let (tail, source) = match source.split_last() {
        Some((t, rest)) if !t.complete => (Some(t.text.as_str()), rest),
        _ => (None, source),
    };
    let mut ticks: Vec<Tick> = source
        .iter()
        .filter_map(|l| tick(&l.text).map(|n| (l.at, n, true)))
        .collect();
    let switch_at = ticks.len();
    for (i, l) in dest.iter().enumerate() {
        let n = match (i, tail) {
            (0, Some(t)) => tick(&format!("{t}{}", l.text)),
            _ => tick(&l.text),
        };
        if let Some(n) = n {
            ticks.push((l.at, n, false));
        }
    }
    if switch_at == 0 || switch_at == ticks.len() {
        return None;
    }
    let gap = |i: usize| ticks[i].0.saturating_duration_since(ticks[i - 1].0);
    let switch = gap(switch_at);
    let mut normal = Vec::new();
    let (mut max, mut max_i, mut breaks) = (Duration::ZERO, switch_at, 0);
    for i in 1..ticks.len() {
        if ticks[i].1 != ticks[i - 1].1.wrapping_add(1) {
            breaks += 1;
        }
        if ticks[i].0 < start {
            normal.push(gap(i));
        } else if gap(i) > max {
            (max, max_i) = (gap(i), i);
        }
    }
    let normal_n = normal.len();
    Some(Gaps {
        max,
        switch,
        last_source: ticks[switch_at - 1].0,
        first_dest: ticks[switch_at].0,
        max_at_switch: max_i == switch_at,
        max_end: ticks[max_i].0,
        normal_p50: Summary::of(normal).map_or(Duration::ZERO, |s| s.p50),
        normal_n,
        breaks,
    })
}

/// The number of a `t N` line.
fn tick(text: &str) -> Option<u64> {
    text.strip_prefix("t ")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines `texts` read `step_us` apart from `t0 + from_us`.
    fn lines(t0: Instant, from_us: u64, step_us: u64, texts: &[&str]) -> Vec<ConsoleLine> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| ConsoleLine {
                at: t0 + Duration::from_micros(from_us + step_us * i as u64),
                text: (*t).to_string(),
                complete: true,
            })
            .collect()
    }

    #[test]
    fn the_switch_is_the_largest_gap_and_the_normal_one_is_measured_before() {
        let t0 = Instant::now();
        let src = lines(t0, 0, 100, &["t 1", "t 2", "TG: dirty 0", "t 3"]);
        let dst = lines(t0, 10_300, 100, &["t 4", "t 5"]);

        let g = analyse(&src, &dst, t0 + Duration::from_micros(350)).unwrap();

        assert_eq!(g.switch, Duration::from_micros(10_000));
        assert_eq!(g.max, g.switch);
        assert!(g.max_at_switch);
        assert_eq!((g.normal_p50, g.normal_n), (Duration::from_micros(100), 2));
        assert_eq!(g.breaks, 0);
    }

    #[test]
    fn a_line_the_source_left_unfinished_is_completed_by_the_destination() {
        let t0 = Instant::now();
        let mut src = lines(t0, 0, 100, &["t 7", "t 1"]);
        src[1].complete = false;
        let dst = lines(t0, 5_100, 100, &["2", "t 13"]);

        let g = analyse(&src, &dst, t0).unwrap();

        assert_eq!(g.switch, Duration::from_micros(5_100));
        assert_eq!(g.breaks, 1, "only 7 -> 12 is a break");
    }

    #[test]
    fn a_lost_tick_is_counted_as_a_break() {
        let t0 = Instant::now();
        let src = lines(t0, 0, 100, &["t 1", "t 2"]);
        let dst = lines(t0, 300, 100, &["t 4"]);

        let g = analyse(&src, &dst, t0).unwrap();

        assert_eq!(g.breaks, 1);
    }

    #[test]
    fn no_tick_on_one_side_gives_nothing() {
        let t0 = Instant::now();
        let src = lines(t0, 0, 100, &["t 1", "t 2"]);

        assert!(analyse(&src, &[], t0).is_none());
        assert!(analyse(&[], &src, t0).is_none());
    }
}
