//! Random identifiers for leases and payloads without a system call each.
//!
//! Lease ids are bearer tokens (any caller who knows one may release it), so
//! they must stay unguessable: the bytes come from the kernel's CSPRNG, only
//! fetched a page at a time. A batch lease of 1,000 payloads otherwise spent
//! a third of its time in `getrandom`. Children are started with exec, never
//! a bare fork, so no two processes share a buffer.

use std::cell::RefCell;

use payload_catalog::model::{LeaseId, PayloadId};
use uuid::{Builder, Uuid};

const BUFFER: usize = 4096;

struct Pool {
    bytes: [u8; BUFFER],
    next: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { bytes: [0; BUFFER], next: BUFFER }) };
}

fn random_uuid() -> Uuid {
    POOL.with_borrow_mut(|pool| {
        if pool.next + 16 > BUFFER {
            if !fill(&mut pool.bytes) {
                return Uuid::new_v4();
            }
            pool.next = 0;
        }
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&pool.bytes[pool.next..pool.next + 16]);
        // Used bytes are wiped so a later leak of the buffer shows no past id.
        pool.bytes[pool.next..pool.next + 16].fill(0);
        pool.next += 16;
        Builder::from_random_bytes(bytes).into_uuid()
    })
}

/// Fills `buf` from the kernel; false if it cannot (a sandbox without
/// `getrandom`), and then ids come from `Uuid::new_v4`, which has fallbacks.
fn fill(buf: &mut [u8]) -> bool {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, which we own mutably.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        filled += n as usize;
    }
    true
}

pub fn lease() -> LeaseId {
    LeaseId(random_uuid())
}

pub fn payload() -> PayloadId {
    PayloadId(random_uuid())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn ids_are_version_4_and_distinct_across_refills() {
        let ids: Vec<Uuid> = (0..3 * BUFFER / 16).map(|_| random_uuid()).collect();
        assert!(ids.iter().all(|id| id.get_version_num() == 4));
        assert!(ids.iter().all(|id| id.get_variant() == uuid::Variant::RFC4122));
        let distinct: HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }
}
