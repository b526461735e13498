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

/// A file put in place by [`replace_file`].
pub struct Replaced {
    /// The new file, open for appending (opened before the rename, so a
    /// caller that keeps appending never holds the replaced file).
    pub file: File,
    /// Whether the rename itself is durable (the directory fsync); the new
    /// file is in place either way.
    pub dir_synced: io::Result<()>,
}

/// Replaces `path` with `bytes` atomically: a temp file, fsynced, renamed
/// over `path`, then the directory fsynced. The file is 0600.
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<Replaced> {
    let tmp = path.with_extension("tmp");
    let mut file = create_private(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    let appender = OpenOptions::new().append(true).open(&tmp)?;
    drop(file);
    crate::failpoint!("mid-rewrite");
    fs::rename(&tmp, path)?;
    Ok(Replaced {
        file: appender,
        dir_synced: fsync_parent(path),
    })
}

/// [`replace_file`] for files that must be durable before going on.
pub fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file(path, bytes)?.dir_synced
}

/// Creates (or empties) `path` for writing, 0600.
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Opens `path` for appending, creating it 0600.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}
