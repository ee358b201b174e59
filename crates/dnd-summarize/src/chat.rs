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
    /// The request the messages become, exactly as `complete` sends it.
    fn render(&self, messages: &[ChatMessage]) -> Result<String, SummarizeError>;
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
    fn messages(&self, step: Step, input: &[String]) -> Result<Vec<ChatMessage>, SummarizeError> {
        Ok(match step {
            Step::Simplify => {
                let caption = input.first().map(String::as_str).unwrap_or_default();
                require_caption(caption)?;
                self.prompts.simplify_messages(caption)
            }
            Step::Summarize => {
                require_labels(input)?;
                self.prompts.summarize_messages(input)
            }
            Step::Merge => {
                require_labels(input)?;
                self.prompts.merge_messages(input)
            }
        })
    }

    async fn ask(
        &self,
        step: Step,
        messages: Vec<ChatMessage>,
    ) -> Result<Exchange, SummarizeError> {
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
        self.ask(Step::Simplify, self.messages(Step::Simplify, &[caption.to_string()])?).await
    }

    async fn summarize(&self, labels: &[String]) -> Result<Exchange, SummarizeError> {
        self.ask(Step::Summarize, self.messages(Step::Summarize, labels)?).await
    }

    async fn merge(&self, labels: &[String]) -> Result<Exchange, SummarizeError> {
        self.ask(Step::Merge, self.messages(Step::Merge, labels)?).await
    }

    fn request(&self, step: Step, input: &[String]) -> Result<String, SummarizeError> {
        self.backend.render(&self.messages(step, input)?)
    }

    async fn check(&self) -> Result<(), SummarizeError> {
        self.backend.check().await
    }

    fn describe(&self) -> String {
        self.backend.describe()
    }
}
