//! `tokenizer.json` (Hugging Face `tokenizers`) and the chat template of `tokenizer_config.json`
//! (Jinja, rendered with minijinja).

use std::path::Path;

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// One chat message.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `<dir>/tokenizer.json` and, if present, `<dir>/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|e| EngineError::io(&path, e))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| EngineError::io(&config_path, e))?;
            Some(text)
        } else {
            None
        };
        Self::from_bytes(&bytes, config.as_deref())
    }

    /// Builds a tokenizer from the two files' contents.
    pub fn from_bytes(tokenizer_json: &[u8], tokenizer_config: Option<&str>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| EngineError::Tokenizer(format!("tokenizer.json: {e}")))?;
        let config: Value = match tokenizer_config {
            Some(text) => serde_json::from_str(text).map_err(|e| {
                EngineError::Tokenizer(format!("tokenizer_config.json: invalid JSON: {e}"))
            })?,
            None => Value::Null,
        };
        let chat_template = match config.get("chat_template") {
            Some(Value::String(t)) => Some(t.clone()),
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_string),
            _ => None,
        };
        Ok(Self {
            inner,
            bos_token: special_token(&config, "bos_token"),
            eos_token: special_token(&config, "eos_token"),
            chat_template,
        })
    }

    /// Token ids of `text` (no special tokens added; templates add their own).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The end-of-sequence token id named in tokenizer_config.json.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// The beginning-of-sequence token id named in tokenizer_config.json.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders the chat template; without one, joins `role: content` lines.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(template) = &self.chat_template else {
            let mut text: String = messages
                .iter()
                .map(|m| format!("{}: {}\n", m.role, m.content))
                .collect();
            if add_generation_prompt {
                text.push_str("assistant: ");
            }
            return Ok(text);
        };
        let mut env = Environment::new();
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| EngineError::Tokenizer(format!("chat template: {e}")))?;
        env.get_template("chat")
            .and_then(|t| {
                t.render(context! {
                    messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token.clone().unwrap_or_default(),
                    eos_token => self.eos_token.clone().unwrap_or_default(),
                })
            })
            .map_err(|e| EngineError::input(format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer built in code (no files needed).
    fn word_tokenizer_json() -> Vec<u8> {
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{"id": 0, "content": "<eos>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
            "model": {"type": "WordLevel", "vocab": {"<eos>": 0, "hello": 1, "world": 2, "<unk>": 3},
                      "unk_token": "<unk>"}
        });
        serde_json::to_vec(&json).unwrap()
    }

    #[test]
    fn encodes_decodes_and_finds_special_tokens() {
        let config = r#"{"eos_token": {"content": "<eos>"}, "bos_token": "<eos>",
            "chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}"#;
        let t = Tokenizer::from_bytes(&word_tokenizer_json(), Some(config)).unwrap();
        assert_eq!(t.encode("hello world").unwrap(), vec![1, 2]);
        assert_eq!(t.decode(&[1, 2, 0]).unwrap(), "hello world");
        assert_eq!(t.eos_token_id(), Some(0));
        let text = t
            .apply_chat_template(
                &[ChatMessage {
                    role: "user".into(),
                    content: "hello".into(),
                }],
                true,
            )
            .unwrap();
        assert_eq!(text, "[user] hello\n[assistant]");
    }

    #[test]
    fn broken_files_and_templates_are_clear_errors() {
        let err = Tokenizer::from_bytes(b"{not json", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        let t = Tokenizer::from_bytes(
            &word_tokenizer_json(),
            Some(r#"{"chat_template": "{{ raise_exception('no system role') }}"}"#),
        )
        .unwrap();
        let err = t.apply_chat_template(&[], false).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
    }
}
