//! A typed async client for forkd's API v1: what `squall` and the scaler use to talk to a
//! daemon, local or remote.

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    CloneInfo, CloneList, CloneRequest, ErrorBody, ErrorCode, TemplateInfo, TemplateList,
    TemplateSpec,
};

/// What can go wrong calling forkd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL or a path built from it is not a valid URI.
    #[error("invalid forkd URL {url:?}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: http::Error,
    },
    /// The request could not be sent or the response not received.
    #[error("request to forkd failed")]
    Transport(#[source] hyper_util::client::legacy::Error),
    /// The response body could not be read.
    #[error("reading forkd's response failed")]
    Body(#[source] hyper::Error),
    /// forkd answered with an error. Act on `code`, not on `status`.
    #[error("forkd answered {status} ({code}): {message}")]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// What went wrong, for a program ([`ErrorCode::Unknown`] if the body had no code
        /// this client knows, or was not forkd's JSON at all).
        code: ErrorCode,
        /// forkd's error message (the body itself if it was not forkd's JSON).
        message: String,
    },
    /// forkd answered with JSON we do not understand.
    #[error("unexpected response from forkd")]
    Decode(#[source] serde_json::Error),
}

impl ClientError {
    /// The code forkd answered with, if it answered with an error; `None` if the request
    /// failed before an answer (or the answer could not be read).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            ClientError::Url { .. }
            | ClientError::Transport(_)
            | ClientError::Body(_)
            | ClientError::Decode(_) => None,
        }
    }
}

/// The whole body of `response`.
async fn collect(response: http::Response<Incoming>) -> Result<Bytes, ClientError> {
    let body = response.into_body().collect().await;
    Ok(body.map_err(ClientError::Body)?.to_bytes())
}

/// A client for one forkd. Cheap to clone; clones share one connection pool.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    authorization: String,
    http: HttpClient<HttpConnector, Full<Bytes>>,
}

/// The most of an error answer's body that is read.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// How long connecting to a daemon may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Client {
    /// A client for the daemon at `base_url` (such as `http://127.0.0.1:7070`) using `token`.
    pub fn new(base_url: &str, token: &str) -> Result<Client, ClientError> {
        let base = base_url.trim_end_matches('/').to_owned();
        // Validate once here so that later requests only fail for reasons of their own.
        Uri::try_from(format!("{base}/healthz")).map_err(|e| ClientError::Url {
            url: base_url.to_owned(),
            source: e.into(),
        })?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // A host whose packets are dropped would otherwise cost minutes of SYN retries per
        // call; requests themselves may rightly last long (a template warming up).
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let http = HttpClient::builder(TokioExecutor::new()).build(connector);
        Ok(Client {
            base,
            authorization: format!("Bearer {token}"),
            http,
        })
    }

    /// Sends a request and returns the response if it succeeded; forkd's error otherwise.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut builder = Request::builder()
            .method(method)
            .uri(&url)
            .header(AUTHORIZATION, &self.authorization);
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|source| ClientError::Url { url, source })?;
        let response = self
            .http
            .request(request)
            .await
            .map_err(ClientError::Transport)?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        // An error's body is short; a peer that is not forkd may send anything.
        let limited = Limited::new(response.into_body(), MAX_ERROR_BODY)
            .collect()
            .await;
        let bytes = match limited {
            Ok(body) => body.to_bytes(),
            Err(e) => Bytes::from(format!("an unreadable or oversized error body ({e})")),
        };
        let (message, code) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => (body.error, body.code),
            // Not forkd's answer (a proxy's, say): keep what it said.
            Err(_) => (
                String::from_utf8_lossy(&bytes).into_owned(),
                ErrorCode::Unknown,
            ),
        };
        Err(ClientError::Api {
            status,
            code,
            message,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let bytes = collect(response).await?;
        Ok((status, bytes))
    }

    async fn call_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(ClientError::Decode)?;
        let (_, bytes) = self.call(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }

    /// `GET /healthz`: succeeds if the daemon answers.
    pub async fn health(&self) -> Result<(), ClientError> {
        self.call(Method::GET, "/healthz", None).await.map(|_| ())
    }

    /// `GET /metrics`: the daemon's metrics in Prometheus text format.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let (_, bytes) = self.call(Method::GET, "/metrics", None).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// `POST /v1/templates`: creates a template and, for `fork`, waits until it is warm.
    pub async fn create_template(&self, spec: &TemplateSpec) -> Result<TemplateInfo, ClientError> {
        self.call_json(Method::POST, "/v1/templates", Some(spec))
            .await
    }

    /// `GET /v1/templates`.
    pub async fn templates(&self) -> Result<Vec<TemplateInfo>, ClientError> {
        let list: TemplateList = self
            .call_json(Method::GET, "/v1/templates", None::<&()>)
            .await?;
        Ok(list.templates)
    }

    /// `DELETE /v1/templates/{name}`: kills its clones and stops it.
    pub async fn delete_template(&self, name: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/v1/templates/{name}"), None)
            .await
            .map(|_| ())
    }

    /// `GET /v1/templates/{name}/snapshot`: the `vm` template's portable snapshot, as a body
    /// to stream (see [`microvm::portable`]); an error if the daemon refuses before sending.
    pub async fn snapshot(&self, name: &str) -> Result<Incoming, ClientError> {
        let path = format!("/v1/templates/{name}/snapshot");
        Ok(self.send(Method::GET, &path, None).await?.into_body())
    }

    /// `POST /v1/templates/{template}/clones`: makes `count` clones and returns once each is
    /// ready or has failed (see [`CloneInfo::state`]); an error only if all failed.
    pub async fn create_clones(
        &self,
        template: &str,
        count: usize,
    ) -> Result<Vec<CloneInfo>, ClientError> {
        let path = format!("/v1/templates/{template}/clones");
        let list: CloneList = self
            .call_json(Method::POST, &path, Some(&CloneRequest { count }))
            .await?;
        Ok(list.clones)
    }

    /// `GET /v1/clones`: every clone the daemon tracks, including those that exited on their
    /// own, and the daemon's `max_clones`.
    pub async fn clones(&self) -> Result<CloneList, ClientError> {
        self.call_json(Method::GET, "/v1/clones", None::<&()>).await
    }

    /// `DELETE /v1/clones/{id}`: kills a clone (SIGTERM, then SIGKILL after the daemon's grace
    /// period) and returns once it is gone.
    pub async fn kill(&self, id: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/v1/clones/{id}"), None)
            .await
            .map(|_| ())
    }
}
