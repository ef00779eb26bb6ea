//! `squall image build`: a bootable microVM image for an app: a single executable, or a
//! container image (`--oci`) or a directory (`--rootfs`) as a root filesystem disk.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use microvm::{AppSource, Filesystem, Image, ImageSpec, Rootfs, RootfsOptions, RootfsSource};

/// Work with microVM images.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ImageCommand {
    /// Build a kernel + initramfs image that boots straight into APP, listening on port 80; or,
    /// with --oci or --rootfs, one that boots an app's whole root filesystem from a read-only
    /// disk built beside them (named by its content digest, and not rebuilt when unchanged).
    Build {
        /// The app's executable; its shared libraries are found with ldd and included.
        #[arg(long, required_unless_present_any = ["oci", "rootfs"], conflicts_with_all = ["oci", "rootfs"])]
        app: Option<PathBuf>,
        /// A container image: an OCI image layout directory, an OCI archive, or a `docker
        /// save` / `podman save` archive. Arguments after `--` replace its Cmd.
        #[arg(long, conflicts_with = "rootfs")]
        oci: Option<PathBuf>,
        /// A directory to use as the root filesystem, as is; the command goes after `--`.
        #[arg(long, value_name = "DIR")]
        rootfs: Option<PathBuf>,
        /// The root filesystem disk's filesystem: ext4 or erofs.
        #[arg(long, default_value = "erofs", value_parser = parse_fs)]
        fs: Filesystem,
        /// The most the root filesystem may hold unpacked (bytes, or with K, M, G, T).
        #[arg(long, default_value = "8G", value_parser = parse_size)]
        max_size: u64,
        /// The user the app runs as (NAME, UID, NAME:GROUP, UID:GID), replacing the image's.
        #[arg(long, conflicts_with = "app")]
        user: Option<String>,
        /// The app's working directory, replacing the image's.
        #[arg(long, conflicts_with = "app")]
        workdir: Option<PathBuf>,
        /// A TCP port the app serves (repeatable), replacing the image's ExposedPorts.
        #[arg(long = "port", conflicts_with = "app")]
        ports: Vec<u16>,
        /// The kernel [default: the newest /boot/vmlinuz-*].
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// A statically linked busybox [default: /bin/busybox].
        #[arg(long)]
        busybox: Option<PathBuf>,
        /// Add a file to the guest: HOST_PATH:GUEST_PATH (repeatable).
        #[arg(long = "file", value_name = "HOST:GUEST", value_parser = parse_file)]
        files: Vec<(PathBuf, String)>,
        /// The directory to write vmlinuz, initramfs.img and image.json to (and the disk, with
        /// --oci or --rootfs).
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
        /// Arguments for the app.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn parse_fs(value: &str) -> Result<Filesystem, String> {
    value.parse()
}

/// `1024`, `512K`, `100M`, `8G`, `1T` (powers of 1024).
fn parse_size(value: &str) -> Result<u64, String> {
    let (number, shift) = match value.char_indices().last() {
        Some((at, 'K' | 'k')) => (&value[..at], 10),
        Some((at, 'M' | 'm')) => (&value[..at], 20),
        Some((at, 'G' | 'g')) => (&value[..at], 30),
        Some((at, 'T' | 't')) => (&value[..at], 40),
        _ => (value, 0),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("`{value}`: expected a size such as 512M or 8G"))
}

fn parse_file(value: &str) -> Result<(PathBuf, String), String> {
    let (host, guest) = value
        .rsplit_once(':')
        .ok_or_else(|| format!("`{value}`: expected HOST_PATH:GUEST_PATH"))?;
    Ok((PathBuf::from(host), guest.to_owned()))
}

pub(crate) fn run(command: ImageCommand) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Build {
            app,
            oci,
            rootfs,
            fs,
            max_size,
            user,
            workdir,
            ports,
            kernel,
            busybox,
            files,
            out,
            args,
        } => {
            let started = Instant::now();
            let source = match (oci, rootfs, app) {
                (Some(image), _, _) => RootfsSource::Oci(image),
                (None, Some(dir), _) => RootfsSource::Dir(dir),
                (None, None, Some(path)) => {
                    let app = AppSource::Executable { path, args };
                    let image = build_image(app, kernel, busybox, files, &out)?;
                    let size = std::fs::metadata(&image.initramfs).map_or(0, |m| m.len());
                    println!(
                        "built {} (kernel {}, initramfs {:.1} MB)",
                        out.display(),
                        image.kernel_release,
                        size as f64 / 1e6
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                // clap requires one of them.
                (None, None, None) => anyhow::bail!("give --app, --oci or --rootfs"),
            };
            let options = RootfsOptions {
                fs,
                args: (!args.is_empty()).then_some(args),
                max_size,
                user,
                workdir: workdir.map(|w| w.display().to_string()),
                ports,
            };
            let rootfs = microvm::build_rootfs(&source, &options, &out)?;
            let app = AppSource::Rootfs(rootfs.clone());
            let image = build_image(app, kernel, busybox, files, &out)?;
            println!(
                "built    {} (kernel {})",
                out.display(),
                image.kernel_release
            );
            print_rootfs(&rootfs, started);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A kernel and an initramfs in `out`, booting `app` (an executable, or a root filesystem
/// disk already in `out`).
fn build_image(
    app: AppSource,
    kernel: Option<PathBuf>,
    busybox: Option<PathBuf>,
    files: Vec<(PathBuf, String)>,
    out: &Path,
) -> anyhow::Result<Image> {
    let spec = ImageSpec {
        app,
        kernel,
        busybox,
        files,
    };
    Ok(microvm::image::build(&spec, out)?)
}

fn print_rootfs(rootfs: &Rootfs, started: Instant) {
    let size = std::fs::metadata(&rootfs.disk).map_or(0, |m| m.len());
    let ports: Vec<String> = rootfs.app.ports.iter().map(u16::to_string).collect();
    println!("digest   {}", rootfs.digest);
    println!("disk     {}", rootfs.disk.display());
    println!("size     {:.1} MB", size as f64 / 1e6);
    println!("fs       {}", rootfs.fs);
    println!("command  {}", rootfs.app.command.join(" "));
    println!(
        "user     {}:{}   workdir {}",
        rootfs.app.uid, rootfs.app.gid, rootfs.app.working_dir
    );
    println!(
        "ports    {}",
        if ports.is_empty() {
            "none".to_owned()
        } else {
            ports.join(" ")
        }
    );
    println!("took     {:.2} s", started.elapsed().as_secs_f64());
}
