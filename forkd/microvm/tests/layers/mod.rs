//! Container images written here byte by byte (layers with raw tar headers, so that bad
//! paths can be written too; OCI layouts and archives around them), and what the root
//! filesystem tests do with them: build, expect a failure that leaves nothing behind, read a
//! disk back.
#![allow(dead_code, unused_imports)] // Each test binary uses its own part.

pub(crate) use std::path::{Path, PathBuf};
pub(crate) use std::process::Command;

pub(crate) use microvm::rootfs::{AppConfigError, ReadImageError, UnpackError};
pub(crate) use microvm::{
    BuildRootfsError, Filesystem, Rootfs, RootfsOptions, RootfsSource, build_rootfs,
};
pub(crate) use serde_json::{Value, json};
pub(crate) use sha2::{Digest as _, Sha256};
pub(crate) use tar::{EntryType, Header};
pub(crate) use test_support::Scratch;

/// Asserts that `error` matches `pattern`, showing it if not.
macro_rules! assert_matches {
    ($error:expr, $pattern:pat $(if $guard:expr)?) => {
        let error = &$error;
        assert!(matches!(error, $pattern $(if $guard)?), "{error:?}");
    };
}

/// One entry of a layer, written with raw headers so that bad paths can be written too.
pub(crate) enum E<'a> {
    Dir(&'a str),
    ReadOnlyDir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    Char(&'a str),
}

pub(crate) fn header(path: &str, kind: EntryType, size: u64, mode: u32, link: &str) -> Header {
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
pub(crate) fn layer(entries: &[E<'_>]) -> Vec<u8> {
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

pub(crate) fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

pub(crate) fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Stores `bytes` as a blob of the layout at `dir`; returns its descriptor.
pub(crate) fn blob(dir: &Path, media_type: &str, bytes: &[u8]) -> Value {
    let hex = hex(bytes);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(&hex), bytes).unwrap();
    json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
}

/// An image config running `run` (the `config` object) for `arch`, with these layers.
pub(crate) fn config(arch: &str, run: Value, layers: &[Vec<u8>]) -> Value {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", hex(l)))
        .collect();
    json!({"architecture": arch, "os": "linux", "config": run,
           "rootfs": {"type": "layers", "diff_ids": diff_ids}})
}

/// Writes an OCI layout of one image to `dir`; `platform` goes into the index entry.
pub(crate) fn oci_layout(
    dir: &Path,
    layers: &[Vec<u8>],
    run: Value,
    platform: Option<&str>,
) -> PathBuf {
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
pub(crate) fn archive(dir: &Path, out: &Path) -> PathBuf {
    let mut builder = tar::Builder::new(std::fs::File::create(out).unwrap());
    builder.append_dir_all(".", dir).unwrap();
    builder.finish().unwrap();
    out.to_owned()
}

pub(crate) fn app(cmd: &[&str]) -> Value {
    json!({"Cmd": cmd})
}

pub(crate) fn options(fs: Filesystem) -> RootfsOptions {
    RootfsOptions {
        fs,
        ..RootfsOptions::default()
    }
}

/// The names in `dir`, sorted.
pub(crate) fn listing(dir: &Path) -> Vec<String> {
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
pub(crate) fn build_fails(layers: &[Vec<u8>], run: Value, max_size: u64) -> BuildRootfsError {
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
pub(crate) fn layer_refused(entries: &[E<'_>]) -> UnpackError {
    match build_fails(&[layer(entries)], app(&["/x"]), 1 << 30) {
        BuildRootfsError::Layer { source, .. } => source,
        other => panic!("expected a layer's error, got {other:?}"),
    }
}

pub(crate) fn fails(
    source: &RootfsSource,
    options: &RootfsOptions,
    scratch: &Scratch,
) -> BuildRootfsError {
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
pub(crate) fn read_back(rootfs: &Rootfs, scratch: &Scratch) -> PathBuf {
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
