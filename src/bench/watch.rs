//! Watch benchmarks: delivery latency from put to receipt, and watch-then-range.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::etcdserverpb::watch_client::WatchClient;
use flotilla_proto::etcdserverpb::{
    watch_request, PutRequest, RangeRequest, WatchCreateRequest, WatchRequest,
};
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::load::{key_at, progress, Plan};
use super::report::{histogram, Outcome};
use super::{kv, Common};

const KEY_PREFIX: &str = "bench-watch/";

/// `watchers` watchers over `streams` streams watch the key space; `--clients` writers put at
/// `put_rate` in all, each value carrying its send time; every delivered event's latency is
/// recorded.
pub async fn run_watch(
    common: &Common,
    channels: &[Channel],
    watchers: usize,
    streams: usize,
    put_rate: u64,
) -> anyhow::Result<Outcome> {
    let origin = Instant::now();
    let latencies = Arc::new(Mutex::new(histogram()));
    let streams = streams.clamp(1, watchers.max(1));
    let mut created = Vec::new();
    for s in 0..streams {
        let mut client = WatchClient::new(channels[s % channels.len()].clone());
        let mine = (watchers / streams) + usize::from(s < watchers % streams);
        // The create requests are queued before the call: etcd's server sends the response
        // headers only with its first message, which the call waits for.
        let (tx, rx) = mpsc::channel(mine.max(1));
        for w in 0..mine {
            let mut watched = KEY_PREFIX.as_bytes().to_vec();
            watched.extend_from_slice(&key_at(common, watched_key(s, w)));
            let create = WatchCreateRequest {
                key: watched,
                ..Default::default()
            };
            tx.send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(create)),
            })
            .await?;
        }
        let mut responses = client.watch(ReceiverStream::new(rx)).await?.into_inner();
        // Wait until every watcher of this stream is created before writing.
        let mut acks = 0;
        while acks < mine {
            match responses.message().await? {
                Some(r) if r.created => acks += 1,
                Some(_) => {}
                None => anyhow::bail!("watch stream closed while creating watchers"),
            }
        }
        let lat = latencies.clone();
        created.push(tokio::spawn(async move {
            let _keep_open = tx;
            while let Ok(Some(r)) = responses.message().await {
                let now = origin.elapsed().as_micros() as u64;
                let mut h = lat.lock().await;
                for e in r.events {
                    let sent =
                        e.kv.as_ref()
                            .and_then(|kv| kv.value.get(..8))
                            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
                    if let Some(sent) = sent {
                        h.saturating_record(now.saturating_sub(sent).max(1));
                    }
                }
            }
        }));
    }
    let mut writer_common = common.clone();
    writer_common.rate = put_rate.max(1);
    let plan = Plan::new(&writer_common);
    let (stop_tx, stop_rx) = mpsc::channel(1);
    progress(plan.clone(), stop_rx);
    // `--clients` writers share the plan (open loop at `put_rate`), spread over the
    // connections, so the rate is reached whatever one put's latency.
    let per_stream = (watchers / streams).max(1);
    let mut writers = Vec::new();
    for i in 0..common.clients.max(1) {
        let plan = plan.clone();
        let common = common.clone();
        let mut client = kv(&channels[i % channels.len()]);
        writers.push(tokio::spawn(async move {
            let mut out = Outcome::new();
            while let Some((n, _)) = plan.next().await {
                // Spread the puts over the watched keys, round robin over the streams.
                let s = (n as usize) % streams;
                let w = ((n as usize) / streams) % per_stream;
                let mut watched = KEY_PREFIX.as_bytes().to_vec();
                watched.extend_from_slice(&key_at(&common, watched_key(s, w)));
                let mut value = (origin.elapsed().as_micros() as u64).to_be_bytes().to_vec();
                value.resize(common.val_size.max(8), b'v');
                if let Err(s) = client
                    .put(PutRequest {
                        key: watched,
                        value,
                        ..Default::default()
                    })
                    .await
                {
                    out.record_error(&s);
                }
                plan.done.fetch_add(1, Ordering::Relaxed);
            }
            out
        }));
    }
    let mut out = Outcome::new();
    for w in writers {
        for (kind, n) in w.await?.errors {
            *out.errors.entry(kind).or_default() += n;
        }
    }
    // Give the last events time to arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for t in &created {
        t.abort();
    }
    let _ = stop_tx.send(()).await;
    let puts = plan.done.load(Ordering::Relaxed);
    out.latency_us = latencies.lock().await.clone();
    out.elapsed = plan.start.elapsed();
    let delivered = out.latency_us.len();
    if delivered < puts {
        *out.errors
            .entry("events not delivered within 500 ms of the last put".into())
            .or_default() += puts - delivered;
    }
    eprintln!("  {puts} puts, {delivered} events delivered");
    Ok(out)
}

/// The key number watcher `w` of stream `s` watches.
fn watched_key(s: usize, w: usize) -> u64 {
    (s * 1_000_003 + w) as u64
}

/// Each of `watchers` creates a watch and then reads the key space, as an informer starts.
pub async fn run_watch_get(
    _common: &Common,
    channels: &[Channel],
    watchers: usize,
) -> anyhow::Result<Outcome> {
    let start = Instant::now();
    let mut out = Outcome::new();
    for i in 0..watchers {
        let channel = channels[i % channels.len()].clone();
        let t0 = Instant::now();
        let (tx, rx) = mpsc::channel(1);
        let create = WatchCreateRequest {
            key: KEY_PREFIX.into(),
            range_end: b"bench-watch0".to_vec(),
            ..Default::default()
        };
        tx.send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(create)),
        })
        .await?;
        let mut responses = WatchClient::new(channel.clone())
            .watch(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let _ = responses.message().await?;
        drop(tx);
        let r = kv(&channel)
            .range(RangeRequest {
                key: KEY_PREFIX.into(),
                range_end: b"bench-watch0".to_vec(),
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) => {
                out.latency_us
                    .saturating_record(t0.elapsed().as_micros().max(1) as u64);
            }
            Err(s) => out.record_error(&s),
        }
    }
    out.elapsed = start.elapsed();
    Ok(out)
}
