//! The problems file of `r1serve eval`: JSONL, read strictly, so that a typo in a hand-written
//! line is reported with its line number rather than silently scoring zero.

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::Value;

/// One line of the problems file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// 1-based line number, for messages.
    pub line: usize,
    pub prompt: String,
    pub answer: i64,
    pub kind: Option<String>,
    /// The reference's greedy reply, without the end-of-sequence token.
    pub reply_token_ids: Option<Vec<u32>>,
    /// The reference's parsed answer (`Some(None)`: it found none).
    pub parsed: Option<Option<i64>>,
}

/// Reads `path` (blank lines skipped), the first `limit` problems if given.
pub fn read_problems(path: &Path, limit: Option<usize>) -> anyhow::Result<Vec<Problem>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if limit.is_some_and(|limit| problems.len() >= limit) {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let problem = parse_line(i + 1, line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
        problems.push(problem);
    }
    if problems.is_empty() {
        bail!("{} holds no problems", path.display());
    }
    Ok(problems)
}

fn parse_line(line: usize, text: &str) -> Result<Problem, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(object) = value else {
        return Err(format!("expected a JSON object, got {}", kind_of(&value)));
    };
    let field = |key: &str| object.get(key);
    let prompt = match field("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(format!("`prompt` must be a string, got {}", kind_of(other))),
        None => return Err("missing `prompt` (the user message)".into()),
    };
    let answer = match field("answer") {
        Some(v) => v
            .as_i64()
            .ok_or_else(|| format!("`answer` must be an integer, got {v}"))?,
        None => return Err("missing `answer` (an integer)".into()),
    };
    let kind = match field("kind") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(format!("`kind` must be a string, got {}", kind_of(other))),
    };
    let reply_token_ids = match field("reply_token_ids") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_u64()
                        .and_then(|id| u32::try_from(id).ok())
                        .ok_or_else(|| format!("`reply_token_ids[{i}]` must be a token id (an integer ≥ 0), got {v}"))
                })
                .collect::<Result<Vec<u32>, String>>()?,
        ),
        Some(other) => {
            return Err(format!(
                "`reply_token_ids` must be an array of token ids, got {}",
                kind_of(other)
            ))
        }
    };
    let parsed = match field("parsed") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => {
            Some(Some(v.as_i64().ok_or_else(|| {
                format!("`parsed` must be an integer or null, got {v}")
            })?))
        }
    };
    Ok(Problem {
        line,
        prompt,
        answer,
        kind,
        reply_token_ids,
        parsed,
    })
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::parse_line;

    #[test]
    fn reads_a_reference_line() {
        let p = parse_line(
            3,
            r#"{"kind": "add", "prompt": "1+2=?", "answer": 3, "reply_token_ids": [5, 6], "parsed": null, "reply": "x"}"#,
        )
        .unwrap();
        assert_eq!((p.line, p.answer, p.kind.as_deref()), (3, 3, Some("add")));
        assert_eq!(p.reply_token_ids, Some(vec![5, 6]));
        assert_eq!(p.parsed, Some(None));
        let bare = parse_line(1, r#"{"prompt": "hi", "answer": -4}"#).unwrap();
        assert_eq!((bare.reply_token_ids, bare.parsed), (None, None));
    }

    #[test]
    fn names_what_is_wrong() {
        let cases = [
            ("{", "not valid JSON"),
            ("[1]", "expected a JSON object, got an array"),
            (r#"{"answer": 1}"#, "missing `prompt`"),
            (r#"{"prompt": 5, "answer": 1}"#, "`prompt` must be a string"),
            (r#"{"prompt": "x"}"#, "missing `answer`"),
            (r#"{"prompt": "x", "answer": "3"}"#, "`answer` must be an integer"),
            (r#"{"prompt": "x", "answer": 2.5}"#, "`answer` must be an integer"),
            (
                r#"{"prompt": "x", "answer": 1, "reply_token_ids": [1, -2]}"#,
                "`reply_token_ids[1]`",
            ),
            (
                r#"{"prompt": "x", "answer": 1, "reply_token_ids": 7}"#,
                "`reply_token_ids` must be an array",
            ),
            (
                r#"{"prompt": "x", "answer": 1, "parsed": "7"}"#,
                "`parsed` must be an integer or null",
            ),
            (r#"{"prompt": "x", "answer": 1, "kind": 1}"#, "`kind` must be a string"),
        ];
        for (line, needle) in cases {
            let error = parse_line(1, line).unwrap_err();
            assert!(error.contains(needle), "{line}: {error}");
        }
    }
}
