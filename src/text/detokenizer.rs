//! Incremental detokenization that never emits broken UTF-8.
