//! Building root filesystem disks from images made here, byte by byte: good ones give a
//! disk (checked with e2fsck / fsck.erofs, and read back) and the app's configuration, and an
//! unchanged image is not built again. Bad ones are in `rootfs_bad_input.rs`.
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

#[macro_use]
mod layers;

use layers::*;

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
