//! POST /v1/chat/completions over real HTTP against the tiny random model (ChatML template,
//! byte-level tokenizer whose special tokens are single ids).

use crate::common;
use crate::support;

use std::sync::OnceLock;

use serde_json::{json, Value};

use common::server::TestServer;
use support::{assert_schema, client, sse_chunks};

struct Shared {
    base: String,
    model: String,
    max_model_len: u64,
}

/// One server for the tests here that do not need their own.
fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        support::on_background_runtime(|| async {
            let server = TestServer::start_tiny(|c| c.kv_cache_memory = 64 << 20).await;
            let model: Value = client()
                .get(server.url(&format!("/v1/models/{}", server.model_id())))
                .send()
                .await
                .expect("GET model")
                .json()
                .await
                .expect("model JSON");
            let shared = Shared {
                base: server.base_url().to_string(),
                model: server.model_id().to_string(),
                max_model_len: model["max_model_len"].as_u64().expect("max_model_len"),
            };
            // Keep it serving for the rest of the process.
            std::mem::forget(server);
            shared
        })
    })
}

async fn post(body: Value) -> reqwest::Response {
    let s = shared();
    client()
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&body)
        .send()
        .await
        .expect("request")
}

async fn chat(mut body: Value) -> Value {
    body["model"] = json!(shared().model);
    let r = post(body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("JSON");
    assert_schema(&v, "CreateChatCompletionResponse");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    v
}

async fn stream(mut body: Value) -> Vec<Value> {
    body["model"] = json!(shared().model);
    body["stream"] = json!(true);
    let chunks = sse_chunks(post(body).await).await;
    for c in &chunks {
        assert_schema(c, "CreateChatCompletionStreamResponse");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"], "one id per stream");
    }
    chunks
}

fn messages() -> Value {
    json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
}

/// Tokens of the ChatML rendering with the generation prompt: one id per special token,
/// one per byte otherwise.
fn chatml_tokens(messages: &Value) -> u64 {
    let per_message: usize = messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let text =
                format!("{}\n{}\n", m["role"].as_str().unwrap(), m["content"].as_str().unwrap());
            2 + text.len()
        })
        .sum();
    (per_message + 1 + "assistant\n".len()) as u64
}

fn greedy(messages: Value, max_tokens: usize) -> Value {
    json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

#[tokio::test]
async fn chat_completion_shape_and_usage() {
    let v = chat(greedy(messages(), 6)).await;
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_string());
    assert!(choice["message"]["refusal"].is_null());
    assert!(choice["logprobs"].is_null());
    assert_eq!(choice["finish_reason"], "length");
    let prompt = chatml_tokens(&messages());
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": prompt, "completion_tokens": 6, "total_tokens": prompt + 6})
    );
}

#[tokio::test]
async fn text_parts_equal_string_content() {
    let parts = json!([
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]);
    let a = chat(greedy(parts, 8)).await;
    let b = chat(greedy(messages(), 8)).await;
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
    assert_eq!(a["usage"], b["usage"]);
}

#[tokio::test]
async fn max_completion_tokens_wins_over_max_tokens() {
    let mut body = greedy(messages(), 9);
    body["max_completion_tokens"] = json!(3);
    let v = chat(body).await;
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn without_a_limit_generation_fills_the_context() {
    let body = json!({"messages": messages(), "temperature": 0, "ignore_eos": true});
    let v = chat(body).await;
    let prompt = chatml_tokens(&messages());
    assert_eq!(v["usage"]["completion_tokens"], shared().max_model_len - prompt);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn logprobs_follow_the_chat_shape() {
    let mut body = greedy(messages(), 5);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(2);
    let v = chat(body).await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5);
    assert!(v["choices"][0]["logprobs"]["refusal"].is_null());
    for entry in content {
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
        let bytes = entry["bytes"].as_array().unwrap();
        assert_eq!(bytes.len(), 1, "one byte per token here: {entry}");
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], entry["token"]);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
    }

    // The same reply with tokens named by id: same values, `token_id:N` names.
    let mut body = greedy(messages(), 5);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(2);
    body["return_tokens_as_token_ids"] = json!(true);
    let by_id = chat(body).await;
    let named = by_id["choices"][0]["logprobs"]["content"].as_array().unwrap();
    for (a, b) in content.iter().zip(named) {
        assert_eq!(a["logprob"], b["logprob"]);
        assert_eq!(a["bytes"], b["bytes"], "bytes stay the token's own");
        let id = b["token"].as_str().unwrap().strip_prefix("token_id:").expect("named by id");
        assert!(id.parse::<u32>().is_ok(), "{b}");
        assert_eq!(b["top_logprobs"][0]["token"], b["token"]);
    }

    let mut body = greedy(messages(), 2);
    body["logprobs"] = json!(true);
    let v = chat(body).await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content[0]["top_logprobs"], json!([]));
}

#[tokio::test]
async fn stop_strings_end_the_message() {
    let full = chat(greedy(messages(), 24)).await;
    let text = full["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let stop: String = text.chars().nth(3).map(String::from).unwrap_or_default();
    assert!(!stop.is_empty(), "the model produced text: {text:?}");
    let mut body = greedy(messages(), 24);
    body["stop"] = json!(stop);
    let v = chat(body).await;
    assert_eq!(v["choices"][0]["message"]["content"], &text[..text.find(&stop).unwrap()]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn stream_opens_with_the_role_and_matches_the_message() {
    let whole = chat(greedy(messages(), 10)).await;
    let chunks = stream(greedy(messages(), 10)).await;
    let first = &chunks[0]["choices"][0];
    assert_eq!(first["delta"], json!({"role": "assistant", "content": ""}));
    assert!(first["finish_reason"].is_null());
    let mut text = String::new();
    for (i, c) in chunks.iter().enumerate().skip(1) {
        assert!(c.get("usage").is_none(), "no usage without include_usage: {c}");
        let choice = &c["choices"][0];
        assert!(choice["delta"].get("role").is_none());
        text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        assert_eq!(choice["finish_reason"].is_null(), i != chunks.len() - 1, "{c}");
    }
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn stream_with_n_and_usage() {
    let mut body = greedy(messages(), 4);
    body["n"] = json!(2);
    body["stream_options"] = json!({"include_usage": true});
    body["logprobs"] = json!(true);
    let chunks = stream(body).await;
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    let prompt = chatml_tokens(&messages());
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": prompt, "completion_tokens": 8, "total_tokens": prompt + 8})
    );
    let mut roles = [0; 2];
    let mut finishes = [0; 2];
    let mut logprob_tokens = [0; 2];
    for c in rest {
        assert!(c.get("usage").is_some() && c["usage"].is_null(), "usage: null on {c}");
        for choice in c["choices"].as_array().unwrap() {
            let i = choice["index"].as_u64().unwrap() as usize;
            roles[i] += usize::from(choice["delta"].get("role").is_some());
            finishes[i] += usize::from(!choice["finish_reason"].is_null());
            if let Some(content) = choice["logprobs"]["content"].as_array() {
                logprob_tokens[i] += content.len();
            }
        }
    }
    assert_eq!(roles, [1, 1]);
    assert_eq!(finishes, [1, 1]);
    assert_eq!(logprob_tokens, [4, 4]);
}
