//! Records to token ids and loss masks.
//!
//! Text is tokenized in segments that follow the inference boundary: everything the model is
//! given (the prompt) is one segment, everything it would generate (the reply) another. That
//! way a trained reply is split into tokens the way generation produces them, and the prompt
//! the way a request's prompt is encoded.

use crate::model::chat_template::{ChatMessage, ChatTemplate};
use crate::model::tokenizer::Tokenizer;

use super::record::{Message, Role};

/// Token ids and, per token, whether it is a loss target.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Masked {
    pub tokens: Vec<u32>,
    pub trained: Vec<bool>,
}

impl Masked {
    fn push_ids(&mut self, ids: &[u32], trained: bool) {
        self.tokens.extend_from_slice(ids);
        self.trained.extend(std::iter::repeat_n(trained, ids.len()));
    }

    fn push_text(&mut self, tok: &Tokenizer, text: &str, trained: bool) -> Result<(), String> {
        if text.is_empty() {
            return Ok(());
        }
        let ids = tok.encode(text, false).map_err(|e| format!("cannot tokenize: {e}"))?;
        self.push_ids(&ids, trained);
        Ok(())
    }

    /// The first token has nothing before it to be predicted from.
    fn finish(mut self) -> Self {
        if let Some(first) = self.trained.first_mut() {
            *first = false;
        }
        self
    }
}

/// `prompt` (after BOS when the tokenizer adds one) untrained, then `completion` and EOS
/// trained, so the model learns where a completion stops.
pub(crate) fn completion_tokens(
    tok: &Tokenizer,
    prompt: &str,
    completion: &str,
) -> Result<Masked, String> {
    let eos = *tok.eos_token_ids.first().ok_or_else(|| {
        "the model's tokenizer has no end-of-sequence token to end a completion with".to_string()
    })?;
    let mut out = Masked::default();
    if tok.adds_bos() {
        out.push_ids(&tok.bos_token_id.into_iter().collect::<Vec<_>>(), false);
    }
    out.push_text(tok, prompt, false)?;
    out.push_text(tok, completion, true)?;
    out.push_ids(&[eos], true);
    Ok(out.finish())
}

/// A conversation rendered with the chat template, trained on assistant turns with weight 1.
///
/// For each assistant message `i`, the prompt is `render(messages[..i], true)` and the reply
/// is what `render(messages[..=i], false)` adds to it: the content and the template's
/// end-of-turn text. Whitespace after the end-of-turn marker is left untrained, since
/// generation stops at the marker and never predicts it. No BOS is added: the template writes
/// its own, exactly as chat requests are encoded. Text after the last trained turn is dropped.
pub(crate) fn chat_tokens(
    tok: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
) -> Result<Masked, String> {
    let last = messages
        .iter()
        .rposition(|m| m.trained)
        .ok_or_else(|| "no assistant message with weight 1".to_string())?;
    let chat: Vec<ChatMessage> = messages[..=last]
        .iter()
        .map(|m| ChatMessage { role: m.role.as_str().to_string(), content: m.content.clone() })
        .collect();
    let render = |upto: usize, generation_prompt: bool| {
        template
            .render(&chat[..upto], generation_prompt)
            .map_err(|e| format!("the chat template could not render the messages: {e}"))
    };

    let mut out = Masked::default();
    // Rendered text already accounted for, and the untrained part of it not yet tokenized.
    let mut covered = String::new();
    let mut pending = String::new();
    for (i, m) in messages[..=last].iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let prompt = render(i, true)?;
        let Some(context) = prompt.strip_prefix(covered.as_str()) else {
            return Err(format!(
                "the chat template renders the conversation before messages[{i}] differently \
                 from how it rendered the earlier turns, so the turns cannot be split for training"
            ));
        };
        pending.push_str(context);
        let full = render(i + 1, false)?;
        let Some(reply) = full.strip_prefix(prompt.as_str()) else {
            // Templates that add a default system prompt do so only once a message exists.
            let hint =
                if i == 0 { "; start the conversation with a system or user message" } else { "" };
            return Err(format!(
                "the chat template's generation prompt is not a prefix of the rendered \
                 messages[{i}], so the reply cannot be separated from its prompt{hint}"
            ));
        };
        if m.trained {
            let end = reply.trim_end().len();
            out.push_text(tok, &pending, false)?;
            pending.clear();
            out.push_text(tok, &reply[..end], true)?;
            pending.push_str(&reply[end..]);
        } else {
            pending.push_str(reply);
        }
        covered = full;
    }
    Ok(out.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::testing::tiny_gpt2;

    const EOT: &str = "<|endoftext|>";
    /// Roles in brackets, each turn closed by the EOS token and a newline.
    const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";

    fn msg(role: Role, content: &str, trained: bool) -> Message {
        Message { role, content: content.to_string(), trained }
    }

    fn template(src: &str) -> ChatTemplate {
        ChatTemplate::new(src, "", EOT).expect("template compiles")
    }

    /// The decoded text of each run of equally-masked tokens.
    fn runs(tok: &Tokenizer, m: &Masked) -> Vec<(bool, String)> {
        let mut out: Vec<(bool, Vec<u32>)> = Vec::new();
        for (&t, &trained) in m.tokens.iter().zip(&m.trained) {
            match out.last_mut() {
                Some((k, ids)) if *k == trained => ids.push(t),
                _ => out.push((trained, vec![t])),
            }
        }
        out.into_iter().map(|(k, ids)| (k, tok.decode(&ids, false).expect("decodes"))).collect()
    }

    #[test]
    fn single_turn_trains_reply_and_end_marker() {
        let tok = tiny_gpt2();
        let m = [msg(Role::User, "hi", false), msg(Role::Assistant, "in the end", true)];
        let out = chat_tokens(&tok, &template(TEMPLATE), &m).expect("builds");
        assert_eq!(out.tokens.len(), out.trained.len());
        assert_eq!(
            runs(&tok, &out),
            [(false, format!("[user]hi{EOT}\n[assistant]")), (true, format!("in the end{EOT}"))]
        );
        // " the" is one token inside the reply, as generation would produce it.
        assert!(out.tokens.contains(&tok.token_to_id("Ġthe").expect("vocab")));
    }

    #[test]
    fn weights_select_turns_and_later_text_is_dropped() {
        let tok = tiny_gpt2();
        let m = [
            msg(Role::System, "s", false),
            msg(Role::User, "q1", false),
            msg(Role::Assistant, "a1", false),
            msg(Role::User, "q2", false),
            msg(Role::Assistant, "a2", true),
            msg(Role::User, "q3", false),
            msg(Role::Assistant, "a3", true),
            msg(Role::User, "q4", false),
            msg(Role::Assistant, "a4", false),
        ];
        let out = chat_tokens(&tok, &template(TEMPLATE), &m).expect("builds");
        assert_eq!(
            runs(&tok, &out),
            [
                (
                    false,
                    format!("[system]s{EOT}\n[user]q1{EOT}\n[assistant]a1{EOT}\n[user]q2{EOT}\n[assistant]")
                ),
                (true, format!("a2{EOT}")),
                (false, format!("\n[user]q3{EOT}\n[assistant]")),
                (true, format!("a3{EOT}")),
            ]
        );
    }

    #[test]
    fn unstable_templates_are_reported() {
        let tok = tiny_gpt2();
        let m = [msg(Role::User, "q", false), msg(Role::Assistant, "a", true)];
        // The generation prompt is not what an assistant turn starts with.
        let src = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}";
        let e = chat_tokens(&tok, &template(src), &m).expect_err("not a prefix");
        assert!(e.contains("generation prompt is not a prefix"), "{e}");
        // Earlier turns render differently once a later one follows (a closing marker).
        let src = "{% for m in messages %}{{ m.content }}{% endfor %}{% if messages[-1].role == 'assistant' %}.{% endif %}";
        let m = [
            msg(Role::User, "q", false),
            msg(Role::Assistant, "a", true),
            msg(Role::User, "q", false),
            msg(Role::Assistant, "b", true),
        ];
        let e = chat_tokens(&tok, &template(src), &m).expect_err("unstable");
        assert!(e.contains("differently"), "{e}");
        // A template that raises.
        let src = "{{ raise_exception('no system messages') }}";
        let e = chat_tokens(&tok, &template(src), &m).expect_err("raises");
        assert!(e.contains("could not render") && e.contains("no system messages"), "{e}");
    }

    #[test]
    fn first_token_is_never_trained() {
        let tok = tiny_gpt2();
        let m = [msg(Role::Assistant, "ab", true)];
        let out =
            chat_tokens(&tok, &template("{% for m in messages %}{{ m.content }}{% endfor %}"), &m)
                .expect("builds");
        assert_eq!(out.trained, [false, true]);
    }

    #[test]
    fn completion_adds_bos_and_trains_eos() {
        let tok = tiny_gpt2();
        let out = completion_tokens(&tok, "the", " the 12").expect("builds");
        let eos = tok.eos_token_ids[0];
        assert_eq!(out.tokens.last(), Some(&eos));
        assert_eq!(runs(&tok, &out), [(false, "the".into()), (true, format!(" the 12{EOT}"))]);

        let spm = crate::model::tokenizer::testing::tiny_spm();
        assert!(spm.adds_bos());
        let out = completion_tokens(&spm, "ab", "c").expect("builds");
        assert_eq!(out.tokens.first().copied(), spm.bos_token_id);
        assert_eq!(out.trained.first(), Some(&false));
        assert_eq!(out.tokens.last(), spm.eos_token_ids.first());
        assert_eq!(out.trained.last(), Some(&true));

        let mut no_eos = tiny_gpt2();
        no_eos.eos_token_ids.clear();
        let e = completion_tokens(&no_eos, "a", "b").expect_err("no eos");
        assert!(e.contains("no end-of-sequence token"), "{e}");
    }
}
