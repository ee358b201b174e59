//! dnd-summarize: stage 2 of Describe-and-Dissect in words.
//!
//! Image captions become 1-5 word concept labels ("simplify"), and the labels of a
//! neuron's top images become a handful of candidate concepts ("summarize", asked over
//! several seeded shuffles, see [`rounds`]). One [`Summarizer`] trait has three backends,
//! chosen by [`SummarizerConfig`]: an OpenAI-compatible chat server, a local Qwen2-class
//! instruct model run with candle, and an offline consensus rule with no language model.
//! Every request and raw reply comes back in an [`Exchange`], so results can say exactly
//! which prompts and which model produced each label.

pub mod candidates;
mod chat;
mod chat_template;
pub mod config;
pub mod consensus;
pub mod error;
pub mod local;
pub mod openai;
pub mod prompts;
pub mod reply;
pub mod rounds;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use candidates::normalize_candidates;
pub use config::{Backend, LocalConfig, OpenAiConfig, SummarizerConfig, build};
pub use error::{ReplyError, SummarizeError};
pub use prompts::{ChatMessage, PromptTemplates};
pub use reply::{Answer, parse_reply};
pub use rounds::{DEFAULT_ROUNDS, Labelled, simplify_captions, summarize_rounds};

/// Which stage-2 request an exchange answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Simplify,
    Summarize,
    Merge,
}

/// One LLM (or rule) call, kept verbatim for the results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    pub step: Step,
    /// `openai`, `local` or `consensus`.
    pub backend: String,
    pub model: String,
    /// The [`PromptTemplates::version`] used; empty for the consensus rule, which has no prompt.
    pub prompt_version: String,
    /// The full request as sent: the JSON body for HTTP (no key: that travels in a header),
    /// the rendered chat prompt for a local model, the input lines for the consensus rule.
    pub request: String,
    /// The raw reply, before any cleaning.
    pub reply: String,
    /// The cleaned reply, or why it gives no label.
    pub answer: Result<Answer, ReplyError>,
    /// True when a reply cache served this exchange instead of the backend. The backends
    /// here always ask their model; a caching layer in front of them sets it.
    pub cached: bool,
}

impl Exchange {
    /// The single label of the reply, if it gave exactly one.
    pub fn label(&self) -> Option<&str> {
        match &self.answer {
            Ok(Answer::Label(label)) => Some(label),
            _ => None,
        }
    }
}

/// Turns captions into concept labels. Implementations are cheap to share across tasks.
#[async_trait]
pub trait Summarizer: Send + Sync {
    /// Stage 2 "simplify": one caption to a 1-5 word concept label.
    async fn simplify(&self, caption: &str) -> Result<Exchange, SummarizeError>;

    /// Stage 2 "summarize": ONE concise 1-5 word label that captures what most (not
    /// necessarily all) of the labels share. `labels` must not be empty.
    async fn summarize(&self, labels: &[String]) -> Result<Exchange, SummarizeError>;

    /// Merges the labels of a reply that listed several into one (the method feeds such a
    /// reply back once).
    async fn merge(&self, labels: &[String]) -> Result<Exchange, SummarizeError>;

    /// The request `step` over `input` sends (for `simplify`, `input` is the one caption),
    /// exactly as [`Exchange::request`] will record it: what a reply cache keys on. The
    /// default, for backends without a prompt, is the input lines.
    fn request(&self, step: Step, input: &[String]) -> Result<String, SummarizeError> {
        let _ = step;
        Ok(input.join("\n"))
    }

    /// Fails fast when the backend cannot work (e.g. the server is unreachable or refuses
    /// the key), so a job can stop before it starts.
    async fn check(&self) -> Result<(), SummarizeError> {
        Ok(())
    }

    /// Backend, model and endpoint, e.g. `openai:gpt-4o-mini@https://api.openai.com/v1`.
    fn describe(&self) -> String;
}

/// The error for an empty caption, shared by every backend's `simplify`.
pub(crate) fn require_caption(caption: &str) -> Result<(), SummarizeError> {
    if caption.trim().is_empty() {
        return Err(SummarizeError::invalid("caption", "it is empty"));
    }
    Ok(())
}

/// The error for an empty label list, shared by every backend's `summarize` and `merge`.
pub(crate) fn require_labels(labels: &[String]) -> Result<(), SummarizeError> {
    if labels.iter().all(|l| l.trim().is_empty()) {
        return Err(SummarizeError::invalid("labels", "there are no labels to summarize"));
    }
    Ok(())
}
