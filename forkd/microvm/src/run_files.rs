//! The files one QEMU uses while it runs, by name: its QMP socket, its serial console, the
//! seed it reads into fw_cfg, and the guest RAM it owns, if any. They live as long as the
//! [`RunFiles`] value and are removed when it is dropped, so a QEMU that fails half-way
//! through its launch, a clone that is killed and one that is merely dropped all leave
//! nothing behind. Each QEMU gets fresh names: reusing a monitor socket path while an old
//! QEMU exits would let the old one delete the new socket.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::image::CLONE_ID_WIDTH;

/// Whether `name` (a template name or clone id) can go into file names and fw_cfg: 1 to
/// [`CLONE_ID_WIDTH`] ASCII letters, digits, `-` or `_`.
pub(crate) fn usable_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= CLONE_ID_WIDTH
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A suffix no other file of this process has: the process id and a counter.
pub(crate) fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The files of one QEMU, removed when dropped. Only names are made here; QEMU and the
/// launch create the files.
#[derive(Debug)]
pub(crate) struct RunFiles {
    /// The QMP socket QEMU listens on.
    pub(crate) qmp: PathBuf,
    /// The serial console, which QEMU writes the guest's output to.
    pub(crate) console: PathBuf,
    /// The 0600 file QEMU reads the guest's random seed from when it starts; removed as soon
    /// as its monitor answers (see [`RunFiles::remove_seed`]).
    pub(crate) seed: PathBuf,
    /// Guest RAM this QEMU alone uses (a cold boot's). A template's RAM file is the
    /// template's and outlives the QEMU that wrote it; a clone maps the template's.
    pub(crate) own_ram: Option<PathBuf>,
    /// What every name above starts with.
    tag: String,
}

impl RunFiles {
    /// Names the files of a QEMU for `name` in `run_dir`, unique to this QEMU.
    pub(crate) fn new(run_dir: &Path, name: &str) -> Self {
        let tag = format!("{name}-{}", unique());
        Self {
            qmp: run_dir.join(format!("{tag}.qmp")),
            console: run_dir.join(format!("{tag}.console")),
            seed: run_dir.join(format!("{tag}.seed")),
            own_ram: None,
            tag,
        }
    }

    /// Names a RAM file of its own in `ram_dir`, removed with the rest, and returns it.
    pub(crate) fn add_own_ram(&mut self, ram_dir: &Path) -> PathBuf {
        let ram = ram_dir.join(format!("squall-cold-{}.ram", self.tag));
        self.own_ram = Some(ram.clone());
        ram
    }

    /// Removes the seed file early: QEMU reads it into fw_cfg before its monitor answers,
    /// and a secret should not lie around longer than it is needed.
    pub(crate) fn remove_seed(&self) {
        let _ = std::fs::remove_file(&self.seed);
    }
}

impl Drop for RunFiles {
    fn drop(&mut self) {
        let files = [&self.qmp, &self.console, &self.seed]
            .into_iter()
            .chain(self.own_ram.as_ref());
        for file in files {
            let _ = std::fs::remove_file(file);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

    use super::*;

    #[test]
    fn names_are_limited_to_what_file_names_and_fw_cfg_take() {
        assert!(usable_name("web-1_a"));
        assert!(usable_name(&"x".repeat(CLONE_ID_WIDTH)));
        for bad in [
            "",
            "a/b",
            "../x",
            "a b",
            "é",
            &"x".repeat(CLONE_ID_WIDTH + 1),
        ] {
            assert!(!usable_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn every_file_is_removed_on_drop() {
        let dir = std::env::temp_dir().join(format!("squall-runfiles-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut files = RunFiles::new(&dir, "c1");
        let ram = files.add_own_ram(&dir);
        let paths = [
            files.qmp.clone(),
            files.console.clone(),
            files.seed.clone(),
            ram,
        ];
        for path in &paths {
            std::fs::write(path, b"x").unwrap();
        }
        let names: std::collections::HashSet<_> = paths.iter().collect();
        assert_eq!(names.len(), 4, "four distinct files: {paths:?}");
        assert!(paths.iter().all(|p| p.starts_with(&dir)));
        drop(files);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn files_never_created_are_no_trouble_and_the_seed_can_go_first() {
        let dir = std::env::temp_dir().join(format!("squall-runfiles-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = RunFiles::new(&dir, "c2");
        std::fs::write(&files.seed, b"secret").unwrap();
        std::fs::write(&files.console, b"boot").unwrap();
        files.remove_seed();
        assert!(!files.seed.exists());
        assert!(files.console.exists(), "only the seed goes early");
        drop(files);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn two_qemus_of_one_clone_id_get_different_files() {
        let dir = Path::new("/run/squall");
        let (a, b) = (RunFiles::new(dir, "c1"), RunFiles::new(dir, "c1"));
        assert_ne!(a.qmp, b.qmp);
        assert_ne!(a.console, b.console);
        assert_ne!(a.seed, b.seed);
    }
}
