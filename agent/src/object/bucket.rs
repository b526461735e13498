//! The object store as the agent sees it: put, ranged get, head and delete
//! of keys under one prefix. [`S3Bucket`] speaks S3 through aws-sdk-s3;
//! with the `failpoints` feature a wrapper injects the faults the tests
//! need (see `faults.rs`).

use std::ops::Range;

use async_trait::async_trait;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

/// Why an object store call failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// Worth retrying: timeouts, throttling, 5xx, resets, short reads.
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    NotFound(String),
    /// Retrying will not help: denied, no such bucket, bad request.
    #[error("{0}")]
    Permanent(String),
}

#[async_trait]
pub trait Bucket: Send + Sync + 'static {
    /// With `sha256` the store checks the bytes against it and refuses a
    /// mismatch (so a block never lands under a name its bytes do not have).
    async fn put(&self, key: &str, body: Bytes, sha256: Option<[u8; 32]>) -> Result<(), StoreError>;
    /// The whole object, or the bytes of `range` of it.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError>;
    /// The object's size, `None` when there is no such object.
    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError>;
    /// Deleting a missing object is fine.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    fn bucket(&self) -> &str;
    /// Keys given to the calls above are relative to this prefix.
    fn prefix(&self) -> &str;
}

/// An S3 bucket (or an S3-compatible server's) under a key prefix.
pub struct S3Bucket {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    endpoint: String,
}

/// Splits `s3://bucket/prefix` into bucket and prefix (no slashes at
/// either end of the prefix).
pub fn parse_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        anyhow::anyhow!("--object-store {url:?} must be an s3://BUCKET/PREFIX URL (the prefix may be empty)")
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    anyhow::ensure!(
        !bucket.is_empty() && bucket.len() <= 63 && !bucket.contains(|c: char| c.is_whitespace()),
        "--object-store {url:?} names no valid bucket: expected s3://BUCKET/PREFIX"
    );
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

impl S3Bucket {
    /// Builds the client from the standard AWS environment and files
    /// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`,
    /// `~/.aws/config`…). A custom endpoint gets path-style addressing,
    /// which S3-compatible servers need. Retries are ours, not the SDK's.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        use aws_config::meta::region::RegionProviderChain;
        let (bucket, prefix) = parse_url(url)?;
        let region = RegionProviderChain::default_provider().or_else("us-east-1");
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(region)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            // A stalled connection is a transient failure, retried, never a hang.
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(std::time::Duration::from_secs(10))
                    .operation_attempt_timeout(std::time::Duration::from_secs(120))
                    .build(),
            )
            .load()
            .await;
        let endpoint = shared.endpoint_url().map(str::to_string);
        let mut config = aws_sdk_s3::config::Builder::from(&shared);
        if endpoint.is_some() {
            config = config.force_path_style(true);
        }
        let client = aws_sdk_s3::Client::from_conf(config.build());
        Ok(Self {
            client,
            bucket,
            prefix,
            endpoint: endpoint.unwrap_or_else(|| "the AWS endpoint for the region".into()),
        })
    }

    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// Checks at start-up that the bucket exists and that this agent may
    /// write and delete under the prefix; says precisely what is wrong.
    pub async fn check(&self) -> anyhow::Result<()> {
        let at = format!("s3://{} at {}", self.bucket, self.endpoint);
        if let Err(err) = self.client.head_bucket().bucket(&self.bucket).send().await {
            let status = err.raw_response().map(|r| r.status().as_u16());
            anyhow::bail!(match (status, &err) {
                (Some(404), _) => format!("the bucket {at} does not exist: create it, or fix --object-store"),
                (Some(401 | 403), _) => format!(
                    "the credentials in use may not access {at}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or \
                     AWS_PROFILE, and the bucket policy"
                ),
                (Some(301 | 400), _) => format!(
                    "{at} answered {}: the bucket is probably in another region; set AWS_REGION",
                    status.unwrap_or_default()
                ),
                (_, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)) => format!(
                    "cannot reach {at}: check AWS_ENDPOINT_URL and the network ({})",
                    describe(&err)
                ),
                _ => format!("checking {at} failed: {}", describe(&err)),
            });
        }
        let probe = ".payload-manager-probe";
        let written = self.put(probe, Bytes::from_static(b"probe"), None).await;
        let deleted = match written {
            Ok(()) => self.delete(probe).await,
            Err(e) => Err(e),
        };
        deleted.map_err(|e| {
            anyhow::anyhow!(
                "the bucket {at} exists, but writing and deleting under the prefix {:?} failed: {e}; the agent \
                 needs s3:PutObject, s3:GetObject and s3:DeleteObject there",
                self.prefix
            )
        })
    }
}

/// The most useful text of an SDK error: the service's code and message,
/// or the whole chain of causes for transport failures.
fn describe<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    if let SdkError::ServiceError(service) = err {
        let e = service.err();
        return format!(
            "{}: {}",
            e.code().unwrap_or("error"),
            e.message().unwrap_or("no message")
        );
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    what: &str,
    err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> StoreError {
    let text = format!("{what}: {}", describe(&err));
    let status = err.raw_response().map(|r| r.status().as_u16());
    match (&err, status) {
        (SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_), _) => {
            StoreError::Transient(text)
        }
        (_, Some(404)) => StoreError::NotFound(text),
        (_, Some(408 | 429 | 500..=599)) => StoreError::Transient(text),
        _ if matches!(
            err.code(),
            Some("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable")
        ) =>
        {
            StoreError::Transient(text)
        }
        _ => StoreError::Permanent(text),
    }
}

#[async_trait]
impl Bucket for S3Bucket {
    async fn put(&self, key: &str, body: Bytes, sha256: Option<[u8; 32]>) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .content_length(body.len() as i64)
            .set_checksum_sha256(sha256.map(aws_smithy_types::base64::encode))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| classify(&format!("uploading {key}"), e))?;
        Ok(())
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        let mut get = self.client.get_object().bucket(&self.bucket).key(self.key(key));
        if let Some(r) = &range {
            if r.is_empty() {
                return Ok(Bytes::new());
            }
            get = get.range(format!("bytes={}-{}", r.start, r.end - 1));
        }
        let out = get
            .send()
            .await
            .map_err(|e| classify(&format!("downloading {key}"), e))?;
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Transient(format!("downloading {key}: the body broke off: {e}")))?
            .into_bytes();
        if let Some(r) = range {
            if body.len() as u64 != r.end - r.start {
                return Err(StoreError::Transient(format!(
                    "downloading {key}: a short read ({} of {} bytes)",
                    body.len(),
                    r.end - r.start
                )));
            }
        }
        Ok(body)
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send()
            .await
        {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) => match classify(&format!("looking up {key}"), e) {
                StoreError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match classify(&format!("deleting {key}"), e) {
                StoreError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    fn bucket(&self) -> &str {
        &self.bucket
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }
}
