//! Stop-string matching over streamed text; the stop text itself is never emitted.
//!
//! Text that could still be the start of a stop string is held back until the next push
//! proves otherwise. Generation stops at the first point where any stop string is complete;
//! if several are complete at once, the one that starts earliest wins.

pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not yet emitted: always a possible start of a stop string.
    held: String,
    /// Length of the longest stop string, in bytes.
    max_len: usize,
    stopped: bool,
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
    /// Empty stop strings are ignored (they would match before any text).
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        Self { stops, held: String::new(), max_len, stopped: false }
    }

    pub fn push(&mut self, text: &str) -> StopOutput {
        if self.stopped {
            return StopOutput { text: String::new(), stopped: true };
        }
        if self.stops.is_empty() {
            return StopOutput { text: text.to_string(), stopped: false };
        }
        self.held.push_str(text);
        let earliest = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(start) = earliest {
            let mut out = std::mem::take(&mut self.held);
            out.truncate(start);
            self.stopped = true;
            return StopOutput { text: out, stopped: true };
        }
        let keep = self.held.split_off(self.partial_match_start());
        StopOutput { text: std::mem::replace(&mut self.held, keep), stopped: false }
    }

    /// Text held back because it could have started a stop string; call at the end.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Whether a stop string has matched.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Start of the longest suffix of `held` that is a proper prefix of a stop string
    /// (`held.len()` when there is none).
    fn partial_match_start(&self) -> usize {
        let first = self.held.len().saturating_sub(self.max_len.saturating_sub(1));
        (first..self.held.len())
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    /// Pushes each piece; returns (text emitted per push, whether it stopped, finish()).
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = matcher(stops);
        let mut out = Vec::new();
        for p in pieces {
            let o = m.push(p);
            out.push(o.text);
            if o.stopped {
                return (out, true, m.finish());
            }
        }
        let rest = m.finish();
        (out, false, rest)
    }

    #[test]
    fn no_stops_passes_everything() {
        assert_eq!(run(&[], &["a", "b"]), (vec!["a".into(), "b".into()], false, String::new()));
        assert_eq!(run(&[""], &["a"]), (vec!["a".into()], false, String::new()));
    }

    #[test]
    fn stop_spanning_pushes_is_never_emitted() {
        let (out, stopped, rest) = run(&["END"], &["abc E", "N", "D more"]);
        assert_eq!(out, ["abc ", "", ""]);
        assert!(stopped);
        assert_eq!(rest, "");
        let (out, stopped, _) = run(&["<|im_end|>"], &["Hi", "<|im", "_", "end", "|>", "x"]);
        assert_eq!(out.concat(), "Hi");
        assert!(stopped);
    }

    #[test]
    fn text_before_a_stop_in_one_push_is_emitted() {
        let (out, stopped, _) = run(&["\n\n"], &["one\n\ntwo"]);
        assert_eq!(out, ["one"]);
        assert!(stopped);
    }

    #[test]
    fn overlapping_prefixes() {
        // "ab" then "ab": the first "ab" can no longer start "abcd".
        let (out, stopped, _) = run(&["abcd"], &["ab", "ab", "cd"]);
        assert_eq!(out, ["", "ab", ""]);
        assert!(stopped);
        // Self-overlapping stop: "aaab" stops after the first "a".
        let (out, stopped, _) = run(&["aab"], &["a", "a", "a", "b"]);
        assert_eq!(out.concat(), "a");
        assert!(stopped);
        let (out, stopped, _) = run(&["aab"], &["aaab"]);
        assert_eq!(out, ["a"]);
        assert!(stopped);
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, stopped, _) = run(&["world", "lo w"], &["hello world"]);
        assert_eq!(out, ["hel"]);
        assert!(stopped);
        let (out, stopped, _) = run(&["xyz", "b"], &["a", "x", "y", "b"]);
        assert_eq!(out.concat(), "axy");
        assert!(stopped);
    }

    #[test]
    fn no_false_holds() {
        // Nothing that cannot start a stop string is held.
        let mut m = matcher(&["xyz"]);
        assert_eq!(m.push("hello").text, "hello");
        assert_eq!(m.push("ax").text, "a");
        assert_eq!(m.push("b").text, "xb");
        assert_eq!(m.push("xy").text, "");
        assert_eq!(m.push("y").text, "xyy");
        assert_eq!(m.finish(), "");
        // A partial match left at the end comes back from finish().
        let (out, stopped, rest) = run(&["xyz"], &["abx", "y"]);
        assert_eq!((out.concat(), stopped, rest.as_str()), ("ab".to_string(), false, "xy"));
    }

    #[test]
    fn multibyte_text_splits_on_char_boundaries() {
        let (out, stopped, rest) = run(&["é!"], &["café", "?"]);
        assert_eq!(out, ["caf", "é?"]);
        assert!(!stopped);
        assert_eq!(rest, "");
        let (out, stopped, _) = run(&["🔥🔥"], &["a🔥", "🔥b"]);
        assert_eq!(out.concat(), "a");
        assert!(stopped);
    }

    #[test]
    fn nothing_after_a_stop() {
        let mut m = matcher(&["."]);
        assert_eq!(m.push("a.b"), StopOutput { text: "a".into(), stopped: true });
        assert!(m.is_stopped());
        assert_eq!(m.push("more"), StopOutput { text: String::new(), stopped: true });
        assert_eq!(m.finish(), "");
    }
}
