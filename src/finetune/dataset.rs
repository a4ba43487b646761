//! Training files (JSONL, one example a line) to token sequences with loss masks.
//!
//! Two formats, as OpenAI's fine-tuning API accepts them: chat (`{"messages": [...]}`,
//! rendered with the model's chat template, trained on assistant turns) and prompt/completion
//! (`{"prompt": ..., "completion": ...}`, trained on the completion and EOS). Every bad line is
//! reported with its number and a reason, so a user can fix a file in one pass.

mod record;
mod tokens;

use crate::model::chat_template::ChatTemplate;
use crate::model::tokenizer::Tokenizer;

use record::Record;
use tokens::Masked;

/// One training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingExample {
    /// Input token ids. Prompt/completion examples start with BOS when the tokenizer adds one;
    /// chat examples hold exactly what the chat template writes (its own BOS included), as
    /// chat requests are encoded at inference.
    pub tokens: Vec<u32>,
    /// Same length as `tokens`; `trained[i]`: token i is a loss target (predicted from
    /// position i-1). `trained[0]` is always false.
    pub trained: Vec<bool>,
    /// 1-based line number in the file.
    pub line: usize,
}

impl TrainingExample {
    /// How many tokens are loss targets.
    pub fn trained_tokens(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetOptions {
    /// Longest example, in tokens.
    pub max_len: usize,
    /// Cut longer examples at `max_len` instead of rejecting them.
    pub truncate: bool,
}

/// What is wrong with one line. `line` is 1-based; 0 stands for the file as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            0 => write!(f, "{}", self.reason),
            n => write!(f, "line {n}: {}", self.reason),
        }
    }
}

/// A training file that cannot be used, with the reasons.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", summarize(.errors, *.total_bad_lines))]
pub struct DatasetError {
    /// The first [`MAX_KEPT_ERRORS`] problems, in line order.
    pub errors: Vec<LineError>,
    /// Every bad line, including those beyond `errors`.
    pub total_bad_lines: usize,
}

/// Enough to fix a file by; a file with millions of bad lines should not cost memory.
pub const MAX_KEPT_ERRORS: usize = 100;
/// How many reasons the error message itself lists.
const SHOWN_ERRORS: usize = 3;

fn summarize(errors: &[LineError], total_bad_lines: usize) -> String {
    let shown: Vec<String> = errors.iter().take(SHOWN_ERRORS).map(ToString::to_string).collect();
    let listed = shown.join("; ");
    match total_bad_lines {
        0 => format!("invalid training file: {listed}"),
        1 => format!("invalid training file: 1 bad line: {listed}"),
        n if n > shown.len() => {
            format!("invalid training file: {n} bad lines: {listed}; and {} more", n - shown.len())
        }
        n => format!("invalid training file: {n} bad lines: {listed}"),
    }
}

/// Reads a JSONL training file. Blank lines are skipped; every other line must be a valid
/// example. Either all examples come back, or the reasons for every bad line.
pub fn parse_training_file(
    bytes: &[u8],
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    opts: &DatasetOptions,
) -> Result<Vec<TrainingExample>, DatasetError> {
    // Editors on Windows write a byte-order mark; it is not part of the first JSON text.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut examples = Vec::new();
    let mut errors = Vec::new();
    let mut total_bad_lines = 0;
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        match parse_line(raw, tokenizer, template, opts) {
            Ok(Some(masked)) => examples.push(TrainingExample {
                tokens: masked.tokens,
                trained: masked.trained,
                line,
            }),
            Ok(None) => {}
            Err(reason) => {
                total_bad_lines += 1;
                if errors.len() < MAX_KEPT_ERRORS {
                    errors.push(LineError { line, reason });
                }
            }
        }
    }
    if total_bad_lines > 0 {
        return Err(DatasetError { errors, total_bad_lines });
    }
    if examples.is_empty() {
        let reason = "the file has no training examples".to_string();
        return Err(DatasetError { errors: vec![LineError { line: 0, reason }], total_bad_lines });
    }
    Ok(examples)
}

/// One line to its example; `None` for a blank line.
fn parse_line(
    raw: &[u8],
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    opts: &DatasetOptions,
) -> Result<Option<Masked>, String> {
    let text = std::str::from_utf8(raw)
        .map_err(|e| format!("not valid UTF-8 (invalid byte at column {})", e.valid_up_to() + 1))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let masked = match record::parse_record(text)? {
        Record::Completion { prompt, completion } => {
            tokens::completion_tokens(tokenizer, &prompt, &completion)?
        }
        Record::Chat(messages) => {
            let template = template.ok_or_else(|| {
                "chat examples need a chat template, and this model has none; use prompt/completion examples"
                    .to_string()
            })?;
            tokens::chat_tokens(tokenizer, template, &messages)?
        }
    };
    fit(masked, opts).map(Some)
}

/// Applies the length limit and checks that something is left to learn.
fn fit(mut m: Masked, opts: &DatasetOptions) -> Result<Masked, String> {
    let len = m.tokens.len();
    if len > opts.max_len {
        if !opts.truncate {
            return Err(format!(
                "the example is {len} tokens long, more than the limit of {} tokens",
                opts.max_len
            ));
        }
        m.tokens.truncate(opts.max_len);
        m.trained.truncate(opts.max_len);
        if !m.trained.contains(&true) {
            return Err(format!(
                "the example is {len} tokens long and nothing to train on is left after \
                 truncating it to {} tokens",
                opts.max_len
            ));
        }
    }
    if !m.trained.contains(&true) {
        return Err("the example has no tokens to train on".to_string());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::testing::tiny_gpt2;

    const OPTS: DatasetOptions = DatasetOptions { max_len: 64, truncate: false };

    fn parse(text: &[u8], opts: &DatasetOptions) -> Result<Vec<TrainingExample>, DatasetError> {
        parse_training_file(text, &tiny_gpt2(), None, opts)
    }

    #[test]
    fn blank_lines_crlf_and_bom_are_accepted() {
        let file = b"\xEF\xBB\xBF{\"prompt\": \"a\", \"completion\": \"b\"}\r\n\n  \t\r\n{\"prompt\": \"c\", \"completion\": \"d\"}";
        let ex = parse(file, &OPTS).expect("valid");
        assert_eq!(ex.iter().map(|e| e.line).collect::<Vec<_>>(), [1, 4]);
        assert_eq!(ex[0].tokens.len(), 3);
        assert_eq!(ex[0].trained, [false, true, true]);
        assert_eq!(ex[0].trained_tokens(), 2);
    }

    #[test]
    fn empty_and_blank_files_are_errors() {
        for file in [&b""[..], b"\n\n  \n"] {
            let e = parse(file, &OPTS).expect_err("empty");
            assert_eq!(e.total_bad_lines, 0);
            assert_eq!(e.to_string(), "invalid training file: the file has no training examples");
        }
    }

    #[test]
    fn errors_are_capped_but_counted() {
        let file = "x\n".repeat(MAX_KEPT_ERRORS + 5);
        let e = parse(file.as_bytes(), &OPTS).expect_err("bad");
        assert_eq!(e.total_bad_lines, MAX_KEPT_ERRORS + 5);
        assert_eq!(e.errors.len(), MAX_KEPT_ERRORS);
        assert_eq!(e.errors[99].line, 100);
        let msg = e.to_string();
        assert!(
            msg.starts_with("invalid training file: 105 bad lines: line 1: not valid JSON"),
            "{msg}"
        );
        assert!(msg.ends_with("; and 102 more"), "{msg}");
    }

    #[test]
    fn length_limit_and_truncation() {
        let line = br#"{"prompt": "abcd", "completion": "ef"}"#; // 4 + 2 + EOS
        let e = parse(line, &DatasetOptions { max_len: 6, truncate: false }).expect_err("long");
        assert!(e.errors[0].reason.contains("7 tokens long, more than the limit of 6"), "{e}");
        let ex = parse(line, &DatasetOptions { max_len: 6, truncate: true }).expect("cut");
        assert_eq!(ex[0].trained, [false, false, false, false, true, true]);
        let e = parse(line, &DatasetOptions { max_len: 4, truncate: true }).expect_err("nothing");
        assert!(e.errors[0].reason.contains("nothing to train on is left"), "{e}");
        let ex = parse(line, &DatasetOptions { max_len: 7, truncate: false }).expect("fits");
        assert_eq!(ex[0].tokens.len(), 7);
    }
}
