//! Processes, as `/proc` shows them: whether one lives, its children, its descriptors (and the
//! sockets among them), and
//! the processes a test started (found by a marker in their environment).

/// The environment variable tests put on the processes they start, so they can find them
/// (and their descendants, which inherit it) later.
pub const MARKER_ENV: &str = "SQUALL_TEST_MARKER";

/// Whether `pid` is a live process (a zombie counts as dead).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| state(&stat))
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// The state letter of a `/proc/PID/stat` line: the first field after the command name,
/// which is in parentheses and may itself hold spaces and parentheses.
fn state(stat: &str) -> Option<char> {
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
}

/// The pids of `pid`'s children.
pub fn children(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                children.extend(
                    list.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    children
}

/// `pid`'s command line, one argument a string (empty if it is gone).
pub fn cmdline(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The accelerator a QEMU process runs its guest under (`kvm` or `tcg`): the value of its
/// `-accel` option, without its properties. `None` if `pid` is not such a QEMU.
pub fn qemu_accelerator(pid: u32) -> Option<String> {
    let args = cmdline(pid);
    let at = args.iter().position(|a| a == "-accel")?;
    Some(args.get(at + 1)?.split(',').next()?.to_owned())
}

/// How many descriptors `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Sends SIGKILL to `pid` (behind the back of whoever manages it), asserting it was sent.
pub fn sigkill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap_or_else(|e| panic!("running kill: {e}"));
    assert!(status.success(), "kill -KILL {pid} failed");
}

/// The inodes of the sockets `pid` holds open (empty if it is gone): two processes share a
/// socket exactly when they hold the same inode.
pub fn socket_inodes(pid: u32) -> std::collections::HashSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Default::default();
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// The live processes whose environment has `MARKER_ENV=marker`.
pub fn with_marker(marker: &str) -> Vec<u32> {
    let needle = format!("{MARKER_ENV}={marker}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            alive(pid) && env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_listed_alive_then_dead_once_reaped() {
        let marker = format!("process-test-{}", std::process::id());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(MARKER_ENV, &marker)
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(alive(pid));
        assert!(children(std::process::id()).contains(&pid));
        crate::wait_until(
            "the child's environment is readable",
            std::time::Duration::from_secs(10),
            || (with_marker(&marker) == vec![pid]).then_some(()),
        );
        assert!(open_fds(pid) > 0);
        assert_eq!(cmdline(pid), ["sleep", "30"]);
        assert_eq!(qemu_accelerator(pid), None);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!alive(pid));
        assert!(with_marker(&marker).is_empty());
    }

    #[test]
    fn the_state_is_read_past_a_command_name_with_parentheses() {
        assert_eq!(state("12 (a) b) (c) S 1 2"), Some('S'));
        assert_eq!(state("12 (zombie) Z 1"), Some('Z'));
        assert_eq!(state("garbage"), None);
    }
}
