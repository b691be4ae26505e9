//! The request parser on arbitrary bytes: `parse_body` + `validate` for both endpoints never
//! panic, every rejection is a 400 with a message, every accepted body is within the limits
//! the scheduler relies on, and the stop-string streamer never loses or repeats text; an
//! accepted chat encodes in DeepSeek-V3.2's format or is refused with a message, and the
//! input read as model output gives the same tool calls and text in any pieces, in every
//! parser's format.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparsemoe_engine::api::{Endpoint, PromptInput, TextStream, parse_body, validate};
use sparsemoe_engine::tool_calls::{Piece, ToolCallParser};

fuzz_target!(|data: &[u8]| {
    tool_calls_read_alike(&String::from_utf8_lossy(data));
    let Ok(body) = parse_body(data).inspect_err(|e| check_rejection(e.status, &e.message)) else {
        return;
    };
    for endpoint in [Endpoint::Completions, Endpoint::Chat] {
        match validate(&body, endpoint) {
            Err(e) => check_rejection(e.status, &e.message),
            Ok(v) => {
                assert!(
                    v.max_tokens.is_none_or(|n| n >= 1),
                    "max_tokens {:?}",
                    v.max_tokens
                );
                let p = &v.params;
                assert!(p.temperature.is_finite() && p.temperature >= 0.0, "{p:?}");
                assert!(p.top_p > 0.0 && p.top_p <= 1.0, "{p:?}");
                // Everything accepted is within the sampler's own limits (penalties, min_p,
                // logit_bias), and min_tokens within max_tokens.
                assert!(p.validate().is_ok(), "{p:?}");
                assert!(
                    v.max_tokens.is_none_or(|n| v.min_tokens <= n),
                    "min_tokens {} above max_tokens {:?}",
                    v.min_tokens,
                    v.max_tokens
                );
                assert!(
                    v.stop.iter().all(|s| !s.is_empty()),
                    "empty stop string accepted"
                );
                stream_through_stops(&v.stop, data);
                if let PromptInput::Chat { messages, tools, .. } = &v.prompt {
                    let functions: Vec<_> = tools
                        .iter()
                        .filter_map(|t| t.get("function").cloned())
                        .collect();
                    assert_eq!(functions.len(), tools.len(), "a tool without a function");
                    for thinking in [false, true] {
                        let encoded = sparsemoe_engine::chat_encoding::deepseek_v32(
                            messages, &functions, thinking,
                        );
                        if let Err(e) = encoded {
                            assert!(e.starts_with("messages["), "{e}");
                        }
                    }
                }
            }
        }
    }
});

fn check_rejection(status: u16, message: &str) {
    assert_eq!(status, 400, "a body was rejected with {status}: {message}");
    assert!(!message.is_empty(), "a rejection without a message");
}

/// Streams the input's bytes as tokens' text (an ASCII character each, or a character of two
/// to four bytes) through the stop-string filter: the pieces sent plus the flushed tail are
/// exactly the kept text, which contains no stop string and is a prefix of the whole text.
fn stream_through_stops(stops: &[String], data: &[u8]) {
    let pieces: Vec<String> = data
        .iter()
        .map(|&b| match b {
            0..200 => char::from(b % 96 + 32).to_string(),
            200..220 => "é".to_string(),
            220..240 => "日".to_string(),
            _ => "🦀".to_string(),
        })
        .collect();
    let mut stream = TextStream::new(stops.to_vec());
    let mut sent = String::new();
    let mut stopped = false;
    for piece in &pieces {
        let (delta, stop) = stream.push(piece);
        sent.push_str(&delta);
        if stop {
            stopped = true;
            break;
        }
    }
    sent.push_str(&stream.flush());
    assert_eq!(
        sent,
        stream.text(),
        "streamed pieces differ from the kept text"
    );
    let whole = pieces.concat();
    assert!(
        whole.starts_with(&sent),
        "kept text is not a prefix of the output"
    );
    if stopped {
        assert!(
            stops
                .iter()
                .any(|s| whole[sent.len()..].starts_with(s.as_str()))
        );
    } else {
        assert_eq!(sent, whole, "text lost without a stop string");
    }
    for s in stops {
        assert!(
            !sent.contains(s.as_str()),
            "kept text contains stop string {s:?}"
        );
    }
}

/// `text` read as a model's output in one piece and a character at a time gives the same
/// content and calls, in every parser's format, and the calls' arguments are JSON objects.
fn tool_calls_read_alike(text: &str) {
    for name in ToolCallParser::NAMES {
        let parser = ToolCallParser::from_name(name).expect("a parser's own name");
        read_alike(parser, text);
    }
}

fn read_alike(parser: ToolCallParser, text: &str) {
    let read = |pieces: &mut dyn Iterator<Item = &str>| {
        let mut stream = parser.stream("call".into());
        let mut out = Vec::new();
        for piece in pieces {
            out.extend(stream.push(piece));
        }
        out.extend(stream.finish());
        let mut content = String::new();
        let mut calls = Vec::new();
        for piece in out {
            match piece {
                Piece::Content(t) => content.push_str(&t),
                Piece::Call(c) => calls.push(c),
            }
        }
        (content, calls)
    };
    let whole = read(&mut std::iter::once(text));
    let chars: Vec<String> = text.chars().map(String::from).collect();
    let piecewise = read(&mut chars.iter().map(String::as_str));
    assert_eq!(
        whole, piecewise,
        "{parser:?}: pieces read differently from the whole"
    );
    for call in &whole.1 {
        assert!(
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&call.arguments)
                .is_ok(),
            "arguments that are not a JSON object: {}",
            call.arguments
        );
    }
    if whole.1.is_empty() {
        // No call: nothing but empty blocks may have gone.
        assert!(whole.0.len() <= text.len());
    }
}
