//! The default model against HF transformers outputs on the same GGUF (dequantized to f32):
//! greedy continuations, top-5 logprobs and chat replies.

mod common;

use coserve::engine::{EngineConfig, SamplingParams};
use coserve::model::chat_template::ChatMessage;
use serde_json::Value;

use common::engine::{collect, request, TestEngine};

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn default_model_matches_reference() {
    let reference = common::reference();
    let engine = TestEngine::start(&common::default_model_path(), EngineConfig::default());
    let prompts = reference["prompts"].as_array().expect("prompts");

    // All prompts at once: the batch must not change any result.
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut params = SamplingParams::greedy(24);
            params.logprobs = Some(5);
            params.ignore_eos = true;
            engine.handle.submit(request(ids(&p["prompt_ids"]), params)).expect("submit")
        })
        .collect();
    let mut exact = 0;
    let mut worst_lp: f64 = 0.0;
    for (p, stream) in prompts.iter().zip(streams) {
        let g = collect(stream);
        let want = ids(&p["greedy_ids"]);
        let name = p["prompt"].as_str().unwrap_or("?");
        assert_eq!(&g.tokens[..8], &want[..8], "first 8 greedy tokens of {name:?}");
        if g.tokens == want {
            exact += 1;
        } else {
            eprintln!("prompt {name:?}: got {:?}\n  want {:?}", g.tokens, want);
        }
        for (pos, ref_top) in p["top5_logprobs"].as_array().expect("top5").iter().enumerate() {
            let ours = g.logprobs[pos].as_ref().expect("logprobs requested");
            for pair in ref_top.as_array().expect("pairs") {
                let id = pair[0].as_u64().expect("id") as u32;
                let lp = pair[1].as_f64().expect("lp");
                let got = ours.top.iter().find(|(t, _)| *t == id).unwrap_or_else(|| {
                    panic!("{name:?} pos {pos}: token {id} not in our top 5 {:?}", ours.top)
                });
                let diff = (got.1 as f64 - lp).abs();
                worst_lp = worst_lp.max(diff);
                assert!(
                    diff <= 2e-3,
                    "{name:?} pos {pos} token {id}: logprob {} vs reference {lp}",
                    got.1
                );
            }
        }
    }
    eprintln!(
        "exact greedy matches: {exact}/{}; worst logprob difference {worst_lp:.2e}",
        prompts.len()
    );
    assert!(exact >= 7, "only {exact} of {} greedy continuations match exactly", prompts.len());

    let template = engine.chat_template.as_ref().expect("the default model has a chat template");
    for chat in reference["chats"].as_array().expect("chats") {
        let messages: Vec<ChatMessage> =
            serde_json::from_value(chat["messages"].clone()).expect("messages");
        let rendered = template.render(&messages, true).expect("render");
        assert_eq!(rendered, chat["rendered"].as_str().expect("rendered"));
        let prompt = engine.tokenizer.encode(&rendered, false).expect("encode");
        assert_eq!(prompt, ids(&chat["prompt_ids"]));
        let want = ids(&chat["greedy_ids"]);
        let g = collect(
            engine
                .handle
                .submit(request(prompt, SamplingParams::greedy(want.len())))
                .expect("submit"),
        );
        assert_eq!(g.tokens, want, "greedy chat reply");
    }
}
