//! The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 that answers
//! from a script: success, throttling, server errors, timeouts, malformed bodies, listing
//! replies and a refused key.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dnd_summarize::{
    Answer, Backend, OpenAiConfig, Step, SummarizeError, Summarizer, SummarizerConfig, build,
    summarize_rounds,
};
use serde_json::{Value, json};

/// One scripted response of the chat completions route.
struct Reply {
    status: u16,
    body: String,
    retry_after: Option<&'static str>,
    delay: Duration,
}

fn completion(content: &str) -> Reply {
    let body = json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    });
    Reply { status: 200, body: body.to_string(), retry_after: None, delay: Duration::ZERO }
}

fn error(status: u16, message: &str) -> Reply {
    let body = json!({"error": {"message": message, "type": "test_error"}});
    Reply { status, body: body.to_string(), retry_after: None, delay: Duration::ZERO }
}

fn raw(body: &str) -> Reply {
    Reply { status: 200, body: body.into(), retry_after: None, delay: Duration::ZERO }
}

#[derive(Default)]
struct Script {
    replies: Mutex<VecDeque<Reply>>,
    /// (body, Authorization header) of every chat request received.
    received: Mutex<Vec<(String, Option<String>)>>,
    /// When set, `/models` refuses requests without a key, as OpenAI does.
    models_need_key: bool,
}

impl Script {
    fn received(&self) -> Vec<(String, Option<String>)> {
        self.received.lock().unwrap().clone()
    }
}

async fn chat_completions(
    State(script): State<Arc<Script>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    script.received.lock().unwrap().push((body, auth));
    let next = script.replies.lock().unwrap().pop_front();
    let Some(reply) = next else {
        return (StatusCode::IM_A_TEAPOT, "the test script has no more replies").into_response();
    };
    tokio::time::sleep(reply.delay).await;
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    if let Some(seconds) = reply.retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, seconds.parse().unwrap());
    }
    response
}

async fn models(State(script): State<Arc<Script>>, headers: HeaderMap) -> Response {
    if script.models_need_key && !headers.contains_key(header::AUTHORIZATION) {
        let body = json!({"error": {"message": "You didn't provide an API key."}});
        return (StatusCode::UNAUTHORIZED, body.to_string()).into_response();
    }
    axum::Json(json!({"object": "list", "data": [{"id": "test-model", "object": "model"}]}))
        .into_response()
}

/// Serves `replies` on a fresh port; returns the API root (`http://127.0.0.1:N/v1`).
async fn serve(replies: Vec<Reply>, models_need_key: bool) -> (String, Arc<Script>) {
    let script = Arc::new(Script {
        replies: Mutex::new(replies.into()),
        models_need_key,
        ..Default::default()
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}/v1"), script)
}

/// Fast settings: short timeouts and backoff, so that no test takes long.
fn openai(base_url: &str) -> OpenAiConfig {
    OpenAiConfig {
        base_url: base_url.into(),
        model: "test-model".into(),
        api_key_env: String::new(),
        timeout_secs: 2.0,
        max_retries: 2,
        backoff_base_ms: 5,
        backoff_max_ms: 20,
        ..Default::default()
    }
}

fn summarizer(openai: OpenAiConfig) -> Box<dyn Summarizer> {
    build(&SummarizerConfig { backend: Backend::OpenAi, openai, ..Default::default() }).unwrap()
}

#[tokio::test]
async fn a_label_comes_back_cleaned_with_the_request_as_sent() {
    // SAFETY: no other test in this binary reads or writes this variable, and the
    // standard library serialises environment access.
    unsafe { std::env::set_var("DND_SUMMARIZE_TEST_KEY", "sk-test-123") };
    let (url, script) = serve(vec![completion("Label: Red circles.")], true).await;
    let s =
        summarizer(OpenAiConfig { api_key_env: "DND_SUMMARIZE_TEST_KEY".into(), ..openai(&url) });
    s.check().await.unwrap();
    assert_eq!(s.describe(), format!("openai:test-model@{url}"));

    let ex = s.simplify("a red circle on a blue background").await.unwrap();
    assert_eq!(
        (ex.step, ex.backend.as_str(), ex.model.as_str()),
        (Step::Simplify, "openai", "test-model")
    );
    assert_eq!(ex.prompt_version, "dnd-prompts-1");
    assert_eq!(ex.reply, "Label: Red circles.");
    assert_eq!(ex.label(), Some("Red circles"));
    assert!(!ex.cached);

    let received = script.received();
    assert_eq!(received.len(), 1);
    let (body, auth) = &received[0];
    assert_eq!(&ex.request, body, "the exchange records the exact body sent");
    assert_eq!(auth.as_deref(), Some("Bearer sk-test-123"));
    assert!(!ex.request.contains("sk-test-123"), "the key never enters the record");
    let request: Value = serde_json::from_str(body).unwrap();
    assert_eq!(request["model"], "test-model");
    assert_eq!(request["temperature"], 0.3);
    assert_eq!(request["messages"][0]["role"], "system");
    let user = request["messages"][1]["content"].as_str().unwrap();
    assert!(user.ends_with("Caption: a red circle on a blue background\nLabel:"), "{user}");
}

#[tokio::test]
async fn a_throttled_request_waits_for_retry_after_then_succeeds() {
    let throttled = Reply { retry_after: Some("1"), ..error(429, "Rate limit reached") };
    let (url, script) = serve(vec![throttled, completion("stripes")], false).await;
    let s = summarizer(OpenAiConfig { backoff_base_ms: 1, backoff_max_ms: 2, ..openai(&url) });
    let start = Instant::now();
    let ex = s.summarize(&["zebra stripes".into(), "striped shirt".into()]).await.unwrap();
    let waited = start.elapsed();
    assert_eq!(ex.label(), Some("stripes"));
    assert_eq!(script.received().len(), 2);
    assert!(
        waited >= Duration::from_millis(950),
        "Retry-After: 1 was not honoured ({waited:?}; the backoff alone is 2 ms)"
    );
    assert!(waited < Duration::from_secs(3), "{waited:?}");
}

#[tokio::test]
async fn server_errors_are_retried_until_the_attempts_run_out() {
    let replies = (0..3).map(|_| error(500, "engine overloaded")).collect();
    let (url, script) = serve(replies, false).await;
    let err = summarizer(openai(&url)).simplify("a dog").await.unwrap_err();
    assert!(matches!(err, SummarizeError::RetriesExhausted { attempts: 3, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("3 attempts") && msg.contains("500") && msg.contains("engine overloaded"),
        "{msg}"
    );
    assert!(!err.is_user_error());
    assert_eq!(script.received().len(), 3, "max_retries 2 = 3 attempts");
}

#[tokio::test]
async fn a_server_slower_than_the_timeout_fails_after_the_retries() {
    let slow = || Reply { delay: Duration::from_secs(3), ..completion("too late") };
    let (url, script) = serve(vec![slow(), slow()], false).await;
    let s = summarizer(OpenAiConfig { timeout_secs: 0.2, max_retries: 1, ..openai(&url) });
    let start = Instant::now();
    let err = s.simplify("a dog").await.unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, SummarizeError::RetriesExhausted { attempts: 2, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("2 attempts") && msg.contains("openai.timeout_secs"), "{msg}");
    assert!(took < Duration::from_secs(2), "the client waited for the server: {took:?}");
    assert_eq!(script.received().len(), 2);
}

#[tokio::test]
async fn malformed_completions_are_typed_errors_and_not_retried() {
    let replies = vec![
        raw("this is not json"),
        raw(r#"{"choices": []}"#),
        raw(r#"{"choices": [{"index": 0, "message": {"role": "assistant", "content": null}}]}"#),
    ];
    let (url, script) = serve(replies, false).await;
    let s = summarizer(openai(&url));
    for expected in ["not a chat completion", "no choices", "no message content"] {
        let err = s.simplify("a dog").await.unwrap_err();
        assert!(matches!(err, SummarizeError::MalformedResponse { .. }), "{err:?}");
        assert!(err.to_string().contains(expected), "{err}");
    }
    assert_eq!(script.received().len(), 3, "one request per call");
}

#[tokio::test]
async fn a_reply_listing_several_labels_is_merged_in_the_summary_rounds() {
    let replies = vec![
        completion("1. red circles\n2. blue squares"),
        completion("colored shapes"),
        completion("\"Red circles.\""),
    ];
    let (url, script) = serve(replies, false).await;
    let s = summarizer(openai(&url));
    let labels: Vec<String> = ["red circle", "blue square", "red ring"].map(String::from).to_vec();
    let out = summarize_rounds(s.as_ref(), &labels, 7, 2).await.unwrap();

    let steps: Vec<Step> = out.exchanges.iter().map(|e| e.step).collect();
    assert_eq!(steps, [Step::Summarize, Step::Merge, Step::Summarize]);
    assert_eq!(
        out.exchanges[0].answer,
        Ok(Answer::Several(vec!["red circles".into(), "blue squares".into()]))
    );
    assert_eq!(out.labels, ["colored shapes", "red circles"]);

    let received = script.received();
    let user = |i: usize| {
        serde_json::from_str::<Value>(&received[i].0).unwrap()["messages"][1]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(user(1).ends_with("Labels:\n- red circles\n- blue squares\nLabel:"), "{}", user(1));
    for round in [0, 2] {
        let prompt = user(round);
        assert!(labels.iter().all(|l| prompt.contains(&format!("- {l}\n"))), "{prompt}");
    }
}

#[tokio::test]
async fn a_refused_key_names_the_variable_that_should_hold_it() {
    let (url, script) = serve(vec![error(401, "Incorrect API key provided")], true).await;
    let s = summarizer(OpenAiConfig {
        api_key_env: "DND_SUMMARIZE_TEST_UNSET_KEY".into(),
        ..openai(&url)
    });

    let err = s.simplify("a dog").await.unwrap_err();
    assert!(matches!(err, SummarizeError::Rejected { status: 401, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("401") && msg.contains("Incorrect API key provided"), "{msg}");
    assert!(msg.contains("DND_SUMMARIZE_TEST_UNSET_KEY") && msg.contains("not set"), "{msg}");
    assert!(err.is_user_error());
    assert_eq!(script.received().len(), 1, "a 401 is not retried");

    let err = s.check().await.unwrap_err();
    assert!(err.to_string().contains("DND_SUMMARIZE_TEST_UNSET_KEY"), "{err}");
}

#[tokio::test]
async fn an_unreachable_server_fails_the_check_at_once() {
    // A port that was free a moment ago: connections to it are refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    drop(listener);
    let s = summarizer(OpenAiConfig { max_retries: 1, ..openai(&url) });

    let start = Instant::now();
    let err = s.check().await.unwrap_err();
    assert!(matches!(err, SummarizeError::Unreachable { attempts: 1, .. }), "{err:?}");
    assert!(err.is_user_error() && err.to_string().contains("openai.base_url"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(1));

    let err = s.simplify("a dog").await.unwrap_err();
    assert!(matches!(err, SummarizeError::Unreachable { attempts: 2, .. }), "{err:?}");
}
