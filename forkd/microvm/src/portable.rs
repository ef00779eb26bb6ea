//! Portable snapshots: a template written as one stream that a host which never booted the
//! image turns into a template of its own, ready to clone (SnowFlock's VM descriptor shipped
//! to another host, done with stock QEMU).
//!
//! A template is its device state and its RAM file (see [`crate::template`]); a restore needs
//! nothing else of the image but its root filesystem disk, if it has one. So the stream is:
//!
//! ```text
//! magic "SQSNAP\0\x01"
//! u32 n, then n bytes of JSON: the SnapshotHeader (≤ 64 KiB)
//! u64 n, then n bytes: the device state (≤ 64 MiB)
//! RAM runs, each: u64 offset, u32 length, u32 n, then n bytes: zstd of `length` bytes of
//!     guest RAM at `offset` (page-aligned, non-zero pages only, ≤ 1 MiB a run)
//! u64 u64::MAX, u32 0, u32 0: the end of the RAM
//! 32 bytes: SHA-256 of every byte before them
//! ```
//!
//! (integers little-endian). Pages that are all zero are not sent: the receiver's RAM file is
//! sparse and reads them as zero, as the template's did. The disk is not sent either: the
//! receiver builds it from its own copy of the container image, and the header's digest must
//! match. The header also says what the guest was saved on ([`Compatibility`]: QEMU's
//! version, the machine, the accelerator, the CPU and its TSC rate); a receiver on anything
//! else refuses the stream before it writes a byte of RAM, with what differs.
//!
//! Both ends are bounded in memory: the writer reads and compresses one run at a time, the
//! reader decompresses one run at a time straight into the RAM file. The reader checks every
//! length before it reads, and the digest at the end: a stream cut short, corrupted, or with
//! anything after its digest is an error, and [`Template::import`](crate::Template::import) then removes what it wrote.

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::VmConfig;
use crate::host::{self, Accel};
use crate::image::Image;

/// The media type of the stream, for HTTP.
pub const CONTENT_TYPE: &str = "application/vnd.squall.vm-snapshot";

/// What every stream starts with: the format's name and version.
const MAGIC: &[u8; 8] = b"SQSNAP\x00\x01";
/// The guest's page size: RAM is sent in whole pages.
const PAGE: usize = 4096;
/// The most RAM one run holds, and so the most either end holds in memory at once.
const RUN_BYTES: usize = 1 << 20;
/// The largest header accepted.
const MAX_HEADER: usize = 64 << 10;
/// The largest device state accepted (a template's is tens of KB).
const MAX_STATE: u64 = 64 << 20;
/// The offset that ends the RAM runs.
const END: u64 = u64::MAX;
/// zstd's level: its fastest, which still shrinks a guest's pages several times.
const LEVEL: i32 = 1;
/// How far two hosts' TSC rates may differ (in thousandths) before a restore warns that the
/// guest's clock may drift: a guest under TCG was told the rate of the host it booted on.
const TSC_TOLERANCE_PER_MILLE: u64 = 10;

/// What a guest was saved on; a host restores it only where all of it is the same.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compatibility {
    /// QEMU's version line (`qemu-system-x86_64 --version`): the device state's format and
    /// TCG's `max` CPU are QEMU's own.
    pub qemu: String,
    /// How the guest's CPU ran.
    pub accel: Accel,
    /// The CPU the guest saw: QEMU's model under TCG; under KVM the host's CPU model and a
    /// digest of its feature flags (`-cpu host` passes them through).
    pub cpu: String,
    /// The machine's options as a restore's command line gives them, without file names.
    pub machine: Vec<String>,
    /// The host's TSC rate in kHz, if known: a difference is logged, not refused.
    pub tsc_khz: Option<u64>,
    /// The root filesystem disk's digest, if the image boots one.
    pub rootfs: Option<String>,
}

/// Why a snapshot cannot be restored here: the first thing that differs.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
#[displaydoc("the snapshot was saved with {what} {peer:?}, but here it is {here:?}")]
pub struct Incompatible {
    /// What differs.
    pub what: &'static str,
    /// The snapshot's.
    pub peer: String,
    /// This host's.
    pub here: String,
}

impl Compatibility {
    /// What a guest of `image` under `accel` with `config` is saved on, on this host.
    pub fn here(config: &VmConfig, image: &Image, accel: Accel) -> io::Result<Self> {
        Ok(Self {
            qemu: qemu_version(&config.qemu)?,
            accel,
            cpu: match accel {
                Accel::Tcg => "max".to_owned(),
                Accel::Kvm => host_cpu()?,
            },
            machine: crate::command_line::machine_fingerprint(config, image, accel),
            tsc_khz: host::tsc_khz(),
            rootfs: image.rootfs.as_ref().map(|r| r.digest.clone()),
        })
    }

    /// Checks that a guest saved on `peer` can be restored here (`self`).
    pub fn check(&self, peer: &Compatibility) -> Result<(), Incompatible> {
        let differ = |what, peer: String, here: String| Err(Incompatible { what, peer, here });
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "none".to_owned());
        if peer.qemu != self.qemu {
            return differ("QEMU", peer.qemu.clone(), self.qemu.clone());
        }
        if peer.accel != self.accel {
            return differ(
                "accelerator",
                peer.accel.to_string(),
                self.accel.to_string(),
            );
        }
        if peer.cpu != self.cpu {
            return differ("CPU", peer.cpu.clone(), self.cpu.clone());
        }
        if peer.machine != self.machine {
            return differ("machine", peer.machine.join(" "), self.machine.join(" "));
        }
        if peer.rootfs != self.rootfs {
            return differ("root filesystem", opt(&peer.rootfs), opt(&self.rootfs));
        }
        // Not a refusal: where the CPU's clock scales, the rate read from /proc/cpuinfo moves
        // by more than any tolerance on one and the same host. A guest on a host whose TSC
        // really differs keeps running; its clock drifts by the difference.
        if let (Some(theirs), Some(ours)) = (peer.tsc_khz, self.tsc_khz)
            && u128::from(theirs.abs_diff(ours)) * 1000
                > u128::from(TSC_TOLERANCE_PER_MILLE) * u128::from(theirs)
        {
            tracing::warn!(
                peer_khz = theirs,
                here_khz = ours,
                "vm: the snapshot's host had another TSC rate: the guest's clock may drift here"
            );
        }
        Ok(())
    }
}

/// QEMU's version line, from `qemu --version`.
fn qemu_version(qemu: &Path) -> io::Result<String> {
    let out = std::process::Command::new(qemu)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().next() {
        Some(line) if out.status.success() && !line.is_empty() => Ok(line.trim().to_owned()),
        _ => Err(io::Error::other(format!(
            "{} --version said nothing usable ({})",
            qemu.display(),
            out.status
        ))),
    }
}

/// The host CPU as `-cpu host` shows it to a guest: its model and a digest of its flags.
fn host_cpu() -> io::Result<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo")?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| {
                let (key, value) = l.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let mut flags: Vec<String> = field("flags")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    flags.sort();
    let digest = Sha256::digest(flags.join(" ").as_bytes());
    Ok(format!(
        "{} (flags {})",
        field("model name"),
        hex(&digest[..8])
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first part of a stream: what the template is and what it was saved on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// The template's name on the host that wrote it.
    pub template: String,
    /// What it was saved on.
    pub compat: Compatibility,
    /// Its image as the writer had it (file names are the writer's).
    pub image: Image,
    /// The RAM file's size: the guest's memory.
    pub ram_bytes: u64,
    /// Whatever the writer's caller adds (forkd: the template's spec).
    pub annotations: serde_json::Value,
}

/// What a transfer moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStats {
    /// Bytes of the whole stream.
    pub stream_bytes: u64,
    /// Bytes of guest RAM sent (its non-zero pages), before compression.
    pub ram_bytes: u64,
    /// The same pages, compressed.
    pub compressed_bytes: u64,
    /// The device state's bytes.
    pub state_bytes: u64,
}

/// Why a snapshot could not be read.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ReadError {
    /// the stream broke off or could not be read
    Io(#[from] io::Error),
    /// this is not a Squall vm snapshot (or one of another format version)
    Magic,
    /// the snapshot is corrupt: {0}
    Corrupt(String),
    /// the snapshot cannot be restored here
    Incompatible(#[from] Incompatible),
    /// the snapshot was refused: {0}
    Refused(String),
    /// cannot write {path}
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Writes the snapshot made of `state` and `ram` to `out`, described by `header`.
pub(crate) fn write(
    header: &SnapshotHeader,
    state: &Path,
    ram: &Path,
    out: impl Write,
) -> io::Result<TransferStats> {
    let mut out = Hashing::new(out);
    let mut stats = TransferStats::default();
    out.write_all(MAGIC)?;
    let json = serde_json::to_vec(header).map_err(io::Error::other)?;
    let len = u32::try_from(json.len()).map_err(io::Error::other)?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&json)?;
    let state = std::fs::read(state)?;
    stats.state_bytes = state.len() as u64;
    out.write_all(&stats.state_bytes.to_le_bytes())?;
    out.write_all(&state)?;
    let mut ram = std::fs::File::open(ram)?;
    let mut compressor = zstd::bulk::Compressor::new(LEVEL)?;
    let mut buf = vec![0u8; RUN_BYTES];
    let mut at = 0u64;
    loop {
        let n = read_full(&mut ram, &mut buf)?;
        if n == 0 {
            break;
        }
        // Runs of non-zero pages within this block (a partial last page counts as a page).
        let pages = buf[..n].chunks(PAGE).collect::<Vec<_>>();
        let mut page = 0;
        while page < pages.len() {
            if is_zero(pages[page]) {
                page += 1;
                continue;
            }
            let first = page;
            while page < pages.len() && !is_zero(pages[page]) {
                page += 1;
            }
            let start = first * PAGE;
            let end = (page * PAGE).min(n);
            let packed = compressor.compress(&buf[start..end])?;
            out.write_all(&(at + start as u64).to_le_bytes())?;
            out.write_all(
                &u32::try_from(end - start)
                    .map_err(io::Error::other)?
                    .to_le_bytes(),
            )?;
            out.write_all(
                &u32::try_from(packed.len())
                    .map_err(io::Error::other)?
                    .to_le_bytes(),
            )?;
            out.write_all(&packed)?;
            stats.ram_bytes += (end - start) as u64;
            stats.compressed_bytes += packed.len() as u64;
        }
        at += n as u64;
    }
    out.write_all(&END.to_le_bytes())?;
    out.write_all(&[0; 8])?;
    let (mut inner, digest, written) = out.finish();
    inner.write_all(&digest)?;
    inner.flush()?;
    stats.stream_bytes = written + digest.len() as u64;
    Ok(stats)
}

/// Reads a snapshot from `input` into a new `state` file and a new sparse `ram` file (both
/// 0600). `accept` sees the header first and refuses it with a reason, or returns what this
/// host is, which the header's [`Compatibility`] must match. On error the caller removes
/// the files.
pub(crate) fn read(
    input: impl Read,
    accept: impl FnOnce(&SnapshotHeader) -> Result<Compatibility, ReadError>,
    state: &Path,
    ram: &Path,
) -> Result<(SnapshotHeader, TransferStats), ReadError> {
    let mut input = Hashing::new(input);
    let mut stats = TransferStats::default();
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(ReadError::Magic);
    }
    let len = u32::from_le_bytes(array(&mut input)?) as usize;
    if len > MAX_HEADER {
        return Err(ReadError::Corrupt(format!("a header of {len} bytes")));
    }
    let mut json = vec![0u8; len];
    input.read_exact(&mut json)?;
    let header: SnapshotHeader = serde_json::from_slice(&json)
        .map_err(|e| ReadError::Corrupt(format!("its header: {e}")))?;
    let here = accept(&header)?;
    here.check(&header.compat)?;
    let state_len = u64::from_le_bytes(array(&mut input)?);
    if state_len > MAX_STATE {
        return Err(ReadError::Corrupt(format!("a state of {state_len} bytes")));
    }
    let written = |path: &Path| {
        let path = path.to_owned();
        move |source| ReadError::Write { path, source }
    };
    let mut state_file = create_private(state).map_err(written(state))?;
    let mut left = state_len;
    let mut piece = vec![0u8; 64 << 10];
    while left > 0 {
        let n = piece.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        input.read_exact(&mut piece[..n])?;
        state_file.write_all(&piece[..n]).map_err(written(state))?;
        left -= n as u64;
    }
    stats.state_bytes = state_len;
    let ram_file = create_private(ram).map_err(written(ram))?;
    ram_file.set_len(header.ram_bytes).map_err(written(ram))?;
    let mut decompressor = zstd::bulk::Decompressor::new()?;
    let mut packed = Vec::new();
    let mut buf = vec![0u8; RUN_BYTES];
    // Runs come in order and never overlap: the RAM is written at most once, so a peer
    // cannot keep a reader busy beyond the size of the guest's memory.
    let mut next = 0u64;
    loop {
        let offset = u64::from_le_bytes(array(&mut input)?);
        let length = u32::from_le_bytes(array(&mut input)?) as usize;
        let n = u32::from_le_bytes(array(&mut input)?) as usize;
        if offset == END && length == 0 && n == 0 {
            break;
        }
        let fits = offset
            .checked_add(length as u64)
            .is_some_and(|e| e <= header.ram_bytes);
        if offset % PAGE as u64 != 0 || offset < next || length == 0 || length > RUN_BYTES || !fits
        {
            return Err(ReadError::Corrupt(format!(
                "a RAM run of {length} bytes at {offset} (the RAM is {} bytes, the last run ended at {next})",
                header.ram_bytes
            )));
        }
        if n > zstd::zstd_safe::compress_bound(RUN_BYTES) {
            return Err(ReadError::Corrupt(format!("a compressed run of {n} bytes")));
        }
        packed.resize(n, 0);
        input.read_exact(&mut packed)?;
        let unpacked = decompressor
            .decompress_to_buffer(&packed, &mut buf[..length])
            .map_err(|e| ReadError::Corrupt(format!("a RAM run at {offset}: {e}")))?;
        if unpacked != length {
            return Err(ReadError::Corrupt(format!(
                "a RAM run at {offset} of {unpacked} bytes, not {length}"
            )));
        }
        ram_file
            .write_all_at(&buf[..length], offset)
            .map_err(written(ram))?;
        stats.ram_bytes += length as u64;
        stats.compressed_bytes += n as u64;
        next = offset + length as u64;
    }
    let (mut inner, digest, read) = input.finish();
    let mut theirs = [0u8; 32];
    inner.read_exact(&mut theirs)?;
    if theirs != digest {
        return Err(ReadError::Corrupt(
            "its digest does not match its bytes".to_owned(),
        ));
    }
    if inner.read(&mut [0u8; 1])? != 0 {
        return Err(ReadError::Corrupt("bytes after its digest".to_owned()));
    }
    stats.stream_bytes = read + digest.len() as u64;
    Ok((header, stats))
}

/// A new file only this user may read, failing if it exists.
fn create_private(path: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

fn array<const N: usize>(input: &mut impl Read) -> io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    input.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Reads until `buf` is full or the file ends; returns how much was read.
fn read_full(file: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Whether a page is all zero (no early exit: the loop vectorizes).
fn is_zero(page: &[u8]) -> bool {
    page.iter().fold(0u8, |any, &b| any | b) == 0
}

/// A reader or writer that hashes every byte through it.
struct Hashing<T> {
    inner: T,
    hash: Sha256,
    bytes: u64,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
            bytes: 0,
        }
    }

    /// The inner reader or writer, the digest so far and how many bytes it covers.
    fn finish(self) -> (T, [u8; 32], u64) {
        (self.inner, self.hash.finalize().into(), self.bytes)
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests;
