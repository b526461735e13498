//! `payloadctl stream ...`: create, append, read, follow and track
//! consumer offsets, through the agent's stream service.

use anyhow::Context;
use payload_client::{timestamp_ms, Client, ClientError};
use payload_proto::core::PayloadId as PbPayloadId;
use payload_proto::runtime::subscribe_request::Start;
use payload_proto::runtime::*;
use serde_json::{json, Value};

use crate::cli::{Format, StreamCommand, StreamName};
use crate::render::{id_text, key_values, print, print_json, rfc3339, Table};

fn stream_id(stream: &StreamName) -> Option<StreamId> {
    Some(StreamId {
        name: stream.name.clone(),
        namespace: stream.namespace.clone(),
    })
}

fn entry_json(e: &StreamEntry) -> Value {
    json!({
        "offset": e.offset,
        "payload_id": id_text(e.payload_id.as_ref()),
        "event_time": rfc3339(timestamp_ms(e.event_time.as_ref())),
        "append_time": rfc3339(timestamp_ms(e.append_time.as_ref())),
        "duration_ns": e.duration_ns,
        "tags": e.tags,
    })
}

fn entry_row(e: &StreamEntry) -> Vec<String> {
    let mut tags: Vec<_> = e.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    tags.sort();
    vec![
        e.offset.to_string(),
        id_text(e.payload_id.as_ref()),
        rfc3339(timestamp_ms(e.append_time.as_ref())),
        tags.join(","),
    ]
}

fn print_entries(entries: &[StreamEntry], format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        return print_json(&Value::Array(entries.iter().map(entry_json).collect()));
    }
    let mut table = Table::new(vec!["OFFSET", "PAYLOAD", "APPENDED", "TAGS"]);
    for e in entries {
        table.row(entry_row(e));
    }
    print(&table.render())
}

pub async fn run(client: &Client, command: StreamCommand, format: Format) -> anyhow::Result<()> {
    let mut streams = client.streams();
    match command {
        StreamCommand::Create(args) => {
            let request = CreateStreamRequest {
                stream: stream_id(&args.stream),
                retention_max_entries: args.max_entries.unwrap_or(0),
                retention_max_age_sec: args.max_age.map_or(0, |ms| ms.div_ceil(1000)),
            };
            streams.create_stream(request).await.map_err(ClientError::from)?;
            done(format, &args.stream, "created")
        }
        StreamCommand::Rm(stream) => {
            let request = DeleteStreamRequest {
                stream: stream_id(&stream),
            };
            streams.delete_stream(request).await.map_err(ClientError::from)?;
            done(format, &stream, "deleted")
        }
        StreamCommand::Append(args) => {
            let items = args
                .ids
                .iter()
                .map(|id| AppendItem {
                    payload_id: Some(PbPayloadId {
                        value: id.as_bytes().to_vec(),
                    }),
                    tags: args.tags.iter().cloned().collect(),
                    ..Default::default()
                })
                .collect();
            let request = AppendRequest {
                stream: stream_id(&args.stream),
                items,
            };
            let offsets = streams
                .append(request)
                .await
                .map_err(ClientError::from)
                .with_context(|| format!("appending to stream {:?}", args.stream.name))?
                .into_inner();
            if format == Format::Json {
                return print_json(&json!({"first_offset": offsets.first_offset, "last_offset": offsets.last_offset}));
            }
            print(&key_values(&[
                ("first offset", offsets.first_offset.to_string()),
                ("last offset", offsets.last_offset.to_string()),
            ]))
        }
        StreamCommand::Read(args) => {
            let request = ReadRequest {
                stream: stream_id(&args.stream),
                start_offset: args.from,
                max_entries: args.max.unwrap_or(0),
                not_before: None,
            };
            let entries = streams
                .read(request)
                .await
                .map_err(ClientError::from)?
                .into_inner()
                .entries;
            print_entries(&entries, format)
        }
        StreamCommand::Tail(args) => {
            let start = match (args.from, args.beginning) {
                (Some(offset), _) => Start::Offset(offset),
                (None, true) => Start::FromBeginning(true),
                (None, false) => Start::FromLatest(true),
            };
            let request = SubscribeRequest {
                stream: stream_id(&args.stream),
                start: Some(start),
                max_inflight: 0,
            };
            let mut entries = streams
                .subscribe(request)
                .await
                .map_err(ClientError::from)?
                .into_inner();
            // One line per entry as it arrives: JSON lines, or table rows.
            while let Some(response) = entries.message().await.map_err(ClientError::from)? {
                let Some(entry) = response.entry else { continue };
                let line = match format {
                    Format::Json => entry_json(&entry).to_string(),
                    Format::Table => entry_row(&entry).join("  "),
                };
                print(&format!("{line}\n"))?;
            }
            Ok(())
        }
        StreamCommand::Commit(args) => {
            let request = CommitRequest {
                stream: stream_id(&args.group.stream),
                consumer_group: args.group.group.clone(),
                offset: args.offset,
            };
            streams.commit(request).await.map_err(ClientError::from)?;
            done(format, &args.group.stream, "committed")
        }
        StreamCommand::Committed(args) => {
            let request = GetCommittedRequest {
                stream: stream_id(&args.stream),
                consumer_group: args.group.clone(),
            };
            let got = streams
                .get_committed(request)
                .await
                .map_err(ClientError::from)?
                .into_inner();
            let offset = got.committed.then_some(got.offset);
            if format == Format::Json {
                return print_json(&json!({"group": args.group, "offset": offset}));
            }
            print(&match offset {
                Some(offset) => format!("{offset}\n"),
                None => format!("group {:?} has committed nothing\n", args.group),
            })
        }
    }
}

fn done(format: Format, stream: &StreamName, what: &str) -> anyhow::Result<()> {
    if format == Format::Json {
        return print_json(&json!({"stream": stream.name, "namespace": stream.namespace, "result": what}));
    }
    print(&format!("stream {:?} {what}\n", stream.name))
}
