//! Unary gRPC calls straight over HTTP/2, for the request loops of the key-value benchmarks.
//!
//! The load generator shares the machine with the servers it measures, so what it spends
//! on a request is taken from them. Through tonic's `Channel`, a call passes a buffer task,
//! hyper's dispatch task and a task spawned for its body before it reaches HTTP/2; here it
//! opens its stream on the connection itself, sends the encoded message and reads the
//! answer. Streaming calls (watch, lease keep-alive) still go through tonic.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tonic::{Code, Status};

/// Largest response message read (what the tonic clients of the benchmark allow).
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// HTTP/2 flow-control windows the client grants: room for many answers in flight.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One HTTP/2 connection to an endpoint; cloned by every client that uses it.
#[derive(Clone)]
pub struct Conn {
    send: h2::client::SendRequest<Bytes>,
    /// `http://host:port`, which every request's URI starts with.
    base: String,
}

impl Conn {
    /// Connects to `url` (`http://host:port`).
    pub async fn connect(url: &str) -> anyhow::Result<Conn> {
        let uri: http::Uri = url.parse().with_context(|| format!("bad endpoint {url}"))?;
        if uri.scheme_str() != Some("http") {
            anyhow::bail!("endpoint {url}: only http:// endpoints are supported");
        }
        let authority = uri
            .authority()
            .with_context(|| format!("endpoint {url} has no host:port"))?
            .to_string();
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(authority.as_str()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {url}: timed out"))?
        .with_context(|| format!("cannot connect to {url}"))?;
        tcp.set_nodelay(true)?;
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(Unvectored(tcp))
            .await
            .with_context(|| format!("HTTP/2 handshake with {url}"))?;
        tokio::spawn(async move {
            // Its end shows up in the calls still waiting on it.
            let _ = connection.await;
        });
        Ok(Conn {
            send,
            base: format!("http://{authority}"),
        })
    }

    /// Calls the method at `path` (`/package.Service/Method`) with `request`.
    pub async fn unary<Req: Message, Resp: Message + Default>(
        &self,
        path: &str,
        request: &Req,
    ) -> Result<Resp, Status> {
        let len = request.encoded_len();
        let mut body = BytesMut::with_capacity(5 + len);
        body.put_u8(0); // not compressed
        body.put_u32(u32::try_from(len).map_err(|_| Status::internal("request too large"))?);
        request
            .encode(&mut body)
            .map_err(|e| Status::internal(format!("encoding the request: {e}")))?;
        let head = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("{}{path}", self.base))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(())
            .map_err(|e| Status::internal(format!("building the request: {e}")))?;
        let mut send = self.send.clone().ready().await.map_err(transport)?;
        let (response, mut stream) = send.send_request(head, false).map_err(transport)?;
        stream.send_data(body.freeze(), true).map_err(transport)?;
        let response = response.await.map_err(transport)?;
        if response.status() != http::StatusCode::OK {
            return Err(Status::unknown(format!(
                "HTTP status {} from the server",
                response.status()
            )));
        }
        // A call that fails at once answers with its status in the headers alone.
        if let Some(status) = Status::from_header_map(response.headers()) {
            if status.code() != Code::Ok {
                return Err(status);
            }
        }
        let mut body = response.into_body();
        let mut message = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(transport)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if message.len() + chunk.len() > 5 + MAX_RESPONSE_BYTES {
                return Err(Status::out_of_range(format!(
                    "response larger than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            message.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.map_err(transport)?;
        match trailers.as_ref().and_then(Status::from_header_map) {
            Some(status) if status.code() == Code::Ok => {}
            Some(status) => return Err(status),
            None => return Err(Status::internal("the response has no grpc-status")),
        }
        decode_message(message.freeze())
    }
}

/// A connection's socket, claiming no vectored writes, so that the requests of the clients
/// sharing the connection go out together.
///
/// HTTP/2 copies a DATA frame into its write buffer only when it is small: 256 bytes for a
/// socket that takes vectored writes, 1 KiB for one that does not. A larger frame is held
/// aside and written, with what the buffer holds, before the next frame is taken. A put's
/// message (a 256-byte value by default) is over 256 bytes, so through a vectored socket each
/// request was its own system call (on loopback the call also runs the server's receive
/// path). Against a 3-member cluster at 256 clients over 16 connections this wrapper took the
/// load generator from one `writev` per request to one `sendto` per about 13, and its CPU
/// per put down by about a sixth. (The clients' tasks queue before the connection's task
/// runs because the runtime has no LIFO slot; see ARCHITECTURE.md.)
struct Unvectored<T>(T);

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Unvectored<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Unvectored<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    // The default `poll_write_vectored` writes the first buffer through `poll_write`.
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The one length-prefixed message of a unary response body.
fn decode_message<Resp: Message + Default>(mut body: Bytes) -> Result<Resp, Status> {
    if body.len() < 5 {
        return Err(Status::internal("the response has no message"));
    }
    let compressed = body.get_u8();
    let len = body.get_u32() as usize;
    if compressed != 0 {
        return Err(Status::internal("the response is compressed"));
    }
    if len != body.len() {
        return Err(Status::internal(format!(
            "the response's message is {} bytes, its prefix says {len}",
            body.len()
        )));
    }
    Resp::decode(body).map_err(|e| Status::internal(format!("decoding the response: {e}")))
}

fn transport(e: h2::Error) -> Status {
    Status::unavailable(format!("transport: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::etcdserverpb::PutResponse;

    #[test]
    fn response_messages_are_checked() {
        let msg = PutResponse::default();
        let mut ok = vec![0u8];
        ok.extend((msg.encoded_len() as u32).to_be_bytes());
        msg.encode(&mut ok).unwrap();
        assert_eq!(
            decode_message::<PutResponse>(Bytes::from(ok.clone())).unwrap(),
            msg
        );

        let short = decode_message::<PutResponse>(Bytes::from_static(&[0, 0, 0])).unwrap_err();
        assert_eq!(short.code(), Code::Internal);

        let mut compressed = ok.clone();
        compressed[0] = 1;
        let e = decode_message::<PutResponse>(Bytes::from(compressed)).unwrap_err();
        assert!(e.message().contains("compressed"), "{e:?}");

        let mut wrong_len = ok;
        wrong_len[4] += 1;
        let e = decode_message::<PutResponse>(Bytes::from(wrong_len)).unwrap_err();
        assert!(e.message().contains("prefix says"), "{e:?}");
    }
}
