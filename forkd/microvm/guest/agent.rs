//! `squall-guest-agent`: the guest side of RNG reseeding on restore. `build.rs` compiles it
//! into a static executable that every image carries as `/bin/squall-guest-agent`; `/init`
//! starts it before the app.
//!
//! A clone restored from the template's snapshot has the template's kernel RNG state, and on
//! QEMU's `microvm` machine nothing tells the guest it was restored (`vmgenid` is not
//! exposed there). The host gives every QEMU it starts (template, clone, cold boot) its own
//! clone id and its own 32 random bytes in fw_cfg, and fw_cfg reads reflect the QEMU the guest
//! runs in *now*. So the agent reads the clone id every few milliseconds (one descriptor, re-read at offset 0); when it is not what
//! it was (the guest now runs in a clone), it mixes the new seed into the kernel's input pool
//! (`RNDADDENTROPY`), forces the kernel CRNG to reseed from it (`RNDRESEEDCRNG`, Linux 4.17
//! and later), and prints `squall-guest: reseeded ID` on the console. The host waits for that
//! line before it calls the clone ready. It also reseeds once at boot, with the booting QEMU's
//! seed. A clone is never snapshotted again, so after reseeding in a clone the agent exits
//! and costs nothing more.
//!
//! It reads only fw_cfg files and takes no input from the app or the network.
//! Usage: `squall-guest-agent [POLL_MS]` (default 5; `/init` passes `image::AGENT_POLL_MS`).

use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::time::Duration;

const CLONE_ID: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/squall/clone_id/raw";
const SEED: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/squall/seed/raw";
/// The seed's size; the host writes exactly this many bytes.
const SEED_BYTES: usize = 32;

/// `_IOW('R', 0x03, int[2])`: mix bytes into the input pool and credit entropy.
const RNDADDENTROPY: u64 = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: u64 = 0x5207;

unsafe extern "C" {
    /// libc's `ioctl(2)`, linked statically with the rest of libc.
    fn ioctl(fd: i32, request: u64, ...) -> i32;
}

/// `struct rand_pool_info` with its buffer sized for one seed.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: i32,
    buf_size: i32,
    buf: [u8; SEED_BYTES],
}

fn reseed(seed: &[u8]) -> std::io::Result<()> {
    if seed.len() != SEED_BYTES || seed.iter().all(|&b| b == 0) {
        return Err(std::io::Error::other(format!(
            "{SEED}: expected {SEED_BYTES} random bytes, found {}",
            seed.len()
        )));
    }
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    let mut info = RandPoolInfo {
        entropy_count: (SEED_BYTES * 8) as i32,
        buf_size: SEED_BYTES as i32,
        buf: [0; SEED_BYTES],
    };
    info.buf.copy_from_slice(seed);
    // SAFETY: `urandom` is an open descriptor for the whole call; RNDADDENTROPY reads a
    // `struct rand_pool_info` whose `buf_size` (32) bytes of `buf` follow its two ints, which
    // is exactly `RandPoolInfo`'s `repr(C)` layout, and the kernel does not keep the pointer.
    let added = unsafe { ioctl(urandom.as_raw_fd(), RNDADDENTROPY, &raw const info) };
    info.buf.fill(0);
    if added != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `urandom` is an open descriptor; RNDRESEEDCRNG takes no argument.
    let reseeded = unsafe { ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) };
    if reseeded != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "squall-guest: {line}");
    let _ = out.flush();
}

fn main() {
    let poll = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .map_or(Duration::from_millis(5), Duration::from_millis);
    // One descriptor, read from offset 0 each time: a sysfs binary attribute is read through
    // to fw_cfg on every read, and under TCG each system call saved is CPU saved.
    let clone_id = match std::fs::File::open(CLONE_ID) {
        Ok(file) => file,
        Err(e) => {
            say(&format!("cannot read {CLONE_ID}: {e}"));
            return;
        }
    };
    let mut buf = [0u8; 256];
    let mut current: Option<Vec<u8>> = None;
    loop {
        match clone_id.read_at(&mut buf, 0).map(|n| buf[..n].to_vec()) {
            Ok(id) if current.as_ref() != Some(&id) => {
                let name = String::from_utf8_lossy(&id).trim().to_owned();
                let mut seed = std::fs::read(SEED).unwrap_or_default();
                let result = reseed(&seed);
                seed.fill(0);
                match result {
                    Ok(()) => say(&format!("reseeded {name}")),
                    Err(e) => say(&format!("cannot reseed the RNG for {name}: {e}")),
                }
                // A clone is never snapshotted again: nothing more to watch for. Sleep rather
                // than exit: under TCG every kernel path a clone runs for the first time is
                // translated into its own cache, and a process exit is a long one.
                if current.is_some() {
                    loop {
                        std::thread::park();
                    }
                }
                current = Some(id);
            }
            Ok(_) => {}
            Err(e) => {
                say(&format!("cannot read {CLONE_ID}: {e}"));
                return;
            }
        }
        std::thread::sleep(poll);
    }
}
