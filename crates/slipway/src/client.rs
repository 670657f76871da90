//! The HTTP client of the CLI: a thin typed wrapper over ureq that turns every non-2xx answer
//! into an [`ApiFailure`] carrying the server's `{code, message}`.

use std::time::Duration;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use ureq::http::{Method, Request, Response};
use ureq::{AsSendBody, Body};

/// A request the server answered with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ApiFailure {}

impl ApiFailure {
    /// The process exit code for this failure: 3 not found, 4 unauthorized or forbidden,
    /// 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self.status {
            401 | 403 => 4,
            404 => 3,
            _ => 1,
        }
    }
}

/// A connection to one slipway server with one token.
pub struct Client {
    base: String,
    token: Option<String>,
    http: ureq::Agent,
}

impl Client {
    pub fn new(server: &str, token: Option<String>) -> Self {
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .build()
            .into();
        Self {
            base: server.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    pub fn server(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A request builder with the URL and the token set, for requests the typed helpers do
    /// not cover (streamed uploads, streamed downloads).
    pub fn request(&self, method: Method, path: &str) -> ureq::http::request::Builder {
        let builder = Request::builder().method(method).uri(self.url(path));
        match &self.token {
            Some(t) => builder.header("Authorization", format!("Bearer {t}")),
            None => builder,
        }
    }

    /// Sends a request built with [`Client::request`]; a non-2xx answer becomes an
    /// [`ApiFailure`], a 2xx answer is returned unread.
    ///
    /// # Errors
    /// The server is unreachable, or answered with an error.
    pub fn send(&self, request: Request<impl AsSendBody>) -> anyhow::Result<Response<Body>> {
        let response = self
            .http
            .run(request)
            .with_context(|| format!("cannot reach the slipway server at {}", self.base))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(failure(response).into())
        }
    }

    fn json<T: DeserializeOwned>(&self, request: Request<impl AsSendBody>) -> anyhow::Result<T> {
        let mut response = self.send(request)?;
        response
            .body_mut()
            .read_json()
            .context("the server's answer is not the expected JSON")
    }

    /// # Errors
    /// See [`Client::send`]; also when the answer is not the expected JSON.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.json(self.request(Method::GET, path).body(())?)
    }

    /// # Errors
    /// See [`Client::get`].
    #[allow(
        dead_code,
        reason = "part of the client's surface for the run commands"
    )]
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.json(self.request(Method::DELETE, path).body(())?)
    }

    /// # Errors
    /// See [`Client::get`].
    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.json(self.json_request(Method::POST, path, body)?)
    }

    /// # Errors
    /// See [`Client::get`].
    pub fn put<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> anyhow::Result<T> {
        self.json(self.json_request(Method::PUT, path, body)?)
    }

    fn json_request(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<Request<String>> {
        let text = serde_json::to_string(body)?;
        Ok(self
            .request(method, path)
            .header("Content-Type", "application/json")
            .body(text)?)
    }
}

/// Reads the error body; a body that is not the API's shape still gives a useful message.
fn failure(mut response: Response<Body>) -> ApiFailure {
    let status = response.status();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    match serde_json::from_str::<Value>(&text) {
        Ok(v) if v["code"].is_string() && v["message"].is_string() => ApiFailure {
            status: status.as_u16(),
            code: v["code"].as_str().unwrap_or_default().to_string(),
            message: v["message"].as_str().unwrap_or_default().to_string(),
        },
        _ => ApiFailure {
            status: status.as_u16(),
            code: format!("http_{}", status.as_u16()),
            message: format!(
                "the server answered {status}{}",
                if text.is_empty() {
                    String::new()
                } else {
                    format!(": {}", text.trim())
                }
            ),
        },
    }
}
