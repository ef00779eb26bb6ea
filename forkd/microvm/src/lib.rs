//! Warm microVMs on QEMU: bootable images built from stock Debian parts, templates booted and
//! snapshotted with their RAM in a shared file, and clones restored from that snapshot with
//! a private copy-on-write mapping of the RAM, each reachable on its own port.
//!
//! An image's app is an executable copied into the initramfs, or a whole root filesystem
//! ([`Rootfs`]: a read-only ext4 or EROFS disk that every QEMU of the image attaches, shared
//! and never copied, and that the guest boots into under a tmpfs overlay); see [`image`], and
//! [`disk`] for how a clone makes sure the disk is the one its template was made with.
//!
//! This is SnowFlock's VM fork done with stock QEMU: a clone never copies the template's
//! memory; it maps the template's RAM file privately, so pages are shared until written.
//! Where the host runs KSM, the rest of each QEMU may be merged with its siblings too
//! ([`VmConfig::merge_memory`]).
//!
//! A clone must not share the template's random state: each QEMU gets a random seed in fw_cfg,
//! and a guest agent built with this crate (`guest/agent.rs`, see [`image`]) reseeds the guest
//! kernel's RNG with it after a restore; the host calls a clone ready only after the agent says
//! so (see [`guest`]), and only then forwards the clone's port. This crate itself has no unsafe
//! code (the one system call it needs, to let KSM merge a QEMU, is in `kernel`); the
//! agent, a separate program for the guest, has the two `ioctl` calls that reseed the kernel's
//! RNG, and starts a root filesystem's app (`run-app`: the standard library's `chroot`, and
//! `setgroups`, `setgid` and `setuid` from libc between fork and exec).
//!
//! The pieces, in the order a clone meets them: [`host`] (what this host can run),
//! [`config`], [`image`] (with [`cpio`]), [`template`] (with [`disk`]), [`pool`], [`clone`]; underneath,
//! [`launch`] starts every QEMU with the command line of `command_line`, its run files named
//! in `run_files`, [`guest`] waits for the guest, and [`qmp`] talks to QEMU's monitor.
#![forbid(unsafe_code)]

pub mod clone;
mod command_line;
pub mod config;
pub mod cpio;
pub mod disk;
pub mod guest;
pub mod host;
pub mod image;
pub mod launch;
pub mod pool;
pub mod portable;
pub mod qmp;
pub mod rootfs;
mod run_files;
pub mod template;

pub use clone::{CloneError, ColdBootError, PssError, Standby, VmClone, boot_cold};
pub use config::{ConfigError, VmConfig};
pub use disk::DiskError;
pub use guest::{ConsoleTail, WaitError};
pub use host::{Accel, KvmSupport, MemoryMerging};
pub use image::{AppSource, BuildImageError, Image, ImageSpec, OpenImageError};
pub use launch::LaunchError;
pub use pool::{Pool, PoolMode};
pub use portable::{Compatibility, Incompatible, ReadError, SnapshotHeader, TransferStats};
pub use qmp::QmpError;
pub use rootfs::{
    AppConfig, BuildRootfsError, Filesystem, Rootfs, RootfsOptions, RootfsSource, build_rootfs,
};
pub use template::{CreateTemplateError, Template};
