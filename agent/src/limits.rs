//! Bounds on every input, checked at the gRPC edge before any work is done:
//! a request over a bound is answered INVALID_ARGUMENT with a message that
//! names the bound and its flag. Every string is refused if it holds a NUL
//! byte (PostgreSQL cannot store one, and no name needs one).

// Doc comments here are `--help` text, written for people, not rustdoc.
#![allow(rustdoc::invalid_html_tags)]

use std::collections::HashMap;

use clap::Args;
use tonic::Status;

const DAY_MS: u64 = 86_400_000;

/// Bounds on requests and on what one client may hold.
#[derive(Args, Clone, Debug)]
pub struct Limits {
    /// Items in one batch call: BatchAcquireReadLease, BatchReleaseLease,
    /// Spill, stream Append.
    #[arg(long = "max-batch-items", env = "PM_MAX_BATCH_ITEMS", default_value_t = 10_000)]
    pub batch_items: usize,
    /// Labels on one payload (and tags on one stream entry).
    #[arg(long = "max-labels", env = "PM_MAX_LABELS", default_value_t = 64)]
    pub labels: usize,
    /// Bytes in a label key (or tag key).
    #[arg(long = "max-label-key-bytes", env = "PM_MAX_LABEL_KEY_BYTES", default_value_t = 256)]
    pub label_key_bytes: usize,
    /// Bytes in a label value (or tag value). Labels are indexed in the
    /// catalog: PostgreSQL's index rows hold about 2.7 KiB, key and value
    /// together, so larger values would be refused there.
    #[arg(
        long = "max-label-value-bytes",
        env = "PM_MAX_LABEL_VALUE_BYTES",
        default_value_t = 2048
    )]
    pub label_value_bytes: usize,
    /// Bytes of metadata in one update or event (data and schema), and of
    /// one lineage edge's parameters.
    #[arg(long = "max-metadata-bytes", env = "PM_MAX_METADATA_BYTES", default_value_t = 1 << 20)]
    pub metadata_bytes: usize,
    /// Bytes in a name: stream namespace and name, consumer group, event
    /// source and version, lineage operation and role.
    #[arg(long = "max-name-bytes", env = "PM_MAX_NAME_BYTES", default_value_t = 256)]
    pub name_bytes: usize,
    /// Parent edges in one AddLineage call.
    #[arg(
        long = "max-lineage-parents",
        env = "PM_MAX_LINEAGE_PARENTS",
        default_value_t = 1_000
    )]
    pub lineage_parents: usize,
    /// Deepest GetLineage walk; max_depth 0 walks this far.
    #[arg(long = "max-lineage-depth", env = "PM_MAX_LINEAGE_DEPTH", default_value_t = 1_000)]
    pub lineage_depth: u32,
    /// key=value terms in one label selector.
    #[arg(long = "max-selector-terms", env = "PM_MAX_SELECTOR_TERMS", default_value_t = 16)]
    pub selector_terms: usize,
    /// Longest TTL and pin duration (milliseconds).
    #[arg(long = "max-duration-ms", env = "PM_MAX_DURATION_MS", default_value_t = 3_650 * DAY_MS)]
    pub duration_ms: u64,
    /// Largest request message (bytes, or with a unit); larger ones are
    /// refused before they are decoded.
    #[arg(long = "max-message-size", env = "PM_MAX_MESSAGE_SIZE", default_value = "4MiB",
          value_parser = crate::cli::parse_size)]
    pub message_bytes: u64,
    /// Concurrent calls on one client connection.
    #[arg(
        long = "max-concurrent-calls",
        env = "PM_MAX_CONCURRENT_CALLS",
        default_value_t = 256
    )]
    pub calls_per_connection: u32,
    /// Live read leases on one payload.
    #[arg(
        long = "max-leases-per-payload",
        env = "PM_MAX_LEASES_PER_PAYLOAD",
        default_value_t = 100_000
    )]
    pub leases_per_payload: usize,
    /// Session leases one native connection may hold at once (each costs
    /// the agent memory until it is released or the connection closes).
    #[arg(
        long = "max-session-leases",
        env = "PM_MAX_SESSION_LEASES",
        default_value_t = 100_000
    )]
    pub session_leases: usize,
    /// Stream subscriptions open on this agent at once.
    #[arg(long = "max-subscribers", env = "PM_MAX_SUBSCRIBERS", default_value_t = 1_024)]
    pub subscribers: usize,
    /// Subscriptions open on one stream at once.
    #[arg(
        long = "max-subscribers-per-stream",
        env = "PM_MAX_SUBSCRIBERS_PER_STREAM",
        default_value_t = 256
    )]
    pub subscribers_per_stream: usize,
    /// A call that takes longer is answered DEADLINE_EXCEEDED (milliseconds;
    /// not Subscribe, blocking Promote and Spill, AcquireReadLease, Allocate
    /// and Commit, whose length is their own work).
    #[arg(long = "request-timeout-ms", env = "PM_REQUEST_TIMEOUT_MS", default_value_t = 60_000)]
    pub request_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        // The command line's defaults, in one place.
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            limits: Limits,
        }
        <Defaults as clap::Parser>::parse_from(["limits"]).limits
    }
}

fn too_long(what: &str, len: usize, max: usize, flag: &str) -> Status {
    Status::invalid_argument(format!(
        "{what} is {len} bytes; the limit is {max} (--{flag}): shorten it"
    ))
}

/// Refuses a string with a NUL byte.
pub fn no_nul(what: &str, text: &str) -> Result<(), Status> {
    if text.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "{what} contains a NUL byte; strings must not"
        )));
    }
    Ok(())
}

impl Limits {
    /// A batch of `n` items.
    pub fn batch(&self, what: &str, n: usize) -> Result<(), Status> {
        if n > self.batch_items {
            return Err(Status::invalid_argument(format!(
                "{what} has {n} items; the limit is {} per call (--max-batch-items): split the batch",
                self.batch_items
            )));
        }
        Ok(())
    }

    /// A name: no NUL, at most `--max-name-bytes`.
    pub fn name(&self, what: &str, text: &str) -> Result<(), Status> {
        no_nul(what, text)?;
        if text.len() > self.name_bytes {
            return Err(too_long(what, text.len(), self.name_bytes, "max-name-bytes"));
        }
        Ok(())
    }

    /// Labels of a payload, or tags of a stream entry.
    pub fn labels(&self, what: &str, labels: &HashMap<String, String>) -> Result<(), Status> {
        if labels.len() > self.labels {
            return Err(Status::invalid_argument(format!(
                "{} {what}s; the limit is {} (--max-labels)",
                labels.len(),
                self.labels
            )));
        }
        for (key, value) in labels {
            if key.is_empty() {
                return Err(Status::invalid_argument(format!("{what} keys must not be empty")));
            }
            no_nul(&format!("{what} key {key:?}"), key)?;
            no_nul(&format!("{what} {key:?}"), value)?;
            if key.len() > self.label_key_bytes {
                return Err(too_long(
                    &format!("{what} key"),
                    key.len(),
                    self.label_key_bytes,
                    "max-label-key-bytes",
                ));
            }
            if value.len() > self.label_value_bytes {
                return Err(too_long(
                    &format!("{what} {key:?}"),
                    value.len(),
                    self.label_value_bytes,
                    "max-label-value-bytes",
                ));
            }
        }
        Ok(())
    }

    /// Metadata bytes (data plus schema).
    pub fn metadata(&self, what: &str, len: usize) -> Result<(), Status> {
        if len > self.metadata_bytes {
            return Err(too_long(what, len, self.metadata_bytes, "max-metadata-bytes"));
        }
        Ok(())
    }

    /// A TTL or pin duration in milliseconds.
    pub fn duration(&self, what: &str, ms: u64) -> Result<(), Status> {
        if ms > self.duration_ms {
            return Err(Status::invalid_argument(format!(
                "{what} {ms} ms is longer than the limit of {} ms (--max-duration-ms)",
                self.duration_ms
            )));
        }
        Ok(())
    }

    /// A label selector, before it is parsed.
    pub fn selector(&self, selector: &str) -> Result<(), Status> {
        no_nul("label_selector", selector)?;
        let terms = selector.split(',').filter(|t| !t.trim().is_empty()).count();
        if terms > self.selector_terms {
            return Err(Status::invalid_argument(format!(
                "label_selector has {terms} terms; the limit is {} (--max-selector-terms)",
                self.selector_terms
            )));
        }
        Ok(())
    }
}

/// An enum field from the wire that must hold one of `known`.
pub fn known_enum(what: &str, value: i32, known: &[i32]) -> Result<(), Status> {
    if known.contains(&value) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{what} {value} is not a known value (expected one of {known:?})"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_command_line_definitions() {
        let limits = Limits::default();
        assert_eq!(limits.batch_items, 10_000);
        assert_eq!(limits.labels, 64);
        assert_eq!(limits.metadata_bytes, 1 << 20);
        assert_eq!(limits.message_bytes, 4 << 20);
    }

    #[test]
    fn each_bound_names_its_flag() {
        let limits = Limits::default();
        let err = limits.batch("requests", 10_001).unwrap_err();
        assert!(err.message().contains("--max-batch-items"), "{err}");
        let labels: HashMap<_, _> = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(limits
            .labels("label", &labels)
            .unwrap_err()
            .message()
            .contains("--max-labels"));
        let nul: HashMap<_, _> = [("k".to_string(), "a\0b".to_string())].into();
        assert!(limits.labels("label", &nul).unwrap_err().message().contains("NUL"));
        assert!(limits.selector(&"a=b,".repeat(17)).is_err());
        assert!(known_enum("mode", 99, &[0, 1, 2]).is_err());
    }
}
