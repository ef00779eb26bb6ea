//! How a daemon is configured: the one struct `squall forkd`'s flags fill in, and the drivers
//! read (where clones listen, where sockets and images go).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

/// How the daemon behaves; [`Config::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// The bearer token every `/v1` request must carry.
    pub token: String,
    /// At most this many live clones (starting, ready or stopping) at once. Default 256.
    /// `GET /v1/clones` reports it.
    pub max_clones: usize,
    /// How long a killed clone has between SIGTERM and SIGKILL. Default 5 s.
    pub kill_grace: Duration,
    /// Where private directories for zygote sockets are made. Default: the system temp dir.
    pub runtime_dir: PathBuf,
    /// The address clones listen on. Default loopback; a routable address lets balancers on
    /// other hosts reach them.
    pub clone_ip: IpAddr,
    /// Whether `vm` clones' QEMU processes may have identical pages merged by the host's
    /// KSM (see `microvm::VmConfig::merge_memory`). Default on; it takes effect only where
    /// the host runs KSM.
    pub vm_merge_memory: bool,
    /// The accelerator `vm` guests run under; `None` (the default) tries KVM first and falls
    /// back to TCG (see `microvm::VmConfig::accel`).
    pub vm_accel: Option<microvm::Accel>,
    /// Where `vm` templates' root filesystem disks, built from container images, are kept
    /// and found again (named by content digest: an unchanged image is not rebuilt).
    /// Default: `$XDG_CACHE_HOME/squall/images`, else `~/.cache/squall/images`, else (no
    /// home, as for a system service) `/var/cache/squall/images`. It must be private to
    /// forkd's user: forkd refuses one that others may write.
    pub image_cache: PathBuf,
}

/// The default [`Config::image_cache`].
fn default_image_cache() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")));
    match cache {
        Some(dir) if dir.is_absolute() => dir.join("squall/images"),
        // Never a shared temporary directory: whoever made the directory first could plant
        // disks in it.
        _ => PathBuf::from("/var/cache/squall/images"),
    }
}

impl Config {
    /// The defaults, with `token`.
    pub fn new(token: impl Into<String>) -> Config {
        Config {
            token: token.into(),
            max_clones: 256,
            kill_grace: Duration::from_secs(5),
            runtime_dir: std::env::temp_dir(),
            clone_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            vm_merge_memory: true,
            vm_accel: None,
            image_cache: default_image_cache(),
        }
    }
}
