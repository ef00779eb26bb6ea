//! Bearer-token access to an admin listener (`squall balance --admin`, `squall up`'s admin
//! page), and the token comparison forkd's API uses too.
//!
//! - [`TokenFile`]: the token, read from a file at start-up and checked (trimmed of
//!   surrounding whitespace; not empty, at most [`MAX_TOKEN_LEN`] bytes, visible ASCII only),
//!   so that a bad file stops the command with an error naming it. It is read again on
//!   SIGHUP and when the file changes ([`FileWatch`]: a Kubernetes Secret rotation swaps a
//!   `..data` symlink); a new content that does not pass the checks is logged and the token
//!   in force kept.
//! - [`AdminAuth`]: what an admin listener asks of a request. Without a token, nothing (as
//!   before tokens existed). With one, every endpoint that [`Shows::Data`] needs
//!   `Authorization: Bearer <token>`, compared in constant time; `/metrics`
//!   ([`Shows::Metrics`]) too, unless [`AdminAuth::metrics_open`] leaves it open for a
//!   scraper inside a trusted network; an endpoint that [`Shows::Nothing`] (the live page's
//!   code, a health check) is always open. A refusal is a `401` with `WWW-Authenticate:
//!   Bearer realm="squall"` (RFC 6750, with `error="invalid_token"` for a wrong token),
//!   counted in the counter its owner gives ([`AdminAuth::count_refusals`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use http::{HeaderMap, Response, StatusCode};
use prometheus::IntCounter;
use tokio::signal::unix::{SignalKind, signal};

use crate::file_watch::{FILE_POLL, FileWatch, Fingerprint};
use crate::{ErrorChain, Shutdown};

/// The longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;
/// The most of a token file read: a file longer than this is refused without reading it all.
const READ_LIMIT: u64 = 64 * 1024;

/// A token file that cannot be used; the message names the file, never the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("cannot read the token file {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// Nothing but whitespace in the file.
    #[error("the token file {} is empty", .path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("the token in {} is longer than {MAX_TOKEN_LEN} bytes", .path.display())]
    TooLong {
        /// The file.
        path: PathBuf,
    },
    /// A byte of the token is a space, a control character or not ASCII.
    #[error(
        "the token in {} holds a byte that is not visible ASCII (byte {offset} of the token): a bearer token is printable ASCII without spaces",
        .path.display()
    )]
    NotVisibleAscii {
        /// The file.
        path: PathBuf,
        /// Where in the token (after trimming), from 0.
        offset: usize,
    },
}

/// A bearer token read from a file, and read again when the file changes (see the module
/// docs). Clones share the token in force. `Debug` shows the path, never the token.
#[derive(Clone)]
pub struct TokenFile {
    path: PathBuf,
    poll: Duration,
    current: Arc<RwLock<Arc<str>>>,
    /// The file's fingerprint from just before it was read.
    read_from: Option<Fingerprint>,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl TokenFile {
    /// Reads and checks the token in `path`.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, TokenError> {
        let path = path.into();
        let read_from = Fingerprint::of(&path);
        let token = read_token(&path)?;
        Ok(Self {
            path,
            poll: FILE_POLL,
            current: Arc::new(RwLock::new(token)),
            read_from,
        })
    }

    /// Looks at the file for a change every `every` instead of every [`FILE_POLL`].
    pub fn poll_every(mut self, every: Duration) -> Self {
        self.poll = every;
        self
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `presented` is the token in force, in time that depends only on the lengths.
    fn matches(&self, presented: &[u8]) -> bool {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        constant_time_eq(presented, current.as_bytes())
    }

    /// Reads the file again on SIGHUP and when it changes, until `shutdown`; a content that
    /// does not pass the checks is logged and the token in force kept.
    async fn watch(&self, shutdown: &Shutdown) {
        let hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => Some(hangup),
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGHUP; the admin token file is still polled");
                None
            }
        };
        let paths = vec![self.path.clone()];
        let mut watch = FileWatch::new(paths, vec![self.read_from.clone()], self.poll, hangup);
        while let Some(why) = watch.changed(shutdown).await {
            self.reload(why).await;
        }
    }

    /// Reads the file again and puts its token in force, or logs why not and keeps the one
    /// in force; returns whether the new one was put in force.
    async fn reload(&self, why: &str) -> bool {
        // Off the serving threads: the file may sit on a slow file system.
        let path = self.path.clone();
        match tokio::task::spawn_blocking(move || read_token(&path)).await {
            Ok(Ok(token)) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = token;
                tracing::info!(path = %self.path.display(), "admin token reloaded ({why})");
                true
            }
            Ok(Err(error)) => {
                tracing::error!(
                    "admin token reload ({why}) refused; keeping the token in force: {}",
                    ErrorChain(&error)
                );
                false
            }
            Err(error) => {
                tracing::error!(%error, "admin token reload ({why}) failed to run");
                false
            }
        }
    }
}

/// Reads the token in `path`: its content trimmed of surrounding whitespace, which must be
/// 1 to [`MAX_TOKEN_LEN`] bytes of visible ASCII.
fn read_token(path: &Path) -> Result<Arc<str>, TokenError> {
    let read_error = |source| TokenError::Read {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(READ_LIMIT).read_to_end(&mut bytes))
        .map_err(read_error)?;
    let token = bytes.trim_ascii();
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_owned(),
        });
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong {
            path: path.to_owned(),
        });
    }
    if let Some(offset) = token.iter().position(|b| !b.is_ascii_graphic()) {
        return Err(TokenError::NotVisibleAscii {
            path: path.to_owned(),
            offset,
        });
    }
    // Visible ASCII is UTF-8.
    let token = String::from_utf8_lossy(token);
    Ok(Arc::from(token.as_ref()))
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case); `None`
/// without one.
fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let space = value.iter().position(|b| *b == b' ')?;
    let (scheme, token) = value.split_at(space);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| token.trim_ascii_start())
}

/// Whether `headers` carry `Authorization: Bearer <token>`, compared in constant time.
pub fn bearer_matches(headers: &HeaderMap, token: &[u8]) -> bool {
    presented(headers).is_some_and(|presented| constant_time_eq(presented, token))
}

/// What an admin endpoint shows, which decides whether it needs the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shows {
    /// Nothing of the running process (the live page's HTML, script and style; a health
    /// check): always open.
    Nothing,
    /// `/metrics`: protected unless [`AdminAuth::metrics_open`].
    Metrics,
    /// Anything else: protected whenever there is a token.
    Data,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// It carried no bearer token.
    Missing,
    /// It carried another token.
    Wrong,
}

impl Refused {
    /// The `401 Unauthorized` that says so, with a short text body.
    pub fn response<B: From<&'static str>>(self) -> Response<B> {
        let (challenge, body) = match self {
            Refused::Missing => (
                r#"Bearer realm="squall""#,
                "unauthorized: send the admin token as `Authorization: Bearer <token>`\n",
            ),
            Refused::Wrong => (
                r#"Bearer realm="squall", error="invalid_token""#,
                "unauthorized: that is not the admin token\n",
            ),
        };
        let mut response = Response::new(B::from(body));
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        let headers = response.headers_mut();
        headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

/// What an admin listener asks of a request (see the module docs). The default asks
/// nothing. Cheap to clone; clones share the token in force and the counter.
#[derive(Clone, Default)]
pub struct AdminAuth {
    token: Option<TokenFile>,
    metrics_open: bool,
    refusals: Option<IntCounter>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("token", &self.token)
            .field("metrics_open", &self.metrics_open)
            .finish_non_exhaustive()
    }
}

impl AdminAuth {
    /// Every endpoint open: no token.
    pub fn open() -> Self {
        Self::default()
    }

    /// Every endpoint that shows something needs the token in `file`.
    pub fn token(file: TokenFile) -> Self {
        Self {
            token: Some(file),
            ..Self::default()
        }
    }

    /// With `open`, `/metrics` needs no token even when the rest does.
    pub fn metrics_open(mut self, open: bool) -> Self {
        self.metrics_open = open;
        self
    }

    /// Counts every refusal in `counter`.
    pub fn count_refusals(mut self, counter: IntCounter) -> Self {
        self.refusals = Some(counter);
        self
    }

    /// The token file, if a token is needed.
    pub fn token_file(&self) -> Option<&TokenFile> {
        self.token.as_ref()
    }

    /// Whether a request to an endpoint that `shows` this, with `headers`, may have it;
    /// a refusal is counted.
    pub fn check(&self, shows: Shows, headers: &HeaderMap) -> Result<(), Refused> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let open = match shows {
            Shows::Nothing => true,
            Shows::Metrics => self.metrics_open,
            Shows::Data => false,
        };
        if open {
            return Ok(());
        }
        let refused = match presented(headers) {
            None => Refused::Missing,
            Some(presented) if token.matches(presented) => return Ok(()),
            Some(_) => Refused::Wrong,
        };
        if let Some(counter) = &self.refusals {
            counter.inc();
        }
        Err(refused)
    }

    /// Reads the token file again on SIGHUP and when it changes, until `shutdown`; returns at
    /// once without a token. Run it beside the listener that checks requests.
    pub async fn watch(&self, shutdown: &Shutdown) {
        if let Some(token) = &self.token {
            token.watch(shutdown).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = authorization {
            headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn token_file(dir: &test_support::Scratch, content: &[u8]) -> Result<TokenFile, TokenError> {
        let path = dir.join("token");
        std::fs::write(&path, content).unwrap();
        TokenFile::load(path)
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret2", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secret", b""));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn a_bearer_header_is_read_whatever_the_scheme_case() {
        assert!(bearer_matches(&headers(Some("Bearer s3cret")), b"s3cret"));
        assert!(bearer_matches(&headers(Some("bearer  s3cret")), b"s3cret"));
        assert!(!bearer_matches(&headers(Some("Bearer s3cre")), b"s3cret"));
        assert!(!bearer_matches(&headers(Some("Basic s3cret")), b"s3cret"));
        assert!(!bearer_matches(&headers(Some("Bearers3cret")), b"s3cret"));
        assert!(!bearer_matches(&headers(Some("s3cret")), b"s3cret"));
        assert!(!bearer_matches(&headers(None), b"s3cret"));
    }

    #[test]
    fn a_token_file_is_trimmed_and_checked() {
        let dir = test_support::Scratch::new("token-file");
        let file = token_file(&dir, b"  s3cret-T0ken~\n\n").unwrap();
        assert!(file.matches(b"s3cret-T0ken~"));
        assert!(!file.matches(b"  s3cret-T0ken~\n\n"));
        assert!(!format!("{file:?}").contains("s3cret"), "{file:?}");

        let message = |content: &[u8]| token_file(&dir, content).unwrap_err().to_string();
        let path = dir.join("token").display().to_string();
        for (content, says) in [
            (&b""[..], "is empty"),
            (b" \n\t\r\n", "is empty"),
            (b"two words", "not visible ASCII (byte 3 of the token)"),
            (b"caf\xc3\xa9", "not visible ASCII (byte 3 of the token)"),
            (b"tab\there", "not visible ASCII"),
        ] {
            let message = message(content);
            assert!(
                message.contains(says) && message.contains(&path),
                "{message}"
            );
        }
        let longest = vec![b'x'; MAX_TOKEN_LEN];
        assert!(token_file(&dir, &longest).is_ok());
        let message = message(&[longest.as_slice(), b"x"].concat());
        assert!(message.contains("longer than 4096 bytes"), "{message}");
        let huge = vec![b'x'; READ_LIMIT as usize * 2];
        assert!(matches!(
            token_file(&dir, &huge),
            Err(TokenError::TooLong { .. })
        ));
        let missing = TokenFile::load(dir.join("missing")).unwrap_err();
        assert!(
            ErrorChain(&missing)
                .to_string()
                .contains("missing: No such file"),
            "{}",
            ErrorChain(&missing)
        );
    }

    #[test]
    fn without_a_token_everything_is_open() {
        let auth = AdminAuth::open();
        for shows in [Shows::Nothing, Shows::Metrics, Shows::Data] {
            assert_eq!(auth.check(shows, &headers(None)), Ok(()));
            assert_eq!(auth.check(shows, &headers(Some("Bearer x"))), Ok(()));
        }
    }

    #[test]
    fn with_a_token_data_and_metrics_need_it_and_refusals_are_counted() {
        let dir = test_support::Scratch::new("admin-auth");
        let counter = IntCounter::new("refusals_total", "Refusals.").unwrap();
        let auth =
            AdminAuth::token(token_file(&dir, b"right\n").unwrap()).count_refusals(counter.clone());
        let (none, wrong, right) = (
            headers(None),
            headers(Some("Bearer wrong")),
            headers(Some("Bearer right")),
        );
        for shows in [Shows::Metrics, Shows::Data] {
            assert_eq!(auth.check(shows, &none), Err(Refused::Missing));
            assert_eq!(auth.check(shows, &wrong), Err(Refused::Wrong));
            assert_eq!(auth.check(shows, &right), Ok(()));
        }
        assert_eq!(auth.check(Shows::Nothing, &none), Ok(()));
        assert_eq!(counter.get(), 4);

        let metrics_open = auth.clone().metrics_open(true);
        assert_eq!(metrics_open.check(Shows::Metrics, &none), Ok(()));
        assert_eq!(
            metrics_open.check(Shows::Data, &none),
            Err(Refused::Missing)
        );
        assert_eq!(counter.get(), 5);
    }

    #[test]
    fn a_refusal_is_a_401_with_a_bearer_challenge() {
        let response: Response<String> = Refused::Missing.response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers()[WWW_AUTHENTICATE],
            r#"Bearer realm="squall""#
        );
        assert!(response.body().contains("Authorization: Bearer"));
        let response: Response<String> = Refused::Wrong.response();
        assert_eq!(
            response.headers()[WWW_AUTHENTICATE],
            r#"Bearer realm="squall", error="invalid_token""#
        );
    }

    #[tokio::test]
    async fn a_changed_file_replaces_the_token_and_a_bad_one_is_refused() {
        let dir = test_support::Scratch::new("token-reload");
        let file = token_file(&dir, b"first")
            .unwrap()
            .poll_every(Duration::from_millis(5));
        let stop = crate::Stop::new();
        let watching = {
            let (file, shutdown) = (file.clone(), stop.shutdown());
            tokio::spawn(async move { file.watch(&shutdown).await })
        };
        // A new file (a new inode), as a Secret rotation makes one.
        let replace = |content: &str| {
            let next = dir.join("token.next");
            std::fs::write(&next, content).unwrap();
            std::fs::rename(&next, dir.join("token")).unwrap();
        };
        replace("second\n");
        test_support::eventually("the new token", Duration::from_secs(10), || {
            file.matches(b"second").then_some(())
        })
        .await;
        assert!(!file.matches(b"first"));
        stop.stop();
        watching.await.unwrap();
        // A bad file keeps the token in force.
        replace("   \n");
        assert!(!file.reload("a test").await);
        assert!(file.matches(b"second"));
        replace("third");
        assert!(file.reload("a test").await);
        assert!(file.matches(b"third"));
    }
}
