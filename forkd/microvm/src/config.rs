//! Where and how microVMs run: one value every template, clone and cold boot is given, and
//! the check that refuses a configuration QEMU cannot honour before anything boots.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use crate::host::Accel;

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
    /// least 32): the largest part of a clone's private memory under TCG. A clone fills it
    /// with the host code of every guest path it runs (about 10 MiB once it has resumed and
    /// served, then slowly more) and it is never given back, so this is also the bound on that part of a clone's memory. Below the working
    /// set (about 10 MiB for a small web server) the cache is flushed and refilled again and
    /// again, and requests slow down by tens of milliseconds each time.
    pub tcg_cache_mib: u32,
    /// The host address clones (and cold boots) are reachable on: their host port is
    /// forwarded from this address to the guest's port 80, and it is the address
    /// [`VmClone::addr`](crate::VmClone::addr) reports. Default loopback; a routable address (a pod IP) lets
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

/// Why a [`VmConfig`] cannot be used.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ConfigError {
    /// clone address {ip} is IPv6: QEMU's user-mode network forwards only from IPv4 host addresses
    Ipv6CloneIp {
        /// The address configured.
        ip: IpAddr,
    },
}

impl VmConfig {
    /// Refuses what QEMU cannot do with this configuration.
    pub fn check(&self) -> Result<(), ConfigError> {
        match self.clone_ip {
            IpAddr::V4(_) => Ok(()),
            IpAddr::V6(_) => Err(ConfigError::Ipv6CloneIp { ip: self.clone_ip }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_clone_address_is_refused_with_the_reason() {
        assert!(VmConfig::default().check().is_ok());
        let v6 = VmConfig {
            clone_ip: std::net::Ipv6Addr::LOCALHOST.into(),
            ..VmConfig::default()
        };
        let err = v6.check().unwrap_err();
        assert_eq!(
            err.to_string(),
            "clone address ::1 is IPv6: QEMU's user-mode network forwards only from IPv4 host addresses"
        );
    }
}
