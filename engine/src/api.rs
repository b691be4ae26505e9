//! The OpenAI request and error shapes, validated once at the edge (pure: no I/O, so every
//! rule is unit-tested), and the incremental detokenizer that applies stop strings.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::json_text::JsonValue;
use crate::sampling::SamplingParams;
use crate::tokenizer::{ChatMessage, FunctionCall, MessageToolCall};

/// The largest `logprobs` / `top_logprobs` accepted (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// The most choices (`n`) a request may ask for, as OpenAI's API allows.
pub const MAX_CHOICES: usize = 128;
/// The most stop strings a request may give.
pub const MAX_STOPS: usize = 16;
/// The longest stop string accepted: every choice looks for each of them in its text after
/// every token, so their lengths bound that work.
pub const MAX_STOP_BYTES: usize = 1024;
/// The most distinct `stop_token_ids`: each choice keeps them and checks every token it samples
/// against them, so their number bounds that work and memory.
pub const MAX_STOP_TOKEN_IDS: usize = 1024;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The fields of `/v1/completions` and `/v1/chat/completions` the engine reads. Fields that
/// would change the output and that the engine cannot honour (`echo`, `best_of`, `suffix`,
/// `response_format` other than text, a `tool_choice` that forces a call, and the OpenAI and
/// vLLM fields of [`NOT_DONE`])
/// are refused by name when they ask for something; others are ignored, as OpenAI-compatible
/// servers do.
#[derive(Debug, Default, Deserialize)]
pub struct RequestBody {
    pub model: Option<String>,
    pub prompt: Option<Value>,
    /// Its objects' keys kept in order: a call's arguments sent as an object keep theirs.
    pub messages: Option<JsonValue>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub n: Option<i64>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    /// vLLM's extension: keep generating past the end-of-sequence token (benchmarks).
    pub ignore_eos: Option<bool>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// vLLM's extensions: repetition penalty, min-p filtering, a floor on the output's length
    /// before a stop token may end it, and more stop tokens.
    pub repetition_penalty: Option<f64>,
    pub min_p: Option<f64>,
    pub min_tokens: Option<i64>,
    pub stop_token_ids: Option<Value>,
    /// `{"token id": bias}`.
    pub logit_bias: Option<Value>,
    // Refused when they ask for something (see `unsupported`).
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
    pub response_format: Option<Value>,
    /// Chat only: the tools the model may call (their keys kept in order: DeepSeek-V3.2's
    /// prompt lists their schemas as written), whether it should (`tool_choice`: `auto` or
    /// `none`), and at most one call (`parallel_tool_calls` false).
    pub tools: Option<JsonValue>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// More variables for the chat template (vLLM's extension; chat only), such as
    /// `{"thinking": true}` for DeepSeek-V3.1/V3.2's templates.
    pub chat_template_kwargs: Option<Value>,
    /// Every other field: checked against [`NOT_DONE`], else ignored.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// OpenAI's and vLLM's fields that would change the output and that the engine does not do,
/// with why: refused when they ask for something (see [`asks`]).
const NOT_DONE: &[(&str, &str)] = &[
    (
        "guided_json",
        "structured output (guided decoding) is not supported",
    ),
    (
        "guided_regex",
        "structured output (guided decoding) is not supported",
    ),
    (
        "guided_choice",
        "structured output (guided decoding) is not supported",
    ),
    (
        "guided_grammar",
        "structured output (guided decoding) is not supported",
    ),
    (
        "structured_outputs",
        "structured output (guided decoding) is not supported",
    ),
    ("functions", "function calling is not supported"),
    ("function_call", "function calling is not supported"),
    ("prompt_logprobs", "prompt_logprobs is not supported"),
    ("allowed_token_ids", "allowed_token_ids is not supported"),
    ("bad_words", "bad_words is not supported"),
    (
        "include_stop_str_in_output",
        "include_stop_str_in_output is not supported: a stop string is never part of the output",
    ),
    (
        "skip_special_tokens",
        "skip_special_tokens false is not supported: special tokens are never part of the text",
    ),
    (
        "truncate_prompt_tokens",
        "truncate_prompt_tokens is not supported: a prompt longer than the context is refused",
    ),
    (
        "continue_final_message",
        "continue_final_message is not supported: a chat prompt always ends by opening a new \
         assistant turn",
    ),
    (
        "add_generation_prompt",
        "add_generation_prompt false is not supported: a chat prompt always ends by opening a \
         new assistant turn",
    ),
    (
        "chat_template",
        "a chat template per request is not supported: the server's (--chat-template) applies",
    ),
    ("use_beam_search", "beam search is not supported"),
    (
        "return_tokens_as_token_ids",
        "return_tokens_as_token_ids is not supported: logprobs name tokens by their text",
    ),
];

/// Whether field `name` with `value` asks for something: not null, false, empty or `"none"`
/// (`skip_special_tokens` and `add_generation_prompt` ask only when false, their default being
/// true).
fn asks(name: &str, value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b != matches!(name, "skip_special_tokens" | "add_generation_prompt"),
        Value::String(s) => !s.is_empty() && s != "none",
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Number(_) => true,
    }
}

/// The first field of `body` that asks for something the engine does not do, with why.
fn unsupported(body: &RequestBody) -> Option<(&'static str, &'static str)> {
    if body.echo == Some(true) {
        return Some(("echo", "echo is not supported"));
    }
    if body.best_of.is_some_and(|b| b != body.n.unwrap_or(1)) {
        return Some((
            "best_of",
            "best_of must equal n (choosing the best of more candidates is not supported)",
        ));
    }
    if body.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Some(("suffix", "suffix (insertion) is not supported"));
    }
    if let Some(format) = &body.response_format
        && !format.is_null()
        && format.get("type").and_then(Value::as_str) != Some("text")
    {
        return Some((
            "response_format",
            "only response_format {\"type\": \"text\"} is supported (no JSON mode or schemas)",
        ));
    }
    NOT_DONE
        .iter()
        .find(|(name, _)| body.other.get(*name).is_some_and(|v| asks(name, v)))
        .copied()
}

/// A `[-bound, bound]`-style range check of an optional float field, as f32.
fn float_in(
    value: Option<f64>,
    param: &str,
    default: f32,
    ok: impl Fn(f64) -> bool,
    range: &str,
) -> Result<f32, ApiError> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && ok(v) => Ok(v as f32),
        Some(v) => Err(ApiError::invalid(
            Some(param),
            format!("{param} must be {range}, got {v}"),
        )),
    }
}

/// A list of token ids (`stop_token_ids`): sorted, each once, at most [`MAX_STOP_TOKEN_IDS`].
fn token_ids(value: &Option<Value>, param: &str) -> Result<Vec<u32>, ApiError> {
    let bad = || ApiError::invalid(Some(param), format!("{param} must be a list of token ids"));
    let mut ids = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<Vec<u32>, ApiError>>()?,
        Some(_) => return Err(bad()),
    };
    ids.sort_unstable();
    ids.dedup();
    if ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(ApiError::invalid(
            Some(param),
            format!(
                "{param} may name at most {MAX_STOP_TOKEN_IDS} distinct tokens, got {}",
                ids.len()
            ),
        ));
    }
    Ok(ids)
}

/// `logit_bias`: an object from token ids (as strings) to biases in [-100, 100].
fn logit_bias(value: &Option<Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let map = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(ApiError::invalid(
                Some("logit_bias"),
                "logit_bias must be an object mapping token ids to biases",
            ));
        }
    };
    if map.len() > 300 {
        return Err(ApiError::invalid(
            Some("logit_bias"),
            format!("logit_bias may name at most 300 tokens, got {}", map.len()),
        ));
    }
    let biases = map
        .iter()
        .map(|(key, bias)| {
            let token = key.trim().parse::<u32>().map_err(|_| {
                ApiError::invalid(
                    Some("logit_bias"),
                    format!("logit_bias keys must be token ids, got {key:?}"),
                )
            })?;
            match bias.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((token, b as f32)),
                _ => Err(ApiError::invalid(
                    Some("logit_bias"),
                    format!(
                        "logit_bias for token {token} must be a number in [-100, 100], got {bias}"
                    ),
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Keys such as "5" and "05" name one token: each bias would add to the other's, past the
    // bound.
    let mut tokens: Vec<u32> = biases.iter().map(|&(t, _)| t).collect();
    tokens.sort_unstable();
    if let Some(twice) = tokens.windows(2).find(|w| w[0] == w[1]) {
        return Err(ApiError::invalid(
            Some("logit_bias"),
            format!("logit_bias names token {} more than once", twice[0]),
        ));
    }
    Ok(biases)
}

/// The model's sampling defaults (`generation_config.json`) for the fields a request leaves
/// out, as vLLM's `--generation-config auto` applies them: temperature, top_p, top_k, min_p and
/// repetition_penalty. Like vLLM, which reads the file's difference from transformers'
/// `GenerationConfig`, a value equal to transformers' own default (temperature, top_p and
/// repetition_penalty 1, top_k 50) is not applied: `top_k: 50` in a file is not a top-k.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
}

impl SamplingDefaults {
    /// From the text of a `generation_config.json`, which `source` names in errors. A value a
    /// request could not give (by the request's own rules) is refused, naming it.
    pub fn from_generation_config(text: &str, source: &str) -> Result<Self, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("{source}: not JSON: {e}"))?;
        let Some(fields) = value.as_object() else {
            return Err(format!("{source}: not a JSON object"));
        };
        let field = |key: &str| fields.get(key).filter(|v| !v.is_null());
        let float = |key: &str, transformers: Option<f64>| match field(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(f) if Some(f) == transformers => Ok(None),
                Some(f) => Ok(Some(f)),
                None => Err(format!("{source}: {key} must be a number, got {v}")),
            },
        };
        let top_k = match field("top_k") {
            None => None,
            Some(v) => match v.as_i64() {
                Some(50) => None,
                Some(k) => Some(k),
                None => return Err(format!("{source}: top_k must be an integer, got {v}")),
            },
        };
        let defaults = Self {
            temperature: float("temperature", Some(1.0))?,
            top_p: float("top_p", Some(1.0))?,
            top_k,
            min_p: float("min_p", None)?,
            repetition_penalty: float("repetition_penalty", Some(1.0))?,
        };
        let mut body = RequestBody {
            prompt: Some(json!("x")),
            ..RequestBody::default()
        };
        defaults.fill(&mut body);
        validate(&body, Endpoint::Completions).map_err(|e| format!("{source}: {}", e.message))?;
        Ok(defaults)
    }

    /// Gives `body` each default it leaves out (or sends as null).
    pub fn fill(&self, body: &mut RequestBody) {
        body.temperature = body.temperature.or(self.temperature);
        body.top_p = body.top_p.or(self.top_p);
        body.top_k = body.top_k.or(self.top_k);
        body.min_p = body.min_p.or(self.min_p);
        body.repetition_penalty = body.repetition_penalty.or(self.repetition_penalty);
    }

    /// The defaults as `name value` pairs, for the start-up log; empty for none.
    pub fn describe(&self) -> String {
        let floats = [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("repetition_penalty", self.repetition_penalty),
        ];
        floats
            .iter()
            .filter_map(|(name, v)| v.map(|v| format!("{name} {v}")))
            .chain(self.top_k.map(|k| format!("top_k {k}")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
    Chat {
        messages: Vec<ChatMessage>,
        /// `chat_template_kwargs`: more variables for the template.
        template_kwargs: serde_json::Map<String, Value>,
        /// The tools offered to the model (OpenAI's `{"type": "function", "function": …}`,
        /// checked): none when the request has none or `tool_choice` is `none`. The output's
        /// calls are read only when there are some.
        tools: Vec<JsonValue>,
    },
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub prompt: PromptInput,
    /// Choices to generate for the prompt (`n`), each its own sequence.
    pub n: usize,
    /// `None`: as many as the context allows (chat) — completions default to 16 like OpenAI.
    pub max_tokens: Option<usize>,
    /// The parameter `max_tokens` came from (`max_tokens` or `max_completion_tokens`), `None`
    /// for a default: a limit the client asked for must fit the context, a default is cut to
    /// it.
    pub max_tokens_param: Option<&'static str>,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// `Some(n)`: return logprobs with `n` alternatives.
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// Generate past the end-of-sequence token (stop strings and max_tokens still apply).
    pub ignore_eos: bool,
    /// Tokens to generate before a stop token may end the output.
    pub min_tokens: usize,
    /// More token ids that end the output (they apply with `ignore_eos` too).
    pub stop_token_ids: Vec<u32>,
    /// `parallel_tool_calls`: false keeps only a choice's first call.
    pub parallel_tool_calls: bool,
}

impl Validated {
    /// The tools a chat request offers the model.
    pub fn tools(&self) -> &[JsonValue] {
        match &self.prompt {
            PromptInput::Chat { tools, .. } => tools,
            _ => &[],
        }
    }
}

/// Which endpoint a body came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// Parses a body (bytes, so invalid UTF-8 and bad JSON get clear 400s).
pub fn parse_body(bytes: &[u8]) -> Result<RequestBody, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::invalid(None, format!("the request body is not valid UTF-8: {e}"))
    })?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::invalid(None, format!("invalid request body: {e}")))?;
    let Value::Object(fields) = &value else {
        return Err(ApiError::invalid(
            None,
            "the request body must be a JSON object",
        ));
    };
    // From the text, not the value: the tools' keys keep their order (see `tools`).
    serde_json::from_str(text).map_err(|e| {
        // Name the field at fault: try each alone.
        let field = fields.iter().find(|(k, v)| {
            let mut one = serde_json::Map::new();
            one.insert((*k).clone(), (*v).clone());
            serde_json::from_value::<RequestBody>(Value::Object(one)).is_err()
        });
        match field {
            Some((name, _)) => ApiError::invalid(Some(name), format!("`{name}`: {e}")),
            None => ApiError::invalid(None, format!("invalid request body: {e}")),
        }
    })
}

fn token_list(items: &[Value], param: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|v| match v.as_i64() {
            Some(t) if (0..=u32::MAX as i64).contains(&t) => Ok(t as u32),
            _ => Err(ApiError::invalid(
                Some(param),
                format!("token ids must be non-negative integers, got {v}"),
            )),
        })
        .collect()
}

fn parse_prompt(prompt: &Value) -> Result<PromptInput, ApiError> {
    let multiple = || {
        ApiError::invalid(
            Some("prompt"),
            "only one prompt per request is supported (batch prompts: send separate requests)",
        )
    };
    match prompt {
        Value::String(s) => Ok(PromptInput::Text(s.clone())),
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::invalid(Some("prompt"), "the prompt is empty"))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => {
            Ok(PromptInput::Tokens(token_list(items, "prompt")?))
        }
        Value::Array(items) if items.len() == 1 => match &items[0] {
            Value::String(s) => Ok(PromptInput::Text(s.clone())),
            Value::Array(inner) => Ok(PromptInput::Tokens(token_list(inner, "prompt")?)),
            _ => Err(ApiError::invalid(
                Some("prompt"),
                "prompt must be a string, a list of token ids, or a one-element list of either",
            )),
        },
        Value::Array(_) => Err(multiple()),
        _ => Err(ApiError::invalid(
            Some("prompt"),
            "prompt must be a string or a list of token ids",
        )),
    }
}

fn parse_messages(ordered: &JsonValue) -> Result<Vec<ChatMessage>, ApiError> {
    let bad = |m: String| ApiError::invalid(Some("messages"), m);
    let JsonValue::Array(ordered) = ordered else {
        return Err(bad(
            "messages must be a list of {role, content} objects".into()
        ));
    };
    let list: Vec<Value> = ordered.iter().map(JsonValue::to_value).collect();
    if list.is_empty() {
        return Err(bad("messages must not be empty".into()));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = format!("messages[{i}]");
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{at} needs a string `role`")))?;
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                // Text parts join with newlines, as vLLM joins them for a string template.
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (k, part) in parts.iter().enumerate() {
                        match (part.get("type").and_then(Value::as_str), part.get("text")) {
                            (Some("text"), Some(Value::String(t))) => {
                                if k > 0 {
                                    text.push('\n');
                                }
                                text.push_str(t);
                            }
                            _ => {
                                return Err(bad(format!(
                                    "{at}: only text content parts are supported"
                                )));
                            }
                        }
                    }
                    text
                }
                Some(_) => {
                    return Err(bad(format!("{at}.content must be a string or text parts")));
                }
            };
            let text = |key: &str| match m.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(bad(format!("{at}.{key} must be a string"))),
            };
            let tool_calls = match m.get("tool_calls") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(calls)) if role == "assistant" => calls
                    .iter()
                    .enumerate()
                    .map(|(c, call)| {
                        // The same call as sent, for arguments sent as an object.
                        let sent = match ordered[i].get("tool_calls") {
                            Some(JsonValue::Array(calls)) => calls.get(c),
                            _ => None,
                        };
                        message_tool_call(call, sent, &format!("{at}.tool_calls[{c}]"))
                    })
                    .collect::<Result<_, _>>()?,
                Some(Value::Array(_)) => {
                    return Err(bad(format!(
                        "{at}: tool_calls belong to assistant messages, not {role}"
                    )));
                }
                Some(_) => return Err(bad(format!("{at}.tool_calls must be a list"))),
            };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
                tool_calls,
                tool_call_id: text("tool_call_id")?,
                name: text("name")?,
                // vLLM reads both names.
                reasoning_content: text("reasoning_content")?.or(text("reasoning")?),
            })
        })
        .collect()
}

/// One call of an assistant message: `{id, type: "function", function: {name, arguments}}`,
/// the arguments JSON text (or an object, written as text with its keys in `sent`'s order).
fn message_tool_call(
    call: &Value,
    sent: Option<&JsonValue>,
    at: &str,
) -> Result<MessageToolCall, ApiError> {
    let bad = |m: String| ApiError::invalid(Some("messages"), m);
    if call
        .get("type")
        .is_some_and(|t| !t.is_null() && t.as_str() != Some("function"))
    {
        return Err(bad(format!("{at}.type must be \"function\"")));
    }
    let function = call
        .get("function")
        .filter(|f| f.is_object())
        .ok_or_else(|| bad(format!("{at}.function must be an object with a name")))?;
    let name = match function.get("name") {
        Some(Value::String(n)) if !n.is_empty() => n.clone(),
        _ => {
            return Err(bad(format!(
                "{at}.function.name must be a non-empty string"
            )));
        }
    };
    let arguments = match function.get("arguments") {
        None | Some(Value::Null) => "{}".to_string(),
        // Some clients send "" for a call without arguments.
        Some(Value::String(a)) if a.trim().is_empty() => "{}".to_string(),
        Some(Value::String(a)) => a.clone(),
        Some(object @ Value::Object(_)) => sent
            .and_then(|c| c.get("function")?.get("arguments"))
            .map_or_else(|| object.to_string(), JsonValue::python_text),
        Some(_) => {
            return Err(bad(format!(
                "{at}.function.arguments must be a JSON object's text"
            )));
        }
    };
    let id = match call.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(_) => return Err(bad(format!("{at}.id must be a string"))),
    };
    Ok(MessageToolCall {
        id,
        function: FunctionCall { name, arguments },
    })
}

fn positive(value: Option<i64>, param: &str) -> Result<Option<usize>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if v >= 1 => Ok(Some(v as usize)),
        Some(v) => Err(ApiError::invalid(
            Some(param),
            format!("{param} must be at least 1, got {v}"),
        )),
    }
}

/// Checks a body for `endpoint` and turns it into engine terms.
pub fn validate(body: &RequestBody, endpoint: Endpoint) -> Result<Validated, ApiError> {
    let prompt = match endpoint {
        Endpoint::Completions => {
            let p = body
                .prompt
                .as_ref()
                .ok_or_else(|| ApiError::invalid(Some("prompt"), "`prompt` is required"))?;
            parse_prompt(p)?
        }
        Endpoint::Chat => {
            let m = body
                .messages
                .as_ref()
                .ok_or_else(|| ApiError::invalid(Some("messages"), "`messages` is required"))?;
            let template_kwargs = match &body.chat_template_kwargs {
                None | Some(Value::Null) => serde_json::Map::new(),
                Some(Value::Object(kwargs)) => kwargs.clone(),
                Some(_) => {
                    return Err(ApiError::invalid(
                        Some("chat_template_kwargs"),
                        "chat_template_kwargs must be an object of template variables",
                    ));
                }
            };
            PromptInput::Chat {
                messages: parse_messages(m)?,
                template_kwargs,
                tools: offered_tools(body)?,
            }
        }
    };
    if endpoint == Endpoint::Completions
        && let Some(param) = [
            ("tools", body.tools.as_ref().map(JsonValue::to_value)),
            ("tool_choice", body.tool_choice.clone()),
            (
                "parallel_tool_calls",
                body.parallel_tool_calls.map(Value::Bool),
            ),
        ]
        .into_iter()
        .find_map(|(name, v)| v.filter(|v| asks(name, v)).map(|_| name))
    {
        return Err(ApiError::invalid(
            Some(param),
            format!("{param} applies to /v1/chat/completions only"),
        ));
    }
    if endpoint == Endpoint::Completions
        && body
            .chat_template_kwargs
            .as_ref()
            .is_some_and(|k| !k.is_null())
    {
        return Err(ApiError::invalid(
            Some("chat_template_kwargs"),
            "chat_template_kwargs applies to /v1/chat/completions only: a completion's prompt \
             is not rendered by the chat template",
        ));
    }
    let n = match body.n {
        None => 1,
        Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                Some("n"),
                format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
            ));
        }
    };
    let (max_tokens, max_tokens_param) = match (
        positive(body.max_completion_tokens, "max_completion_tokens")?,
        positive(body.max_tokens, "max_tokens")?,
    ) {
        (Some(m), _) => (Some(m), Some("max_completion_tokens")),
        (None, Some(m)) => (Some(m), Some("max_tokens")),
        (None, None) if endpoint == Endpoint::Completions => (Some(16), None),
        (None, None) => (None, None),
    };
    if let Some((param, why)) = unsupported(body) {
        return Err(ApiError::invalid(Some(param), why));
    }
    // A completion's prompt starts with the model's BOS; a chat template writes its own.
    let adds_special = endpoint == Endpoint::Completions;
    if let Some(v) = body.other.get("add_special_tokens")
        && !v.is_null()
        && v.as_bool() != Some(adds_special)
    {
        return Err(ApiError::invalid(
            Some("add_special_tokens"),
            format!(
                "add_special_tokens must be {adds_special} here (or left out): this endpoint's \
                 prompts {} the tokenizer's special tokens",
                if adds_special {
                    "start with"
                } else {
                    "take from the chat template"
                }
            ),
        ));
    }
    let temperature = body.temperature.unwrap_or(1.0);
    // Sampling runs in f32: a value beyond f32's range would become infinite there.
    if !(temperature as f32).is_finite() || temperature < 0.0 {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("temperature must be a finite number >= 0, got {temperature}"),
        ));
    }
    let top_p = body.top_p.unwrap_or(1.0);
    // As f32, too: 1e-50 is positive as f64 but 0 in f32.
    if !(top_p > 0.0 && top_p <= 1.0 && top_p as f32 > 0.0) {
        return Err(ApiError::invalid(
            Some("top_p"),
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match body.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                Some("top_k"),
                format!("top_k must be -1 (off) or positive, got {k}"),
            ));
        }
    };
    let stop = match &body.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid(Some("stop"), "stop must be a string or a list of strings")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                Some("stop"),
                "stop must be a string or a list of strings",
            ));
        }
    };
    if stop.len() > MAX_STOPS
        || stop
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::invalid(
            Some("stop"),
            format!(
                "at most {MAX_STOPS} stop strings, none empty or longer than {MAX_STOP_BYTES} \
                 bytes"
            ),
        ));
    }
    let top_range = |param: &str, n: i64| -> Result<usize, ApiError> {
        if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) {
            Ok(n as usize)
        } else {
            Err(ApiError::invalid(
                Some(param),
                format!("{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
            ))
        }
    };
    if endpoint == Endpoint::Chat
        && body.top_logprobs.is_some()
        && body.logprobs != Some(Value::Bool(true))
    {
        // As OpenAI and vLLM answer it: alternatives without logprobs would be dropped.
        return Err(ApiError::invalid(
            Some("top_logprobs"),
            "top_logprobs needs logprobs: true",
        ));
    }
    let logprobs = match (endpoint, &body.logprobs) {
        (_, None | Some(Value::Null)) => None,
        (Endpoint::Completions, Some(v)) => match v.as_i64() {
            Some(n) => Some(top_range("logprobs", n)?),
            None => {
                return Err(ApiError::invalid(
                    Some("logprobs"),
                    "logprobs must be an integer for completions",
                ));
            }
        },
        (Endpoint::Chat, Some(Value::Bool(false))) => None,
        (Endpoint::Chat, Some(Value::Bool(true))) => {
            Some(top_range("top_logprobs", body.top_logprobs.unwrap_or(0))?)
        }
        (Endpoint::Chat, Some(_)) => {
            return Err(ApiError::invalid(
                Some("logprobs"),
                "logprobs must be a boolean for chat completions",
            ));
        }
    };
    let in_two = |v: f64| (-2.0..=2.0).contains(&v);
    let presence_penalty = float_in(
        body.presence_penalty,
        "presence_penalty",
        0.0,
        in_two,
        "in [-2, 2]",
    )?;
    let frequency_penalty = float_in(
        body.frequency_penalty,
        "frequency_penalty",
        0.0,
        in_two,
        "in [-2, 2]",
    )?;
    let repetition_penalty = float_in(
        body.repetition_penalty,
        "repetition_penalty",
        1.0,
        // Positive as the sampler's float32 too: 1e-50 would be 0 there.
        |v| v as f32 > 0.0 && v <= 100.0,
        "in (0, 100]",
    )?;
    let min_p = float_in(
        body.min_p,
        "min_p",
        0.0,
        |v| (0.0..=1.0).contains(&v),
        "in [0, 1]",
    )?;
    let min_tokens = match body.min_tokens {
        None => 0,
        Some(m) if m >= 0 => m as usize,
        Some(m) => {
            return Err(ApiError::invalid(
                Some("min_tokens"),
                format!("min_tokens must be >= 0, got {m}"),
            ));
        }
    };
    if let Some(max) = max_tokens
        && min_tokens > max
    {
        return Err(ApiError::invalid(
            Some("min_tokens"),
            format!("min_tokens ({min_tokens}) must not exceed max_tokens ({max})"),
        ));
    }
    let stream = body.stream.unwrap_or(false);
    // As vLLM: options of a stream on a request that is not one are a mistake (an empty
    // object asks for nothing).
    if !stream
        && body
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage.is_some())
    {
        return Err(ApiError::invalid(
            Some("stream_options"),
            "stream_options applies only with stream: true",
        ));
    }
    let include_usage = body
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    Ok(Validated {
        prompt,
        n,
        max_tokens,
        max_tokens_param,
        params: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            min_p,
            // -1 asks for no seed, as in vLLM.
            seed: body.seed.filter(|&s| s != -1).map(|s| s as u64),
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            logit_bias: logit_bias(&body.logit_bias)?,
        },
        min_tokens,
        stop_token_ids: token_ids(&body.stop_token_ids, "stop_token_ids")?,
        stop,
        logprobs,
        stream,
        include_usage,
        ignore_eos: body.ignore_eos.unwrap_or(false),
        parallel_tool_calls: body.parallel_tool_calls.unwrap_or(true),
    })
}

/// OpenAI's limit on a request's tools.
pub const MAX_TOOLS: usize = 128;

/// The tools a chat request offers the model: its `tools`, checked, unless `tool_choice` is
/// `none`. A `tool_choice` that forces a call (`required`, or a named function) is refused:
/// that takes guided decoding, which the engine does not do.
fn offered_tools(body: &RequestBody) -> Result<Vec<JsonValue>, ApiError> {
    let bad = |param: &str, m: String| ApiError::invalid(Some(param), m);
    let tools = match &body.tools {
        None | Some(JsonValue::Null) => Vec::new(),
        Some(JsonValue::Array(tools)) => tools.clone(),
        Some(_) => return Err(bad("tools", "tools must be a list of tools".into())),
    };
    if tools.len() > MAX_TOOLS {
        return Err(bad(
            "tools",
            format!("at most {MAX_TOOLS} tools, got {}", tools.len()),
        ));
    }
    let mut names = std::collections::HashSet::new();
    for (i, tool) in tools.iter().enumerate() {
        if tool.get("type").and_then(JsonValue::as_str) != Some("function") {
            return Err(bad(
                "tools",
                format!("tools[{i}].type must be \"function\""),
            ));
        }
        let function = match tool.get("function") {
            Some(f @ JsonValue::Object(_)) => f,
            _ => {
                return Err(bad(
                    "tools",
                    format!("tools[{i}].function must be an object with a name"),
                ));
            }
        };
        let name = function
            .get("name")
            .and_then(JsonValue::as_str)
            .unwrap_or("");
        if !valid_tool_name(name) {
            return Err(bad(
                "tools",
                format!(
                    "tools[{i}].function.name must be 1 to 64 characters, none of them a quote, \
                     an angle bracket, a space or a control character; got {name:?}"
                ),
            ));
        }
        if !names.insert(name) {
            return Err(bad(
                "tools",
                format!("tools[{i}]: two tools are named {name:?}"),
            ));
        }
        if function
            .get("description")
            .is_some_and(|d| !matches!(d, JsonValue::String(_) | JsonValue::Null))
        {
            return Err(bad(
                "tools",
                format!("tools[{i}].function.description must be a string"),
            ));
        }
        if function
            .get("parameters")
            .is_some_and(|p| !matches!(p, JsonValue::Object(_) | JsonValue::Null))
        {
            return Err(bad(
                "tools",
                format!("tools[{i}].function.parameters must be a JSON Schema object"),
            ));
        }
    }
    let forced = "forcing a tool call takes guided decoding, which this server does not do; \
                  use \"auto\" (the model decides) or \"none\"";
    match &body.tool_choice {
        None | Some(Value::Null) => Ok(tools),
        Some(Value::String(c)) if c == "auto" => Ok(tools),
        Some(Value::String(c)) if c == "none" => Ok(Vec::new()),
        Some(Value::String(c)) if c == "required" => Err(bad(
            "tool_choice",
            format!("tool_choice \"required\" is not supported: {forced}"),
        )),
        Some(Value::Object(_)) => Err(bad(
            "tool_choice",
            format!("a named tool_choice is not supported: {forced}"),
        )),
        Some(other) => Err(bad(
            "tool_choice",
            format!("tool_choice must be \"auto\" or \"none\", got {other}"),
        )),
    }
}

/// A name DSML can carry in a quoted attribute, and OpenAI's length limit.
fn valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.chars().count())
        && !name
            .chars()
            .any(|c| matches!(c, '"' | '<' | '>') || c.is_whitespace() || c.is_control())
}

/// Turns generated text, a token's piece at a time, into the deltas to send: holds back text
/// that could still become a stop string, and cuts the output at the first stop string.
#[derive(Debug, Default)]
pub struct TextStream {
    stops: Vec<String>,
    text: String,
    sent: usize,
    stopped: bool,
    /// Bytes of `text` from tokens within `min_tokens` ([`TextStream::push_within_min_tokens`]):
    /// a stop string must end after them, as vLLM's detokenizer checks.
    unchecked: usize,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            ..Self::default()
        }
    }

    /// Adds the text one more token gave (whole characters: `Tokenizer::decode_next`).
    /// Returns the text now safe to send and whether a stop string ended the output.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.text.push_str(piece);
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        // A stop string may straddle what was sent and what is new, but not end within text
        // never checked. Matches begin on a character boundary, so a start that falls inside
        // a character moves up to the next.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| {
                let mut from = self
                    .sent
                    .saturating_sub(longest)
                    .max((self.unchecked + 1).saturating_sub(s.len()));
                while !self.text.is_char_boundary(from) {
                    from += 1;
                }
                self.text[from..].find(s.as_str()).map(|i| i + from)
            })
            .min();
        if let Some(end) = hit {
            self.stopped = true;
            let delta = self.slice_from_sent(end.max(self.sent));
            self.text.truncate(end.max(self.sent));
            return (delta, true);
        }
        (self.safe_delta(longest), false)
    }

    /// Adds the text of a token within the request's `min_tokens`: no stop string ends in it
    /// (it may begin there and end in a later token's text). Returns the text safe to send.
    pub fn push_within_min_tokens(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.text.push_str(piece);
        self.unchecked = self.text.len();
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        self.safe_delta(longest)
    }

    /// The text that cannot yet be the start of a stop string of at most `longest` bytes.
    fn safe_delta(&mut self, longest: usize) -> String {
        let mut safe = self.text.len().saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        self.slice_from_sent(safe.max(self.sent))
    }

    /// The text held back, at the end of generation.
    pub fn flush(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        self.slice_from_sent(self.text.len())
    }

    /// The whole output so far (cut at a stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn slice_from_sent(&mut self, end: usize) -> String {
        if end <= self.sent || !self.text.is_char_boundary(self.sent) {
            return String::new();
        }
        let delta = self.text[self.sent..end].to_string();
        self.sent = end;
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> RequestBody {
        serde_json::from_value(v).unwrap()
    }

    fn err(v: Value, e: Endpoint) -> ApiError {
        validate(&body(v), e).unwrap_err()
    }

    #[test]
    fn prompts_parse_as_text_or_tokens() {
        let v = validate(&body(json!({"prompt": "hi"})), Endpoint::Completions).unwrap();
        assert_eq!(v.prompt, PromptInput::Text("hi".into()));
        assert_eq!(v.max_tokens, Some(16));
        let v = validate(&body(json!({"prompt": [1, 2]})), Endpoint::Completions).unwrap();
        assert_eq!(v.prompt, PromptInput::Tokens(vec![1, 2]));
        let v = validate(&body(json!({"prompt": [[3]]})), Endpoint::Completions).unwrap();
        assert_eq!(v.prompt, PromptInput::Tokens(vec![3]));
        assert_eq!(
            err(json!({"prompt": [-1]}), Endpoint::Completions).param,
            Some("prompt".into())
        );
        assert_eq!(
            err(json!({"prompt": ["a", "b"]}), Endpoint::Completions).param,
            Some("prompt".into())
        );
        assert_eq!(
            err(json!({}), Endpoint::Completions).message,
            "`prompt` is required"
        );
    }

    #[test]
    fn sampling_ranges_and_n_are_checked() {
        for (v, param) in [
            (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
            (json!({"prompt": "x", "temperature": -0.5}), "temperature"),
            (json!({"prompt": "x", "temperature": 6.7e44}), "temperature"),
            (json!({"prompt": "x", "top_p": 0}), "top_p"),
            (json!({"prompt": "x", "top_p": 1e-50}), "top_p"),
            (json!({"prompt": "x", "top_k": -2}), "top_k"),
            (json!({"prompt": "x", "n": 0}), "n"),
            (json!({"prompt": "x", "n": 129}), "n"),
            (json!({"prompt": "x", "n": 2, "best_of": 3}), "best_of"),
            (json!({"prompt": "x", "logprobs": 21}), "logprobs"),
            (json!({"prompt": "x", "stop": [1]}), "stop"),
            (
                json!({"prompt": "x", "presence_penalty": 2.5}),
                "presence_penalty",
            ),
            (
                json!({"prompt": "x", "frequency_penalty": -2.1}),
                "frequency_penalty",
            ),
            (
                json!({"prompt": "x", "repetition_penalty": 0}),
                "repetition_penalty",
            ),
            // Positive, but 0 in the sampler's float32.
            (
                json!({"prompt": "x", "repetition_penalty": 1e-50}),
                "repetition_penalty",
            ),
            // One token under two keys: the biases would add up to 200.
            (
                json!({"prompt": "x", "logit_bias": {"5": 100, "05": 100}}),
                "logit_bias",
            ),
            (json!({"prompt": "x", "min_p": 1.5}), "min_p"),
            (json!({"prompt": "x", "min_tokens": -1}), "min_tokens"),
            (
                json!({"prompt": "x", "max_tokens": 4, "min_tokens": 5}),
                "min_tokens",
            ),
            (
                json!({"prompt": "x", "stop_token_ids": [-3]}),
                "stop_token_ids",
            ),
            (
                json!({"prompt": "x", "stop_token_ids": 7}),
                "stop_token_ids",
            ),
            (
                json!({"prompt": "x", "logit_bias": {"12": 101}}),
                "logit_bias",
            ),
            (
                json!({"prompt": "x", "logit_bias": {"twelve": 1}}),
                "logit_bias",
            ),
            (json!({"prompt": "x", "logit_bias": [1, 2]}), "logit_bias"),
            // Asked for, and not done: refused rather than ignored.
            (json!({"prompt": "x", "echo": true}), "echo"),
            (json!({"prompt": "x", "best_of": 3}), "best_of"),
            (json!({"prompt": "x", "suffix": "tail"}), "suffix"),
            (
                json!({"prompt": "x", "response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                json!({"prompt": "x", "tools": [{"type": "function"}]}),
                "tools",
            ),
            (
                json!({"prompt": "x", "guided_choice": ["yes", "no"]}),
                "guided_choice",
            ),
            (
                json!({"prompt": "x", "guided_json": {"type": "object"}}),
                "guided_json",
            ),
            (
                json!({"prompt": "x", "functions": [{"name": "f"}]}),
                "functions",
            ),
            (
                json!({"prompt": "x", "function_call": "auto"}),
                "function_call",
            ),
            (
                json!({"prompt": "x", "prompt_logprobs": 0}),
                "prompt_logprobs",
            ),
            (
                json!({"prompt": "x", "allowed_token_ids": [1]}),
                "allowed_token_ids",
            ),
            (json!({"prompt": "x", "bad_words": ["no"]}), "bad_words"),
            (
                json!({"prompt": "x", "use_beam_search": true}),
                "use_beam_search",
            ),
            (
                json!({"prompt": "x", "return_tokens_as_token_ids": true}),
                "return_tokens_as_token_ids",
            ),
            (
                json!({"prompt": "x", "add_special_tokens": false}),
                "add_special_tokens",
            ),
            (
                json!({"prompt": "x", "stop_token_ids": (0..1025).collect::<Vec<u32>>()}),
                "stop_token_ids",
            ),
            (
                json!({"prompt": "x", "include_stop_str_in_output": true}),
                "include_stop_str_in_output",
            ),
            (
                json!({"prompt": "x", "skip_special_tokens": false}),
                "skip_special_tokens",
            ),
            (
                json!({"prompt": "x", "truncate_prompt_tokens": 5}),
                "truncate_prompt_tokens",
            ),
            (
                json!({"prompt": "x", "chat_template_kwargs": {"thinking": true}}),
                "chat_template_kwargs",
            ),
            (json!({"prompt": "x", "stop": "y".repeat(1025)}), "stop"),
        ] {
            let e = err(v, Endpoint::Completions);
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
        }
        let messages = json!([{"role": "user", "content": "x"}]);
        for logprobs in [json!(null), json!(false)] {
            let mut v = json!({"messages": messages, "top_logprobs": 2});
            if !logprobs.is_null() {
                v["logprobs"] = logprobs;
            }
            let e = err(v, Endpoint::Chat);
            assert_eq!(e.param.as_deref(), Some("top_logprobs"), "{}", e.message);
        }
        let v = json!({"messages": messages, "top_logprobs": 2, "logprobs": true});
        assert_eq!(
            validate(&body(v), Endpoint::Chat).unwrap().logprobs,
            Some(2)
        );
        // The harmless forms of those fields are accepted.
        let v = validate(
            &body(
                json!({"prompt": "x", "echo": false, "best_of": 1, "suffix": "",
                         "response_format": {"type": "text"}, "tools": [],
                         "presence_penalty": -2, "frequency_penalty": 2, "repetition_penalty": 1.3,
                         "min_p": 0.1, "min_tokens": 3, "stop_token_ids": [5, 9],
                         "logit_bias": {"7": -100, " 8": 2.5},
                         "guided_json": null, "functions": [], "function_call": "none",
                         "bad_words": [], "include_stop_str_in_output": false,
                         "skip_special_tokens": true, "chat_template_kwargs": null,
                         "stop": "y".repeat(1024), "some_future_field": {"a": 1}}),
            ),
            Endpoint::Completions,
        )
        .unwrap();
        let p = &v.params;
        assert_eq!(
            (
                p.presence_penalty,
                p.frequency_penalty,
                p.repetition_penalty,
                p.min_p
            ),
            (-2.0, 2.0, 1.3, 0.1)
        );
        let mut bias = p.logit_bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, [(7, -100.0), (8, 2.5)]);
        assert_eq!((v.min_tokens, v.stop_token_ids), (3, vec![5, 9]));
        // A seed of -1 asks for none, as in vLLM; other negative seeds are seeds.
        let seed = |s: i64| {
            validate(
                &body(json!({"prompt": "x", "seed": s})),
                Endpoint::Completions,
            )
            .unwrap()
            .params
            .seed
        };
        assert_eq!(seed(-1), None);
        assert_eq!(seed(-7), Some(-7i64 as u64));
        assert_eq!(seed(7), Some(7));
    }

    /// A DeepSeek V3-family generation_config.json gives temperature 0.6 and top_p 0.95, which
    /// a request that leaves them out gets; transformers' defaults written out are no defaults
    /// (vLLM reads the file's difference from them); a value no request could give is refused.
    #[test]
    fn generation_config_defaults_read_as_vllm_reads_them() {
        let deepseek = r#"{"_from_model_config": true, "bos_token_id": 0, "eos_token_id": 1,
            "do_sample": true, "temperature": 0.6, "top_p": 0.95,
            "transformers_version": "4.46.3"}"#;
        let d = SamplingDefaults::from_generation_config(deepseek, "g.json").unwrap();
        assert_eq!(
            (d.temperature, d.top_p, d.top_k),
            (Some(0.6), Some(0.95), None)
        );
        assert_eq!(d.describe(), "temperature 0.6, top_p 0.95");
        let mut left_out = body(json!({"prompt": "x", "top_p": 0.5, "min_p": null}));
        d.fill(&mut left_out);
        let v = validate(&left_out, Endpoint::Completions).unwrap();
        assert_eq!((v.params.temperature, v.params.top_p), (0.6, 0.5));
        let same = r#"{"temperature": 1.0, "top_p": 1, "top_k": 50, "repetition_penalty": 1.0}"#;
        let d = SamplingDefaults::from_generation_config(same, "g.json").unwrap();
        assert_eq!(d, SamplingDefaults::default());
        assert_eq!(d.describe(), "");
        let d = SamplingDefaults::from_generation_config(r#"{"top_k": 20, "min_p": 0.05}"#, "g")
            .unwrap();
        assert_eq!((d.top_k, d.min_p), (Some(20), Some(0.05)));
        for (bad, named) in [
            (r#"{"top_p": 2}"#, "top_p"),
            (r#"{"temperature": "hot"}"#, "temperature"),
            (r#"{"top_k": 2.5}"#, "top_k"),
            (r#"{"repetition_penalty": -1}"#, "repetition_penalty"),
            ("[1]", "not a JSON object"),
            ("{", "not JSON"),
        ] {
            let err = SamplingDefaults::from_generation_config(bad, "dir/g.json").unwrap_err();
            assert!(
                err.starts_with("dir/g.json: ") && err.contains(named),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn chat_reads_tool_calls_results_and_reasoning() {
        // As a client sends it: text, whose key order the tools keep.
        let text = r#"{
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": null, "reasoning": "look it up",
                 "tool_calls": [{"id": "c1", "type": "function", "function":
                     {"name": "w", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": "c1", "name": "w", "content": "sunny"}
            ],
            "tools": [{"type": "function", "function": {"name": "w", "parameters":
                {"type": "object", "properties": {"z": {}, "a": {}}}}}],
            "tool_choice": "auto"
        }"#;
        let v = validate(&parse_body(text.as_bytes()).unwrap(), Endpoint::Chat).unwrap();
        let PromptInput::Chat {
            messages, tools, ..
        } = &v.prompt
        else {
            panic!("a chat prompt");
        };
        let call = &messages[1];
        assert_eq!(call.content, "");
        assert_eq!(call.reasoning_content.as_deref(), Some("look it up"));
        assert_eq!(call.tool_calls[0].id.as_deref(), Some("c1"));
        assert_eq!(call.tool_calls[0].function.name, "w");
        // Sent as an object: written as text, its keys in the order sent.
        assert_eq!(
            call.tool_calls[0].function.arguments,
            r#"{"city": "Paris"}"#
        );
        assert_eq!(messages[2].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(messages[2].name.as_deref(), Some("w"));
        // The tools keep their keys' order for the prompt.
        assert_eq!(
            tools[0].python_text(),
            r#"{"type": "function", "function": {"name": "w", "parameters": {"type": "object", "properties": {"z": {}, "a": {}}}}}"#
        );
        assert!(v.parallel_tool_calls);
        // tool_choice "none": nothing offered.
        let v = validate(
            &body(json!({"messages": [{"role": "user", "content": "x"}],
                         "tools": [{"type": "function", "function": {"name": "w"}}],
                         "tool_choice": "none", "parallel_tool_calls": false})),
            Endpoint::Chat,
        )
        .unwrap();
        assert!(v.tools().is_empty());
        assert!(!v.parallel_tool_calls);
        for (bad, says) in [
            (
                json!({"role": "assistant", "tool_calls": {}}),
                "tool_calls must be a list",
            ),
            (
                json!({"role": "assistant", "tool_calls": [{"function": {"name": ""}}]}),
                "function.name must be a non-empty string",
            ),
            (
                json!({"role": "assistant", "tool_calls": [{"type": "code",
                       "function": {"name": "f"}}]}),
                "type must be \"function\"",
            ),
            (
                json!({"role": "tool", "tool_call_id": 7}),
                "tool_call_id must be a string",
            ),
        ] {
            let e = err(json!({"messages": [bad]}), Endpoint::Chat);
            assert_eq!(e.param.as_deref(), Some("messages"));
            assert!(e.message.contains(says), "{}", e.message);
        }
        for name in ["get_weather", "local.search", "a-b:c", "天气"] {
            assert!(valid_tool_name(name), "{name}");
        }
        for name in ["", "a b", "a\"b", "<x>", &"n".repeat(65)] {
            assert!(!valid_tool_name(name), "{name}");
        }
    }

    #[test]
    fn chat_reads_messages_and_logprobs() {
        let v = validate(
            &body(
                json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                         "logprobs": true, "top_logprobs": 2, "max_completion_tokens": 5,
                         "stream": true, "stream_options": {"include_usage": true}}),
            ),
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(
            v.prompt,
            PromptInput::Chat {
                messages: vec![ChatMessage::new("user", "hi")],
                template_kwargs: Default::default(),
                tools: Vec::new(),
            }
        );
        assert_eq!(
            (v.logprobs, v.max_tokens, v.stream, v.include_usage),
            (Some(2), Some(5), true, true)
        );
        assert_eq!(
            err(json!({"messages": []}), Endpoint::Chat).param,
            Some("messages".into())
        );
        let parts = json!([{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]);
        let v = validate(
            &body(json!({"messages": [{"role": "user", "content": parts}]})),
            Endpoint::Chat,
        )
        .unwrap();
        let PromptInput::Chat { messages, .. } = v.prompt else {
            panic!("chat")
        };
        assert_eq!(messages[0].content, "Hello\nworld");
        // vLLM's prompt controls the engine does not do are refused; their defaults pass.
        let messages = json!([{"role": "user", "content": "x"}]);
        for (field, value, refused) in [
            ("add_generation_prompt", json!(false), true),
            ("add_generation_prompt", json!(true), false),
            ("continue_final_message", json!(true), true),
            ("continue_final_message", json!(false), false),
            ("add_special_tokens", json!(true), true),
            ("add_special_tokens", json!(false), false),
            ("chat_template", json!("{{ messages }}"), true),
        ] {
            let mut b = json!({"messages": messages});
            b[field] = value.clone();
            match validate(&body(b), Endpoint::Chat) {
                Err(e) if refused => assert_eq!(e.param.as_deref(), Some(field), "{}", e.message),
                Ok(_) if !refused => {}
                other => panic!(
                    "{field}: {value}: {:?}",
                    other.map(|_| ()).map_err(|e| e.message)
                ),
            }
        }
        let v = validate(
            &body(json!({"prompt": "x", "stop_token_ids": [9, 5, 9], "add_special_tokens": true})),
            Endpoint::Completions,
        )
        .unwrap();
        assert_eq!(v.stop_token_ids, [5, 9]);
        let e = err(
            json!({"messages": messages, "stream_options": {"include_usage": true}}),
            Endpoint::Chat,
        );
        assert_eq!(e.param.as_deref(), Some("stream_options"), "{}", e.message);
        // The template's variables (chat only).
        let messages = json!([{"role": "user", "content": "x"}]);
        let v = validate(
            &body(json!({"messages": messages, "chat_template_kwargs": {"thinking": true}})),
            Endpoint::Chat,
        )
        .unwrap();
        let PromptInput::Chat {
            template_kwargs, ..
        } = v.prompt
        else {
            panic!("chat")
        };
        assert_eq!(template_kwargs["thinking"], true);
        let e = err(
            json!({"messages": messages, "chat_template_kwargs": ["thinking"]}),
            Endpoint::Chat,
        );
        assert_eq!(
            e.param.as_deref(),
            Some("chat_template_kwargs"),
            "{}",
            e.message
        );
    }

    #[test]
    fn bodies_that_are_not_json_or_utf8_are_400() {
        assert!(
            parse_body(b"\xff\xfe")
                .unwrap_err()
                .message
                .contains("UTF-8")
        );
        assert!(parse_body(b"{").unwrap_err().message.contains("invalid"));
        let e = parse_body(br#"{"prompt": "x", "max_tokens": "ten"}"#).unwrap_err();
        assert_eq!(e.status, 400);
    }

    /// A cheap stand-in for a fuzz target: mutated and truncated bodies never panic, and every
    /// rejection is a 400 with a message.
    #[test]
    fn mutated_bodies_never_panic() {
        use rand::{RngExt, SeedableRng};
        let seeds: [&[u8]; 3] = [
            br#"{"prompt": [1, 2, 3], "max_tokens": 5, "stop": ["a"], "logprobs": 2}"#,
            br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "logprobs": true, "top_logprobs": 3, "n": 1}"#,
            br#"{"prompt": "x", "temperature": 0.5, "top_p": 0.9, "top_k": -1, "seed": -7, "stream": true, "stream_options": {"include_usage": true}}"#,
        ];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..20_000 {
            let mut body = seeds[rng.random_range(0..seeds.len())].to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..body.len());
                match rng.random_range(0..3) {
                    0 => body[at] = rng.random(),
                    1 => body.truncate(at.max(1)),
                    _ => {
                        let junk = b"[]{}\",:-019e\xff";
                        body.insert(at, junk[rng.random_range(0..junk.len())]);
                    }
                }
            }
            for endpoint in [Endpoint::Completions, Endpoint::Chat] {
                let result = parse_body(&body).and_then(|b| validate(&b, endpoint));
                if let Err(e) = result {
                    assert_eq!(e.status, 400);
                    assert!(!e.message.is_empty());
                }
            }
        }
    }

    #[test]
    fn stop_strings_cut_the_output_and_are_held_back() {
        let mut s = TextStream::new(vec!["cd".into()]);
        // The last char is held: it may start the stop string.
        assert_eq!(s.push("a"), ("".into(), false));
        assert_eq!(s.push("b"), ("a".into(), false));
        assert_eq!(s.push("c"), ("b".into(), false));
        assert_eq!(s.push("d"), ("".into(), true));
        assert_eq!(s.text(), "ab");
        assert_eq!(s.push("e"), ("".into(), true));
        let mut s = TextStream::new(vec![]);
        assert_eq!(s.push("e"), ("e".into(), false));
        assert_eq!(s.flush(), "");
        // A stop string inside one piece, and one over two pieces and a multi-byte character.
        let mut s = TextStream::new(vec!["ü!".into(), "xyz".into()]);
        assert_eq!(s.push("wxy"), ("w".into(), false));
        assert_eq!(s.push("zq"), ("".into(), true));
        assert_eq!(s.text(), "w");
        let mut s = TextStream::new(vec!["ü!".into()]);
        assert_eq!(s.push("aü"), ("a".into(), false));
        assert_eq!(s.push("!b"), ("".into(), true));
        assert_eq!(s.text(), "a");
    }

    /// Within `min_tokens` no stop string ends (vLLM's rule); one that begins there and ends
    /// in a later token's text still stops the output.
    #[test]
    fn stop_strings_end_only_after_min_tokens() {
        let mut s = TextStream::new(vec!["\n".into(), "xyz".into()]);
        // Two bytes held back: they may begin "xyz".
        assert_eq!(s.push_within_min_tokens("a\nb"), "a");
        assert_eq!(s.push_within_min_tokens("\nx"), "\nb");
        assert_eq!(s.push("y"), ("\n".into(), false));
        assert_eq!(s.push("z\nc"), ("".into(), true));
        assert_eq!(s.text(), "a\nb\n");
        // A stop string wholly within the unchecked text and again after it: the later one.
        let mut s = TextStream::new(vec!["ab".into()]);
        assert_eq!(s.push_within_min_tokens("ab"), "a");
        assert_eq!(s.push("cab"), ("bc".into(), true));
        assert_eq!(s.text(), "abc");
    }
}
