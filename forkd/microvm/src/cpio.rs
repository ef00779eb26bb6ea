//! A writer for the "newc" cpio format, the archive format of a Linux initramfs
//! (`Documentation/driver-api/early-userspace/buffer-format.rst` in the kernel sources).
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the
//! NUL-terminated name padded to four bytes, and the data padded to four bytes; the archive
//! ends with an entry named `TRAILER!!!`.

use std::io::{self, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes a newc archive entry by entry. Directories are not created implicitly: add each
/// parent before what it holds.
pub struct CpioWriter<W: Write> {
    out: W,
    next_inode: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_inode: 1,
            written: 0,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let name = if name.is_empty() { "." } else { name };
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is larger than 4 GiB"),
            )
        })?;
        let inode = self.next_inode;
        self.next_inode += 1;
        let header = format!(
            "070701{inode:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dev_major:08x}{dev_minor:08x}{rdev_major:08x}{rdev_minor:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            nlink = if mode & S_IFDIR != 0 { 2 } else { 1 },
            mtime = 0,
            dev_major = 0,
            dev_minor = 0,
            rdev_major = rdev.0,
            rdev_minor = rdev.1,
            namesize = name.len() + 1,
            check = 0,
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let fill = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0; 3][..fill])
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[])
    }

    /// Adds a regular file with `mode`'s permission bits.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (mode & 0o7777), (0, 0), data)
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (mode & 0o7777), (major, minor), &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_well_formed() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin").unwrap();
        w.file("/bin/hello", 0o755, b"hi\n").unwrap();
        w.symlink("/bin/sh", "busybox").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        // The first header: inode 1, a 0755 directory, name "bin" (4 bytes with its NUL).
        let header = std::str::from_utf8(&bytes[..110]).unwrap();
        assert_eq!(&header[6..14], "00000001");
        assert_eq!(&header[14..22], "000041ed");
        assert_eq!(&header[94..102], "00000004");
        assert_eq!(&bytes[110..114], b"bin\0");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/hello\0"));
        assert!(text.contains("hi\n"));
        assert!(text.contains("TRAILER!!!\0"));
    }
}
