//! A writer for the `newc` cpio format that the Linux kernel unpacks as an
//! initramfs. Written by hand: the format is a 110-byte ASCII header per
//! entry, and the kernel accepts an uncompressed archive appended to a
//! compressed one, which is all the rig needs (no reading, no compression).

use std::collections::BTreeSet;
use std::io::{self, Write};

/// Appends entries to a `newc` archive; parent directories are emitted once,
/// before the first entry under them.
pub struct Writer<W: Write> {
    out: W,
    written: u64,
    dirs: BTreeSet<String>,
    ino: u32,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            dirs: BTreeSet::new(),
            ino: 0x7000_0000,
        }
    }

    /// A regular file at `path` (relative, no leading `/`) with `mode` bits.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.parents(path)?;
        self.entry(path, 0o100_000 | mode, data)
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.parents(path)?;
        self.entry(path, 0o120_777, target.as_bytes())
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            let dir = &path[..at + i];
            at += i + 1;
            if self.dirs.insert(dir.to_string()) {
                self.entry(dir, 0o040_755, &[])?;
            }
        }
        Ok(())
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.ino += 1;
        let namesize = name.len() + 1;
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            namesize,
            0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..n as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_parents_come_first() {
        let mut w = Writer::new(Vec::new());
        w.file("a/b/c.txt", 0o644, b"hello").unwrap();
        let out = w.finish().unwrap();

        let text = String::from_utf8_lossy(&out);
        let names: Vec<_> = ["a\0", "a/b\0", "a/b/c.txt\0", "TRAILER!!!\0"]
            .iter()
            .map(|n| text.find(n).unwrap())
            .collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(out.len() % 4, 0);
        assert_eq!(&out[..6], b"070701");
    }

    #[test]
    fn file_header_carries_mode_and_size() {
        let mut w = Writer::new(Vec::new());
        w.file("x", 0o755, b"12345").unwrap();
        let out = w.finish().unwrap();

        let mode = u32::from_str_radix(std::str::from_utf8(&out[14..22]).unwrap(), 16).unwrap();
        let size = u32::from_str_radix(std::str::from_utf8(&out[54..62]).unwrap(), 16).unwrap();
        assert_eq!(mode, 0o100_755);
        assert_eq!(size, 5);
        assert_eq!(&out[112..117], b"12345");
    }
}
