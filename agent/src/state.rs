//! The node's state directory: private to its user (0700), locked by one
//! agent at a time (`flock`, which the kernel drops when the process dies,
//! so a restart after SIGKILL is never refused), and home of the node id: a
//! random name made once and embedded in every region the node creates, so
//! that agents sharing `/dev/shm` or a disk root can tell their files apart
//! and never delete each other's.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::durable;

/// Length of a node id: 16 lowercase hex digits (64 random bits).
const NODE_ID_LEN: usize = 16;

/// An opened, locked state directory.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    node_id: String,
    /// Held for the life of the node; closing it releases the lock.
    _lock: File,
}

impl StateDir {
    /// Creates (0700) or tightens the directory, takes its lock and reads
    /// (or makes) the node id.
    pub fn open(path: &Path) -> anyhow::Result<StateDir> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .with_context(|| format!("creating the state dir {}", path.display()))?;
        let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            bail!(
                "the state dir {} belongs to uid {}, not to this user (uid {me}); use a state dir of your own (--state-dir)",
                path.display(),
                meta.uid()
            );
        }
        if meta.mode() & 0o077 != 0 {
            fs::set_permissions(path, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("making the state dir {} private (0700)", path.display()))?;
            tracing::info!(dir = %path.display(), "made the state dir private (0700)");
        }
        let lock_path = path.join("agent.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!(
                    "another payload-agent is running on the state dir {}; stop it, or give this agent its own --state-dir",
                    path.display()
                );
            }
            return Err(err).with_context(|| format!("locking {}", lock_path.display()));
        }
        let node_id = node_id(path)?;
        Ok(StateDir {
            path: path.to_path_buf(),
            node_id,
            _lock: lock,
        })
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The id embedded in this node's region names.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Whether the machine has booted since this state dir was last used: a
    /// power cut may have left files that were never synced full of zeros.
    /// (`None` when unknown: a state dir that never recorded a boot.)
    pub fn rebooted(&self) -> Option<bool> {
        let recorded = fs::read_to_string(self.join("boot-id")).ok()?;
        Some(recorded.trim() != current_boot()?.trim())
    }

    /// Records this boot, once start-up has checked what it must.
    pub fn record_boot(&self) -> anyhow::Result<()> {
        if let Some(boot) = current_boot() {
            durable::write_durably(&self.join("boot-id"), boot.as_bytes()).context("recording the boot id")?;
        }
        Ok(())
    }
}

fn current_boot() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()
}

fn node_id(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("node-id");
    match fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if id.len() != NODE_ID_LEN || !id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                bail!(
                    "{} holds {id:?}, not a node id ({NODE_ID_LEN} hex digits); restore it from a backup (regions are named after it)",
                    path.display()
                );
            }
            Ok(id.to_string())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = format!("{:016x}", uuid::Uuid::new_v4().as_u128() as u64);
            durable::write_durably(&path, format!("{id}\n").as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_is_refused_and_the_node_id_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let first = StateDir::open(&path).unwrap();
        let err = StateDir::open(&path).unwrap_err().to_string();
        assert!(err.contains("another payload-agent"), "{err}");
        let id = first.node_id().to_string();
        assert_eq!(id.len(), NODE_ID_LEN);
        drop(first);
        let again = StateDir::open(&path).unwrap();
        assert_eq!(again.node_id(), id, "the id is made once");
        let mode = fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn an_open_state_dir_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let _state = StateDir::open(dir.path()).unwrap();
        assert_eq!(fs::metadata(dir.path()).unwrap().mode() & 0o777, 0o700);
    }
}
