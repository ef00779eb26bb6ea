//! The kernel crate's unit tests: each system call wrapper against the real kernel.

use std::os::fd::AsFd;

use super::*;

/// Set in the environment of this test binary when a test runs it again to read the
/// memory-merge flag of a freshly started process.
const REPORT_MERGE_FLAG: &str = "KERNEL_TEST_REPORT_MERGE_FLAG";

/// Not a test of its own: run by [`merge_memory_marks_only_the_command_it_is_given`] in a
/// new process, it prints that process's flag as the kernel sees it.
#[test]
fn report_memory_merge_flag() {
    if std::env::var_os(REPORT_MERGE_FLAG).is_some() {
        println!("memory-merge-flag={}", memory_merge_enabled().unwrap());
    }
}

#[test]
fn merge_memory_marks_only_the_command_it_is_given() {
    let version = kernel_version().expect("reading the kernel's version");
    // PR_SET_MEMORY_MERGE is Linux 6.4; the flag is kept across exec since 6.7. Below
    // that, merge_memory_on_exec cannot work, by design of the kernel (Debian 12 runs 6.1).
    if !memory_merge_supported() {
        eprintln!("skipped: Linux {version:?} has no PR_SET_MEMORY_MERGE (it came in 6.4)");
        return;
    }
    if version < (6, 7) {
        eprintln!("skipped: Linux {version:?} clears PR_SET_MEMORY_MERGE at exec (kept from 6.7)");
        return;
    }
    // This test binary, run again to print the flag of the process it becomes.
    let flag_after_exec = |merge: bool| {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", "tests::report_memory_merge_flag", "--nocapture"])
            .env(REPORT_MERGE_FLAG, "1");
        if merge {
            merge_memory_on_exec(&mut command);
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("memory-merge-flag="))
            .unwrap_or_else(|| panic!("no flag reported: {stdout}"));
        line.parse::<bool>().unwrap()
    };
    assert!(flag_after_exec(true), "the flag did not survive exec");
    assert!(
        !flag_after_exec(false),
        "a command not asked for has the flag"
    );
    // Our own process was not touched.
    assert!(!memory_merge_enabled().unwrap());
    // From 6.14 the kernel also reports it per process in /proc/PID/ksm_stat.
    let own = std::fs::read_to_string("/proc/self/ksm_stat").unwrap_or_default();
    if own.contains("ksm_merge_any:") {
        assert!(own.contains("ksm_merge_any: no"), "{own}");
    } else {
        eprintln!(
            "Linux {version:?} does not list ksm_merge_any in ksm_stat (6.14); checked the flag itself"
        );
    }
}

#[test]
fn kernel_versions_are_read_from_the_release() {
    assert_eq!(parse_kernel_version("6.1.0-27-amd64\n"), Some((6, 1)));
    assert_eq!(parse_kernel_version("6.18.44-fc-v1098"), Some((6, 18)));
    assert_eq!(parse_kernel_version("5.10"), Some((5, 10)));
    assert_eq!(parse_kernel_version("garbage"), None);
    assert!(kernel_version().is_some());
}

#[test]
fn a_listening_socket_passes_over_seqpacket() {
    let dir = std::env::temp_dir().join(format!("kernel-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let listener = seqpacket_listen(&path, false).unwrap();
    let client = seqpacket_connect(&path).unwrap();
    let server = accept(listener.as_fd()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    send_message(client.as_fd(), b"clone web-1", Some(tcp.as_fd())).unwrap();
    send_message(client.as_fd(), b"second", None).unwrap();
    let mut buf = [0u8; 64];
    poll_readable(&[server.as_fd()]).unwrap();
    let (len, fd) = recv_message(server.as_fd(), &mut buf).unwrap();
    assert_eq!(&buf[..len], b"clone web-1");
    let received = std::net::TcpListener::from(fd.unwrap());
    assert_eq!(received.local_addr().unwrap(), tcp.local_addr().unwrap());
    // Message boundaries hold, and a message without a descriptor brings none.
    let (len, fd) = recv_message(server.as_fd(), &mut buf).unwrap();
    assert_eq!((&buf[..len], fd.is_none()), (&b"second"[..], true));
    drop(client);
    assert_eq!(
        recv_message(server.as_fd(), &mut buf).unwrap().0,
        0,
        "end of stream"
    );
}

#[test]
fn closing_with_unread_messages_resets_the_peer_but_shutting_down_writes_ends_it() {
    let dir = std::env::temp_dir().join(format!("kernel-shut-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let listener = seqpacket_listen(&path, false).unwrap();
    let pair = || {
        let client = seqpacket_connect(&path).unwrap();
        (client, accept(listener.as_fd()).unwrap())
    };
    let mut buf = [0u8; 64];

    // The server closes with the client's message unread: the client's read fails.
    let (client, server) = pair();
    send_message(client.as_fd(), b"unread", None).unwrap();
    drop(server);
    let reset = recv_message(client.as_fd(), &mut buf).unwrap_err();
    assert_eq!(reset.kind(), io::ErrorKind::ConnectionReset, "{reset}");

    // The server shuts down its sending half: the client reads the end of the stream and
    // may still send; the server reads that, then the client's close.
    let (client, server) = pair();
    send_message(client.as_fd(), b"before", None).unwrap();
    shutdown_write(server.as_fd()).unwrap();
    assert_eq!(recv_message(client.as_fd(), &mut buf).unwrap().0, 0);
    send_message(client.as_fd(), b"after", None).unwrap();
    drop(client);
    let mut read = Vec::new();
    loop {
        match recv_message(server.as_fd(), &mut buf).unwrap().0 {
            0 => break,
            len => read.push(buf[..len].to_vec()),
        }
    }
    assert_eq!(read, [b"before".to_vec(), b"after".to_vec()]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_pidfd_signals_and_reports_exit() {
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let pidfd = Pidfd::open(child.id()).unwrap();
    assert_eq!(try_reap(child.id()).unwrap(), None);
    pidfd.send_signal(libc::SIGKILL).unwrap();
    poll_readable(&[pidfd.as_fd()]).unwrap();
    assert_eq!(
        try_reap(child.id()).unwrap(),
        Some(Exit::Signal(libc::SIGKILL))
    );
    // Signalling a process that is gone is not an error.
    pidfd.send_signal(libc::SIGTERM).unwrap();
    assert!(child.try_wait().is_err(), "already reaped");
}

#[test]
fn an_inherited_lifeline_must_be_a_pipe_and_reads_its_end_once_the_writer_is_gone() {
    let (read, write) = pipe().unwrap();
    let socket = seqpacket_socket(false).unwrap();
    let not_a_pipe = adopt_inherited_pipe(socket.as_raw_fd()).unwrap_err();
    assert_eq!(
        not_a_pipe.kind(),
        io::ErrorKind::InvalidInput,
        "{not_a_pipe}"
    );
    assert!(adopt_inherited_pipe(-1).is_err(), "a closed descriptor");
    // Adopted under a number of its own (as an inherited descriptor would be).
    // SAFETY: dup(2) takes no pointers; the new descriptor is owned once, below.
    let number = unsafe { libc::dup(read.as_raw_fd()) };
    let adopted = adopt_inherited_pipe(number).unwrap();
    drop(write);
    assert_eq!(poll_readable(&[adopted.as_fd()]).unwrap(), [true]);
    let mut byte = [0u8; 1];
    // SAFETY: `byte` is a valid, writable one-byte buffer for the duration of the call.
    let read_now = unsafe { libc::read(adopted.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
    assert_eq!(read_now, 0, "the end of file once the write end closed");
}

#[test]
// The test reaps the child itself, through its pidfd.
#[allow(clippy::zombie_processes)]
fn a_child_is_reaped_through_its_pidfd_and_another_process_is_not() {
    let child = Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
    let pidfd = Pidfd::open(child.id()).unwrap();
    assert_eq!(poll_readable(&[pidfd.as_fd()]).unwrap(), [true]);
    assert!(matches!(try_reap_pidfd(&pidfd), Some(Exit::Code(7))));
    // Our parent is no child of ours: nothing to reap.
    let parent = Pidfd::open(std::os::unix::process::parent_id()).unwrap();
    assert!(try_reap_pidfd(&parent).is_none());
}

#[test]
fn the_process_cpu_time_grows_with_work() {
    let before = process_cpu_time().expect("CLOCK_PROCESS_CPUTIME_ID");
    let mut sum = 0u64;
    while process_cpu_time().expect("CLOCK_PROCESS_CPUTIME_ID") == before {
        sum = std::hint::black_box(sum.wrapping_add(1));
    }
    assert!(process_cpu_time().expect("CLOCK_PROCESS_CPUTIME_ID") > before);
    // Giving freed memory back is safe to call at any time, from any thread.
    let freed: Vec<Vec<u8>> = (0..64).map(|n| vec![n as u8; 64 * 1024]).collect();
    drop(freed);
    std::thread::spawn(release_free_memory)
        .join()
        .expect("thread");
}

#[test]
fn a_thread_pinned_to_one_cpu_runs_only_there_and_leaves_the_others_alone() {
    let allowed = allowed_cpus().expect("sched_getaffinity");
    assert!(!allowed.is_empty());
    assert!(
        allowed.windows(2).all(|pair| pair[0] < pair[1]),
        "{allowed:?}"
    );
    let last = *allowed.last().expect("one CPU at least");
    let pinned = std::thread::spawn(move || {
        run_only_on(&[last]).expect("sched_setaffinity");
        allowed_cpus().expect("sched_getaffinity")
    })
    .join()
    .expect("thread");
    assert_eq!(pinned, [last]);
    // The calling thread kept its own mask.
    assert_eq!(allowed_cpus().expect("sched_getaffinity"), allowed);
    // Nothing to run on is refused before the kernel is asked.
    for bad in [&[][..], &[libc::CPU_SETSIZE as usize]] {
        let error = run_only_on(bad).expect_err("no CPU");
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    }
}
