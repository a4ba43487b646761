//! What a job leaves on disk: checkpoints (PEFT adapter + optimizer state, enough to serve
//! and to resume), fine-tuned models, and the step-metrics CSV of its result file.

use std::path::Path;

use serde_json::{json, Value};

use crate::engine::job::ResumePoint;
use crate::lora::{load_peft, load_training_state, save_peft, save_training_state, PeftError};
use crate::model::config::LlamaConfig;
use crate::store::EventRow;

/// The optimizer state beside a checkpoint's adapter.
pub const TRAINING_STATE: &str = "training_state.safetensors";

/// Writes a resumable checkpoint into `dir` (created).
pub fn save_checkpoint(dir: &Path, r: &ResumePoint, base_model: &str) -> Result<(), PeftError> {
    save_peft(dir, &r.adapter, base_model)?;
    let extra = json!({"step": r.step, "trained_tokens": r.trained_tokens});
    save_training_state(&dir.join(TRAINING_STATE), &r.optimizer, &extra)
}

/// Reads back what `save_checkpoint` wrote.
pub fn load_checkpoint(dir: &Path, model: &LlamaConfig) -> Result<ResumePoint, PeftError> {
    let adapter = load_peft(dir, model)?;
    let path = dir.join(TRAINING_STATE);
    let (optimizer, extra) = load_training_state(&path, &adapter)?;
    let field = |k: &str| extra.get(k).and_then(Value::as_u64);
    let (Some(step), Some(trained_tokens)) = (field("step"), field("trained_tokens")) else {
        return Err(PeftError::Invalid {
            path,
            what: "metadata lacks `step` or `trained_tokens`".into(),
        });
    };
    Ok(ResumePoint { adapter, optimizer, step, trained_tokens })
}

/// The results CSV OpenAI attaches to a job: one row per step (a step logged twice, e.g.
/// redone after a restart, keeps its last values), validation columns where measured.
pub fn results_csv(events: &[EventRow]) -> String {
    let mut rows: std::collections::BTreeMap<u64, [String; 4]> = Default::default();
    let num = |d: &Value, k: &str| d.get(k).and_then(Value::as_f64).map(|v| format!("{v:.6}"));
    for e in events {
        let Some(d) = &e.data else { continue };
        let Some(step) = d.get("step").and_then(Value::as_u64) else { continue };
        let row = rows.entry(step).or_default();
        if let Some(v) = num(d, "train_loss") {
            row[0] = v;
        }
        if let Some(v) = num(d, "train_mean_token_accuracy") {
            row[1] = v;
        }
        if let Some(v) = num(d, "valid_loss") {
            row[2] = v;
        }
        if let Some(v) = num(d, "valid_mean_token_accuracy") {
            row[3] = v;
        }
    }
    let mut out =
        String::from("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n");
    for (step, r) in rows {
        out.push_str(&format!("{step},{},{},{},{}\n", r[0], r[1], r[2], r[3]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(data: Value) -> EventRow {
        EventRow {
            id: "e".into(),
            job_id: "j".into(),
            created_at: 0,
            level: "info".into(),
            message: String::new(),
            data: Some(data),
        }
    }

    #[test]
    fn csv_keeps_the_last_value_of_each_step() {
        let csv = results_csv(&[
            ev(json!({"step": 1, "train_loss": 2.0, "train_mean_token_accuracy": 0.5})),
            ev(json!({"step": 2, "train_loss": 1.5})),
            ev(json!({"step": 2, "train_loss": 1.25})),
            ev(json!({"step": 2, "valid_loss": 1.75})),
        ]);
        assert_eq!(
            csv,
            "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n\
             1,2.000000,0.500000,,\n2,1.250000,,1.750000,\n"
        );
    }
}
