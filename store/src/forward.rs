//! Requests a follower hands to the leader (writes, read indexes, lease renewals), over one
//! long-lived `ForwardStream` per follower and leader.
//!
//! A unary call per forwarded request costs both members an HTTP/2 stream, its headers and a
//! task of its own; on the stream each request is one message with an id, and its answer
//! comes back with that id as soon as it is ready, whatever was asked before it. A leader
//! that lacks the stream (an older version) answers `Unimplemented` when it is opened, and
//! requests to it go as unary calls for a while.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_proto::flotillapb::{
    forward_request, forward_response, BatchResult, Error, ForwardRequest, ForwardResponse,
    ForwardStreamRequest, ForwardStreamResponse,
};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status, Streaming};

use crate::member::{Member, REQUEST_TIMEOUT};
use crate::raft::network::PeerClients;

/// Requests a follower may have written to one stream and not yet handed to the transport.
const STREAM_QUEUE: usize = 1024;
/// Requests the leader serves at once on one stream; it reads no more until one finishes.
pub const MAX_SERVING_PER_STREAM: usize = 1024;
/// How long a follower waits for a leader to accept a new stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long requests to a leader without the stream go as unary calls before it is tried again.
const UNARY_FALLBACK: Duration = Duration::from_secs(60);
/// How often a stream looks for requests waiting past the request timeout.
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);

pub type Answer = Result<ForwardResponse, Status>;

/// A follower's streams to leaders, by peer URL, opened on first use and again after one
/// ends.
pub struct ForwardStreams {
    peers: Arc<PeerClients>,
    streams: Mutex<HashMap<String, Arc<Stream>>>,
    /// Peer URLs that answered `Unimplemented`, and when.
    unary_since: Mutex<HashMap<String, Instant>>,
    /// One stream is opened at a time.
    opening: tokio::sync::Mutex<()>,
}

pub struct Stream {
    requests: mpsc::Sender<ForwardStreamRequest>,
    next_id: AtomicU64,
    state: Mutex<State>,
}

/// What becomes of a request's answer: called with it, on the task that reads the stream.
pub type Deliver = Box<dyn FnOnce(Answer) + Send>;

struct Waiter {
    deadline: Instant,
    deliver: Deliver,
}

#[derive(Default)]
struct State {
    waiting: HashMap<u64, Waiter>,
    /// Set once the stream ended: no request joins it after that.
    closed: bool,
}

impl ForwardStreams {
    pub fn new(peers: Arc<PeerClients>) -> ForwardStreams {
        ForwardStreams {
            peers,
            streams: Mutex::default(),
            unary_since: Mutex::default(),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    /// Sends `request` to the leader at `url` on its stream and waits for the answer (up to
    /// the request timeout). `Err` hands the request back when that leader has no stream.
    pub async fn call(&self, url: &str, request: ForwardRequest) -> Result<Answer, ForwardRequest> {
        match self.stream(url).await {
            Ok(Some(stream)) => Ok(stream.call(request).await),
            Ok(None) => Err(request),
            Err(status) => Ok(Err(status)),
        }
    }

    fn open_stream(&self, url: &str) -> Option<Arc<Stream>> {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.get(url).filter(|s| !s.is_closed()).cloned()
    }

    fn unary(&self, url: &str) -> bool {
        let mut unary = self.unary_since.lock().unwrap_or_else(|p| p.into_inner());
        match unary.get(url) {
            Some(since) if since.elapsed() < UNARY_FALLBACK => true,
            Some(_) => {
                unary.remove(url);
                false
            }
            None => false,
        }
    }

    /// The open stream to `url`, opened now if there is none; `None` when the leader has no
    /// stream.
    pub async fn stream(&self, url: &str) -> Result<Option<Arc<Stream>>, Status> {
        if let Some(s) = self.open_stream(url) {
            return Ok(Some(s));
        }
        if self.unary(url) {
            return Ok(None);
        }
        let _opening = self.opening.lock().await;
        // Another caller may have opened it meanwhile.
        if let Some(s) = self.open_stream(url) {
            return Ok(Some(s));
        }
        let mut client = self
            .peers
            .client(url)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let opened = tokio::time::timeout(
            OPEN_TIMEOUT,
            client.forward_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await;
        let answers = match opened {
            Ok(Ok(answers)) => answers.into_inner(),
            Ok(Err(s)) if s.code() == Code::Unimplemented => {
                tracing::info!(
                    "the leader at {url} has no forward stream; forwarding with one call per request"
                );
                self.unary_since
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(url.to_string(), Instant::now());
                return Ok(None);
            }
            Ok(Err(s)) => return Err(s),
            Err(_) => {
                return Err(Status::unavailable(format!(
                    "the leader at {url} did not accept a forward stream within {OPEN_TIMEOUT:?}"
                )))
            }
        };
        let stream = Arc::new(Stream {
            requests: tx,
            next_id: AtomicU64::new(0),
            state: Mutex::default(),
        });
        tokio::spawn(read_answers(stream.clone(), answers));
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(url.to_string(), stream.clone());
        Ok(Some(stream))
    }
}

impl Stream {
    fn is_closed(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed
    }

    fn take(&self, id: u64) -> Option<Deliver> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .waiting
            .remove(&id)
            .map(|w| w.deliver)
    }

    /// Sends `request`; `deliver` gets its answer, or the reason there is none (the stream
    /// ended, or the request timeout passed), exactly once.
    pub async fn send(&self, request: ForwardRequest, deliver: Deliver) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.closed {
                drop(state);
                deliver(Err(closed()));
                return id;
            }
            let deadline = Instant::now() + REQUEST_TIMEOUT;
            state.waiting.insert(id, Waiter { deadline, deliver });
        }
        let sent = self
            .requests
            .send(ForwardStreamRequest {
                id,
                request: Some(request),
            })
            .await;
        if sent.is_err() {
            if let Some(deliver) = self.take(id) {
                deliver(Err(closed()));
            }
        }
        id
    }

    /// Sends `request` and waits for its answer.
    async fn call(&self, request: ForwardRequest) -> Answer {
        let (tx, rx) = oneshot::channel();
        let deliver: Deliver = Box::new(move |answer| {
            let _ = tx.send(answer);
        });
        self.send(request, deliver).await;
        rx.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Ends the stream: every request still waiting gets `status`.
    fn close(&self, status: Status) {
        let waiting = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.closed = true;
            std::mem::take(&mut state.waiting)
        };
        for (_, w) in waiting {
            (w.deliver)(Err(status.clone()));
        }
    }

    /// Answers every request waiting past its deadline with `DeadlineExceeded`.
    fn expire(&self) {
        let now = Instant::now();
        let expired: Vec<Deliver> = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<u64> = state
                .waiting
                .iter()
                .filter(|(_, w)| w.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| state.waiting.remove(&id).map(|w| w.deliver))
                .collect()
        };
        for deliver in expired {
            deliver(Err(Status::deadline_exceeded(
                "no answer from the leader within the request timeout",
            )));
        }
    }
}

/// A request written to a stream that ended before its answer came: whether the leader acted
/// on it is unknown, as for a unary call whose connection broke.
fn closed() -> Status {
    Status::unavailable("the forward stream to the leader closed")
}

/// Hands each answer on `answers` to the request with its id, until the stream ends; answers
/// requests that waited too long with `DeadlineExceeded`.
async fn read_answers(stream: Arc<Stream>, mut answers: Streaming<ForwardStreamResponse>) {
    let mut sweep = tokio::time::interval(EXPIRY_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = loop {
        let next = tokio::select! {
            next = answers.message() => next,
            _ = sweep.tick() => {
                stream.expire();
                continue;
            }
        };
        match next {
            Ok(Some(a)) => {
                let Some(deliver) = stream.take(a.id) else {
                    continue; // it expired
                };
                let answer = match (a.response, a.error) {
                    (_, Some(e)) => Err(Status::new(Code::from(e.code), e.message)),
                    (Some(r), None) => Ok(r),
                    (None, None) => Err(Status::internal("empty forward stream answer")),
                };
                deliver(answer);
            }
            Ok(None) => break closed(),
            Err(s) => break Status::unavailable(format!("forward stream: {}", s.message())),
        }
    };
    stream.close(end);
}

/// Leader: serves one follower's stream. Each request is served as it arrives, and the
/// commands it carries enter the proposal queue before the next request is read, so they
/// reach the log in the order the follower sent them. Answers go back as they are ready.
pub fn serve(
    member: Arc<Member>,
    mut input: Streaming<ForwardStreamRequest>,
) -> mpsc::Receiver<Result<ForwardStreamResponse, Status>> {
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    tokio::spawn(async move {
        let mut serving = FuturesUnordered::new();
        let mut reading = true;
        loop {
            tokio::select! {
                next = input.message(), if reading && serving.len() < MAX_SERVING_PER_STREAM => {
                    match next {
                        Ok(Some(req)) => {
                            let id = req.id;
                            let request = req.request.and_then(|r| r.request);
                            let served = match request {
                                Some(forward_request::Request::Commands(batch)) => {
                                    let pending = member.enqueue_forwarded(batch.commands).await;
                                    async move {
                                        let results = Member::forwarded_results(pending).await;
                                        Ok(forward_response::Response::Commands(BatchResult {
                                            results,
                                        }))
                                    }
                                    .boxed()
                                }
                                other => {
                                    let member = member.clone();
                                    async move {
                                        crate::server::peer::serve_forward(&member, other).await
                                    }
                                    .boxed()
                                }
                            };
                            serving.push(
                                tokio::time::timeout(REQUEST_TIMEOUT, served).map(move |r| {
                                    let r = r.unwrap_or_else(|_| {
                                        Err(Status::deadline_exceeded(
                                            crate::error::EtcdError::Timeout.to_string(),
                                        ))
                                    });
                                    (id, r)
                                }),
                            );
                        }
                        Ok(None) => reading = false,
                        // The follower went away: nobody is left to answer.
                        Err(_) => return,
                    }
                }
                Some((id, result)) = serving.next(), if !serving.is_empty() => {
                    let answer = match result {
                        Ok(response) => ForwardStreamResponse {
                            id,
                            response: Some(ForwardResponse { response: Some(response) }),
                            error: None,
                        },
                        Err(s) => ForwardStreamResponse {
                            id,
                            response: None,
                            error: Some(Error {
                                code: s.code() as i32,
                                message: s.message().to_string(),
                            }),
                        },
                    };
                    if tx.send(Ok(answer)).await.is_err() {
                        return;
                    }
                }
                else => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::flotillapb::ReadIndexRequest;

    fn read_index() -> ForwardRequest {
        ForwardRequest {
            request: Some(forward_request::Request::ReadIndex(ReadIndexRequest {})),
        }
    }

    #[tokio::test]
    async fn a_leader_without_the_stream_gets_each_request_back_for_a_unary_call() {
        // A gRPC server with no services answers every method `Unimplemented`, as a leader
        // of a version before the stream does for this one.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(tonic::service::Routes::default())
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let streams = ForwardStreams::new(Arc::new(PeerClients::new(None)));
        let url = format!("http://{addr}");
        let back = streams
            .call(&url, read_index())
            .await
            .expect_err("the request comes back");
        assert_eq!(back, read_index());
        assert!(streams.unary(&url), "the leader is remembered as unary");
        assert!(streams.call(&url, read_index()).await.is_err());
    }

    #[tokio::test]
    async fn an_unreachable_leader_is_an_unavailable_answer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let streams = ForwardStreams::new(Arc::new(PeerClients::new(None)));
        let answer = streams.call(&url, read_index()).await.expect("not unary");
        assert_eq!(answer.unwrap_err().code(), Code::Unavailable);
        assert!(!streams.unary(&url));
    }

    fn stream() -> (Arc<Stream>, mpsc::Receiver<ForwardStreamRequest>) {
        let (tx, rx) = mpsc::channel(8);
        let s = Arc::new(Stream {
            requests: tx,
            next_id: AtomicU64::new(0),
            state: Mutex::default(),
        });
        (s, rx)
    }

    fn recorder() -> (Deliver, oneshot::Receiver<Answer>) {
        let (tx, rx) = oneshot::channel();
        (
            Box::new(move |a| {
                let _ = tx.send(a);
            }),
            rx,
        )
    }

    #[tokio::test]
    async fn every_request_gets_one_answer_when_the_stream_closes_or_its_time_runs_out() {
        let (s, mut sent) = stream();
        let (d0, mut r0) = recorder();
        let (d1, mut r1) = recorder();
        let id0 = s.send(read_index(), d0).await;
        let id1 = s.send(read_index(), d1).await;
        assert_eq!(sent.recv().await.unwrap().id, id0);
        assert_eq!(sent.recv().await.unwrap().id, id1);

        // The second is answered first; the first is still waiting.
        let answer = ForwardResponse {
            response: Some(forward_response::Response::ReadIndex(7)),
        };
        (s.take(id1).expect("waiting"))(Ok(answer.clone()));
        assert_eq!(r1.try_recv().unwrap().unwrap(), answer);
        assert!(r0.try_recv().is_err());

        // A waiter past its deadline is answered by the sweep.
        s.state
            .lock()
            .unwrap()
            .waiting
            .get_mut(&id0)
            .unwrap()
            .deadline = Instant::now();
        s.expire();
        assert_eq!(
            r0.try_recv().unwrap().unwrap_err().code(),
            Code::DeadlineExceeded
        );

        // Closing answers whoever still waits, and refuses requests after it.
        let (d2, mut r2) = recorder();
        s.send(read_index(), d2).await;
        s.close(closed());
        assert_eq!(
            r2.try_recv().unwrap().unwrap_err().code(),
            Code::Unavailable
        );
        let (d3, mut r3) = recorder();
        s.send(read_index(), d3).await;
        assert_eq!(
            r3.try_recv().unwrap().unwrap_err().code(),
            Code::Unavailable
        );
        assert!(s.is_closed());
    }
}
