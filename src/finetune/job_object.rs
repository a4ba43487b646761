//! The `fine_tuning.job` object as OpenAI defines it, and how "auto" hyperparameters resolve.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::lora::LoraConfig;

/// The base learning rate; a job's rate is this times `learning_rate_multiplier`.
pub const BASE_LEARNING_RATE: f32 = 2e-4;

/// A hyperparameter given as a value or "auto".
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum AutoOr<T> {
    Auto(AutoTag),
    Value(T),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AutoTag {
    Auto,
}

impl<T> Default for AutoOr<T> {
    fn default() -> Self {
        AutoOr::Auto(AutoTag::Auto)
    }
}

/// Hyperparameters as requested (each may be "auto").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestedHyperparameters {
    #[serde(default)]
    #[schema(value_type = Object)]
    pub n_epochs: AutoOr<i64>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub batch_size: AutoOr<i64>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub learning_rate_multiplier: AutoOr<f64>,
}

impl From<Hyperparameters> for RequestedHyperparameters {
    fn from(h: Hyperparameters) -> Self {
        Self {
            n_epochs: AutoOr::Value(h.n_epochs as i64),
            batch_size: AutoOr::Value(h.batch_size as i64),
            learning_rate_multiplier: AutoOr::Value(h.learning_rate_multiplier),
        }
    }
}

impl RequestedHyperparameters {
    /// The values, once none is "auto".
    pub fn resolved(&self) -> Option<Hyperparameters> {
        match (self.n_epochs, self.batch_size, self.learning_rate_multiplier) {
            (AutoOr::Value(e), AutoOr::Value(b), AutoOr::Value(l)) => Some(Hyperparameters {
                n_epochs: e.max(1) as usize,
                batch_size: b.max(1) as usize,
                learning_rate_multiplier: l,
            }),
            _ => None,
        }
    }
}

/// Hyperparameters as the job runs them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Hyperparameters {
    pub n_epochs: usize,
    pub batch_size: usize,
    pub learning_rate_multiplier: f64,
}

impl Hyperparameters {
    pub fn learning_rate(&self) -> f32 {
        BASE_LEARNING_RATE * self.learning_rate_multiplier as f32
    }
}

/// How "auto" resolves, from the number of training examples `n`:
/// - `n_epochs`: enough passes for about 100 example visits, between 3 and 10
///   (`clamp(ceil(100 / n), 3, 10)`), so small files are seen often enough to be learned;
/// - `batch_size`: about 0.2% of the examples, between 1 and 32 (as OpenAI describes it);
/// - `learning_rate_multiplier`: 1 (a learning rate of 2e-4, a common LoRA rate).
pub fn resolve_hyperparameters(
    req: &RequestedHyperparameters,
    n: usize,
) -> Result<Hyperparameters, (&'static str, String)> {
    let n_epochs = match req.n_epochs {
        AutoOr::Auto(_) => 100usize.div_ceil(n.max(1)).clamp(3, 10),
        AutoOr::Value(v) if (1..=50).contains(&v) => v as usize,
        AutoOr::Value(v) => return Err(("n_epochs", format!("n_epochs must be 1 to 50, got {v}"))),
    };
    let batch_size = match req.batch_size {
        AutoOr::Auto(_) => ((n as f64 * 0.002).round() as usize).clamp(1, 32),
        AutoOr::Value(v) if (1..=256).contains(&v) => v as usize,
        AutoOr::Value(v) => {
            return Err(("batch_size", format!("batch_size must be 1 to 256, got {v}")))
        }
    };
    let learning_rate_multiplier = match req.learning_rate_multiplier {
        AutoOr::Auto(_) => 1.0,
        AutoOr::Value(v) if v.is_finite() && v > 0.0 && v <= 100.0 => v,
        AutoOr::Value(v) => {
            return Err((
                "learning_rate_multiplier",
                format!("learning_rate_multiplier must be in (0, 100], got {v}"),
            ))
        }
    };
    Ok(Hyperparameters { n_epochs, batch_size, learning_rate_multiplier })
}

/// `error` of a failed job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

/// `method` as it is stored and returned: supervised, with resolved hyperparameters and the
/// LoRA settings (an extension of OpenAI's object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Method {
    #[serde(rename = "type")]
    pub kind: String,
    pub supervised: SupervisedMethod,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SupervisedMethod {
    /// "auto" values become numbers once the training file is validated.
    pub hyperparameters: RequestedHyperparameters,
    #[schema(value_type = Object)]
    pub lora: LoraConfig,
    /// Extension: cut examples longer than the context instead of rejecting them.
    #[serde(default)]
    pub truncate: bool,
}

/// OpenAI's `FineTuningJob`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FineTuningJob {
    pub id: String,
    pub object: String,
    pub created_at: i64,
    pub error: Option<JobError>,
    pub fine_tuned_model: Option<String>,
    pub finished_at: Option<i64>,
    pub hyperparameters: RequestedHyperparameters,
    pub model: String,
    pub organization_id: String,
    pub result_files: Vec<String>,
    pub seed: i64,
    pub status: JobStatus,
    pub trained_tokens: Option<i64>,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub integrations: Option<Vec<Value>>,
    pub estimated_finish: Option<i64>,
    pub metadata: Option<Value>,
    pub method: Method,
    pub user_provided_suffix: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    ValidatingFiles,
    Queued,
    Running,
    Paused,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::ValidatingFiles => "validating_files",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub const ALL: [JobStatus; 7] = [
        JobStatus::ValidatingFiles,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }
}

/// `fine_tuning.job.event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobEventObject {
    pub id: String,
    pub object: String,
    pub created_at: i64,
    pub level: String,
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Option<Value>,
}

/// `fine_tuning.job.checkpoint`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CheckpointObject {
    pub id: String,
    pub object: String,
    pub created_at: i64,
    pub fine_tuned_model_checkpoint: String,
    pub fine_tuning_job_id: String,
    pub step_number: i64,
    #[schema(value_type = Object)]
    pub metrics: Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_resolves_from_the_dataset_size() {
        let auto = RequestedHyperparameters::default();
        let h = resolve_hyperparameters(&auto, 20).unwrap();
        assert_eq!((h.n_epochs, h.batch_size, h.learning_rate_multiplier), (5, 1, 1.0));
        let h = resolve_hyperparameters(&auto, 5000).unwrap();
        assert_eq!((h.n_epochs, h.batch_size), (3, 10));
        let bad = RequestedHyperparameters { n_epochs: AutoOr::Value(0), ..auto };
        assert_eq!(resolve_hyperparameters(&bad, 20).unwrap_err().0, "n_epochs");
    }

    #[test]
    fn auto_or_value_parses_both() {
        let r: RequestedHyperparameters =
            serde_json::from_str(r#"{"n_epochs":"auto","batch_size":4}"#).unwrap();
        assert_eq!(r.batch_size, AutoOr::Value(4));
        assert!(matches!(r.n_epochs, AutoOr::Auto(_)));
        assert!(serde_json::from_str::<RequestedHyperparameters>(r#"{"n_epochs":"x"}"#).is_err());
    }
}
