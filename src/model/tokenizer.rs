//! Llama tokenizer from GGUF metadata or tokenizer.json.
