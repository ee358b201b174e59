//! Hugging Face chat templates (Jinja) rendered with minijinja, configured as transformers
//! renders them, so that a local model sees exactly the prompt it was trained on.

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind, Value, context};

use crate::prompts::ChatMessage;

const TEMPLATE_NAME: &str = "chat";

pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source`. The special tokens are the tokenizer config's, which some
    /// templates insert themselves.
    pub(crate) fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, String> {
        let mut env = Environment::new();
        // transformers compiles templates with trim_blocks and lstrip_blocks; without them
        // the rendered whitespace, and so the token ids, differ.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| e.to_string())?;
        env.set_syntax(syntax);
        // Templates call Python string methods (.strip(), .startswith(), ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source).map_err(|e| e.to_string())?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    /// The prompt for `messages`, ending with the assistant's turn opened
    /// (`add_generation_prompt`).
    pub(crate) fn render(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => messages.iter().map(|m| Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())])).collect::<Vec<_>>(),
                add_generation_prompt => true,
                bos_token => self.bos_token.as_deref(),
                eos_token => self.eos_token.as_deref(),
            })
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_with_transformers_whitespace_rules() {
        // Without trim_blocks and lstrip_blocks this renders with stray indentation and
        // blank lines; the expected string is Python jinja2's with both set (and the
        // user turn ends with the tokenizer's eos_token, passed in).
        let source = "{% for message in messages %}\n    {% if message.role == 'system' %}\n<|im_start|>system\n{{ message.content.strip() }}<|im_end|>\n    {% else %}\n<|im_start|>{{ message.role }}\n{{ message.content.strip() }}{{ eos_token }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}\n";
        let template = ChatTemplate::new(source.into(), None, Some("<|im_end|>".into())).unwrap();
        let messages =
            [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", " red circle ")];
        assert_eq!(
            template.render(&messages).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nred circle<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_fails_the_render_with_its_message() {
        let source = "{{ raise_exception('only user and assistant roles') }}";
        let template = ChatTemplate::new(source.into(), None, None).unwrap();
        let err = template.render(&[]).unwrap_err();
        assert!(err.contains("only user and assistant roles"), "{err}");
        assert!(ChatTemplate::new("{% if %}".into(), None, None).is_err());
    }
}
