//! Order statistics over a set of samples.

use std::time::Duration;

/// min / median / max of one series (nearest-rank median).
pub struct Summary {
    pub min: Duration,
    pub p50: Duration,
    pub max: Duration,
}

impl Summary {
    /// `None` for an empty series.
    pub fn of(mut v: Vec<Duration>) -> Option<Self> {
        v.sort_unstable();
        let n = v.len();
        let rank = |p: f64| v[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Self {
            min: *v.first()?,
            p50: rank(0.50),
            max: *v.last()?,
        })
    }

    /// `min / median / max` in milliseconds.
    pub fn ms3(&self) -> String {
        format!(
            "{:.1} / {:.1} / {:.1}",
            ms(self.min),
            ms(self.p50),
            ms(self.max)
        )
    }
}

/// Milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Bytes per second in GB/s (10^9).
pub fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}
