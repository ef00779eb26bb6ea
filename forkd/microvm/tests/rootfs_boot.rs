//! MicroVMs that boot an app's root filesystem from a read-only disk: ext4 and EROFS disks
//! made here from a small tree (busybox-static, an unprivileged user, a web root with CGI
//! scripts), templates and clones serving on the image's own port, the app's user, group,
//! working directory and environment, writes that land in the overlay and never on the disk,
//! one disk file shared by every QEMU, a cold boot, and clones refused when the disk changed.
//! They need qemu-system-x86, linux-image-amd64, busybox-static, e2fsprogs and erofs-utils
//! (scripts/install-deps).
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use microvm::{
    AppConfig, AppSource, CloneError, DiskError, Filesystem, Image, ImageSpec, Pool, PoolMode,
    Rootfs, Template, VmConfig,
};
use test_support::Scratch;

use common::{accelerator_is_as_expected, get, qemu_children};

/// The port the app listens on in the guest: the image's, not 80.
const APP_PORT: u16 = 8000;

/// The app's user and group, from the tree's `/etc/passwd`.
const APP_UID: u32 = 1000;
const APP_GID: u32 = 1000;

/// A CGI script: who the app runs as, in which environment, and its clone id.
const INFO_CGI: &str = r#"#!/bin/sh
echo "Content-Type: text/plain"
echo
echo "uid=$(id -u)"
echo "gid=$(id -g)"
echo "groups=$(id -G)"
echo "clone=$(tr -d ' ' < "$SQUALL_CLONE_ID_FILE")"
env | sed 's/^/env:/'
"#;

/// A CGI script that writes under /tmp and /var and reads it back.
const WRITE_CGI: &str = r#"#!/bin/sh
echo "Content-Type: text/plain"
echo
echo "from $(tr -d ' ' < "$SQUALL_CLONE_ID_FILE")" > /tmp/note && echo "tmp=$(cat /tmp/note)"
echo "from $(tr -d ' ' < "$SQUALL_CLONE_ID_FILE")" > /var/lib/app/note && echo "var=$(cat /var/lib/app/note)"
"#;

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A root filesystem tree: busybox and its applets in /bin, a user `app` (1000:1000) whose
/// home is /home/app, a web root at /srv/www with a page and two CGI scripts, and
/// /var/lib/app owned by the app.
fn tree(dir: &Path) -> PathBuf {
    let root = dir.join("tree");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    write(
        &root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        0o644,
    );
    write(&root.join("etc/group"), "root:x:0:\napp:x:1000:\n", 0o644);
    write(
        &root.join("srv/www/index.html"),
        "hello from the disk\n",
        0o644,
    );
    write(&root.join("srv/www/cgi-bin/info"), INFO_CGI, 0o755);
    write(&root.join("srv/www/cgi-bin/write"), WRITE_CGI, 0o755);
    for dir in ["home/app", "var/lib/app"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
        std::os::unix::fs::chown(root.join(dir), Some(APP_UID), Some(APP_GID)).unwrap();
    }
    root
}

/// Runs `command`, which must succeed.
fn run(command: &mut Command) {
    let program = command.get_program().to_string_lossy().into_owned();
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/install-deps installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `fs` disk of `tree` at `disk`, described as the app's root filesystem: busybox's web
/// server in /srv, found through the PATH, serving the relative web root `www` (so it only
/// works from the right working directory) on [`APP_PORT`] as the user `app`.
fn disk(tree: &Path, disk: &Path, fs: Filesystem) -> Rootfs {
    match fs {
        Filesystem::Ext4 => run(Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-O", "^has_journal", "-d"])
            .arg(tree)
            .arg(disk)
            .arg("32M")),
        Filesystem::Erofs => run(Command::new("mkfs.erofs").arg(disk).arg(tree)),
    }
    let sha = Command::new("sha256sum").arg(disk).output().unwrap();
    let sha = String::from_utf8(sha.stdout).unwrap();
    Rootfs {
        disk: disk.to_owned(),
        fs,
        digest: format!("sha256:{}", sha.split_whitespace().next().unwrap()),
        app: AppConfig {
            command: ["httpd", "-f", "-p", "8000", "-h", "www"]
                .map(String::from)
                .to_vec(),
            env: [
                "PATH=/usr/bin:/bin",
                "GREETING=hello, world; $(no shell)",
                "PORT=1",
            ]
            .map(String::from)
            .to_vec(),
            working_dir: "/srv".into(),
            uid: APP_UID,
            gid: APP_GID,
            groups: vec![4, 27],
            ports: vec![APP_PORT, 9000],
        },
    }
}

/// An image booting `rootfs`, with its own checks of what the image records.
fn image(dir: &Path, rootfs: &Rootfs) -> Image {
    let out = dir.join("image");
    let image = microvm::image::build(
        &ImageSpec {
            app: AppSource::Rootfs(rootfs.clone()),
            kernel: None,
            busybox: None,
            files: vec![],
        },
        &out,
    )
    .unwrap();
    assert_eq!(
        Image::open(&out).unwrap(),
        image,
        "image.json records it all"
    );
    assert_eq!(
        image.guest_port, APP_PORT,
        "the first port the image exposes"
    );
    assert_eq!(image.rootfs.as_ref().unwrap().digest, rootfs.digest);
    image
}

fn config(dir: &Path) -> VmConfig {
    VmConfig {
        run_dir: dir.join("run"),
        health_path: "/index.html".into(),
        ..VmConfig::default()
    }
}

/// The value of `key=` in a CGI reply.
fn field<'a>(reply: &'a str, key: &str) -> &'a str {
    reply
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {reply}"))
}

/// The file descriptors of process `pid` open on `disk`'s inode, each with whether it was
/// opened read-only.
fn open_on(pid: u32, disk: &Path) -> Vec<bool> {
    let disk = std::fs::metadata(disk).unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::metadata(e.path())
                .is_ok_and(|m| m.dev() == disk.dev() && m.ino() == disk.ino())
        })
        .map(|e| {
            let info = format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy());
            let info = std::fs::read_to_string(info).unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            flags & 0o3 == 0 // O_RDONLY
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_template_and_clones_run_the_app_from_one_shared_read_only_disk() {
    let scratch = Scratch::new("rootfs-ext4");
    let tree = tree(scratch.path());
    let disk_path = scratch.join("app.ext4");
    let rootfs = disk(&tree, &disk_path, Filesystem::Ext4);
    let image = image(scratch.path(), &rootfs);
    let config = config(scratch.path());
    let template = Template::create("ext4", &image, &config, 2).await.unwrap();
    accelerator_is_as_expected(template.accel());
    let before = std::fs::read(&disk_path).unwrap();

    let a = template.clone_vm("clone-a").await.unwrap();
    let b = template.clone_vm("clone-b").await.unwrap();
    for clone in [&a, &b] {
        let page = get(clone.addr(), "/index.html").await;
        assert!(page.contains(" 200 "), "{page}");
        assert!(page.ends_with("hello from the disk\n"), "{page}");
    }

    // The app runs as the image says: its user and group and no other group, its working
    // directory (the web root `www` is relative to it), exactly its environment plus the
    // guest's PORT (replacing the image's), the clone id file and HOME from /etc/passwd.
    let info = get(a.addr(), "/cgi-bin/info").await;
    assert_eq!(field(&info, "uid"), "1000", "{info}");
    assert_eq!(field(&info, "gid"), "1000");
    assert_eq!(
        field(&info, "groups"),
        "1000 4 27",
        "the group, then the supplementary groups"
    );
    assert_eq!(field(&info, "clone"), "clone-a");
    for line in [
        "env:PORT=8000",
        "env:GREETING=hello, world; $(no shell)",
        "env:PATH=/usr/bin:/bin",
        "env:HOME=/home/app",
        &format!(
            "env:SQUALL_CLONE_ID_FILE={}",
            microvm::image::CLONE_ID_GUEST_PATH
        ),
    ] {
        assert!(info.lines().any(|l| l == line), "{line} in {info}");
    }
    assert!(
        !info.contains("env:PORT=1"),
        "the guest's port wins: {info}"
    );

    // Writes land in the clone's own overlay: each clone reads back its own, and the disk
    // file stays as it was, byte for byte.
    for (clone, id) in [(&a, "clone-a"), (&b, "clone-b")] {
        let reply = get(clone.addr(), "/cgi-bin/write").await;
        assert_eq!(field(&reply, "tmp"), format!("from {id}"), "{reply}");
        assert_eq!(field(&reply, "var"), format!("from {id}"), "{reply}");
    }
    assert!(
        std::fs::read(&disk_path).unwrap() == before,
        "the disk is unchanged after the clones wrote"
    );

    // Both QEMUs have the one disk file open, read-only; there is no copy of it.
    for clone in [&a, &b] {
        let fds = open_on(clone.pid().unwrap(), &disk_path);
        assert!(!fds.is_empty(), "the disk is open in the clone's QEMU");
        assert!(fds.iter().all(|&ro| ro), "read-only: {fds:?}");
    }
    let disks: Vec<PathBuf> = walk(scratch.path())
        .into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == before.len() as u64))
        .collect();
    assert_eq!(disks, [disk_path.as_path()], "no copy of the disk anywhere");

    // A disk touched in place, or replaced, is refused before any QEMU starts.
    let running = qemu_children(scratch.path());
    let modified = std::fs::metadata(&disk_path).unwrap().modified().unwrap();
    let file = std::fs::File::options()
        .write(true)
        .open(&disk_path)
        .unwrap();
    file.set_modified(modified + std::time::Duration::from_secs(5))
        .unwrap();
    let err = template.clone_vm("clone-c").await.unwrap_err();
    let CloneError::DiskChanged { source, .. } = &err else {
        panic!("not refused for the disk: {err}")
    };
    assert!(
        matches!(
            source,
            DiskError::Changed {
                what: "modification time",
                ..
            }
        ),
        "{source}"
    );
    file.set_modified(modified).unwrap();
    let copy = scratch.join("copy.ext4");
    std::fs::copy(&disk_path, &copy).unwrap();
    std::fs::rename(&copy, &disk_path).unwrap();
    let err = template.clone_vm("clone-d").await.unwrap_err();
    let text = lifecycle::ErrorChain(&err).to_string();
    eprintln!("{text}");
    assert!(
        text.starts_with(&format!(
            "clone clone-d: refused before its QEMU started: the root filesystem disk {} is not \
             the one the template was made with: its inode was",
            disk_path.display()
        )),
        "{text}"
    );
    assert!(matches!(err, CloneError::DiskChanged { .. }), "{err}");
    assert_eq!(qemu_children(scratch.path()), running, "no QEMU started");

    a.kill().await;
    b.kill().await;
    assert_eq!(qemu_children(scratch.path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erofs_template_pool_clone_and_cold_boot_serve_the_app() {
    let scratch = Scratch::new("rootfs-erofs");
    let tree = tree(scratch.path());
    let disk_path = scratch.join("app.erofs");
    let rootfs = disk(&tree, &disk_path, Filesystem::Erofs);
    let image = image(scratch.path(), &rootfs);
    let config = config(scratch.path());
    let template =
        std::sync::Arc::new(Template::create("erofs", &image, &config, 0).await.unwrap());
    accelerator_is_as_expected(template.accel());

    // Through a pool of restored, paused standbys: the disk is checked when a standby is
    // launched, and the clone is only resumed.
    let pool = Pool::start(
        std::sync::Arc::clone(&template),
        1,
        PoolMode::Restored,
        microvm::pool::numbered_ids("p"),
    );
    let clone = pool.clone_vm().await.unwrap();
    let info = get(clone.addr(), "/cgi-bin/info").await;
    assert_eq!(field(&info, "uid"), "1000", "{info}");
    assert_eq!(field(&info, "clone"), clone.id());
    let reply = get(clone.addr(), "/cgi-bin/write").await;
    assert_eq!(
        field(&reply, "var"),
        format!("from {}", clone.id()),
        "{reply}"
    );
    assert_eq!(open_on(clone.pid().unwrap(), &disk_path), [true]);
    clone.kill().await;
    pool.shutdown().await;

    // A cold boot of the same image: the same disk, booted from scratch.
    let mut cold = microvm::boot_cold(&image, &config, template.accel(), "cold1")
        .await
        .unwrap();
    let page = get(cold.addr(), "/index.html").await;
    assert!(page.ends_with("hello from the disk\n"), "{page}");
    let info = get(cold.addr(), "/cgi-bin/info").await;
    assert_eq!(field(&info, "clone"), "cold1", "{info}");
    assert!(!cold.has_exited());
    cold.kill().await;
    test_support::eventually("no QEMU left", std::time::Duration::from_secs(10), || {
        (qemu_children(scratch.path()) == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_cannot_start_says_why_and_the_template_fails_with_it() {
    let scratch = Scratch::new("rootfs-missing");
    let tree = tree(scratch.path());
    let mut rootfs = disk(&tree, &scratch.join("app.erofs"), Filesystem::Erofs);
    rootfs.app.command = vec!["no-such-app".into(), "--port".into(), "8000".into()];
    let image = image(scratch.path(), &rootfs);
    let config = VmConfig {
        accel: Some(microvm::KvmSupport::probe().expected_accel()),
        ..config(scratch.path())
    };
    let err = Template::create("missing", &image, &config, 0)
        .await
        .unwrap_err();
    let microvm::CreateTemplateError::Boot { accel, .. } = &err else {
        panic!("not a boot failure: {err}")
    };
    accelerator_is_as_expected(*accel);
    let text = lifecycle::ErrorChain(&err).to_string();
    assert!(
        text.contains(
            "squall-guest: cannot start the app: `no-such-app` not found in PATH /usr/bin:/bin"
        ),
        "{text}"
    );
    assert!(
        text.contains("squall-guest: app exited with status 127"),
        "{text}"
    );
    assert_eq!(qemu_children(scratch.path()), 0);
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()) {
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            files.extend(walk(&entry.path()));
        } else if kind.is_file() {
            files.push(entry.path());
        }
    }
    files
}
