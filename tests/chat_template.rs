//! The default model's chat template against Hugging Face's `apply_chat_template` output.

mod common;

use common::fixtures::{default_model_metadata, smollm2_fixture};
use coserve::model::chat_template::ChatTemplate;
use coserve::model::tokenizer::Tokenizer;

#[test]
fn chats_render_and_encode_like_reference() {
    let (path, metadata) = default_model_metadata();
    let tok = Tokenizer::from_gguf(&metadata, &path).unwrap_or_else(|e| panic!("tokenizer: {e}"));
    let template = ChatTemplate::from_gguf(
        &metadata,
        tok.bos_token().unwrap_or_default(),
        tok.eos_token().unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("template: {e}"))
    .expect("the default model has a chat template");

    let chats = smollm2_fixture().chats;
    assert_eq!(chats.len(), 2);
    for case in chats {
        let rendered = template.render(&case.messages, true).expect("render");
        assert_eq!(rendered, case.rendered, "rendering {:?}", case.messages);
        let ids = tok.encode(&rendered, false).expect("encode");
        assert_eq!(ids, case.prompt_ids, "encoding {rendered:?}");
    }
}
