//! POST /v1/completions over real HTTP against the tiny random model (byte-level tokenizer:
//! token id = byte value, so "Hello" is 5 tokens).

use crate::common;
use crate::support;

use std::sync::OnceLock;

use serde_json::{json, Value};

use common::server::TestServer;
use support::{assert_schema_allowing_null, client, metric, sse_chunks};

struct Shared {
    base: String,
    model: String,
}

/// One server for the tests here that do not need their own.
fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        support::on_background_runtime(|| async {
            let server = TestServer::start_tiny(|c| c.kv_cache_memory = 64 << 20).await;
            let shared = Shared {
                base: server.base_url().to_string(),
                model: server.model_id().to_string(),
            };
            // Keep it serving for the rest of the process.
            std::mem::forget(server);
            shared
        })
    })
}

async fn post(body: Value) -> reqwest::Response {
    let s = shared();
    client().post(format!("{}/v1/completions", s.base)).json(&body).send().await.expect("request")
}

/// A non-streamed completion, checked against OpenAI's schema.
async fn complete(body: Value) -> Value {
    complete_allowing_null(body, &[]).await
}

/// Echoed prompts start their logprobs with `null`, which OpenAI's schema does not allow for.
const ECHO_NULLS: &[&str] = &["token_logprobs", "top_logprobs"];

async fn complete_allowing_null(mut body: Value, nullable: &[&str]) -> Value {
    body["model"] = json!(shared().model);
    let r = post(body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("JSON");
    support::assert_schema_allowing_null(&v, "CreateCompletionResponse", nullable);
    assert_eq!(v["model"], shared().model);
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    v
}

/// A streamed completion's chunks (without [DONE]), each checked against OpenAI's schema,
/// which shares the response shape but not its nulls: `finish_reason` is `null` until a
/// choice's last chunk, and with `include_usage` every chunk but the last has `usage: null`.
async fn stream(mut body: Value) -> Vec<Value> {
    let mut nullable = vec!["finish_reason", "usage"];
    if body["echo"] == true {
        nullable.extend(ECHO_NULLS);
    }
    body["model"] = json!(shared().model);
    body["stream"] = json!(true);
    let chunks = sse_chunks(post(body).await).await;
    for c in &chunks {
        assert_schema_allowing_null(c, "CreateCompletionResponse", &nullable);
    }
    chunks
}

fn greedy(prompt: Value, max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

#[tokio::test]
async fn completion_has_text_usage_and_finish_reason() {
    let v = complete(greedy(json!("Hello"), 5)).await;
    assert_eq!(v["object"], "text_completion");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert!(choices[0]["logprobs"].is_null());
    assert_eq!(choices[0]["finish_reason"], "length");
    assert_eq!(v["usage"], json!({"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}));
}

#[tokio::test]
async fn max_tokens_defaults_to_16() {
    let v = complete(json!({"prompt": "Hi", "ignore_eos": true})).await;
    assert_eq!(v["usage"]["completion_tokens"], 16);
}

#[tokio::test]
async fn greedy_and_seeded_outputs_repeat() {
    let a = complete(greedy(json!("Once upon"), 12)).await;
    let b = complete(greedy(json!("Once upon"), 12)).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    let seeded = json!({"prompt": "Once", "max_tokens": 12, "temperature": 1.0, "seed": 42,
        "ignore_eos": true});
    let a = complete(seeded.clone()).await;
    let b = complete(seeded).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
}

#[tokio::test]
async fn token_prompts_match_text_prompts() {
    let text = complete(greedy(json!("Hi there"), 8)).await;
    let ids: Vec<u32> = "Hi there".bytes().map(u32::from).collect();
    let tokens = complete(greedy(json!(ids), 8)).await;
    assert_eq!(text["choices"][0]["text"], tokens["choices"][0]["text"]);
    assert_eq!(tokens["usage"]["prompt_tokens"], 8);
}

#[tokio::test]
async fn batches_index_over_prompts_times_n() {
    let mut body = greedy(json!(["ab", "cde"]), 3);
    body["n"] = json!(2);
    let v = complete(body).await;
    let choices = v["choices"].as_array().unwrap();
    let indices: Vec<u64> = choices.iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, vec![0, 1, 2, 3]);
    // Greedy: both choices of a prompt agree.
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(choices[2]["text"], choices[3]["text"]);
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17})
    );

    let v = complete(greedy(json!([[97, 98], [99, 100, 101]]), 3)).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["prompt_tokens"], 5);
}

#[tokio::test]
async fn seeded_choices_differ_but_repeat() {
    let body = json!({"prompt": "x", "max_tokens": 16, "temperature": 1.0, "seed": 7, "n": 2,
        "ignore_eos": true});
    let a = complete(body.clone()).await;
    let b = complete(body).await;
    assert_eq!(a["choices"], b["choices"]);
    assert_ne!(a["choices"][0]["text"], a["choices"][1]["text"]);
}

#[tokio::test]
async fn echo_prepends_the_prompt() {
    let plain = complete(greedy(json!("Echo me"), 4)).await;
    let mut body = greedy(json!("Echo me"), 4);
    body["echo"] = json!(true);
    let echoed = complete(body).await;
    let expected = format!("Echo me{}", plain["choices"][0]["text"].as_str().unwrap());
    assert_eq!(echoed["choices"][0]["text"], expected);
    assert_eq!(echoed["usage"], plain["usage"]);
}

fn check_completion_logprobs(lp: &Value, tokens: usize, k: usize) {
    let n = |key: &str| lp[key].as_array().unwrap_or_else(|| panic!("{key} in {lp}")).len();
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(n(key), tokens, "{key} in {lp}");
    }
    let offsets: Vec<u64> =
        lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "offsets increase: {offsets:?}");
    for (lp, top) in
        lp["token_logprobs"].as_array().unwrap().iter().zip(lp["top_logprobs"].as_array().unwrap())
    {
        let Some(lp) = lp.as_f64() else { continue };
        assert!(lp <= 0.0);
        let top = top.as_object().unwrap();
        // The k alternatives plus the chosen token (which may be among them).
        assert!(!top.is_empty() && top.len() <= k + 1, "{top:?}");
        assert!(top.values().all(|v| v.as_f64().unwrap() <= 0.0));
    }
}

#[tokio::test]
async fn logprobs_have_one_entry_per_token() {
    let mut body = greedy(json!("Logprobs"), 6);
    body["logprobs"] = json!(3);
    let v = complete(body).await;
    let lp = &v["choices"][0]["logprobs"];
    check_completion_logprobs(lp, 6, 3);
    assert_eq!(lp["text_offset"][0], 0);
    // Greedy picks the most likely token, so its logprob is the top one.
    let chosen = lp["token_logprobs"][0].as_f64().unwrap();
    let best = lp["top_logprobs"][0].as_object().unwrap().values().map(|v| v.as_f64().unwrap());
    assert!(best.fold(f64::MIN, f64::max) <= chosen + 1e-6);
}

#[tokio::test]
async fn echo_with_logprobs_scores_the_prompt() {
    let mut body = greedy(json!("Score"), 2);
    body["echo"] = json!(true);
    body["logprobs"] = json!(1);
    let v = complete_allowing_null(body, ECHO_NULLS).await;
    let lp = &v["choices"][0]["logprobs"];
    check_completion_logprobs(lp, 5 + 2, 1);
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["top_logprobs"][0].is_null());
    assert!(lp["token_logprobs"][1].is_number());
    let tokens: Vec<&str> =
        lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens[..5].concat(), "Score");
}

#[tokio::test]
async fn tokens_can_be_named_by_id() {
    let ids = [40u32, 41, 97, 98];
    let mut body = greedy(json!(ids), 3);
    body["echo"] = json!(true);
    body["logprobs"] = json!(2);
    let by_text = complete_allowing_null(body.clone(), ECHO_NULLS).await;
    body["return_tokens_as_token_ids"] = json!(true);
    let by_id = complete_allowing_null(body, ECHO_NULLS).await;
    let (t, i) = (&by_text["choices"][0], &by_id["choices"][0]);
    assert_eq!(t["text"], i["text"]);
    let lp = &i["logprobs"];
    check_completion_logprobs(lp, 4 + 3, 2);
    let names: Vec<&str> =
        lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let want: Vec<String> = ids.iter().map(|id| format!("token_id:{id}")).collect();
    assert_eq!(names[..4], want);
    assert!(names
        .iter()
        .all(|n| n.strip_prefix("token_id:").is_some_and(|d| d.parse::<u32>().is_ok())));
    for top in lp["top_logprobs"].as_array().unwrap().iter().skip(1) {
        assert!(top.as_object().unwrap().keys().all(|k| k.starts_with("token_id:")), "{top}");
    }
    // Offsets still count the text.
    assert_eq!(lp["text_offset"], t["logprobs"]["text_offset"]);
    assert_eq!(lp["token_logprobs"], t["logprobs"]["token_logprobs"]);
}

#[tokio::test]
async fn stop_strings_cut_the_text() {
    let full = complete(greedy(json!("The stop test"), 24)).await;
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    // Stop at the third character of what greedy decoding produces anyway.
    let stop: String = text.chars().nth(2).map(String::from).unwrap_or_default();
    assert!(!stop.is_empty(), "the model produced text: {text:?}");
    let cut = &text[..text.find(&stop).unwrap()];
    let mut body = greedy(json!("The stop test"), 24);
    body["stop"] = json!([stop, "\u{1F600}never"]);
    let v = complete(body).await;
    assert_eq!(v["choices"][0]["text"], cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 24);
}

#[tokio::test]
async fn stream_matches_the_non_streamed_text() {
    let whole = complete(greedy(json!("Stream"), 10)).await;
    let chunks = stream(greedy(json!("Stream"), 10)).await;
    assert!(!chunks.is_empty());
    let mut text = String::new();
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["id"], chunks[0]["id"], "one id per stream");
        assert!(c.get("usage").is_none(), "no usage without include_usage: {c}");
        let choice = &c["choices"][0];
        text.push_str(choice["text"].as_str().unwrap());
        let last = i == chunks.len() - 1;
        assert_eq!(choice["finish_reason"].is_null(), !last, "{c}");
    }
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn stream_with_usage_ends_with_a_usage_chunk() {
    let mut body = greedy(json!(["ab", "c"]), 4);
    body["n"] = json!(2);
    body["stream_options"] = json!({"include_usage": true});
    body["echo"] = json!(true);
    body["logprobs"] = json!(0);
    let chunks = stream(body).await;
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19})
    );
    let mut texts = vec![String::new(); 4];
    let mut finished = [0; 4];
    for c in rest {
        assert!(c["usage"].is_null() && c.get("usage").is_some(), "usage: null on {c}");
        for choice in c["choices"].as_array().unwrap() {
            let i = choice["index"].as_u64().unwrap() as usize;
            texts[i].push_str(choice["text"].as_str().unwrap());
            finished[i] += usize::from(!choice["finish_reason"].is_null());
            assert!(choice["logprobs"].is_object(), "logprobs asked for: {choice}");
        }
    }
    assert_eq!(finished, [1; 4]);
    for (i, t) in texts.iter().enumerate() {
        let prompt = if i < 2 { "ab" } else { "c" };
        assert!(t.starts_with(prompt), "choice {i} echoes its prompt: {t:?}");
    }
}

#[tokio::test]
async fn a_stop_string_finish_counts_as_stop_in_metrics() {
    let server = TestServer::start_tiny(|_| {}).await;
    let c = client();
    let body = |stop: Option<&str>| {
        let mut b = greedy(json!("The stop test"), 24);
        b["model"] = json!(server.model_id());
        if let Some(s) = stop {
            b["stop"] = json!([s]);
        }
        b
    };
    let full: Value = c
        .post(server.url("/v1/completions"))
        .json(&body(None))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let stop: String = text.chars().nth(2).map(String::from).unwrap_or_default();
    let r = c.post(server.url("/v1/completions")).json(&body(Some(&stop))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ok =
        support::wait_for_metrics(&c, server.base_url(), std::time::Duration::from_secs(10), |m| {
            metric(m, "coserve_request_success_total", &["finished_reason=\"stop\""]) == 1.0
                && metric(m, "coserve_request_success_total", &["finished_reason=\"length\""])
                    == 1.0
                && metric(m, "coserve_kv_cache_usage_perc", &[]) == 0.0
        })
        .await;
    let m = support::metrics_text(&c, server.base_url()).await;
    assert!(ok, "a stop-string finish must count as stop, not abort:\n{m}");
    assert_eq!(metric(&m, "coserve_request_success_total", &["finished_reason=\"abort\""]), 0.0);
    server.stop().await;
}
