//! What the benchmark drivers in `benches/` share: a real `vmm` process
//! driven over its control API, its console lines stamped as they arrive
//! ([`vmm`]); order statistics ([`stats`]); and `main`'s one-line error
//! report ([`exit`]).
//!
//! It does not link the `vmm` library, so a bench builds whatever state
//! `vmm/` is in, and it speaks HTTP/1.1 on the API socket as `vmctl` does.

pub mod stats;
pub mod vmm;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Each of `list` with its bytes (see [`parse_size`]); the first that is
/// not a size is the error.
pub fn parse_sizes(list: &[String]) -> Result<Vec<(String, u64)>, String> {
    list.iter()
        .map(|s| {
            parse_size(s)
                .map(|b| (s.clone(), b))
                .ok_or_else(|| s.clone())
        })
        .collect()
}

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

/// A scratch directory `PARENT/NAME.PID`, removed with what it holds
/// when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(parent: &Path, name: &str) -> std::io::Result<Self> {
        let dir = parent.join(format!("{name}.{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
    fn a_list_of_sizes_keeps_each_label_or_names_the_bad_one() {
        let good = ["256M".to_string(), "1G".to_string()];
        let bad = ["256M".to_string(), "1Q".to_string()];

        assert_eq!(
            parse_sizes(&good),
            Ok(vec![("256M".into(), 256 << 20), ("1G".into(), 1 << 30)])
        );
        assert_eq!(parse_sizes(&bad), Err("1Q".into()));
    }

    #[test]
    fn a_size_that_is_not_one_is_refused() {
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size("12X"), None);
        assert_eq!(parse_size("99999999999G"), None);
    }
}
