//! Tests of unpacking: path resolution, and layers that try to reach outside the root.

use test_support::Scratch;

use super::*;

/// One entry of a test layer; paths are bytes, so they need not be UTF-8.
enum E<'a> {
    /// A directory with its mode and owner.
    Dir(&'a [u8], u32, u64),
    /// A file with its contents.
    File(&'a [u8], &'a [u8]),
    /// A symlink and its target.
    Symlink(&'a [u8], &'a str),
}

/// A tar layer of `entries`.
fn layer(entries: &[E<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(1_000);
        match *entry {
            E::Dir(path, mode, uid) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(mode);
                header.set_uid(uid);
                header.set_gid(uid);
                header.set_size(0);
                let path = Path::new(OsStr::from_bytes(path));
                builder.append_data(&mut header, path, io::empty()).unwrap();
            }
            E::File(path, data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(data.len() as u64);
                let path = Path::new(OsStr::from_bytes(path));
                builder.append_data(&mut header, path, data).unwrap();
            }
            E::Symlink(path, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                let path = Path::new(OsStr::from_bytes(path));
                builder.append_link(&mut header, path, target).unwrap();
            }
        }
    }
    builder.into_inner().unwrap()
}

/// Mode, mtime and owner of `path`: what a stray chmod, touch or chown would change.
fn attributes(path: &Path) -> (u32, i64, u32, u32) {
    let metadata = fs::symlink_metadata(path).unwrap();
    (
        metadata.mode(),
        metadata.mtime(),
        metadata.uid(),
        metadata.gid(),
    )
}

/// A scratch directory with an empty `root` and, beside it, `outside/sub` (mode 0750,
/// mtime 1,000,000): a host directory a layer must not reach.
fn root_and_outside(name: &str) -> (Scratch, PathBuf, PathBuf) {
    let scratch = Scratch::new(name);
    let root = scratch.join("root");
    let outside = scratch.join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir_all(outside.join("sub")).unwrap();
    fs::set_permissions(outside.join("sub"), fs::Permissions::from_mode(0o750)).unwrap();
    let time = filetime::FileTime::from_unix_time(1_000_000, 0);
    filetime::set_file_times(outside.join("sub"), time, time).unwrap();
    (scratch, root, outside)
}

#[test]
fn symlinks_that_climb_out_are_told_apart() {
    assert!(symlink_stays_inside(0, Path::new("/etc/passwd")));
    assert!(symlink_stays_inside(2, Path::new("../../x")));
    assert!(!symlink_stays_inside(2, Path::new("../../../x")));
    assert!(!symlink_stays_inside(0, Path::new("a/../../x")));
    assert!(symlink_stays_inside(0, Path::new("a/b/../c")));
}

#[test]
fn resolve_keeps_symlinks_inside_the_root() {
    let scratch = Scratch::new("resolve");
    let root = scratch.join("root");
    fs::create_dir_all(root.join("real")).unwrap();
    std::os::unix::fs::symlink("/", root.join("up")).unwrap();
    std::os::unix::fs::symlink("../../../../real", root.join("climb")).unwrap();
    let resolved = resolve_in(&root, &["up".into(), "real".into()], "", Lookup::Dir).unwrap();
    assert_eq!(resolved, root.join("real"));
    let resolved = resolve_in(&root, &["climb".into()], "", Lookup::Dir).unwrap();
    assert_eq!(resolved, root.join("real"));
    std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
    assert!(matches!(
        resolve_in(&root, &["loop".into()], "", Lookup::Dir),
        Err(UnpackError::SymlinkLoop(_))
    ));
}

#[test]
fn a_symlink_replacing_a_directory_does_not_lead_its_attributes_out() {
    let (_scratch, root, outside) = root_and_outside("unpack-stale-dir");
    let before = attributes(&outside.join("sub"));
    let target = outside.to_str().unwrap();
    let mut unpacker = Unpacker::new(&root, 1 << 30).unwrap();
    let bytes = layer(&[
        E::Dir(b"a/", 0o755, 0),
        E::Dir(b"a/sub/", 0o777, 1000),
        E::File(b"a/sub/f", b"x"),
        E::Symlink(b"a", target),
    ]);
    unpacker.apply(&bytes[..]).unwrap();
    unpacker.finish().unwrap();
    assert_eq!(attributes(&outside.join("sub")), before);
    assert!(fs::symlink_metadata(root.join("a")).unwrap().is_symlink());
}

#[test]
fn a_later_layer_replacing_a_directory_by_a_symlink_does_not_lead_its_attributes_out() {
    let (_scratch, root, outside) = root_and_outside("unpack-stale-dir-layers");
    let before = attributes(&outside.join("sub"));
    let mut unpacker = Unpacker::new(&root, 1 << 30).unwrap();
    let lower = layer(&[E::Dir(b"a/", 0o755, 0), E::Dir(b"a/sub/", 0o777, 1000)]);
    unpacker.apply(&lower[..]).unwrap();
    let upper = layer(&[E::Symlink(b"a", outside.to_str().unwrap())]);
    unpacker.apply(&upper[..]).unwrap();
    unpacker.finish().unwrap();
    assert_eq!(attributes(&outside.join("sub")), before);
}

#[test]
fn finishing_never_follows_a_symlink_on_a_recorded_path() {
    let (_scratch, root, outside) = root_and_outside("unpack-finish-nofollow");
    let before = attributes(&outside.join("sub"));
    std::os::unix::fs::symlink(&outside, root.join("a")).unwrap();
    std::os::unix::fs::symlink(outside.join("sub"), root.join("b")).unwrap();
    fs::create_dir(root.join("real")).unwrap();
    let mut unpacker = Unpacker::new(&root, 1 << 30).unwrap();
    let meta = DirMeta {
        mode: 0o777,
        owner: Some((1000, 1000)),
        mtime: 5,
    };
    // Stale records, as the bug left them: through a symlink, and a symlink itself.
    unpacker.dirs.record(root.join("a/sub"), meta);
    unpacker.dirs.record(root.join("b"), meta);
    unpacker.dirs.record(
        root.join("real"),
        DirMeta {
            mode: 0o701,
            ..meta
        },
    );
    unpacker.finish().unwrap();
    assert_eq!(attributes(&outside.join("sub")), before);
    let real = attributes(&root.join("real"));
    assert_eq!(
        (real.0 & 0o7777, real.1),
        (0o701, 5),
        "a real directory is still set"
    );
}

/// A tar stream holding one `kind` header (a PAX or GNU long-name one) whose data is
/// `size` bytes (`f` then zeros), then a file `f` holding `x`.
fn huge_header(kind: tar::EntryType, size: usize) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size as u64);
    header.set_cksum();
    let mut bytes = header.as_bytes().to_vec();
    bytes.push(b'f');
    bytes.resize(bytes.len() + size.next_multiple_of(512) - 1, 0);
    bytes.extend(layer(&[E::File(b"f", b"x")]));
    bytes
}

#[test]
fn a_tiny_layer_with_a_huge_header_is_refused_at_the_limit() {
    let scratch = Scratch::new("unpack-huge-header");
    for kind in [
        tar::EntryType::XHeader,
        tar::EntryType::XGlobalHeader,
        tar::EntryType::GNULongName,
        tar::EntryType::GNULongLink,
    ] {
        let root = scratch.join(format!("{kind:?}"));
        fs::create_dir(&root).unwrap();
        // 64 MiB of header, a few KB compressed, against a 1 MiB limit.
        let bytes = zstd::encode_all(&huge_header(kind, 64 << 20)[..], 3).unwrap();
        assert!(bytes.len() < 64 << 10, "{} bytes compressed", bytes.len());
        let mut unpacker = Unpacker::new(&root, 1 << 20).unwrap();
        let error = unpacker.apply(&bytes[..]).unwrap_err();
        assert!(
            matches!(
                error,
                UnpackError::DecompressedTooLarge { limit: 1_048_576 }
            ),
            "{kind:?}: {error:?}"
        );
    }
}

#[test]
fn the_layers_decompressed_bytes_count_together_padding_included() {
    let scratch = Scratch::new("unpack-padding");
    let root = scratch.join("root");
    fs::create_dir(&root).unwrap();
    // A file of one byte, then 600 KiB of zeros past the end of the archive.
    let mut padded = layer(&[E::File(b"f", b"x")]);
    padded.resize(600 << 10, 0);
    let padded = gzip(&padded);
    let mut unpacker = Unpacker::new(&root, 1 << 20).unwrap();
    unpacker.apply(&padded[..]).unwrap();
    let error = unpacker.apply(&padded[..]).unwrap_err();
    assert!(
        matches!(
            error,
            UnpackError::DecompressedTooLarge { limit: 1_048_576 }
        ),
        "{error:?}"
    );
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    io::Write::write_all(&mut encoder, bytes).unwrap();
    encoder.finish().unwrap()
}

#[test]
fn directories_and_long_symlinks_cost_a_block() {
    let scratch = Scratch::new("unpack-costs");
    let root = scratch.join("root");
    fs::create_dir(&root).unwrap();
    let long = "t".repeat(60);
    let bytes = layer(&[
        E::Dir(b"d/", 0o755, 0),
        E::Symlink(b"short", &long[..59]),
        E::Symlink(b"long", &long),
        E::File(b"f", b"0123456789"),
    ]);
    let mut unpacker = Unpacker::new(&root, 1 << 20).unwrap();
    unpacker.apply(&bytes[..]).unwrap();
    assert_eq!(unpacker.finish().unwrap(), 4096 + 512 + 4096 + 512 + 10);
}

#[test]
fn an_image_with_more_entries_than_the_limit_is_refused() {
    let scratch = Scratch::new("unpack-entries");
    let root = scratch.join("root");
    fs::create_dir(&root).unwrap();
    let mut unpacker = Unpacker::new(&root, 1 << 20).unwrap();
    unpacker.max_entries = 3;
    let lower = layer(&[E::Dir(b"d/", 0o755, 0), E::File(b"d/a", b"a")]);
    unpacker.apply(&lower[..]).unwrap();
    // The third entry is the last allowed, all layers together.
    let upper = layer(&[E::File(b"d/b", b"b"), E::File(b"d/c", b"c")]);
    let error = unpacker.apply(&upper[..]).unwrap_err();
    assert!(
        matches!(error, UnpackError::TooManyEntries { limit: 3 }),
        "{error:?}"
    );
    assert!(root.join("d/b").exists() && !root.join("d/c").exists());
}

#[test]
fn a_whiteout_removes_a_name_that_is_not_utf8() {
    let scratch = Scratch::new("unpack-whiteout-bytes");
    let root = scratch.join("root");
    fs::create_dir(&root).unwrap();
    let mut unpacker = Unpacker::new(&root, 1 << 20).unwrap();
    let lower = layer(&[
        E::File(b"caf\xe9", b"x"),
        E::File("caf\u{fffd}".as_bytes(), b"y"),
    ]);
    unpacker.apply(&lower[..]).unwrap();
    let upper = layer(&[E::File(b".wh.caf\xe9", b"")]);
    unpacker.apply(&upper[..]).unwrap();
    unpacker.finish().unwrap();
    let mut names: Vec<Vec<u8>> = fs::read_dir(&root)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().as_bytes().to_vec())
        .collect();
    names.sort();
    // Only the non-UTF-8 name is gone, not the one it reads as when made UTF-8 lossily.
    assert_eq!(names, ["caf\u{fffd}".as_bytes().to_vec()]);
}

/// Found by the check of the unpack_layers fuzz target (microvm::rootfs::fuzzing), on an
/// input written for it: a symlink's target was judged from the depth of the entry's path,
/// not from where the link really is, so a path through a symlink to `.` let a link climb
/// out of the root, and one through a deeper symlink was refused though it stayed inside.
#[test]
fn a_symlinks_target_is_judged_from_where_the_link_really_is() {
    let (_scratch, root, _outside) = root_and_outside("unpack-symlink-depth");
    let mut unpacker = Unpacker::new(&root, 1 << 30).unwrap();
    let climbing = layer(&[
        E::Symlink(b"here", "."),
        E::Symlink(b"here/sub/link", "../../outside"),
    ]);
    assert!(matches!(
        unpacker.apply(&climbing[..]),
        Err(UnpackError::SymlinkEscape { .. })
    ));
    let mut unpacker = Unpacker::new(&root, 1 << 30).unwrap();
    let inside = layer(&[
        E::Dir(b"a/b/c/", 0o755, 0),
        E::Symlink(b"deep", "a/b/c"),
        E::Symlink(b"deep/link", "../../x"),
    ]);
    unpacker.apply(&inside[..]).unwrap();
    unpacker.finish().unwrap();
    assert_eq!(
        fs::read_link(root.join("a/b/c/link")).unwrap(),
        Path::new("../../x")
    );
}
