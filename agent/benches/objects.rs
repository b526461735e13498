//! `make bench`, object tier: uploads and downloads of 1 GiB through the
//! agent's object tier against a local S3-compatible server (moto), each
//! against a plain parallel multipart upload / ranged download of the same
//! bytes with the same SDK in the same run; an upload where half the blocks
//! are already stored; SHA-256 per core against `sha256sum`; and reads of a
//! cached object-tier payload against a plain read of a local file. Prints
//! Markdown (copy it into docs/benchmarks.md). PM_BENCH_OBJECT_MIB sets the
//! payload size (default 1024).

#[path = "../tests/common/noise.rs"]
mod noise;
#[path = "../tests/common/s3.rs"]
#[allow(dead_code)]
mod s3;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures_util::{StreamExt, TryStreamExt};
use noise::noise;
use payload_agent::object::bucket::S3Bucket;
use payload_agent::object::{block_key, BlockCache, ObjectTier};
use payload_catalog::{PayloadId, SqliteRepository};
use sha2::Digest;

const MIB: usize = 1 << 20;
/// In flight per transfer, for ours and the floor alike.
const CONCURRENCY: usize = 16;
/// Multipart part size of the floor (S3's minimum is 5 MiB).
const PART: usize = 8 * MIB;

fn size() -> usize {
    std::env::var("PM_BENCH_OBJECT_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1024)
        * MIB
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// The best of `runs` timings of `f`.
async fn best<F, Fut>(runs: usize, mut f: F) -> Duration
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut best = Duration::MAX;
    for run in 0..runs {
        let start = Instant::now();
        f(run).await;
        best = best.min(start.elapsed());
    }
    best
}

async fn plain_upload(client: &aws_sdk_s3::Client, bucket: &str, key: &str, bytes: &Arc<Vec<u8>>) {
    let upload = client
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    let upload_id = upload.upload_id().unwrap().to_string();
    let parts: Vec<CompletedPart> = futures_util::stream::iter(bytes.chunks(PART).enumerate())
        .map(|(i, chunk)| {
            let body = ByteStream::from(chunk.to_vec());
            let (client, upload_id) = (client.clone(), upload_id.clone());
            async move {
                let number = i as i32 + 1;
                let out = client
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .body(body)
                    .send()
                    .await?;
                Ok::<_, aws_sdk_s3::Error>(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .build(),
                )
            }
        })
        .buffered(CONCURRENCY)
        .try_collect()
        .await
        .unwrap();
    client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
        .send()
        .await
        .unwrap();
}

async fn plain_download(client: &aws_sdk_s3::Client, bucket: &str, key: &str, len: usize, into: &std::fs::File) {
    futures_util::stream::iter((0..len).step_by(PART))
        .map(|start| async move {
            let end = (start + PART).min(len) - 1;
            let out = client
                .get_object()
                .bucket(bucket)
                .key(key)
                .range(format!("bytes={start}-{end}"))
                .send()
                .await
                .unwrap();
            let body = out.body.collect().await.unwrap().into_bytes();
            into.write_all_at(&body, start as u64).unwrap();
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}

/// The fair floor on a server whose multipart path is slow: the same bytes
/// as plain 4 MiB objects, put in parallel; with `checksums` each PUT
/// carries the SHA-256 the server checks, as ours do (computed before the
/// clock starts: the floor pays only the server's side of it).
async fn plain_puts(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    bytes: &Arc<Vec<u8>>,
    checksums: Option<&[String]>,
) {
    futures_util::stream::iter(bytes.chunks(4 * MIB).enumerate())
        .map(|(i, chunk)| {
            let body = ByteStream::from(chunk.to_vec());
            let checksum = checksums.map(|c| c[i].clone());
            async move {
                let key = format!("{prefix}/{i}");
                client
                    .put_object()
                    .bucket(bucket)
                    .key(key)
                    .set_checksum_sha256(checksum)
                    .body(body)
                    .send()
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}

/// Base64 SHA-256 of each 4 MiB chunk, as `x-amz-checksum-sha256` wants it.
fn chunk_checksums(bytes: &[u8]) -> Vec<String> {
    bytes
        .chunks(4 * MIB)
        .map(|c| aws_smithy_types::base64::encode(sha2::Sha256::digest(c)))
        .collect()
}

/// Deletes every object under `prefix`: moto keeps objects in memory and
/// slows as it fills, so each measurement leaves the server as it found it.
async fn delete_prefix(client: &aws_sdk_s3::Client, bucket: &str, prefix: &str) {
    loop {
        let page = client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .send()
            .await
            .unwrap();
        let keys: Vec<String> = page
            .contents()
            .iter()
            .filter_map(|o| o.key())
            .map(str::to_string)
            .collect();
        if keys.is_empty() {
            return;
        }
        delete_keys(client, bucket, keys).await;
    }
}

async fn delete_keys(client: &aws_sdk_s3::Client, bucket: &str, keys: Vec<String>) {
    use aws_sdk_s3::types::{Delete, ObjectIdentifier};
    for batch in keys.chunks(1000) {
        let ids = batch
            .iter()
            .map(|k| ObjectIdentifier::builder().key(k).build().unwrap())
            .collect();
        let delete = Delete::builder().set_objects(Some(ids)).build().unwrap();
        client
            .delete_objects()
            .bucket(bucket)
            .delete(delete)
            .send()
            .await
            .unwrap();
    }
}

async fn plain_gets(client: &aws_sdk_s3::Client, bucket: &str, prefix: &str, len: usize, into: &std::fs::File) {
    futures_util::stream::iter(0..len.div_ceil(4 * MIB))
        .map(|i| async move {
            let key = format!("{prefix}/{i}");
            let out = client.get_object().bucket(bucket).key(key).send().await.unwrap();
            let body = out.body.collect().await.unwrap().into_bytes();
            into.write_all_at(&body, (i * 4 * MIB) as u64).unwrap();
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}

fn read_all(path: &Path) -> usize {
    use std::io::Read;
    let mut file = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 4 * MIB];
    let mut total = 0;
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return total;
        }
        total += n;
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let Some(s3) = s3::server() else {
        println!("object tier benchmarks skipped: no moto_server (make test installs it into .venv)");
        return;
    };
    let len = size();
    let work = tempfile::Builder::new()
        .prefix("pm-bench-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let bucket = s3.bucket().await;
    let client = s3.client().await;
    let repo = Arc::new(SqliteRepository::open(&state.path().join("catalog.db")).await.unwrap());
    let store = S3Bucket::connect(&format!("s3://{bucket}/bench")).await.unwrap();
    let cache = BlockCache::open(&work.path().join("cache"), 4 * len as u64).unwrap();
    let tier = ObjectTier::new(Box::new(store), repo, CONCURRENCY, cache);

    let bytes = Arc::new(noise(len, 1));
    let source = work.path().join("source");
    std::fs::write(&source, &*bytes).unwrap();
    let mib = len / MIB;
    println!("## Object tier: {mib} MiB against moto_server on 127.0.0.1\n");
    println!("| operation | ours GB/s | floor GB/s | ratio |\n|---|---|---|---|");

    let floor_up = best(2, |run| {
        let (client, bucket, bytes) = (&client, &bucket, &bytes);
        async move {
            plain_upload(client, bucket, &format!("plain-{run}"), bytes).await;
            if run > 0 {
                delete_prefix(client, bucket, &format!("plain-{run}")).await;
            }
        }
    })
    .await;
    // Ours and the plain-PUT floors alternate, so each sees the server in
    // the same state; all but the first run's objects (kept for the
    // downloads and the half-stored upload) are deleted after each.
    let fresh = work.path().join("fresh");
    std::fs::write(&fresh, noise(len, 2)).unwrap();
    let checksums = chunk_checksums(&bytes);
    let (mut floor_puts, mut floor_checked) = (Duration::MAX, Duration::MAX);
    let mut ours_up = Duration::MAX;
    let mut manifests = Vec::new();
    for (run, path) in [&source, &fresh].into_iter().enumerate() {
        let start = Instant::now();
        plain_puts(&client, &bucket, &format!("puts-{run}"), &bytes, None).await;
        floor_puts = floor_puts.min(start.elapsed());
        if run > 0 {
            delete_prefix(&client, &bucket, &format!("puts-{run}")).await;
        }
        let start = Instant::now();
        plain_puts(&client, &bucket, "checked", &bytes, Some(&checksums)).await;
        floor_checked = floor_checked.min(start.elapsed());
        delete_prefix(&client, &bucket, "checked").await;
        // As a spill does: the payload's digest is known and checked.
        // (Different bytes each run: a repeat would find every block stored.)
        let digest = sha2::Sha256::digest(std::fs::read(path).unwrap()).into();
        let start = Instant::now();
        let manifest = tier.upload(PayloadId::random(), path, Some(digest), 0).await.unwrap();
        ours_up = ours_up.min(start.elapsed());
        if run > 0 {
            // (Behind the catalog's back: nothing reads these again.)
            let keys = manifest.blocks.iter().map(|b| format!("bench/{}", block_key(b)));
            delete_keys(&client, &bucket, keys.collect()).await;
        }
        manifests.push(manifest);
    }
    println!(
        "| upload (all blocks new) | {:.2} | {:.2} (multipart, {} MiB parts, {CONCURRENCY} in flight) | {:.2}× |",
        gbps(len, ours_up),
        gbps(len, floor_up),
        PART / MIB,
        floor_up.as_secs_f64() / ours_up.as_secs_f64()
    );
    println!(
        "| upload (all blocks new) | {:.2} | {:.2} (plain PUTs of 4 MiB objects, {CONCURRENCY} in flight) | {:.2}× |",
        gbps(len, ours_up),
        gbps(len, floor_puts),
        floor_puts.as_secs_f64() / ours_up.as_secs_f64()
    );
    println!(
        "| upload (all blocks new) | {:.2} | {:.2} (the same PUTs, each with its SHA-256 for the server to check) | {:.2}× |",
        gbps(len, ours_up),
        gbps(len, floor_checked),
        floor_checked.as_secs_f64() / ours_up.as_secs_f64()
    );
    let half = {
        let mut half = bytes[..len / 2].to_vec();
        half.extend_from_slice(&noise(len - len / 2, 3));
        let path = work.path().join("half");
        let digest = sha2::Sha256::digest(&half).into();
        std::fs::write(&path, half).unwrap();
        let start = Instant::now();
        tier.upload(PayloadId::random(), &path, Some(digest), 0).await.unwrap();
        start.elapsed()
    };
    println!(
        "| upload, half the blocks already stored | {:.2} effective | — | {:.2} of the all-new time |",
        gbps(len, half),
        half.as_secs_f64() / ours_up.as_secs_f64()
    );

    let manifest = manifests.swap_remove(0);
    let target = work.path().join("download");
    // One run: moto serves ranged GETs of a multipart object very slowly.
    let floor_down = best(1, |_| {
        let file = std::fs::File::create(&target).unwrap();
        file.set_len(len as u64).unwrap();
        let (client, bucket) = (&client, &bucket);
        async move { plain_download(client, bucket, "plain-0", len, &file).await }
    })
    .await;
    // Alternating, as the uploads.
    let fresh_file = || {
        let file = std::fs::File::create(&target).unwrap();
        file.set_len(len as u64).unwrap();
        file
    };
    let (mut floor_gets, mut ours_down) = (Duration::MAX, Duration::MAX);
    for _ in 0..2 {
        let file = fresh_file();
        let start = Instant::now();
        plain_gets(&client, &bucket, "puts-0", len, &file).await;
        floor_gets = floor_gets.min(start.elapsed());
        let file = Arc::new(fresh_file());
        let start = Instant::now();
        let all = (0..manifest.blocks.len()).collect();
        tier.download(&manifest, file, all).await.unwrap();
        ours_down = ours_down.min(start.elapsed());
    }
    println!(
        "| download (blocks checked against their SHA-256) | {:.2} | {:.2} (ranged GETs, {} MiB, {CONCURRENCY} in flight) | {:.2}× |",
        gbps(len, ours_down),
        gbps(len, floor_down),
        PART / MIB,
        floor_down.as_secs_f64() / ours_down.as_secs_f64()
    );
    println!(
        "| download (blocks checked against their SHA-256) | {:.2} | {:.2} (plain GETs of 4 MiB objects, {CONCURRENCY} in flight) | {:.2}× |",
        gbps(len, ours_down),
        gbps(len, floor_gets),
        floor_gets.as_secs_f64() / ours_down.as_secs_f64()
    );

    // Cache hit: the payload's cache file is whole; read it as a lease
    // holder would, against a plain read of a file of the same size.
    let cached = tier.cache.fill(&tier, &manifest, &|_| false).await.unwrap();
    let plain = best(3, |_| async { assert_eq!(read_all(&source), len) }).await;
    let hit = best(3, |_| async {
        tier.cache.fill(&tier, &manifest, &|_| false).await.unwrap();
        assert_eq!(read_all(&cached), len)
    })
    .await;
    println!(
        "| block-cache hit: lease path + read | {:.2} | {:.2} (read of a file on the same tmpfs) | {:.2}× |",
        gbps(len, hit),
        gbps(len, plain),
        plain.as_secs_f64() / hit.as_secs_f64()
    );

    let ours_sha = best(3, |_| async {
        std::hint::black_box(sha2::Sha256::digest(&*bytes));
    })
    .await;
    let tool = best(3, |_| async {
        let out = std::process::Command::new("sha256sum").arg(&source).output().unwrap();
        assert!(out.status.success());
    })
    .await;
    let sha_ni = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" sha_ni"));
    println!(
        "| SHA-256, one core (CPU SHA extensions: {}) | {:.2} | {:.2} (sha256sum on the same file) | {:.2}× |",
        if sha_ni { "yes" } else { "no" },
        gbps(len, ours_sha),
        gbps(len, tool),
        tool.as_secs_f64() / ours_sha.as_secs_f64()
    );
    println!("\nRatios are floor time / our time: above 1 is faster than the floor.");
}
