//! Sealed memory: RAM regions written through the native socket are memfds.
//! At commit the agent adds `F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW |
//! F_SEAL_SEAL`; from then on no process, the writer included, can change,
//! truncate or grow the bytes, and no seal can be removed. The kernel
//! refuses `F_SEAL_WRITE` while a writable shared mapping exists, so a
//! writer that kept one cannot commit.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Every seal a committed payload carries.
pub const SEALS: libc::c_int = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A new sealable memfd of `size` bytes whose pages are allocated now (and
/// charged to this process, not to whichever client touches them first).
pub fn create(name: &str, size: u64) -> io::Result<File> {
    let name = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: name is NUL-terminated; we own the descriptor returned.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    allocate(&file, size)?;
    Ok(file)
}

/// Sets the memfd's size to `size` with real pages behind it.
pub fn allocate(file: &File, size: u64) -> io::Result<()> {
    file.set_len(size)?;
    if size == 0 {
        return Ok(());
    }
    let len = libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: fallocate on a descriptor we hold.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The seals on `file`, or an error if it is not a memfd that allows them.
pub fn seals(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: fcntl on a descriptor we hold.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(seals)
}

/// Whether every seal of a committed payload is on `file`.
pub fn is_sealed(file: &File) -> bool {
    seals(file).is_ok_and(|s| s & SEALS == SEALS)
}

/// Raises this process's soft limit on open descriptors to its hard limit
/// (every sealed payload holds one) and returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit fill and read a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

/// Descriptors kept free of sealed payloads, for sockets, files and the
/// catalog: running out of those would fail far more than one put.
pub const FD_HEADROOM: u64 = 4096;

/// Fixes the memfd's size before a writer gets it: it can write the pages
/// reserved for it, never more (or fewer).
pub fn fix_size(file: &File) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold.
    if unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Seals `file` for good; sealing a fully sealed file again is fine. EBUSY
/// means a writable shared mapping of it is still alive somewhere.
pub fn seal(file: &File) -> io::Result<()> {
    let have = seals(file).map_err(|e| io::Error::other(format!("it is not a sealable memfd ({e})")))?;
    if have & SEALS == SEALS {
        return Ok(());
    }
    if have & libc::F_SEAL_SEAL != 0 {
        return Err(io::Error::other(format!(
            "its seals were already fixed without write protection (seals {have:#x})"
        )));
    }
    // SAFETY: fcntl on a descriptor we hold.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_sealed_memfd_refuses_every_change() {
        let file = create("test", 4096).unwrap();
        file.write_all_at(b"hello", 0).unwrap();
        seal(&file).unwrap();
        assert!(is_sealed(&file));
        assert!(file.write_all_at(b"x", 0).is_err(), "write after seal");
        assert!(file.set_len(1).is_err(), "shrink after seal");
        assert!(file.set_len(8192).is_err(), "grow after seal");
        // SAFETY: fcntl on our descriptor.
        let removed = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, 0) };
        assert_ne!(removed, 0, "F_SEAL_SEAL forbids changing seals");
        seal(&file).unwrap();
    }

    #[test]
    fn a_writable_mapping_blocks_the_seal() {
        let file = create("test", 4096).unwrap();
        // SAFETY: a private test memfd.
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
        assert_eq!(seal(&file).unwrap_err().raw_os_error(), Some(libc::EBUSY));
        drop(map);
        seal(&file).unwrap();
    }

    #[test]
    fn a_plain_file_is_not_sealable() {
        let file = tempfile::tempfile().unwrap();
        assert!(seal(&file).is_err());
    }
}
