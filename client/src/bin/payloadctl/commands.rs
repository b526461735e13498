//! The commands that move no payload bytes through this process: listing,
//! inspection, deletion, pins, tier moves, leases and stats.

use anyhow::Context;
use payload_client::{Client, LeaseOptions, PayloadId};
use payload_proto::admin::StatsResponse;
use payload_proto::core::payload_descriptor::Location;
use payload_proto::core::{PayloadDescriptor, PayloadState, Tier};
use payload_proto::runtime::ListPayloadsRequest;
use serde_json::{json, Value};

use crate::cli::{Format, GcArgs, IdArg, ImportArgs, LeaseArgs, LsArgs, PinArgs, PromoteArgs, RmArgs, SpillArgs};
use crate::render::{
    descriptor_json, human_duration, human_size, id_text, key_values, labels_text, location_json, location_text,
    now_ms, print, print_json, rfc3339, state_name, summary_json, tier_name, time_or, Table,
};
use crate::transfer::{watch, Direction};

pub async fn ls(client: &Client, args: LsArgs, format: Format) -> anyhow::Result<()> {
    let LsArgs {
        tier,
        state,
        labels,
        limit,
        all,
        node,
        all_nodes,
    } = args;
    let node_filter = match (node, all_nodes) {
        (_, true) => "*".to_string(),
        (Some(node), false) => node,
        (None, false) => String::new(),
    };
    let other_nodes = !node_filter.is_empty();
    let mut request = ListPayloadsRequest {
        node_filter,
        tier_filter: tier.map(|t| payload_client::Tier::from(t) as i32).unwrap_or(0),
        state_filter: state.map(|s| PayloadState::from(s) as i32).unwrap_or(0),
        page_size: limit.unwrap_or(0),
        label_selector: labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
        ..Default::default()
    };
    let mut payloads = Vec::new();
    let (total, more) = loop {
        let page = client.list(request.clone()).await.context("listing payloads")?;
        payloads.extend(page.payloads);
        if !all || page.next_page_token.is_empty() {
            break (page.total_count, !page.next_page_token.is_empty());
        }
        request.page_token = page.next_page_token;
    };
    if format == Format::Json {
        return print_json(&Value::Array(payloads.iter().map(summary_json).collect()));
    }
    // An operator names every payload's node.
    let other_nodes = other_nodes || payloads.iter().any(|p| !p.node.is_empty());
    let mut columns = vec!["ID", "TIER", "STATE", "SIZE", "LEASES", "PINNED", "CREATED", "LABELS"];
    if other_nodes {
        columns.insert(1, "NODE");
    }
    let mut table = Table::new(columns);
    for p in &payloads {
        let mut row = vec![
            id_text(p.id.as_ref()),
            tier_name(p.tier).into(),
            match p.unavailable {
                // Its node is down and no other copy exists.
                true => format!("{} (node down)", state_name(p.state)),
                false => state_name(p.state).into(),
            },
            human_size(p.size_bytes),
            p.active_leases.to_string(),
            yes_no(p.pinned),
            time_or(p.created_at_ms, "-"),
            labels_text(&p.labels),
        ];
        if other_nodes {
            row.insert(1, p.node.clone());
        }
        table.row(row);
    }
    print(&table.render())?;
    if more {
        eprintln_quiet(&format!(
            "showing {} of {total} payloads; pass --all for every page",
            payloads.len()
        ));
    }
    Ok(())
}

pub async fn stat(client: &Client, args: IdArg, format: Format) -> anyhow::Result<()> {
    let IdArg { id } = args;
    let response = client.stat(id).await.with_context(|| format!("looking up {id}"))?;
    let summary = response.payload.unwrap_or_default();
    let desc = response.payload_descriptor.unwrap_or_default();
    if format == Format::Json {
        let mut value = summary_json(&summary);
        value["version"] = json!(desc.version);
        value["location"] = location_json(&desc);
        value["copies"] = copies_json(&desc);
        value["sealed"] = json!(desc.sealed);
        if let Some(object) = &desc.object {
            value["object"] = json!({
                "bucket": object.bucket,
                "manifest_key": object.manifest_key,
                "block_size_bytes": object.block_size_bytes,
                "block_keys": object.block_keys,
            });
        }
        return print_json(&value);
    }
    let mut pairs = vec![
        ("id", id_text(summary.id.as_ref())),
        ("tier", tier_name(summary.tier).into()),
        ("state", state_name(summary.state).into()),
        (
            "size",
            format!("{} ({} bytes)", human_size(summary.size_bytes), summary.size_bytes),
        ),
        ("created", time_or(summary.created_at_ms, "-")),
        ("expires", time_or(summary.expires_at_ms, "never")),
        ("leases", summary.active_leases.to_string()),
        ("pinned", yes_no(summary.pinned)),
        ("labels", labels_text(&summary.labels)),
        ("sha256", hex_or_dash(&summary.sha256)),
        ("version", desc.version.to_string()),
    ];
    if !summary.node.is_empty() {
        let down = if summary.unavailable { " (node down)" } else { "" };
        pairs.insert(1, ("node", format!("{}{down}", summary.node)));
    }
    match &desc.location {
        Some(Location::Ram(ram)) => pairs.push(("shm name", ram.shm_name.clone())),
        Some(Location::Disk(disk)) => pairs.push(("offset", disk.offset_bytes.to_string())),
        Some(Location::Gpu(gpu)) => pairs.push(("gpu device", gpu.device_id.to_string())),
        None if desc.sealed => pairs.push(("sealed", "yes: a memfd, read over the native socket".into())),
        None => {}
    }
    pairs.push(("path", location_text(&desc)));
    pairs.push(("copies", copies_text(&desc)));
    if let Some(object) = &desc.object {
        pairs.push(("bucket", object.bucket.clone()));
        pairs.push(("manifest", object.manifest_key.clone()));
        let distinct: std::collections::HashSet<_> = object.block_keys.iter().collect();
        pairs.push((
            "blocks",
            format!(
                "{} of {} ({} distinct)",
                object.block_keys.len(),
                human_size(object.block_size_bytes),
                distinct.len()
            ),
        ));
    }
    let mut text = key_values(&pairs);
    if let Some(object) = &desc.object {
        for key in &object.block_keys {
            text.push_str(&format!("  {key}\n"));
        }
    }
    print(&text)
}

/// Every copy: `ram (authoritative, verified), object (verified)`.
fn copies_text(desc: &PayloadDescriptor) -> String {
    let copies: Vec<String> = desc
        .copies
        .iter()
        .map(|c| {
            let mut notes = Vec::new();
            if c.authoritative {
                notes.push("authoritative");
            }
            if c.verified {
                notes.push("verified");
            }
            match notes.is_empty() {
                true => tier_name(c.tier).to_string(),
                false => format!("{} ({})", tier_name(c.tier), notes.join(", ")),
            }
        })
        .collect();
    if copies.is_empty() {
        "-".into()
    } else {
        copies.join(", ")
    }
}

fn copies_json(desc: &PayloadDescriptor) -> Value {
    desc.copies
        .iter()
        .map(|c| json!({ "tier": tier_name(c.tier), "authoritative": c.authoritative, "verified": c.verified }))
        .collect()
}

pub async fn gc(client: &Client, args: GcArgs, format: Format) -> anyhow::Result<()> {
    let deleted = client
        .collect_garbage(args.grace.unwrap_or(0))
        .await
        .context("collecting unreferenced object-store blocks")?;
    match format {
        Format::Json => print_json(&json!({ "blocks_deleted": deleted })),
        Format::Table => print(&format!(
            "deleted {deleted} unreferenced block(s) from the object store\n"
        )),
    }
}

pub async fn rm(client: &Client, args: RmArgs, format: Format) -> anyhow::Result<()> {
    let RmArgs { id, force } = args;
    client
        .delete(id, force)
        .await
        .with_context(|| format!("deleting {id}"))?;
    done(format, id, "deleted", format!("deleted {id}"))
}

pub async fn pin(client: &Client, args: PinArgs, format: Format) -> anyhow::Result<()> {
    let PinArgs { id, duration } = args;
    let duration_ms = duration.unwrap_or(0);
    client
        .pin(id, duration_ms)
        .await
        .with_context(|| format!("pinning {id}"))?;
    let how = match duration_ms {
        0 => "until unpinned".to_string(),
        ms => format!("for {}", human_duration(ms)),
    };
    done(format, id, "pinned", format!("pinned {id} {how}"))
}

pub async fn unpin(client: &Client, args: IdArg, format: Format) -> anyhow::Result<()> {
    let IdArg { id } = args;
    client.unpin(id).await.with_context(|| format!("unpinning {id}"))?;
    done(format, id, "unpinned", format!("unpinned {id}"))
}

pub async fn spill(client: &Client, args: SpillArgs, format: Format) -> anyhow::Result<()> {
    let SpillArgs { id, to, fsync } = args;
    let to: Option<Tier> = to.map(Into::into);
    let up = (to == Some(Tier::Object)).then_some(Direction::Up);
    let (_, size) = for_progress(client, id).await;
    let work = client.spill(id, to, fsync);
    let desc = watch(client, format!("spilling {id}"), size, up, work).await;
    let desc = desc.with_context(|| format!("spilling {id}"))?;
    moved(format, &desc, "spilled")
}

pub async fn promote(client: &Client, args: PromoteArgs, format: Format) -> anyhow::Result<()> {
    let PromoteArgs { id, to } = args;
    let (tier, size) = for_progress(client, id).await;
    let down = (tier == Some(Tier::Object)).then_some(Direction::Down);
    let work = client.promote(id, to.into());
    let desc = watch(client, format!("promoting {id}"), size, down, work).await;
    let desc = desc.with_context(|| format!("promoting {id}"))?;
    moved(format, &desc, "promoted")
}

pub async fn import(client: &Client, args: ImportArgs, format: Format) -> anyhow::Result<()> {
    let ImportArgs { id, size } = args;
    // The upload's size is not known here: the bar shows bytes fetched.
    let work = client.import(id, size.unwrap_or(0));
    let desc = watch(
        client,
        format!("importing {id}"),
        size.unwrap_or(0),
        Some(Direction::Down),
        work,
    )
    .await;
    let desc = desc.with_context(|| format!("importing {id}"))?;
    moved(format, &desc, "imported")
}

/// The payload's tier and size, for a progress bar: asked only when a
/// person watches (nothing, or 0 bytes, when it cannot be read).
async fn for_progress(client: &Client, id: payload_client::PayloadId) -> (Option<Tier>, u64) {
    if !crate::transfer::watched() {
        return (None, 0);
    }
    match client.stat(id).await.ok().and_then(|stat| stat.payload) {
        Some(p) => (Tier::try_from(p.tier).ok(), p.size_bytes),
        None => (None, 0),
    }
}

pub async fn lease(client: &Client, args: LeaseArgs, format: Format) -> anyhow::Result<()> {
    let LeaseArgs {
        id,
        duration,
        min_tier,
        hold,
    } = args;
    let opts = LeaseOptions {
        min_tier: min_tier.map(Into::into),
        best_effort: false,
        duration_ms: duration.unwrap_or(0),
        // Without --hold the lease outlives payloadctl, so it needs an expiry.
        timed: !hold,
    };
    if hold {
        return hold_lease(client, id, opts, format).await;
    }
    let lease = client
        .get_with(id, opts)
        .await
        .with_context(|| format!("leasing {id}"))?;
    // The native answer carries no path: the agent's descriptor of the
    // copy the lease pins has it (a disk path; none for a sealed payload).
    let desc = match client.stat(id).await.ok().and_then(|s| s.payload_descriptor) {
        Some(full) => full,
        None => lease.descriptor().clone(),
    };
    let expires_at_ms = lease.expires_at_ms();
    // Kept past this process: the agent ends it at expiry.
    let lease_id = lease.detach();
    if format == Format::Json {
        return print_json(&json!({
            "lease_id": lease_id.to_string(),
            "payload_id": id.to_string(),
            "expires_at": rfc3339(expires_at_ms),
            "expires_at_ms": expires_at_ms,
            "location": descriptor_json(&desc),
        }));
    }
    print(&key_values(&[
        ("leased", id.to_string()),
        ("lease id", lease_id.to_string()),
        (
            "expires",
            format!(
                "{} (in {}; kept after payloadctl exits)",
                rfc3339(expires_at_ms),
                human_duration(expires_at_ms.saturating_sub(now_ms()))
            ),
        ),
        ("tier", tier_name(desc.tier).into()),
        ("path", location_text(&desc)),
    ]))
}

/// Holds a lease until payloadctl is interrupted: a session lease over the
/// native socket (it ends if payloadctl is killed), else (over TCP) a
/// timed lease renewed at half its life and released at the end.
async fn hold_lease(
    client: &Client,
    id: payload_client::PayloadId,
    opts: LeaseOptions,
    format: Format,
) -> anyhow::Result<()> {
    let lease = client
        .get_with(id, opts)
        .await
        .with_context(|| format!("leasing {id}"))?;
    let session = client.is_native();
    if format == Format::Json {
        print_json(&json!({
            "lease_id": lease.lease_id().to_string(),
            "payload_id": id.to_string(),
            "session": session,
            "size_bytes": lease.bytes().len(),
        }))?;
    } else {
        let until = if session {
            "until interrupted (a session lease: it ends if payloadctl dies)"
        } else {
            "until interrupted (renewed as it goes)"
        };
        print(&key_values(&[
            ("leased", id.to_string()),
            ("lease id", lease.lease_id().to_string()),
            ("held", until.into()),
        ]))?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let wait = if session {
            std::time::Duration::MAX
        } else {
            let left = lease.expires_at_ms().saturating_sub(now_ms());
            std::time::Duration::from_millis((left / 2).max(100))
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(wait) => {
                client.renew(&lease, opts.duration_ms).await.with_context(|| format!("renewing the lease on {id}"))?;
            }
        }
    }
    client
        .release(lease)
        .await
        .with_context(|| format!("releasing the lease on {id}"))
}

pub async fn nodes(client: &Client, format: Format) -> anyhow::Result<()> {
    let listed = client.nodes().await.context("listing the catalog's nodes")?;
    let use_of = |n: &payload_proto::admin::NodeSummary, tier: Tier| {
        n.tiers
            .iter()
            .find(|t| t.tier == tier as u32)
            .map(|t| (t.bytes, t.capacity_bytes))
    };
    if format == Format::Json {
        let nodes: Vec<Value> = listed
            .nodes
            .iter()
            .map(|n| {
                let tiers: Vec<Value> = n
                    .tiers
                    .iter()
                    .map(|t| json!({"tier": tier_name(t.tier as i32), "bytes": t.bytes, "capacity_bytes": t.capacity_bytes}))
                    .collect();
                json!({"name": n.name, "live": n.live, "last_seen_ms": n.last_seen_ms, "version": n.version,
                       "catalog_backlog": n.catalog_backlog, "tiers": tiers})
            })
            .collect();
        return print_json(&json!({"cluster": listed.cluster, "nodes": nodes}));
    }
    let mut table = Table::new(vec!["NODE", "LIVE", "LAST SEEN", "RAM", "DISK", "BACKLOG", "VERSION"]);
    let shown = |u: Option<(u64, u64)>| match u {
        Some((used, cap)) => format!("{} / {}", human_size(used), human_size(cap)),
        None => "-".into(),
    };
    for n in &listed.nodes {
        table.row(vec![
            n.name.clone(),
            yes_no(n.live),
            time_or(n.last_seen_ms, "-"),
            shown(use_of(n, Tier::Ram)),
            shown(use_of(n, Tier::Disk)),
            n.catalog_backlog.to_string(),
            n.version.clone(),
        ]);
    }
    print(&table.render())?;
    if !listed.cluster {
        eprintln_quiet("a standalone node: it is the only node its agent knows");
    }
    Ok(())
}

pub async fn stats(client: &Client, format: Format) -> anyhow::Result<()> {
    let stats = client.stats().await.context("reading agent stats")?;
    if format == Format::Json {
        return print_json(&stats_json(&stats));
    }
    let mut table = Table::new(vec!["TIER", "PAYLOADS", "BYTES", "CAPACITY", "PINNED", "LEASED"]);
    for t in &stats.tiers {
        table.row(vec![
            tier_name(t.tier as i32).into(),
            t.payloads.to_string(),
            human_size(t.bytes),
            match t.capacity_bytes {
                0 => "-".into(),
                cap => human_size(cap),
            },
            human_size(t.pinned_bytes),
            human_size(t.leased_bytes),
        ]);
    }
    let mut text = table.render();
    text.push('\n');
    text.push_str(&key_values(&[
        ("active leases", stats.active_leases.to_string()),
        ("queued spills", stats.spill_queue_depth.to_string()),
        ("node", stats.node_name.clone()),
    ]));
    if let Some(object) = stats.tiers.iter().find(|t| t.tier == Tier::Object as u32) {
        text.push_str(&key_values(&[
            (
                "object blocks",
                format!(
                    "{} ({}), {} unreferenced",
                    stats.object_blocks,
                    human_size(stats.object_block_bytes),
                    stats.object_unreferenced_blocks
                ),
            ),
            (
                "block cache",
                format!(
                    "{} of {}",
                    human_size(object.cache_bytes),
                    human_size(object.cache_capacity_bytes)
                ),
            ),
            (
                "object traffic",
                format!(
                    "{} put ({}), {} got ({}), {} deleted since the agent started",
                    stats.object_puts,
                    human_size(stats.object_put_bytes),
                    stats.object_gets,
                    human_size(stats.object_get_bytes),
                    stats.object_deletes
                ),
            ),
        ]));
    }
    print(&text)
}

fn stats_json(s: &StatsResponse) -> Value {
    let tiers: Vec<Value> = s
        .tiers
        .iter()
        .map(|t| {
            json!({
                "tier": tier_name(t.tier as i32),
                "payloads": t.payloads,
                "bytes": t.bytes,
                "capacity_bytes": t.capacity_bytes,
                "pinned_bytes": t.pinned_bytes,
                "leased_bytes": t.leased_bytes,
                "cache_bytes": t.cache_bytes,
                "cache_capacity_bytes": t.cache_capacity_bytes,
            })
        })
        .collect();
    json!({
        "node_name": s.node_name,
        "active_leases": s.active_leases,
        "spill_queue_depth": s.spill_queue_depth,
        "tiers": tiers,
        "payloads_gpu": s.payloads_gpu,
        "payloads_ram": s.payloads_ram,
        "payloads_disk": s.payloads_disk,
        "payloads_object": s.payloads_object,
        "bytes_gpu": s.bytes_gpu,
        "bytes_ram": s.bytes_ram,
        "bytes_disk": s.bytes_disk,
        "bytes_object": s.bytes_object,
        "object_blocks": s.object_blocks,
        "object_block_bytes": s.object_block_bytes,
        "object_unreferenced_blocks": s.object_unreferenced_blocks,
        "object_puts": s.object_puts,
        "object_put_bytes": s.object_put_bytes,
        "object_gets": s.object_gets,
        "object_get_bytes": s.object_get_bytes,
        "object_deletes": s.object_deletes,
    })
}

fn done(format: Format, id: PayloadId, result: &str, line: String) -> anyhow::Result<()> {
    match format {
        Format::Table => print(&format!("{line}\n")),
        Format::Json => print_json(&json!({ "id": id.to_string(), "result": result })),
    }
}

fn moved(format: Format, desc: &PayloadDescriptor, verb: &str) -> anyhow::Result<()> {
    match format {
        Format::Table => print(&format!(
            "{verb} {} to {}: {}\n",
            id_text(desc.payload_id.as_ref()),
            tier_name(desc.tier),
            location_text(desc)
        )),
        Format::Json => print_json(&descriptor_json(desc)),
    }
}

fn yes_no(flag: bool) -> String {
    if flag { "yes" } else { "no" }.into()
}

fn hex_or_dash(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        "-".into()
    } else {
        hex::encode(bytes)
    }
}

/// Notes for people go to stderr; a closed stderr is no reason to fail.
fn eprintln_quiet(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}
