//! `/etc/squall/app`: how the guest agent's `run-app` starts the app of a root filesystem.
//! The host writes it into the initramfs when it builds the image (`src/image.rs`) and the
//! agent reads it in the guest (`agent.rs`); this one file is compiled into both, so the two
//! cannot disagree about the format.
//!
//! The agent has no dependencies, so the format needs no parser: NUL-separated fields, a key
//! then its value — `uid`, `gid` and `cwd` once, `group`, `arg` and `env` once per item, in
//! order. No
//! value can hold a NUL byte (none could reach `execve` either), so nothing is escaped, and
//! no part of any value is ever read by a shell.
// Each side uses half: the host encodes, the agent decodes (both are tested on the host).
#![allow(dead_code)]

/// What `run-app` needs to start the app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AppLaunch {
    /// The program and its arguments; never empty.
    pub(crate) command: Vec<String>,
    /// The environment, `KEY=VALUE`, exactly as the app gets it.
    pub(crate) env: Vec<String>,
    /// The working directory, absolute.
    pub(crate) working_dir: String,
    /// The user the app runs as.
    pub(crate) uid: u32,
    /// The group the app runs as.
    pub(crate) gid: u32,
    /// Its supplementary groups.
    pub(crate) groups: Vec<u32>,
}

impl AppLaunch {
    /// The file's bytes, or why these values cannot be written.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, String> {
        if self.command.is_empty() {
            return Err("the command is empty".to_owned());
        }
        if !self.working_dir.starts_with('/') {
            return Err(format!(
                "the working directory `{}` is not absolute",
                self.working_dir
            ));
        }
        let (uid, gid) = (self.uid.to_string(), self.gid.to_string());
        let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
        let fields = [("uid", &uid), ("gid", &gid), ("cwd", &self.working_dir)]
            .into_iter()
            .chain(groups.iter().map(|g| ("group", g)))
            .chain(self.command.iter().map(|a| ("arg", a)))
            .chain(self.env.iter().map(|e| ("env", e)));
        let mut bytes = Vec::new();
        for (key, value) in fields {
            if value.contains('\0') {
                return Err(format!("`{}` holds a NUL byte", value.escape_debug()));
            }
            bytes.extend_from_slice(key.as_bytes());
            bytes.push(0);
            bytes.extend_from_slice(value.as_bytes());
            bytes.push(0);
        }
        Ok(bytes)
    }

    /// Reads the file's bytes.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
        let mut fields = text.strip_suffix('\0').unwrap_or(text).split('\0');
        let mut launch = AppLaunch {
            command: Vec::new(),
            env: Vec::new(),
            working_dir: String::new(),
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        };
        let number = |key: &str, value: &str| {
            value
                .parse::<u32>()
                .map_err(|_| format!("{key} `{value}` is not a number"))
        };
        while let Some(key) = fields.next() {
            if key.is_empty() && text.is_empty() {
                break;
            }
            let value = fields
                .next()
                .ok_or_else(|| format!("`{key}` has no value"))?;
            match key {
                "uid" => launch.uid = number(key, value)?,
                "gid" => launch.gid = number(key, value)?,
                "group" => launch.groups.push(number(key, value)?),
                "cwd" => launch.working_dir = value.to_owned(),
                "arg" => launch.command.push(value.to_owned()),
                "env" => launch.env.push(value.to_owned()),
                other => return Err(format!("unknown field `{other}`")),
            }
        }
        if launch.command.is_empty() {
            return Err("no command".to_owned());
        }
        if !launch.working_dir.starts_with('/') {
            return Err("no absolute working directory".to_owned());
        }
        Ok(launch)
    }
}
