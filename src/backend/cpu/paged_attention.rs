//! Paged attention on CPU: online softmax over KV blocks, GQA-aware, prefill and decode alike.
