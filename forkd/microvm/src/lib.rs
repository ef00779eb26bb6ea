//! Warm microVMs on QEMU: bootable images built from stock Debian parts, templates booted and
//! snapshotted with their RAM in a shared file, and clones restored from that snapshot with
//! a private copy-on-write mapping of the RAM, each reachable on its own port.
//!
//! This is SnowFlock's VM fork done with stock QEMU: a clone never copies the template's
//! memory; it maps the template's RAM file privately, so pages are shared until written.
#![forbid(unsafe_code)]

pub mod cpio;
pub mod image;
pub mod pool;
pub mod qmp;
pub mod vm;

pub use image::{Image, ImageError, ImageSpec};
pub use pool::{Pool, PoolMode};
pub use vm::{Accel, Standby, Template, VmClone, VmConfig, VmError};
