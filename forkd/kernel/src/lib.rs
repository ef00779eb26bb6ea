//! The few system calls Squall makes itself, each wrapped in a safe function: Unix
//! `SOCK_SEQPACKET` sockets with file descriptors passed as `SCM_RIGHTS` (the zygote
//! protocol, on both sides), `fork`, pidfds, the parent-death signal, `waitpid`, and the
//! `prctl` that lets KSM merge a QEMU's memory, glibc's `malloc_trim`, threads' CPU affinity,
//! `TCP_DEFER_ACCEPT` on HTTP listeners, and [`Malloc`], the global allocator of Squall's
//! programs.
//!
//! This is the only crate in Squall with `unsafe` code (the microVM guest agent, a separate
//! program, has its own two `ioctl` calls); every block says why it is sound. The app-facing
//! `zygote` crate and forkd's drivers both call in here, so neither needs `unsafe` of its own.
#![warn(clippy::undocumented_unsafe_blocks)]

mod affinity;
mod lifeline;
mod malloc;
pub use affinity::{allowed_cpus, run_only_on};
pub use lifeline::{adopt_inherited_pipe, die_when_closed, inherit_fd, pipe, try_reap_pidfd};
pub use malloc::Malloc;

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Turns a `-1` return value into the thread's `errno`.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Like [`check`], for the `long` that `syscall(2)` returns.
fn check_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of a descriptor a system call has just returned.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass a descriptor the kernel has just created for this process and that
    // nothing else owns yet.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A `sockaddr_un` for `path`, or an error if the path does not fit.
fn unix_address(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: `sockaddr_un` is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unix socket path too long or invalid: {}", path.display()),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn seqpacket_socket(nonblocking: bool) -> io::Result<OwnedFd> {
    let mut flags = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    if nonblocking {
        flags |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: socket(2) takes no pointers.
    let fd = check(unsafe { libc::socket(libc::AF_UNIX, flags, 0) })?;
    Ok(owned(fd))
}

/// Binds and listens on a `SOCK_SEQPACKET` Unix socket at `path` (close-on-exec).
pub fn seqpacket_listen(path: &Path, nonblocking: bool) -> io::Result<OwnedFd> {
    let fd = seqpacket_socket(nonblocking)?;
    let (addr, len) = unix_address(path)?;
    // SAFETY: `addr` is a valid `sockaddr_un` of `len` bytes that outlives the call.
    check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) })?;
    // SAFETY: listen(2) takes no pointers.
    check(unsafe { libc::listen(fd.as_raw_fd(), 8) })?;
    Ok(fd)
}

/// Connects a blocking `SOCK_SEQPACKET` socket to `path` (close-on-exec).
pub fn seqpacket_connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket_socket(false)?;
    let (addr, len) = unix_address(path)?;
    // SAFETY: `addr` is a valid `sockaddr_un` of `len` bytes that outlives the call.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) })?;
    Ok(fd)
}

/// Accepts one connection on a listening socket; the new socket is non-blocking and
/// close-on-exec.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed: we do not want the peer's address.
    let fd = check(unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    })?;
    Ok(owned(fd))
}

/// Room for one `SCM_RIGHTS` control message carrying one descriptor, aligned for `cmsghdr`.
#[repr(C)]
union ControlBuffer {
    _align: libc::cmsghdr,
    bytes: [u8; 64],
}

/// Sends one message, with `fd` attached as `SCM_RIGHTS` when given.
pub fn send_message(
    socket: BorrowedFd<'_>,
    payload: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut control = ControlBuffer { bytes: [0; 64] };
    // SAFETY: `msghdr` is plain old data; all zeroes is a valid, empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(mem::size_of::<RawFd>() as u32) } as usize;
        msg.msg_control = (&raw mut control).cast();
        msg.msg_controllen = space;
        // SAFETY: `msg_control` points at `control`, which has room for `space` (<= 64) bytes,
        // so CMSG_FIRSTHDR returns a valid, aligned pointer into it; CMSG_DATA points inside the
        // same header, with room for one descriptor.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    // SAFETY: `msg` and everything it points to (`iov`, `payload`, `control`) live until the
    // call returns; the kernel only reads them.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
    if sent == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message into `buf`: its length (0 at end of stream) and the first descriptor
/// passed with it, if any (further descriptors are closed). Descriptors arrive close-on-exec.
pub fn recv_message(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = ControlBuffer { bytes: [0; 64] };
    // SAFETY: `msghdr` is plain old data; all zeroes is a valid, empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = (&raw mut control).cast();
    msg.msg_controllen = mem::size_of::<ControlBuffer>();
    // SAFETY: `msg` points at `iov` (and through it `buf`) and `control`, all valid for writes
    // of the lengths given and alive until the call returns.
    let received =
        unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if received == -1 {
        return Err(io::Error::last_os_error());
    }
    let mut first = None;
    // SAFETY: the kernel has filled `control` and set `msg_controllen`; CMSG_FIRSTHDR and
    // CMSG_NXTHDR walk only inside it, and each SCM_RIGHTS header holds
    // (cmsg_len - CMSG_LEN(0)) / size_of::<RawFd>() descriptors now owned by this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count =
                    ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = owned(std::ptr::read_unaligned(data.add(i)));
                    if first.is_none() {
                        first = Some(fd);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message too long",
        ));
    }
    Ok((received as usize, first))
}

/// Closes the sending half of a connected socket: the peer reads the end of the stream once
/// it has read what was sent before, while this side can still receive.
///
/// This is how to end a Unix `SOCK_STREAM` or `SOCK_SEQPACKET` connection in order. Closing
/// the socket outright while messages from the peer are still unread in its queue makes the
/// kernel fail the peer's next read with `ECONNRESET` instead of giving it the end of the
/// stream; shutting down the sending half first, then reading until the peer closes its end,
/// leaves nothing unread.
pub fn shutdown_write(socket: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown(2) takes no pointers.
    check(unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR) })?;
    Ok(())
}

/// Asks a listening TCP socket to hand over a connection only once the client has sent its
/// first bytes (`TCP_DEFER_ACCEPT`), or, for a client that sends nothing, once `seconds` have
/// passed (the kernel rounds up to its SYN-ACK retransmissions). For protocols where the
/// client speaks first, as in HTTP and TLS.
pub fn set_tcp_defer_accept(listener: BorrowedFd<'_>, seconds: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(seconds).unwrap_or(libc::c_int::MAX);
    let size = libc::socklen_t::try_from(mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: setsockopt(2) reads `size` bytes from `&value`, an int that lives across the call.
    check(unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const value).cast(),
            size,
        )
    })?;
    Ok(())
}

/// A pidfd: a handle on one process that cannot be confused with a later process reusing its
/// pid. It becomes readable when the process exits.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: u32,
}

impl Pidfd {
    /// Opens a pidfd for `pid` (close-on-exec). The caller must make sure `pid` still names the
    /// intended process: its own unreaped child, or a process a trusted party has just named.
    pub fn open(pid: u32) -> io::Result<Pidfd> {
        // SAFETY: pidfd_open(2) takes no pointers.
        let fd = check_long(unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) })?;
        Ok(Pidfd {
            fd: owned(fd as RawFd),
            pid,
        })
    }

    /// The process id this pidfd was opened for.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` to the process. Succeeds (does nothing) if it has already exited.
    pub fn send_signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: pidfd_send_signal(2) with a null siginfo and no flags reads no memory of ours.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        match check_long(ret) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Ok(()),
        }
    }
}

impl AsRawFd for Pidfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl std::os::fd::AsFd for Pidfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What `fork` returned in this process.
#[derive(Debug)]
pub enum Forked {
    /// This is the parent; the child has this pid.
    Parent(u32),
    /// This is the new child.
    Child,
}

/// Forks the calling process.
///
/// Only sound when the process has a single thread: the child gets a copy of this thread only,
/// and locks other threads held would stay locked forever. [`crate::thread_count`] checks it.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: callers check that the process is single-threaded (see the doc comment), so the
    // child is a complete copy of the parent and may run any code, not just async-signal-safe
    // functions.
    let pid = check(unsafe { libc::fork() })?;
    Ok(if pid == 0 {
        Forked::Child
    } else {
        Forked::Parent(pid as u32)
    })
}

/// Asks the kernel to send `signal` to this process when the thread that created it exits.
pub fn set_parent_death_signal(signal: libc::c_int) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes an integer argument and no pointers.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) })?;
    Ok(())
}

/// Makes a command's process get SIGKILL when the thread that spawned it exits, and fail to
/// start if that thread is already gone. Spawn from a thread that lives as long as the
/// process (a tokio worker, not a blocking-pool thread, which exits when idle).
pub fn die_with_parent(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and calls only prctl(2) and getppid(2),
    // both async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) == -1
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                return Err(io::Error::other("parent exited before the child started"));
            }
            Ok(())
        });
    }
}

/// Lets the kernel's same-page merging (KSM) merge any page of the process a command starts
/// with identical pages of other processes that allow it (`PR_SET_MEMORY_MERGE`, Linux 6.4;
/// kept across `exec` since 6.7), not only the ranges the program marks itself. Nothing is
/// merged unless the host runs KSM (`/sys/kernel/mm/ksm/run`). Best effort: on a kernel
/// without it the process starts as it would have.
pub fn merge_memory_on_exec(command: &mut Command) {
    // SAFETY: the closure runs between fork and exec, calls only prctl(2), which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            // An error (EINVAL before 6.4) only means nothing will be merged.
            let zero: libc::c_ulong = 0;
            libc::prctl(
                libc::PR_SET_MEMORY_MERGE,
                1 as libc::c_ulong,
                zero,
                zero,
                zero,
            );
            Ok(())
        });
    }
}

/// Gives the heap memory the allocator holds free back to the kernel (glibc's
/// `malloc_trim`, which also releases whole free pages inside its arenas), so that a
/// long-running process's resident size falls back after a burst instead of staying at its
/// peak. Takes each arena's lock while it walks it: call it now and then from a thread
/// that serves nothing, not on a request's path. Does nothing where the C library is not
/// glibc.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointer; it walks the allocator's own free lists under
    // the allocator's locks, as free() does.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The CPU time every thread of this process has used so far
/// (`CLOCK_PROCESS_CPUTIME_ID`).
pub fn process_cpu_time() -> io::Result<std::time::Duration> {
    // SAFETY: all zeroes is a valid `timespec`.
    let mut now: libc::timespec = unsafe { mem::zeroed() };
    // SAFETY: `now` is a valid, writable `timespec` for the call's duration.
    check(unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) })?;
    let seconds = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(now.tv_nsec).unwrap_or(0);
    Ok(std::time::Duration::new(seconds, nanos))
}

/// Whether this kernel can mark a whole process's memory mergeable (see
/// [`merge_memory_on_exec`]).
pub fn memory_merge_supported() -> bool {
    memory_merge_enabled().is_ok()
}

/// Whether this process's whole memory may be merged by KSM (`PR_GET_MEMORY_MERGE`); an
/// error on a kernel without the flag (before Linux 6.4).
pub fn memory_merge_enabled() -> io::Result<bool> {
    let zero: libc::c_ulong = 0;
    // SAFETY: PR_GET_MEMORY_MERGE takes no pointers and only reads this process's flag.
    let flag = check(unsafe { libc::prctl(libc::PR_GET_MEMORY_MERGE, zero, zero, zero, zero) })?;
    Ok(flag == 1)
}

/// The running kernel's major and minor version (`6.1` for `6.1.0-27-amd64`), from
/// `/proc/sys/kernel/osrelease`; `None` if it cannot be read.
pub fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    parse_kernel_version(&release)
}

fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// How many threads this process has (`/proc/self/task`).
pub fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// Removes `key` from the environment, provided this process has a single thread (so
/// nothing can read the environment at the same time); an error otherwise.
pub fn remove_env_var_single_threaded(key: &str) -> io::Result<()> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "cannot change the environment of a process with {threads} threads"
        )));
    }
    // SAFETY: the process has one thread (checked just above, and only this thread could
    // start another), so nothing reads or writes the environment concurrently.
    unsafe { std::env::remove_var(key) };
    Ok(())
}

/// Sends `signal` to `pid`. Only for the caller's own unreaped child, whose pid cannot have
/// been reused.
pub fn kill_child(pid: u32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) takes no pointers.
    check(unsafe { libc::kill(pid as libc::pid_t, signal) })?;
    Ok(())
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It called `exit` with this code.
    Code(i32),
    /// A signal with this number killed it.
    Signal(i32),
}

/// Reaps the child `pid` if it has exited, without blocking.
pub fn try_reap(pid: u32) -> io::Result<Option<Exit>> {
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid, writable int for the duration of the call.
    let ret = check(unsafe { libc::waitpid(pid as libc::pid_t, &raw mut status, libc::WNOHANG) })?;
    if ret == 0 {
        return Ok(None);
    }
    Ok(Some(if libc::WIFSIGNALED(status) {
        Exit::Signal(libc::WTERMSIG(status))
    } else {
        Exit::Code(libc::WEXITSTATUS(status))
    }))
}

/// Waits until one of `fds` is readable or hung up; returns one flag per descriptor.
pub fn poll_readable(fds: &[BorrowedFd<'_>]) -> io::Result<Vec<bool>> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `polls` is a valid array of `polls.len()` pollfd structs, alive for the call.
        let ret = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, -1) };
        match check(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(_) => break,
        }
    }
    Ok(polls.iter().map(|p| p.revents != 0).collect())
}

/// Registers a descriptor this process owns with tokio's reactor.
#[cfg(feature = "tokio")]
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` is open and moves into the `AsyncFd`, which alone owns it until it
    // is dropped or `into_inner` returns it; `as_raw_fd` always returns that same descriptor.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(fd) }?)
}

/// Registers a shared pidfd with tokio's reactor, to learn when its process exits.
#[cfg(feature = "tokio")]
pub fn async_pidfd(
    pidfd: std::sync::Arc<Pidfd>,
) -> io::Result<tokio::io::unix::AsyncFd<std::sync::Arc<Pidfd>>> {
    // SAFETY: a `Pidfd` never closes or replaces its descriptor while it lives, and the `Arc`
    // held by the `AsyncFd` keeps it alive as long as the registration.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(pidfd) }?)
}

#[cfg(test)]
mod tests;
