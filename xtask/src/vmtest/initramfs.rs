//! The initramfs as a "newc" cpio archive (the format the kernel unpacks, see
//! Documentation/driver-api/early-userspace/buffer-format.rst), written without cpio(1).

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;

const DIRECTORY: u32 = 0o040000;
const REGULAR: u32 = 0o100000;
const CHARACTER_DEVICE: u32 = 0o020000;

/// An archive being built in memory (a few megabytes: busybox, an init script, some modules).
#[derive(Default)]
pub struct Archive {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl Archive {
    pub fn directory(&mut self, path: &str) {
        self.entry(path, DIRECTORY | 0o755, 0, &[]);
    }

    pub fn file(&mut self, path: &str, mode: u32, contents: &[u8]) {
        self.entry(path, REGULAR | mode, 0, contents);
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, CHARACTER_DEVICE | 0o600, (major << 8) | minor, &[]);
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: u32, contents: &[u8]) {
        self.next_inode += 1;
        let name = path.trim_start_matches('/');
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            if mode & DIRECTORY == DIRECTORY { 2 } else { 1 },
            0, // mtime
            contents.len() as u32,
            0, // devmajor
            0, // devminor
            rdev >> 8,
            rdev & 0xff,
            name.len() as u32 + 1,
            0, // check
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(contents);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    pub fn write(mut self, path: &Path) -> anyhow::Result<()> {
        self.entry("TRAILER!!!", 0, 0, &[]);
        let mut file = std::fs::File::create(path)
            .with_context(|| format!("creating the initramfs {}", path.display()))?;
        file.write_all(&self.bytes)
            .with_context(|| format!("writing the initramfs {}", path.display()))
    }

    #[cfg(test)]
    fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_newc_headers_padded_to_four_bytes() {
        let mut archive = Archive::default();
        archive.file("/init", 0o755, b"#!/bin/sh\n");
        let bytes = archive.into_bytes();
        assert_eq!(&bytes[..6], b"070701");
        // 6 + 13 * 8 header bytes, "init\0", padded to 4, then the 10 bytes of data, padded.
        assert_eq!(&bytes[110..115], b"init\0");
        assert_eq!(&bytes[116..126], b"#!/bin/sh\n");
        assert_eq!(bytes.len(), 128);
        let mode = u32::from_str_radix(std::str::from_utf8(&bytes[14..22]).unwrap(), 16).unwrap();
        assert_eq!(mode, 0o100755);
    }
}
