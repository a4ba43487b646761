//! Sampling: logits -> next token, with penalties, seeded RNG and logprobs.
