//! Turning agent answers into text: aligned tables and key/value lists for
//! people, JSON values for scripts, and the one place that writes stdout (a
//! reader that stops early, as `| head` does, ends the command quietly).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use payload_client::mapping::location_path;
use payload_client::Tier;
use payload_proto::core::payload_descriptor::Location;
use payload_proto::core::{PayloadDescriptor, PayloadId as PbPayloadId, PayloadState};
use payload_proto::runtime::PayloadSummary;
use serde_json::{json, Map, Value};
use uuid::Uuid;

/// Stdout was closed by its reader; not an error for the command.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub struct StdoutClosed;

/// Maps a write error on stdout, telling a closed pipe apart.
pub fn stdout_error(err: io::Error) -> anyhow::Error {
    if err.kind() == io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(err).context("writing to stdout")
    }
}

pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

pub fn print_json(value: &Value) -> anyhow::Result<()> {
    print(&format!("{value:#}\n"))
}

pub fn tier_name(tier: i32) -> &'static str {
    match Tier::try_from(tier) {
        Ok(Tier::Gpu) => "gpu",
        Ok(Tier::Ram) => "ram",
        Ok(Tier::Disk) => "disk",
        Ok(Tier::Object) => "object",
        Ok(Tier::Void) => "void",
        Ok(Tier::Unspecified) | Err(_) => "unknown",
    }
}

pub fn state_name(state: i32) -> &'static str {
    match PayloadState::try_from(state) {
        Ok(PayloadState::Allocated) => "allocated",
        Ok(PayloadState::Active) => "active",
        Ok(PayloadState::Spilling) => "spilling",
        Ok(PayloadState::Durable) => "durable",
        Ok(PayloadState::Evicting) => "evicting",
        Ok(PayloadState::Deleting) => "deleting",
        Ok(PayloadState::Expired) => "expired",
        Ok(PayloadState::Deleted) => "deleted",
        Ok(PayloadState::Aborted) => "aborted",
        Ok(PayloadState::Unspecified) | Err(_) => "unknown",
    }
}

pub fn id_text(id: Option<&PbPayloadId>) -> String {
    id.and_then(|id| Uuid::from_slice(&id.value).ok())
        .map(|id| id.to_string())
        .unwrap_or_else(|| "?".into())
}

/// `512 B`, `4.0 KiB`, `1.5 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `1h 5m`, `30s`, `250ms`: the two largest units of a duration.
pub fn human_duration(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms / 1000;
    let parts = [
        (secs / 86_400, "d"),
        (secs / 3600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
    ];
    let first = parts.iter().position(|(n, _)| *n > 0).unwrap_or(3);
    parts[first..]
        .iter()
        .take(2)
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix milliseconds as RFC 3339 UTC with second precision.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A time for people: `never` for 0, else RFC 3339.
pub fn time_or(ms: u64, zero: &str) -> String {
    if ms == 0 {
        zero.to_string()
    } else {
        rfc3339(ms)
    }
}

fn time_json(ms: u64) -> Value {
    if ms == 0 {
        Value::Null
    } else {
        Value::String(rfc3339(ms))
    }
}

pub fn labels_text(labels: &std::collections::HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    sorted
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Columns padded to their widest cell, two spaces apart.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: Vec<&'static str>) -> Table {
        Table {
            header,
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut text = String::new();
        let header = self.header.iter().map(|h| h.to_string()).collect::<Vec<_>>();
        for row in std::iter::once(&header).chain(&self.rows) {
            let last = row.len().saturating_sub(1);
            for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if i == last {
                    text.push_str(cell);
                } else {
                    text.push_str(&format!("{cell:<width$}  "));
                }
            }
            text.push('\n');
        }
        text
    }
}

/// `key: value` lines with the values aligned.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

pub fn summary_json(s: &PayloadSummary) -> Value {
    let labels: Map<String, Value> = s
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let mut value = json!({
        "id": id_text(s.id.as_ref()),
        "tier": tier_name(s.tier),
        "state": state_name(s.state),
        "size_bytes": s.size_bytes,
        "created_at": time_json(s.created_at_ms),
        "created_at_ms": s.created_at_ms,
        "expires_at": time_json(s.expires_at_ms),
        "expires_at_ms": s.expires_at_ms,
        "active_leases": s.active_leases,
        "pinned": s.pinned,
        "labels": labels,
    });
    if !s.node.is_empty() {
        value["node"] = Value::String(s.node.clone());
    }
    if s.unavailable {
        value["unavailable"] = Value::Bool(true);
    }
    if !s.sha256.is_empty() {
        value["sha256"] = Value::String(hex::encode(&s.sha256));
    }
    value
}

/// Where a descriptor's bytes live, for people: the file a reader opens.
pub fn location_text(desc: &PayloadDescriptor) -> String {
    match location_path(desc) {
        Ok((path, _)) => path.display().to_string(),
        Err(_) => "-".into(),
    }
}

/// A descriptor's location fields: shm name and path, or path and offset.
pub fn location_json(desc: &PayloadDescriptor) -> Value {
    match &desc.location {
        Some(Location::Ram(ram)) => json!({ "shm_name": ram.shm_name, "path": location_text(desc) }),
        Some(Location::Disk(disk)) => json!({ "path": disk.path, "offset_bytes": disk.offset_bytes }),
        Some(Location::Gpu(gpu)) => json!({ "gpu_device": gpu.device_id }),
        None => json!({}),
    }
}

/// A descriptor's summary: id, tier, state, size, version, location, sha256.
pub fn descriptor_json(desc: &PayloadDescriptor) -> Value {
    let mut value = json!({
        "id": id_text(desc.payload_id.as_ref()),
        "tier": tier_name(desc.tier),
        "state": state_name(desc.state),
        "size_bytes": desc.size_bytes,
        "version": desc.version,
    });
    if let (Value::Object(fields), Value::Object(location)) = (&mut value, location_json(desc)) {
        fields.extend(location);
    }
    if !desc.sha256.is_empty() {
        value["sha256"] = Value::String(hex::encode(&desc.sha256));
    }
    if desc.sealed {
        value["sealed"] = Value::Bool(true);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_binary_units_with_one_decimal() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(4096), "4.0 KiB");
        assert_eq!(human_size(1536 << 20), "1.5 GiB");
    }

    #[test]
    fn durations_show_their_two_largest_units() {
        assert_eq!(human_duration(250), "250ms");
        assert_eq!(human_duration(30_000), "30s");
        assert_eq!(human_duration(3_900_000), "1h 5m");
        assert_eq!(human_duration(3_600_000), "1h");
        assert_eq!(human_duration(90_061_000), "1d 1h");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_999), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn table_columns_line_up_and_the_last_is_not_padded() {
        let mut table = Table::new(vec!["ID", "SIZE", "LABELS"]);
        table.row(vec!["a".into(), "4.0 KiB".into(), "k=v".into()]);
        table.row(vec!["bbbb".into(), "1 B".into(), String::new()]);
        assert_eq!(
            table.render(),
            "ID    SIZE     LABELS\na     4.0 KiB  k=v\nbbbb  1 B      \n"
        );
    }
}
