//! `tokenizer.json` (Hugging Face `tokenizers`) and the chat template of `tokenizer_config.json`
//! (Jinja, rendered with minijinja).

use std::path::Path;

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::json_text::JsonValue;

/// One chat message: OpenAI's fields that a chat format reads (a template sees the ones that
/// are set).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    /// Its text (text parts joined; none is empty).
    pub content: String,
    /// An assistant message's calls.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<MessageToolCall>,
    /// A tool message's call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant message's reasoning (DeepSeek's thinking mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

impl ChatMessage {
    /// A message of `role` with text `content` and nothing else.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }
}

/// A call in an assistant message, as OpenAI's messages carry it.
#[derive(Clone, Debug, PartialEq)]
pub struct MessageToolCall {
    pub id: Option<String>,
    pub function: FunctionCall,
}

impl Serialize for MessageToolCall {
    /// OpenAI's shape, `type` included (templates read it).
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        if let Some(id) = &self.id {
            map.serialize_entry("id", id)?;
        }
        map.serialize_entry("type", "function")?;
        map.serialize_entry("function", &self.function)?;
        map.end()
    }
}

/// The function a call names, and its arguments as JSON text.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// How chat messages become a prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum ChatFormat {
    /// A Jinja template (`tokenizer_config.json`'s `chat_template`, or `serve --chat-template`).
    Template(String),
    /// DeepSeek-V3.2's own format, for its checkpoints, which ship no template
    /// ([`crate::chat_encoding`]).
    DeepSeekV32,
    /// `role: content` lines: no template and no known format.
    Plain,
}

impl ChatFormat {
    /// What it is, in a few words (start-up logs).
    pub fn describe(&self) -> &'static str {
        match self {
            ChatFormat::Template(_) => "a Jinja chat template",
            ChatFormat::DeepSeekV32 => "DeepSeek-V3.2's chat encoding",
            ChatFormat::Plain => "`role: content` lines (no chat template)",
        }
    }
}

/// Where one output's incremental decoding stands ([`Tokenizer::decode_next`]): the ids since
/// the last text that was whole, and that text.
#[derive(Debug, Default)]
pub struct DecodeState {
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

/// A tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_format: ChatFormat,
    /// Special tokens whose text outputs keep all the same ([`Tokenizer::keep_in_text`]).
    kept: std::collections::HashSet<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("chat_format", &self.chat_format.describe())
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
        // Parse errors name the files by name only: say which directory they are in.
        Self::from_bytes(&bytes, config.as_deref()).map_err(|e| match e {
            EngineError::Tokenizer(why) => {
                EngineError::Tokenizer(format!("{}: {why}", dir.display()))
            }
            other => other,
        })
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
            chat_format: match chat_template {
                Some(t) => ChatFormat::Template(t),
                None => ChatFormat::Plain,
            },
            kept: Default::default(),
        })
    }

    /// Has outputs keep the text of `tokens` where the tokenizer marks them special (and so
    /// would skip them): a tool-call parser's markers. Tokens not in the vocabulary, or not
    /// special, need nothing.
    pub fn keep_in_text(&mut self, tokens: &[&str]) {
        for token in tokens {
            if let Some(id) = self.inner.token_to_id(token)
                && self.is_special(id)
            {
                self.kept.insert(id);
            }
        }
    }

    fn is_special(&self, id: u32) -> bool {
        self.inner
            .id_to_token(id)
            .is_some_and(|t| self.inner.get_added_vocabulary().is_special_token(&t))
    }

    /// Token ids of `text` (no special tokens added; templates add their own).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped (but for those kept in the text).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let decoded = match self.kept.is_empty() {
            true => self.inner.decode(ids, true),
            false => {
                let shown: Vec<u32> = ids
                    .iter()
                    .copied()
                    .filter(|id| self.kept.contains(id) || !self.is_special(*id))
                    .collect();
                self.inner.decode(&shown, false)
            }
        };
        decoded.map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// How one token reads in a logprobs entry: its text, or for a special token (which the
    /// text skips) its name, as vLLM shows the end-of-sequence token.
    pub fn token_text(&self, id: u32) -> String {
        match self.inner.id_to_token(id) {
            Some(t) if self.inner.get_added_vocabulary().is_special_token(&t) => t,
            _ => self.decode(&[id]).unwrap_or_default(),
        }
    }

    /// The text one more generated token adds to an output, special tokens skipped: what
    /// `decode` of the whole output gains, computed from the last few ids (`state`) rather than
    /// all of them, so a long output costs the same per token as a short one. A token that ends
    /// inside a UTF-8 character adds nothing until the character is whole
    /// ([`Tokenizer::decode_rest`] gives what is held back when the output ends there).
    pub fn decode_next(&self, state: &mut DecodeState, id: u32) -> String {
        // Tokens `decode` drops (special ones, ids past the vocabulary: a model's embedding
        // rows may outnumber its tokens) stay out of the window, which would otherwise grow by
        // one with each, and every later token decode them all again.
        if self.kept.contains(&id) {
            // Its text as it stands. It ends any character the window left unfinished, as it
            // does in `decode`; otherwise the window goes on past it, so what follows reads
            // as it would with the token skipped (a decoder's rules for a text's first token
            // stay with the output's first).
            let token = self.inner.id_to_token(id).unwrap_or_default();
            return match self.held_back(state) {
                None => token,
                Some(held) => {
                    *state = DecodeState::default();
                    held + &token
                }
            };
        }
        let shown = self.inner.id_to_token(id).is_some() && !self.is_special(id);
        if !shown {
            return String::new();
        }
        let step = |state: &mut DecodeState| {
            tokenizers::step_decode_stream(
                &self.inner,
                vec![id],
                true,
                &mut state.ids,
                &mut state.prefix,
                &mut state.prefix_index,
            )
        };
        match step(state) {
            Ok(piece) => piece.unwrap_or_default(),
            // A decoder whose text of the longer window does not begin with the shorter one's
            // (none of the byte-level or metaspace decoders does this): start a new window at
            // this token, as if the output began here.
            Err(_) => {
                *state = DecodeState::default();
                step(state).ok().flatten().unwrap_or_default()
            }
        }
    }

    /// The text `decode_next` is holding back (the start of a UTF-8 character that no token
    /// finished, shown as `decode` shows it), for when the output ends; resets `state`.
    pub fn decode_rest(&self, state: &mut DecodeState) -> String {
        let held = self.held_back(state).unwrap_or_default();
        *state = DecodeState::default();
        held
    }

    /// The text of `state`'s window past what `decode_next` has given: `None` when it has
    /// given it all, else what follows (empty where the window's text does not extend it).
    fn held_back(&self, state: &DecodeState) -> Option<String> {
        let text = self.inner.decode(&state.ids, true).unwrap_or_default();
        if text == state.prefix {
            return None;
        }
        Some(
            text.strip_prefix(state.prefix.as_str())
                .unwrap_or_default()
                .to_string(),
        )
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

    /// How chat messages become a prompt.
    pub fn chat_format(&self) -> &ChatFormat {
        &self.chat_format
    }

    /// Replaces the chat format (`serve --chat-template`, or DeepSeek-V3.2's encoding for its
    /// checkpoints, which ship no template).
    pub fn set_chat_format(&mut self, format: ChatFormat) {
        self.chat_format = format;
    }

    /// For a checkpoint that ships no chat template: DeepSeek-V3.2's own encoding when the
    /// model is a V3.2 one (its official release has none).
    pub fn default_chat_format_for(&mut self, arch: crate::config::Arch) {
        if self.chat_format == ChatFormat::Plain && arch == crate::config::Arch::V32 {
            self.chat_format = ChatFormat::DeepSeekV32;
        }
    }

    /// The prompt for `messages` in this tokenizer's chat format. `kwargs` are more variables
    /// for a template (a request's `chat_template_kwargs`; they do not replace the ones named
    /// here), and `thinking` or `enable_thinking` among them turns on DeepSeek-V3.2's thinking
    /// mode. `tools` are a request's tools (OpenAI's `{"type": "function", "function": …}`):
    /// a template sees them as `tools` (none without any); DeepSeek-V3.2's encoding lists them
    /// in its system prompt; the plain format has no place for them.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
        tools: &[JsonValue],
    ) -> Result<String> {
        let template = match &self.chat_format {
            ChatFormat::Template(t) => t,
            ChatFormat::DeepSeekV32 => {
                let on = |key: &str| kwargs.get(key).is_some_and(|v| v.as_bool() == Some(true));
                let functions: Vec<JsonValue> = tools
                    .iter()
                    .map(|t| t.get("function").unwrap_or(t).clone())
                    .collect();
                // Its user turns end in the generation prompt already.
                return crate::chat_encoding::deepseek_v32(
                    messages,
                    &functions,
                    on("thinking") || on("enable_thinking"),
                )
                .map_err(EngineError::input);
            }
            ChatFormat::Plain => {
                let mut text: String = messages
                    .iter()
                    .map(|m| format!("{}: {}\n", m.role, m.content))
                    .collect();
                if add_generation_prompt {
                    text.push_str("assistant: ");
                }
                return Ok(text);
            }
        };
        let tools = (!tools.is_empty())
            .then(|| Value::Array(tools.iter().map(JsonValue::to_value).collect()));
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
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
                    tools => minijinja::Value::from(minijinja::value::Serde(tools)),
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token.clone().unwrap_or_default(),
                    eos_token => self.eos_token.clone().unwrap_or_default(),
                    ..minijinja::Value::from(minijinja::value::Serde(kwargs))
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
        assert_eq!(
            (t.token_text(1), t.token_text(0)),
            ("hello".into(), "<eos>".into())
        );
        assert_eq!(
            t.token_text(99),
            "",
            "an id past the vocabulary reads as nothing"
        );
        assert_eq!(t.eos_token_id(), Some(0));
        let text = t
            .apply_chat_template(
                &[ChatMessage::new("user", "hello")],
                true,
                &Default::default(),
                &[],
            )
            .unwrap();
        assert_eq!(text, "[user] hello\n[assistant]");
    }

    /// Hugging Face chat templates are Python Jinja: DeepSeek's call `str.split` on a past
    /// answer to drop its reasoning, and read variables a request passes in
    /// `chat_template_kwargs` (`thinking`), which never replace the engine's own.
    #[test]
    fn templates_get_python_methods_and_the_requests_variables() {
        let config = serde_json::json!({
            "chat_template": "{% for m in messages %}{% set c = m.content %}\
                {% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}\
                [{{ m.role }}]{{ c }}{% endfor %}{% if add_generation_prompt %}[assistant]\
                {% if thinking %}<think>{% else %}</think>{% endif %}{% endif %}"
        })
        .to_string();
        let t = Tokenizer::from_bytes(&word_tokenizer_json(), Some(&config)).unwrap();
        let messages = [
            ChatMessage::new("user", "hi"),
            ChatMessage::new("assistant", "<think>reasoning</think>answer"),
        ];
        let plain = t
            .apply_chat_template(&messages, true, &Default::default(), &[])
            .unwrap();
        assert_eq!(plain, "[user]hi[assistant]answer[assistant]</think>");
        let kwargs = serde_json::json!({"thinking": true, "add_generation_prompt": false});
        let thinking = t
            .apply_chat_template(&messages, true, kwargs.as_object().unwrap(), &[])
            .unwrap();
        assert_eq!(thinking, "[user]hi[assistant]answer[assistant]<think>");
    }

    #[test]
    fn broken_files_and_templates_are_clear_errors() {
        let err = Tokenizer::from_bytes(b"{not json", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        // From a directory, the error says which.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{}: tokenizer.json", dir.path().display())),
            "{err}"
        );
        let t = Tokenizer::from_bytes(
            &word_tokenizer_json(),
            Some(r#"{"chat_template": "{{ raise_exception('no system role') }}"}"#),
        )
        .unwrap();
        let err = t
            .apply_chat_template(&[], false, &Default::default(), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no system role"), "{err}");
    }

    fn demo_tokenizer() -> Tokenizer {
        let demo = crate::demo::DEMO.expect("engine/demo-model is part of the repository");
        Tokenizer::from_bytes(demo.tokenizer, Some(demo.tokenizer_config)).unwrap()
    }

    /// `decode_next` token by token, then `decode_rest`.
    fn decode_streamed(t: &Tokenizer, ids: &[u32]) -> (Vec<String>, String) {
        let mut state = DecodeState::default();
        let pieces = ids
            .iter()
            .map(|&id| t.decode_next(&mut state, id))
            .collect();
        (pieces, t.decode_rest(&mut state))
    }

    #[test]
    fn decoding_token_by_token_gives_the_text_of_the_whole() {
        let t = demo_tokenizer();
        let text = "Grüße aus Köln, 日本語のテキスト, naïve café — and 🎉🦀 at the end";
        let ids = t.encode(text).unwrap();
        // The byte-level vocabulary splits these characters over several tokens.
        let split = ids
            .iter()
            .filter(|&&id| t.decode(&[id]).unwrap().contains('\u{FFFD}'))
            .count();
        assert!(split >= 4, "only {split} tokens end inside a character");
        let (pieces, rest) = decode_streamed(&t, &ids);
        for piece in &pieces {
            assert!(
                !piece.contains('\u{FFFD}'),
                "{piece:?} holds half a character"
            );
        }
        assert_eq!(rest, "");
        assert_eq!(pieces.concat(), t.decode(&ids).unwrap());

        // Cut inside a character: the held bytes come out at the end, as `decode` shows them.
        let cut = (1..ids.len())
            .find(|&n| t.decode(&ids[..n]).unwrap().ends_with('\u{FFFD}'))
            .unwrap();
        let (pieces, rest) = decode_streamed(&t, &ids[..cut]);
        assert!(rest.ends_with('\u{FFFD}'), "{rest:?}");
        assert_eq!(pieces.concat() + &rest, t.decode(&ids[..cut]).unwrap());
    }

    #[test]
    fn any_token_sequence_streams_to_its_decoded_text() {
        use rand::{RngExt, SeedableRng};
        let t = demo_tokenizer();
        let vocab = t.vocab_size() as u32;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200 {
            let n = rng.random_range(1..60);
            let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab)).collect();
            let (pieces, rest) = decode_streamed(&t, &ids);
            assert_eq!(pieces.concat() + &rest, t.decode(&ids).unwrap(), "{ids:?}");
        }
    }

    /// The demo tokenizer with DeepSeek-V3's tool-call markers as special tokens after its
    /// vocabulary, and their ids.
    fn tokenizer_with_special_markers() -> (Tokenizer, Vec<u32>) {
        let demo = crate::demo::DEMO.expect("engine/demo-model is part of the repository");
        let mut json: Value = serde_json::from_slice(demo.tokenizer).unwrap();
        let base = demo_tokenizer().vocab_size() as u32;
        let added = json["added_tokens"].as_array_mut().unwrap();
        let ids: Vec<u32> = (base..).take(crate::tool_calls::V3_MARKERS.len()).collect();
        for (id, marker) in ids.iter().zip(crate::tool_calls::V3_MARKERS) {
            added.push(
                serde_json::json!({"id": id, "content": marker, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
            );
        }
        let bytes = serde_json::to_vec(&json).unwrap();
        let t = Tokenizer::from_bytes(&bytes, Some(demo.tokenizer_config)).unwrap();
        (t, ids)
    }

    #[test]
    fn special_tokens_kept_in_the_text_stream_as_the_whole_decodes() {
        use rand::{RngExt, SeedableRng};
        let (mut t, markers) = tokenizer_with_special_markers();
        let text = "get_weather {\"city\": \"Köln\"} 🎉";
        let words = t.encode(text).unwrap();
        let ids = [
            &[markers[0], markers[2]][..],
            &words,
            &[markers[3], markers[1]],
        ]
        .concat();
        // Skipped while not kept, as any special token.
        assert_eq!(t.decode(&ids).unwrap(), text);
        t.keep_in_text(&crate::tool_calls::V3_MARKERS);
        let kept = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather {\"city\": \"Köln\"} 🎉\
                    <｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        assert_eq!(t.decode(&ids).unwrap(), kept);
        let (pieces, rest) = decode_streamed(&t, &ids);
        assert_eq!(pieces.concat() + &rest, kept);
        // Markers between the bytes of one character, and among other special tokens.
        let other_special = t.token_id("<｜end▁of▁sentence｜>").or(t.eos_token_id());
        let vocab = t.vocab_size() as u32;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for _ in 0..200 {
            let n = rng.random_range(1..40);
            let ids: Vec<u32> = (0..n)
                .map(|_| match rng.random_range(0..6) {
                    0 => markers[rng.random_range(0..markers.len())],
                    1 => other_special.unwrap_or(0),
                    _ => rng.random_range(0..vocab),
                })
                .collect();
            let (pieces, rest) = decode_streamed(&t, &ids);
            assert_eq!(pieces.concat() + &rest, t.decode(&ids).unwrap(), "{ids:?}");
        }
    }

    #[test]
    fn a_word_level_output_streams_with_its_spaces() {
        let t = Tokenizer::from_bytes(&word_tokenizer_json(), None).unwrap();
        let (pieces, rest) = decode_streamed(&t, &[1, 2, 0, 1]);
        assert_eq!(pieces, ["hello", " world", "", " hello"]);
        assert_eq!(rest, "");
        // Special tokens and ids past the vocabulary give no text and are not kept: a long run
        // of them leaves the window as it was.
        let mut state = DecodeState::default();
        t.decode_next(&mut state, 1);
        for id in (0..1000).map(|i| if i % 2 == 0 { 0 } else { 1_000_000 }) {
            assert_eq!(t.decode_next(&mut state, id), "");
        }
        assert!(state.ids.len() <= 1, "{state:?}");
        assert_eq!(t.decode_next(&mut state, 2), " world");
    }
}
