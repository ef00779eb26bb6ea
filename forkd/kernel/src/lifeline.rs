//! Lifelines: a pipe whose write end only forkd holds, so that processes holding its read end
//! learn that forkd is gone (their read sees the end of file) whoever their parent is.
//!
//! A clone used to die with its template through the parent-death signal, and the template
//! with forkd; so a template that crashed took every clone with it. A clone that watches the
//! lifeline instead dies with forkd itself and outlives its template: orphaned, it is
//! reparented (to init, or to forkd when forkd is the container's first process, which then
//! reaps it: [`try_reap_pidfd`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::{Exit, Pidfd, check, owned};

/// A new pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid, writable array of two ints for the duration of the call.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((owned(fds[0]), owned(fds[1])))
}

/// Keeps descriptor `fd` of this process open, under the same number, in the program
/// `command` runs (it is close-on-exec here, and stays so here).
pub fn inherit_fd(command: &mut Command, fd: RawFd) {
    // SAFETY: the closure runs between fork and exec, calls only fcntl(2) (async-signal-safe)
    // on a descriptor number, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Takes ownership of descriptor number `fd`, inherited from the parent process, after
/// checking that it is open and is a pipe (a FIFO); marks it close-on-exec so that programs
/// this process runs do not hold it.
pub fn adopt_inherited_pipe(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: `stat` is plain old data; all zeroes is a valid value.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `stat` is a valid, writable struct for the duration of the call; fstat(2) on a
    // descriptor that is not open fails with EBADF and touches nothing.
    check(unsafe { libc::fstat(fd, &raw mut stat) })?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a pipe"),
        ));
    }
    // SAFETY: fcntl(2) with F_SETFD takes an integer argument and no pointers.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })?;
    Ok(owned(fd))
}

/// Starts a thread that kills this process (SIGKILL, as a parent-death signal would) once
/// `lifeline` reads the end of file or fails: every write end has closed, so its holder is
/// gone. Already closed, it kills the process at once.
pub fn die_when_closed(lifeline: OwnedFd) -> io::Result<()> {
    std::thread::Builder::new()
        .name("squall-lifeline".into())
        .spawn(move || {
            let mut byte = [0u8; 1];
            loop {
                // SAFETY: `byte` is a valid, writable buffer of one byte for the duration of
                // the call.
                let read = unsafe { libc::read(lifeline.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
                if read == -1 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if read <= 0 {
                    break;
                }
                // Nobody writes to a lifeline; a byte that arrives anyway changes nothing.
            }
            // SAFETY: kill(2) on our own pid with a constant signal reads no memory of ours.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        })
        .map(drop)
}

/// Reaps the process `pidfd` refers to if it is this process's child and has exited, without
/// blocking (`waitid(P_PIDFD)`, Linux 5.4); `None` if it is not our child (its parent reaps
/// it), has not exited, or the kernel cannot say.
pub fn try_reap_pidfd(pidfd: &Pidfd) -> Option<Exit> {
    // SAFETY: `siginfo_t` is plain old data; all zeroes is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t for the duration of the call.
    let ret = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &raw mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    // SAFETY: after a successful waitid, `si_pid` and `si_status` are set (or zero if no
    // child had exited).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if ret == -1 || pid == 0 {
        return None;
    }
    Some(if info.si_code == libc::CLD_EXITED {
        Exit::Code(status)
    } else {
        Exit::Signal(status)
    })
}
