//! Durable state: rows in SQLite (`db`, `files`, `jobs`) and blobs on the local disk (`blobs`).
//!
//! Callers see plain row structs and `StoreError`, never SQL, so another backend (PostgreSQL,
//! object storage) can replace these without touching the API. The store is used from HTTP
//! handlers and the job manager through blocking calls (`Store::call` runs them on tokio's
//! blocking pool); the engine thread never touches it.

pub mod blobs;
pub mod db;
pub mod files;
pub mod jobs;

use std::fmt;

pub use blobs::{write_atomic, BlobWriter};
pub use db::Store;
pub use files::{FileQuery, FileRow};
pub use jobs::{CheckpointRow, EventRow, JobRow, ModelRow};

/// The kinds of stored objects, for messages and error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    File,
    FineTuningJob,
    JobEvent,
    Checkpoint,
    Model,
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Entity::File => "File",
            Entity::FineTuningJob => "fine-tuning job",
            Entity::JobEvent => "fine-tuning event",
            Entity::Checkpoint => "checkpoint",
            Entity::Model => "model",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("the database has schema version {found}; this build knows versions 0 to {known}")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("stored JSON in {column} is invalid: {source}")]
    Json { column: &'static str, source: serde_json::Error },
    #[error("No such {kind} object: {id}")]
    NotFound { kind: Entity, id: String },
    /// A paging cursor (`after`) that names no object of the listed kind.
    #[error("The `after` cursor names no {kind} object: {id}")]
    UnknownCursor { kind: Entity, id: String },
    #[error("The data exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("a storage task was interrupted")]
    Interrupted,
}

impl StoreError {
    /// An I/O failure with what was being done, e.g. "create /data/blobs/files".
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io { context: context.into(), source }
    }

    pub fn not_found(kind: Entity, id: impl Into<String>) -> Self {
        StoreError::NotFound { kind, id: id.into() }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Sort order of a listing, by creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    Asc,
    #[default]
    Desc,
}

/// One page of a listing: `has_more` says whether rows follow the last one in `data`.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub has_more: bool,
}

impl<T> Page<T> {
    /// From up to `limit + 1` rows fetched in order: the extra row only signals `has_more`.
    pub(crate) fn from_overfetch(mut rows: Vec<T>, limit: usize) -> Self {
        let has_more = rows.len() > limit;
        rows.truncate(limit);
        Page { data: rows, has_more }
    }
}

/// Rows fetched to fill a page of `limit` (one extra to learn `has_more`), as SQLite's type.
pub(crate) fn overfetch(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX - 1).saturating_add(1)
}

pub(crate) fn to_json(v: &serde_json::Value) -> String {
    v.to_string()
}

pub(crate) fn from_json(column: &'static str, s: &str) -> Result<serde_json::Value> {
    serde_json::from_str(s).map_err(|source| StoreError::Json { column, source })
}
