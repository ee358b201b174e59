//! The prompts of the LLM backends: versioned texts with `{caption}` / `{labels}` slots.
//!
//! They are ours, not the reference implementation's: each instruction is followed by two
//! short worked examples (as the reference does) and ends in "Label:", so that the
//! expected answer is the bare label. The version is recorded with every exchange; the
//! texts are config, loadable from TOML, and changing them requires a new version.

use serde::{Deserialize, Serialize};

use crate::error::SummarizeError;

/// The version of the default texts below. Bump it whenever one of them changes.
pub const DEFAULT_PROMPT_VERSION: &str = "dnd-prompts-1";

const SYSTEM: &str = "You name visual concepts for a neural-network interpretability tool. \
Always answer with a single short label of 1 to 5 words in lower case, \
with no quotes, no final punctuation and no explanation.";

const SIMPLIFY: &str = r#"Shorten the image caption below to the visual concept it describes, in 1 to 5 words. Keep the objects, parts, colours, patterns, textures or scene the caption is about; drop filler such as "a picture of" or "there is", counts and articles.

Caption: a close up of a brown dog sleeping on a couch
Label: brown dog

Caption: there are many black and white stripes on the zebra's back
Label: black and white stripes

Caption: {caption}
Label:"#;

const SUMMARIZE: &str = "Each description below belongs to one of the images that most strongly activate the same neuron of a vision network. \
Give ONE concise label of 1 to 5 words for the concept that most of the descriptions (not necessarily all) have in common. \
Prefer what recurs (an object, part, colour, pattern, texture or scene) over what appears only once, and be as specific as the descriptions allow.

Descriptions:
- red circle
- two red dots
- red ring on a wall
- blue square
Label: red circles

Descriptions:
- zebra stripes
- striped shirt
- black and white stripes
- tiger fur
Label: stripes

Descriptions:
{labels}
Label:";

const MERGE: &str = "The labels below were given where ONE label was asked for. \
Merge them into ONE concise label of 1 to 5 words that covers what they have in common.

Labels:
- red circles
- red squares
Label: red shapes

Labels:
- dog face
- cat face
Label: animal faces

Labels:
{labels}
Label:";

/// The prompt texts. Missing fields in a config file take the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptTemplates {
    /// Recorded with every exchange, so results say which prompts made them.
    pub version: String,
    /// The system message of every request.
    pub system: String,
    /// Stage 2 "simplify": one caption (`{caption}`) to a label.
    pub simplify: String,
    /// Stage 2 "summarize": simplified captions (`{labels}`, one "- " line each) to one label.
    pub summarize: String,
    /// A reply that listed several labels (`{labels}`) to one label.
    pub merge: String,
}

impl Default for PromptTemplates {
    fn default() -> Self {
        PromptTemplates {
            version: DEFAULT_PROMPT_VERSION.into(),
            system: SYSTEM.into(),
            simplify: SIMPLIFY.into(),
            summarize: SUMMARIZE.into(),
            merge: MERGE.into(),
        }
    }
}

/// One message of a chat request, as both the OpenAI API and chat templates take it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

impl PromptTemplates {
    /// Checks that every text has its slot, and that edited texts do not pass for the
    /// defaults: recorded results would otherwise claim prompts that did not make them.
    pub fn validate(&self) -> Result<(), SummarizeError> {
        if self.version.trim().is_empty() || self.version.contains('\n') {
            return Err(SummarizeError::invalid(
                "prompts.version",
                "give the prompts a one-line version, e.g. \"my-prompts-1\"",
            ));
        }
        let slots = [
            ("prompts.simplify", &self.simplify, "{caption}"),
            ("prompts.summarize", &self.summarize, "{labels}"),
            ("prompts.merge", &self.merge, "{labels}"),
        ];
        for (field, text, slot) in slots {
            if !text.contains(slot) {
                return Err(SummarizeError::invalid(
                    field,
                    format!("the text has no {slot} slot for its input"),
                ));
            }
        }
        let defaults = PromptTemplates::default();
        if self.version == DEFAULT_PROMPT_VERSION && *self != defaults {
            return Err(SummarizeError::invalid(
                "prompts.version",
                format!(
                    "the prompt texts differ from dnd's defaults but keep their version {DEFAULT_PROMPT_VERSION}; give your texts a version of their own"
                ),
            ));
        }
        Ok(())
    }

    pub fn simplify_messages(&self, caption: &str) -> Vec<ChatMessage> {
        self.messages(self.simplify.replace("{caption}", &one_line(caption)))
    }

    pub fn summarize_messages(&self, labels: &[String]) -> Vec<ChatMessage> {
        self.messages(self.summarize.replace("{labels}", &bullet_lines(labels)))
    }

    pub fn merge_messages(&self, labels: &[String]) -> Vec<ChatMessage> {
        self.messages(self.merge.replace("{labels}", &bullet_lines(labels)))
    }

    fn messages(&self, user: String) -> Vec<ChatMessage> {
        vec![ChatMessage::new("system", self.system.clone()), ChatMessage::new("user", user)]
    }
}

/// A caption or label on one line, so that it cannot break the prompt's layout.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The `{labels}` rendering, the same as in the worked examples.
fn bullet_lines(labels: &[String]) -> String {
    labels.iter().map(|l| format!("- {}", one_line(l))).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_fill_their_slots() {
        let prompts = PromptTemplates::default();
        prompts.validate().unwrap();
        let messages = prompts.simplify_messages("a red\ncircle  on a wall");
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].role, "system");
        assert!(
            messages[1].content.ends_with("Caption: a red circle on a wall\nLabel:"),
            "{}",
            messages[1].content
        );

        let labels = ["red circle".to_string(), "two red dots".to_string()];
        let user = &prompts.summarize_messages(&labels)[1].content;
        assert!(user.ends_with("Descriptions:\n- red circle\n- two red dots\nLabel:"), "{user}");
        let user = &prompts.merge_messages(&labels)[1].content;
        assert!(user.ends_with("Labels:\n- red circle\n- two red dots\nLabel:"), "{user}");
    }

    #[test]
    fn loads_from_toml_with_defaults_for_missing_texts() {
        let prompts: PromptTemplates = toml::from_str(
            r#"
            version = "lab-prompts-2"
            summarize = "What do these share?\n{labels}\nLabel:"
            "#,
        )
        .unwrap();
        prompts.validate().unwrap();
        assert_eq!(prompts.version, "lab-prompts-2");
        assert_eq!(prompts.simplify, SIMPLIFY);
        assert!(
            toml::from_str::<PromptTemplates>("sumarize = \"typo\"").is_err(),
            "unknown fields are rejected"
        );
    }

    #[test]
    fn validation_names_the_bad_field() {
        let missing_slot = PromptTemplates {
            version: "x-1".into(),
            merge: "Merge these.".into(),
            ..Default::default()
        };
        let err = missing_slot.validate().unwrap_err().to_string();
        assert!(err.contains("prompts.merge") && err.contains("{labels}"), "{err}");

        let edited_but_default_version =
            PromptTemplates { system: "Be brief.".into(), ..Default::default() };
        let err = edited_but_default_version.validate().unwrap_err().to_string();
        assert!(err.contains("prompts.version") && err.contains(DEFAULT_PROMPT_VERSION), "{err}");

        let no_version = PromptTemplates { version: " ".into(), ..Default::default() };
        assert!(no_version.validate().unwrap_err().to_string().contains("prompts.version"));
    }
}
