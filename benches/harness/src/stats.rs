//! Order statistics over a set of samples.

use std::time::Duration;

/// min / p50 / p99 / max of one series, nearest-rank percentiles.
#[derive(Clone, Copy, Debug)]
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
        let first = *v.first()?;
        let rank = |p: f64| v[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Self {
            n,
            min: first,
            p50: rank(0.50),
            p99: rank(0.99),
            max: v[n - 1],
        })
    }

    /// `min / median / max` in milliseconds, one decimal.
    pub fn ms3(&self) -> String {
        format!(
            "{:.1} / {:.1} / {:.1}",
            ms(self.min),
            ms(self.p50),
            ms(self.max)
        )
    }
}

/// Microseconds.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Bytes per second in GB/s (10^9).
pub fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_series(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn an_empty_series_has_no_summary() {
        assert!(Summary::of(Vec::new()).is_none());
    }

    #[test]
    fn the_median_of_an_odd_series_is_its_middle_sample() {
        let s = Summary::of(ms_series(&[5, 1, 3])).unwrap();

        assert_eq!(
            (s.n, s.min, s.p50, s.max),
            (
                3,
                ms_series(&[1])[0],
                ms_series(&[3])[0],
                ms_series(&[5])[0]
            )
        );
    }

    #[test]
    fn the_median_of_an_even_series_is_the_lower_middle_sample() {
        let s = Summary::of(ms_series(&[4, 1, 3, 2])).unwrap();

        assert_eq!(s.p50, Duration::from_millis(2));
    }
}
