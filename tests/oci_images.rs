//! The container images `scripts/build-images` makes, checked as a cluster would use them:
//! each built twice from the same inputs to the same digests, their configuration what the Helm
//! chart expects, and each root filesystem, unpacked with umoci, running Squall from inside
//! it alone (`tests/images/enter`: mount and PID namespaces of its own, chroot, the image's
//! user): `squall --version`, `squall forkd` answering `/healthz`, `squall up` serving the
//! demo app through a fork clone, and for `squall-forkd-vm` a vm clone under the accelerator
//! this host allows.
//!
//! Needs root, umoci, mmdebstrap and skopeo (scripts/install-deps); the first build of the static
//! binary takes minutes (scripts/test builds it before the suite).
#![allow(clippy::unwrap_used)] // In tests a panic is a failed test, which is the point.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{APP_ARGS, Case, Forkd, TOKEN, Up, get};

/// The user both images run as: the chart's `runAsUser` and `runAsGroup`.
const USER: &str = "65532:65532";

/// One image as `scripts/build-images` reports it in `images.txt`.
#[derive(Debug, PartialEq)]
struct Built {
    name: String,
    tag: String,
    digest: String,
    bytes: u64,
}

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds `image` into `out` with `scripts/build-images`; returns what it reports.
fn build(image: &str, out: &Path) -> Built {
    let started = std::time::Instant::now();
    let status = Command::new(repository().join("scripts/build-images"))
        .arg(out)
        .env("IMAGES", image)
        // The same instant for every build of the test, whatever the checkout's history.
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .status()
        .unwrap();
    assert!(status.success(), "scripts/build-images {image}: {status}");
    let report = std::fs::read_to_string(out.join("images.txt")).unwrap();
    let line = report
        .lines()
        .find(|line| line.starts_with(&format!("{image} ")))
        .unwrap_or_else(|| panic!("{image} not in images.txt: {report}"));
    let fields: Vec<&str> = line.split(' ').collect();
    let built = Built {
        name: fields[0].to_owned(),
        tag: fields[1].to_owned(),
        digest: fields[2].to_owned(),
        bytes: fields[3].parse().unwrap(),
    };
    eprintln!(
        "built {built:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    built
}

/// Unpacks the image's layout at `out/NAME` into `bundle` with umoci; returns its root.
fn unpack(out: &Path, built: &Built, bundle: &Path) -> PathBuf {
    let image = format!("{}:{}", out.join(&built.name).display(), built.tag);
    let output = Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(bundle)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "umoci unpack {image}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    bundle.join("rootfs")
}

/// The image's configuration, from its layout.
fn config(out: &Path, built: &Built) -> serde_json::Value {
    let blob = |digest: &str| -> serde_json::Value {
        let hex = digest.strip_prefix("sha256:").unwrap();
        let path = out.join(&built.name).join("blobs/sha256").join(hex);
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let manifest = blob(&built.digest);
    blob(manifest["config"]["digest"].as_str().unwrap())
}

/// `COMMAND...` run inside `root` alone, as the images' user.
fn inside(root: &Path, command: &[&str]) -> Command {
    let mut enter = Command::new(repository().join("tests/images/enter"));
    enter.arg(root).arg(USER).args(command);
    enter
}

/// Writes `text` to `path` inside the root, readable by the images' user.
fn write_inside(root: &Path, path: &str, text: &str) {
    let file = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(file, text).unwrap();
}

/// Checks what both images share: the chart's user, `squall` on the PATH, the version.
fn check_config(out: &Path, built: &Built) {
    let config = config(out, built);
    assert_eq!(config["config"]["User"], USER, "{config}");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/squall"])
    );
    let env = config["config"]["Env"].to_string();
    assert!(env.contains("PATH=/usr/local/bin:"), "{env}");
    assert_eq!(built.tag, env!("CARGO_PKG_VERSION"));
}

/// The archive is what `docker load` (docker's `manifest.json`, every docker version) and
/// `podman load` (the OCI index) read: skopeo, which implements both formats as those tools
/// do, finds the same image through each.
fn check_archive(out: &Path, built: &Built) {
    let archive = out.join(format!("{}.tar", built.name));
    let inspect = |reference: String| -> serde_json::Value {
        let output = Command::new("skopeo")
            .args(["inspect", &reference])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "skopeo inspect {reference}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let oci = inspect(format!("oci-archive:{}:{}", archive.display(), built.tag));
    assert_eq!(oci["Digest"], built.digest.as_str(), "{oci}");
    let docker = inspect(format!("docker-archive:{}", archive.display()));
    // Docker's format names layers by their uncompressed digests: the config's diff_ids.
    assert_eq!(
        docker["Layers"],
        config(out, built)["rootfs"]["diff_ids"],
        "{docker}"
    );
    assert_eq!(
        docker["Labels"]["org.opencontainers.image.title"],
        built.name.as_str()
    );
}

/// `squall --version` from inside the root prints the version.
fn check_version(root: &Path) {
    let output = inside(root, &["/usr/local/bin/squall", "--version"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        stdout.trim(),
        format!("squall {}", env!("CARGO_PKG_VERSION"))
    );
}

/// `squall forkd` from inside the root answers `/healthz`.
fn check_forkd(root: &Path, case: &Case) {
    write_inside(root, "/etc/squall/token", &format!("{TOKEN}\n"));
    let command = inside(
        root,
        &[
            "squall",
            "forkd",
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            "/etc/squall/token",
        ],
    );
    let forkd = Forkd::spawn(command, &case.token_file, &case.marker);
    let reply = test_support::wait_until("forkd answers", Duration::from_secs(30), || {
        test_support::http::try_get(forkd.addr(), "/healthz").ok()
    });
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// `squall up` from inside the root, with `driver`, serves the demo app (run as `app`)
/// through a clone; returns it running.
fn up_inside(root: &Path, case: &Case, driver: &str, policy: &str, app: &[&str]) -> Up {
    write_inside(root, "/etc/squall/policy.yaml", policy);
    let mut args = vec![
        "squall",
        "up",
        "--driver",
        driver,
        "--policy",
        "/etc/squall/policy.yaml",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--",
    ];
    args.extend(app);
    args.extend(APP_ARGS);
    let mut command = inside(root, &args);
    command.stderr(Stdio::inherit());
    Up::spawn(command, &case.marker, None)
}

#[test]
fn the_squall_image_is_reproducible_and_runs_squall_from_its_root_alone() {
    let case = Case::new("oci-squall");
    let (first, second) = (case.scratch.join("first"), case.scratch.join("second"));
    let built = build("squall", &first);
    let again = build("squall", &second);
    assert_eq!(built, again, "the same inputs, another digest");
    assert_eq!(
        std::fs::read(first.join("squall.tar")).unwrap(),
        std::fs::read(second.join("squall.tar")).unwrap(),
        "the archives differ"
    );
    check_config(&first, &built);
    check_archive(&first, &built);

    let root = unpack(&first, &built, &case.scratch.join("bundle"));
    // An empty base: the binary, the user's entries, the lookup order and /tmp.
    let mut files: Vec<String> = walk(&root)
        .into_iter()
        .map(|path| path.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "etc/group",
            "etc/nsswitch.conf",
            "etc/passwd",
            "usr/local/bin/squall"
        ]
    );
    check_version(&root);
    check_forkd(&root, &case);
    let up = up_inside(
        &root,
        &case,
        "fork",
        "name: image\ntemplate: app\nworkers: {min: 1, max: 2}\ntarget: {concurrency: 2}\n",
        &["/usr/local/bin/squall", "warm-app"],
    );
    up.wait_for("a fork clone", Duration::from_secs(60), |n| n >= 1);
    let reply = get(up.listen, "/random");
    assert_eq!(reply.0, 200, "{}", reply.1);
}

#[test]
fn the_forkd_vm_image_runs_a_vm_clone_from_its_root_alone() {
    let case = Case::new("oci-forkd-vm");
    let out = case.scratch.join("out");
    let built = build("squall-forkd-vm", &out);
    // Built again from the same packages (the mirror serves the same versions): the same
    // image, to the byte.
    let again = build("squall-forkd-vm", &case.scratch.join("again"));
    assert_eq!(built, again, "the same inputs, another digest");
    std::fs::remove_dir_all(case.scratch.join("again")).unwrap();
    check_config(&out, &built);
    check_archive(&out, &built);
    let root = unpack(&out, &built, &case.scratch.join("bundle"));
    check_version(&root);
    check_forkd(&root, &case);
    // The guest listens on port 80; the image's QEMU, kernel and busybox make and run it.
    let up = up_inside(
        &root,
        &case,
        "vm",
        "name: image\ntemplate: app\nworkers: {min: 1, max: 1}\ntarget: {concurrency: 2}\n",
        &[
            "/usr/local/bin/squall",
            "warm-app",
            "--listen",
            "0.0.0.0:80",
        ],
    );
    up.wait_for("a vm clone", Duration::from_secs(240), |n| n >= 1);
    let reply = get(up.listen, "/random");
    assert_eq!(reply.0, 200, "{}", reply.1);
    common::assert_expected_accelerator(&case.marker);
}

/// Every file (not directory) under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.is_symlink() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
