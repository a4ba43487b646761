//! Blobs on the local disk under `<data_dir>/blobs/`. Every write goes to a temp file in the
//! destination's directory and is renamed into place after an fsync, so a reader or a crash
//! sees either the whole old content or the whole new one, never a torn file.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Result, StoreError};

/// Prefix of temp files; `remove_stale_temps` deletes leftovers with it.
const TEMP_PREFIX: &str = ".tmp-";

fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = format!("{what} {}", path.display());
    move |e| StoreError::io(context, e)
}

fn parent_of(path: &Path) -> Result<&Path> {
    path.parent().filter(|p| !p.as_os_str().is_empty()).ok_or_else(|| {
        StoreError::io(
            format!("blob path {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "has no parent directory"),
        )
    })
}

fn temp_path(dir: &Path) -> PathBuf {
    dir.join(format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4().simple()))
}

/// Makes a rename or removal in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync directory", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes `bytes` to `path` atomically: temp file in the same directory, fsync, rename, fsync
/// of the directory. Creates missing parent directories. On failure the temp file is removed
/// and `path` is unchanged.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut w = BlobWriter::create(path, u64::MAX)?;
    w.write(bytes)?;
    w.commit()?;
    Ok(())
}

/// Streams a blob of unknown size to disk, e.g. an upload, within a byte limit. Nothing
/// appears at the destination until `commit`; an uncommitted writer removes its temp file
/// when dropped, so an aborted upload leaves nothing behind.
pub struct BlobWriter {
    dest: PathBuf,
    temp: PathBuf,
    /// `None` once the temp file is gone (committed or discarded).
    file: Option<File>,
    written: u64,
    limit: u64,
}

impl BlobWriter {
    /// Starts writing the blob that `commit` will place at `dest` (at most `limit` bytes).
    pub fn create(dest: &Path, limit: u64) -> Result<Self> {
        let dir = parent_of(dest)?;
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let temp = temp_path(dir);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(io_err("create", &temp))?;
        Ok(Self { dest: dest.to_path_buf(), temp, file: Some(file), written: 0, limit })
    }

    /// Appends `chunk`. Going over the limit discards everything written so far (the temp
    /// file is removed at once) and returns `TooLarge`.
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Err(StoreError::io(
                format!("write {}", self.temp.display()),
                std::io::Error::other("the blob writer was already discarded"),
            ));
        };
        let total = self.written.saturating_add(chunk.len() as u64);
        if total > self.limit {
            self.discard();
            return Err(StoreError::TooLarge { limit: self.limit });
        }
        if let Err(e) = file.write_all(chunk) {
            self.discard();
            return Err(StoreError::io(format!("write {}", self.temp.display()), e));
        }
        self.written = total;
        Ok(())
    }

    /// Bytes accepted so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Makes the blob durable at its destination (replacing any file there) and returns its
    /// size: fsync, rename, fsync of the directory.
    pub fn commit(mut self) -> Result<u64> {
        let Some(file) = self.file.take() else {
            return Err(StoreError::io(
                format!("commit {}", self.temp.display()),
                std::io::Error::other("the blob writer was already discarded"),
            ));
        };
        let synced = file.sync_all();
        drop(file);
        if let Err(e) = synced {
            self.remove_temp();
            return Err(StoreError::io(format!("sync {}", self.temp.display()), e));
        }
        if let Err(e) = std::fs::rename(&self.temp, &self.dest) {
            self.remove_temp();
            return Err(StoreError::io(format!("rename to {}", self.dest.display()), e));
        }
        sync_dir(parent_of(&self.dest)?)?;
        Ok(self.written)
    }

    fn discard(&mut self) {
        if self.file.take().is_some() {
            self.remove_temp();
        }
    }

    fn remove_temp(&self) {
        if let Err(e) = std::fs::remove_file(&self.temp) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.temp.display(), error = %e, "cannot remove temp file");
            }
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        self.discard();
    }
}

/// Removes a blob; a blob already gone is not an error.
pub fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(parent_of(path)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(format!("remove {}", path.display()), e)),
    }
}

/// Deletes temp files that interrupted writes left anywhere under `root`. Only safe while no
/// writer is active, i.e. when the store opens.
pub fn remove_stale_temps(root: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io(format!("list {}", root.display()), e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("list", root))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err("stat", &path))?;
        if kind.is_dir() {
            remove_stale_temps(&path)?;
        } else if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            tracing::info!(path = %path.display(), "removing an interrupted write");
            std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/blob");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(names(&dir.path().join("a/b")), vec!["blob"]);
    }

    #[test]
    fn a_failed_atomic_write_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty directory fails.
        let path = dir.path().join("occupied");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inner"), b"x").unwrap();
        assert!(matches!(write_atomic(&path, b"data"), Err(StoreError::Io { .. })));
        assert_eq!(names(dir.path()), vec!["occupied"]);
    }

    #[test]
    fn writer_enforces_its_limit_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("upload");
        let mut w = BlobWriter::create(&dest, 5).unwrap();
        w.write(b"abc").unwrap();
        w.write(b"de").unwrap();
        assert_eq!(w.written(), 5);
        assert!(matches!(w.write(b"f"), Err(StoreError::TooLarge { limit: 5 })));
        assert!(names(dir.path()).is_empty(), "temp removed at once");
        assert!(w.write(b"g").is_err());
        assert!(w.commit().is_err());
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn dropping_an_uncommitted_writer_removes_its_temp() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = BlobWriter::create(&dir.path().join("upload"), 100).unwrap();
        w.write(b"partial").unwrap();
        assert_eq!(names(dir.path()).len(), 1);
        drop(w);
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn commit_places_the_blob() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("upload");
        let mut w = BlobWriter::create(&dest, 100).unwrap();
        w.write(&[0, 159, 146, 150]).unwrap();
        w.write(b"").unwrap();
        assert_eq!(w.commit().unwrap(), 4);
        assert_eq!(std::fs::read(&dest).unwrap(), vec![0, 159, 146, 150]);
        assert_eq!(names(dir.path()), vec!["upload"]);
    }

    #[test]
    fn stale_temps_are_removed_recursively() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("files")).unwrap();
        std::fs::write(dir.path().join("files/.tmp-1"), b"x").unwrap();
        std::fs::write(dir.path().join("files/keep"), b"x").unwrap();
        remove_stale_temps(dir.path()).unwrap();
        assert_eq!(names(&dir.path().join("files")), vec!["keep"]);
    }
}
