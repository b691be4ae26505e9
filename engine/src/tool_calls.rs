//! Tool calls in a chat completion's output (`tools` in a request, `serve --tool-call-parser`).
//!
//! DeepSeek-V3.2 writes its calls as DSML, after any text of its answer:
//!
//! ```text
//! <｜DSML｜function_calls>
//! <｜DSML｜invoke name="get_weather">
//! <｜DSML｜parameter name="city" string="true">Hangzhou</｜DSML｜parameter>
//! <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
//! </｜DSML｜invoke>
//! </｜DSML｜function_calls>
//! ```
//!
//! A parameter marked `string="true"` is text as it stands; any other is JSON (a value that does
//! not parse is kept as text). DeepSeek-V3 and V3.1 write theirs between special tokens, the
//! arguments as a JSON object of their own (V3 in a fenced block after the call's type):
//!
//! ```text
//! V3:   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
//!       ```json
//!       {"city": "Hangzhou"}
//!       ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>
//! V3.1: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Hangzhou"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>
//! ```
//!
//! [`CallStream`] reads an output piece by piece, as it is generated: text outside the blocks
//! is content, passed on at once but for an end that may begin a block; each call becomes a
//! [`ToolCall`] when its closing tag arrives. A block that is not in the format after all, or
//! that the output leaves unfinished, comes back as content, so nothing the model wrote is
//! lost. A whole response is the same reading of the whole output.

use serde_json::{Value, json};

use crate::json_text::{JsonValue, quoted};

const PARAM_START: &str = "<｜DSML｜parameter";
const PARAM_END: &str = "</｜DSML｜parameter>";
/// DeepSeek-V3's and V3.1's separator inside a call.
const TOOL_SEP: &str = "<｜tool▁sep｜>";

/// How one family of models writes its calls.
#[derive(Debug)]
struct Format {
    block_start: &'static str,
    block_end: &'static str,
    /// How a call begins (its first tag, or the start of it).
    call_start: &'static str,
    call_end: &'static str,
    /// What the format writes between an answer's text and a block: part of the format
    /// rather than the text (its encoder writes it back before the calls), so not content.
    lead: &'static str,
    /// A call's text, its tags included: its name and its arguments as a JSON object's text,
    /// or `None` if it is not a call in this format.
    parse: fn(&str) -> Option<(String, String)>,
}

const DSML: Format = Format {
    block_start: "<｜DSML｜function_calls>",
    block_end: "</｜DSML｜function_calls>",
    call_start: "<｜DSML｜invoke",
    call_end: "</｜DSML｜invoke>",
    lead: "\n\n",
    parse: parse_invoke,
};

const V3: Format = Format {
    block_start: "<｜tool▁calls▁begin｜>",
    block_end: "<｜tool▁calls▁end｜>",
    call_start: "<｜tool▁call▁begin｜>",
    call_end: "<｜tool▁call▁end｜>",
    lead: "",
    parse: parse_v3_call,
};

const V31: Format = Format {
    parse: parse_v31_call,
    ..V3
};

/// The special tokens of DeepSeek-V3's and V3.1's calls: a tokenizer that marks them special
/// must still write them into an output's text for the calls to be read.
pub const V3_MARKERS: [&str; 5] = [
    V3.block_start,
    V3.block_end,
    V3.call_start,
    V3.call_end,
    TOOL_SEP,
];

/// How the server reads tool calls out of an output (`serve --tool-call-parser`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolCallParser {
    /// DeepSeek-V3.2's DSML blocks.
    DeepSeekV32,
    /// DeepSeek-V3's (and R1's) calls: type, name and a fenced JSON block.
    DeepSeekV3,
    /// DeepSeek-V3.1's calls: name and JSON arguments.
    DeepSeekV31,
}

impl ToolCallParser {
    /// Every parser, as the command line names them.
    pub const NAMES: [&'static str; 3] = ["deepseek_v32", "deepseek_v31", "deepseek_v3"];

    /// The parser named `name` on the command line (vLLM's names).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "deepseek_v32" => Some(Self::DeepSeekV32),
            "deepseek_v31" => Some(Self::DeepSeekV31),
            "deepseek_v3" => Some(Self::DeepSeekV3),
            _ => None,
        }
    }

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::DeepSeekV32 => "deepseek_v32",
            Self::DeepSeekV31 => "deepseek_v31",
            Self::DeepSeekV3 => "deepseek_v3",
        }
    }

    /// The format of calls a chat template writes back into a prompt, where it writes any:
    /// DeepSeek-V3's or V3.1's (whose templates write a call's arguments after its name, in a
    /// fenced block in V3's). `None` for a template that writes no calls in either.
    pub fn for_template(template: &str) -> Option<Self> {
        if !template.contains(V3.block_start) {
            return None;
        }
        Some(match template.contains("```json") {
            true => Self::DeepSeekV3,
            false => Self::DeepSeekV31,
        })
    }

    /// Special tokens whose text an output must keep for this parser to read its calls.
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            Self::DeepSeekV32 => &[],
            Self::DeepSeekV3 | Self::DeepSeekV31 => &V3_MARKERS,
        }
    }

    /// A reader of one output, naming its calls `{id_prefix}-{n}`.
    pub fn stream(self, id_prefix: String) -> CallStream {
        let format = match self {
            Self::DeepSeekV32 => &DSML,
            Self::DeepSeekV3 => &V3,
            Self::DeepSeekV31 => &V31,
        };
        CallStream::new(format, id_prefix)
    }
}

/// One call the model made.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// A JSON object's text.
    pub arguments: String,
}

impl ToolCall {
    /// OpenAI's shape of a call in a message.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }

    /// OpenAI's shape of a call in a stream's delta, the `index`-th of its choice.
    pub fn to_delta(&self, index: usize) -> Value {
        let mut v = self.to_json();
        v["index"] = json!(index);
        v
    }
}

/// What a piece of output turned out to hold.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Content(String),
    Call(ToolCall),
}

/// Reads one output's tool calls as it is generated (see the module's text).
#[derive(Debug)]
pub struct CallStream {
    format: &'static Format,
    id_prefix: String,
    calls: usize,
    /// Inside a block: its text not yet turned into calls, from the format's lead before its
    /// start tag on (content again if the block proves not to be in the format).
    block: Option<String>,
    /// Text not yet read: outside a block, an end that may begin one; inside, what follows
    /// the last whole call.
    pending: String,
    /// Inside a call still being written: how far into `pending` (less its leading
    /// whitespace) its end tag has been looked for, so a long call is searched once.
    scanned: usize,
}

impl CallStream {
    fn new(format: &'static Format, id_prefix: String) -> Self {
        Self {
            format,
            id_prefix,
            calls: 0,
            block: None,
            pending: String::new(),
            scanned: 0,
        }
    }

    /// A reader of DeepSeek-V3.2's DSML.
    pub fn dsml(id_prefix: String) -> Self {
        Self::new(&DSML, id_prefix)
    }

    /// Calls read so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Reads `text`, the output's next piece.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        loop {
            let progressed = match self.block.is_some() {
                false => self.read_content(&mut out),
                true => self.read_block(&mut out),
            };
            if !progressed {
                return merge(out);
            }
            self.scanned = 0;
        }
    }

    /// The output ended: what is still held back, as content.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut text = self.block.take().unwrap_or_default();
        text.push_str(&std::mem::take(&mut self.pending));
        self.scanned = 0;
        match text.is_empty() {
            true => Vec::new(),
            false => vec![Piece::Content(text)],
        }
    }

    /// Outside a block: passes content on up to a block's start (entering it), or up to an end
    /// that may begin one (or the lead before one). Whether it entered a block.
    fn read_content(&mut self, out: &mut Vec<Piece>) -> bool {
        let f = self.format;
        if let Some(at) = self.pending.find(f.block_start) {
            let rest = self.pending.split_off(at);
            let mut content = std::mem::take(&mut self.pending);
            let lead = match content.ends_with(f.lead) {
                true => content.split_off(content.len() - f.lead.len()),
                false => String::new(),
            };
            out.push(Piece::Content(content));
            self.pending = rest[f.block_start.len()..].to_string();
            self.block = Some(lead + f.block_start);
            return true;
        }
        let keep = partial_start(&self.pending, f.block_start).max(partial_start(
            &self.pending,
            &format!("{}{}", f.lead, f.block_start),
        ));
        let rest = self.pending.split_off(self.pending.len() - keep);
        out.push(Piece::Content(std::mem::replace(&mut self.pending, rest)));
        false
    }

    /// Inside a block: reads whole calls, the block's end, or finds it is not in the format.
    /// Whether it read anything.
    fn read_block(&mut self, out: &mut Vec<Piece>) -> bool {
        let f = self.format;
        let text = self.pending.trim_start();
        let skipped = self.pending.len() - text.len();
        if let Some(after) = text.strip_prefix(f.block_end) {
            self.pending = after.to_string();
            self.block = None;
            return true;
        }
        if text.starts_with(f.call_start) {
            let mut from = self.scanned.min(text.len());
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            let Some(end) = text[from..].find(f.call_end).map(|e| from + e) else {
                // The call is still being written: next time, look from where this look
                // could not have found an end tag.
                self.scanned = text.len().saturating_sub(f.call_end.len());
                return false;
            };
            let call = &text[..end + f.call_end.len()];
            let Some((name, arguments)) = (f.parse)(call) else {
                self.not_a_block(out);
                return true;
            };
            self.calls += 1;
            out.push(Piece::Call(ToolCall {
                id: format!("{}-{}", self.id_prefix, self.calls - 1),
                name,
                arguments,
            }));
            let used = skipped + call.len();
            let block = self.block.get_or_insert_with(String::new);
            block.clear(); // its calls are read: only later text comes back as content
            self.pending.drain(..used);
            return true;
        }
        if f.call_start.starts_with(text) || f.block_end.starts_with(text) {
            return false; // a tag still being written (or only whitespace so far)
        }
        self.not_a_block(out);
        true
    }

    /// The block is not in the format: what was taken for its start is content, and what
    /// follows is read again outside it (where another block may start).
    fn not_a_block(&mut self, out: &mut Vec<Piece>) {
        out.push(Piece::Content(self.block.take().unwrap_or_default()));
    }
}

/// Joins neighbouring content and drops empty content.
fn merge(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match (out.last_mut(), piece) {
            (_, Piece::Content(t)) if t.is_empty() => {}
            (Some(Piece::Content(last)), Piece::Content(t)) => last.push_str(&t),
            (_, piece) => out.push(piece),
        }
    }
    out
}

/// Bytes at the end of `text` that begin `tag` (a tag that may be arriving): the longest such
/// end, on a character boundary.
pub(crate) fn partial_start(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && tag.is_char_boundary(n)
                && text.ends_with(&tag[..n])
        })
        .unwrap_or(0)
}

/// `<｜DSML｜invoke name="…">` and its parameters, up to `</｜DSML｜invoke>`: the call's name
/// and its arguments as a JSON object's text (Python's spacing, as the model's prompt writes
/// them); `None` if it is not that.
fn parse_invoke(invoke: &str) -> Option<(String, String)> {
    let body = invoke
        .strip_prefix(DSML.call_start)?
        .strip_suffix(DSML.call_end)?;
    let (attrs, mut rest) = body.split_once('>')?;
    let name = attribute(attrs, "name")?;
    if name.is_empty() {
        return None;
    }
    let mut arguments: Vec<(String, String)> = Vec::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let param = rest.strip_prefix(PARAM_START)?;
        let (attrs, after) = param.split_once('>')?;
        let key = attribute(attrs, "name")?;
        let is_string = match attribute(attrs, "string").as_deref() {
            Some("true") => true,
            Some("false") => false,
            _ => return None,
        };
        let (value, after) = after.split_once(PARAM_END)?;
        let value = match is_string {
            true => quoted(value),
            false => JsonValue::parse(value.trim())
                .map(|v| v.python_text())
                .unwrap_or_else(|_| quoted(value)),
        };
        // A repeated key keeps its last value, as a JSON object's reader would.
        arguments.retain(|(k, _)| *k != key);
        arguments.push((key, value));
        rest = after;
    }
    let entries: Vec<String> = arguments
        .iter()
        .map(|(k, v)| format!("{}: {v}", quoted(k)))
        .collect();
    Some((name, format!("{{{}}}", entries.join(", "))))
}

/// The value of `key="…"` among a tag's attributes (`attrs`: what follows the tag's name).
fn attribute(attrs: &str, key: &str) -> Option<String> {
    let mut rest = attrs;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return None;
        }
        let (k, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let (value, after) = after.split_once('"')?;
        if k.trim() == key {
            return Some(value.to_string());
        }
        rest = after;
    }
}

/// DeepSeek-V3's `<｜tool▁call▁begin｜>TYPE<｜tool▁sep｜>NAME` and its arguments in a fenced
/// JSON block, up to `<｜tool▁call▁end｜>`: the name and the arguments as written.
fn parse_v3_call(call: &str) -> Option<(String, String)> {
    let body = call
        .strip_prefix(V3.call_start)?
        .strip_suffix(V3.call_end)?;
    let (_kind, rest) = body.split_once(TOOL_SEP)?;
    let (name, fenced) = rest.split_once("```json")?;
    let arguments = fenced.trim_end().strip_suffix("```")?;
    Some((call_name(name)?, object_text(arguments)?))
}

/// DeepSeek-V3.1's `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>`: the name
/// and the arguments as written.
fn parse_v31_call(call: &str) -> Option<(String, String)> {
    let body = call
        .strip_prefix(V31.call_start)?
        .strip_suffix(V31.call_end)?;
    let (name, arguments) = body.split_once(TOOL_SEP)?;
    Some((call_name(name)?, object_text(arguments)?))
}

/// A call's name as the model wrote it, less surrounding whitespace: one line, not empty.
fn call_name(text: &str) -> Option<String> {
    let name = text.trim();
    (!name.is_empty() && !name.contains('\n')).then(|| name.to_string())
}

/// `text` less surrounding whitespace, if it is a JSON object.
fn object_text(text: &str) -> Option<String> {
    let text = text.trim();
    matches!(JsonValue::parse(text), Ok(JsonValue::Object(_))).then(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_CALLS: &str = "Let me look.\n\n<｜DSML｜function_calls>\n\
        <｜DSML｜invoke name=\"get_weather\">\n\
        <｜DSML｜parameter name=\"city\" string=\"true\">杭州 \"west\"</｜DSML｜parameter>\n\
        <｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n\
        <｜DSML｜parameter name=\"units\" string=\"false\">{\"temp\": \"C\", \"wind\": [1, 2.5]}</｜DSML｜parameter>\n\
        </｜DSML｜invoke>\n\
        <｜DSML｜invoke name=\"now\">\n</｜DSML｜invoke>\n\
        </｜DSML｜function_calls>";

    fn read_whole(text: &str) -> Vec<Piece> {
        read_with(ToolCallParser::DeepSeekV32, text)
    }

    fn read_with(parser: ToolCallParser, text: &str) -> Vec<Piece> {
        let mut s = parser.stream("call".into());
        let mut out = s.push(text);
        out.extend(s.finish());
        merge(out)
    }

    /// `text` read `step` characters at a time.
    fn read_in_pieces(parser: ToolCallParser, text: &str, step: usize) -> Vec<Piece> {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let mut s = parser.stream("call".into());
        let mut out = Vec::new();
        for chunk in chars.chunks(step) {
            let start = chunk[0].0;
            let end = chunk.last().map(|&(i, c)| i + c.len_utf8()).unwrap();
            out.extend(s.push(&text[start..end]));
        }
        out.extend(s.finish());
        merge(out)
    }

    fn calls(pieces: &[Piece]) -> Vec<(&str, &str)> {
        pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Call(c) => Some((c.name.as_str(), c.arguments.as_str())),
                Piece::Content(_) => None,
            })
            .collect()
    }

    fn content(pieces: &[Piece]) -> String {
        pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Content(t) => Some(t.as_str()),
                Piece::Call(_) => None,
            })
            .collect()
    }

    #[test]
    fn a_block_gives_its_calls_and_the_text_before_it_is_content() {
        let pieces = read_whole(TWO_CALLS);
        // The blank line before the block is the format's, not the answer's.
        assert_eq!(content(&pieces), "Let me look.");
        assert_eq!(
            calls(&pieces),
            [
                (
                    "get_weather",
                    r#"{"city": "杭州 \"west\"", "days": 3, "units": {"temp": "C", "wind": [1, 2.5]}}"#
                ),
                ("now", "{}"),
            ]
        );
        let ids: Vec<String> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Call(c) => Some(c.id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(ids, ["call-0", "call-1"]);
        // Arguments are JSON objects.
        for (_, args) in calls(&pieces) {
            assert!(
                serde_json::from_str::<serde_json::Map<_, _>>(args).is_ok(),
                "{args}"
            );
        }
    }

    #[test]
    fn any_split_of_the_output_reads_as_the_whole_does() {
        let not_then_calls = "<｜DSML｜function_calls>x\n\n<｜DSML｜function_calls>\
            <｜DSML｜invoke name=\"f\"></｜DSML｜invoke></｜DSML｜function_calls>";
        for text in [
            TWO_CALLS,
            not_then_calls,
            "a\n\n\n<｜DSML｜function_calls>b\n\n",
        ] {
            let whole = read_whole(text);
            for step in [1, 2, 3, 7, 13] {
                assert_eq!(
                    read_in_pieces(ToolCallParser::DeepSeekV32, text, step),
                    whole,
                    "{text:?} in pieces of {step} characters"
                );
            }
        }
        // A start tag that begins no block is text, and a block after it is still read.
        let pieces = read_whole(not_then_calls);
        assert_eq!(calls(&pieces), [("f", "{}")]);
        assert_eq!(content(&pieces), "<｜DSML｜function_calls>x");
        // Only one blank line is the format's; a block that is not DSML keeps its own.
        assert_eq!(
            read_whole("a\n\n\n<｜DSML｜function_calls>b\n\n"),
            [Piece::Content(
                "a\n\n\n<｜DSML｜function_calls>b\n\n".into()
            )]
        );
    }

    #[test]
    fn content_is_passed_on_at_once_but_for_what_may_begin_a_block() {
        let mut s = CallStream::dsml("c".into());
        assert_eq!(s.push("Hello <"), [Piece::Content("Hello ".into())]);
        assert_eq!(s.push("b>"), [Piece::Content("<b>".into())]);
        assert_eq!(s.push("x <｜DS"), [Piece::Content("x ".into())]);
        assert_eq!(s.push("ML｜function_calls>\n<｜DSML｜inv"), []);
        assert_eq!(
            s.finish(),
            [Piece::Content(
                "<｜DSML｜function_calls>\n<｜DSML｜inv".into()
            )]
        );
    }

    #[test]
    fn what_is_not_dsml_or_is_left_unfinished_comes_back_as_content() {
        for text in [
            "<｜DSML｜function_calls>\nplain words",
            "<｜DSML｜function_calls><｜DSML｜invoke name=\"f\"><b>x</b></｜DSML｜invoke>",
            "<｜DSML｜function_calls><｜DSML｜invoke name=\"f\"><｜DSML｜parameter name=\"a\" \
             string=\"maybe\">1</｜DSML｜parameter></｜DSML｜invoke>",
            "<｜DSML｜function_calls><｜DSML｜invoke name=\"\"></｜DSML｜invoke>",
            "<｜DSML｜function_calls><｜DSML｜invoke name=\"f\"><｜DSML｜parameter name=\"a\" \
             string=\"true\">1",
        ] {
            let pieces = read_whole(text);
            assert_eq!(pieces, [Piece::Content(text.into())], "{text}");
        }
    }

    #[test]
    fn text_after_a_block_is_content_and_a_second_block_gives_more_calls() {
        let text = "<｜DSML｜function_calls><｜DSML｜invoke name=\"a\"></｜DSML｜invoke>\
                    </｜DSML｜function_calls> and then \
                    <｜DSML｜function_calls><｜DSML｜invoke name=\"b\"></｜DSML｜invoke>\
                    </｜DSML｜function_calls>";
        let pieces = read_whole(text);
        assert_eq!(calls(&pieces), [("a", "{}"), ("b", "{}")]);
        assert_eq!(content(&pieces), " and then ");
    }

    #[test]
    fn a_block_broken_off_after_a_call_keeps_the_call_and_returns_the_rest() {
        let text = "<｜DSML｜function_calls><｜DSML｜invoke name=\"a\"></｜DSML｜invoke>\n\
                    <｜DSML｜invoke name=\"b\">";
        let pieces = read_whole(text);
        assert_eq!(calls(&pieces), [("a", "{}")]);
        assert_eq!(content(&pieces), "\n<｜DSML｜invoke name=\"b\">");
    }

    #[test]
    fn values_that_are_not_json_stay_text_and_a_repeated_key_keeps_its_last() {
        let text = "<｜DSML｜function_calls><｜DSML｜invoke name=\"run\">\
            <｜DSML｜parameter name=\"cmd\" string=\"false\">ls -la</｜DSML｜parameter>\
            <｜DSML｜parameter name=\"n\" string=\"false\">1</｜DSML｜parameter>\
            <｜DSML｜parameter name=\"n\" string=\"false\">2</｜DSML｜parameter>\
            </｜DSML｜invoke></｜DSML｜function_calls>";
        assert_eq!(
            calls(&read_whole(text)),
            [("run", r#"{"cmd": "ls -la", "n": 2}"#)]
        );
    }

    #[test]
    fn the_parsers_are_named_as_vllm_names_them() {
        for name in ToolCallParser::NAMES {
            assert_eq!(
                ToolCallParser::from_name(name).map(|p| p.name()),
                Some(name)
            );
        }
        assert_eq!(
            ToolCallParser::from_name("deepseek_v32"),
            Some(ToolCallParser::DeepSeekV32)
        );
        assert_eq!(ToolCallParser::from_name("hermes"), None);
    }

    const V3_CALLS: &str = "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function\
        <｜tool▁sep｜>get_weather\n```json\n{\"city\": \"杭州\",\"days\": [1, 2]}\n```\
        <｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n{}\n```\
        <｜tool▁call▁end｜><｜tool▁calls▁end｜>";

    const V31_CALLS: &str = "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather\
        <｜tool▁sep｜>{\"city\": \"杭州\",\"days\": [1, 2]}<｜tool▁call▁end｜>\
        <｜tool▁call▁begin｜>now<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";

    #[test]
    fn deepseek_v3_and_v31_calls_are_read_with_their_arguments_as_written() {
        for (parser, text) in [
            (ToolCallParser::DeepSeekV3, V3_CALLS),
            (ToolCallParser::DeepSeekV31, V31_CALLS),
        ] {
            let pieces = read_with(parser, text);
            assert_eq!(content(&pieces), "Checking.", "{parser:?}");
            assert_eq!(
                calls(&pieces),
                [
                    ("get_weather", r#"{"city": "杭州","days": [1, 2]}"#),
                    ("now", "{}")
                ],
                "{parser:?}"
            );
            // Either format read as the other is text, whole.
            let other = match parser {
                ToolCallParser::DeepSeekV3 => ToolCallParser::DeepSeekV31,
                _ => ToolCallParser::DeepSeekV3,
            };
            assert_eq!(
                read_with(other, text),
                [Piece::Content(text.into())],
                "{parser:?} read as {other:?}"
            );
            // DSML is text to these parsers, and theirs to DSML's.
            assert_eq!(
                read_with(parser, TWO_CALLS),
                [Piece::Content(TWO_CALLS.into())]
            );
            assert_eq!(
                read_with(ToolCallParser::DeepSeekV32, text),
                [Piece::Content(text.into())]
            );
            // In any pieces, the same reading.
            let whole = read_with(parser, text);
            for step in [1, 2, 5, 11] {
                assert_eq!(
                    read_in_pieces(parser, text, step),
                    whole,
                    "{parser:?} in pieces of {step}"
                );
            }
        }
    }

    #[test]
    fn deepseek_v3_calls_that_are_not_objects_or_have_no_name_are_text() {
        let v31 = |body: &str| {
            format!(
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{body}<｜tool▁call▁end｜>\
                 <｜tool▁calls▁end｜>"
            )
        };
        for text in [
            v31("f<｜tool▁sep｜>[1, 2]"),
            v31("f<｜tool▁sep｜>{\"a\": 1"),
            v31(" <｜tool▁sep｜>{}"),
            v31("f\ng<｜tool▁sep｜>{}"),
            v31("f {}"),
        ] {
            assert_eq!(
                read_with(ToolCallParser::DeepSeekV31, &text),
                [Piece::Content(text.clone())],
                "{text}"
            );
        }
        let v3 = |body: &str| {
            format!(
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{body}\
                 <｜tool▁call▁end｜><｜tool▁calls▁end｜>"
            )
        };
        for text in [
            v3("f\n{\"a\": 1}"),
            v3("f\n```json\n{\"a\": 1}\n"),
            v3("f\n```json\n\"a\"\n```"),
            v3("\n```json\n{}\n```"),
        ] {
            assert_eq!(
                read_with(ToolCallParser::DeepSeekV3, &text),
                [Piece::Content(text.clone())],
                "{text}"
            );
        }
        // A call left unfinished keeps the ones before it.
        let cut = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>a<｜tool▁sep｜>{}<｜tool▁call▁end｜>\
                   <｜tool▁call▁begin｜>b<｜tool▁sep｜>{\"x\"";
        let pieces = read_with(ToolCallParser::DeepSeekV31, cut);
        assert_eq!(calls(&pieces), [("a", "{}")]);
        assert_eq!(
            content(&pieces),
            "<｜tool▁call▁begin｜>b<｜tool▁sep｜>{\"x\""
        );
    }

    #[test]
    fn a_template_names_the_calls_it_writes() {
        let v3 = "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + \
                  '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n'}}";
        let v31 = "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['function']['name'] + \
                   '<｜tool▁sep｜>' + tool['function']['arguments']}}";
        assert_eq!(
            ToolCallParser::for_template(v3),
            Some(ToolCallParser::DeepSeekV3)
        );
        assert_eq!(
            ToolCallParser::for_template(v31),
            Some(ToolCallParser::DeepSeekV31)
        );
        assert_eq!(
            ToolCallParser::for_template("{{ messages[0]['content'] }}"),
            None
        );
    }
}
