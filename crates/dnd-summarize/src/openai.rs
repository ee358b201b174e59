//! The OpenAI-compatible chat completions backend (OpenAI, vLLM, llama.cpp server, Ollama).

use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{RequestBuilder, StatusCode, Url};
use serde::{Deserialize, Serialize};

use crate::chat::{ChatBackend, Completion};
use crate::error::SummarizeError;
use crate::prompts::ChatMessage;

/// A server asking to wait longer than this is effectively down: failing tells the user
/// more than a job that hangs.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Server messages are quoted in errors; an HTML error page would drown the rest.
const MAX_QUOTED_BODY: usize = 500;

/// Where and how to ask an OpenAI-compatible server. Missing fields take the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    /// The API root, e.g. `https://api.openai.com/v1` or `http://localhost:8000/v1`.
    pub base_url: String,
    pub model: String,
    /// The name of the environment variable holding the API key (not the key itself, which
    /// must not end up in config files or results). When the variable is unset, or this is
    /// empty, requests carry no key, as local servers expect.
    pub api_key_env: String,
    /// The reference's 0.3: a little variety across the summary rounds.
    pub temperature: f64,
    /// A label is at most 5 words; the cap bounds cost when a model rambles.
    pub max_tokens: u32,
    /// Per request, including reading the reply.
    pub timeout_secs: f64,
    /// Retries after the first attempt, on 429, 5xx, connection errors and timeouts.
    pub max_retries: u32,
    /// Retry `n` waits about `backoff_base_ms * 2^(n-1)` (half of it random), at most
    /// `backoff_max_ms`, or what the server's Retry-After asks if that is longer.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "https://api.openai.com/v1".into(),
            model: "gpt-4o-mini".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            temperature: 0.3,
            max_tokens: 32,
            timeout_secs: 60.0,
            max_retries: 5,
            backoff_base_ms: 500,
            backoff_max_ms: 30_000,
        }
    }
}

impl OpenAiConfig {
    pub fn validate(&self) -> Result<(), SummarizeError> {
        let url = Url::parse(&self.base_url).map_err(|e| {
            SummarizeError::invalid(
                "openai.base_url",
                format!("`{}` is not a URL: {e}", self.base_url),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(SummarizeError::invalid(
                "openai.base_url",
                "use an http:// or https:// URL",
            ));
        }
        if self.model.trim().is_empty() {
            return Err(SummarizeError::invalid(
                "openai.model",
                "name the model the server should run",
            ));
        }
        if self.api_key_env.starts_with("sk-") {
            return Err(SummarizeError::invalid(
                "openai.api_key_env",
                "this looks like an API key; put the key in an environment variable and write that variable's name here",
            ));
        }
        if self.api_key_env.contains(['=', '\0']) || self.api_key_env.contains(char::is_whitespace)
        {
            return Err(SummarizeError::invalid(
                "openai.api_key_env",
                "write the name of an environment variable, e.g. OPENAI_API_KEY",
            ));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(SummarizeError::invalid("openai.temperature", "use a value from 0 to 2"));
        }
        if self.max_tokens == 0 {
            return Err(SummarizeError::invalid("openai.max_tokens", "allow at least one token"));
        }
        if !(self.timeout_secs.is_finite() && self.timeout_secs > 0.0) {
            return Err(SummarizeError::invalid(
                "openai.timeout_secs",
                "use a positive number of seconds",
            ));
        }
        if self.backoff_base_ms > self.backoff_max_ms {
            return Err(SummarizeError::invalid(
                "openai.backoff_base_ms",
                "it must not exceed openai.backoff_max_ms",
            ));
        }
        Ok(())
    }

    fn chat_url(&self) -> String {
        format!("{}/chat/completions", self.base_url.trim_end_matches('/'))
    }

    fn models_url(&self) -> String {
        format!("{}/models", self.base_url.trim_end_matches('/'))
    }

    fn api_key(&self) -> Option<String> {
        if self.api_key_env.is_empty() {
            return None;
        }
        std::env::var(&self.api_key_env).ok().filter(|k| !k.is_empty())
    }
}

/// The OpenAI-compatible backend.
pub(crate) struct OpenAiChat {
    config: OpenAiConfig,
    client: reqwest::Client,
    /// Read once, so that every request of a job uses the same key.
    api_key: Option<String>,
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    temperature: f64,
    max_tokens: u32,
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    content: Option<String>,
}

/// Why one attempt failed.
enum Failure {
    /// Worth another attempt: 429, 5xx, a lost connection, a timeout.
    Transient {
        what: String,
        retry_after: Option<Duration>,
        no_connection: bool,
    },
    Fatal(SummarizeError),
}

impl OpenAiChat {
    /// `config` must have passed [`OpenAiConfig::validate`].
    pub(crate) fn new(config: &OpenAiConfig) -> Result<Self, SummarizeError> {
        let timeout = Duration::from_secs_f64(config.timeout_secs);
        let client =
            reqwest::Client::builder().timeout(timeout).connect_timeout(timeout).build().map_err(
                |e| SummarizeError::Internal(format!("cannot set up the HTTP client: {e}")),
            )?;
        Ok(OpenAiChat { config: config.clone(), client, api_key: config.api_key() })
    }

    /// What to do about a 401/403: the key, and where it should come from.
    fn auth_help(&self) -> String {
        let config = &self.config;
        if config.api_key_env.is_empty() {
            return "the server wants an API key: set openai.api_key_env to the name of the environment variable that holds it".into();
        }
        match self.api_key {
            None => format!(
                "put the API key in the environment variable {} (it is not set)",
                config.api_key_env
            ),
            Some(_) => format!(
                "the key in the environment variable {} was refused: check it, and that it may use model {}",
                config.api_key_env, config.model
            ),
        }
    }

    fn authorized(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// One attempt: the response body of a 2xx, or why not.
    async fn attempt(&self, request: RequestBuilder, url: &str) -> Result<String, Failure> {
        let transport = |e: reqwest::Error| Failure::Transient {
            what: if e.is_timeout() {
                format!("no answer within {} s (openai.timeout_secs)", self.config.timeout_secs)
            } else {
                with_causes(&e)
            },
            retry_after: None,
            no_connection: e.is_connect(),
        };
        let response = self.authorized(request).send().await.map_err(transport)?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let body = response.text().await.map_err(transport)?;
        if status.is_success() {
            return Ok(body);
        }
        let message = server_message(&body);
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(Failure::Transient {
                what: format!("{status}: {message}"),
                retry_after,
                no_connection: false,
            });
        }
        let help = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Some(self.auth_help()),
            StatusCode::NOT_FOUND => Some(format!(
                "check openai.base_url ({}; OpenAI-compatible servers usually serve the API under /v1) and openai.model ({})",
                self.config.base_url, self.config.model
            )),
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => Some(format!(
                "check openai.model ({}) and that the server accepts temperature and max_tokens",
                self.config.model
            )),
            _ => None,
        };
        Err(Failure::Fatal(SummarizeError::Rejected {
            url: url.into(),
            status: status.as_u16(),
            message,
            help,
        }))
    }

    /// Posts the body, retrying transient failures with exponential backoff and jitter.
    async fn post_with_retries(&self, url: &str, body: &str) -> Result<String, SummarizeError> {
        let attempts = self.config.max_retries + 1;
        let mut attempt = 1;
        loop {
            let request = self
                .client
                .post(url)
                .header(CONTENT_TYPE, "application/json")
                .body(body.to_string());
            let (what, retry_after, no_connection) = match self.attempt(request, url).await {
                Ok(body) => return Ok(body),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient { what, retry_after, no_connection }) => {
                    (what, retry_after, no_connection)
                }
            };
            if attempt == attempts {
                return Err(if no_connection {
                    SummarizeError::Unreachable { url: url.into(), attempts, reason: what }
                } else {
                    SummarizeError::RetriesExhausted { url: url.into(), attempts, last: what }
                });
            }
            let delay = self.backoff(attempt).max(retry_after.unwrap_or_default());
            tracing::warn!(url, attempt, attempts, ?delay, "LLM request failed ({what}); retrying");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// "Equal jitter": half the exponential delay is fixed, half random, so that many
    /// workers throttled together do not retry in lockstep.
    fn backoff(&self, attempt: u32) -> Duration {
        let exponential = self.config.backoff_base_ms.saturating_mul(1u64 << (attempt - 1).min(30));
        let capped = exponential.min(self.config.backoff_max_ms);
        let half = capped / 2;
        Duration::from_millis(half + rand::rng().random_range(0..=capped - half))
    }
}

#[async_trait]
impl ChatBackend for OpenAiChat {
    fn backend(&self) -> &'static str {
        "openai"
    }

    fn model(&self) -> String {
        self.config.model.clone()
    }

    fn describe(&self) -> String {
        format!("openai:{}@{}", self.config.model, self.config.base_url)
    }

    /// One GET of `/models`, without retries: an unreachable server or a refused key
    /// shows at once. A model the server does not list is only a warning, because some
    /// servers (llama.cpp) answer for any model name.
    async fn check(&self) -> Result<(), SummarizeError> {
        let url = self.config.models_url();
        let body = match self.attempt(self.client.get(&url), &url).await {
            Ok(body) => body,
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Transient { what, no_connection: true, .. }) => {
                return Err(SummarizeError::Unreachable { url, attempts: 1, reason: what });
            }
            Err(Failure::Transient { what, .. }) => {
                return Err(SummarizeError::RetriesExhausted { url, attempts: 1, last: what });
            }
        };
        let listed: Vec<String> = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("data")?.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|m| Some(m.get("id")?.as_str()?.to_string()))
            .collect();
        if !listed.contains(&self.config.model) {
            tracing::warn!(
                model = self.config.model,
                ?listed,
                "the server does not list the configured model"
            );
        }
        Ok(())
    }

    fn render(&self, messages: &[ChatMessage]) -> Result<String, SummarizeError> {
        serde_json::to_string(&ChatRequest {
            model: &self.config.model,
            messages,
            temperature: self.config.temperature,
            max_tokens: self.config.max_tokens,
        })
        .map_err(|e| SummarizeError::Internal(format!("cannot encode the chat request: {e}")))
    }

    async fn complete(&self, messages: Vec<ChatMessage>) -> Result<Completion, SummarizeError> {
        let url = self.config.chat_url();
        let request = self.render(&messages)?;
        let body = self.post_with_retries(&url, &request).await?;
        let malformed = |reason: String| SummarizeError::MalformedResponse {
            url: url.clone(),
            reason,
            body: quoted(&body),
        };
        let response: ChatResponse = serde_json::from_str(&body)
            .map_err(|e| malformed(format!("not a chat completion ({e})")))?;
        let Some(choice) = response.choices.into_iter().next() else {
            return Err(malformed("it has no choices".into()));
        };
        let Some(reply) = choice.message.content else {
            return Err(malformed("its first choice has no message content".into()));
        };
        Ok(Completion { request, reply })
    }
}

/// Retry-After in seconds. (The HTTP-date form is rare from API servers; the backoff
/// applies then.)
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: f64 = headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0)
        .then(|| Duration::from_secs_f64(seconds.min(MAX_RETRY_AFTER.as_secs_f64())))
}

/// The server's own explanation: OpenAI's `{"error": {"message"}}`, the `{"error": "..."}`
/// of Ollama and others, a top-level `message` or `detail`, else the body itself.
fn server_message(body: &str) -> String {
    let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let found = json.as_ref().and_then(|v| {
        let error = v.get("error");
        error
            .and_then(|e| e.get("message"))
            .or(error)
            .or_else(|| v.get("message"))
            .or_else(|| v.get("detail"))
            .and_then(|m| m.as_str())
    });
    match found {
        Some(message) => quoted(message),
        None if body.trim().is_empty() => "(no message)".into(),
        None => quoted(body.trim()),
    }
}

/// What went wrong under reqwest's "error sending request for url (...)", whose URL the
/// error names already: e.g. "tcp connect error: Connection refused (os error 111)".
fn with_causes(error: &dyn std::error::Error) -> String {
    let Some(first) = error.source() else {
        return error.to_string();
    };
    let mut text = first.to_string();
    let mut source = first.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn quoted(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED_BODY) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_servers_message_in_common_error_shapes() {
        assert_eq!(
            server_message(
                r#"{"error":{"message":"Incorrect API key","type":"invalid_request_error"}}"#
            ),
            "Incorrect API key"
        );
        assert_eq!(
            server_message(r#"{"error":"model 'llama9' not found"}"#),
            "model 'llama9' not found"
        );
        assert_eq!(
            server_message(r#"{"object":"error","message":"bad temperature"}"#),
            "bad temperature"
        );
        assert_eq!(server_message(r#"{"detail":"Not Found"}"#), "Not Found");
        assert_eq!(server_message("<html>502</html>"), "<html>502</html>");
        assert_eq!(server_message(""), "(no message)");
        assert_eq!(server_message(&"x".repeat(2000)).len(), MAX_QUOTED_BODY + 3);
    }

    #[test]
    fn backoff_grows_exponentially_with_bounded_jitter() {
        let config =
            OpenAiConfig { backoff_base_ms: 100, backoff_max_ms: 1000, ..Default::default() };
        let chat = OpenAiChat::new(&config).unwrap();
        for _ in 0..50 {
            let ms = |attempt| chat.backoff(attempt).as_millis();
            assert!((50..=100).contains(&ms(1)), "{}", ms(1));
            assert!((100..=200).contains(&ms(2)), "{}", ms(2));
            assert!((400..=800).contains(&ms(4)), "{}", ms(4));
            assert!((500..=1000).contains(&ms(10)), "{}", ms(10));
            assert!((500..=1000).contains(&ms(200)), "{}", ms(200));
        }
    }

    #[test]
    fn parses_retry_after_seconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(RETRY_AFTER, "0.5".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(500)));
        headers.insert(RETRY_AFTER, "100000".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
        headers.insert(RETRY_AFTER, "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn validation_names_the_field_and_catches_a_key_pasted_as_its_variable() {
        let cases = [
            (
                OpenAiConfig { base_url: "localhost:8000".into(), ..Default::default() },
                "openai.base_url",
            ),
            (
                OpenAiConfig { base_url: "ftp://x/v1".into(), ..Default::default() },
                "openai.base_url",
            ),
            (OpenAiConfig { model: " ".into(), ..Default::default() }, "openai.model"),
            (
                OpenAiConfig { api_key_env: "sk-proj-abc123".into(), ..Default::default() },
                "openai.api_key_env",
            ),
            (
                OpenAiConfig { api_key_env: "MY KEY".into(), ..Default::default() },
                "openai.api_key_env",
            ),
            (OpenAiConfig { temperature: 3.0, ..Default::default() }, "openai.temperature"),
            (OpenAiConfig { max_tokens: 0, ..Default::default() }, "openai.max_tokens"),
            (OpenAiConfig { timeout_secs: 0.0, ..Default::default() }, "openai.timeout_secs"),
            (
                OpenAiConfig { backoff_base_ms: 5000, backoff_max_ms: 10, ..Default::default() },
                "openai.backoff_base_ms",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate().unwrap_err();
            assert!(err.is_user_error() && err.to_string().contains(field), "{field}: {err}");
        }
        OpenAiConfig::default().validate().unwrap();
        OpenAiConfig { api_key_env: String::new(), ..Default::default() }.validate().unwrap();
    }
}
