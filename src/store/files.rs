//! Rows of the `files` table (uploaded and generated files) and their blobs under
//! `blobs/files/<id>`.

use rusqlite::{params, OptionalExtension, Row};

use super::blobs::{self, BlobWriter};
use super::db::{Store, BLOBS_DIR};
use super::{overfetch, Entity, Order, Page, Result, StoreError};

/// `status` of every stored file: there is no asynchronous processing step.
pub const STATUS_PROCESSED: &str = "processed";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRow {
    pub id: String,
    /// Unix seconds.
    pub created_at: i64,
    pub bytes: i64,
    pub filename: String,
    pub purpose: String,
    pub status: String,
    /// Relative to the data dir (see `Store::blob_path`).
    pub blob_path: String,
}

/// A listing of files, as OpenAI's `GET /v1/files` takes it.
#[derive(Debug, Clone, Default)]
pub struct FileQuery {
    pub purpose: Option<String>,
    pub limit: usize,
    pub order: Order,
    /// Only files after this one in `order`.
    pub after: Option<String>,
}

/// A new file id: `file-` and 32 hex digits.
pub fn new_file_id() -> String {
    format!("file-{}", uuid::Uuid::new_v4().simple())
}

/// Where the blob of file `id` lives, relative to the data dir.
pub fn file_blob_path(id: &str) -> String {
    format!("{BLOBS_DIR}/files/{id}")
}

const COLUMNS: &str = "id, created_at, bytes, filename, purpose, status, blob_path";

fn from_row(r: &Row<'_>) -> rusqlite::Result<FileRow> {
    Ok(FileRow {
        id: r.get(0)?,
        created_at: r.get(1)?,
        bytes: r.get(2)?,
        filename: r.get(3)?,
        purpose: r.get(4)?,
        status: r.get(5)?,
        blob_path: r.get(6)?,
    })
}

impl Store {
    pub fn insert_file(&self, f: &FileRow) -> Result<()> {
        self.conn().execute(
            &format!("INSERT INTO files ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
            params![f.id, f.created_at, f.bytes, f.filename, f.purpose, f.status, f.blob_path],
        )?;
        Ok(())
    }

    pub fn get_file(&self, id: &str) -> Result<FileRow> {
        self.conn()
            .query_row(&format!("SELECT {COLUMNS} FROM files WHERE id = ?1"), [id], from_row)
            .optional()?
            .ok_or_else(|| StoreError::not_found(Entity::File, id))
    }

    /// Files in creation order (ties broken by insertion), filtered and paged.
    pub fn list_files(&self, q: &FileQuery) -> Result<Page<FileRow>> {
        let conn = self.conn();
        // The cursor is the position (created_at, rowid) of the `after` file.
        let cursor: Option<(i64, i64)> = match &q.after {
            None => None,
            Some(id) => Some(
                conn.query_row("SELECT created_at, rowid FROM files WHERE id = ?1", [id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?
                .ok_or_else(|| StoreError::UnknownCursor { kind: Entity::File, id: id.clone() })?,
            ),
        };
        let (cmp, dir) = match q.order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM files
             WHERE (?1 IS NULL OR purpose = ?1)
               AND (?2 IS NULL OR (created_at, rowid) {cmp} (?2, ?3))
             ORDER BY created_at {dir}, rowid {dir} LIMIT ?4"
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt
            .query_map(
                params![q.purpose, cursor.map(|c| c.0), cursor.map(|c| c.1), overfetch(q.limit)],
                from_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Page::from_overfetch(rows, q.limit))
    }

    /// Deletes the row, then its blob; returns the row. A blob that cannot be removed stays
    /// as an orphan (logged): the file is gone for clients either way.
    pub fn delete_file(&self, id: &str) -> Result<FileRow> {
        let row = {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let row = tx
                .query_row(&format!("SELECT {COLUMNS} FROM files WHERE id = ?1"), [id], from_row)
                .optional()?
                .ok_or_else(|| StoreError::not_found(Entity::File, id))?;
            tx.execute("DELETE FROM files WHERE id = ?1", [id])?;
            tx.commit()?;
            row
        };
        if let Err(e) = blobs::remove(&self.blob_path(&row.blob_path)) {
            tracing::warn!(file = %row.id, error = %e, "cannot remove the blob of a deleted file");
        }
        Ok(row)
    }

    /// Starts the blob of a new file: write the content to the returned writer, then pass it
    /// to [`Store::finish_file`].
    pub fn begin_file(&self, limit: u64) -> Result<(String, BlobWriter)> {
        let id = new_file_id();
        let writer = BlobWriter::create(&self.blob_path(&file_blob_path(&id)), limit)?;
        Ok((id, writer))
    }

    /// Commits the blob of file `id` and records its row.
    pub fn finish_file(
        &self,
        id: String,
        writer: BlobWriter,
        filename: &str,
        purpose: &str,
    ) -> Result<FileRow> {
        let bytes = writer.commit()?;
        let row = FileRow {
            blob_path: file_blob_path(&id),
            id,
            created_at: unix_now(),
            bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
            filename: filename.to_string(),
            purpose: purpose.to_string(),
            status: STATUS_PROCESSED.to_string(),
        };
        if let Err(e) = self.insert_file(&row) {
            // Without its row the blob is unreachable.
            let _ = blobs::remove(&self.blob_path(&row.blob_path));
            return Err(e);
        }
        Ok(row)
    }

    /// Stores `bytes` as a new file, e.g. the results of a fine-tuning job with purpose
    /// `fine-tune-results`. Blocking; from async code wrap it in [`Store::call`].
    pub fn save_file(&self, filename: &str, purpose: &str, bytes: &[u8]) -> Result<FileRow> {
        let (id, mut writer) = self.begin_file(u64::MAX)?;
        writer.write(bytes)?;
        self.finish_file(id, writer, filename, purpose)
    }

    /// The content of a stored file, read whole (for small files such as training data).
    pub fn read_file_content(&self, id: &str) -> Result<Vec<u8>> {
        let row = self.get_file(id)?;
        let path = self.blob_path(&row.blob_path);
        std::fs::read(&path).map_err(|e| StoreError::io(format!("read {}", path.display()), e))
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, created_at: i64, purpose: &str) -> FileRow {
        FileRow {
            id: id.into(),
            created_at,
            bytes: 1,
            filename: format!("{id}.jsonl"),
            purpose: purpose.into(),
            status: STATUS_PROCESSED.into(),
            blob_path: file_blob_path(id),
        }
    }

    fn ids(p: &Page<FileRow>) -> Vec<&str> {
        p.data.iter().map(|f| f.id.as_str()).collect()
    }

    fn query(limit: usize, order: Order, after: Option<&str>) -> FileQuery {
        FileQuery { purpose: None, limit, order, after: after.map(str::to_string) }
    }

    #[test]
    fn cursor_paging_in_both_orders() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Same timestamps for b and c: insertion order breaks the tie.
        for (id, t) in [("a", 10), ("b", 20), ("c", 20), ("d", 30), ("e", 40)] {
            store.insert_file(&row(id, t, "fine-tune")).unwrap();
        }
        let p = store.list_files(&query(2, Order::Asc, None)).unwrap();
        assert_eq!((ids(&p), p.has_more), (vec!["a", "b"], true));
        let p = store.list_files(&query(2, Order::Asc, Some("b"))).unwrap();
        assert_eq!((ids(&p), p.has_more), (vec!["c", "d"], true));
        let p = store.list_files(&query(2, Order::Asc, Some("d"))).unwrap();
        assert_eq!((ids(&p), p.has_more), (vec!["e"], false));
        let p = store.list_files(&query(10, Order::Desc, None)).unwrap();
        assert_eq!((ids(&p), p.has_more), (vec!["e", "d", "c", "b", "a"], false));
        let p = store.list_files(&query(2, Order::Desc, Some("c"))).unwrap();
        assert_eq!((ids(&p), p.has_more), (vec!["b", "a"], false));
        let p = store.list_files(&query(1, Order::Desc, Some("a"))).unwrap();
        assert_eq!((ids(&p), p.has_more), (vec![], false));
        assert!(matches!(
            store.list_files(&query(1, Order::Desc, Some("zz"))),
            Err(StoreError::UnknownCursor { .. })
        ));
    }

    #[test]
    fn purpose_filter_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.insert_file(&row("a", 1, "fine-tune")).unwrap();
        store.insert_file(&row("b", 2, "batch")).unwrap();
        let q = FileQuery { purpose: Some("batch".into()), limit: 10, ..FileQuery::default() };
        assert_eq!(ids(&store.list_files(&q).unwrap()), vec!["b"]);
        assert_eq!(store.delete_file("b").unwrap().id, "b");
        assert!(store.list_files(&q).unwrap().data.is_empty());
        assert!(matches!(store.get_file("b"), Err(StoreError::NotFound { .. })));
        assert!(matches!(store.delete_file("b"), Err(StoreError::NotFound { .. })));
    }

    #[test]
    fn saved_bytes_round_trip_and_delete_removes_the_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let content = b"step,train_loss\n1,2.5\n\xff";
        let f = store.save_file("results.csv", "fine-tune-results", content).unwrap();
        assert!(f.id.starts_with("file-"));
        assert_eq!(f.bytes, content.len() as i64);
        assert_eq!(store.get_file(&f.id).unwrap(), f);
        assert_eq!(store.read_file_content(&f.id).unwrap(), content);
        let blob = store.blob_path(&f.blob_path);
        assert!(blob.is_file());
        store.delete_file(&f.id).unwrap();
        assert!(!blob.exists());
    }
}
