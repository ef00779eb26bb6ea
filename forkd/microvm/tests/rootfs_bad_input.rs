//! Every bad input to a root filesystem build gets a clear error and leaves the output
//! directory as it was (and an output directory the build made is gone): a path that is no
//! image, another architecture, no command, entries that climb out, links out of the root,
//! device nodes, an image over the limit, a truncated layer, a digest that does not match.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

#[macro_use]
mod layers;

use layers::*;

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
