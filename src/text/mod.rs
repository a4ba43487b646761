//! Text handling off the engine thread: incremental detokenization and stop strings.

pub mod detokenizer;
pub mod stop;
