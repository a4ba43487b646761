//! The default model's chat template against Hugging Face's `apply_chat_template` output.

use crate::common;

use common::fixtures::{default_tokenizer_and_template, smollm2_fixture};

#[test]
fn chats_render_and_encode_like_reference() {
    let (tok, template) = default_tokenizer_and_template();

    let chats = smollm2_fixture().chats;
    assert_eq!(chats.len(), 2);
    for case in chats {
        let rendered = template.render(&case.messages, true).expect("render");
        assert_eq!(rendered, case.rendered, "rendering {:?}", case.messages);
        let ids = tok.encode(&rendered, false).expect("encode");
        assert_eq!(ids, case.prompt_ids, "encoding {rendered:?}");
    }
}
