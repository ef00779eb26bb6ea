//! How the guest starts the app, worked out at build time from the image config (or, for a
//! plain directory, from the options alone), the way `docker run` reads it:
//!
//! - the command is `Entrypoint` followed by `Cmd`; arguments given at build time replace
//!   `Cmd` (not `Entrypoint`). No command at all is an error;
//! - `Env` as is, plus Docker's default `PATH` when it sets none (a plain directory gets
//!   that `PATH` alone);
//! - `WorkingDir`, `/` when empty;
//! - `User` as `name`, `uid`, `name:group` or `uid:gid` (any mix), resolved against the
//!   tree's own `/etc/passwd` and `/etc/group`: a name not there is an error, a number needs
//!   no entry, and the group defaults to the user's primary group (0 for a uid with no
//!   entry); the supplementary groups are those `/etc/group` lists the user in;
//! - `ExposedPorts`: the TCP ones (`8000/tcp` or `8000`), in numeric order; UDP is ignored.

use std::path::Path;

use super::AppConfig;
use super::oci::RunConfig;
use super::unpack::{Lookup, resolve_in};

/// `PATH` for an app whose image sets none (or from a plain directory), as Docker sets it.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why the app's configuration could not be worked out.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum AppConfigError {
    /// the image names no command (no Entrypoint and no Cmd): give one after `--`
    NoCommand,
    /// user `{0}` is not in the image's /etc/passwd
    UnknownUser(String),
    /// group `{0}` is not in the image's /etc/group
    UnknownGroup(String),
    /// `{0}` is not a user: expected NAME, UID, NAME:GROUP or UID:GID
    BadUser(String),
    /// `{0}` is not a port: expected a number from 1 to 65535, optionally followed by /tcp
    BadPort(String),
    /// working directory `{0}` is not an absolute path
    BadWorkingDir(String),
}

/// What the options of a build override in the image config.
#[derive(Clone, Debug, Default)]
pub(crate) struct Overrides<'a> {
    pub(crate) args: Option<&'a [String]>,
    pub(crate) user: Option<&'a str>,
    pub(crate) working_dir: Option<&'a str>,
    pub(crate) ports: &'a [u16],
}

/// The command: `Entrypoint` + (`args` or `Cmd`).
pub(crate) fn command(
    config: &RunConfig,
    args: Option<&[String]>,
) -> Result<Vec<String>, AppConfigError> {
    let mut command = config.entrypoint.clone().unwrap_or_default();
    match args {
        Some(args) => command.extend_from_slice(args),
        None => command.extend(config.cmd.clone().unwrap_or_default()),
    }
    if command.is_empty() {
        return Err(AppConfigError::NoCommand);
    }
    Ok(command)
}

/// The app's configuration, users resolved against the tree at `root`.
pub(crate) fn resolve(
    root: &Path,
    config: &RunConfig,
    overrides: &Overrides<'_>,
) -> Result<AppConfig, AppConfigError> {
    let command = command(config, overrides.args)?;
    let working_dir = overrides
        .working_dir
        .or(config.working_dir.as_deref())
        .filter(|dir| !dir.is_empty())
        .unwrap_or("/");
    if !working_dir.starts_with('/') {
        return Err(AppConfigError::BadWorkingDir(working_dir.to_owned()));
    }
    let (uid, gid) = match overrides
        .user
        .or(config.user.as_deref())
        .filter(|u| !u.is_empty())
    {
        Some(user) => resolve_user(root, user)?,
        None => (0, 0),
    };
    let groups = supplementary_groups(root, uid, gid);
    let ports = if overrides.ports.is_empty() {
        let mut ports = Vec::new();
        for port in config.exposed_ports.iter().flat_map(|ports| ports.keys()) {
            if let Some(port) = tcp_port(port)? {
                ports.push(port);
            }
        }
        ports.sort_unstable();
        ports.dedup();
        ports
    } else {
        overrides.ports.to_vec()
    };
    let mut env = config.env.clone().unwrap_or_default();
    if !env.iter().any(|var| var.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_owned());
    }
    Ok(AppConfig {
        command,
        env,
        working_dir: working_dir.to_owned(),
        uid,
        gid,
        groups,
        ports,
    })
}

/// `8000/tcp` or `8000` → `Some(8000)`; `53/udp` → `None`.
fn tcp_port(spec: &str) -> Result<Option<u16>, AppConfigError> {
    let (number, protocol) = spec.split_once('/').unwrap_or((spec, "tcp"));
    if !protocol.eq_ignore_ascii_case("tcp") {
        return Ok(None);
    }
    match number.parse::<u16>() {
        Ok(port) if port > 0 => Ok(Some(port)),
        _ => Err(AppConfigError::BadPort(spec.to_owned())),
    }
}

/// Reads `/etc/NAME` of the tree at `root` (safely: symlinks resolve inside the root), or
/// nothing if it is not there.
fn etc_file(root: &Path, name: &str) -> String {
    resolve_in(root, &["etc".into(), name.into()], name, Lookup::File)
        .ok()
        .and_then(|path| std::fs::read(path).ok())
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// Finds `key` in the first field of a colon-separated database (`/etc/passwd`,
/// `/etc/group`) and returns the numeric fields 2 and 3.
fn lookup(database: &str, key: &str) -> Option<(u32, Option<u32>)> {
    database.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() != Some(&key) {
            return None;
        }
        let id = fields.get(2)?.parse().ok()?;
        Some((id, fields.get(3).and_then(|gid| gid.parse().ok())))
    })
}

/// The groups the image's `/etc/group` lists `uid`'s user (by its name in `/etc/passwd`)
/// in, other than `gid`, in order and once each.
fn supplementary_groups(root: &Path, uid: u32, gid: u32) -> Vec<u32> {
    let passwd = etc_file(root, "passwd");
    let Some(name) = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.get(2)?.parse::<u32>().ok()? == uid).then(|| fields[0].to_owned())
    }) else {
        return Vec::new();
    };
    let mut groups = Vec::new();
    for line in etc_file(root, "group").lines() {
        let fields: Vec<&str> = line.split(':').collect();
        let (Some(id), Some(members)) = (fields.get(2), fields.get(3)) else {
            continue;
        };
        let Ok(id) = id.parse::<u32>() else {
            continue;
        };
        if id != gid && !groups.contains(&id) && members.split(',').any(|m| m.trim() == name) {
            groups.push(id);
        }
    }
    groups
}

/// `USER[:GROUP]` → (uid, gid).
pub(crate) fn resolve_user(root: &Path, spec: &str) -> Result<(u32, u32), AppConfigError> {
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(AppConfigError::BadUser(spec.to_owned()));
    }
    let passwd = etc_file(root, "passwd");
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(uid) => {
            // A number needs no entry; its entry, if any, gives the primary group.
            let gid = passwd.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                (fields.get(2)?.parse::<u32>().ok()? == uid).then(|| fields.get(3)?.parse().ok())?
            });
            (uid, gid.unwrap_or(0))
        }
        Err(_) => match lookup(&passwd, user) {
            Some((uid, gid)) => (uid, gid.unwrap_or(0)),
            None => return Err(AppConfigError::UnknownUser(user.to_owned())),
        },
    };
    let gid = match group {
        None => primary_gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup(&etc_file(root, "group"), group)
                .map(|(gid, _)| gid)
                .ok_or_else(|| AppConfigError::UnknownGroup(group.to_owned()))?,
        },
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config(entrypoint: &[&str], cmd: &[&str]) -> RunConfig {
        let strings =
            |s: &[&str]| (!s.is_empty()).then(|| s.iter().map(|s| s.to_string()).collect());
        RunConfig {
            entrypoint: strings(entrypoint),
            cmd: strings(cmd),
            ..RunConfig::default()
        }
    }

    #[test]
    fn an_image_without_path_gets_dockers_and_one_with_path_keeps_its_own() {
        let root = std::env::temp_dir();
        let mut run = config(&["app"], &[]);
        run.env = Some(vec!["A=1".into()]);
        let app = resolve(&root, &run, &Overrides::default()).unwrap();
        assert_eq!(app.env, ["A=1", DEFAULT_PATH]);
        run.env = Some(vec!["PATH=/opt/bin".into(), "A=1".into()]);
        let app = resolve(&root, &run, &Overrides::default()).unwrap();
        assert_eq!(app.env, ["PATH=/opt/bin", "A=1"]);
    }

    #[test]
    fn the_supplementary_groups_are_those_listing_the_user() {
        let root = std::env::temp_dir().join(format!("squall-groups-{}", std::process::id()));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/srv:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\napp:x:1000:app\nstaff:x:50:root,app\nwww:x:33:other\nlog:x:4: app \n",
        )
        .unwrap();
        assert_eq!(supplementary_groups(&root, 1000, 1000), [50, 4]);
        assert_eq!(supplementary_groups(&root, 1000, 50), [1000, 4]);
        assert_eq!(supplementary_groups(&root, 0, 0), [50]);
        assert_eq!(supplementary_groups(&root, 4242, 0), Vec::<u32>::new());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn args_replace_cmd_not_entrypoint() {
        let args = vec!["x".to_owned()];
        assert_eq!(
            command(&config(&["py"], &["a"]), None).unwrap(),
            ["py", "a"]
        );
        assert_eq!(
            command(&config(&["py"], &["a"]), Some(&args)).unwrap(),
            ["py", "x"]
        );
        assert_eq!(command(&config(&[], &["a"]), Some(&args)).unwrap(), ["x"]);
        assert!(matches!(
            command(&config(&[], &[]), None),
            Err(AppConfigError::NoCommand)
        ));
    }

    #[test]
    fn ports_keep_tcp_only() {
        assert_eq!(tcp_port("8000/tcp").unwrap(), Some(8000));
        assert_eq!(tcp_port("80").unwrap(), Some(80));
        assert_eq!(tcp_port("53/udp").unwrap(), None);
        assert!(tcp_port("http/tcp").is_err());
    }

    #[test]
    fn users_resolve_against_the_tree() {
        let scratch = test_support::Scratch::new("users");
        let root = scratch.path();
        std::fs::create_dir(root.join("etc")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\napp:x:1000:1001::/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user(root, "app").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(root, "app:staff").unwrap(), (1000, 50));
        assert_eq!(resolve_user(root, "1000").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(root, "4242").unwrap(), (4242, 0));
        assert_eq!(resolve_user(root, "4242:7").unwrap(), (4242, 7));
        assert_eq!(resolve_user(root, "nobody").unwrap(), (65534, 65534));
        assert!(matches!(
            resolve_user(root, "ghost"),
            Err(AppConfigError::UnknownUser(_))
        ));
        assert!(matches!(
            resolve_user(root, "app:ghosts"),
            Err(AppConfigError::UnknownGroup(_))
        ));
        assert!(matches!(
            resolve_user(root, "app:"),
            Err(AppConfigError::BadUser(_))
        ));
    }
}
