//! The store as the apiserver uses it: only the etcd v3 API (Range, Txn, Watch), so any
//! etcd v3 server works underneath, ours or etcd itself.

use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::lease_client::LeaseClient;
use flotilla_proto::etcdserverpb::watch_client::WatchClient;
use flotilla_proto::etcdserverpb::{
    compare, request_op, response_op, watch_request, Compare, DeleteRangeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};
use flotilla_proto::mvccpb::KeyValue;
use tonic::transport::{Channel, Endpoint};

use crate::status::ApiError;

/// Largest message the store may send back (a page of a list).
const MAX_STORE_MESSAGE: usize = 64 << 20;

/// Clients of every store endpoint; requests go to the current one and move on to the next
/// when it cannot be reached.
#[derive(Clone)]
pub struct Store {
    endpoints: std::sync::Arc<Vec<Clients>>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// The clients of one store endpoint.
#[derive(Clone)]
pub struct Clients {
    url: String,
    pub kv: KvClient<Channel>,
    pub watch: WatchClient<Channel>,
    pub lease: LeaseClient<Channel>,
}

/// Whether a failed call never reached the store (so trying another endpoint is safe even
/// for a write).
fn not_sent(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable
        && (s.message().contains("connect") || s.message().contains("Connection refused"))
}

/// What a conditional write found when its condition failed.
pub enum Written {
    Done {
        revision: i64,
    },
    /// The key's current state (None: it does not exist).
    Conflict(Option<KeyValue>),
}

fn store_error(s: tonic::Status) -> ApiError {
    if s.message().contains("required revision has been compacted") {
        return ApiError::gone(format!("too old resource version: {}", s.message()));
    }
    if s.message().contains("requested lease not found") {
        return ApiError::unavailable("the store lost the events lease; retry");
    }
    if s.message().contains("request is too large") {
        return ApiError::too_large(crate::handler::MAX_STORED_BYTES);
    }
    if s.message()
        .contains("required revision is a future revision")
    {
        return ApiError::bad_request(format!(
            "Timeout: Too large resource version: {}",
            s.message()
        ));
    }
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
            ApiError::unavailable(format!("the store is unavailable: {}", s.message()))
        }
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
            ApiError::bad_request(format!("store: {}", s.message()))
        }
        _ => ApiError::internal(format!("store: {}", s.message())),
    }
}

/// The first key after every key with this prefix.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Store {
    /// Connects (lazily) to the store, spreading requests over `servers`.
    pub fn connect(servers: &[String]) -> anyhow::Result<Store> {
        let mut clients = Vec::new();
        for s in servers {
            let url = if s.contains("://") {
                s.clone()
            } else {
                format!("http://{s}")
            };
            let channel = Endpoint::from_shared(url.clone())
                .map_err(|e| anyhow::anyhow!("--etcd-servers: {url}: {e}"))?
                .connect_timeout(std::time::Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(std::time::Duration::from_secs(10))
                .keep_alive_timeout(std::time::Duration::from_secs(5))
                .connect_lazy();
            clients.push(Clients {
                url,
                kv: KvClient::new(channel.clone()).max_decoding_message_size(MAX_STORE_MESSAGE),
                watch: WatchClient::new(channel.clone())
                    .max_decoding_message_size(MAX_STORE_MESSAGE),
                lease: LeaseClient::new(channel),
            });
        }
        if clients.is_empty() {
            anyhow::bail!("--etcd-servers is empty");
        }
        Ok(Store {
            endpoints: std::sync::Arc::new(clients),
            current: Default::default(),
        })
    }

    /// Runs `call` against the current endpoint, moving to the next ones while the current
    /// cannot be reached (for any call when `idempotent`, else only if it was never sent).
    async fn call<T, F, Fut>(&self, idempotent: bool, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(Clients) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        use std::sync::atomic::Ordering;
        let n = self.endpoints.len();
        let mut last = None;
        for attempt in 0..n * 2 {
            let i = self.current.load(Ordering::Relaxed) % n;
            let clients = self.endpoints[i].clone();
            let url = clients.url.clone();
            match call(clients).await {
                Err(s) if s.code() == tonic::Code::Unavailable && (idempotent || not_sent(&s)) => {
                    tracing::debug!(store = %url, error = %s.message(), "store endpoint unavailable; trying the next");
                    let _ = self.current.compare_exchange(
                        i,
                        (i + 1) % n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    if attempt + 1 >= n {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                    last = Some(s);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| tonic::Status::unavailable("no store endpoint")))
    }

    /// One key, linearizably (or at `revision`); with the store's current revision.
    pub async fn get(&self, key: &str) -> Result<(Option<KeyValue>, i64), ApiError> {
        let request = RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let resp = self
            .call(true, |Clients { mut kv, .. }| {
                let request = request.clone();
                async move { kv.range(request).await }
            })
            .await
            .map_err(store_error)?
            .into_inner();
        let revision = resp.header.map(|h| h.revision).unwrap_or(0);
        Ok((resp.kvs.into_iter().next(), revision))
    }

    /// Up to `limit` keys (0: all) from `start` to the end of `prefix`, at `revision` (0:
    /// now). Returns the keys, whether more follow, and the revision read at.
    pub async fn list(
        &self,
        prefix: &str,
        start: &[u8],
        limit: i64,
        revision: i64,
    ) -> Result<(Vec<KeyValue>, bool, i64), ApiError> {
        let key = if start.is_empty() {
            prefix.as_bytes().to_vec()
        } else {
            start.to_vec()
        };
        let request = RangeRequest {
            key,
            range_end: prefix_end(prefix.as_bytes()),
            limit,
            revision,
            ..Default::default()
        };
        let resp = self
            .call(true, |Clients { mut kv, .. }| {
                let request = request.clone();
                async move { kv.range(request).await }
            })
            .await
            .map_err(store_error)?
            .into_inner();
        let revision = resp.header.map(|h| h.revision).unwrap_or(0);
        Ok((resp.kvs, resp.more, revision))
    }

    /// Writes `value` if the key's mod_revision is `expected` (0: the key must not exist).
    pub async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: i64,
    ) -> Result<Written, ApiError> {
        self.put_if_leased(key, value, expected, 0).await
    }

    /// As `put_if`, attaching the key to `lease` (0: none), so it goes when the lease does.
    pub async fn put_if_leased(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: i64,
        lease: i64,
    ) -> Result<Written, ApiError> {
        self.txn_if(
            key,
            expected,
            request_op::Request::RequestPut(PutRequest {
                key: key.as_bytes().to_vec(),
                value,
                lease,
                ..Default::default()
            }),
        )
        .await
    }

    /// A new lease of `ttl` seconds.
    pub async fn grant_lease(&self, ttl: i64) -> Result<i64, ApiError> {
        let resp = self
            .call(false, |Clients { mut lease, .. }| async move {
                lease
                    .lease_grant(flotilla_proto::etcdserverpb::LeaseGrantRequest { ttl, id: 0 })
                    .await
            })
            .await
            .map_err(store_error)?
            .into_inner();
        if !resp.error.is_empty() {
            return Err(ApiError::internal(format!("store: {}", resp.error)));
        }
        Ok(resp.id)
    }

    /// Deletes every key under `prefix`.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), ApiError> {
        let request = DeleteRangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            ..Default::default()
        };
        self.call(true, |Clients { mut kv, .. }| {
            let request = request.clone();
            async move { kv.delete_range(request).await }
        })
        .await
        .map_err(store_error)?;
        Ok(())
    }

    /// Deletes the key if its mod_revision is `expected`.
    pub async fn delete_if(&self, key: &str, expected: i64) -> Result<Written, ApiError> {
        self.txn_if(
            key,
            expected,
            request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            }),
        )
        .await
    }

    async fn txn_if(
        &self,
        key: &str,
        expected: i64,
        then: request_op::Request,
    ) -> Result<Written, ApiError> {
        let then = RequestOp {
            request: Some(then),
        };
        let request = TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Mod as i32,
                key: key.as_bytes().to_vec(),
                range_end: Vec::new(),
                target_union: Some(compare::TargetUnion::ModRevision(expected)),
            }],
            success: vec![then],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: key.as_bytes().to_vec(),
                    ..Default::default()
                })),
            }],
        };
        let resp = self
            .call(false, |Clients { mut kv, .. }| {
                let request = request.clone();
                async move { kv.txn(request).await }
            })
            .await
            .map_err(store_error)?
            .into_inner();
        if resp.succeeded {
            return Ok(Written::Done {
                revision: resp.header.map(|h| h.revision).unwrap_or(0),
            });
        }
        let current = resp.responses.into_iter().find_map(|r| match r.response {
            Some(response_op::Response::ResponseRange(range)) => range.kvs.into_iter().next(),
            _ => None,
        });
        Ok(Written::Conflict(current))
    }

    /// Every change under `prefix` from `start_revision` on, with previous values.
    pub async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<(tonic::Streaming<WatchResponse>, ProgressRequester), ApiError> {
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: prefix.as_bytes().to_vec(),
                    range_end: prefix_end(prefix.as_bytes()),
                    start_revision,
                    prev_kv: true,
                    progress_notify: true,
                    ..Default::default()
                },
            )),
        };
        let (stream, requests) = self
            .call(true, |Clients { mut watch, .. }| {
                let create = create.clone();
                async move {
                    // The request stream stays open for as long as the watch lives; progress
                    // requests go down it.
                    let (tx, rx) = tokio::sync::mpsc::channel(4);
                    let _ = tx.send(create).await;
                    let resp = watch
                        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await?;
                    Ok((resp, tx))
                }
            })
            .await
            .map_err(store_error)?;
        Ok((stream.into_inner(), ProgressRequester(requests)))
    }
}

/// Asks a store watch for a progress notification (the revision it has reached).
#[derive(Clone)]
pub struct ProgressRequester(tokio::sync::mpsc::Sender<WatchRequest>);

impl ProgressRequester {
    pub fn request(&self) {
        let _ = self.0.try_send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::ProgressRequest(
                flotilla_proto::etcdserverpb::WatchProgressRequest {},
            )),
        });
    }
}
