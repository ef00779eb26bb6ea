//! Building root filesystem disks from images made here, byte by byte: every bad input gets
//! a clear error and leaves the output directory as it was (and nothing outside it), and
//! good ones give a disk (checked with e2fsck / fsck.erofs, and read back) and the app's
//! configuration.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

use std::path::{Path, PathBuf};
use std::process::Command;

use microvm::rootfs::{AppConfigError, ReadImageError, UnpackError};
use microvm::{BuildRootfsError, Filesystem, Rootfs, RootfsOptions, RootfsSource, build_rootfs};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};
use test_support::Scratch;

/// Asserts that `error` matches `pattern`, showing it if not.
macro_rules! assert_matches {
    ($error:expr, $pattern:pat $(if $guard:expr)?) => {
        let error = &$error;
        assert!(matches!(error, $pattern $(if $guard)?), "{error:?}");
    };
}

/// One entry of a layer, written with raw headers so that bad paths can be written too.
enum E<'a> {
    Dir(&'a str),
    ReadOnlyDir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    Char(&'a str),
}

fn header(path: &str, kind: EntryType, size: u64, mode: u32, link: &str) -> Header {
    let mut header = Header::new_gnu();
    header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_size(size);
    header.set_mode(mode);
    header.set_entry_type(kind);
    header.set_mtime(1_600_000_000);
    header.set_uid(0);
    header.set_gid(0);
    header.set_cksum();
    header
}

/// An uncompressed layer.
fn layer(entries: &[E<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let (header, data): (Header, &[u8]) = match *entry {
            E::Dir(path) => (header(path, EntryType::Directory, 0, 0o755, ""), b""),
            E::ReadOnlyDir(path) => (header(path, EntryType::Directory, 0, 0o555, ""), b""),
            E::File(path, data) => (
                header(path, EntryType::Regular, data.len() as u64, 0o644, ""),
                data,
            ),
            E::Symlink(path, target) => (header(path, EntryType::Symlink, 0, 0o777, target), b""),
            E::HardLink(path, target) => (header(path, EntryType::Link, 0, 0o644, target), b""),
            E::Char(path) => (header(path, EntryType::Char, 0, 0o666, ""), b""),
        };
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Stores `bytes` as a blob of the layout at `dir`; returns its descriptor.
fn blob(dir: &Path, media_type: &str, bytes: &[u8]) -> Value {
    let hex = hex(bytes);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(&hex), bytes).unwrap();
    json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
}

/// An image config running `run` (the `config` object) for `arch`, with these layers.
fn config(arch: &str, run: Value, layers: &[Vec<u8>]) -> Value {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", hex(l)))
        .collect();
    json!({"architecture": arch, "os": "linux", "config": run,
           "rootfs": {"type": "layers", "diff_ids": diff_ids}})
}

/// Writes an OCI layout of one image to `dir`; `platform` goes into the index entry.
fn oci_layout(dir: &Path, layers: &[Vec<u8>], run: Value, platform: Option<&str>) -> PathBuf {
    let arch = platform.unwrap_or("amd64");
    let config = blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config(arch, run, layers)).unwrap(),
    );
    let layers: Vec<Value> = layers
        .iter()
        .map(|l| blob(dir, "application/vnd.oci.image.layer.v1.tar+gzip", l))
        .collect();
    let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                          "config": config, "layers": layers});
    let mut descriptor = blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    if let Some(arch) = platform {
        descriptor["platform"] = json!({"architecture": arch, "os": "linux"});
    }
    let index = json!({"schemaVersion": 2, "manifests": [descriptor]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    dir.to_owned()
}

/// A tar archive of the directory `dir`.
fn archive(dir: &Path, out: &Path) -> PathBuf {
    let mut builder = tar::Builder::new(std::fs::File::create(out).unwrap());
    builder.append_dir_all(".", dir).unwrap();
    builder.finish().unwrap();
    out.to_owned()
}

fn app(cmd: &[&str]) -> Value {
    json!({"Cmd": cmd})
}

fn options(fs: Filesystem) -> RootfsOptions {
    RootfsOptions {
        fs,
        ..RootfsOptions::default()
    }
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// Builds `layers` as an OCI layout into a fresh output directory that already holds a
/// file, expects an error, and checks the output directory holds only that file.
fn build_fails(layers: &[Vec<u8>], run: Value, max_size: u64) -> BuildRootfsError {
    let scratch = Scratch::new("rootfs-bad");
    let image = oci_layout(&scratch.join("image"), layers, run, None);
    fails(
        &RootfsSource::Oci(image),
        &RootfsOptions {
            max_size,
            ..options(Filesystem::Ext4)
        },
        &scratch,
    )
}

/// Like [`build_fails`] with the default limit, for an error in a layer: that error.
fn layer_refused(entries: &[E<'_>]) -> UnpackError {
    match build_fails(&[layer(entries)], app(&["/x"]), 1 << 30) {
        BuildRootfsError::Layer { source, .. } => source,
        other => panic!("expected a layer's error, got {other:?}"),
    }
}

fn fails(source: &RootfsSource, options: &RootfsOptions, scratch: &Scratch) -> BuildRootfsError {
    let out = scratch.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("already-here"), b"x").unwrap();
    let error = build_rootfs(source, options, &out).unwrap_err();
    assert_eq!(
        listing(&out),
        ["already-here"],
        "the failed build left files: {error}"
    );
    // An output directory the build had to make is gone too.
    let fresh = scratch.join("fresh");
    build_rootfs(source, options, &fresh.join("out")).unwrap_err();
    assert!(!fresh.exists(), "the failed build left {}", fresh.display());
    error
}

/// The disk's files, read back into a directory, after checking the disk.
fn read_back(rootfs: &Rootfs, scratch: &Scratch) -> PathBuf {
    let dir = scratch.join("read-back");
    let disk = rootfs.disk.to_str().unwrap();
    let run = |program: &str, args: &[&str]| {
        let output = Command::new(program).args(args).output().unwrap();
        assert!(
            output.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    match rootfs.fs {
        Filesystem::Ext4 => {
            run("e2fsck", &["-fn", disk]);
            std::fs::create_dir(&dir).unwrap();
            run(
                "debugfs",
                &["-R", &format!("rdump / {}", dir.display()), disk],
            );
        }
        Filesystem::Erofs => {
            run("fsck.erofs", &[disk]);
            run(
                "fsck.erofs",
                &[&format!("--extract={}", dir.display()), disk],
            );
        }
    }
    dir
}

#[test]
fn layers_of_each_compression_stack_with_whiteouts_and_opaque_directories_on_both_filesystems() {
    let lowest = gzip(&layer(&[
        E::Dir("a/"),
        E::File("a/gone", b"1"),
        E::File("a/kept", b"2"),
        E::Dir("b/"),
        E::File("b/old", b"3"),
        E::Dir("b/sub/"),
        E::File("b/sub/deep", b"4"),
        E::File("bin-real", b"#!/bin/sh\n"),
        E::Symlink("bin", "bin-real"),
        E::HardLink("twin", "a/kept"),
    ]));
    // The opaque marker comes after an entry of the same layer, which must stay.
    let middle = zstd(&layer(&[
        E::File("a/.wh.gone", b""),
        E::File("b/new", b"5"),
        E::File("b/implied/x", b"7"),
        E::Dir("b/sub/"),
        E::File("b/.wh..wh..opq", b""),
    ]));
    let top = layer(&[E::File("c", b"6")]);
    for fs in [Filesystem::Ext4, Filesystem::Erofs] {
        let scratch = Scratch::new("rootfs-layers");
        let image = oci_layout(
            &scratch.join("image"),
            &[lowest.clone(), middle.clone(), top.clone()],
            app(&["/bin/sh"]),
            None,
        );
        let rootfs = build_rootfs(
            &RootfsSource::Oci(image),
            &options(fs),
            &scratch.join("out"),
        )
        .unwrap();
        assert_eq!(rootfs.fs, fs);
        assert_eq!(Rootfs::open(&scratch.join("out")).unwrap(), rootfs);
        let tree = read_back(&rootfs, &scratch);
        assert_eq!(listing(&tree.join("a")), ["kept"], "{fs}");
        assert_eq!(listing(&tree.join("b")), ["implied", "new", "sub"], "{fs}");
        assert_eq!(
            listing(&tree.join("b/sub")),
            Vec::<String>::new(),
            "{fs}: the opaque b hides b/sub/deep"
        );
        assert_eq!(std::fs::read(tree.join("c")).unwrap(), b"6");
        assert_eq!(std::fs::read(tree.join("twin")).unwrap(), b"2");
        assert_eq!(
            std::fs::read_link(tree.join("bin")).unwrap(),
            Path::new("bin-real")
        );
    }
}

#[test]
fn the_app_config_comes_from_the_image_and_args_replace_cmd() {
    let scratch = Scratch::new("rootfs-app");
    let etc = layer(&[
        E::Dir("etc/"),
        E::File(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/srv:/bin/sh\n",
        ),
        E::File("etc/group", b"root:x:0:\napp:x:1000:\nstaff:x:50:\n"),
    ]);
    let run = json!({"Entrypoint": ["/usr/bin/python3", "-u"], "Cmd": ["app.py"], "Env": ["A=1", "PATH=/bin"],
                     "WorkingDir": "/srv", "User": "app:staff",
                     "ExposedPorts": {"8000/tcp": {}, "53/udp": {}, "80": {}}});
    let image = oci_layout(&scratch.join("image"), &[gzip(&etc)], run, None);
    let source = RootfsSource::Oci(image);
    let out = scratch.join("out");
    let rootfs = build_rootfs(&source, &options(Filesystem::Erofs), &out).unwrap();
    let app = &rootfs.app;
    assert_eq!(app.command, ["/usr/bin/python3", "-u", "app.py"]);
    assert_eq!(app.env, ["A=1", "PATH=/bin"]);
    assert_eq!(
        (app.working_dir.as_str(), app.uid, app.gid),
        ("/srv", 1000, 50)
    );
    assert_eq!(app.ports, [80, 8000]);

    let args = RootfsOptions {
        args: Some(vec!["other.py".into(), "--fast".into()]),
        user: Some("app".into()),
        ..options(Filesystem::Erofs)
    };
    let replaced = build_rootfs(&source, &args, &out).unwrap();
    assert_eq!(
        replaced.app.command,
        ["/usr/bin/python3", "-u", "other.py", "--fast"]
    );
    assert_eq!(
        (replaced.app.uid, replaced.app.gid),
        (1000, 1000),
        "the group defaults to the user's own"
    );
    assert_ne!(
        replaced.digest, rootfs.digest,
        "the arguments are part of the disk's name"
    );
    assert_eq!(
        Rootfs::open(&out).unwrap(),
        replaced,
        "rootfs.json describes the last build"
    );

    let unknown = RootfsOptions {
        user: Some("ghost".into()),
        ..options(Filesystem::Erofs)
    };
    let error = fails(&source, &unknown, &Scratch::new("rootfs-ghost"));
    assert_matches!(error, BuildRootfsError::App(AppConfigError::UnknownUser(u)) if u == "ghost");
}

#[test]
fn an_unchanged_image_is_not_built_again() {
    let scratch = Scratch::new("rootfs-cache");
    let image = oci_layout(
        &scratch.join("image"),
        &[gzip(&layer(&[E::File("f", b"x")]))],
        app(&["/f"]),
        None,
    );
    let out = scratch.join("out");
    let first = build_rootfs(
        &RootfsSource::Oci(image.clone()),
        &options(Filesystem::Ext4),
        &out,
    )
    .unwrap();
    let built = std::fs::metadata(&first.disk).unwrap();
    // Were the layer read again, it would fail its digest now.
    let layer = std::fs::read_dir(image.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read(p).unwrap().starts_with(&[0x1f, 0x8b]))
        .unwrap();
    std::fs::write(&layer, b"garbage").unwrap();
    // A build killed midway left its staging directory (no process has this pid).
    let abandoned = out.join(".rootfs-staging-999999999-0/tree");
    std::fs::create_dir_all(&abandoned).unwrap();
    std::fs::write(abandoned.join("half"), b"x").unwrap();
    let second = build_rootfs(&RootfsSource::Oci(image), &options(Filesystem::Ext4), &out).unwrap();
    assert_eq!(second, first);
    let again = std::fs::metadata(&second.disk).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(
        (again.ino(), again.mtime_nsec()),
        (built.ino(), built.mtime_nsec())
    );
    assert!(!out.join(".rootfs-staging-999999999-0").exists());
}

#[test]
fn docker_save_and_oci_archives_are_read_in_place() {
    let scratch = Scratch::new("rootfs-archives");
    let layers = [layer(&[E::Dir("srv/"), E::File("srv/hello", b"hi")])];
    let run = app(&["/srv/hello"]);
    // docker save: manifest.json, <config hex>.json, <id>/layer.tar (the second layer a
    // symlink to the first, as older docker writes a layer used twice).
    let docker = scratch.join("docker");
    std::fs::create_dir_all(docker.join("one")).unwrap();
    std::fs::create_dir_all(docker.join("two")).unwrap();
    let config = serde_json::to_vec(&config(
        "amd64",
        run.clone(),
        &[layers[0].clone(), layers[0].clone()],
    ))
    .unwrap();
    std::fs::write(docker.join(format!("{}.json", hex(&config))), &config).unwrap();
    std::fs::write(docker.join("one/layer.tar"), &layers[0]).unwrap();
    std::os::unix::fs::symlink("../one/layer.tar", docker.join("two/layer.tar")).unwrap();
    let manifest = json!([{"Config": format!("{}.json", hex(&config)), "RepoTags": ["app:latest"],
                           "Layers": ["one/layer.tar", "two/layer.tar"]}]);
    std::fs::write(
        docker.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let docker_tar = archive(&docker, &scratch.join("docker.tar"));
    let from_docker = build_rootfs(
        &RootfsSource::Oci(docker_tar),
        &options(Filesystem::Erofs),
        &scratch.join("out-docker"),
    )
    .unwrap();
    assert_eq!(from_docker.app.command, ["/srv/hello"]);
    assert_eq!(
        std::fs::read(read_back(&from_docker, &scratch).join("srv/hello")).unwrap(),
        b"hi"
    );

    let layout = oci_layout(&scratch.join("layout"), &layers, run, None);
    let oci_tar = archive(&layout, &scratch.join("oci.tar"));
    let from_layout = build_rootfs(
        &RootfsSource::Oci(layout),
        &options(Filesystem::Erofs),
        &scratch.join("out-layout"),
    )
    .unwrap();
    let from_archive = build_rootfs(
        &RootfsSource::Oci(oci_tar),
        &options(Filesystem::Erofs),
        &scratch.join("out-archive"),
    )
    .unwrap();
    assert_eq!(
        from_archive.digest, from_layout.digest,
        "an archive is its layout"
    );

    // Newer docker writes both formats in one archive: the OCI layout is read (this
    // manifest.json names a config that is not there).
    let both = scratch.join("layout");
    let manifest = json!([{"Config": "blobs/sha256/missing", "Layers": []}]);
    std::fs::write(
        both.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let both_tar = archive(&both, &scratch.join("both.tar"));
    let from_both = build_rootfs(
        &RootfsSource::Oci(both_tar),
        &options(Filesystem::Erofs),
        &scratch.join("out-both"),
    )
    .unwrap();
    assert_eq!(from_both.digest, from_layout.digest);
}

#[test]
fn a_directory_is_taken_as_is_with_the_command_given() {
    let scratch = Scratch::new("rootfs-dir");
    let tree = scratch.join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::write(tree.join("bin/app"), b"#!/bin/sh\n").unwrap();
    std::os::unix::fs::symlink("/bin/app", tree.join("app")).unwrap();
    let source = RootfsSource::Dir(tree.clone());
    let args = RootfsOptions {
        args: Some(vec!["/bin/app".into()]),
        ports: vec![8080],
        workdir: Some("/bin".into()),
        ..options(Filesystem::Ext4)
    };
    let rootfs = build_rootfs(&source, &args, &scratch.join("out")).unwrap();
    assert_eq!(rootfs.app.command, ["/bin/app"]);
    assert_eq!(rootfs.app.env, [microvm::rootfs::DEFAULT_PATH]);
    assert_eq!(
        (rootfs.app.ports.as_slice(), rootfs.app.working_dir.as_str()),
        (&[8080][..], "/bin")
    );
    assert_eq!(
        std::fs::read(read_back(&rootfs, &scratch).join("bin/app")).unwrap(),
        b"#!/bin/sh\n"
    );

    let error = fails(
        &source,
        &options(Filesystem::Ext4),
        &Scratch::new("rootfs-dir-no-command"),
    );
    assert_matches!(error, BuildRootfsError::NoCommand);
    let inside = build_rootfs(&source, &args, &tree.join("out")).unwrap_err();
    assert_matches!(inside, BuildRootfsError::OutInsideTree { .. });
    assert_eq!(
        listing(&tree),
        ["app", "bin"],
        "the failed build left files in the tree"
    );
    std::os::unix::fs::symlink("../../outside", tree.join("bin/escape")).unwrap();
    let error = fails(&source, &args, &Scratch::new("rootfs-dir-escape"));
    assert_matches!(
        error,
        BuildRootfsError::Tree {
            source: UnpackError::SymlinkEscape { .. },
            ..
        }
    );
}

#[test]
fn a_path_that_is_no_image_is_refused() {
    let scratch = Scratch::new("rootfs-no-image");
    std::fs::write(scratch.join("notes.txt"), b"hello").unwrap();
    std::fs::create_dir(scratch.join("empty")).unwrap();
    for path in [scratch.join("notes.txt"), scratch.join("empty")] {
        let error = fails(
            &RootfsSource::Oci(path.clone()),
            &options(Filesystem::Ext4),
            &Scratch::new("rootfs-no-image-out"),
        );
        assert_matches!(
            error,
            BuildRootfsError::Image {
                source: ReadImageError::NotAnImage { .. },
                ..
            }
        );
    }
    std::fs::write(scratch.join("image.tar.gz"), gzip(b"not even a tar")).unwrap();
    let error = fails(
        &RootfsSource::Oci(scratch.join("image.tar.gz")),
        &options(Filesystem::Ext4),
        &Scratch::new("rootfs-compressed-out"),
    );
    assert_matches!(
        error,
        BuildRootfsError::Image {
            source: ReadImageError::Compressed { .. },
            ..
        }
    );
}

#[test]
fn an_image_only_for_another_architecture_is_refused_naming_it() {
    let scratch = Scratch::new("rootfs-arch");
    let image = oci_layout(
        &scratch.join("image"),
        &[layer(&[E::File("f", b"x")])],
        app(&["/f"]),
        Some("arm64"),
    );
    let error = fails(
        &RootfsSource::Oci(image),
        &options(Filesystem::Ext4),
        &scratch,
    );
    match &error {
        BuildRootfsError::Image {
            source: ReadImageError::Platform { found },
            ..
        } => assert_eq!(found, "linux/arm64"),
        other => panic!("expected a platform error, got {other:?}"),
    }
    assert!(
        std::error::Error::source(&error)
            .unwrap()
            .to_string()
            .contains("only for linux/arm64")
    );
}

#[test]
fn an_image_without_a_command_is_refused() {
    let error = build_fails(
        &[layer(&[E::File("f", b"x")])],
        json!({"Env": ["A=1"]}),
        1 << 30,
    );
    assert_matches!(error, BuildRootfsError::App(AppConfigError::NoCommand));
}

#[test]
fn entries_that_climb_out_or_are_absolute_are_refused() {
    let error = layer_refused(&[E::File("a/../../x", b"x")]);
    assert_matches!(error, UnpackError::ParentDir(_));
    let error = layer_refused(&[E::File("/etc/x", b"x")]);
    assert_matches!(error, UnpackError::Absolute(_));
}

#[test]
fn symlinks_never_lead_writes_out_of_the_root() {
    let scratch = Scratch::new("rootfs-symlink");
    let outside = scratch.join("outside");
    std::fs::create_dir(&outside).unwrap();
    // A relative symlink that climbs out is refused outright.
    let error = layer_refused(&[E::Symlink("up", "../../../../../..")]);
    assert_matches!(error, UnpackError::SymlinkEscape { .. });
    // An absolute one is the guest's path: a later layer writing through it writes inside.
    let target = outside.to_str().unwrap().trim_start_matches('/').to_owned();
    let planted = layer(&[E::Symlink("door", &format!("/{target}"))]);
    let through = layer(&[E::File("door/pwned", b"x")]);
    let image = oci_layout(
        &scratch.join("image"),
        &[planted, through],
        app(&["/x"]),
        None,
    );
    let rootfs = build_rootfs(
        &RootfsSource::Oci(image),
        &options(Filesystem::Ext4),
        &scratch.join("out"),
    )
    .unwrap();
    assert_eq!(
        listing(&outside),
        Vec::<String>::new(),
        "a write went through the symlink"
    );
    let tree = read_back(&rootfs, &scratch);
    assert_eq!(
        std::fs::read(tree.join(&target).join("pwned")).unwrap(),
        b"x"
    );
}

#[test]
fn hard_links_out_of_the_root_are_refused() {
    for target in ["../../../etc/passwd", "/etc/passwd", "missing"] {
        let error = layer_refused(&[E::HardLink("link", target)]);
        assert_matches!(error, UnpackError::HardLink { .. });
    }
}

#[test]
fn device_nodes_are_refused() {
    let error = layer_refused(&[E::Dir("dev/"), E::Char("dev/sda")]);
    assert_matches!(error, UnpackError::Device(p) if p == "dev/sda");
}

#[test]
fn an_image_larger_than_the_limit_is_refused_early() {
    // 64 MiB of zeros, 64 KiB compressed: a small decompression bomb.
    let zeros = vec![0u8; 64 << 20];
    let error = build_fails(
        &[gzip(&layer(&[E::File("zeros", &zeros)]))],
        app(&["/x"]),
        1 << 20,
    );
    assert_matches!(
        error,
        BuildRootfsError::Layer {
            source: UnpackError::TooLarge { limit: 1_048_576 },
            ..
        }
    );
}

#[test]
fn a_truncated_layer_is_refused() {
    let whole = gzip(&layer(&[
        E::File("f", &vec![7u8; 100_000]),
        E::File("g", b"x"),
    ]));
    // The digest is of the truncated bytes, so only the truncation can be caught.
    let cut = whole[..whole.len() / 2].to_vec();
    let error = build_fails(&[cut], app(&["/f"]), 1 << 30);
    assert_matches!(
        error,
        BuildRootfsError::Layer {
            source: UnpackError::Truncated,
            ..
        }
    );
    let plain = layer(&[E::File("f", &vec![7u8; 100_000])]);
    let error = build_fails(&[plain[..5000].to_vec()], app(&["/f"]), 1 << 30);
    assert_matches!(
        error,
        BuildRootfsError::Layer {
            source: UnpackError::Truncated,
            ..
        }
    );
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused() {
    let scratch = Scratch::new("rootfs-digest");
    let bytes = layer(&[E::File("f", b"good")]);
    let image = oci_layout(
        &scratch.join("image"),
        std::slice::from_ref(&bytes),
        app(&["/f"]),
        None,
    );
    let evil = layer(&[E::File("f", b"evil")]);
    assert_eq!(evil.len(), bytes.len());
    std::fs::write(image.join("blobs/sha256").join(hex(&bytes)), &evil).unwrap();
    let error = fails(
        &RootfsSource::Oci(image),
        &options(Filesystem::Ext4),
        &scratch,
    );
    assert_matches!(
        error,
        BuildRootfsError::Layer {
            source: UnpackError::Blob(microvm::rootfs::BlobError::Digest { .. }),
            ..
        }
    );
}

#[test]
fn a_nested_multi_platform_index_gives_its_linux_amd64_image() {
    let scratch = Scratch::new("rootfs-nested");
    let dir = scratch.join("image");
    oci_layout(
        &dir,
        &[layer(&[E::File("f", b"amd64")])],
        app(&["/f"]),
        None,
    );
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let mut amd64 = index["manifests"][0].clone();
    amd64["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let mut arm64 = amd64.clone();
    arm64["platform"] = json!({"architecture": "arm64", "os": "linux", "variant": "v8"});
    arm64["digest"] = json!(format!("sha256:{}", "0".repeat(64))); // never read
    let mut attestation = amd64.clone();
    attestation["platform"] = json!({"architecture": "unknown", "os": "unknown"});
    let list = json!({"schemaVersion": 2, "manifests": [arm64, attestation, amd64]});
    let nested = blob(
        &dir,
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&list).unwrap(),
    );
    let top = json!({"schemaVersion": 2, "manifests": [nested]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    let rootfs = build_rootfs(
        &RootfsSource::Oci(dir),
        &options(Filesystem::Erofs),
        &scratch.join("out"),
    )
    .unwrap();
    assert_eq!(
        std::fs::read(read_back(&rootfs, &scratch).join("f")).unwrap(),
        b"amd64"
    );
}

#[test]
fn a_read_only_directory_still_takes_the_next_layers_files_and_keeps_its_mode() {
    use std::os::unix::fs::PermissionsExt as _;
    let scratch = Scratch::new("rootfs-read-only");
    let lower = layer(&[E::ReadOnlyDir("ro/"), E::File("ro/a", b"1")]);
    let upper = layer(&[E::File("ro/b", b"2"), E::File("ro/.wh.a", b"")]);
    let image = oci_layout(&scratch.join("image"), &[lower, upper], app(&["/x"]), None);
    let out = scratch.join("out");
    let rootfs =
        build_rootfs(&RootfsSource::Oci(image), &options(Filesystem::Erofs), &out).unwrap();
    assert_eq!(
        listing(&out).len(),
        3,
        "a disk, its description and rootfs.json: {:?}",
        listing(&out)
    );
    let tree = read_back(&rootfs, &scratch);
    assert_eq!(listing(&tree.join("ro")), ["b"]);
    let mode = std::fs::metadata(tree.join("ro"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o555);
    // So that the scratch directory can be removed by a user other than root.
    std::fs::set_permissions(tree.join("ro"), std::fs::Permissions::from_mode(0o755)).unwrap();
}
