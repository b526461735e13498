//! `put` and `get`: bytes move between a file (or stdin/stdout) and the
//! agent's region in 4 MiB chunks, straight into or out of the mapping, with
//! a progress bar on stderr for large transfers when a person is watching.

use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::path::Path;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use payload_client::{Client, Lease, LeaseOptions, PutOptions};
use serde_json::json;

use crate::cli::{Format, GetArgs, PutArgs, TierArg};
use crate::render::{descriptor_json, id_text, print, print_json, stdout_error};
use crate::UsageError;

const CHUNK: usize = 4 << 20;
/// Smaller transfers finish before a bar would be worth drawing.
const PROGRESS_MIN_BYTES: u64 = 64 << 20;

fn progress(len: u64, verb: &'static str) -> ProgressBar {
    if len < PROGRESS_MIN_BYTES || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(
        "{msg} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::new(len).with_style(style);
    bar.set_message(verb);
    bar
}

/// Which way bytes travel between the agent and its object store.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    Up,
    Down,
}

/// Whether a person is watching stderr (progress is drawn there).
pub fn watched() -> bool {
    io::stderr().is_terminal()
}

/// Runs `work` (a move the agent does) with, on a terminal, a bar of the
/// bytes the agent has moved to or from its object store since it began,
/// out of `total` (polled from Stats; other transfers on the node at the
/// same time count too), or a spinner when no bytes travel that way.
pub async fn watch<T>(
    client: &Client,
    message: String,
    total: u64,
    direction: Option<Direction>,
    work: impl std::future::Future<Output = T>,
) -> T {
    if !watched() {
        return work.await;
    }
    let moved = |stats: &payload_proto::admin::StatsResponse| match direction {
        Some(Direction::Up) => stats.object_put_bytes,
        Some(Direction::Down) => stats.object_get_bytes,
        None => 0,
    };
    let base = match direction {
        Some(_) => client.stats().await.ok().map(|s| moved(&s)),
        None => None,
    };
    let bar = match (base, direction) {
        (Some(_), Some(dir)) => {
            let bar = progress_bar(total);
            bar.set_message(match dir {
                Direction::Up => format!("{message}: uploading"),
                Direction::Down => format!("{message}: downloading"),
            });
            bar
        }
        _ => ProgressBar::new_spinner().with_message(message),
    };
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    tokio::pin!(work);
    let result = loop {
        tokio::select! {
            result = &mut work => break result,
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {
                if let (Some(base), Ok(stats)) = (base, client.stats().await) {
                    let done = moved(&stats).saturating_sub(base);
                    bar.set_position(if total > 0 { done.min(total) } else { done });
                }
            }
        }
    };
    bar.finish_and_clear();
    result
}

/// A byte-count bar; without a known total, a running count.
fn progress_bar(total: u64) -> ProgressBar {
    let template = if total > 0 {
        "{msg} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}"
    } else {
        "{spinner} {msg} {binary_bytes} {binary_bytes_per_sec}"
    };
    let style = ProgressStyle::with_template(template)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = if total > 0 {
        ProgressBar::new(total)
    } else {
        ProgressBar::no_length()
    };
    bar.with_style(style)
}

fn refuse_empty(len: u64, what: &str) -> anyhow::Result<()> {
    if len == 0 {
        return Err(UsageError(format!("{what} is empty; payloads must hold at least one byte")).into());
    }
    Ok(())
}

pub async fn put(client: &Client, args: PutArgs, format: Format) -> anyhow::Result<()> {
    let PutArgs {
        input,
        tier,
        labels,
        ttl,
        verify,
        fsync,
        object,
    } = args;
    if tier == TierArg::Object {
        return Err(UsageError(
            "payloadctl writes to ram or disk; add --object to also put the payload in the object store".into(),
        )
        .into());
    }
    let opts = PutOptions {
        tier: tier.into(),
        labels: labels.into_iter().collect(),
        ttl_ms: ttl.unwrap_or(0),
        verify,
        sync: fsync,
        object_durable: object,
    };
    let desc = if input == Path::new("-") {
        let bytes = read_all(io::stdin().lock()).context("reading stdin")?;
        refuse_empty(bytes.len() as u64, "stdin")?;
        client.put_with(&bytes, &opts).await.context("storing stdin")?
    } else {
        let name = input.display();
        let mut file = File::open(&input).with_context(|| format!("opening {name}"))?;
        let meta = file.metadata().with_context(|| format!("reading the size of {name}"))?;
        if meta.is_file() {
            refuse_empty(meta.len(), &name.to_string())?;
            let mut region = client
                .allocate_with(meta.len(), &opts)
                .await
                .with_context(|| format!("allocating {} bytes for {name}", meta.len()))?;
            let bar = progress(meta.len(), "put");
            let filled = fill(&mut file, region.as_mut_slice(), &bar);
            bar.finish_and_clear();
            if let Err(err) = filled {
                let id = region.id();
                drop(region);
                // Best effort: the agent aborts it anyway at its write deadline.
                let _ = client.abort(id).await;
                return Err(
                    anyhow::Error::new(err).context(format!("reading {name} (did it change while being stored?)"))
                );
            }
            client
                .commit(region)
                .await
                .with_context(|| format!("committing {name}"))?
        } else {
            // A pipe or device: its size is known only once read.
            let bytes = read_all(file).with_context(|| format!("reading {name}"))?;
            refuse_empty(bytes.len() as u64, &name.to_string())?;
            client
                .put_with(&bytes, &opts)
                .await
                .with_context(|| format!("storing {name}"))?
        }
    };
    match format {
        Format::Table => print(&format!("{}\n", id_text(desc.payload_id.as_ref()))),
        Format::Json => {
            // The native socket answers a put briefly: the agent's full
            // descriptor (a disk path, say) comes from one lookup.
            let id = payload_client::descriptor_id(&desc)?;
            let full = client.stat(id).await.ok().and_then(|s| s.payload_descriptor);
            print_json(&descriptor_json(full.as_ref().unwrap_or(&desc)))
        }
    }
}

fn read_all(mut reader: impl Read) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn fill(reader: &mut impl Read, region: &mut [u8], bar: &ProgressBar) -> io::Result<()> {
    for chunk in region.chunks_mut(CHUNK) {
        reader.read_exact(chunk)?;
        bar.inc(chunk.len() as u64);
    }
    Ok(())
}

pub async fn get(client: &Client, args: GetArgs, format: Format) -> anyhow::Result<()> {
    let GetArgs { id, out, min_tier } = args;
    let opts = LeaseOptions {
        min_tier: min_tier.map(Into::into),
        ..Default::default()
    };
    let lease = client
        .get_with(id, opts)
        .await
        .with_context(|| format!("reading {id}"))?;
    let bytes = lease.bytes();
    let bar = progress(bytes.len() as u64, "get");
    let out = out.filter(|path| path != Path::new("-"));
    let written = match &out {
        Some(path) => write_file(path, bytes, &bar),
        None => drain(&mut io::stdout().lock(), bytes, &bar).map_err(stdout_error),
    };
    bar.finish_and_clear();
    let size = bytes.len();
    release(client, lease).await;
    written?;
    match (out, format) {
        (Some(path), Format::Json) => print_json(&json!({
            "id": id.to_string(),
            "size_bytes": size,
            "path": path.display().to_string(),
        })),
        _ => Ok(()),
    }
}

fn write_file(path: &Path, bytes: &[u8], bar: &ProgressBar) -> anyhow::Result<()> {
    let name = path.display();
    let mut file = File::create(path).with_context(|| format!("creating {name}"))?;
    if let Err(err) = drain(&mut file, bytes, bar) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(anyhow::Error::new(err).context(format!("writing {name}")));
    }
    Ok(())
}

fn drain(out: &mut impl Write, bytes: &[u8], bar: &ProgressBar) -> io::Result<()> {
    for chunk in bytes.chunks(CHUNK) {
        out.write_all(chunk)?;
        bar.inc(chunk.len() as u64);
    }
    out.flush()
}

/// Releases at once: the library's background releaser would not get to run
/// before this process exits, leaving the lease to block `rm` and `spill`
/// until it expired. A failed release only keeps the lease until then.
async fn release(client: &Client, lease: Lease) {
    let _ = client.release(lease).await;
}
