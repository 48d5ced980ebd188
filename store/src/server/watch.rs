//! The etcd Watch service: many watchers multiplexed on one bidirectional stream.
//!
//! Each stream has one task. It receives every applied revision from the member's fan-out
//! and keeps, per watcher, the next revision it owes the client. A watcher that starts in the
//! past, or that the fan-out left behind (the stream was slow), is served from the `rev`
//! column family until it reaches the revision in hand, so no event is ever skipped; a
//! watcher whose next revision has been compacted is cancelled with `compact_revision`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use flotilla_proto::etcdserverpb::watch_server::Watch;
use flotilla_proto::etcdserverpb::{
    watch_create_request::FilterType, watch_request, WatchCreateRequest, WatchRequest,
    WatchResponse,
};
use flotilla_proto::mvccpb::{event::EventType, Event};
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Access;
use crate::error::EtcdError;
use crate::member::Member;
use crate::mvcc::{RangeEnd, RevisionEvents};
use flotilla_proto::flotillapb::AuthInfo;

/// Responses queued for a client before the stream task waits for it.
const STREAM_BUFFER: usize = 128;
/// Watchers on one stream.
const MAX_WATCHERS_PER_STREAM: usize = 10_000;
/// Events read from disk per step of a catch-up.
const CATCH_UP_EVENTS: usize = 1_000;

pub struct WatchService {
    pub member: Arc<Member>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // A bad token fails each watch the stream creates, not the stream (as etcd). The
        // token is judged again at each create: it may expire while the stream lives.
        let auth = self.member.auth_info(request.metadata()).await;
        let token = request
            .metadata()
            .get("token")
            .or_else(|| request.metadata().get("authorization"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let stream = WatchStreamTask {
            member: self.member.clone(),
            auth,
            token,
            fanout: self.member.mvcc.subscribe(),
            out: tx,
            watchers: BTreeMap::new(),
            next_auto_id: 0,
        };
        tokio::spawn(stream.run(incoming));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Watcher {
    key: Vec<u8>,
    range_end: Vec<u8>,
    /// The first revision not yet delivered.
    next_revision: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
}

impl Watcher {
    fn select(&self, events: &[Event]) -> Vec<Event> {
        let end = RangeEnd::of(&self.range_end);
        events
            .iter()
            .filter(|e| {
                let put = e.r#type == EventType::Put as i32;
                if (put && self.no_put) || (!put && self.no_delete) {
                    return false;
                }
                e.kv.as_ref()
                    .map(|kv| end.contains(&self.key, &kv.key))
                    .unwrap_or(false)
            })
            .map(|e| {
                let mut e = e.clone();
                if !self.prev_kv {
                    e.prev_kv = None;
                }
                e
            })
            .collect()
    }
}

struct WatchStreamTask {
    member: Arc<Member>,
    /// Who opened the stream (from its token).
    auth: Result<AuthInfo, EtcdError>,
    token: Option<String>,
    fanout: broadcast::Receiver<Arc<RevisionEvents>>,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: BTreeMap<i64, Watcher>,
    next_auto_id: i64,
}

/// The client has gone away; the stream task ends.
struct Gone;

impl WatchStreamTask {
    async fn run(mut self, mut incoming: Streaming<WatchRequest>) {
        let mut tick = tokio::time::interval(self.member.limits.progress_notify_interval);
        tick.tick().await;
        loop {
            let step = tokio::select! {
                req = incoming.message() => match req {
                    Ok(Some(r)) => self.handle(r).await,
                    Ok(None) | Err(_) => return,
                },
                batch = self.fanout.recv() => match batch {
                    Ok(b) => self.deliver(&b).await,
                    // Skipped revisions are read back from disk when the next batch arrives.
                    Err(broadcast::error::RecvError::Lagged(_)) => Ok(()),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => self.notify_progress().await,
            };
            if step.is_err() {
                return;
            }
        }
    }

    async fn send(&self, resp: WatchResponse) -> Result<(), Gone> {
        self.out.send(Ok(resp)).await.map_err(|_| Gone)
    }

    fn response(&self, watch_id: i64, revision: i64) -> WatchResponse {
        WatchResponse {
            header: Some(self.member.header(revision)),
            watch_id,
            ..Default::default()
        }
    }

    async fn handle(&mut self, req: WatchRequest) -> Result<(), Gone> {
        match req.request_union {
            Some(watch_request::RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(watch_request::RequestUnion::CancelRequest(c)) => {
                if self.watchers.remove(&c.watch_id).is_some() {
                    let mut r = self.response(c.watch_id, self.member.mvcc.current_revision());
                    r.canceled = true;
                    self.send(r).await?;
                }
                Ok(())
            }
            Some(watch_request::RequestUnion::ProgressRequest(_)) => {
                // The revision every watcher on this stream has been brought up to.
                let current = self.member.mvcc.current_revision();
                let revision = self
                    .watchers
                    .values()
                    .map(|w| w.next_revision - 1)
                    .min()
                    .unwrap_or(current)
                    .min(current);
                self.send(self.response(-1, revision)).await
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, c: WatchCreateRequest) -> Result<(), Gone> {
        let current = self.member.mvcc.current_revision();
        let id = if c.watch_id != 0 {
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_auto_id) {
                self.next_auto_id += 1;
            }
            self.next_auto_id
        };
        let state = self.member.mvcc.auth();
        let permitted = self.auth.clone().and_then(|mut auth| {
            if let (Some(token), true) = (&self.token, state.enabled()) {
                auth = state.verify_token(token, crate::member::unix_now())?;
            }
            state.check_range(Some(&auth), &c.key, &c.range_end, Access::Read)
        });
        if self.watchers.contains_key(&id)
            || self.watchers.len() >= MAX_WATCHERS_PER_STREAM
            || c.key.is_empty()
            || permitted.is_err()
        {
            let reason = if c.key.is_empty() {
                EtcdError::EmptyKey.to_string()
            } else if let Err(e) = permitted {
                e.to_string()
            } else if self.watchers.contains_key(&id) {
                "mvcc: duplicate watch ID provided on the WatchStream".to_string()
            } else {
                format!("flotilla: at most {MAX_WATCHERS_PER_STREAM} watchers on one stream")
            };
            let mut r = self.response(id, current);
            r.created = true;
            r.canceled = true;
            r.cancel_reason = reason;
            return self.send(r).await;
        }
        let watcher = Watcher {
            next_revision: if c.start_revision > 0 {
                c.start_revision
            } else {
                current + 1
            },
            key: c.key,
            range_end: c.range_end,
            prev_kv: c.prev_kv,
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            progress_notify: c.progress_notify,
        };
        let mut r = self.response(id, current);
        r.created = true;
        self.send(r).await?;
        self.watchers.insert(id, watcher);
        if c.start_revision > 0 && c.start_revision <= current {
            self.catch_up(id, current).await?;
        }
        Ok(())
    }

    /// Delivers revisions `[watcher.next_revision, to]` from disk.
    async fn catch_up(&mut self, id: i64, to: i64) -> Result<(), Gone> {
        loop {
            let Some(w) = self.watchers.get(&id) else {
                return Ok(());
            };
            let from = w.next_revision;
            if from > to {
                return Ok(());
            }
            let compacted = self.member.mvcc.compact_revision();
            if from < compacted {
                self.watchers.remove(&id);
                let mut r = self.response(id, self.member.mvcc.current_revision());
                r.compact_revision = compacted;
                r.canceled = true;
                r.cancel_reason = EtcdError::Compacted.to_string();
                return self.send(r).await;
            }
            let mvcc = self.member.mvcc.clone();
            let batches = match tokio::task::block_in_place(|| {
                mvcc.events_between(from, to, CATCH_UP_EVENTS)
            }) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, watch_id = id, "watch catch-up read failed");
                    self.watchers.remove(&id);
                    let mut r = self.response(id, self.member.mvcc.current_revision());
                    r.canceled = true;
                    r.cancel_reason = e.to_string();
                    return self.send(r).await;
                }
            };
            let Some(last) = batches.last().map(|b| b.revision) else {
                // No events in the rest of the span (e.g. revisions compacted away between
                // the check and the read are caught on the next loop).
                if let Some(w) = self.watchers.get_mut(&id) {
                    w.next_revision = to + 1;
                }
                continue;
            };
            let mut events = Vec::new();
            for b in &batches {
                events.extend(w.select(&b.events));
            }
            if !events.is_empty() {
                let mut r = self.response(id, last);
                r.events = events;
                self.send(r).await?;
            }
            if let Some(w) = self.watchers.get_mut(&id) {
                w.next_revision = if last >= to { to + 1 } else { last + 1 };
            }
        }
    }

    async fn deliver(&mut self, batch: &RevisionEvents) -> Result<(), Gone> {
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            let Some(w) = self.watchers.get(&id) else {
                continue;
            };
            if batch.revision < w.next_revision {
                continue;
            }
            if batch.revision > w.next_revision {
                self.catch_up(id, batch.revision - 1).await?;
            }
            let Some(w) = self.watchers.get_mut(&id) else {
                continue;
            };
            let events = w.select(&batch.events);
            w.next_revision = batch.revision + 1;
            if !events.is_empty() {
                let mut r = self.response(id, batch.revision);
                r.events = events;
                self.send(r).await?;
            }
        }
        Ok(())
    }

    async fn notify_progress(&mut self) -> Result<(), Gone> {
        let current = self.member.mvcc.current_revision();
        let due: Vec<(i64, i64)> = self
            .watchers
            .iter()
            .filter(|(_, w)| w.progress_notify && w.next_revision > current)
            .map(|(id, w)| (*id, w.next_revision - 1))
            .collect();
        for (id, revision) in due {
            self.send(self.response(id, revision)).await?;
        }
        Ok(())
    }
}
