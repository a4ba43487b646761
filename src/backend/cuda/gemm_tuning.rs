//! Choosing among cuBLASLt's algorithms for a product by timing them.
//!
//! cuBLASLt's heuristic ranks algorithms from a model of the chip; for the thin products of a
//! decode step (a few rows against a whole weight matrix) its first pick is not always the
//! fastest. A shape that will run many times (a recorded decode step's) is worth timing once:
//! every algorithm the heuristic offers runs on the real operands into a scratch output, and
//! the fastest is kept, unless the heuristic's own pick is within [`MARGIN`] of it.

use serde::Serialize;

/// How many algorithms the heuristic is asked for.
pub const CANDIDATES: usize = 8;

/// Runs of each algorithm timed (each with L2 cleared first), after one untimed run.
pub const TIMED_RUNS: usize = 5;

/// A faster algorithm must beat the heuristic's pick by this share to replace it: timings
/// are noisy, and the heuristic's pick is the documented default.
pub const MARGIN: f64 = 0.03;

/// What timing one product's algorithms found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Tuned {
    /// Rows, columns and depth of the row-major product.
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Algorithms the heuristic offered.
    pub candidates: usize,
    /// Milliseconds a run of the heuristic's pick took (`None`: it failed to run).
    pub heuristic_ms: Option<f64>,
    /// Milliseconds a run of the chosen algorithm takes.
    pub chosen_ms: Option<f64>,
    /// The chosen algorithm's place in the heuristic's list.
    pub chosen: usize,
}

/// The algorithm to use given each one's time (`None`: it failed to run): the fastest, unless
/// the heuristic's first is within [`MARGIN`] of it. With nothing timed, the first.
pub fn pick(times: &[Option<f64>]) -> usize {
    let fastest = times
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.filter(|t| t.is_finite()).map(|t| (i, t)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    match (times.first().copied().flatten(), fastest) {
        (_, None) => 0,
        (Some(first), Some((_, t))) if first <= t * (1.0 + MARGIN) => 0,
        (_, Some((i, _))) => i,
    }
}

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn the_heuristic_s_pick_stays_unless_another_is_clearly_faster() {
        assert_eq!(pick(&[Some(1.0), Some(0.99), Some(1.2)]), 0);
        assert_eq!(pick(&[Some(1.0), Some(0.9), Some(0.95)]), 1);
        assert_eq!(pick(&[Some(1.0), Some(0.96), Some(0.8)]), 2);
        // Ties keep the earlier.
        assert_eq!(pick(&[Some(1.0), Some(0.5), Some(0.5)]), 1);
        assert_eq!(pick(&[Some(0.0), Some(0.0)]), 0);
    }

    #[test]
    fn algorithms_that_fail_are_never_picked() {
        assert_eq!(pick(&[None, Some(2.0), Some(1.5)]), 2);
        assert_eq!(pick(&[Some(1.0), None, Some(f64::NAN)]), 0);
        assert_eq!(pick(&[None, None]), 0);
        assert_eq!(pick(&[]), 0);
    }
}
