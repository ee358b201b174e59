//! Choosing and configuring a summariser.

use serde::{Deserialize, Serialize};

use crate::Summarizer;
use crate::chat::ChatSummarizer;
use crate::consensus::ConsensusSummarizer;
use crate::error::SummarizeError;
use crate::local::LocalChat;
pub use crate::local::LocalConfig;
use crate::openai::OpenAiChat;
pub use crate::openai::OpenAiConfig;
use crate::prompts::PromptTemplates;
use crate::rounds::DEFAULT_ROUNDS;

/// Which summariser runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Backend {
    /// An OpenAI-compatible chat completions server (the method's setting).
    #[default]
    #[serde(rename = "openai")]
    OpenAi,
    /// A local Qwen2-class instruct model run with candle.
    #[serde(rename = "local")]
    Local,
    /// The offline rule of [`crate::consensus`]: no language model.
    #[serde(rename = "consensus")]
    Consensus,
}

/// The summariser section of a job. Only the selected backend's section is used (and
/// validated); missing fields take the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SummarizerConfig {
    pub backend: Backend,
    /// How many times the summary is asked for, over differently shuffled labels.
    pub rounds: usize,
    pub openai: OpenAiConfig,
    pub local: LocalConfig,
    pub prompts: PromptTemplates,
}

impl Default for SummarizerConfig {
    fn default() -> Self {
        SummarizerConfig {
            backend: Backend::default(),
            rounds: DEFAULT_ROUNDS,
            openai: OpenAiConfig::default(),
            local: LocalConfig::default(),
            prompts: PromptTemplates::default(),
        }
    }
}

impl SummarizerConfig {
    /// Checks the settings that the selected backend uses; the error names the field.
    pub fn validate(&self) -> Result<(), SummarizeError> {
        if self.rounds == 0 {
            return Err(SummarizeError::invalid(
                "rounds",
                "ask for at least one summary round (the method uses 5)",
            ));
        }
        match self.backend {
            Backend::OpenAi => {
                self.openai.validate()?;
                self.prompts.validate()
            }
            Backend::Local => {
                self.local.validate()?;
                self.prompts.validate()
            }
            Backend::Consensus => Ok(()),
        }
    }
}

/// Builds the configured summariser. A local model is loaded here, so this can take a while.
pub fn build(config: &SummarizerConfig) -> Result<Box<dyn Summarizer>, SummarizeError> {
    config.validate()?;
    let prompts = config.prompts.clone();
    Ok(match config.backend {
        Backend::OpenAi => {
            Box::new(ChatSummarizer { backend: OpenAiChat::new(&config.openai)?, prompts })
        }
        Backend::Local => {
            Box::new(ChatSummarizer { backend: LocalChat::load(&config.local)?, prompts })
        }
        Backend::Consensus => Box::new(ConsensusSummarizer),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_toml_section_with_defaults() {
        let config: SummarizerConfig = toml::from_str(
            r#"
            backend = "openai"
            [openai]
            base_url = "http://localhost:8000/v1"
            model = "Qwen/Qwen2.5-7B-Instruct"
            api_key_env = ""
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.rounds, 5);
        assert_eq!(config.openai.temperature, 0.3);
        assert_eq!(config.prompts.version, crate::prompts::DEFAULT_PROMPT_VERSION);
        let summarizer = build(&config).unwrap();
        assert_eq!(
            summarizer.describe(),
            "openai:Qwen/Qwen2.5-7B-Instruct@http://localhost:8000/v1"
        );

        // The rendered request, known before anything is sent, is what a reply cache keys on.
        let request = summarizer.request(crate::Step::Simplify, &["a red circle".into()]).unwrap();
        assert!(
            request.contains("Qwen/Qwen2.5-7B-Instruct") && request.contains("a red circle"),
            "{request}"
        );

        let consensus: SummarizerConfig = toml::from_str("backend = \"consensus\"").unwrap();
        assert!(build(&consensus).unwrap().describe().starts_with("consensus:"));
    }

    #[test]
    fn rejects_unknown_backends_and_fields() {
        assert!(toml::from_str::<SummarizerConfig>("backend = \"gpt\"").is_err());
        assert!(toml::from_str::<SummarizerConfig>("[openai]\nbase = \"x\"").is_err());
    }

    #[test]
    fn validation_names_the_bad_field_of_the_selected_backend_only() {
        let local_without_model =
            SummarizerConfig { backend: Backend::Local, ..Default::default() };
        let err = local_without_model.validate().unwrap_err();
        assert!(err.is_user_error() && err.to_string().contains("local.model"), "{err}");

        let zero_rounds =
            SummarizerConfig { backend: Backend::Consensus, rounds: 0, ..Default::default() };
        assert!(zero_rounds.validate().unwrap_err().to_string().contains("rounds"));

        // The consensus rule uses neither the OpenAI section nor the prompts.
        let consensus = SummarizerConfig {
            backend: Backend::Consensus,
            openai: OpenAiConfig { base_url: "nonsense".into(), ..Default::default() },
            ..Default::default()
        };
        consensus.validate().unwrap();
        let openai = SummarizerConfig { backend: Backend::OpenAi, ..consensus };
        assert!(openai.validate().unwrap_err().to_string().contains("openai.base_url"));
    }

    #[test]
    fn a_missing_local_model_is_a_user_error_naming_the_path() {
        let config = SummarizerConfig {
            backend: Backend::Local,
            local: LocalConfig { model: "/nonexistent/qwen".into(), ..Default::default() },
            ..Default::default()
        };
        let err = build(&config).err().unwrap();
        assert!(err.is_user_error() && err.to_string().contains("/nonexistent/qwen"), "{err}");
    }
}
