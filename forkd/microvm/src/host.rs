//! What this host offers a microVM, probed once where it is needed: which accelerator can run
//! the guest (KVM where it can, QEMU's TCG otherwise), the CPU's TSC rate a TCG guest needs
//! to be told, whether the kernel can merge whole QEMU processes (KSM), and the kernel's
//! version those answers depend on. Nothing here starts a VM; a template's KVM trial (see
//! [`crate::template`]) records what it found through `remember_kvm_trial`.

use std::path::Path;
use std::sync::OnceLock;

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

/// The KVM device.
const KVM_DEVICE: &str = "/dev/kvm";

/// Present when `/dev/kvm` is served by `kvm_pvm` (paravirtualized nested virtualization):
/// it runs a trivial guest, but an unmodified Linux kernel hangs in early boot under it.
const KVM_PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// What trying KVM showed, once tried: whether it could run the guest. One trial per
/// process is enough; it takes seconds where KVM cannot run the guest.
static KVM_RUNS_GUESTS: OnceLock<bool> = OnceLock::new();

/// Whether `/dev/kvm` can be opened for reading and writing by this process.
fn kvm_device_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM_DEVICE)
        .is_ok()
}

/// Whether a template should try KVM before TCG: `/dev/kvm` is usable and no earlier trial
/// in this process showed that KVM cannot run the guest.
pub(crate) fn kvm_worth_trying() -> bool {
    KVM_RUNS_GUESTS.get().copied().unwrap_or(true) && kvm_device_usable()
}

/// Records what a template's KVM trial showed, for every later template of this process.
/// The first answer stands.
pub(crate) fn remember_kvm_trial(runs_guests: bool) {
    let _ = KVM_RUNS_GUESTS.set(runs_guests);
}

/// What `/dev/kvm` offers this process, as far as can be told without booting a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmSupport {
    /// `/dev/kvm` is absent, or this process may not open it.
    Unusable,
    /// `/dev/kvm` is served by `kvm_pvm`, under which a Linux guest does not boot.
    Paravirtualized,
    /// `/dev/kvm` is usable and served by a hypervisor that runs Linux guests.
    Usable,
}

impl KvmSupport {
    /// Looks at `/dev/kvm` and the kernel's modules.
    pub fn probe() -> Self {
        if !kvm_device_usable() {
            Self::Unusable
        } else if Path::new(KVM_PVM_MODULE).exists() {
            Self::Paravirtualized
        } else {
            Self::Usable
        }
    }

    /// The accelerator a template created with none forced should end up with.
    /// [`crate::Template::create`] does not rely on this: it tries KVM whenever `/dev/kvm` is
    /// usable and falls back to TCG when the guest does not come up, since a hypervisor
    /// unknown here may or may not boot Linux. This is what that trial should find.
    pub fn expected_accel(self) -> Accel {
        match self {
            Self::Usable => Accel::Kvm,
            Self::Unusable | Self::Paravirtualized => Accel::Tcg,
        }
    }
}

impl std::fmt::Display for KvmSupport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unusable => "/dev/kvm is absent or not usable by this process",
            Self::Paravirtualized => {
                "/dev/kvm is served by kvm_pvm, under which a Linux guest does not boot"
            }
            Self::Usable => "/dev/kvm is usable",
        })
    }
}

/// The host CPU's clock rate in kHz, from /proc/cpuinfo: under TCG the guest's TSC follows
/// it, and a guest kernel told the rate (`tsc_early_khz=`) need not calibrate it, which on
/// a busy host can hang it.
pub fn tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz")?.split(':').nth(1))?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

/// The host's KSM switch.
const KSM_RUN: &str = "/sys/kernel/mm/ksm/run";

/// Whether identical pages of clones get merged on this host (see
/// [`VmConfig::merge_memory`](crate::VmConfig::merge_memory)).
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
        let keeps_across_exec = kernel::kernel_version().is_some_and(|version| version >= (6, 7));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_usable_kvm_is_expected_to_run_guests() {
        assert_eq!(KvmSupport::Usable.expected_accel(), Accel::Kvm);
        assert_eq!(KvmSupport::Paravirtualized.expected_accel(), Accel::Tcg);
        assert_eq!(KvmSupport::Unusable.expected_accel(), Accel::Tcg);
    }
}
