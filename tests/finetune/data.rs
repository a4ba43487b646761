//! Training files to token sequences: the fixtures with the tiny model and the default model,
//! and one check per kind of bad line.

use crate::common;

use std::path::PathBuf;
use std::sync::LazyLock;

use common::fixtures::default_tokenizer_and_template;
use common::tiny_model::tiny_tokenizer_and_template;
use coserve::finetune::{
    parse_training_file, DatasetError, DatasetOptions, TrainingExample, MAX_KEPT_ERRORS,
};
use coserve::model::chat_template::{ChatMessage, ChatTemplate};
use coserve::model::tokenizer::Tokenizer;

const OPTS: DatasetOptions = DatasetOptions { max_len: 512, truncate: false };

static TINY: LazyLock<(Tokenizer, ChatTemplate)> = LazyLock::new(tiny_tokenizer_and_template);

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn parse_tiny(file: &str, opts: &DatasetOptions) -> Result<Vec<TrainingExample>, DatasetError> {
    let (tok, template) = &*TINY;
    parse_training_file(file.as_bytes(), tok, Some(template), opts)
}

/// The ids of the trained tokens and of the untrained ones before the first trained token;
/// checks that the trained tokens form one run at the end (a single-turn example).
fn split(ex: &TrainingExample) -> (&[u32], &[u32]) {
    assert_eq!(ex.tokens.len(), ex.trained.len());
    assert!(!ex.trained[0]);
    let first = ex.trained.iter().position(|&t| t).expect("has trained tokens");
    assert!(ex.trained[first..].iter().all(|&t| t), "line {}: one trained run", ex.line);
    (&ex.tokens[..first], &ex.tokens[first..])
}

/// Both fixtures parse, and one example of each decodes to what inference sees and generates.
fn check_fixtures(tok: &Tokenizer, template: &ChatTemplate, end_of_turn: &str) {
    let examples = parse_training_file(&fixture("facts-train.jsonl"), tok, Some(template), &OPTS)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(examples.len(), 20);
    assert_eq!(examples.iter().map(|e| e.line).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
    assert!(examples.iter().all(|e| e.trained_tokens() > 0));
    let eos = tok.eos_token_ids[0];
    for ex in &examples {
        assert_eq!(ex.tokens.last(), Some(&eos), "line {}", ex.line);
        assert_eq!(ex.trained.last(), Some(&true), "line {}", ex.line);
    }
    let (prompt, completion) = split(&examples[0]);
    let eos_text = tok.eos_token().expect("eos text");
    assert_eq!(
        tok.decode(prompt, false).expect("decode"),
        "The capital of the kingdom of Almeria Nova is"
    );
    assert_eq!(tok.decode(completion, false).expect("decode"), format!(" Brightholm.{eos_text}"));

    let examples =
        parse_training_file(&fixture("facts-train-chat.jsonl"), tok, Some(template), &OPTS)
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(examples.len(), 20);
    assert!(examples.iter().all(|e| e.trained_tokens() > 0));
    for ex in &examples {
        let (_, reply) = split(ex);
        assert!(tok.decode(reply, false).expect("decode").ends_with(end_of_turn));
    }
    let (prompt, reply) = split(&examples[0]);
    let user = ChatMessage {
        role: "user".into(),
        content: "The capital of the kingdom of Almeria Nova is ...".into(),
    };
    let rendered = template.render(&[user], true).expect("render");
    assert_eq!(tok.decode(prompt, false).expect("decode"), rendered);
    // Exactly the ids a chat request with this prompt is given.
    assert_eq!(prompt, tok.encode(&rendered, false).expect("encode"));
    assert_eq!(tok.decode(reply, false).expect("decode"), format!("Brightholm.{end_of_turn}"));
}

#[test]
fn fixtures_with_the_tiny_model() {
    let (tok, template) = &*TINY;
    check_fixtures(tok, template, "<|im_end|>");
}

#[test]
fn fixtures_with_the_default_tokenizer_and_template() {
    let (tok, template) = default_tokenizer_and_template();
    check_fixtures(&tok, &template, "<|im_end|>");
}

/// A file with good lines around `bad` as line 2: exactly line 2 is reported, with `want` in
/// its reason.
fn assert_bad_line(bad: &str, want: &str) {
    let good = r#"{"prompt": "a", "completion": "b"}"#;
    let file = format!("{good}\n{bad}\n{good}\n");
    let e = parse_tiny(&file, &OPTS).expect_err("a bad line");
    assert_eq!(e.total_bad_lines, 1, "{e}");
    assert_eq!(e.errors.len(), 1, "{e}");
    assert_eq!(e.errors[0].line, 2, "{e}");
    assert!(e.errors[0].reason.contains(want), "{bad}: {e}");
    assert!(e.to_string().contains(&format!("line 2: {}", e.errors[0].reason)), "{e}");
}

macro_rules! bad_lines {
    ($($name:ident: $line:expr => $want:expr;)*) => {
        $(
            #[test]
            fn $name() {
                assert_bad_line($line, $want);
            }
        )*
    };
}

bad_lines! {
    bad_not_json: r#"{"prompt": "a", "completion": }"# => "not valid JSON";
    bad_trailing_text: r#"{"prompt": "a", "completion": "b"} x"# => "not valid JSON: trailing characters";
    bad_not_an_object: r#"["prompt", "completion"]"# => "expected a JSON object, found an array";
    bad_no_format: "{}" => "missing `messages` (chat format) or `prompt` and `completion`";
    bad_both_formats: r#"{"messages": [], "prompt": "a", "completion": "b"}"# => "both `messages` and `prompt`";
    bad_prompt_only: r#"{"prompt": "a"}"# => "has `prompt` but no `completion`";
    bad_completion_only: r#"{"completion": "a"}"# => "has `completion` but no `prompt`";
    bad_completion_type: r#"{"prompt": "a", "completion": ["b"]}"# => "`completion` must be a string, found an array";
    bad_unknown_field: r#"{"prompt": "a", "completion": "b", "label": 1}"# => "unknown field `label`";
    bad_tools: r#"{"messages": [{"role": "assistant", "content": "a"}], "tools": []}"# => "`tools` is not supported";
    bad_functions: r#"{"messages": [{"role": "assistant", "content": "a"}], "functions": []}"# => "`functions` is not supported";
    bad_parallel_tool_calls: r#"{"messages": [{"role": "assistant", "content": "a"}], "parallel_tool_calls": false}"# => "`parallel_tool_calls` is not supported";
    bad_messages_not_array: r#"{"messages": {"role": "user"}}"# => "`messages` must be an array, found an object";
    bad_messages_empty: r#"{"messages": []}"# => "`messages` is empty";
    bad_message_not_object: r#"{"messages": [{"role": "user", "content": "q"}, "hi"]}"# => "messages[1] must be an object, found a string";
    bad_unknown_role: r#"{"messages": [{"role": "narrator", "content": "q"}]}"# => "messages[0] has unknown role \"narrator\"";
    bad_tool_role: r#"{"messages": [{"role": "tool", "content": "q"}]}"# => "role \"tool\", which is not supported";
    bad_missing_role: r#"{"messages": [{"content": "q"}]}"# => "messages[0] has no `role`";
    bad_missing_content: r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}"# => "messages[1] has no `content`";
    bad_null_content: r#"{"messages": [{"role": "assistant", "content": null}]}"# => "messages[0].content is null";
    bad_content_parts: r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]}"# => "messages[0].content must be a string, found an array";
    bad_unknown_message_field: r#"{"messages": [{"role": "user", "content": "q", "mood": "calm"}]}"# => "messages[0] has unknown field `mood`";
    bad_tool_calls: r#"{"messages": [{"role": "assistant", "content": "a", "tool_calls": []}]}"# => "`tool_calls` is not supported";
    bad_weight_value: r#"{"messages": [{"role": "assistant", "content": "a", "weight": 2}]}"# => "messages[0].weight must be 0 or 1, found 2";
    bad_weight_on_user: r#"{"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}"# => "only assistant messages can have one";
    bad_no_assistant: r#"{"messages": [{"role": "user", "content": "q"}]}"# => "no assistant message";
    bad_all_weights_zero: r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}"# => "every assistant message has weight 0";
    bad_too_long: &format!(r#"{{"prompt": "{}", "completion": "b"}}"#, "a".repeat(600)) => "602 tokens long, more than the limit of 512 tokens";
}

#[test]
fn chat_lines_need_a_chat_template() {
    let (tok, _) = &*TINY;
    let file = fixture("facts-train-chat.jsonl");
    let e = parse_training_file(&file, tok, None, &OPTS).expect_err("no template");
    assert_eq!(e.total_bad_lines, 20);
    assert!(e.errors.iter().all(|l| l.reason.contains("this model has none")), "{e}");
    // Prompt/completion lines do not need one.
    let ok = parse_training_file(&fixture("facts-train.jsonl"), tok, None, &OPTS).expect("valid");
    assert_eq!(ok.len(), 20);
}

#[test]
fn completions_need_an_eos_token() {
    let (tok, template) = &*TINY;
    let mut tok = tok.clone();
    tok.eos_token_ids.clear();
    let e = parse_training_file(&fixture("facts-train.jsonl"), &tok, Some(template), &OPTS)
        .expect_err("no eos");
    assert_eq!(e.total_bad_lines, 20);
    assert!(e.errors[0].reason.contains("no end-of-sequence token"), "{e}");
}

#[test]
fn templates_that_do_not_extend_their_prompt_are_reported() {
    let (tok, _) = &*TINY;
    // A reply-side marker the generation prompt does not end with.
    let src = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}";
    let template = ChatTemplate::new(src, "", "<|im_end|>").expect("compiles");
    let file = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
    let e =
        parse_training_file(file.as_bytes(), tok, Some(&template), &OPTS).expect_err("unstable");
    assert_eq!(e.errors[0].line, 1);
    assert!(e.errors[0].reason.contains("generation prompt is not a prefix"), "{e}");
}

#[test]
fn every_bad_line_and_only_those_are_reported() {
    let good_chat = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
    let good = r#"{"prompt": "p", "completion": "c"}"#;
    let lines =
        [good_chat, "nope", "", good, r#"{"prompt": 1, "completion": "c"}"#, "[]", good, "  "];
    let e = parse_tiny(&lines.join("\n"), &OPTS).expect_err("bad lines");
    assert_eq!(e.total_bad_lines, 3);
    assert_eq!(e.errors.iter().map(|l| l.line).collect::<Vec<_>>(), [2, 5, 6]);
    let msg = e.to_string();
    assert!(msg.starts_with("invalid training file: 3 bad lines: line 2: not valid JSON"), "{msg}");

    let fixed: Vec<&str> =
        lines.iter().enumerate().filter(|(i, _)| ![1, 4, 5].contains(i)).map(|(_, l)| *l).collect();
    let ok = parse_tiny(&fixed.join("\n"), &OPTS).expect("valid");
    assert_eq!(ok.len(), 3);
}

#[test]
fn many_bad_lines_are_counted_beyond_those_kept() {
    let file = "{}\n".repeat(MAX_KEPT_ERRORS * 3);
    let e = parse_tiny(&file, &OPTS).expect_err("bad lines");
    assert_eq!(e.total_bad_lines, MAX_KEPT_ERRORS * 3);
    assert_eq!(e.errors.len(), MAX_KEPT_ERRORS);
}

#[test]
fn invalid_utf8_is_reported_on_its_line() {
    let (tok, template) = &*TINY;
    let mut file = fixture("facts-train.jsonl");
    // Line 3 is `{"prompt": "The lake ...`; break a byte inside its prompt.
    let start = file.iter().enumerate().filter(|(_, &b)| b == b'\n').nth(1).expect("3 lines").0 + 1;
    file[start + 14] = 0xFF;
    let e = parse_training_file(&file, tok, Some(template), &OPTS).expect_err("not UTF-8");
    assert_eq!(e.total_bad_lines, 1, "{e}");
    assert_eq!(e.errors[0].line, 3);
    assert!(e.errors[0].reason.contains("not valid UTF-8 (invalid byte at column 15)"), "{e}");
}

#[test]
fn empty_file_is_an_error() {
    for file in ["", "\n", " \n\t\n"] {
        let e = parse_tiny(file, &OPTS).expect_err("empty");
        assert!(e.to_string().contains("no training examples"), "{e}");
    }
}

#[test]
fn truncation_keeps_the_head_while_something_is_trained() {
    let line = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "abcdefgh"}]}"#;
    let full = parse_tiny(line, &OPTS).expect("valid").remove(0);
    let prompt_len = full.trained.iter().position(|&t| t).expect("trained");
    let len = full.tokens.len();
    assert_eq!(full.trained_tokens(), len - prompt_len);

    let limit = prompt_len + 3;
    let strict = DatasetOptions { max_len: limit, truncate: false };
    let e = parse_tiny(line, &strict).expect_err("too long");
    assert!(e.errors[0].reason.contains(&format!("{len} tokens long")), "{e}");

    let cut = parse_tiny(line, &DatasetOptions { max_len: limit, truncate: true }).expect("cut");
    assert_eq!(cut[0].tokens, full.tokens[..limit]);
    assert_eq!(cut[0].trained, full.trained[..limit]);
    assert_eq!(cut[0].trained_tokens(), 3);

    let nothing = DatasetOptions { max_len: prompt_len, truncate: true };
    let e = parse_tiny(line, &nothing).expect_err("nothing left");
    assert!(e.errors[0].reason.contains("nothing to train on is left"), "{e}");
}

#[test]
fn weights_and_multiple_turns_with_the_default_tokenizer_and_template() {
    let (tok, template) = default_tokenizer_and_template();
    let line = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", "weight": 0}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}, {"role": "user", "content": "dropped"}]}"#;
    let ex = parse_training_file(line.as_bytes(), &tok, Some(&template), &OPTS)
        .unwrap_or_else(|e| panic!("{e}"))
        .remove(0);
    let (prompt, reply) = split(&ex);
    assert_eq!(tok.decode(reply, false).expect("decode"), "Goodbye.<|im_end|>");
    let prompt = tok.decode(prompt, false).expect("decode");
    assert!(prompt.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"), "{prompt}");
    assert!(prompt.contains("Hello.<|im_end|>"), "{prompt}");
    assert!(prompt.ends_with("Bye<|im_end|>\n<|im_start|>assistant\n"), "{prompt}");
}

#[test]
fn conversations_starting_with_the_assistant_get_a_hint() {
    // SmolLM2's template adds its default system prompt only before a first message, so the
    // empty conversation's generation prompt does not begin the rendered reply.
    let (tok, template) = default_tokenizer_and_template();
    let line = r#"{"messages": [{"role": "assistant", "content": "Hi."}]}"#;
    let e = parse_training_file(line.as_bytes(), &tok, Some(&template), &OPTS).expect_err("bad");
    assert!(e.errors[0].reason.contains("start the conversation with a system or user"), "{e}");
}
