//! DeepSeek-V3.2's chat format, for checkpoints that ship no Jinja chat template.
//!
//! DeepSeek-V3.2's release has no `chat_template` in `tokenizer_config.json`: its prompt format
//! is defined by the Python encoder in the checkpoint's `encoding/` folder, which vLLM applies
//! in its `deepseek_v32` tokenizer mode. This is the same format:
//!
//! - `<｜begin▁of▁sentence｜>`, then the system messages' text, then the turns;
//! - a user turn is `<｜User｜>{content}<｜Assistant｜>` then `</think>` (chat mode), or
//!   `<think>` after the last user turn in thinking mode (`chat_template_kwargs`
//!   `{"thinking": true}`, or `enable_thinking`);
//! - an assistant turn is its reasoning and `</think>` (thinking mode, after the last user
//!   turn only), its content, its tool calls as a DSML block, and `<｜end▁of▁sentence｜>`;
//! - tool results follow their calls as `<function_results>` with one `<result>` each;
//! - a request's `tools` become a system message of their own at the start, which lists
//!   their schemas (Python's `json.dumps` of each `function`) with instructions to call them in
//!   DSML ([`crate::tool_calls`] reads those calls back).
//!
//! One difference: in thinking mode the reference encoder leaves out `developer` messages
//! before the last user turn; here they are kept, as no input is dropped unsaid.

use crate::json_text::JsonValue;
use crate::tokenizer::ChatMessage;

const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";
const USER: &str = "<｜User｜>";
const ASSISTANT: &str = "<｜Assistant｜>";
const THINK_START: &str = "<think>";
const THINK_END: &str = "</think>";

/// The system prompt's tools section, the schemas at its end (DeepSeek-V3.2's wording, which
/// the model was trained on).
const TOOLS_INTRO: &str = "## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a \"<｜DSML｜function_calls>\" block like the following as part of your reply to the user:
<｜DSML｜function_calls>
<｜DSML｜invoke name=\"$FUNCTION_NAME\">
<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name=\"$FUNCTION_NAME2\">
...
</｜DSML｜invoke>
</｜DSML｜function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The \"string\" attribute should be set to \"true\" for string type parameters and \"false\" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<｜DSML｜function_calls>
...
</｜DSML｜function_calls>

<function_results>
...
</function_results>

<think>...thinking about results</think>

Here are the functions available in JSONSchema format:
<functions>
";
const TOOLS_OUTRO: &str = "\n</functions>\n";

/// The prompt for `messages`, with `tools` (each a tool's `function` object) offered when
/// there are any. An error names the message at fault.
pub fn deepseek_v32(
    messages: &[ChatMessage],
    tools: &[JsonValue],
    thinking: bool,
) -> Result<String, String> {
    // The tools' system message comes first, as vLLM's deepseek_v32 mode puts it.
    let tools_message = ChatMessage::new("system", "");
    let offered = !tools.is_empty();
    let all: Vec<(&ChatMessage, bool)> = offered
        .then_some((&tools_message, true))
        .into_iter()
        .chain(messages.iter().map(|m| (m, false)))
        .collect();
    // Errors number the client's messages, not the tools' one.
    let client_index = |i: usize| i - usize::from(offered);
    let last_user = all
        .iter()
        .rposition(|(m, _)| matches!(m.role.as_str(), "user" | "developer"));
    let think_tail = |i: usize| match thinking && Some(i) == last_user {
        true => THINK_START,
        false => THINK_END,
    };
    // Every call answered, once results begin (as OpenAI asks): the format closes its results
    // after the last call's.
    for (i, (m, _)) in all.iter().enumerate() {
        let calls = m.tool_calls.len();
        if m.role != "assistant" || calls == 0 {
            continue;
        }
        let results = all[i + 1..]
            .iter()
            .take_while(|(m, _)| m.role == "tool")
            .count();
        if results > 0 && results < calls {
            return Err(format!(
                "messages[{}]: the assistant message made {calls} tool calls and {results} \
                 result(s) follow it; give each call its result",
                client_index(i)
            ));
        }
    }
    let mut prompt = String::from(BOS);
    for (i, &(m, with_tools)) in all.iter().enumerate() {
        let at = || format!("messages[{}]", client_index(i));
        match m.role.as_str() {
            "system" => {
                prompt.push_str(&m.content);
                if with_tools {
                    prompt.push_str("\n\n");
                    push_tools(&mut prompt, tools);
                }
            }
            "developer" => {
                if m.content.is_empty() {
                    return Err(format!("{}: a developer message needs content", at()));
                }
                prompt.push_str(USER);
                prompt.push_str("\n\n# The user's message is: ");
                prompt.push_str(&m.content);
                prompt.push_str(ASSISTANT);
                prompt.push_str(think_tail(i));
            }
            "user" => {
                prompt.push_str(USER);
                prompt.push_str(&m.content);
                prompt.push_str(ASSISTANT);
                prompt.push_str(think_tail(i));
            }
            "tool" => {
                // Its call: the assistant message before this run of tool messages.
                let first = all[..i]
                    .iter()
                    .rposition(|(m, _)| m.role != "tool")
                    .map_or(0, |p| p + 1);
                let calls = match first.checked_sub(1).map(|p| all[p].0) {
                    Some(a) if a.role == "assistant" => a.tool_calls.len(),
                    _ => {
                        return Err(format!(
                            "{}: a tool message must follow an assistant message with tool_calls",
                            at()
                        ));
                    }
                };
                let order = i - first + 1;
                if order > calls {
                    return Err(format!(
                        "{}: the assistant message before it made {calls} tool call(s), and this \
                         is result {order}",
                        at()
                    ));
                }
                if order == 1 {
                    prompt.push_str("\n\n<function_results>");
                }
                prompt.push_str("\n<result>");
                prompt.push_str(&m.content);
                prompt.push_str("</result>");
                if order == calls {
                    prompt.push_str("\n</function_results>\n\n");
                    let after_last_user = last_user.is_none_or(|u| i >= u);
                    prompt.push_str(match thinking && after_last_user {
                        true => THINK_START,
                        false => THINK_END,
                    });
                }
            }
            "assistant" => {
                if thinking && last_user.is_none_or(|u| i > u) {
                    let reasoning = m.reasoning_content.as_deref().unwrap_or("");
                    if reasoning.is_empty() && m.tool_calls.is_empty() {
                        return Err(format!(
                            "{}: in thinking mode an assistant message after the last user \
                             message needs reasoning_content or tool_calls",
                            at()
                        ));
                    }
                    prompt.push_str(reasoning);
                    prompt.push_str(THINK_END);
                }
                prompt.push_str(&m.content);
                if !m.tool_calls.is_empty() {
                    prompt.push_str("\n\n<｜DSML｜function_calls>\n");
                    for (c, call) in m.tool_calls.iter().enumerate() {
                        if c > 0 {
                            prompt.push('\n');
                        }
                        let arguments = JsonValue::parse(&call.function.arguments);
                        let Ok(JsonValue::Object(arguments)) = arguments else {
                            return Err(format!(
                                "{}.tool_calls[{c}].function.arguments must be a JSON object",
                                at()
                            ));
                        };
                        prompt.push_str(&format!(
                            "<｜DSML｜invoke name=\"{}\">\n",
                            call.function.name
                        ));
                        for (p, (key, value)) in arguments.iter().enumerate() {
                            if p > 0 {
                                prompt.push('\n');
                            }
                            let (is_string, text) = match value {
                                JsonValue::String(s) => ("true", s.clone()),
                                other => ("false", other.python_text()),
                            };
                            prompt.push_str(&format!(
                                "<｜DSML｜parameter name=\"{key}\" string=\"{is_string}\">{text}\
                                 </｜DSML｜parameter>"
                            ));
                        }
                        prompt.push_str("\n</｜DSML｜invoke>");
                    }
                    prompt.push_str("\n</｜DSML｜function_calls>");
                }
                prompt.push_str(EOS);
            }
            other => {
                return Err(format!(
                    "{}: unknown role `{other}` (DeepSeek-V3.2's chat format has system, \
                     developer, user, assistant and tool)",
                    at()
                ));
            }
        }
    }
    Ok(prompt)
}

fn push_tools(prompt: &mut String, tools: &[JsonValue]) {
    prompt.push_str(TOOLS_INTRO);
    for (i, tool) in tools.iter().enumerate() {
        if i > 0 {
            prompt.push('\n');
        }
        prompt.push_str(&tool.python_text());
    }
    prompt.push_str(TOOLS_OUTRO);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{FunctionCall, MessageToolCall};

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::new(role, content)
    }

    #[test]
    fn the_published_example_encodes_as_published() {
        // The example of DeepSeek-V3.2's model card (thinking mode, history's reasoning
        // dropped).
        let mut answer = msg("assistant", "Hello! I am DeepSeek.");
        answer.reasoning_content = Some("thinking...".into());
        let messages = [msg("user", "hello"), answer, msg("user", "1+1=?")];
        assert_eq!(
            deepseek_v32(&messages, &[], true).unwrap(),
            "<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek.\
             <｜end▁of▁sentence｜><｜User｜>1+1=?<｜Assistant｜><think>"
        );
        // Chat mode ends the turn with </think> instead.
        assert!(
            deepseek_v32(&messages, &[], false)
                .unwrap()
                .ends_with("<｜User｜>1+1=?<｜Assistant｜></think>")
        );
    }

    #[test]
    fn tools_calls_and_results_take_their_places() {
        let tool = JsonValue::parse(
            r#"{"name": "get_weather", "description": "Weather", "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}}}}"#,
        )
        .unwrap();
        let mut call = msg("assistant", "");
        call.tool_calls = vec![
            MessageToolCall {
                id: Some("a".into()),
                function: FunctionCall {
                    name: "get_weather".into(),
                    arguments: r#"{"city": "Paris", "days": 2, "hourly": [true]}"#.into(),
                },
            },
            MessageToolCall {
                id: Some("b".into()),
                function: FunctionCall {
                    name: "now".into(),
                    arguments: "{}".into(),
                },
            },
        ];
        let messages = [
            msg("system", "Be brief."),
            msg("user", "Weather?"),
            call,
            msg("tool", "sunny"),
            msg("tool", "noon"),
        ];
        let prompt = deepseek_v32(&messages, std::slice::from_ref(&tool), false).unwrap();
        let expected_tools = format!(
            "{TOOLS_INTRO}{{\"name\": \"get_weather\", \"description\": \"Weather\", \
             \"parameters\": {{\"type\": \"object\", \"properties\": {{\"city\": {{\"type\": \
             \"string\"}}}}}}}}{TOOLS_OUTRO}"
        );
        let expected = format!(
            "<｜begin▁of▁sentence｜>\n\n{expected_tools}Be brief.<｜User｜>Weather?<｜Assistant｜>\
             </think>\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n\
             <｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n\
             <｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n\
             <｜DSML｜parameter name=\"hourly\" string=\"false\">[true]</｜DSML｜parameter>\n\
             </｜DSML｜invoke>\n<｜DSML｜invoke name=\"now\">\n\n</｜DSML｜invoke>\n\
             </｜DSML｜function_calls><｜end▁of▁sentence｜>\n\n<function_results>\n\
             <result>sunny</result>\n<result>noon</result>\n</function_results>\n\n</think>"
        );
        assert_eq!(prompt, expected);
        // The calls the prompt shows read back as the calls made (the tools' instructions
        // before them show the block's form, with nothing to call).
        let answer = "Weather?<｜Assistant｜></think>";
        let block = &prompt[prompt.find(answer).unwrap() + answer.len()..];
        let mut stream = crate::tool_calls::CallStream::dsml("c".into());
        let read: Vec<_> = stream
            .push(block)
            .into_iter()
            .filter_map(|p| match p {
                crate::tool_calls::Piece::Call(c) => Some((c.name, c.arguments)),
                _ => None,
            })
            .collect();
        assert_eq!(
            read,
            [
                (
                    "get_weather".to_string(),
                    r#"{"city": "Paris", "days": 2, "hourly": [true]}"#.to_string()
                ),
                ("now".to_string(), "{}".to_string())
            ]
        );
    }

    #[test]
    fn thinking_mode_opens_a_thought_after_the_last_results() {
        let mut call = msg("assistant", "");
        call.reasoning_content = Some("I need the weather.".into());
        call.tool_calls = vec![MessageToolCall {
            id: None,
            function: FunctionCall {
                name: "w".into(),
                arguments: "{}".into(),
            },
        }];
        let messages = [msg("user", "Weather?"), call, msg("tool", "sunny")];
        let prompt = deepseek_v32(&messages, &[], true).unwrap();
        assert!(
            prompt.starts_with(
                "<｜begin▁of▁sentence｜><｜User｜>Weather?<｜Assistant｜><think>I need the \
                 weather.</think>\n\n<｜DSML｜function_calls>"
            ),
            "{prompt}"
        );
        assert!(prompt.ends_with("<result>sunny</result>\n</function_results>\n\n<think>"));
    }

    #[test]
    fn messages_the_format_cannot_hold_are_refused_by_their_place() {
        let tool_first = [msg("user", "x"), msg("tool", "result")];
        let e = deepseek_v32(&tool_first, &[], false).unwrap_err();
        assert!(
            e.starts_with("messages[1]: a tool message must follow"),
            "{e}"
        );

        let mut one_call = msg("assistant", "");
        one_call.tool_calls = vec![MessageToolCall {
            id: None,
            function: FunctionCall {
                name: "w".into(),
                arguments: "{}".into(),
            },
        }];
        let too_many = [
            msg("user", "x"),
            one_call.clone(),
            msg("tool", "a"),
            msg("tool", "b"),
        ];
        let e = deepseek_v32(&too_many, &[], false).unwrap_err();
        assert!(
            e.starts_with("messages[3]: the assistant message before it made 1"),
            "{e}"
        );

        let mut two_calls = one_call.clone();
        two_calls.tool_calls.push(two_calls.tool_calls[0].clone());
        let one_result = [
            msg("user", "x"),
            two_calls,
            msg("tool", "a"),
            msg("user", "y"),
        ];
        let e = deepseek_v32(&one_result, &[], false).unwrap_err();
        assert!(
            e.starts_with("messages[1]: the assistant message made 2 tool calls and 1"),
            "{e}"
        );

        let mut bad_args = one_call.clone();
        bad_args.tool_calls[0].function.arguments = "[1, 2]".into();
        let e = deepseek_v32(&[msg("user", "x"), bad_args], &[], false).unwrap_err();
        assert_eq!(
            e,
            "messages[1].tool_calls[0].function.arguments must be a JSON object"
        );

        let e = deepseek_v32(&[msg("user", "x"), msg("narrator", "y")], &[], false).unwrap_err();
        assert!(e.starts_with("messages[1]: unknown role `narrator`"), "{e}");

        let e = deepseek_v32(&[msg("developer", "")], &[], false).unwrap_err();
        assert_eq!(e, "messages[0]: a developer message needs content");

        // Thinking mode: an answer after the last user turn must show its reasoning.
        let e = deepseek_v32(&[msg("user", "x"), msg("assistant", "y")], &[], true).unwrap_err();
        assert!(e.contains("needs reasoning_content or tool_calls"), "{e}");
        // With tools offered, the numbering is still the client's.
        let tool = JsonValue::parse(r#"{"name": "w"}"#).unwrap();
        let e = deepseek_v32(&tool_first, &[tool], false).unwrap_err();
        assert!(e.starts_with("messages[1]:"), "{e}");
    }

    #[test]
    fn the_tools_section_is_deepseeks_text_line_for_line() {
        let tool = JsonValue::parse(r#"{"name": "now"}"#).unwrap();
        let prompt = deepseek_v32(&[msg("user", "x")], &[tool], false).unwrap();
        // Blank lines between its paragraphs, as DeepSeek's template has them.
        let lines: Vec<&str> = prompt.lines().collect();
        let blank: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].is_empty()).collect();
        assert_eq!(lines[2], "## Tools");
        assert_eq!(
            blank.iter().map(|&i| lines[i - 1]).collect::<Vec<_>>(),
            [
                "<｜begin▁of▁sentence｜>",
                "## Tools",
                "</｜DSML｜function_calls>",
                "String and scalar parameters should be specified as is without any escaping or \
                 quotes, while lists and objects should use JSON format. The \"string\" attribute \
                 should be set to \"true\" for string type parameters and \"false\" for other \
                 types (numbers, booleans, arrays, objects).",
                "If the thinking_mode is enabled, then after function results you should strongly \
                 consider outputting a thinking block. Here is an example:",
                "</｜DSML｜function_calls>",
                "</function_results>",
                "<think>...thinking about results</think>",
            ]
        );
        assert!(prompt.ends_with(
            "Here are the functions available in JSONSchema format:\n<functions>\n\
             {\"name\": \"now\"}\n</functions>\n<｜User｜>x<｜Assistant｜></think>"
        ));
    }

    #[test]
    fn a_developer_message_reads_as_a_user_turn() {
        let prompt = deepseek_v32(&[msg("developer", "Use metric units.")], &[], false).unwrap();
        assert_eq!(
            prompt,
            "<｜begin▁of▁sentence｜><｜User｜>\n\n# The user's message is: Use metric units.\
             <｜Assistant｜></think>"
        );
    }
}
