//! The zygote wire protocol (see `PROTOCOL.md`): one short ASCII message per `SOCK_SEQPACKET`
//! datagram, words separated by single spaces.

use kernel::Exit;

/// The largest message either side sends, in bytes.
pub const MAX_MESSAGE: usize = 4096;

/// The environment variable that holds the path of forkd's zygote socket.
pub const SOCKET_ENV: &str = "SQUALL_ZYGOTE";

/// The environment variable that holds the number of the descriptor, inherited from forkd,
/// of forkd's lifeline: the read end of a pipe whose write end only forkd holds. A clone
/// that watches it (its read sees the end of file once forkd is gone) dies with forkd and
/// outlives its template; without it, a clone dies with its template.
pub const LIFELINE_ENV: &str = "SQUALL_ZYGOTE_LIFELINE";

/// A message that does not follow the protocol.
#[derive(Debug, thiserror::Error)]
#[error("malformed zygote message {message:?}: {reason}")]
pub struct ProtocolError {
    /// The message as received (lossily decoded).
    pub message: String,
    /// What was wrong with it.
    pub reason: &'static str,
}

/// A message from forkd to the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToTemplate {
    /// `clone <id>`, sent with one listening TCP socket as `SCM_RIGHTS`: fork a clone named
    /// `id` that serves on that socket.
    Clone {
        /// The clone id forkd gave this clone.
        id: String,
    },
}

/// A message from the template to forkd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromTemplate {
    /// `ready`: warm-up is done; send clone requests.
    Ready,
    /// `forked <id> <pid>`: the clone runs as process `pid`.
    Forked {
        /// The clone id from the request.
        id: String,
        /// The clone's process id.
        pid: u32,
    },
    /// `failed <id> <reason>`: the clone could not be forked.
    Failed {
        /// The clone id from the request.
        id: String,
        /// Why, in words.
        reason: String,
    },
    /// `exited <id> code <n>` or `exited <id> signal <n>`: the clone ended and was reaped.
    Exited {
        /// The clone id.
        id: String,
        /// How it ended.
        exit: Exit,
    },
}

/// Whether `id` may be sent as a clone id: 1 to 128 of `[A-Za-z0-9._-]`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn error(bytes: &[u8], reason: &'static str) -> ProtocolError {
    ProtocolError {
        message: String::from_utf8_lossy(bytes).into_owned(),
        reason,
    }
}

fn id_word(bytes: &[u8], word: Option<&str>) -> Result<String, ProtocolError> {
    match word {
        Some(id) if valid_id(id) => Ok(id.to_owned()),
        _ => Err(error(bytes, "expected a clone id of [A-Za-z0-9._-]")),
    }
}

impl ToTemplate {
    /// The message as sent on the wire.
    pub fn encode(&self) -> String {
        match self {
            ToTemplate::Clone { id } => format!("clone {id}"),
        }
    }

    /// Parses a message received from forkd.
    pub fn parse(bytes: &[u8]) -> Result<ToTemplate, ProtocolError> {
        let text = std::str::from_utf8(bytes).map_err(|_| error(bytes, "not UTF-8"))?;
        let mut words = text.split(' ');
        match words.next() {
            Some("clone") => {
                let id = id_word(bytes, words.next())?;
                if words.next().is_some() {
                    return Err(error(bytes, "trailing words"));
                }
                Ok(ToTemplate::Clone { id })
            }
            _ => Err(error(bytes, "unknown message (expected `clone <id>`)")),
        }
    }
}

impl FromTemplate {
    /// The message as sent on the wire.
    pub fn encode(&self) -> String {
        match self {
            FromTemplate::Ready => "ready".to_owned(),
            FromTemplate::Forked { id, pid } => format!("forked {id} {pid}"),
            FromTemplate::Failed { id, reason } => format!("failed {id} {reason}"),
            FromTemplate::Exited {
                id,
                exit: Exit::Code(code),
            } => format!("exited {id} code {code}"),
            FromTemplate::Exited {
                id,
                exit: Exit::Signal(signal),
            } => {
                format!("exited {id} signal {signal}")
            }
        }
    }

    /// Parses a message received from a template.
    pub fn parse(bytes: &[u8]) -> Result<FromTemplate, ProtocolError> {
        let text = std::str::from_utf8(bytes).map_err(|_| error(bytes, "not UTF-8"))?;
        let text = text.trim_end_matches('\n');
        let mut words = text.splitn(3, ' ');
        let kind = words.next().unwrap_or_default();
        let number = |word: Option<&str>| -> Result<i64, ProtocolError> {
            word.and_then(|w| w.parse().ok())
                .ok_or_else(|| error(bytes, "expected a number"))
        };
        match kind {
            "ready" if words.next().is_none() => Ok(FromTemplate::Ready),
            "forked" => {
                let id = id_word(bytes, words.next())?;
                let pid = number(words.next())?;
                let pid = u32::try_from(pid).map_err(|_| error(bytes, "pid out of range"))?;
                Ok(FromTemplate::Forked { id, pid })
            }
            "failed" => {
                let id = id_word(bytes, words.next())?;
                let reason = words.next().unwrap_or("unknown reason").to_owned();
                Ok(FromTemplate::Failed { id, reason })
            }
            "exited" => {
                let id = id_word(bytes, words.next())?;
                let mut rest = words.next().unwrap_or_default().split(' ');
                let how = rest.next();
                let value = number(rest.next())?;
                let value =
                    i32::try_from(value).map_err(|_| error(bytes, "status out of range"))?;
                let exit = match how {
                    Some("code") => Exit::Code(value),
                    Some("signal") => Exit::Signal(value),
                    _ => return Err(error(bytes, "expected `code <n>` or `signal <n>`")),
                };
                Ok(FromTemplate::Exited { id, exit })
            }
            _ => Err(error(
                bytes,
                "unknown message (expected ready, forked, failed or exited)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let messages = [
            FromTemplate::Ready,
            FromTemplate::Forked {
                id: "web-1".into(),
                pid: 4242,
            },
            FromTemplate::Failed {
                id: "web-2".into(),
                reason: "fork: out of memory".into(),
            },
            FromTemplate::Exited {
                id: "web-3".into(),
                exit: Exit::Code(3),
            },
            FromTemplate::Exited {
                id: "web-4".into(),
                exit: Exit::Signal(9),
            },
        ];
        for message in messages {
            assert_eq!(
                FromTemplate::parse(message.encode().as_bytes()).unwrap(),
                message
            );
        }
        let clone = ToTemplate::Clone {
            id: "a.b_c-9".into(),
        };
        assert_eq!(ToTemplate::parse(clone.encode().as_bytes()).unwrap(), clone);
    }

    #[test]
    fn malformed_messages_are_rejected() {
        for bad in [
            "",
            "forked",
            "forked web-1",
            "forked web-1 -3",
            "exited x code",
            "exited x hup 1",
            "hello",
        ] {
            assert!(
                FromTemplate::parse(bad.as_bytes()).is_err(),
                "{bad:?} parsed"
            );
        }
        for bad in ["clone", "clone a b", "clone ../x", "fork x"] {
            assert!(ToTemplate::parse(bad.as_bytes()).is_err(), "{bad:?} parsed");
        }
    }
}
