//! The node journal of leases: an append-only file of fixed-size records
//! (grant, release), each with a CRC-32, after a header naming the format.
//! A `write()` per change is enough to survive SIGKILL (the page cache
//! outlives the process); leases need not survive power loss, because their
//! holders do not either. A damaged record (a short write, say) is skipped
//! and reading resumes at the next record whose checksum holds, so one bad
//! write never hides the records after it. The file is compacted at
//! start-up and whenever it grows far beyond the live set.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use payload_catalog::{LeaseId, PayloadId};

use crate::durable;

const GRANT: u8 = 1;
const RELEASE: u8 = 2;
/// Starts every journal in this format.
const MAGIC: &[u8; 8] = b"PMLJ\x02\0\0\0";
const BODY: usize = 1 + 16 + 16 + 8;
const RECORD: usize = BODY + 4;
/// Rewrite the file once it holds this many records more than are live.
const COMPACT_SLACK: u64 = 100_000;
/// Grants held for a later write at most; the one past it writes them all.
const LATER_MAX: usize = 4096;

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
    /// A flush of the grants kept for later is scheduled.
    flush_due: AtomicBool,
}

struct Inner {
    file: File,
    /// Bytes of whole records; a failed append is cut back to it.
    len: u64,
    records: u64,
    /// Live leases at the last compaction.
    live: u64,
    /// Grants not written yet ([`Journal::grant_later`]).
    later: crate::node::IdMap<LeaseId, JournaledLease>,
    /// A compaction is reading the live set, which may hold grants kept for
    /// later: their releases are written then, not cancelled.
    compacting: bool,
}

impl Inner {
    fn append(&mut self, tag: u8, leases: &[JournaledLease]) -> io::Result<()> {
        if leases.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(leases.len() * RECORD);
        for lease in leases {
            encode(&mut buf, tag, lease);
        }
        if let Err(e) = self.file.write_all(&buf) {
            let len = self.len;
            let _ = self.file.set_len(len);
            return Err(e);
        }
        self.len += buf.len() as u64;
        self.records += leases.len() as u64;
        Ok(())
    }

    /// Kept until written: a failed write leaves them for the next flush.
    fn flush_later(&mut self) -> io::Result<()> {
        let later: Vec<JournaledLease> = self.later.values().copied().collect();
        self.append(GRANT, &later)?;
        self.later.clear();
        Ok(())
    }
}

/// CRC-32 (IEEE); hardware-accelerated, as every lease grant and release
/// computes one per record.
fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn encode(out: &mut Vec<u8>, tag: u8, lease: &JournaledLease) {
    let start = out.len();
    out.push(tag);
    out.extend_from_slice(lease.lease.as_bytes());
    out.extend_from_slice(lease.payload.as_bytes());
    out.extend_from_slice(&lease.expires_ms.to_le_bytes());
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// One record's body: tag, lease, payload, expiry.
fn decode(body: &[u8]) -> Option<(u8, JournaledLease)> {
    let tag = body[0];
    if tag != GRANT && tag != RELEASE {
        return None;
    }
    let lease = LeaseId::from_slice(&body[1..17]).ok()?;
    let payload = PayloadId::from_slice(&body[17..33]).ok()?;
    let expires_ms = u64::from_le_bytes(body[33..41].try_into().ok()?);
    Some((
        tag,
        JournaledLease {
            lease,
            payload,
            expires_ms,
        },
    ))
}

/// Every record of a journal, in order, skipping damaged bytes.
fn records(bytes: &[u8]) -> Vec<(u8, JournaledLease)> {
    let mut out = Vec::new();
    let Some(mut rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
        // The format before checksums: fixed records, no header.
        return bytes.chunks_exact(BODY).filter_map(decode).collect();
    };
    while rest.len() >= RECORD {
        let (body, crc) = (&rest[..BODY], &rest[BODY..RECORD]);
        match decode(body).filter(|_| crc32(body).to_le_bytes() == crc) {
            Some(rec) => {
                out.push(rec);
                rest = &rest[RECORD..];
            }
            None => rest = &rest[1..],
        }
    }
    out
}

impl Journal {
    /// Opens the journal, returning it with the leases it still holds (the
    /// caller drops expired ones).
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
        for (tag, lease) in records(&bytes) {
            if tag == GRANT {
                live.insert(lease.lease, lease);
            } else {
                live.remove(&lease.lease);
            }
        }
        let leases: Vec<JournaledLease> = live.into_values().collect();
        let (file, len) = Self::rewrite(path, &leases)?;
        let journal = Journal {
            path: path.to_path_buf(),
            inner: Mutex::new(Inner {
                file,
                len,
                records: leases.len() as u64,
                live: leases.len() as u64,
                later: Default::default(),
                compacting: false,
            }),
            flush_due: AtomicBool::new(false),
        };
        Ok((journal, leases))
    }

    /// Writes `leases` to a fresh file and durably puts it in place.
    fn rewrite(path: &Path, leases: &[JournaledLease]) -> io::Result<(File, u64)> {
        let mut buf = Vec::with_capacity(MAGIC.len() + leases.len() * RECORD);
        buf.extend_from_slice(MAGIC);
        for lease in leases {
            encode(&mut buf, GRANT, lease);
        }
        let replaced = durable::replace_file(path, &buf)?;
        if let Err(e) = replaced.dir_synced {
            // Leases need to survive SIGKILL only, which the rename does.
            tracing::warn!(%e, "could not fsync the state dir after rewriting the lease journal");
        }
        Ok((replaced.file, buf.len() as u64))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn grant(&self, leases: &[JournaledLease]) -> io::Result<()> {
        let mut inner = self.lock();
        // A renewal written now must not be overtaken by the first grant.
        for lease in leases {
            inner.later.remove(&lease.lease);
        }
        inner.append(GRANT, leases)
    }

    /// Keeps a grant to write with the next [`Journal::flush_later`]
    /// rather than now, for a session lease whose bytes went out inline: it
    /// guards no mapping, and a release before the flush cancels both, so
    /// a tight loop of small gets does not write the journal at all. Lost
    /// if the agent dies before the flush, which only lets the payload go
    /// sooner after a restart (the reader has its copy). True when the
    /// caller is to schedule the flush (none is scheduled).
    pub fn grant_later(&self, lease: JournaledLease) -> io::Result<bool> {
        let mut inner = self.lock();
        inner.later.insert(lease.lease, lease);
        if inner.later.len() >= LATER_MAX {
            inner.flush_later()?;
        }
        Ok(!self.flush_due.swap(true, Ordering::AcqRel))
    }

    /// Writes the grants kept by [`Journal::grant_later`]; the next kept
    /// one schedules another flush.
    pub fn flush_later(&self) -> io::Result<()> {
        self.flush_due.store(false, Ordering::Release);
        self.lock().flush_later()
    }

    pub fn release(&self, leases: &[JournaledLease]) -> io::Result<()> {
        let mut inner = self.lock();
        let compacting = inner.compacting;
        let written: Vec<JournaledLease> = leases
            .iter()
            .filter(|l| inner.later.remove(&l.lease).is_none() || compacting)
            .copied()
            .collect();
        inner.append(RELEASE, &written)
    }

    /// Rewrites the file with only `live` if it has grown well past it.
    /// The live set is read and the new file written and fsynced without
    /// the journal lock, so grants go on meanwhile: every change reaches the
    /// lease table before the journal, so whatever was appended after the
    /// point the compaction started from is copied over at the swap, and
    /// nothing is missed. Blocking; one compaction at a time (the sweeper's).
    pub fn maybe_compact(&self, live: impl FnOnce() -> Vec<JournaledLease>) -> io::Result<()> {
        let from = {
            let mut inner = self.lock();
            if inner.records < COMPACT_SLACK.max(2 * inner.live) {
                return Ok(());
            }
            inner.compacting = true;
            inner.len
        };
        let swapped = self.compact_from(from, live());
        self.lock().compacting = false;
        swapped
    }

    fn compact_from(&self, from: u64, leases: Vec<JournaledLease>) -> io::Result<()> {
        let mut buf = Vec::with_capacity(MAGIC.len() + leases.len() * RECORD);
        buf.extend_from_slice(MAGIC);
        for lease in &leases {
            encode(&mut buf, GRANT, lease);
        }
        let tmp = self.path.with_extension("compact");
        let mut file = durable::create_private(&tmp)?;
        file.write_all(&buf)?;
        file.sync_data()?;
        crate::failpoint!("mid-compaction");
        let mut inner = self.lock();
        // Everything appended since, to the end of the file (a torn record
        // there is skipped by its checksum when read). No fsync under the
        // lock: leases need to survive SIGKILL only.
        let current = File::open(&self.path)?;
        let end = current.metadata()?.len().max(from);
        let mut tail = vec![0; (end - from) as usize];
        current.read_exact_at(&mut tail, from)?;
        file.write_all(&tail)?;
        // Grants kept for later are written now: the live set copied above
        // may hold them, and a release must then be written, not cancelled.
        let mut later = Vec::with_capacity(inner.later.len() * RECORD);
        for lease in inner.later.values() {
            encode(&mut later, GRANT, lease);
        }
        file.write_all(&later)?;
        let appender = OpenOptions::new().append(true).open(&tmp)?;
        fs::rename(&tmp, &self.path)?;
        inner.file = appender;
        inner.len = (buf.len() + tail.len() + later.len()) as u64;
        inner.records = (leases.len() + (tail.len() + later.len()) / RECORD) as u64;
        inner.later.clear();
        inner.live = leases.len() as u64;
        drop(inner);
        if let Err(e) = durable::fsync_parent(&self.path) {
            tracing::warn!(%e, "could not fsync the state dir after compacting the lease journal");
        }
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
    fn grants_kept_for_later_are_written_by_a_flush_or_cancelled_by_a_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.journal");
        let (kept, cancelled, renewed) = (lease(10), lease(20), lease(30));
        {
            let (journal, _) = Journal::open(&path).unwrap();
            assert!(journal.grant_later(kept).unwrap(), "the first asks for a flush");
            assert!(!journal.grant_later(cancelled).unwrap());
            journal.grant_later(renewed).unwrap();
            let written = fs::metadata(&path).unwrap().len();
            journal.release(&[cancelled]).unwrap();
            let longer = JournaledLease {
                expires_ms: 99,
                ..renewed
            };
            journal.grant(&[longer]).unwrap();
            assert_eq!(
                fs::metadata(&path).unwrap().len(),
                written + RECORD as u64,
                "only the renewal is written; the cancelled pair never is"
            );
            journal.flush_later().unwrap();
            assert!(
                journal.grant_later(lease(40)).unwrap(),
                "after a flush the next asks again"
            );
        }
        let (_journal, mut live) = Journal::open(&path).unwrap();
        live.sort_by_key(|l| l.expires_ms);
        // The one kept after the flush was never written: lost with the process.
        assert_eq!(
            live,
            vec![
                kept,
                JournaledLease {
                    expires_ms: 99,
                    ..renewed
                }
            ]
        );
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

    #[test]
    fn a_short_write_in_the_middle_hides_no_later_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.journal");
        let (a, b) = (lease(10), lease(20));
        {
            let (journal, _) = Journal::open(&path).unwrap();
            journal.grant(&[a]).unwrap();
        }
        // A torn record (as from a full disk), then a good one after it.
        let mut torn = Vec::new();
        encode(&mut torn, GRANT, &lease(99));
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&torn[..20]).unwrap();
        let mut good = Vec::new();
        encode(&mut good, GRANT, &b);
        f.write_all(&good).unwrap();
        let (_journal, mut live) = Journal::open(&path).unwrap();
        live.sort_by_key(|l| l.expires_ms);
        assert_eq!(live, vec![a, b]);
    }

    #[test]
    fn a_journal_from_before_checksums_is_read_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.journal");
        let a = lease(10);
        let mut old = vec![GRANT];
        old.extend_from_slice(a.lease.as_bytes());
        old.extend_from_slice(a.payload.as_bytes());
        old.extend_from_slice(&a.expires_ms.to_le_bytes());
        std::fs::write(&path, &old).unwrap();
        let (_journal, live) = Journal::open(&path).unwrap();
        assert_eq!(live, vec![a]);
        assert!(std::fs::read(&path).unwrap().starts_with(MAGIC));
    }

    #[test]
    fn crc32_matches_the_ieee_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn a_compaction_keeps_what_was_appended_while_it_ran() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.journal");
        let (journal, _) = Journal::open(&path).unwrap();
        let kept = lease(10);
        journal.grant(&[kept]).unwrap();
        let churn: Vec<_> = (0..COMPACT_SLACK).map(|_| lease(1)).collect();
        journal.grant(&churn).unwrap();
        journal.release(&churn).unwrap();
        let (during, gone, later, racing) = (lease(20), lease(30), lease(40), lease(50));
        journal.grant(&[gone]).unwrap();
        journal.grant_later(racing).unwrap();
        journal
            .maybe_compact(|| {
                // A grant and a release land while the live set is read
                // (which already missed the release); grants kept for
                // later are in the live set too, and one of them is
                // released meanwhile: that release must be written.
                journal.grant(&[during]).unwrap();
                journal.release(&[gone]).unwrap();
                journal.grant_later(later).unwrap();
                let live = vec![kept, gone, later, racing];
                journal.release(&[racing]).unwrap();
                live
            })
            .unwrap();
        // Written by the compaction, so its release is written too.
        journal.release(&[later]).unwrap();
        assert!(
            std::fs::metadata(&path).unwrap().len() < 10 * RECORD as u64,
            "compacted"
        );
        drop(journal);
        let (_journal, mut live) = Journal::open(&path).unwrap();
        live.sort_by_key(|l| l.expires_ms);
        assert_eq!(live, vec![kept, during]);
    }
}
