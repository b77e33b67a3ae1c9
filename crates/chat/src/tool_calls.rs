//! Tool calls in DeepSeek-V3/R1 output:
//!
//! ```text
//! <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
//! ```json
//! ARGUMENTS
//! ```<｜tool▁call▁end｜>
//! <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>
//! ```
//!
//! The markers are single, non-special added tokens, so they survive `skip_special_tokens` and an
//! [`crate::IncrementalDecoder`] delta holds a marker whole or not at all: a streaming server can
//! pass content through until a delta contains [`TOOL_CALLS_BEGIN`], then buffer and parse at the end.
//! The later form `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>` is accepted too.

pub const TOOL_CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
pub const TOOL_CALLS_END: &str = "<｜tool▁calls▁end｜>";
pub const TOOL_CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
pub const TOOL_CALL_END: &str = "<｜tool▁call▁end｜>";
pub const TOOL_SEP: &str = "<｜tool▁sep｜>";

/// One call: the function's name and its arguments as the model wrote them (a JSON text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    /// The call's type, `"function"` in practice.
    pub kind: String,
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolCallParse {
    /// Text outside the call block (before it, and any after it); `None` when there is none.
    pub content: Option<String>,
    pub calls: Vec<ParsedToolCall>,
    /// False when the block was cut off or malformed: `calls` then holds the calls completed before.
    pub complete: bool,
}

/// Parses a whole reply (its content part, after reasoning was split off).
pub fn parse_tool_calls(text: &str) -> ToolCallParse {
    let Some(begin) = text.find(TOOL_CALLS_BEGIN) else {
        return ToolCallParse {
            content: non_empty(text.to_owned()),
            calls: Vec::new(),
            complete: true,
        };
    };
    let mut content = text[..begin].trim_end().to_owned();
    let mut rest = &text[begin + TOOL_CALLS_BEGIN.len()..];
    let mut calls = Vec::new();
    let mut complete = false;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix(TOOL_CALL_BEGIN) {
            let Some(end) = after.find(TOOL_CALL_END) else {
                break;
            };
            match parse_call(&after[..end]) {
                Some(call) => calls.push(call),
                None => break,
            }
            rest = &after[end + TOOL_CALL_END.len()..];
        } else if let Some(after) = rest.strip_prefix(TOOL_CALLS_END) {
            complete = true;
            let trailing = after.trim();
            if !trailing.is_empty() {
                if !content.is_empty() {
                    content.push('\n');
                }
                content.push_str(trailing);
            }
            break;
        } else {
            break;
        }
    }
    ToolCallParse {
        content: non_empty(content),
        calls,
        complete,
    }
}

fn parse_call(inner: &str) -> Option<ParsedToolCall> {
    let (head, body) = inner.split_once(TOOL_SEP)?;
    let head = head.trim();
    // V3/R1: TYPE<sep>NAME\n```json\nARGS\n```
    if let Some((name, block)) = body.split_once('\n') {
        let block = block.trim();
        if let Some(fenced) = block.strip_prefix("```") {
            let fenced = fenced.strip_suffix("```").unwrap_or(fenced);
            // Drop the fence's language tag (`json`).
            let arguments = match fenced.split_once('\n') {
                Some((tag, args)) if !tag.trim_start().starts_with(['{', '[']) => args,
                _ => fenced,
            };
            return Some(ParsedToolCall {
                kind: head.to_owned(),
                name: name.trim().to_owned(),
                arguments: default_arguments(arguments.trim()),
            });
        }
    }
    if head.is_empty() {
        return None;
    }
    if head == "function" && !body.trim_start().starts_with(['{', '[']) {
        // TYPE<sep>NAME with no arguments.
        return Some(ParsedToolCall {
            kind: head.to_owned(),
            name: body.trim().to_owned(),
            arguments: "{}".to_owned(),
        });
    }
    // Later form: NAME<sep>ARGS
    Some(ParsedToolCall {
        kind: "function".to_owned(),
        name: head.to_owned(),
        arguments: default_arguments(body.trim()),
    })
}

fn default_arguments(arguments: &str) -> String {
    if arguments.is_empty() {
        "{}".to_owned()
    } else {
        arguments.to_owned()
    }
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> String {
        format!("{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{args}\n```{TOOL_CALL_END}")
    }

    #[test]
    fn parses_v3_calls() {
        let text = format!(
            "Let me check.{TOOL_CALLS_BEGIN}{}\n{}{TOOL_CALLS_END}",
            call("get_weather", r#"{"city": "Paris"}"#),
            call("get_time", "{}")
        );
        let parsed = parse_tool_calls(&text);
        assert!(parsed.complete);
        assert_eq!(parsed.content.as_deref(), Some("Let me check."));
        assert_eq!(parsed.calls.len(), 2);
        assert_eq!(parsed.calls[0].name, "get_weather");
        assert_eq!(parsed.calls[0].arguments, r#"{"city": "Paris"}"#);
        assert_eq!(parsed.calls[0].kind, "function");
        assert_eq!(parsed.calls[1].name, "get_time");
    }

    #[test]
    fn no_calls_is_all_content() {
        let parsed = parse_tool_calls("just text");
        assert_eq!(parsed.content.as_deref(), Some("just text"));
        assert!(parsed.calls.is_empty() && parsed.complete);
    }

    #[test]
    fn cut_off_block_keeps_finished_calls() {
        let text = format!(
            "{TOOL_CALLS_BEGIN}{}{TOOL_CALL_BEGIN}function{TOOL_SEP}f\n```json\n{{\"a\"",
            call("g", "{}")
        );
        let parsed = parse_tool_calls(&text);
        assert!(!parsed.complete);
        assert_eq!(parsed.content, None);
        assert_eq!(parsed.calls.len(), 1);
    }

    #[test]
    fn later_form() {
        let text = format!("{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}f{TOOL_SEP}{{\"x\": 1}}{TOOL_CALL_END}{TOOL_CALLS_END}");
        let parsed = parse_tool_calls(&text);
        assert_eq!(parsed.calls[0].name, "f");
        assert_eq!(parsed.calls[0].arguments, "{\"x\": 1}");
    }

    #[test]
    fn garbage_never_panics() {
        let pieces = [
            TOOL_CALLS_BEGIN,
            TOOL_CALLS_END,
            TOOL_CALL_BEGIN,
            TOOL_CALL_END,
            TOOL_SEP,
            "\n",
            "```",
            "é",
            "{",
        ];
        let mut state = 12345u64;
        for _ in 0..2000 {
            let mut text = String::new();
            for _ in 0..(state % 12) {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                text.push_str(pieces[(state >> 33) as usize % pieces.len()]);
            }
            let _ = parse_tool_calls(&text);
        }
    }
}
