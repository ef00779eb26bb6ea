#![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

use super::*;

/// A scratch directory with a state file and a sparse RAM file: two runs of non-zero pages
/// (one longer than a run may be), zero pages between them, and a hole.
struct Saved {
    dir: PathBuf,
    state: PathBuf,
    ram: PathBuf,
}

impl Saved {
    fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("squall-portable-{}", crate::run_files::unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let (state, ram) = (dir.join("t.state"), dir.join("t.ram"));
        std::fs::write(&state, b"device state").unwrap();
        let file = std::fs::File::create(&ram).unwrap();
        file.set_len(8 << 20).unwrap();
        let noise: Vec<u8> = (0..(RUN_BYTES + 3 * PAGE))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        file.write_all_at(&noise, 4 * PAGE as u64).unwrap();
        file.write_all_at(&[0u8; PAGE], 4 * PAGE as u64 + 2 * PAGE as u64)
            .unwrap();
        file.write_all_at(b"last page", (8 << 20) - PAGE as u64)
            .unwrap();
        Self { dir, state, ram }
    }

    fn header(&self) -> SnapshotHeader {
        SnapshotHeader {
            template: "web".into(),
            compat: compat(),
            image: Image::nowhere(),
            ram_bytes: std::fs::metadata(&self.ram).unwrap().len(),
            annotations: serde_json::json!({ "spec": "kept" }),
        }
    }

    fn stream(&self) -> Vec<u8> {
        let mut out = Vec::new();
        write(&self.header(), &self.state, &self.ram, &mut out).unwrap();
        out
    }

    /// Reads `stream` into new files next to the saved ones, returning what `read` said and
    /// whether it left its files.
    fn read_back(&self, stream: &[u8], here: Compatibility) -> Result<TransferStats, ReadError> {
        let (state, ram) = (self.dir.join("r.state"), self.dir.join("r.ram"));
        let result = read(stream, |_| Ok(here), &state, &ram);
        if result.is_err() {
            let _ = std::fs::remove_file(&state);
            let _ = std::fs::remove_file(&ram);
        }
        result.map(|(header, stats)| {
            assert_eq!(header, self.header());
            stats
        })
    }
}

impl Drop for Saved {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn compat() -> Compatibility {
    Compatibility {
        qemu: "QEMU emulator version 10.0.0".into(),
        accel: Accel::Tcg,
        cpu: "max".into(),
        machine: vec!["-M microvm".into(), "-m 256M".into()],
        tsc_khz: Some(2_000_000),
        rootfs: None,
    }
}

#[test]
fn a_snapshot_read_back_is_byte_for_byte_the_one_written_without_its_zero_pages() {
    let saved = Saved::new();
    let stream = saved.stream();
    let stats = saved.read_back(&stream, compat()).unwrap();
    assert_eq!(
        std::fs::read(saved.dir.join("r.ram")).unwrap(),
        std::fs::read(&saved.ram).unwrap()
    );
    assert_eq!(
        std::fs::read(saved.dir.join("r.state")).unwrap(),
        b"device state"
    );
    // Only the non-zero pages travel, compressed.
    let non_zero = (RUN_BYTES + 3 * PAGE - PAGE) as u64 + PAGE as u64;
    assert_eq!(stats.ram_bytes, non_zero);
    assert!(stats.compressed_bytes < stats.ram_bytes / 2, "{stats:?}");
    assert_eq!(stats.stream_bytes, stream.len() as u64);
    // The copy is as sparse as the original: the holes were not written.
    use std::os::unix::fs::MetadataExt as _;
    let blocks = std::fs::metadata(saved.dir.join("r.ram")).unwrap().blocks() * 512;
    assert!(blocks < 4 << 20, "{blocks} bytes allocated for 8 MiB");
}

#[test]
fn a_corrupted_cut_or_padded_stream_is_refused() {
    let saved = Saved::new();
    let stream = saved.stream();
    let header_end = 12 + u32::from_le_bytes(stream[8..12].try_into().unwrap()) as usize;
    // A byte flipped anywhere after the header: in the state, a run, or the digest.
    for at in [
        header_end + 9,
        stream.len() / 2,
        stream.len() - 40,
        stream.len() - 1,
    ] {
        let mut bad = stream.clone();
        bad[at] ^= 0x40;
        let err = saved.read_back(&bad, compat()).unwrap_err();
        assert!(
            matches!(err, ReadError::Corrupt(_)),
            "a flipped byte at {at}: {err}"
        );
    }
    for len in [5, header_end + 3, stream.len() / 2, stream.len() - 1] {
        let err = saved.read_back(&stream[..len], compat()).unwrap_err();
        assert!(matches!(err, ReadError::Io(_)), "cut at {len}: {err}");
    }
    // A run sent twice: the second one starts before the first one ended.
    let run = header_end + 8 + "device state".len();
    let first_run_len =
        16 + u32::from_le_bytes(stream[run + 12..run + 16].try_into().unwrap()) as usize;
    let mut repeated = stream[..run + first_run_len].to_vec();
    repeated.extend_from_slice(&stream[run..]);
    let err = saved.read_back(&repeated, compat()).unwrap_err();
    assert!(err.to_string().contains("the last run ended at"), "{err}");
    // Lengths beyond the bounds are refused before anything that large is read or allocated.
    let spoil = |at: usize, bytes: &[u8]| {
        let mut bad = stream.clone();
        bad[at..at + bytes.len()].copy_from_slice(bytes);
        saved.read_back(&bad, compat()).unwrap_err().to_string()
    };
    let huge = u32::MAX.to_le_bytes();
    assert!(spoil(8, &huge).contains("a header of"), "header");
    assert!(
        spoil(header_end, &u64::MAX.to_le_bytes()).contains("a state of"),
        "state"
    );
    assert!(spoil(run + 8, &huge).contains("a RAM run of"), "run length");
    assert!(
        spoil(run, &(1u64 << 40).to_le_bytes()).contains("a RAM run of"),
        "run offset"
    );
    assert!(
        spoil(run + 12, &huge).contains("a compressed run of"),
        "compressed length"
    );
    let mut padded = stream.clone();
    padded.push(0);
    let err = saved.read_back(&padded, compat()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the snapshot is corrupt: bytes after its digest"
    );
    let err = saved
        .read_back(b"GET / HTTP/1.1\r\n\r\n", compat())
        .unwrap_err();
    assert!(matches!(err, ReadError::Magic), "{err}");
}

#[test]
fn a_snapshot_from_another_kind_of_host_is_refused_before_its_ram_is_written() {
    let saved = Saved::new();
    let stream = saved.stream();
    type Change = fn(&mut Compatibility);
    let cases: [(&str, Change); 5] = [
        ("QEMU", |c| c.qemu = "QEMU emulator version 7.2.0".into()),
        ("accelerator", |c| c.accel = Accel::Kvm),
        ("CPU", |c| c.cpu = "Other (flags 00)".into()),
        ("machine", |c| {
            c.machine.push("-device virtio-blk-device".into())
        }),
        ("root filesystem", |c| c.rootfs = Some("sha256:ab".into())),
    ];
    let (state, ram) = (saved.dir.join("x.state"), saved.dir.join("x.ram"));
    for (what, change) in cases {
        let mut here = compat();
        change(&mut here);
        let err = read(&stream[..], |_| Ok(here), &state, &ram).unwrap_err();
        match err {
            ReadError::Incompatible(e) => assert_eq!(e.what, what, "{e}"),
            other => panic!("{what}: {other}"),
        }
        assert!(
            !state.exists() && !ram.exists(),
            "{what}: files written before the refusal"
        );
    }
    // Another TSC rate (a clock that scales, or another host model) is restored, with a
    // warning: the rate read from /proc/cpuinfo moves on one and the same host.
    let mut other = compat();
    other.tsc_khz = Some(u64::MAX);
    saved.read_back(&stream, other).unwrap();
}

#[test]
fn a_refusal_by_the_caller_stops_the_read_with_its_reason() {
    let saved = Saved::new();
    let stream = saved.stream();
    let (state, ram) = (saved.dir.join("x.state"), saved.dir.join("x.ram"));
    let err = read(
        &stream[..],
        |h| Err(ReadError::Refused(format!("not {}", h.template))),
        &state,
        &ram,
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "the snapshot was refused: not web");
    assert!(!state.exists() && !ram.exists());
}
