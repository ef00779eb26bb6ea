//! Which CPUs a thread may run on (`sched_getaffinity`/`sched_setaffinity`), for the
//! balancer's serving threads: each is given CPUs of its own, so the kernel never runs two
//! of them on one CPU, taking turns a scheduler tick at a time, while another CPU is free.

use std::io;
use std::mem;

use crate::check;

/// The CPUs the calling thread may run on (its affinity mask, which a new thread inherits
/// from the one that started it, and which a container's cpuset bounds), in ascending order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: all zeroes is a valid, empty `cpu_set_t`.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: `set` is a valid, writable `cpu_set_t` of the size passed, for the call's
    // duration; pid 0 is the calling thread.
    check(unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) })?;
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, inside `set`.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Lets the calling thread run only on `cpus` (the others of its process are not touched).
/// An error if `cpus` is empty, names a CPU at or above `CPU_SETSIZE`, or has none the
/// thread is allowed (outside its cpuset, or offline).
pub fn run_only_on(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() || cpus.iter().any(|&cpu| cpu >= libc::CPU_SETSIZE as usize) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no CPU set can be made of {cpus:?}"),
        ));
    }
    // SAFETY: all zeroes is a valid, empty `cpu_set_t`.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: `cpu` was checked to be below CPU_SETSIZE, inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid `cpu_set_t` of the size passed, only read by the call; pid 0
    // is the calling thread.
    check(unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) })?;
    Ok(())
}
