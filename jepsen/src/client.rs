//! A small etcd v3 client for the workloads, with per-request timeouts and errors sorted
//! into "definitely did not happen" and "may have happened", which the history needs.

use std::time::Duration;

use flotilla_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::lease_client::LeaseClient;
use flotilla_proto::etcdserverpb::watch_client::WatchClient;
use flotilla_proto::etcdserverpb::{
    request_op, response_op, Compare, LeaseGrantRequest, LeaseRevokeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest,
};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// How long one request may take before its outcome is unknown.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub enum ClientError {
    /// The request certainly had no effect.
    Definite(String),
    /// The request may or may not have taken effect.
    Indefinite(String),
}

impl ClientError {
    pub fn message(&self) -> &str {
        match self {
            ClientError::Definite(m) | ClientError::Indefinite(m) => m,
        }
    }
}

/// Sorts a write's error: refusals before the write entered the log are definite;
/// timeouts, lost connections and the like are not.
fn write_error(s: tonic::Status) -> ClientError {
    let msg = format!("{:?}: {}", s.code(), s.message());
    let definite = matches!(
        s.code(),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange | Code::NotFound
    ) || s.message() == "etcdserver: no leader"
        // The connection was never made: the request did not leave this process.
        || s.message().contains("tcp connect error");
    if definite {
        ClientError::Definite(msg)
    } else {
        ClientError::Indefinite(msg)
    }
}

/// A read changes nothing, so every failed read definitely did not happen.
fn read_error(s: tonic::Status) -> ClientError {
    ClientError::Definite(format!("{:?}: {}", s.code(), s.message()))
}

#[derive(Clone)]
pub struct Client {
    pub channel: Channel,
    kv: KvClient<Channel>,
}

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(REQUEST_TIMEOUT);
    r
}

impl Client {
    /// A client for one endpoint; connects lazily, so a down node fails requests, not this.
    pub fn connect(endpoint: &str) -> anyhow::Result<Client> {
        let channel = Endpoint::from_shared(endpoint.to_string())?
            .connect_timeout(Duration::from_secs(1))
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Client {
            kv: KvClient::new(channel.clone()),
            channel,
        })
    }

    pub fn watch_client(&self) -> WatchClient<Channel> {
        WatchClient::new(self.channel.clone())
    }

    /// A serializable read: does the node answer at all?
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        self.kv
            .range(request(RangeRequest {
                key: b"ping".to_vec(),
                serializable: true,
                ..Default::default()
            }))
            .await
            .map(drop)
            .map_err(read_error)
    }

    /// Linearizable read of one key: (value, mod_revision), None when absent; and the
    /// response's revision.
    pub async fn get(&mut self, key: &str) -> Result<(Option<(String, i64)>, i64), ClientError> {
        let r = self
            .kv
            .range(request(RangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            }))
            .await
            .map_err(read_error)?
            .into_inner();
        let rev = r.header.map(|h| h.revision).unwrap_or(0);
        Ok((
            r.kvs.first().map(|kv| {
                (
                    String::from_utf8_lossy(&kv.value).into_owned(),
                    kv.mod_revision,
                )
            }),
            rev,
        ))
    }

    /// All keys under a prefix, linearizable: (key, value) pairs and the revision.
    pub async fn get_prefix(
        &mut self,
        prefix: &str,
    ) -> Result<(Vec<(String, String)>, i64), ClientError> {
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let r = self
            .kv
            .range(request(RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: end,
                ..Default::default()
            }))
            .await
            .map_err(read_error)?
            .into_inner();
        let rev = r.header.map(|h| h.revision).unwrap_or(0);
        let kvs = r
            .kvs
            .into_iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    String::from_utf8_lossy(&kv.value).into_owned(),
                )
            })
            .collect();
        Ok((kvs, rev))
    }

    /// Returns the revision of the write.
    pub async fn put(&mut self, key: &str, value: &str, lease: i64) -> Result<i64, ClientError> {
        let r = self
            .kv
            .put(request(PutRequest {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                lease,
                ..Default::default()
            }))
            .await
            .map_err(write_error)?
            .into_inner();
        Ok(r.header.map(|h| h.revision).unwrap_or(0))
    }

    /// Compare-and-set on the value: Ok(true) when it swapped, Ok(false) when the value
    /// differed (a definite failure).
    pub async fn cas(&mut self, key: &str, from: &str, to: &str) -> Result<bool, ClientError> {
        let txn = TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Value as i32,
                key: key.as_bytes().to_vec(),
                target_union: Some(TargetUnion::Value(from.as_bytes().to_vec())),
                range_end: Vec::new(),
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: to.as_bytes().to_vec(),
                    ..Default::default()
                })),
            }],
            failure: Vec::new(),
        };
        let r = self
            .kv
            .txn(request(txn))
            .await
            .map_err(write_error)?
            .into_inner();
        Ok(r.succeeded)
    }

    /// A Txn of guarded writes: compares on mod_revision per key, then puts; the ranges
    /// of `reads` are returned when it succeeded.
    pub async fn txn(
        &mut self,
        txn: TxnRequest,
    ) -> Result<(bool, Vec<response_op::Response>, i64), ClientError> {
        let r = self
            .kv
            .txn(request(txn))
            .await
            .map_err(write_error)?
            .into_inner();
        let rev = r.header.map(|h| h.revision).unwrap_or(0);
        Ok((
            r.succeeded,
            r.responses.into_iter().filter_map(|r| r.response).collect(),
            rev,
        ))
    }

    pub async fn lease_grant(&mut self, ttl: i64) -> Result<i64, ClientError> {
        let r = LeaseClient::new(self.channel.clone())
            .lease_grant(request(LeaseGrantRequest { ttl, id: 0 }))
            .await
            .map_err(write_error)?
            .into_inner();
        Ok(r.id)
    }

    pub async fn lease_revoke(&mut self, id: i64) -> Result<(), ClientError> {
        LeaseClient::new(self.channel.clone())
            .lease_revoke(request(LeaseRevokeRequest { id }))
            .await
            .map(drop)
            .map_err(write_error)
    }
}
