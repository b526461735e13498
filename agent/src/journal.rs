//! The node journal of leases: an append-only file of fixed-size records
//! (grant, release). A `write()` per change is enough to survive SIGKILL (the
//! page cache outlives the process); leases need not survive power loss,
//! because their holders do not either. The file is compacted at start-up and
//! whenever it grows far beyond the live set.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use payload_catalog::{LeaseId, PayloadId};

const GRANT: u8 = 1;
const RELEASE: u8 = 2;
const RECORD: usize = 1 + 16 + 16 + 8;
/// Rewrite the file once it holds this many records more than are live.
const COMPACT_SLACK: u64 = 100_000;

/// A lease as the journal remembers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournaledLease {
    pub lease: LeaseId,
    pub payload: PayloadId,
    pub expires_ms: u64,
}

pub struct Journal {
    path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    records: u64,
    /// Live leases at the last compaction.
    live: u64,
}

fn encode(out: &mut Vec<u8>, tag: u8, lease: &JournaledLease) {
    out.push(tag);
    out.extend_from_slice(lease.lease.as_bytes());
    out.extend_from_slice(lease.payload.as_bytes());
    out.extend_from_slice(&lease.expires_ms.to_le_bytes());
}

impl Journal {
    /// Opens the journal, returning it with the leases it still holds (the
    /// caller drops expired ones). A torn final record is ignored.
    pub fn open(path: &Path) -> io::Result<(Journal, Vec<JournaledLease>)> {
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut live: HashMap<LeaseId, JournaledLease> = HashMap::new();
        for rec in bytes.chunks_exact(RECORD) {
            let (Ok(lease), Ok(payload)) = (LeaseId::from_slice(&rec[1..17]), PayloadId::from_slice(&rec[17..33]))
            else {
                continue;
            };
            let expires_ms = u64::from_le_bytes(rec[33..41].try_into().expect("8 bytes"));
            match rec[0] {
                GRANT => {
                    live.insert(
                        lease,
                        JournaledLease {
                            lease,
                            payload,
                            expires_ms,
                        },
                    );
                }
                RELEASE => {
                    live.remove(&lease);
                }
                _ => {}
            }
        }
        let leases: Vec<JournaledLease> = live.into_values().collect();
        let file = Self::rewrite(path, &leases)?;
        let journal = Journal {
            path: path.to_path_buf(),
            inner: Mutex::new(Inner {
                file,
                records: leases.len() as u64,
                live: leases.len() as u64,
            }),
        };
        Ok((journal, leases))
    }

    /// Writes `leases` to a fresh file and atomically puts it in place.
    fn rewrite(path: &Path, leases: &[JournaledLease]) -> io::Result<File> {
        let tmp = path.with_extension("compact");
        let mut buf = Vec::with_capacity(leases.len() * RECORD);
        for lease in leases {
            encode(&mut buf, GRANT, lease);
        }
        let mut file = File::create(&tmp)?;
        file.write_all(&buf)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        OpenOptions::new().append(true).open(path)
    }

    pub fn grant(&self, leases: &[JournaledLease]) -> io::Result<()> {
        self.append(GRANT, leases)
    }

    pub fn release(&self, leases: &[JournaledLease]) -> io::Result<()> {
        self.append(RELEASE, leases)
    }

    fn append(&self, tag: u8, leases: &[JournaledLease]) -> io::Result<()> {
        if leases.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(leases.len() * RECORD);
        for lease in leases {
            encode(&mut buf, tag, lease);
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.file.write_all(&buf)?;
        inner.records += leases.len() as u64;
        Ok(())
    }

    /// Rewrites the file with only `live` if it has grown well past it.
    /// `live` must be read while no grant is in flight, so callers pass a
    /// closure evaluated under the journal lock.
    pub fn maybe_compact(&self, live: impl FnOnce() -> Vec<JournaledLease>) -> io::Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.records < COMPACT_SLACK.max(2 * inner.live) {
            return Ok(());
        }
        let leases = live();
        inner.file = Self::rewrite(&self.path, &leases)?;
        inner.records = leases.len() as u64;
        inner.live = leases.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(expires_ms: u64) -> JournaledLease {
        JournaledLease {
            lease: LeaseId::random(),
            payload: PayloadId::random(),
            expires_ms,
        }
    }

    #[test]
    fn reopening_returns_granted_and_not_released_leases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.journal");
        let (a, b, c) = (lease(10), lease(20), lease(30));
        {
            let (journal, old) = Journal::open(&path).unwrap();
            assert!(old.is_empty());
            journal.grant(&[a, b]).unwrap();
            journal.grant(&[c]).unwrap();
            journal.release(&[b]).unwrap();
        }
        let (_journal, mut live) = Journal::open(&path).unwrap();
        live.sort_by_key(|l| l.expires_ms);
        assert_eq!(live, vec![a, c]);
    }

    #[test]
    fn a_torn_last_record_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.journal");
        let a = lease(10);
        {
            let (journal, _) = Journal::open(&path).unwrap();
            journal.grant(&[a]).unwrap();
        }
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[GRANT, 1, 2, 3]).unwrap();
        let (_journal, live) = Journal::open(&path).unwrap();
        assert_eq!(live, vec![a]);
    }
}
