//! The default model against HF transformers outputs on the same GGUF (dequantized to f32):
//! greedy continuations, top-5 logprobs and chat replies.

use crate::common;

use coserve::engine::{EngineConfig, SamplingParams};

use common::engine::{collect, request, TestEngine};
use common::fixtures::smollm2_fixture;

#[test]
fn default_model_matches_reference() {
    let fixture = smollm2_fixture();
    let engine = TestEngine::start(&common::default_model_path(), EngineConfig::default());

    // All prompts at once: the batch must not change any result.
    let streams: Vec<_> = fixture
        .prompts
        .iter()
        .map(|p| {
            let mut params = SamplingParams::greedy(24);
            params.logprobs = Some(5);
            params.ignore_eos = true;
            engine.handle.submit(request(p.prompt_ids.clone(), params)).expect("submit")
        })
        .collect();
    let mut exact = 0;
    let mut worst_lp: f64 = 0.0;
    for (p, stream) in fixture.prompts.iter().zip(streams) {
        let g = collect(stream);
        let (want, name) = (&p.greedy_ids, &p.prompt);
        assert_eq!(&g.tokens[..8], &want[..8], "first 8 greedy tokens of {name:?}");
        if &g.tokens == want {
            exact += 1;
        } else {
            eprintln!("prompt {name:?}: got {:?}\n  want {:?}", g.tokens, want);
        }
        for (pos, ref_top) in p.top5_logprobs.iter().enumerate() {
            let ours = g.logprobs[pos].as_ref().expect("logprobs requested");
            for &(id, lp) in ref_top {
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
    let total = fixture.prompts.len();
    eprintln!("exact greedy matches: {exact}/{total}; worst logprob difference {worst_lp:.2e}");
    assert!(exact >= 7, "only {exact} of {total} greedy continuations match exactly");

    let template = engine.chat_template.as_ref().expect("the default model has a chat template");
    for chat in &fixture.chats {
        let rendered = template.render(&chat.messages, true).expect("render");
        assert_eq!(rendered, chat.rendered);
        let prompt = engine.tokenizer.encode(&rendered, false).expect("encode");
        assert_eq!(prompt, chat.prompt_ids);
        let want = &chat.greedy_ids;
        let g = collect(
            engine
                .handle
                .submit(request(prompt, SamplingParams::greedy(want.len())))
                .expect("submit"),
        );
        assert_eq!(&g.tokens, want, "greedy chat reply");
    }
}
