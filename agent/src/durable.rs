//! Small helpers for files that must survive power loss: a rename is only
//! durable once the directory holding it is fsynced, and a file replaced by
//! rename must be fsynced before it is put in place.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Fsyncs the directory that holds `path`, so a create, rename or unlink of
/// `path` survives power loss.
pub fn fsync_parent(path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes` atomically and durably: a temp file, fsynced,
/// renamed over `path`, then the directory fsynced. The file is 0600. Gives
/// back the new file open for appending, opened before the rename, so a
/// caller that keeps appending never holds the replaced file by mistake.
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    let appender = OpenOptions::new().append(true).open(&tmp)?;
    drop(file);
    crate::failpoint!("mid-rewrite");
    fs::rename(&tmp, path)?;
    if let Err(e) = fsync_parent(path) {
        // The new file is in place for this process; only the rename's
        // durability is in doubt, and the next rewrite tries again.
        tracing::warn!(path = %path.display(), %e, "could not fsync the directory after a rename");
    }
    Ok(appender)
}

/// Opens `path` for appending, creating it 0600.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}
