//! What the benchmark drivers in `benches/` share: a real `vmm` process
//! driven over its control API, its console lines stamped as they arrive
//! ([`vmm`]); order statistics ([`stats`]); and `main`'s one-line error
//! report ([`exit`]).
//!
//! It does not link the `vmm` library, so a bench builds whatever state
//! `vmm/` is in, and it speaks HTTP/1.1 on the API socket as `vmctl` does.

pub mod stats;
pub mod vmm;

use std::process::ExitCode;

/// Parses a size as vmm's `--memory` does: `256M`, `1G`, `4096K` or a
/// byte count.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// `main`'s ending: success, or `NAME: error: its source: ...` on stderr
/// and a failure status.
pub fn exit<E: std::error::Error>(name: &str, result: Result<(), E>) -> ExitCode {
    let Err(e) = result else {
        return ExitCode::SUCCESS;
    };
    let mut msg = format!("{name}: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    eprintln!("{msg}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_a_suffix() {
        assert_eq!(parse_size("256M"), Some(256 << 20));
        assert_eq!(parse_size("4g"), Some(4 << 30));
        assert_eq!(parse_size("4096K"), Some(4 << 20));
        assert_eq!(parse_size("123"), Some(123));
    }

    #[test]
    fn a_size_that_is_not_one_is_refused() {
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size("12X"), None);
        assert_eq!(parse_size("99999999999G"), None);
    }
}
