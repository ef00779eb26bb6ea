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
//!
//! **`run-app`.** In an image that boots a root filesystem, `/init` also starts the app
//! through the agent: `squall-guest-agent run-app FILE ROOT` reads how to start it from FILE
//! (the initramfs's `/etc/squall/app`, see `app_launch.rs`), `chroot`s into ROOT (the overlay
//! `/init` mounted over the disk), changes to the app's working directory, and execs the
//! program with exactly the environment in FILE (plus `HOME` from the root's `/etc/passwd`,
//! or `/`, when FILE sets none) as the app's user and group, with the supplementary groups
//! FILE lists (those the image's `/etc/group` gives the user).
//! A program named without a `/` is looked up in the `PATH` of that environment (Docker's
//! default when there is none), as container runtimes do. Nothing is parsed by a shell. When
//! the app cannot be started, one `squall-guest:` line says why and the agent exits with
//! 125 (setting up failed), 126 (the program cannot be run) or 127 (no such program). The
//! standard library has `chroot`; setting the supplementary groups, the group and the user,
//! in that order, between fork and exec (`become_user`) takes three `unsafe` calls of libc,
//! because `CommandExt` can set no supplementary groups but none.

use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod app_launch;

use app_launch::AppLaunch;

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
    /// libc's `setgroups(2)`.
    fn setgroups(size: usize, list: *const u32) -> i32;
    /// libc's `setgid(2)`.
    fn setgid(gid: u32) -> i32;
    /// libc's `setuid(2)`.
    fn setuid(uid: u32) -> i32;
}

/// Becomes the app's user: its supplementary groups, then its group, then its user (the
/// order in which each step is still allowed). Runs in the child between fork and exec.
fn become_user(uid: u32, gid: u32, groups: &[u32]) -> std::io::Result<()> {
    // SAFETY: `groups` is a live slice of `groups.len()` gid_t (u32) values; setgroups,
    // setgid and setuid are async-signal-safe and touch no memory of ours.
    let failed = unsafe {
        setgroups(groups.len(), groups.as_ptr()) != 0 || setgid(gid) != 0 || setuid(uid) != 0
    };
    if failed {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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

/// The `PATH` a program is looked up in when the app's environment has none (Docker's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Starts the app described in `file` inside `root`; returns only with the exit status to
/// fail with, having said why.
fn run_app(file: &str, root: &str) -> i32 {
    let launch = match std::fs::read(file) {
        Ok(bytes) => match AppLaunch::decode(&bytes) {
            Ok(launch) => launch,
            Err(e) => {
                say(&format!("cannot start the app: {file}: {e}"));
                return 125;
            }
        },
        Err(e) => {
            say(&format!("cannot start the app: cannot read {file}: {e}"));
            return 125;
        }
    };
    if let Err(e) = std::os::unix::fs::chroot(root).and_then(|()| std::env::set_current_dir("/"))
    {
        say(&format!("cannot start the app: cannot chroot into {root}: {e}"));
        return 125;
    }
    let cwd = &launch.working_dir;
    // As container runtimes do, a working directory the image names but lacks is made.
    let _ = std::fs::create_dir_all(cwd);
    if let Err(e) = std::env::set_current_dir(cwd) {
        say(&format!(
            "cannot start the app: cannot enter its working directory {cwd}: {e}"
        ));
        return 125;
    }
    let mut env: Vec<(String, String)> = launch
        .env
        .iter()
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".to_owned(), home_of(launch.uid)));
    }
    let name = &launch.command[0];
    let program = if name.contains('/') {
        PathBuf::from(name)
    } else {
        let path = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
        match std::env::split_paths(path)
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
        {
            Some(program) => program,
            None => {
                say(&format!(
                    "cannot start the app: `{name}` not found in PATH {path}"
                ));
                return 127;
            }
        }
    };
    let (uid, gid, groups) = (launch.uid, launch.gid, launch.groups);
    let mut command = std::process::Command::new(&program);
    command
        .arg0(name)
        .args(&launch.command[1..])
        .env_clear()
        .envs(env);
    // SAFETY: the closure only makes the three system calls of `become_user`, which are
    // async-signal-safe, and allocates nothing (`groups` was built before).
    unsafe {
        command.pre_exec(move || become_user(uid, gid, &groups));
    }
    let error = command.exec();
    say(&format!(
        "cannot start the app: {}: {error}",
        program.display()
    ));
    match error.kind() {
        std::io::ErrorKind::NotFound => 127,
        _ => 126,
    }
}

/// A regular file someone may execute.
fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The home directory of `uid` in the (new) root's `/etc/passwd`, or `/`.
fn home_of(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && f[2].parse() == Ok(uid))
        .map_or_else(|| "/".to_owned(), |f| f[5].to_owned())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some("run-app") {
        let (Some(file), Some(root)) = (args.next(), args.next()) else {
            say("usage: squall-guest-agent run-app FILE ROOT");
            std::process::exit(125);
        };
        std::process::exit(run_app(&file, &root));
    }
    let poll = first
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
