//! The QEMU command line, built in one place for every kind of QEMU this crate starts.
//!
//! There are two shapes. A **boot** starts the image's kernel with guest RAM written through
//! to a file (`share=on`) and the app's port forwarded from the start: a template's boot, and
//! a cold boot. A **restore** maps a template's RAM file privately (`share=off`: copy-on-write)
//! and waits in `-incoming defer` for the template's device state, with no port forwarded
//! until the guest has reseeded its RNG. Both must present the same machine to the guest —
//! the same devices and the same fw_cfg file names — or a restored guest finds its
//! hardware, or its clone id entry, changed under it; so everything but those differences is
//! written once, below.
//!
//! An image that boots a root filesystem has its disk attached to every QEMU, boots and
//! restores alike, as a read-only virtio-blk device (`/dev/vda`; virtio-mmio on the `microvm`
//! machine): `readonly=on` opens the file read-only and takes only a shared lock, so any
//! number of QEMUs hold the one file while nobody may open it for writing; the disk is never
//! copied, and the snapshot (a migration to a file) holds no disk contents. No `snapshot=on`
//! (it would give each QEMU a temporary writable overlay, which a read-only guest never needs).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use crate::config::VmConfig;
use crate::host::{self, Accel};
use crate::image::{CLONE_ID_FW_CFG, CLONE_ID_WIDTH, Image, SEED_FW_CFG};
use crate::run_files::RunFiles;

/// The id of every QEMU's user-mode network.
pub(crate) const NETDEV: &str = "n0";

/// The id of the root filesystem's drive.
const DISK: &str = "rootfs";

/// The fw_cfg file QEMU (9.2 and later) adds for `-kernel`: the kernel image, for UEFI
/// firmware. A restored QEMU, started without `-kernel`, gets a one-byte file of that name
/// instead.
const BOOT_KERNEL_FW_CFG: &str = "etc/boot/kernel";

/// The translation cache of a QEMU that boots a guest, in MiB, at least: with 16 MiB the
/// Debian kernel's boot refills it several times and takes a third longer.
const BOOT_TCG_CACHE_MIB: u32 = 32;

/// How the guest gets going.
#[derive(Clone, Debug)]
pub(crate) enum Start {
    /// Boot the image's kernel with guest RAM written through to `ram`, the app reachable
    /// on `forward` from the start.
    Boot {
        /// The RAM file, created by QEMU.
        ram: PathBuf,
        /// The host address forwarded to the image's guest port.
        forward: SocketAddr,
    },
    /// Map `ram` (a template's) privately and wait for the template's device state.
    Restore {
        /// The template's RAM file.
        ram: PathBuf,
    },
}

/// The machine a QEMU presents to its guest, the same however the guest gets going.
#[derive(Clone, Copy)]
pub(crate) struct Machine<'a> {
    /// Where and how.
    pub(crate) config: &'a VmConfig,
    /// What boots (its kernel and initramfs; unused by a restore).
    pub(crate) image: &'a Image,
    /// How the guest's CPU runs.
    pub(crate) accel: Accel,
    /// The id the guest reads from fw_cfg.
    pub(crate) clone_id: &'a str,
}

/// One QEMU's command line.
pub(crate) struct QemuCommand<'a> {
    pub(crate) machine: Machine<'a>,
    /// Boot or restore.
    pub(crate) start: &'a Start,
    /// The monitor socket, console and seed paths.
    pub(crate) files: &'a RunFiles,
}

impl QemuCommand<'_> {
    /// The command that starts QEMU. Every value is its own argument; none goes through a
    /// shell. `setpriv --pdeathsig KILL` makes QEMU die with the process that started it.
    pub(crate) fn command(&self) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(&self.machine.config.qemu)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if self.machine.config.merge_memory {
            // Set before setpriv's exec and kept across QEMU's. A pre-exec hook makes the
            // standard library fork (rather than posix_spawn) to start QEMU: a copy of this
            // process's page tables, small next to QEMU's own start.
            kernel::merge_memory_on_exec(cmd.as_std_mut());
        }
        cmd
    }

    /// QEMU's arguments.
    pub(crate) fn args(&self) -> Vec<OsString> {
        let c = self.machine.config;
        let booting = matches!(self.start, Start::Boot { .. });
        let (accel, cpu) = match self.machine.accel {
            Accel::Kvm => ("kvm".to_owned(), "host,-arch-capabilities"),
            // split-wx: the translation cache is a memfd mapped twice (written through one
            // mapping, run from the other) instead of one anonymous mapping that QEMU asks
            // to back with 2 MB huge pages, which rounded each clone's cache up by a
            // megabyte or two.
            Accel::Tcg => {
                // A booting guest runs far more distinct code than a clone does; it gets a
                // larger cache (it is one process, and gone once the template is saved).
                let mib = if booting {
                    c.tcg_cache_mib.max(BOOT_TCG_CACHE_MIB)
                } else {
                    c.tcg_cache_mib
                };
                (format!("tcg,tb-size={mib},split-wx=on"), "max")
            }
        };
        let mem = format!("{}M", c.memory_mib);
        let merge = if c.merge_memory { "on" } else { "off" };
        let ram = match self.start {
            Start::Boot { ram, .. } => format!(
                "memory-backend-file,id=mem,size={mem},mem-path={},share=on,merge={merge}",
                option_value(ram)
            ),
            Start::Restore { ram } => format!(
                "memory-backend-file,id=mem,size={mem},mem-path={},share=off,readonly=on,rom=off,merge={merge}",
                option_value(ram)
            ),
        };
        let mut args = Args::default();
        // ioapic2=off: one IOAPIC and 8 virtio-mmio slots instead of 24, which is plenty
        // for one network device and costs every QEMU 0.7 MB less. x-option-roms=off: qboot
        // loads the kernel itself; the option ROM QEMU would add with -kernel is a fw_cfg
        // file, and a restored QEMU (started without -kernel) must list the same fw_cfg
        // files as the template, or the guest's clone id entry points at another file.
        args.push("-M")
            .push("microvm,acpi=on,rtc=off,ioapic2=off,x-option-roms=off,memory-backend=mem")
            .push("-accel")
            .push(accel)
            .push("-cpu")
            .push(cpu)
            .push("-smp")
            .push("1")
            .push("-m")
            .push(mem)
            .push("-nodefaults")
            .push("-no-user-config")
            .push("-nographic")
            .push("-display")
            .push("none")
            .push("-bios")
            .push(&c.bios);
        match self.start {
            // Only a booting guest needs them: QEMU keeps the whole kernel image in its own
            // memory for the firmware to load (8 MB of Debian's kernel, in every process), and
            // a restored guest booted long ago, in the template.
            Start::Boot { .. } => args
                .push("-kernel")
                .push(&self.machine.image.kernel)
                .push("-initrd")
                .push(&self.machine.image.initramfs)
                .push("-append")
                .push(self.kernel_command_line()),
            // The guest numbered the fw_cfg files when it booted in the template, and QEMU
            // numbers them in name order: a restore must list the same names, or the guest's
            // clone id entry reads another file. The template's list has the kernel's file.
            Start::Restore { .. } => args
                .push("-fw_cfg")
                .push(format!("name={BOOT_KERNEL_FW_CFG},string=0")),
        };
        let netdev = match self.start {
            Start::Boot { forward, .. } => format!(
                "user,id={NETDEV},hostfwd=tcp:{}:{}-:{}",
                forward.ip(),
                forward.port(),
                self.machine.image.guest_port
            ),
            // A clone's port is forwarded only once its guest has reseeded its RNG: until
            // then nobody can reach its app.
            Start::Restore { .. } => format!("user,id={NETDEV}"),
        };
        let clone_id = format!("{:<CLONE_ID_WIDTH$}", self.machine.clone_id);
        args.push("-object")
            .push(ram)
            .push("-serial")
            .push(format!("file:{}", option_value(&self.files.console)))
            .push("-netdev")
            .push(netdev)
            .push("-device")
            .push(format!("virtio-net-device,netdev={NETDEV}"));
        if let Some(rootfs) = &self.machine.image.rootfs {
            // After the network device, in every QEMU alike: the guest found its devices
            // in this order when it booted.
            let mut drive = OsString::from("file=");
            drive.push(option_value_os(&rootfs.disk));
            drive.push(format!(",if=none,id={DISK},format=raw,readonly=on"));
            args.push("-drive")
                .push(drive)
                .push("-device")
                .push(format!("virtio-blk-device,drive={DISK}"));
        }
        args.push("-fw_cfg")
            .push(format!("name={CLONE_ID_FW_CFG},string={clone_id}"))
            // Boots and restores list the same fw_cfg names (see above), each with its own
            // value; a file, because the command line is readable by every local user.
            .push("-fw_cfg")
            .push(format!(
                "name={SEED_FW_CFG},file={}",
                option_value(&self.files.seed)
            ))
            .push("-qmp")
            .push(format!(
                "unix:{},server=on,wait=off",
                option_value(&self.files.qmp)
            ));
        if !booting {
            args.push("-incoming").push("defer");
        }
        args.0
    }

    /// The guest kernel's command line. Under TCG on a busy host the kernel can fail to
    /// calibrate the TSC against the PIT and then hang (microvm has no HPET or ACPI PM timer
    /// to fall back on), so the host's TSC rate, which TCG's guest TSC follows, is given.
    fn kernel_command_line(&self) -> String {
        let mut line = String::from("console=ttyS0 quiet panic=-1");
        if self.machine.accel == Accel::Tcg
            && let Some(khz) = host::tsc_khz()
        {
            line.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
        }
        line
    }
}

/// What a restore's command line says of the machine its guest sees, without file names,
/// the clone's own values or TCG's cache size: the machine type and its options, the CPU,
/// its count, the memory, the devices and the fw_cfg file names. Two hosts whose
/// fingerprints are equal present the same machine to a restored guest.
pub(crate) fn machine_fingerprint(config: &VmConfig, image: &Image, accel: Accel) -> Vec<String> {
    let files = RunFiles::new(Path::new("/nonexistent"), "fingerprint");
    let start = Start::Restore {
        ram: PathBuf::from("ram"),
    };
    let command = QemuCommand {
        machine: Machine {
            config,
            image,
            accel,
            clone_id: "",
        },
        start: &start,
        files: &files,
    };
    let args: Vec<String> = command
        .args()
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut kept = Vec::new();
    for pair in args.windows(2) {
        let (flag, value) = (pair[0].as_str(), pair[1].as_str());
        match flag {
            "-M" | "-cpu" | "-smp" | "-m" | "-device" => kept.push(format!("{flag} {value}")),
            "-fw_cfg" => {
                let name = value.split(',').next().unwrap_or_default();
                kept.push(format!("{flag} {name}"));
            }
            _ => {}
        }
    }
    kept
}

/// Arguments collected in order.
#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push(&mut self, arg: impl Into<OsString>) -> &mut Self {
        self.0.push(arg.into());
        self
    }
}

/// `path` as the value of a QEMU option (`mem-path=`, `file=`, …), where a comma ends the
/// value unless doubled: a directory name with a comma cannot add options.
fn option_value(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// [`option_value`] keeping a path that is not UTF-8 as it is.
fn option_value_os(path: &Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
    let mut bytes = Vec::with_capacity(path.as_os_str().len());
    for &byte in path.as_os_str().as_bytes() {
        bytes.push(byte);
        if byte == b',' {
            bytes.push(b',');
        }
    }
    OsString::from_vec(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

    use std::net::{IpAddr, Ipv4Addr};
    use std::path::Path;

    use super::*;

    /// Runs `f` on the command `config` gives a QEMU of `image` started as `start` under
    /// `accel`.
    fn with_command<T>(
        config: &VmConfig,
        image: &Image,
        accel: Accel,
        start: Start,
        f: impl FnOnce(&QemuCommand<'_>) -> T,
    ) -> T {
        let files = RunFiles::new(Path::new("/run/squall"), "c1");
        let machine = Machine {
            config,
            image,
            accel,
            clone_id: "c1",
        };
        f(&QemuCommand {
            machine,
            start: &start,
            files: &files,
        })
    }

    /// The arguments `config` gives a QEMU started as `start` under `accel`.
    fn args_for(config: &VmConfig, accel: Accel, start: Start) -> Vec<String> {
        args_of(&Image::nowhere(), config, accel, start)
    }

    /// The arguments of a QEMU of `image`.
    fn args_of(image: &Image, config: &VmConfig, accel: Accel, start: Start) -> Vec<String> {
        with_command(config, image, accel, start, |q| q.args())
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The value following `flag`, for each time it occurs.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|pair| pair[0] == flag)
            .map(|pair| pair[1].as_str())
            .collect()
    }

    /// A template's boot: its RAM file, a loopback port.
    fn template_boot() -> Start {
        Start::Boot {
            ram: "/dev/shm/squall-web.ram".into(),
            forward: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
        }
    }

    /// A standby clone: the template's RAM, mapped privately.
    fn standby() -> Start {
        Start::Restore {
            ram: "/dev/shm/squall-web.ram".into(),
        }
    }

    /// A cold boot: RAM of its own, the port on the clone address.
    fn cold_boot() -> Start {
        Start::Boot {
            ram: "/dev/shm/squall-cold-c1.ram".into(),
            forward: SocketAddr::from((IpAddr::from([10, 1, 2, 3]), 9090)),
        }
    }

    #[test]
    fn a_comma_in_a_path_cannot_add_options() {
        assert_eq!(
            option_value(Path::new("/srv/a,readonly=off/disk")),
            "/srv/a,,readonly=off/disk"
        );
        assert_eq!(
            option_value_os(Path::new("/srv/a,b")),
            OsString::from("/srv/a,,b")
        );
    }

    #[test]
    fn a_template_boots_the_kernel_writing_ram_through_and_serving_on_loopback() {
        let args = args_for(&VmConfig::default(), Accel::Tcg, template_boot());
        assert_eq!(values(&args, "-kernel"), ["/nonexistent/vmlinuz"]);
        assert_eq!(values(&args, "-initrd"), ["/nonexistent/initramfs.img"]);
        let append = values(&args, "-append")[0];
        assert!(append.starts_with("console=ttyS0"), "{append}");
        assert_eq!(
            values(&args, "-object"),
            [
                "memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/squall-web.ram,share=on,merge=on"
            ]
        );
        assert_eq!(
            values(&args, "-netdev"),
            ["user,id=n0,hostfwd=tcp:127.0.0.1:8080-:80"]
        );
        assert_eq!(
            values(&args, "-accel"),
            ["tcg,tb-size=32,split-wx=on"],
            "a boot gets the larger translation cache"
        );
        assert!(!args.contains(&"-incoming".to_owned()));
    }

    #[test]
    fn a_standby_maps_the_template_privately_and_waits_with_no_port() {
        let args = args_for(&VmConfig::default(), Accel::Tcg, standby());
        assert!(
            values(&args, "-kernel").is_empty(),
            "no kernel in a restore"
        );
        assert_eq!(
            values(&args, "-object"),
            [
                "memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/squall-web.ram,share=off,readonly=on,rom=off,merge=on"
            ]
        );
        assert_eq!(values(&args, "-netdev"), ["user,id=n0"]);
        assert_eq!(values(&args, "-incoming"), ["defer"]);
        assert_eq!(values(&args, "-accel"), ["tcg,tb-size=16,split-wx=on"]);
    }

    #[test]
    fn a_cold_boot_boots_into_its_own_ram_and_serves_on_the_clone_address() {
        let args = args_for(&VmConfig::default(), Accel::Tcg, cold_boot());
        assert_eq!(values(&args, "-kernel"), ["/nonexistent/vmlinuz"]);
        assert!(
            values(&args, "-object")[0].contains("mem-path=/dev/shm/squall-cold-c1.ram,share=on")
        );
        assert_eq!(
            values(&args, "-netdev"),
            ["user,id=n0,hostfwd=tcp:10.1.2.3:9090-:80"]
        );
        assert!(!args.contains(&"-incoming".to_owned()));
    }

    #[test]
    fn boots_and_restores_list_the_same_fw_cfg_names() {
        let names = |start| {
            let args = args_for(&VmConfig::default(), Accel::Tcg, start);
            let mut names: Vec<String> = values(&args, "-fw_cfg")
                .iter()
                .map(|v| v.split(',').next().unwrap().to_owned())
                .collect();
            if args.contains(&"-kernel".to_owned()) {
                // QEMU adds this one itself for -kernel.
                names.push(format!("name={BOOT_KERNEL_FW_CFG}"));
            }
            names.sort();
            names
        };
        assert_eq!(names(template_boot()), names(standby()));
        assert_eq!(names(cold_boot()), names(standby()));
    }

    #[test]
    fn a_root_filesystem_is_attached_read_only_to_every_qemu_and_its_port_forwarded() {
        let image = Image {
            guest_port: 8000,
            rootfs: Some(crate::Rootfs::for_tests(
                "/var/lib/squall/disks/app.erofs",
                crate::Filesystem::Erofs,
                vec![8000],
            )),
            ..Image::nowhere()
        };
        let config = VmConfig::default();
        let drives = |start| {
            let args = args_of(&image, &config, Accel::Tcg, start);
            let devices: Vec<String> = values(&args, "-device")
                .into_iter()
                .map(str::to_owned)
                .collect();
            let drives: Vec<String> = values(&args, "-drive")
                .into_iter()
                .map(str::to_owned)
                .collect();
            (drives, devices, values(&args, "-netdev")[0].to_owned())
        };
        let (boot_drives, boot_devices, netdev) = drives(template_boot());
        assert_eq!(
            boot_drives,
            ["file=/var/lib/squall/disks/app.erofs,if=none,id=rootfs,format=raw,readonly=on"]
        );
        assert_eq!(
            boot_devices,
            [
                "virtio-net-device,netdev=n0",
                "virtio-blk-device,drive=rootfs"
            ]
        );
        assert_eq!(netdev, "user,id=n0,hostfwd=tcp:127.0.0.1:8080-:8000");
        let (restore_drives, restore_devices, _) = drives(standby());
        assert_eq!(
            restore_drives, boot_drives,
            "a restore attaches the same disk"
        );
        assert_eq!(restore_devices, boot_devices, "in the same place");
        let (cold_drives, _, _) = drives(cold_boot());
        assert_eq!(cold_drives, boot_drives);
        // An executable's image has no disk.
        let plain = args_for(&config, Accel::Tcg, template_boot());
        assert!(values(&plain, "-drive").is_empty());
    }

    #[test]
    fn the_clone_id_is_padded_and_the_seed_comes_from_a_file() {
        let args = args_for(&VmConfig::default(), Accel::Tcg, standby());
        let fw_cfg = values(&args, "-fw_cfg");
        let id = fw_cfg
            .iter()
            .find_map(|v| v.strip_prefix(&format!("name={CLONE_ID_FW_CFG},string=")))
            .unwrap();
        assert_eq!(id.len(), CLONE_ID_WIDTH);
        assert_eq!(id.trim_end(), "c1");
        let seed = fw_cfg
            .iter()
            .find_map(|v| v.strip_prefix(&format!("name={SEED_FW_CFG},file=")))
            .unwrap();
        assert!(
            seed.starts_with("/run/squall/c1-") && seed.ends_with(".seed"),
            "{seed}"
        );
    }

    #[test]
    fn memory_merging_is_on_by_default_and_can_be_turned_off() {
        let backend = |config: &VmConfig| {
            args_for(config, Accel::Tcg, standby())
                .into_iter()
                .find(|a| a.starts_with("memory-backend-file"))
                .unwrap()
        };
        let on = backend(&VmConfig::default());
        assert!(
            on.contains("share=off") && on.ends_with(",merge=on"),
            "{on}"
        );
        let off = backend(&VmConfig {
            merge_memory: false,
            ..VmConfig::default()
        });
        assert!(off.ends_with(",merge=off"), "{off}");
    }

    #[test]
    fn kvm_runs_the_host_cpu_without_the_msr_this_kvm_refuses() {
        let args = args_for(&VmConfig::default(), Accel::Kvm, template_boot());
        assert_eq!(values(&args, "-accel"), ["kvm"]);
        assert_eq!(values(&args, "-cpu"), ["host,-arch-capabilities"]);
        let append = values(&args, "-append")[0];
        assert!(
            !append.contains("tsc_early_khz"),
            "only TCG needs the rate: {append}"
        );
    }

    #[test]
    fn qemu_dies_with_its_parent() {
        let image = Image::nowhere();
        let (program, args) =
            with_command(&VmConfig::default(), &image, Accel::Tcg, standby(), |q| {
                let command = q.command();
                let std = command.as_std();
                let args: Vec<_> = std.get_args().take(4).map(ToOwned::to_owned).collect();
                (std.get_program().to_owned(), args)
            });
        assert_eq!(program, "setpriv");
        assert_eq!(args, ["--pdeathsig", "KILL", "--", "qemu-system-x86_64"]);
    }
}
