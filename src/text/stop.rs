//! Stop-string matching over streamed text; the stop text itself is never emitted.
//! (Interface fixed; implementation in progress.)

pub struct StopMatcher {
    _stops: Vec<String>,
}

/// What to emit after pushing a piece of text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutput {
    /// Text safe to emit now (never part of a stop string).
    pub text: String,
    /// A stop string matched: emit `text`, then finish with reason "stop".
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { _stops: stops }
    }

    pub fn push(&mut self, text: &str) -> StopOutput {
        StopOutput { text: text.to_string(), stopped: false }
    }

    /// Text held back because it could have started a stop string; call at the end.
    pub fn finish(&mut self) -> String {
        String::new()
    }
}
