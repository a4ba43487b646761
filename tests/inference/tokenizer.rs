//! The tokenizer built from the default model's GGUF against Hugging Face reference ids.

use crate::common;

use std::sync::Arc;

use common::fixtures::{default_model_metadata, smollm2_fixture};
use coserve::model::tokenizer::Tokenizer;
use coserve::text::detokenizer::Detokenizer;

fn default_tokenizer() -> Tokenizer {
    let (path, metadata) = default_model_metadata();
    Tokenizer::from_gguf(&metadata, &path).unwrap_or_else(|e| panic!("tokenizer: {e}"))
}

#[test]
fn tokenize_cases_match_reference() {
    let tok = default_tokenizer();
    for case in smollm2_fixture().tokenize {
        // The reference adds no BOS for this model, so add_special_tokens changes nothing.
        for add_special in [true, false] {
            let ids = tok.encode(&case.text, add_special).expect("encode");
            assert_eq!(
                ids, case.ids,
                "encoding {:?} (add_special_tokens={add_special})",
                case.text
            );
        }
        let text = tok.decode(&case.ids, false).expect("decode");
        assert_eq!(text, case.text, "decoding {:?}", case.ids);
    }
}

#[test]
fn prompt_ids_match_reference() {
    let tok = default_tokenizer();
    for case in smollm2_fixture().prompts {
        let ids = tok.encode(&case.prompt, true).expect("encode");
        assert_eq!(ids, case.prompt_ids, "encoding {:?}", case.prompt);
        assert_eq!(tok.decode(&ids, false).expect("decode"), case.prompt);
    }
}

#[test]
fn vocabulary_and_special_tokens() {
    let tok = default_tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_token_id, Some(1));
    assert_eq!(tok.eos_token_ids, vec![2]);
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert!(!tok.adds_bos());
    assert_eq!(tok.token_text(2), "<|im_end|>");
    assert!(tok.is_special(2));
    // " Paris" is "ĠParis" in the vocabulary; logprobs show the text.
    assert_eq!(tok.token_str(7042), Some("ĠParis"));
    assert_eq!(tok.token_text(7042), " Paris");
    assert_eq!(tok.token_text(198), "\n");
}

/// Streaming the reference generations token by token gives their full decode.
#[test]
fn detokenizer_streams_reference_generations() {
    let tok = Arc::new(default_tokenizer());
    let fixture = smollm2_fixture();
    let cases = fixture
        .prompts
        .iter()
        .map(|p| (&p.prompt_ids, &p.greedy_ids, &p.greedy_text))
        .chain(fixture.chats.iter().map(|c| (&c.prompt_ids, &c.greedy_ids, &c.greedy_text)));
    for (prompt, gen, text) in cases {
        let mut d = Detokenizer::new(tok.clone(), prompt, false);
        let mut out: String = gen.iter().map(|&id| d.push(id)).collect();
        out.push_str(&d.finish());
        assert_eq!(&out, text);
        assert_eq!(out, tok.decode(gen, false).expect("decode"));
    }
    // Every fixture text, byte tokens and all.
    for case in fixture.tokenize {
        let mut d = Detokenizer::new(tok.clone(), &[], false);
        let mut out: String = case.ids.iter().map(|&id| d.push(id)).collect();
        out.push_str(&d.finish());
        assert_eq!(out, case.text);
    }
}
