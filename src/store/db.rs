//! `Store`: the SQLite database `<data_dir>/coserve.db` and the blob directory beside it.
//! Opening applies the schema migrations the file has not seen yet.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::Connection;

use super::blobs;
use super::{Result, StoreError};

pub const DB_FILE: &str = "coserve.db";
pub const BLOBS_DIR: &str = "blobs";

/// How long a statement waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Schema migrations in order; `PRAGMA user_version` counts those applied. Append only:
/// never edit an entry once released, since existing databases have already run it.
const MIGRATIONS: &[&str] = &[
    // 1: files, fine-tuning jobs and what they produce.
    "
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        status TEXT NOT NULL,
        blob_path TEXT NOT NULL
    );
    CREATE INDEX files_created ON files (created_at);

    CREATE TABLE fine_tuning_jobs (
        id TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL,
        status TEXT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX fine_tuning_jobs_created ON fine_tuning_jobs (created_at);

    CREATE TABLE job_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL REFERENCES fine_tuning_jobs (id) ON DELETE CASCADE,
        created_at INTEGER NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT
    );
    CREATE INDEX job_events_job ON job_events (job_id, seq);

    CREATE TABLE job_checkpoints (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES fine_tuning_jobs (id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        metrics TEXT NOT NULL,
        path TEXT NOT NULL,
        fine_tuned_model_checkpoint TEXT NOT NULL
    );
    CREATE INDEX job_checkpoints_job ON job_checkpoints (job_id, step);

    CREATE TABLE fine_tuned_models (
        id TEXT PRIMARY KEY,
        parent TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        owned_by TEXT NOT NULL,
        job_id TEXT REFERENCES fine_tuning_jobs (id) ON DELETE SET NULL,
        adapter_path TEXT NOT NULL
    );
    ",
];

/// The durable store. One connection behind a mutex: writes are rare and short, and SQLite
/// serialises writers anyway. Blocking; from async code use [`Store::call`].
pub struct Store {
    conn: Mutex<Connection>,
    data_dir: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir` and brings its schema up to date.
    pub fn open(data_dir: &Path) -> Result<Store> {
        let blobs = data_dir.join(BLOBS_DIR);
        std::fs::create_dir_all(&blobs)
            .map_err(|e| StoreError::io(format!("create {}", blobs.display()), e))?;
        // Temp files of writes that a crash interrupted; nothing else writes here yet.
        blobs::remove_stale_temps(&blobs)?;
        let path = data_dir.join(DB_FILE);
        let open_err = |source| StoreError::Open { path: path.display().to_string(), source };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        configure(&conn).map_err(open_err)?;
        migrate(&mut conn)?;
        Ok(Store { conn: Mutex::new(conn), data_dir: data_dir.to_path_buf() })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `<data_dir>/blobs`: every blob path stored in a row is relative to the data dir.
    pub fn blobs_dir(&self) -> PathBuf {
        self.data_dir.join(BLOBS_DIR)
    }

    /// The absolute path of a blob path kept in a row.
    pub fn blob_path(&self, relative: &str) -> PathBuf {
        self.data_dir.join(relative)
    }

    /// Runs `f` on tokio's blocking pool, so database and file I/O never stall the runtime.
    pub async fn call<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
    {
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || f(&store)).await.map_err(|_| StoreError::Interrupted)?
    }

    /// The connection. A panic while it was held leaves it usable: an open transaction is
    /// rolled back when its guard drops during unwinding.
    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The schema version of the open database (the number of migrations applied).
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self.conn().pragma_query_value(None, "user_version", |r| r.get(0))?)
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // WAL: readers never block the writer, and a commit appends instead of rewriting pages.
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
    // FULL syncs the WAL at every commit. NORMAL would survive a process crash but could lose
    // the last commits on power loss, i.e. forget an upload the client was told succeeded;
    // our writes are few (uploads, job state, events), so the extra fsync is cheap.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(())
}

/// Applies the migrations past the database's `user_version`, all in one transaction so a
/// failure leaves the previous schema intact.
fn migrate(conn: &mut Connection) -> Result<()> {
    let known = MIGRATIONS.len() as i64;
    let tx = conn.transaction()?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let applied = usize::try_from(found)
        .ok()
        .filter(|&n| n <= MIGRATIONS.len())
        .ok_or(StoreError::SchemaTooNew { found, known })?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_run_once_and_reopen_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        store
            .conn()
            .execute(
                "INSERT INTO files VALUES ('file-1', 1, 2, 'a.jsonl', 'fine-tune', 'processed', 'x')",
                [],
            )
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let n: i64 =
            store.conn().query_row("SELECT count(*) FROM files", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 1, "reopening keeps the rows");
        let mode: String =
            store.conn().pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = store.conn().pragma_query_value(None, "foreign_keys", |r| r.get(0)).unwrap();
        assert_eq!(fk, 1);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        match Store::open(dir.path()) {
            Err(StoreError::SchemaTooNew { found: 99, .. }) => {}
            other => panic!("expected SchemaTooNew, got {:?}", other.err()),
        }
    }

    #[test]
    fn an_unwritable_data_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(Store::open(&file), Err(StoreError::Io { .. })));
    }
}
