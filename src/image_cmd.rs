//! `squall image build`: a bootable microVM image for an app.

use std::path::PathBuf;
use std::process::ExitCode;

/// Work with microVM images.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ImageCommand {
    /// Build a kernel + initramfs image that boots straight into APP, listening on port 80.
    Build {
        /// The app's executable; its shared libraries are found with ldd and included.
        #[arg(long)]
        app: PathBuf,
        /// The kernel [default: the newest /boot/vmlinuz-*].
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// A statically linked busybox [default: /bin/busybox].
        #[arg(long)]
        busybox: Option<PathBuf>,
        /// Add a file to the guest: HOST_PATH:GUEST_PATH (repeatable).
        #[arg(long = "file", value_name = "HOST:GUEST", value_parser = parse_file)]
        files: Vec<(PathBuf, String)>,
        /// The directory to write vmlinuz, initramfs.img and image.json to.
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
        /// Arguments for the app.
        #[arg(last = true)]
        args: Vec<String>,
    },
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
            kernel,
            busybox,
            files,
            out,
            args,
        } => {
            let spec = microvm::image::ImageSpec {
                app: microvm::image::AppSource::Executable { path: app, args },
                kernel,
                busybox,
                files,
            };
            let image = microvm::image::build(&spec, &out)?;
            let size = std::fs::metadata(&image.initramfs)
                .map(|m| m.len())
                .unwrap_or(0);
            println!(
                "built {} (kernel {}, initramfs {:.1} MB)",
                out.display(),
                image.kernel_release,
                size as f64 / 1e6
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
