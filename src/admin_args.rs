//! `--admin-token-file` and `--admin-metrics-open`, shared by `squall balance` and `squall
//! up`: parsed at the edge into a [`lifecycle::AdminAuth`], the token read and checked before
//! anything starts, so a bad file stops the command with an error that names it.

use std::net::SocketAddr;
use std::path::PathBuf;

use lifecycle::{AdminAuth, TokenError, TokenFile};

/// Who may read the admin listener.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct AdminAuthArgs {
    /// Require `Authorization: Bearer <token>` on the admin listener, the token being this
    /// file's content without surrounding whitespace (visible ASCII, at most 4096 bytes).
    /// The file is read again when it changes and on SIGHUP; a new content that is not a
    /// valid token is logged and the old token kept. /healthz (and the live page's HTML,
    /// script and style, which ask for the token) stay open.
    #[arg(long, value_name = "FILE")]
    pub(crate) admin_token_file: Option<PathBuf>,
    /// With --admin-token-file: leave /metrics open (for a Prometheus that scrapes without
    /// credentials inside a trusted network); the rest still needs the token.
    #[arg(long, requires = "admin_token_file")]
    pub(crate) admin_metrics_open: bool,
}

impl AdminAuthArgs {
    /// What the admin listener asks of a request, the token file read and checked.
    pub(crate) fn auth(&self) -> Result<AdminAuth, TokenError> {
        Ok(match &self.admin_token_file {
            Some(path) => {
                AdminAuth::token(TokenFile::load(path)?).metrics_open(self.admin_metrics_open)
            }
            None => AdminAuth::open(),
        })
    }

    /// Warns, on stderr, when the admin listener at `addr` can be reached from other hosts
    /// and asks for no token.
    pub(crate) fn warn_if_exposed(&self, addr: SocketAddr) {
        if self.admin_token_file.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "the admin listener is reachable beyond this host and needs no token: anyone who reaches it reads /status and /metrics; give --admin-token-file, or bind it to loopback"
            );
        }
    }
}
