//! Rate limiting for log lines a guest can trigger.

use std::time::{Duration, Instant};

/// Allows at most `burst` events per second; counts the rest.
#[derive(Debug)]
pub struct LogLimiter {
    window: Instant,
    count: u32,
    burst: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter allowing `burst` lines per second.
    pub fn new(burst: u32) -> Self {
        LogLimiter {
            window: Instant::now(),
            count: 0,
            burst,
            suppressed: 0,
        }
    }

    /// True if a line may be logged now.
    pub fn allow(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.count = 0;
        }
        self.count += 1;
        if self.count > self.burst {
            self.suppressed += 1;
        }
        self.count <= self.burst
    }

    /// Lines suppressed so far.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// Lines a second a default limiter lets through.
pub const DEFAULT_BURST: u32 = 5;

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new(DEFAULT_BURST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_burst_are_suppressed() {
        let mut l = LogLimiter::new(2);

        let allowed = (0..5).filter(|_| l.allow()).count();

        assert_eq!((allowed, l.suppressed()), (2, 3));
    }
}
