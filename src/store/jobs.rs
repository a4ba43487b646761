//! Rows of fine-tuning jobs and what they produce: events, checkpoints and fine-tuned models.
//! A job's full OpenAI object is kept as JSON in `body`; `status` is copied out for queries
//! (e.g. finding the jobs to resume at start).

use rusqlite::{params, OptionalExtension, Row};
use serde_json::Value;

use super::db::Store;
use super::{from_json, overfetch, to_json, Entity, Page, Result, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: String,
    /// Unix seconds.
    pub created_at: i64,
    pub status: String,
    /// The full `fine_tuning.job` object.
    pub body: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub id: String,
    pub job_id: String,
    pub created_at: i64,
    pub level: String,
    pub message: String,
    pub data: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRow {
    pub id: String,
    pub job_id: String,
    pub step: i64,
    pub created_at: i64,
    pub metrics: Value,
    /// Relative to the data dir.
    pub path: String,
    pub fine_tuned_model_checkpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRow {
    pub id: String,
    pub parent: String,
    pub created_at: i64,
    pub owned_by: String,
    pub job_id: Option<String>,
    /// Relative to the data dir.
    pub adapter_path: String,
}

fn job_from_row(r: &Row<'_>) -> rusqlite::Result<(String, i64, String, String)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn job(raw: (String, i64, String, String)) -> Result<JobRow> {
    let (id, created_at, status, body) = raw;
    Ok(JobRow { id, created_at, status, body: from_json("fine_tuning_jobs.body", &body)? })
}

type RawEvent = (String, String, i64, String, String, Option<String>);

fn event_from_row(r: &Row<'_>) -> rusqlite::Result<RawEvent> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
}

fn event(raw: RawEvent) -> Result<EventRow> {
    let (id, job_id, created_at, level, message, data) = raw;
    let data = data.map(|d| from_json("job_events.data", &d)).transpose()?;
    Ok(EventRow { id, job_id, created_at, level, message, data })
}

type RawCheckpoint = (String, String, i64, i64, String, String, String);

fn checkpoint_from_row(r: &Row<'_>) -> rusqlite::Result<RawCheckpoint> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
}

fn checkpoint(raw: RawCheckpoint) -> Result<CheckpointRow> {
    let (id, job_id, step, created_at, metrics, path, fine_tuned_model_checkpoint) = raw;
    let metrics = from_json("job_checkpoints.metrics", &metrics)?;
    Ok(CheckpointRow { id, job_id, step, created_at, metrics, path, fine_tuned_model_checkpoint })
}

fn model_from_row(r: &Row<'_>) -> rusqlite::Result<ModelRow> {
    Ok(ModelRow {
        id: r.get(0)?,
        parent: r.get(1)?,
        created_at: r.get(2)?,
        owned_by: r.get(3)?,
        job_id: r.get(4)?,
        adapter_path: r.get(5)?,
    })
}

const JOB_COLUMNS: &str = "id, created_at, status, body";
const EVENT_COLUMNS: &str = "id, job_id, created_at, level, message, data";
const CHECKPOINT_COLUMNS: &str =
    "id, job_id, step, created_at, metrics, path, fine_tuned_model_checkpoint";
const MODEL_COLUMNS: &str = "id, parent, created_at, owned_by, job_id, adapter_path";

impl Store {
    pub fn insert_job(&self, j: &JobRow) -> Result<()> {
        self.conn().execute(
            &format!("INSERT INTO fine_tuning_jobs ({JOB_COLUMNS}) VALUES (?1, ?2, ?3, ?4)"),
            params![j.id, j.created_at, j.status, to_json(&j.body)],
        )?;
        Ok(())
    }

    /// Replaces a job's status and body.
    pub fn update_job(&self, id: &str, status: &str, body: &Value) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE fine_tuning_jobs SET status = ?2, body = ?3 WHERE id = ?1",
            params![id, status, to_json(body)],
        )?;
        if n == 0 {
            return Err(StoreError::not_found(Entity::FineTuningJob, id));
        }
        Ok(())
    }

    pub fn get_job(&self, id: &str) -> Result<JobRow> {
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM fine_tuning_jobs WHERE id = ?1"),
                [id],
                job_from_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::not_found(Entity::FineTuningJob, id))?;
        job(raw)
    }

    /// Jobs newest first; `after` continues after that job.
    pub fn list_jobs(&self, after: Option<&str>, limit: usize) -> Result<Page<JobRow>> {
        let conn = self.conn();
        let cursor: Option<(i64, i64)> = match after {
            None => None,
            Some(id) => Some(
                conn.query_row(
                    "SELECT created_at, rowid FROM fine_tuning_jobs WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?
                .ok_or_else(|| StoreError::UnknownCursor {
                    kind: Entity::FineTuningJob,
                    id: id.to_string(),
                })?,
            ),
        };
        let mut stmt = conn.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM fine_tuning_jobs
             WHERE (?1 IS NULL OR (created_at, rowid) < (?1, ?2))
             ORDER BY created_at DESC, rowid DESC LIMIT ?3"
        ))?;
        let raw = stmt
            .query_map(
                params![cursor.map(|c| c.0), cursor.map(|c| c.1), overfetch(limit)],
                job_from_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let rows = raw.into_iter().map(job).collect::<Result<Vec<_>>>()?;
        Ok(Page::from_overfetch(rows, limit))
    }

    /// Jobs whose status is one of `statuses`, oldest first (e.g. those to resume at start).
    pub fn jobs_with_status(&self, statuses: &[&str]) -> Result<Vec<JobRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM fine_tuning_jobs WHERE status IN
             (SELECT value FROM json_each(?1)) ORDER BY created_at, rowid"
        ))?;
        let wanted = serde_json::to_string(statuses)
            .map_err(|source| StoreError::Json { column: "status", source })?;
        let raw = stmt.query_map([wanted], job_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        raw.into_iter().map(job).collect()
    }

    /// Appends an event to its job's log.
    pub fn append_event(&self, e: &EventRow) -> Result<()> {
        self.conn().execute(
            &format!("INSERT INTO job_events ({EVENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
            params![e.id, e.job_id, e.created_at, e.level, e.message, e.data.as_ref().map(to_json)],
        )?;
        Ok(())
    }

    /// A job's events newest first, as OpenAI lists them; `after` continues after that event
    /// (i.e. with older ones).
    pub fn list_events(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<EventRow>> {
        let conn = self.conn();
        let cursor: Option<i64> = match after {
            None => None,
            Some(id) => Some(
                conn.query_row(
                    "SELECT seq FROM job_events WHERE id = ?1 AND job_id = ?2",
                    [id, job_id],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| StoreError::UnknownCursor {
                    kind: Entity::JobEvent,
                    id: id.to_string(),
                })?,
            ),
        };
        let mut stmt = conn.prepare(&format!(
            "SELECT {EVENT_COLUMNS} FROM job_events
             WHERE job_id = ?1 AND (?2 IS NULL OR seq < ?2)
             ORDER BY seq DESC LIMIT ?3"
        ))?;
        let raw = stmt
            .query_map(params![job_id, cursor, overfetch(limit)], event_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let rows = raw.into_iter().map(event).collect::<Result<Vec<_>>>()?;
        Ok(Page::from_overfetch(rows, limit))
    }

    /// All of a job's events, oldest first.
    pub fn all_events(&self, job_id: &str) -> Result<Vec<EventRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = ?1 ORDER BY seq ASC"
        ))?;
        let raw =
            stmt.query_map([job_id], event_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        raw.into_iter().map(event).collect()
    }

    pub fn insert_checkpoint(&self, c: &CheckpointRow) -> Result<()> {
        self.conn().execute(
            &format!(
                "INSERT INTO job_checkpoints ({CHECKPOINT_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
            ),
            params![
                c.id,
                c.job_id,
                c.step,
                c.created_at,
                to_json(&c.metrics),
                c.path,
                c.fine_tuned_model_checkpoint
            ],
        )?;
        Ok(())
    }

    /// A job's checkpoints, latest step first; `after` continues after that checkpoint.
    pub fn list_checkpoints(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<CheckpointRow>> {
        let conn = self.conn();
        let cursor: Option<(i64, i64)> = match after {
            None => None,
            Some(id) => Some(
                conn.query_row(
                    "SELECT step, rowid FROM job_checkpoints WHERE id = ?1 AND job_id = ?2",
                    [id, job_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?
                .ok_or_else(|| StoreError::UnknownCursor {
                    kind: Entity::Checkpoint,
                    id: id.to_string(),
                })?,
            ),
        };
        let mut stmt = conn.prepare(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM job_checkpoints
             WHERE job_id = ?1 AND (?2 IS NULL OR (step, rowid) < (?2, ?3))
             ORDER BY step DESC, rowid DESC LIMIT ?4"
        ))?;
        let raw = stmt
            .query_map(
                params![job_id, cursor.map(|c| c.0), cursor.map(|c| c.1), overfetch(limit)],
                checkpoint_from_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let rows = raw.into_iter().map(checkpoint).collect::<Result<Vec<_>>>()?;
        Ok(Page::from_overfetch(rows, limit))
    }

    pub fn insert_model(&self, m: &ModelRow) -> Result<()> {
        self.conn().execute(
            &format!(
                "INSERT INTO fine_tuned_models ({MODEL_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ),
            params![m.id, m.parent, m.created_at, m.owned_by, m.job_id, m.adapter_path],
        )?;
        Ok(())
    }

    /// Every fine-tuned model, oldest first.
    pub fn list_models(&self) -> Result<Vec<ModelRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {MODEL_COLUMNS} FROM fine_tuned_models ORDER BY created_at, rowid"
        ))?;
        let rows = stmt.query_map([], model_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn get_model(&self, id: &str) -> Result<ModelRow> {
        self.conn()
            .query_row(
                &format!("SELECT {MODEL_COLUMNS} FROM fine_tuned_models WHERE id = ?1"),
                [id],
                model_from_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::not_found(Entity::Model, id))
    }

    /// Deletes a model's row and returns it; its adapter files are the caller's to remove.
    pub fn delete_model(&self, id: &str) -> Result<ModelRow> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let row = tx
            .query_row(
                &format!("SELECT {MODEL_COLUMNS} FROM fine_tuned_models WHERE id = ?1"),
                [id],
                model_from_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::not_found(Entity::Model, id))?;
        tx.execute("DELETE FROM fine_tuned_models WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(row)
    }
}

#[cfg(test)]
#[path = "jobs_tests.rs"]
mod tests;
