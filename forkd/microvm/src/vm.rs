//! Templates and clones.
//!
//! A **template** boots the image with its guest RAM in a shared file (`memory-backend-file`,
//! `share=on`), waits until the app answers its health check, optionally warms it with
//! requests, then pauses it and saves only the device state (`x-ignore-shared`: the RAM stays
//! in the file, the state file is a few tens of KB). The template's QEMU then exits; the RAM
//! file and the state file are the template.
//!
//! A **clone** is a new QEMU on the same machine model that maps the RAM file privately
//! (`share=off`: copy-on-write, so untouched pages stay shared with every other clone), waits
//! in `-incoming defer`, loads the device state and resumes. Each clone has its own user-mode
//! network stack forwarding its own host port (on [`VmConfig::clone_ip`]) to the guest's port
//! 80, and its clone id and a fresh random seed in fw_cfg.
//!
//! **A clone's RNG is its own before it is ready.** A restored guest starts with the
//! template's kernel CRNG state, and on the `microvm` machine QEMU's `vmgenid` device is
//! invisible to the guest (no ACPI description, no fw_cfg file), so the guest is never told it
//! was restored and would go on producing the template's random bytes until its reseed
//! interval (seconds to a minute) ran out. So every QEMU gets 32 bytes from the host's
//! `/dev/urandom` as the fw_cfg file `opt/squall/seed` (through a 0600 file, not the command
//! line, which every local user can read), and the guest agent (see [`crate::image`]) notices
//! that the clone id in fw_cfg changed, mixes the seed in, forces a CRNG reseed
//! (`RNDRESEEDCRNG`) and prints `squall-guest: reseeded ID`. After every resume of a restored
//! guest, the host waits for that line in the clone's console before anything else: before
//! the health check of a standby restored ahead of time, and before a clone is returned.
//! A clone is therefore never ready, and never answers a request of ours, before its kernel
//! RNG has been reseeded with fresh host entropy.

use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::image::{CLONE_ID_FW_CFG, GUEST_PORT, Image, RESEEDED_LINE, SEED_BYTES, SEED_FW_CFG};
use crate::qmp::{Qmp, QmpError};

/// fw_cfg entries keep the size they had when the guest booted, so every clone id is padded
/// to this width (the guest trims trailing spaces).
pub const CLONE_ID_WIDTH: usize = 64;

/// The fw_cfg file QEMU (9.2 and later) adds for `-kernel`: the kernel image, for UEFI
/// firmware. A clone, started without `-kernel`, gets a one-byte file of that name instead.
const BOOT_KERNEL_FW_CFG: &str = "etc/boot/kernel";

/// The clone id a template's guest boots with.
const TEMPLATE_ID: &str = "template";

/// The translation cache of a QEMU that boots a guest, in MiB, at least: with 16 MiB the
/// Debian kernel's boot refills it several times and takes a third longer.
const BOOT_TCG_CACHE_MIB: u32 = 32;

/// How the guest's CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software emulation, where KVM cannot run the guest.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Where and how microVMs run.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The firmware: qboot, which boots a kernel in milliseconds.
    pub bios: PathBuf,
    /// Guest RAM.
    pub memory_mib: u32,
    /// Where QMP sockets, state files and serial logs go.
    pub run_dir: PathBuf,
    /// Where RAM files go: a tmpfs, so clones map memory, not disk.
    pub ram_dir: PathBuf,
    /// How long a template may take to answer its health check.
    pub boot_timeout: Duration,
    /// How long KVM gets to show it can run the guest before TCG is used instead.
    pub kvm_trial: Duration,
    /// How long a clone may take to answer after it resumes.
    pub clone_timeout: Duration,
    /// The path the health check asks for; a 200 means ready.
    pub health_path: String,
    /// Force an accelerator instead of trying KVM first.
    pub accel: Option<Accel>,
    /// The translation cache size of a clone under TCG, in MiB (a booting guest gets at
    /// least 32): the largest part of a clone's private memory under TCG. A clone fills it with the host code of every guest path it runs
    /// (about 10 MiB once it has resumed and served, then slowly more) and it is never given
    /// back, so this is also the bound on that part of a clone's memory. Below the working
    /// set (about 10 MiB for a small web server) the cache is flushed and refilled again and
    /// again, and requests slow down by tens of milliseconds each time.
    pub tcg_cache_mib: u32,
    /// The host address clones (and cold boots) are reachable on: their host port is
    /// forwarded from this address to the guest's port 80, and it is the address
    /// [`VmClone::addr`] reports. Default loopback; a routable address (a pod IP) lets
    /// balancers elsewhere reach them. IPv4 only (QEMU's `hostfwd` takes no IPv6 host
    /// address). The template, which nobody outside reaches, always uses loopback.
    pub clone_ip: IpAddr,
    /// Let the host's same-page merging (KSM) merge identical pages across QEMU processes:
    /// every page of each QEMU (`PR_SET_MEMORY_MERGE`), not only guest RAM, which QEMU
    /// offers by default. Clones of one template hold many identical pages that copy-on-write
    /// cannot share (QEMU's own startup state, parts of its heap, pages the guests wrote
    /// alike); under TCG that is a fifth of a clone. It takes effect only where the host
    /// runs KSM (`/sys/kernel/mm/ksm/run` = 1), and merging happens in the background over
    /// seconds, not at clone time. Turn it off where templates of tenants who must not
    /// learn about each other's memory share a host: merged pages are a timing side channel
    /// between the processes that share them. Off also keeps guest RAM out of KSM.
    pub merge_memory: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            qemu: PathBuf::from("qemu-system-x86_64"),
            bios: PathBuf::from("/usr/share/qemu/qboot.rom"),
            memory_mib: 256,
            run_dir: std::env::temp_dir().join(format!("squall-vm-{}", std::process::id())),
            ram_dir: PathBuf::from("/dev/shm"),
            boot_timeout: Duration::from_secs(60),
            kvm_trial: Duration::from_secs(10),
            clone_timeout: Duration::from_secs(10),
            health_path: "/".to_owned(),
            accel: None,
            tcg_cache_mib: 16,
            clone_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            merge_memory: true,
        }
    }
}

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// QEMU could not be started.
    #[error("cannot start {qemu}: {source} (install Debian's qemu-system-x86)")]
    Spawn {
        /// The binary.
        qemu: String,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited before it should have.
    #[error("QEMU for {what} exited early ({status}); last console output:\n{console}")]
    Exited {
        /// The VM.
        what: String,
        /// Its exit status.
        status: String,
        /// The end of its serial console.
        console: String,
    },
    /// The app did not answer its health check in time.
    #[error(
        "{what}: the app did not answer GET {path} with 200 within {timeout:?}; last console output:\n{console}"
    )]
    Unhealthy {
        /// The VM.
        what: String,
        /// The health path.
        path: String,
        /// The time allowed.
        timeout: Duration,
        /// The end of its serial console.
        console: String,
    },
    /// A QMP exchange failed.
    #[error("{what}: {source}")]
    Qmp {
        /// The VM.
        what: String,
        /// The failure.
        #[source]
        source: QmpError,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// A restored guest did not report that its kernel RNG was reseeded.
    #[error(
        "{what}: the guest did not report reseeding its RNG (`{RESEEDED_LINE} {id}`) within {timeout:?} of resuming; is the image built by this version (its /init starts the guest agent)? Last console output:\n{console}"
    )]
    NotReseeded {
        /// The VM.
        what: String,
        /// The clone id the line must name.
        id: String,
        /// The time allowed.
        timeout: Duration,
        /// The end of its serial console.
        console: String,
    },
    /// A clone address QEMU cannot forward from.
    #[error(
        "clone address {0} is IPv6: QEMU's user-mode network forwards only from IPv4 host addresses"
    )]
    CloneIp(IpAddr),
    /// A name that cannot be used in file names.
    #[error("invalid name `{0}`: use 1 to 64 letters, digits, '-' or '_'")]
    Name(String),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |source| VmError::Io {
        path: path.to_owned(),
        source,
    }
}

fn check_name(name: &str) -> Result<(), VmError> {
    let ok = !name.is_empty()
        && name.len() <= CLONE_ID_WIDTH
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(VmError::Name(name.to_owned()))
    }
}

/// The clone address, if QEMU can forward from it.
fn check_clone_ip(ip: IpAddr) -> Result<IpAddr, VmError> {
    match ip {
        IpAddr::V4(_) => Ok(ip),
        IpAddr::V6(_) => Err(VmError::CloneIp(ip)),
    }
}

/// A port on `ip` nobody is listening on right now.
fn free_port(ip: IpAddr) -> Result<u16, VmError> {
    let at = PathBuf::from(SocketAddr::from((ip, 0)).to_string());
    let listener = TcpListener::bind((ip, 0)).map_err(io_at(&at))?;
    let port = listener.local_addr().map_err(io_at(&at))?.port();
    Ok(port)
}

/// Writes `SEED_BYTES` fresh bytes from the host's `/dev/urandom` to `path`, readable by
/// this user only: QEMU reads it into the fw_cfg file [`SEED_FW_CFG`] when it starts.
fn write_seed(path: &Path) -> Result<(), VmError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut seed = [0u8; SEED_BYTES];
    let urandom = Path::new("/dev/urandom");
    std::fs::File::open(urandom)
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(io_at(urandom))?;
    let _ = std::fs::remove_file(path);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(&seed));
    seed.fill(0);
    written.map_err(io_at(path))
}

/// Whether the console in `serial` has the agent's line saying the RNG was reseeded for `id`.
fn has_reseeded(serial: &Path, id: &str) -> bool {
    let Ok(text) = std::fs::read(serial) else {
        return false;
    };
    let want = format!("{RESEEDED_LINE} {id}");
    text.split(|&b| b == b'\n')
        .any(|line| line.trim_ascii() == want.as_bytes())
}

/// The last lines of a serial log, for error messages.
fn console_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

/// The host CPU's clock rate in kHz, from /proc/cpuinfo.
fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz")?.split(':').nth(1))?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

/// What trying KVM showed, once tried: whether it could run the guest. One trial per
/// process is enough; it takes seconds where KVM cannot run the guest.
static KVM_RUNS_GUESTS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Whether KVM is there to try.
fn kvm_available() -> bool {
    KVM_RUNS_GUESTS.get().copied().unwrap_or(true)
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

/// Whether identical pages of clones get merged on this host (see [`VmConfig::merge_memory`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryMerging {
    /// The kernel cannot mark a whole process mergeable (before Linux 6.4).
    Unsupported,
    /// The kernel can, but KSM does not run (`/sys/kernel/mm/ksm/run` is not 1).
    Off,
    /// KSM runs: identical pages of clones are merged in the background.
    On,
}

impl MemoryMerging {
    /// What this host does, from the kernel and `/sys/kernel/mm/ksm/run`.
    pub fn on_this_host() -> Self {
        // The prctl exists since 6.4, but only 6.7 and later keep it across exec.
        let keeps_across_exec = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .and_then(|release| kernel_version(&release))
            .is_some_and(|version| version >= (6, 7));
        if !keeps_across_exec || !kernel::memory_merge_supported() {
            Self::Unsupported
        } else if std::fs::read_to_string(KSM_RUN).is_ok_and(|run| run.trim() == "1") {
            Self::On
        } else {
            Self::Off
        }
    }
}

impl std::fmt::Display for MemoryMerging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unsupported => {
                "this kernel cannot merge whole QEMU processes (PR_SET_MEMORY_MERGE needs Linux \
                 6.7); clones share only the template's RAM"
            }
            Self::Off => {
                "KSM is off on this host, so clones share only the template's RAM; \
                 `echo 1 > /sys/kernel/mm/ksm/run` lets it merge their identical pages too"
            }
            Self::On => "KSM runs on this host: identical pages of clones get merged",
        })
    }
}

/// The major and minor version of a kernel release such as `6.18.44-fc-v657`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The host's KSM switch.
const KSM_RUN: &str = "/sys/kernel/mm/ksm/run";

/// The id of every QEMU's user-mode network.
const NETDEV: &str = "n0";

/// A unique suffix for this process's files.
fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

enum Ram<'a> {
    /// The template: the RAM file is created and written through.
    Shared(&'a Path),
    /// A clone: the RAM file is mapped privately, copy-on-write.
    Private(&'a Path),
}

struct Launch<'a> {
    config: &'a VmConfig,
    image: &'a Image,
    accel: Accel,
    ram: Ram<'a>,
    host_ip: IpAddr,
    port: u16,
    clone_id: &'a str,
    seed: &'a Path,
    qmp: &'a Path,
    serial: &'a Path,
    incoming: bool,
}

impl Launch<'_> {
    /// The QEMU command line. Every value is passed as its own argument; none goes through a
    /// shell. `setpriv --pdeathsig KILL` makes QEMU die with the process that started it.
    fn command(&self) -> Command {
        let c = self.config;
        let mut cmd = Command::new("setpriv");
        cmd.arg("--pdeathsig").arg("KILL").arg("--").arg(&c.qemu);
        let mem = format!("{}M", c.memory_mib);
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm".to_owned(), "host,-arch-capabilities"),
            // split-wx: the translation cache is a memfd mapped twice (written through one
            // mapping, run from the other) instead of one anonymous mapping that QEMU asks
            // to back with 2 MB huge pages, which rounded each clone's cache up by a
            // megabyte or two.
            Accel::Tcg => {
                // A booting guest runs far more distinct code than a clone does; it gets a
                // larger cache (it is one process, and gone once the template is saved).
                let mib = if self.incoming {
                    c.tcg_cache_mib
                } else {
                    c.tcg_cache_mib.max(BOOT_TCG_CACHE_MIB)
                };
                (format!("tcg,tb-size={mib},split-wx=on"), "max")
            }
        };
        let merge = if c.merge_memory { "on" } else { "off" };
        let ram = match self.ram {
            Ram::Shared(path) => format!(
                "memory-backend-file,id=mem,size={mem},mem-path={},share=on,merge={merge}",
                path.display()
            ),
            Ram::Private(path) => format!(
                "memory-backend-file,id=mem,size={mem},mem-path={},share=off,readonly=on,rom=off,merge={merge}",
                path.display()
            ),
        };
        let id = format!("{:<width$}", self.clone_id, width = CLONE_ID_WIDTH);
        // ioapic2=off: one IOAPIC and 8 virtio-mmio slots instead of 24, which is plenty
        // for one network device and costs every QEMU 0.7 MB less. x-option-roms=off: qboot
        // loads the kernel itself; the option ROM QEMU would add with -kernel is a fw_cfg
        // file, and a clone (started without -kernel) must list the same fw_cfg files as the
        // template, or the guest's clone id entry points at another file.
        cmd.args([
            "-M",
            "microvm,acpi=on,rtc=off,ioapic2=off,x-option-roms=off,memory-backend=mem",
            "-accel",
        ])
        .arg(accel)
        .args(["-cpu", cpu, "-smp", "1", "-m"])
        .arg(&mem)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-display",
            "none",
            "-bios",
        ])
        .arg(&c.bios);
        if self.incoming {
            // The guest numbered the fw_cfg files when it booted in the template, and QEMU
            // numbers them in name order: the clone must list the same names, or the guest's
            // clone id entry reads another file. The template's list has the kernel's file.
            cmd.arg("-fw_cfg")
                .arg(format!("name={BOOT_KERNEL_FW_CFG},string=0"));
        } else {
            // Only a booting guest needs them: QEMU keeps the whole kernel image in its own
            // memory for the firmware to load (8 MB of Debian's kernel, in every process), and
            // a clone's guest booted long ago, in the template.
            cmd.arg("-kernel")
                .arg(&self.image.kernel)
                .arg("-initrd")
                .arg(&self.image.initramfs)
                .arg("-append")
                .arg(self.kernel_command_line());
        }
        cmd.arg("-object")
            .arg(ram)
            .arg("-serial")
            .arg(format!("file:{}", self.serial.display()))
            .arg("-netdev")
            .arg(if self.incoming {
                // A clone's port is forwarded only once its guest has reseeded its RNG
                // (`Standby::forward_port`): until then nobody can reach its app.
                format!("user,id={NETDEV}")
            } else {
                format!(
                    "user,id={NETDEV},hostfwd=tcp:{}:{}-:{GUEST_PORT}",
                    self.host_ip, self.port
                )
            })
            .arg("-device")
            .arg(format!("virtio-net-device,netdev={NETDEV}"))
            .arg("-fw_cfg")
            .arg(format!("name={CLONE_ID_FW_CFG},string={id}"))
            // Template and clones list the same fw_cfg names (see above), each with its own
            // value; a file, because the command line is readable by every local user.
            .arg("-fw_cfg")
            .arg(format!("name={SEED_FW_CFG},file={}", self.seed.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", self.qmp.display()));
        if self.incoming {
            cmd.args(["-incoming", "defer"]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if c.merge_memory {
            // Set before setpriv's exec and kept across QEMU's. A pre-exec hook makes the
            // standard library fork (rather than posix_spawn) to start QEMU: a copy of this
            // process's page tables, small next to QEMU's own start.
            kernel::merge_memory_on_exec(cmd.as_std_mut());
        }
        cmd
    }

    /// The guest kernel's command line. Under TCG on a busy host the kernel can fail to
    /// calibrate the TSC against the PIT and then hang (microvm has no HPET or ACPI PM timer
    /// to fall back on), so the host's TSC rate, which TCG's guest TSC follows, is given.
    fn kernel_command_line(&self) -> String {
        let mut line = String::from("console=ttyS0 quiet panic=-1");
        if self.accel == Accel::Tcg
            && let Some(khz) = host_tsc_khz()
        {
            line.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
        }
        line
    }

    fn spawn(&self) -> Result<Child, VmError> {
        self.command().spawn().map_err(|source| VmError::Spawn {
            qemu: self.config.qemu.display().to_string(),
            source,
        })
    }
}

/// Asks `GET path` of `addr` once; true on a 200.
async fn answers_200(addr: SocketAddr, path: &str) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: squall-health\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.") && &head[9..12] == b"200")
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Polls `ready` every `every` until it holds; fails with [`VmError::Exited`] if QEMU exits
/// first, or with `late()` once `timeout` has passed.
async fn wait_for_guest<Ready: Future<Output = bool>>(
    child: &mut Child,
    what: &str,
    serial: &Path,
    timeout: Duration,
    every: Duration,
    mut ready: impl FnMut() -> Ready,
    late: impl FnOnce() -> VmError,
) -> Result<(), VmError> {
    let start = tokio::time::Instant::now();
    loop {
        if ready().await {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(VmError::Exited {
                what: what.to_owned(),
                status: exit_status(child, status).await,
                console: console_tail(serial),
            });
        }
        if start.elapsed() > timeout {
            return Err(late());
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until `addr` answers `GET path` with 200, QEMU exits, or `timeout` passes.
async fn wait_healthy(
    child: &mut Child,
    what: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    serial: &Path,
) -> Result<(), VmError> {
    let ready = || answers_200(addr, path);
    let late = || VmError::Unhealthy {
        what: what.to_owned(),
        path: path.to_owned(),
        timeout,
        console: console_tail(serial),
    };
    let every = Duration::from_millis(2);
    wait_for_guest(child, what, serial, timeout, every, ready, late).await
}

/// What `child` exited with, and the end of its stderr.
async fn exit_status(child: &mut Child, status: std::process::ExitStatus) -> String {
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr).await;
    }
    if stderr.is_empty() {
        status.to_string()
    } else {
        format!("{status}: {}", stderr.trim())
    }
}

/// Waits until the guest agent's line saying the RNG was reseeded for `id` is on the console,
/// QEMU exits, or `timeout` passes. The agent polls fw_cfg every
/// [`AGENT_POLL_MS`](crate::image::AGENT_POLL_MS) of guest time, so after a resume this takes
/// a few milliseconds.
async fn wait_reseeded(
    child: &mut Child,
    what: &str,
    id: &str,
    serial: &Path,
    timeout: Duration,
) -> Result<(), VmError> {
    let ready = || std::future::ready(has_reseeded(serial, id));
    let late = || VmError::NotReseeded {
        what: what.to_owned(),
        id: id.to_owned(),
        timeout,
        console: console_tail(serial),
    };
    let every = Duration::from_millis(1);
    wait_for_guest(child, what, serial, timeout, every, ready, late).await
}

/// A warm template: the RAM file and device state every clone starts from.
#[derive(Debug)]
pub struct Template {
    name: String,
    image: Image,
    config: VmConfig,
    accel: Accel,
    ram: PathBuf,
    state: PathBuf,
    /// Whether this template made the run directory (and so removes it, once empty).
    made_run_dir: bool,
}

impl Template {
    /// Boots `image`, waits for its app to answer, sends it `warm_requests` requests, and
    /// snapshots it. Tries KVM first when `/dev/kvm` is there (unless the config forces an
    /// accelerator) and falls back to TCG if the guest does not come up under it.
    pub async fn create(
        name: &str,
        image: &Image,
        config: &VmConfig,
        warm_requests: u32,
    ) -> Result<Self, VmError> {
        check_name(name)?;
        check_clone_ip(config.clone_ip)?;
        let made_run_dir = !config.run_dir.exists();
        std::fs::create_dir_all(&config.run_dir).map_err(io_at(&config.run_dir))?;
        let tag = format!("{name}-{}", unique());
        let mut template = Self {
            name: name.to_owned(),
            image: image.clone(),
            config: config.clone(),
            accel: Accel::Tcg,
            ram: config.ram_dir.join(format!("squall-{tag}.ram")),
            state: config.run_dir.join(format!("{tag}.state")),
            made_run_dir,
        };
        let tries: Vec<(Accel, Duration)> = match config.accel {
            Some(accel) => vec![(accel, config.boot_timeout)],
            None if kvm_available() => vec![
                (Accel::Kvm, config.kvm_trial),
                (Accel::Tcg, config.boot_timeout),
            ],
            None => {
                tracing::info!(
                    template = name,
                    "vm: /dev/kvm is not usable here; running guests under TCG"
                );
                vec![(Accel::Tcg, config.boot_timeout)]
            }
        };
        let mut last_error = None;
        for (accel, timeout) in tries {
            match template
                .boot_and_snapshot(accel, timeout, warm_requests)
                .await
            {
                Ok(()) => {
                    if accel == Accel::Kvm {
                        let _ = KVM_RUNS_GUESTS.set(true);
                    }
                    tracing::info!(template = name, %accel, "vm: template ready, running guests under {accel}");
                    if config.merge_memory {
                        let merging = MemoryMerging::on_this_host();
                        tracing::info!(template = name, "vm: {merging}");
                    }
                    template.accel = accel;
                    return Ok(template);
                }
                Err(e) => {
                    if accel == Accel::Kvm && config.accel.is_none() {
                        let _ = KVM_RUNS_GUESTS.set(false);
                        tracing::warn!(template = name, error = %e, "vm: KVM could not run the guest; falling back to TCG");
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| VmError::Name(name.to_owned())))
    }

    async fn boot_and_snapshot(
        &self,
        accel: Accel,
        timeout: Duration,
        warm_requests: u32,
    ) -> Result<(), VmError> {
        let what = format!("template {}", self.name);
        let qmp_path = self
            .config
            .run_dir
            .join(format!("{}-{}.qmp", self.name, unique()));
        let serial = self
            .config
            .run_dir
            .join(format!("{}-{}.console", self.name, unique()));
        let seed = self
            .config
            .run_dir
            .join(format!("{}-{}.seed", self.name, unique()));
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let port = free_port(loopback)?;
        write_seed(&seed)?;
        let spawned = Launch {
            config: &self.config,
            image: &self.image,
            accel,
            ram: Ram::Shared(&self.ram),
            host_ip: loopback,
            port,
            clone_id: TEMPLATE_ID,
            seed: &seed,
            qmp: &qmp_path,
            serial: &serial,
            incoming: false,
        }
        .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_file(&seed);
                return Err(e);
            }
        };
        let addr = SocketAddr::from((loopback, port));
        let result = async {
            wait_healthy(
                &mut child,
                &what,
                addr,
                &self.config.health_path,
                timeout,
                &serial,
            )
            .await?;
            // The agent reseeded at boot, before the app started; this shows it works here
            // before any clone depends on it.
            wait_reseeded(
                &mut child,
                &what,
                TEMPLATE_ID,
                &serial,
                Duration::from_secs(5),
            )
            .await?;
            for _ in 0..warm_requests {
                answers_200(addr, &self.config.health_path).await;
            }
            let qmp_err = |source| VmError::Qmp {
                what: what.clone(),
                source,
            };
            let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(5))
                .await
                .map_err(qmp_err)?;
            qmp.execute("stop", None).await.map_err(qmp_err)?;
            qmp.ignore_shared_ram().await.map_err(qmp_err)?;
            let uri = format!("file:{}", self.state.display());
            qmp.execute("migrate", Some(json!({ "uri": uri })))
                .await
                .map_err(qmp_err)?;
            qmp.wait_for_migration(Duration::from_secs(30))
                .await
                .map_err(qmp_err)?;
            let _ = qmp.execute("quit", None).await;
            Ok(())
        }
        .await;
        let _ = child.kill().await;
        let _ = std::fs::remove_file(&qmp_path);
        let _ = std::fs::remove_file(&serial);
        let _ = std::fs::remove_file(&seed);
        if result.is_err() {
            let _ = std::fs::remove_file(&self.ram);
            let _ = std::fs::remove_file(&self.state);
        }
        result
    }

    /// The template's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The accelerator its guests run under.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The image the template booted.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The RAM file clones map.
    pub fn ram_path(&self) -> &Path {
        &self.ram
    }

    /// Starts a QEMU for clone `id`, ready to receive the template's state: the slow part of
    /// a clone, which a pool does ahead of time.
    pub async fn launch(&self, id: &str) -> Result<Standby, VmError> {
        check_name(id)?;
        let tag = format!("{id}-{}", unique());
        let qmp_path = self.config.run_dir.join(format!("{tag}.qmp"));
        let serial = self.config.run_dir.join(format!("{tag}.console"));
        let seed = self.config.run_dir.join(format!("{tag}.seed"));
        let ip = check_clone_ip(self.config.clone_ip)?;
        // The template's state file keeps the directory while the template lives; this
        // only matters if someone removed it under us.
        std::fs::create_dir_all(&self.config.run_dir).map_err(io_at(&self.config.run_dir))?;
        write_seed(&seed)?;
        let spawned = Launch {
            config: &self.config,
            image: &self.image,
            accel: self.accel,
            ram: Ram::Private(&self.ram),
            host_ip: ip,
            // A clone's port is chosen and forwarded once its guest has reseeded.
            port: 0,
            clone_id: id,
            seed: &seed,
            qmp: &qmp_path,
            serial: &serial,
            incoming: true,
        }
        .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_file(&seed);
                return Err(e);
            }
        };
        let mut clone = VmClone {
            id: id.to_owned(),
            // Port 0 until `forward_port`: nothing reads the address before the clone starts.
            addr: SocketAddr::from((ip, 0)),
            child,
            files: vec![qmp_path.clone(), serial, seed.clone()],
        };
        let what = format!("clone {id}");
        let qmp = async {
            let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(10)).await?;
            qmp.ignore_shared_ram().await?;
            Ok::<_, QmpError>(qmp)
        }
        .await;
        // QEMU read the seed into fw_cfg before its monitor answered: the file is not needed.
        let _ = std::fs::remove_file(&seed);
        match qmp {
            Ok(qmp) => Ok(Standby {
                clone,
                qmp,
                restored: false,
            }),
            Err(source) => {
                if let Ok(Some(status)) = clone.child.try_wait() {
                    return Err(VmError::Exited {
                        what,
                        status: status.to_string(),
                        console: console_tail(&clone.files[1]),
                    });
                }
                Err(VmError::Qmp { what, source })
            }
        }
    }

    /// Clones the template: launch, restore, resume, and wait until the app answers.
    pub async fn clone_vm(&self, id: &str) -> Result<VmClone, VmError> {
        self.launch(id).await?.start(self).await
    }
}

impl Drop for Template {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ram);
        let _ = std::fs::remove_file(&self.state);
        if self.made_run_dir {
            // Only once empty: this fails, harmlessly, while clones or other templates still
            // have files in it (a clone outliving its template leaves the directory behind).
            let _ = std::fs::remove_dir(&self.config.run_dir);
        }
    }
}

/// Boots `image` from scratch, with nothing shared: the cold start every clone is compared
/// with. Returns once the app answers its health check.
pub async fn boot_cold(
    image: &Image,
    config: &VmConfig,
    accel: Accel,
    id: &str,
) -> Result<VmClone, VmError> {
    check_name(id)?;
    std::fs::create_dir_all(&config.run_dir).map_err(io_at(&config.run_dir))?;
    let tag = format!("{id}-{}", unique());
    let qmp_path = config.run_dir.join(format!("{tag}.qmp"));
    let serial = config.run_dir.join(format!("{tag}.console"));
    let ram = config.ram_dir.join(format!("squall-cold-{tag}.ram"));
    let seed = config.run_dir.join(format!("{tag}.seed"));
    let ip = check_clone_ip(config.clone_ip)?;
    let port = free_port(ip)?;
    write_seed(&seed)?;
    let spawned = Launch {
        config,
        image,
        accel,
        ram: Ram::Shared(&ram),
        host_ip: ip,
        port,
        clone_id: id,
        seed: &seed,
        qmp: &qmp_path,
        serial: &serial,
        incoming: false,
    }
    .spawn();
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let _ = std::fs::remove_file(&seed);
            return Err(e);
        }
    };
    let mut vm = VmClone {
        id: id.to_owned(),
        addr: SocketAddr::from((ip, port)),
        child,
        files: vec![qmp_path, serial.clone(), ram, seed],
    };
    let what = format!("cold boot {id}");
    wait_healthy(
        &mut vm.child,
        &what,
        vm.addr,
        &config.health_path,
        config.boot_timeout,
        &serial,
    )
    .await?;
    Ok(vm)
}

/// A QEMU started for a clone and waiting for the template's state.
#[derive(Debug)]
pub struct Standby {
    clone: VmClone,
    qmp: Qmp,
    /// The template's state is loaded and the guest has run and answered once, then been
    /// paused: only `cont` is left.
    restored: bool,
}

impl Standby {
    /// The clone id it was launched for.
    pub fn id(&self) -> &str {
        &self.clone.id
    }

    /// Whether the template's state is already loaded (see [`Standby::restore_paused`]).
    pub fn is_restored(&self) -> bool {
        self.restored
    }

    fn what(&self) -> String {
        format!("clone {}", self.clone.id)
    }

    /// Stops its QEMU and removes its files, returning once the process is gone.
    pub async fn kill(self) {
        self.clone.kill().await;
    }

    async fn restore_and_run(&mut self, template: &Template) -> Result<(), VmError> {
        let what = self.what();
        let qmp_err = |source| VmError::Qmp {
            what: what.clone(),
            source,
        };
        let uri = format!("file:{}", template.state.display());
        self.qmp
            .execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map_err(qmp_err)?;
        self.qmp
            .wait_for_migration(Duration::from_secs(10))
            .await
            .map_err(qmp_err)?;
        self.resume_and_wait(template).await
    }

    async fn resume_and_wait(&mut self, template: &Template) -> Result<(), VmError> {
        let what = self.what();
        self.qmp
            .execute("cont", None)
            .await
            .map_err(|source| VmError::Qmp {
                what: what.clone(),
                source,
            })?;
        let serial = self.clone.files[1].clone();
        // Before anything talks to the guest: its RNG must be its own first.
        wait_reseeded(
            &mut self.clone.child,
            &what,
            &self.clone.id,
            &serial,
            template.config.clone_timeout,
        )
        .await?;
        self.forward_port().await?;
        wait_healthy(
            &mut self.clone.child,
            &what,
            self.clone.addr,
            &template.config.health_path,
            template.config.clone_timeout,
            &serial,
        )
        .await
    }

    /// Makes the guest reachable on a free port of the clone address, which becomes the
    /// clone's address. A port found free can be taken before QEMU binds it; then another is
    /// tried (three times at most).
    async fn forward_port(&mut self) -> Result<(), VmError> {
        let ip = self.clone.addr.ip();
        let mut tries = 0;
        loop {
            let addr = SocketAddr::from((ip, free_port(ip)?));
            match self.qmp.forward_port(NETDEV, addr, GUEST_PORT).await {
                Ok(()) => {
                    self.clone.addr = addr;
                    return Ok(());
                }
                Err(QmpError::Command { ref desc, .. })
                    if tries < 3 && desc.contains("Could not set up host forwarding rule") =>
                {
                    tracing::debug!(clone = %self.clone.id, %addr, "vm: port taken before QEMU bound it, trying another");
                    tries += 1;
                }
                Err(source) => {
                    return Err(VmError::Qmp {
                        what: self.what(),
                        source,
                    });
                }
            }
        }
    }

    /// Loads the template's state, lets the guest answer its health check once, and pauses
    /// it again. Under TCG most of a clone's start-up is QEMU translating the guest's code
    /// anew in each process; doing that here, ahead of time, leaves only `cont` for the clone.
    /// The clone's identity is already its own: its clone id and seed are in fw_cfg, and the
    /// guest has reported reseeding its kernel RNG with that seed before its health check was
    /// sent, so the paused guest needs nothing more than `cont`.
    pub async fn restore_paused(&mut self, template: &Template) -> Result<(), VmError> {
        if self.restored {
            return Ok(());
        }
        self.restore_and_run(template).await?;
        let what = self.what();
        self.qmp
            .execute("stop", None)
            .await
            .map_err(|source| VmError::Qmp { what, source })?;
        self.restored = true;
        Ok(())
    }

    /// Makes it a running clone: loads the template's state (unless already loaded), resumes
    /// the guest and waits until its app answers. A restored standby's app answered before
    /// it was paused, so resuming it is enough: waiting for another answer would only add a
    /// round trip (and, with many clones resuming at once, load) to the critical path.
    pub async fn start(mut self, template: &Template) -> Result<VmClone, VmError> {
        if self.restored {
            let what = self.what();
            self.qmp
                .execute("cont", None)
                .await
                .map_err(|source| VmError::Qmp { what, source })?;
        } else {
            self.restore_and_run(template).await?;
        }
        Ok(self.clone)
    }
}

/// A running clone. Dropping it kills its QEMU and removes its files; [`VmClone::kill`] does
/// the same and waits for the process to be gone.
#[derive(Debug)]
pub struct VmClone {
    id: String,
    addr: SocketAddr,
    child: Child,
    files: Vec<PathBuf>,
}

impl VmClone {
    /// Its clone id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where its app answers.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The QEMU process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether QEMU has exited (the guest crashed or powered off).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Proportional set size of its QEMU in bytes: private memory plus a fair share of what
    /// it shares with the template's other clones.
    pub fn pss_bytes(&self) -> Result<u64, VmError> {
        let pid = self.pid().ok_or_else(|| VmError::Io {
            path: PathBuf::from("/proc"),
            source: std::io::Error::other("the clone has exited"),
        })?;
        let path = PathBuf::from(format!("/proc/{pid}/smaps_rollup"));
        let text = std::fs::read_to_string(&path).map_err(io_at(&path))?;
        let kb = text
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| VmError::Io {
                path: path.clone(),
                source: std::io::Error::other("no Pss line"),
            })?;
        Ok(kb * 1024)
    }

    /// Stops QEMU and removes every file it used.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
        self.remove_files();
    }

    fn remove_files(&mut self) {
        for file in self.files.drain(..) {
            let _ = std::fs::remove_file(file);
        }
    }
}

impl Drop for VmClone {
    fn drop(&mut self) {
        // kill_on_drop reaps the process; the files are ours to remove.
        let _ = self.child.start_kill();
        self.remove_files();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arguments of the QEMU command line `config` gives a clone.
    fn clone_args(config: &VmConfig) -> Vec<String> {
        let image = Image {
            kernel: "/boot/vmlinuz".into(),
            initramfs: "/tmp/initramfs.img".into(),
            kernel_release: "6.1.0".into(),
            app: "/bin/app".into(),
        };
        let launch = Launch {
            config,
            image: &image,
            accel: Accel::Tcg,
            ram: Ram::Private(Path::new("/dev/shm/t.ram")),
            host_ip: config.clone_ip,
            port: 8080,
            clone_id: "c1",
            seed: Path::new("/run/seed"),
            qmp: Path::new("/run/qmp"),
            serial: Path::new("/run/serial"),
            incoming: true,
        };
        let command = launch.command();
        command
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn memory_merging_is_on_by_default_and_can_be_turned_off() {
        let backend = |args: Vec<String>| {
            args.into_iter()
                .find(|a| a.starts_with("memory-backend-file"))
                .unwrap()
        };
        let on = backend(clone_args(&VmConfig::default()));
        assert!(on.contains("share=off") && on.contains(",merge=on"), "{on}");
        let off = backend(clone_args(&VmConfig {
            merge_memory: false,
            ..VmConfig::default()
        }));
        assert!(off.contains(",merge=off"), "{off}");
    }

    #[test]
    fn a_clone_starts_with_no_port_forwarded() {
        let args = clone_args(&VmConfig::default());
        let netdev = args.iter().find(|a| a.starts_with("user,")).unwrap();
        assert_eq!(netdev, &format!("user,id={NETDEV}"));
    }

    #[test]
    fn kernel_versions_are_read_from_the_release() {
        assert_eq!(kernel_version("6.18.44-fc-v657\n"), Some((6, 18)));
        assert_eq!(kernel_version("6.1.0-56-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("6.7"), Some((6, 7)));
        assert_eq!(kernel_version("garbage"), None);
    }
}
