//! The etcd Watch service: many watchers multiplexed on one bidirectional stream.
//!
//! Each stream has one task. The member's [`WatchHub`](crate::watch_hub::WatchHub) hands it
//! the applied revisions with an event for one of its watchers, and only those; the task
//! keeps, per watcher, the next revision it owes the client, and `synced`, the revision up
//! to which it has seen everything the hub handed out (a watcher owes nothing before it). A
//! watcher that starts in the past, or revisions the hub could not hand over (the stream was
//! slow), are served from the `rev` column family, so no event is ever skipped; a watcher
//! whose next revision has been compacted is cancelled with `compact_revision`.

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
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Access;
use crate::error::EtcdError;
use crate::member::Member;
use crate::mvcc::{Mvcc, RangeEnd, RevisionEvents};
use crate::watch_hub::Subscription;
use flotilla_proto::flotillapb::AuthInfo;

/// Responses queued for a client before the stream task waits for it.
const STREAM_BUFFER: usize = 128;
/// Watchers on one stream.
const MAX_WATCHERS_PER_STREAM: usize = 10_000;
/// Events read from disk per step of a catch-up.
const CATCH_UP_EVENTS: usize = 1_000;
/// Event bytes in one catch-up response (a single revision may still exceed it).
const CATCH_UP_RESPONSE_BYTES: usize = 1024 * 1024;

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
        let (sub, mailbox) = self.member.watch_hub.subscribe();
        let stream = WatchStreamTask {
            member: self.member.clone(),
            auth,
            token,
            synced: sub.dispatched(),
            sub,
            mailbox,
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
    fn select(&self, events: &[Event], mvcc: &Mvcc) -> Vec<Event> {
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
            .map(|e| Event {
                r#type: e.r#type,
                kv: e.kv.clone(),
                prev_kv: if self.prev_kv {
                    mvcc.prev_kv_of(e)
                } else {
                    None
                },
            })
            .collect()
    }
}

struct WatchStreamTask {
    member: Arc<Member>,
    /// Who opened the stream (from its token).
    auth: Result<AuthInfo, EtcdError>,
    token: Option<String>,
    sub: Subscription,
    mailbox: mpsc::Receiver<Arc<RevisionEvents>>,
    /// Every revision up to this one that the hub handed out has been delivered.
    synced: i64,
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
                batch = self.mailbox.recv() => match batch {
                    Some(b) => self.receive(&b).await,
                    None => return,
                },
                _ = self.sub.lag_notified() => self.repair().await,
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
                if self.remove(c.watch_id).is_some() {
                    let mut r = self.response(c.watch_id, self.member.mvcc.current_revision());
                    r.canceled = true;
                    self.send(r).await?;
                }
                Ok(())
            }
            Some(watch_request::RequestUnion::ProgressRequest(_)) => {
                // The revision every watcher on this stream has been brought up to.
                let synced = self.synced_now().await?;
                let current = self.member.mvcc.current_revision();
                let revision = self
                    .watchers
                    .values()
                    .map(|w| w.next_revision.max(synced + 1) - 1)
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
        // Registered before the current revision is read: every later revision with an
        // event for this watcher reaches the stream; earlier ones come from disk.
        self.sub.watch(&c.key, &c.range_end);
        let current = self.member.mvcc.current_revision();
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
                self.remove(id);
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
                    self.remove(id);
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
            // Whole revisions per response, split before one would pass the size limit
            // (gRPC clients refuse messages over 4 MiB by default).
            let mut responses: Vec<(i64, Vec<Event>)> = Vec::new();
            let mut bytes = 0;
            for b in &batches {
                let selected = w.select(&b.events, &mvcc);
                if selected.is_empty() {
                    continue;
                }
                let size: usize = selected.iter().map(prost::Message::encoded_len).sum();
                match responses.last_mut() {
                    Some((revision, events)) if bytes + size <= CATCH_UP_RESPONSE_BYTES => {
                        *revision = b.revision;
                        events.extend(selected);
                        bytes += size;
                    }
                    _ => {
                        responses.push((b.revision, selected));
                        bytes = size;
                    }
                }
            }
            for (revision, events) in responses {
                let mut r = self.response(id, revision);
                r.events = events;
                self.send(r).await?;
            }
            if let Some(w) = self.watchers.get_mut(&id) {
                w.next_revision = if last >= to { to + 1 } else { last + 1 };
            }
        }
    }

    /// Drops a watcher from the stream and its key from the hub.
    fn remove(&mut self, id: i64) -> Option<Watcher> {
        let w = self.watchers.remove(&id)?;
        self.sub.unwatch(&w.key, &w.range_end);
        Some(w)
    }

    /// A revision from the hub: first whatever the hub could not hand over before it.
    async fn receive(&mut self, batch: &RevisionEvents) -> Result<(), Gone> {
        self.repair().await?;
        self.deliver(batch).await?;
        self.synced = self.synced.max(batch.revision);
        Ok(())
    }

    /// Reads from disk, for every watcher, the revisions the hub marked this stream as
    /// having missed (and any up to the hub's newest), then counts them as seen.
    async fn repair(&mut self) -> Result<(), Gone> {
        while let Some(missed) = self.sub.take_lagged() {
            let through = missed.max(self.sub.dispatched());
            tracing::info!(
                through,
                watchers = self.watchers.len(),
                "watch stream fell behind; reading the revisions it missed from disk"
            );
            let ids: Vec<i64> = self.watchers.keys().copied().collect();
            for id in ids {
                if let Some(w) = self.watchers.get_mut(&id) {
                    w.next_revision = w.next_revision.max(self.synced + 1);
                }
                self.catch_up(id, through).await?;
            }
            self.synced = self.synced.max(through);
        }
        Ok(())
    }

    /// The revision up to which this stream has delivered everything: it takes what is in
    /// its mailbox and repairs any lag first.
    async fn synced_now(&mut self) -> Result<i64, Gone> {
        // Read before the mailbox is emptied: the hub handed over (or marked as missed)
        // every revision up to it before publishing it.
        let dispatched = self.sub.dispatched();
        while let Ok(b) = self.mailbox.try_recv() {
            self.receive(&b).await?;
        }
        self.repair().await?;
        self.synced = self.synced.max(dispatched);
        Ok(self.synced)
    }

    /// Delivers one revision's events to the watchers they match. A watcher owes nothing
    /// between its next revision and this one: the hub handed over every such revision
    /// with an event for it, in order, or marked it missed (repaired before this call).
    async fn deliver(&mut self, batch: &RevisionEvents) -> Result<(), Gone> {
        let synced = self.synced;
        let mut out = Vec::new();
        for (id, w) in self.watchers.iter_mut() {
            if batch.revision < w.next_revision.max(synced + 1) {
                continue;
            }
            w.next_revision = batch.revision + 1;
            let events = w.select(&batch.events, &self.member.mvcc);
            if !events.is_empty() {
                out.push((*id, events));
            }
        }
        for (id, events) in out {
            let mut r = self.response(id, batch.revision);
            r.events = events;
            self.send(r).await?;
        }
        Ok(())
    }

    async fn notify_progress(&mut self) -> Result<(), Gone> {
        let synced = self.synced_now().await?;
        let current = self.member.mvcc.current_revision();
        let due: Vec<(i64, i64)> = self
            .watchers
            .iter()
            .map(|(id, w)| (id, w, w.next_revision.max(synced + 1)))
            .filter(|(_, w, next)| w.progress_notify && *next > current)
            .map(|(id, _, next)| (*id, next - 1))
            .collect();
        for (id, revision) in due {
            self.send(self.response(id, revision)).await?;
        }
        Ok(())
    }
}
