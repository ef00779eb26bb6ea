//! The guest's `/init`, a busybox shell script written whole by the host: nothing in it comes
//! from the user. It mounts the kernel's filesystems, loads the image's modules in order,
//! brings up the network (10.0.2.15 behind QEMU's user-mode network), starts the guest agent,
//! prints [`READY_LINE`], starts the app, and powers the guest off when the app exits.
//!
//! The app starts one of two ways:
//! - **an executable** in the initramfs: its path and arguments are read from
//!   `/etc/squall/args` (NUL-separated) by `xargs -0` and passed on as `"$@"`;
//! - **a root filesystem**: `/init` mounts the disk (`/dev/vda`) read-only (ext4 with
//!   `ro,noload`, so not even a journal replay writes; or erofs), lays an overlay over it
//!   whose upper layer is a tmpfs (the app may write anywhere; the disk never changes), mounts
//!   `/proc`, `/sys` (for the clone id at [`CLONE_ID_GUEST_PATH`], made readable by all: the
//!   app need not run as root; the seed stays root's), `/dev` and a tmpfs `/tmp` inside it, writes `/etc/hosts` and `/etc/resolv.conf` when the image has none, and has
//!   the guest agent's `run-app` start the app in it from `/etc/squall/app` (see
//!   `guest/app_launch.rs`). The agent itself runs from the initramfs, outside the app's root.

use crate::rootfs::Filesystem;

use super::{AGENT_GUEST_PATH, AGENT_POLL_MS, CLONE_ID_GUEST_PATH, READY_LINE};

/// Where the initramfs keeps how to start a root filesystem's app.
pub(crate) const APP_LAUNCH_PATH: &str = "/etc/squall/app";

/// Where `/init` mounts the app's root (the overlay).
const NEW_ROOT: &str = "/newroot";

/// The `/init` of an image whose app is an executable in the initramfs, listening on `port`.
pub(crate) fn executable(modules: &[String], port: u16) -> String {
    format!(
        r#"{prelude}export PORT={port} SQUALL_CLONE_ID_FILE={clone_id} HOME=/tmp
mkdir -p /tmp
{agent}xargs -0 sh -c 'exec "$@"' squall-app < /etc/squall/args
{end}"#,
        prelude = prelude(modules),
        clone_id = CLONE_ID_GUEST_PATH,
        agent = agent(),
        end = end(),
    )
}

/// The `/init` of an image that boots the root filesystem on `/dev/vda`, formatted `fs`.
pub(crate) fn rootfs(modules: &[String], fs: Filesystem) -> String {
    let (fs_type, options) = match fs {
        Filesystem::Ext4 => ("ext4", "ro,noload"),
        Filesystem::Erofs => ("erofs", "ro"),
    };
    format!(
        r#"{prelude}fail() {{ echo "squall-guest: $1"; poweroff -f; }}
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do usleep 10000; i=$((i+1)); done
mkdir -p /mnt/disk /mnt/rw {root}
mount -t {fs_type} -o {options} /dev/vda /mnt/disk || fail "cannot mount the root filesystem (/dev/vda, {fs_type})"
mount -t tmpfs -o mode=0755 rw /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/disk,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay {root} || fail "cannot mount the overlay over the root filesystem"
# Paths are resolved here, outside the app's root: a link in the image must not lead a mount
# or a write to the initramfs.
for d in proc sys dev tmp etc; do [ -L {root}/$d ] && fail "the image's /$d is a symbolic link"; done
mkdir -p {root}/proc {root}/sys {root}/dev {root}/tmp {root}/etc
mount -t proc proc {root}/proc
mount -t sysfs sys {root}/sys
mount -t devtmpfs dev {root}/dev
mount -t tmpfs -o mode=1777 tmp {root}/tmp
chmod 0444 {clone_id}
[ -e {root}/etc/hosts ] || [ -L {root}/etc/hosts ] || echo "127.0.0.1 localhost" > {root}/etc/hosts 2>/dev/null
[ -e {root}/etc/resolv.conf ] || [ -L {root}/etc/resolv.conf ] || echo "nameserver 10.0.2.3" > {root}/etc/resolv.conf 2>/dev/null
{agent}{agent_path} run-app {launch} {root}
{end}"#,
        prelude = prelude(modules),
        root = NEW_ROOT,
        clone_id = CLONE_ID_GUEST_PATH,
        agent = agent(),
        agent_path = AGENT_GUEST_PATH,
        launch = APP_LAUNCH_PATH,
        end = end(),
    )
}

/// Mounts, modules, network: the same in every image.
fn prelude(modules: &[String]) -> String {
    let modules: Vec<String> = modules
        .iter()
        .map(|m| format!("/lib/modules/{m}.ko"))
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do insmod "$m" || echo "squall-guest: insmod $m failed"; done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do usleep 10000; i=$((i+1)); done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
"#,
        modules = modules.join(" "),
    )
}

/// Starts the guest agent and says the app is being started.
fn agent() -> String {
    format!("{AGENT_GUEST_PATH} {AGENT_POLL_MS} &\necho \"{READY_LINE}\"\n",)
}

/// After the app exits.
fn end() -> &'static str {
    "echo \"squall-guest: app exited with status $?\"\npoweroff -f\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules() -> Vec<String> {
        ["virtio_mmio", "virtio_blk", "ext4"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn an_executable_image_starts_the_app_from_its_arguments_file_on_its_port() {
        let init = executable(&modules(), 80);
        assert!(init.contains("export PORT=80 "), "{init}");
        assert!(init.contains("xargs -0 sh -c 'exec \"$@\"' squall-app < /etc/squall/args"));
        assert!(init.contains(
            "for m in /lib/modules/virtio_mmio.ko /lib/modules/virtio_blk.ko /lib/modules/ext4.ko;"
        ));
        assert!(!init.contains("/dev/vda"));
    }

    #[test]
    fn a_rootfs_image_mounts_the_disk_read_only_under_an_overlay_and_runs_the_app_in_it() {
        let init = rootfs(&modules(), Filesystem::Ext4);
        assert!(
            init.contains("mount -t ext4 -o ro,noload /dev/vda /mnt/disk"),
            "{init}"
        );
        assert!(init.contains("lowerdir=/mnt/disk,upperdir=/mnt/rw/upper"));
        assert!(init.contains("mount -t sysfs sys /newroot/sys"));
        assert!(init.contains("/bin/squall-guest-agent run-app /etc/squall/app /newroot\n"));
        assert!(
            !init.contains("xargs"),
            "nothing of the app goes through a shell"
        );
        // The agent starts and the ready line is printed before the app.
        let ready = init.find(READY_LINE).unwrap_or(usize::MAX);
        assert!(ready < init.find("run-app").unwrap_or(0));
        let erofs = rootfs(&modules(), Filesystem::Erofs);
        assert!(
            erofs.contains("mount -t erofs -o ro /dev/vda /mnt/disk"),
            "{erofs}"
        );
    }
}
