//! One line of a training file, checked field by field into a [`Record`].
//!
//! Lines are parsed as untyped JSON first and checked by hand so that every problem gets a
//! reason a person can act on ("messages[2] has unknown role ...") instead of a serde message.

use serde_json::{Map, Value};

/// A line that passed the structural checks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record {
    Chat(Vec<Message>),
    Completion { prompt: String, completion: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Message {
    pub role: Role,
    pub content: String,
    /// Whether this turn is a loss target (assistant turns with weight 1).
    pub trained: bool,
}

/// Top-level fields OpenAI accepts for function-calling examples, which we cannot train yet.
const UNSUPPORTED_TOP: [&str; 3] = ["tools", "functions", "parallel_tool_calls"];
/// Message fields of tool and function calls.
const UNSUPPORTED_MESSAGE: [&str; 4] = ["tool_calls", "function_call", "tool_call_id", "refusal"];

/// Checks one non-blank line.
pub(crate) fn parse_record(text: &str) -> Result<Record, String> {
    let value: Value = serde_json::from_str(text).map_err(json_reason)?;
    let Value::Object(obj) = value else {
        return Err(format!("expected a JSON object, found {}", kind(&value)));
    };
    for key in obj.keys() {
        if UNSUPPORTED_TOP.contains(&key.as_str()) {
            return Err(format!(
                "`{key}` is not supported: function-calling examples cannot be trained yet"
            ));
        }
        if !matches!(key.as_str(), "messages" | "prompt" | "completion") {
            return Err(format!(
                "unknown field `{key}` (expected `messages`, or `prompt` and `completion`)"
            ));
        }
    }
    let has = |k: &str| obj.contains_key(k);
    match (has("messages"), has("prompt"), has("completion")) {
        (true, false, false) => parse_messages(&obj["messages"]).map(Record::Chat),
        (true, _, _) => {
            Err("has both `messages` and `prompt`/`completion`; use one format per line"
                .to_string())
        }
        (false, true, true) => Ok(Record::Completion {
            prompt: string_field(&obj, "prompt")?,
            completion: string_field(&obj, "completion")?,
        }),
        (false, true, false) => Err("has `prompt` but no `completion`".to_string()),
        (false, false, true) => Err("has `completion` but no `prompt`".to_string()),
        (false, false, false) => {
            Err("missing `messages` (chat format) or `prompt` and `completion`".to_string())
        }
    }
}

fn string_field(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match &obj[key] {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("`{key}` must be a string, found {}", kind(other))),
    }
}

fn parse_messages(value: &Value) -> Result<Vec<Message>, String> {
    let Value::Array(items) = value else {
        return Err(format!("`messages` must be an array, found {}", kind(value)));
    };
    if items.is_empty() {
        return Err("`messages` is empty".to_string());
    }
    let messages = items
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err("no assistant message to learn from".to_string());
    }
    if !messages.iter().any(|m| m.trained) {
        return Err("every assistant message has weight 0, so nothing would be trained".to_string());
    }
    Ok(messages)
}

fn parse_message(i: usize, value: &Value) -> Result<Message, String> {
    let Value::Object(obj) = value else {
        return Err(format!("messages[{i}] must be an object, found {}", kind(value)));
    };
    for key in obj.keys() {
        if UNSUPPORTED_MESSAGE.contains(&key.as_str()) {
            return Err(format!(
                "messages[{i}]: `{key}` is not supported: tool and function calls cannot be trained yet"
            ));
        }
        if !matches!(key.as_str(), "role" | "content" | "weight" | "name") {
            return Err(format!(
                "messages[{i}] has unknown field `{key}` (expected role, content, weight, name)"
            ));
        }
    }
    let role = match obj.get("role") {
        None => return Err(format!("messages[{i}] has no `role`")),
        Some(Value::String(r)) => match r.as_str() {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" | "function" => {
                return Err(format!(
                    "messages[{i}] has role \"{r}\", which is not supported: tool and function calls cannot be trained yet"
                ))
            }
            _ => {
                return Err(format!(
                    "messages[{i}] has unknown role \"{r}\" (expected system, user or assistant)"
                ))
            }
        },
        Some(other) => {
            return Err(format!("messages[{i}].role must be a string, found {}", kind(other)))
        }
    };
    let content = match obj.get("content") {
        None => return Err(format!("messages[{i}] has no `content`")),
        Some(Value::String(s)) => s.clone(),
        // OpenAI allows null only beside tool calls, which are rejected above.
        Some(Value::Null) => {
            return Err(format!(
                "messages[{i}].content is null (only assistant tool calls may omit content, and they are not supported)"
            ))
        }
        Some(other) => {
            return Err(format!("messages[{i}].content must be a string, found {}", kind(other)))
        }
    };
    if let Some(name) = obj.get("name") {
        if !name.is_string() {
            return Err(format!("messages[{i}].name must be a string, found {}", kind(name)));
        }
    }
    let trained = match obj.get("weight") {
        None => role == Role::Assistant,
        Some(_) if role != Role::Assistant => {
            return Err(format!(
                "messages[{i}] has a `weight`, but only assistant messages can have one"
            ))
        }
        Some(w) => match w.as_u64() {
            Some(0) => false,
            Some(1) => true,
            _ => return Err(format!("messages[{i}].weight must be 0 or 1, found {w}")),
        },
    };
    Ok(Message { role, content, trained })
}

/// serde_json's message without its "at line 1 column N" (a line is one JSON text).
fn json_reason(e: serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let what = full.strip_suffix(&suffix).unwrap_or(&full);
    if e.column() > 0 {
        format!("not valid JSON: {what} at column {}", e.column())
    } else {
        format!("not valid JSON: {what}")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
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
    use super::*;

    fn reason(line: &str) -> String {
        match parse_record(line) {
            Err(r) => r,
            Ok(r) => panic!("{line} parsed as {r:?}"),
        }
    }

    #[test]
    fn both_formats_parse() {
        let chat = r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u", "name": "bob"},
            {"role": "assistant", "content": "a0", "weight": 0}, {"role": "assistant", "content": "a1"}]}"#;
        let Ok(Record::Chat(m)) = parse_record(chat) else { panic!("chat") };
        assert_eq!(m.len(), 4);
        assert_eq!(m.iter().map(|m| m.trained).collect::<Vec<_>>(), [false, false, false, true]);
        assert_eq!(m[3].content, "a1");
        assert_eq!(
            parse_record(r#"{"prompt": "p", "completion": ""}"#),
            Ok(Record::Completion { prompt: "p".into(), completion: String::new() })
        );
    }

    #[test]
    fn reasons_are_readable() {
        let cases = [
            ("{\"messages\": [", "not valid JSON: EOF while parsing a list at column 14"),
            ("[1]", "expected a JSON object, found an array"),
            (r#"{"prompt": 1, "completion": "c"}"#, "`prompt` must be a string, found a number"),
            (
                r#"{"messages": [{"role": "assistant", "content": "a", "weight": true}]}"#,
                "weight must be 0 or 1, found true",
            ),
            (
                r#"{"messages": [{"role": "assistant", "content": "a", "weight": 0.5}]}"#,
                "weight must be 0 or 1, found 0.5",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a", "name": 3}]}"#,
                "name must be a string",
            ),
            (r#"{"messages": [{"role": 3, "content": "a"}]}"#, "role must be a string"),
            (r#"{"messages": [{"role": "tool", "content": "a"}]}"#, "not supported"),
            (
                r#"{"messages": [{"role": "assistant", "tool_calls": []}]}"#,
                "`tool_calls` is not supported",
            ),
        ];
        for (line, want) in cases {
            let r = reason(line);
            assert!(r.contains(want), "{line}: {r}");
        }
    }
}
