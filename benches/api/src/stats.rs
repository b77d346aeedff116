//! Order statistics over a set of samples.

use std::time::Duration;

/// min / p50 / p99 / max of one series, nearest-rank percentiles.
pub struct Summary {
    pub n: usize,
    pub min: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Summary {
    /// `None` for an empty series.
    pub fn of(mut v: Vec<Duration>) -> Option<Self> {
        v.sort_unstable();
        let n = v.len();
        let rank = |p: f64| v[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Self {
            n,
            min: *v.first()?,
            p50: rank(0.50),
            p99: rank(0.99),
            max: *v.last()?,
        })
    }
}

/// Microseconds, for the round trip table.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Milliseconds, for the pause/resume table.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
