//! Fault points for crash tests: `failpoint!("name")` marks a step; with the
//! `failpoints` feature (never in release builds) and `PM_FAILPOINT=name` in
//! the environment, the process aborts there, as a power cut or SIGKILL
//! would stop it, and the test restarts it on the same state.
//! `PM_FAILPOINT=name:N` aborts at the N-th pass instead of the first.

/// Aborts the process here when `PM_FAILPOINT` names this point.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoint::hit($name);
    };
}

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static PASSES: AtomicU64 = AtomicU64::new(0);
    let target = TARGET.get_or_init(|| {
        let spec = std::env::var("PM_FAILPOINT").ok()?;
        let (point, nth) = spec.split_once(':').unwrap_or((&spec, "1"));
        Some((point.to_string(), nth.parse().unwrap_or(1)))
    });
    if let Some((point, nth)) = target {
        if point == name && PASSES.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
            eprintln!("failpoint {name}: aborting the process");
            std::process::abort();
        }
    }
}
