//! Small real filesystems for "full disk" tests: a tmpfs of a given size
//! mounted on a fresh directory, unmounted on drop. Mounting needs root; a
//! test that cannot mount says so and skips.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// A tmpfs of `size` bytes on a new directory under `parent`.
    pub fn mount(parent: &Path, size: u64) -> Option<Tmpfs> {
        let dir = tempfile::Builder::new().prefix("pm-tmpfs-").tempdir_in(parent).ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .status()
            .ok()?;
        if !status.success() {
            eprintln!("SKIPPED: cannot mount a tmpfs (needs root)");
            return None;
        }
        Some(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills all but `leave` bytes with a file the agent did not make.
    pub fn fill(&self, leave: u64) -> PathBuf {
        let path = self.path().join("someone-elses-data");
        let free = free_bytes(self.path());
        let file = std::fs::File::create(&path).unwrap();
        let len = free.saturating_sub(leave);
        // SAFETY: fallocate on a file we just created.
        let rc = unsafe { libc::fallocate(std::os::unix::io::AsRawFd::as_raw_fd(&file), 0, 0, len as i64) };
        assert_eq!(rc, 0, "filling the tmpfs");
        path
    }
}

pub fn free_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs fills the struct we pass.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail * st.f_frsize
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}
