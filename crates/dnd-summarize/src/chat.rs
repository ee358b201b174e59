//! The part of a [`Summarizer`] that every chat model shares: prompts in, cleaned label out.

use async_trait::async_trait;

use crate::error::SummarizeError;
use crate::prompts::{ChatMessage, PromptTemplates};
use crate::reply::parse_reply;
use crate::{Exchange, Step, Summarizer, require_caption, require_labels};

/// A chat model: the OpenAI-compatible server or the local candle model.
#[async_trait]
pub(crate) trait ChatBackend: Send + Sync {
    /// The name recorded in [`Exchange::backend`].
    fn backend(&self) -> &'static str;
    fn model(&self) -> String;
    fn describe(&self) -> String;
    async fn check(&self) -> Result<(), SummarizeError>;
    /// Sends the messages; returns the request exactly as sent and the raw reply.
    async fn complete(&self, messages: Vec<ChatMessage>) -> Result<Completion, SummarizeError>;
}

pub(crate) struct Completion {
    pub request: String,
    pub reply: String,
}

/// A [`Summarizer`] over any [`ChatBackend`].
pub(crate) struct ChatSummarizer<B> {
    pub backend: B,
    pub prompts: PromptTemplates,
}

impl<B: ChatBackend> ChatSummarizer<B> {
    async fn ask(&self, step: Step, messages: Vec<ChatMessage>) -> Result<Exchange, SummarizeError> {
        let Completion { request, reply } = self.backend.complete(messages).await?;
        Ok(Exchange {
            step,
            backend: self.backend.backend().into(),
            model: self.backend.model(),
            prompt_version: self.prompts.version.clone(),
            answer: parse_reply(&reply),
            request,
            reply,
            cached: false,
        })
    }
}

#[async_trait]
impl<B: ChatBackend> Summarizer for ChatSummarizer<B> {
    async fn simplify(&self, caption: &str) -> Result<Exchange, SummarizeError> {
        require_caption(caption)?;
        self.ask(Step::Simplify, self.prompts.simplify_messages(caption)).await
    }

    async fn summarize(&self, labels: &[String]) -> Result<Exchange, SummarizeError> {
        require_labels(labels)?;
        self.ask(Step::Summarize, self.prompts.summarize_messages(labels)).await
    }

    async fn merge(&self, labels: &[String]) -> Result<Exchange, SummarizeError> {
        require_labels(labels)?;
        self.ask(Step::Merge, self.prompts.merge_messages(labels)).await
    }

    async fn check(&self) -> Result<(), SummarizeError> {
        self.backend.check().await
    }

    fn describe(&self) -> String {
        self.backend.describe()
    }
}
