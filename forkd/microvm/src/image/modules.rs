//! Which kernel modules an image's `/init` loads, and in which order, resolved the way
//! `modprobe` would from the kernel's own tables in `/lib/modules/RELEASE`: `modules.dep`
//! for hard dependencies, `modules.softdep` for `pre:` soft dependencies (ext4 and jbd2 want
//! a `crypto-crc32c` implementation, erofs's `libcrc32c` fails to load without one), and
//! `modules.alias` for the module names behind such an alias. A module built into the kernel
//! (`modules.builtin`) needs nothing.
//!
//! `modprobe` loads a module's `modules.dep` list from its end (the list is the transitive
//! closure, the deepest dependency last), so the order here is: soft dependencies, then the
//! hard ones from the end, then the module; each module once. busybox's `insmod` in the guest
//! takes plain ELF, so compressed modules (`.ko.xz`, `.ko.zst`, `.ko.gz`) are decompressed
//! when the image is built. (Debian 12's kernel ships plain `.ko` files.)

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::BuildImageError;

/// The modules every image loads: virtio-mmio (found through ACPI), the network device and
/// fw_cfg (for the clone id and the seed).
pub(crate) const BASE_MODULES: &[&str] = &["virtio_mmio", "virtio_net", "qemu_fw_cfg"];

/// What a root filesystem image loads on top of [`BASE_MODULES`]: the disk and the overlay
/// over it (the filesystem's own module is added by the caller).
pub(crate) const ROOTFS_MODULES: &[&str] = &["virtio_blk", "overlay"];

/// A module to load: its name and its file on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Module {
    /// Its name, with `_` for `-`: the file `/init` loads is `/lib/modules/NAME.ko`.
    pub(crate) name: String,
    /// Its file under the kernel's module directory.
    pub(crate) path: PathBuf,
}

/// A kernel's module tables.
#[derive(Debug, Default)]
pub(crate) struct ModuleTables {
    /// Where the tables and the modules are.
    dir: PathBuf,
    /// Each module: its file (relative to `dir`) and its dependencies as listed.
    deps: BTreeMap<String, (PathBuf, Vec<String>)>,
    /// Modules built into the kernel.
    builtin: BTreeSet<String>,
    /// Each module's `pre:` soft dependencies (names or aliases).
    softdeps: BTreeMap<String, Vec<String>>,
    /// Each alias's modules, in the file's order.
    aliases: BTreeMap<String, Vec<String>>,
}

/// A module's name from its file name or its name: `kernel/arch/x86/crypto/crc32c-intel.ko`
/// and `crc32c-intel` are both `crc32c_intel`.
fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let base = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|ext| base.strip_suffix(ext))
        .unwrap_or(base);
    base.replace('-', "_")
}

impl ModuleTables {
    /// Reads the tables of the kernel whose modules are in `dir` (`/lib/modules/RELEASE`).
    /// `modules.dep` must be there; the others are optional.
    pub(crate) fn read(dir: &Path) -> Result<Self, BuildImageError> {
        let table = |name: &str| std::fs::read_to_string(dir.join(name));
        let dep = table("modules.dep").map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => BuildImageError::Missing {
                what: "the kernel's module list",
                path: dir.join("modules.dep"),
                hint: " (the kernel's modules must be installed)",
            },
            _ => BuildImageError::Io {
                path: dir.join("modules.dep"),
                source: e,
            },
        })?;
        let mut tables = Self::parse(
            &dep,
            &table("modules.builtin").unwrap_or_default(),
            &table("modules.softdep").unwrap_or_default(),
            &table("modules.alias").unwrap_or_default(),
        );
        tables.dir = dir.to_owned();
        Ok(tables)
    }

    /// The tables from the text of `modules.dep`, `modules.builtin`, `modules.softdep` and
    /// `modules.alias`.
    pub(crate) fn parse(dep: &str, builtin: &str, softdep: &str, alias: &str) -> Self {
        let mut tables = Self::default();
        for line in dep.lines() {
            let Some((file, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(module_name).collect();
            tables
                .deps
                .insert(module_name(file), (PathBuf::from(file), deps));
        }
        tables.builtin = builtin
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(module_name)
            .collect();
        for line in softdep.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(module) = words.next() else { continue };
            // `pre:` names until `post:` (or the end); names before any `pre:` are `pre:` too.
            let mut pre = true;
            for word in words {
                match word {
                    "pre:" => pre = true,
                    "post:" => pre = false,
                    name if pre => tables
                        .softdeps
                        .entry(module_name(module))
                        .or_default()
                        .push(name.to_owned()),
                    _ => {}
                }
            }
        }
        for line in alias.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(alias), Some(module)) =
                (words.next(), words.next(), words.next())
            {
                tables
                    .aliases
                    .entry(alias.to_owned())
                    .or_default()
                    .push(module_name(module));
            }
        }
        tables
    }

    /// The modules that loading `wanted` takes, each after those it needs, each once.
    pub(crate) fn resolve(&self, wanted: &[&str]) -> Result<Vec<Module>, BuildImageError> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for name in wanted {
            let name = module_name(name);
            if !self.builtin.contains(&name) && !self.deps.contains_key(&name) {
                return Err(BuildImageError::NoModule {
                    name,
                    dir: self.dir.clone(),
                });
            }
            self.visit(&name, &mut seen, &mut order);
        }
        Ok(order)
    }

    /// Adds `name` (a module that may be built in) and what it needs to `order`.
    fn visit(&self, name: &str, seen: &mut BTreeSet<String>, order: &mut Vec<Module>) {
        if self.builtin.contains(name) || !seen.insert(name.to_owned()) {
            return;
        }
        let Some((path, deps)) = self.deps.get(name) else {
            return;
        };
        // A soft dependency is optional: an alias none of whose modules exist is skipped.
        for soft in self.softdeps.get(name).into_iter().flatten() {
            match self.aliases.get(soft) {
                Some(modules) => modules.iter().for_each(|m| self.visit(m, seen, order)),
                None => self.visit(&module_name(soft), seen, order),
            }
        }
        for dep in deps.iter().rev() {
            self.visit(dep, seen, order);
        }
        order.push(Module {
            name: name.to_owned(),
            path: self.dir.join(path),
        });
    }
}

/// The module in `path` as plain ELF, decompressed if its name says it is compressed.
pub(crate) fn read_module(path: &Path) -> Result<Vec<u8>, BuildImageError> {
    let bytes = super::read(
        path,
        "a kernel module",
        " (the kernel's modules must be installed)",
    )?;
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_end(&mut plain)
            .map_err(|e| BuildImageError::Decompress {
                path: path.to_owned(),
                detail: e.to_string(),
            })?;
        return Ok(plain);
    } else {
        return Ok(bytes);
    };
    let output = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|e| BuildImageError::Decompress {
            path: path.to_owned(),
            detail: format!("cannot run {tool}: {e}"),
        })?;
    if !output.status.success() {
        return Err(BuildImageError::Decompress {
            path: path.to_owned(),
            detail: format!(
                "{tool} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

    use super::*;

    /// The lines of Debian 12's 6.1 kernel tables these images need.
    fn debian() -> ModuleTables {
        let dep = "\
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/fs/mbcache.ko:
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/overlayfs/overlay.ko:
kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko
kernel/crypto/crc32c_generic.ko:
kernel/lib/crc16.ko:
kernel/lib/libcrc32c.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/firmware/qemu_fw_cfg.ko:
";
        let softdep = "\
# Soft dependencies extracted from modules themselves.
softdep ext4 pre: crypto-crc32c
softdep jbd2 pre: crypto-crc32c
softdep libcrc32c pre: crc32c
softdep ipmi_msghandler post: ipmi_devintf
";
        let alias = "\
alias crypto-crc32c crc32c_intel
alias crc32c crc32c_intel
alias crypto-crc32c crc32c_generic
alias crc32c crc32c_generic
";
        let mut tables = ModuleTables::parse(dep, "kernel/fs/fat/fat.ko\n", softdep, alias);
        tables.dir = "/lib/modules/6.1.0-57-amd64".into();
        tables
    }

    fn names(modules: &[Module]) -> Vec<&str> {
        modules.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn the_network_modules_load_in_the_order_modprobe_would() {
        let modules = debian().resolve(BASE_MODULES).unwrap();
        assert_eq!(
            names(&modules),
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "failover",
                "net_failover",
                "virtio_net",
                "qemu_fw_cfg"
            ]
        );
        assert_eq!(
            modules[2].path,
            Path::new("/lib/modules/6.1.0-57-amd64/kernel/drivers/virtio/virtio_mmio.ko")
        );
    }

    #[test]
    fn ext4_brings_its_dependencies_and_a_crc32c_first_each_once() {
        let modules = debian()
            .resolve(&["virtio_blk", "ext4", "overlay"])
            .unwrap();
        assert_eq!(
            names(&modules),
            [
                "virtio_ring",
                "virtio",
                "virtio_blk",
                "crc32c_intel",
                "crc32c_generic",
                "jbd2",
                "mbcache",
                "crc16",
                "ext4",
                "overlay"
            ]
        );
    }

    #[test]
    fn erofs_brings_libcrc32c_after_its_crc32c() {
        let modules = debian().resolve(&["erofs"]).unwrap();
        assert_eq!(
            names(&modules),
            ["crc32c_intel", "crc32c_generic", "libcrc32c", "erofs"]
        );
    }

    #[test]
    fn a_builtin_module_needs_nothing_and_an_unknown_one_is_named() {
        assert!(debian().resolve(&["fat"]).unwrap().is_empty());
        let err = debian().resolve(&["squashfs"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the kernel has no module squashfs (not in /lib/modules/6.1.0-57-amd64/modules.dep \
             nor built in)"
        );
    }

    #[test]
    fn compressed_module_files_keep_their_names() {
        let tables = ModuleTables::parse(
            "kernel/fs/erofs/erofs.ko.zst: kernel/lib/libcrc32c.ko.xz\nkernel/lib/libcrc32c.ko.xz:\n",
            "",
            "",
            "",
        );
        let modules = tables.resolve(&["erofs"]).unwrap();
        assert_eq!(names(&modules), ["libcrc32c", "erofs"]);
        assert_eq!(modules[1].path, Path::new("kernel/fs/erofs/erofs.ko.zst"));
    }

    #[test]
    fn a_gzip_module_is_decompressed() {
        use std::io::Write as _;
        let dir = std::env::temp_dir().join(format!("squall-ko-{}", crate::run_files::unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.ko.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"\x7fELF module").unwrap();
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        assert_eq!(read_module(&path).unwrap(), b"\x7fELF module");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
