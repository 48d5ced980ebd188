//! The KV service's unary calls, read and answered without tonic's streaming codec.
//!
//! tonic handles a unary call as a stream of one: a decoder state machine over the request
//! body, then an encoder stream and a body adapter for the answer. For the calls that carry
//! almost all of a member's load (Range, Put, DeleteRange, Txn) this module reads the one
//! length-prefixed message, calls the same `Kv` method, and answers with the encoded message
//! and `grpc-status: 0` in one body. Refusals keep tonic's texts and codes.

use std::future::Future;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prost::Message;
use tonic::metadata::MetadataMap;
use tonic::Status;

use super::{GrpcFuture, GrpcResponse};

/// Calls `handler` with the message of `request`, which may be at most `max` bytes.
pub(super) fn call<Req, Resp, F, Fut>(
    request: http::Request<Incoming>,
    max: usize,
    handler: F,
) -> GrpcFuture
where
    Req: Message + Default + Send + 'static,
    Resp: Message + 'static,
    F: FnOnce(tonic::Request<Req>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>> + Send,
{
    Box::pin(async move {
        Ok(match answer(request, max, handler).await {
            Ok(response) => response,
            Err(status) => status.into_http(),
        })
    })
}

async fn answer<Req, Resp, F, Fut>(
    request: http::Request<Incoming>,
    max: usize,
    handler: F,
) -> Result<GrpcResponse, Status>
where
    Req: Message + Default,
    Resp: Message,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let (parts, body) = request.into_parts();
    if let Some(encoding) = parts.headers.get("grpc-encoding") {
        if encoding.as_bytes() != b"identity" {
            return Err(Status::unimplemented(format!(
                "Content is compressed with `{}` which isn't supported",
                String::from_utf8_lossy(encoding.as_bytes())
            )));
        }
    }
    let message = read_message(body, max).await?;
    let message = Req::decode(message)
        .map_err(|e| Status::internal(format!("failed to decode Protobuf message: {e}")))?;
    let request = tonic::Request::from_parts(
        MetadataMap::from_headers(parts.headers),
        parts.extensions,
        message,
    );
    let (metadata, message, _) = handler(request).await?.into_parts();
    let mut out = BytesMut::with_capacity(5 + message.encoded_len());
    out.put_u8(0);
    out.put_u32(message.encoded_len() as u32);
    message
        .encode(&mut out)
        .map_err(|e| Status::internal(format!("encoding the response: {e}")))?;
    let mut trailers = http::HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = [
        Ok(http_body::Frame::data(out.freeze())),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let body = http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed_unsync();
    let mut response = http::Response::new(body);
    *response.headers_mut() = metadata.into_headers();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// The one message of a unary request body: its 5-byte prefix checked, at most `max` bytes.
async fn read_message(mut body: Incoming, max: usize) -> Result<Bytes, Status> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::internal(format!("reading the request: {e}")))?;
        // A unary request's trailers, if a client sent any, carry nothing a method reads.
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max.saturating_add(5) {
                // The prefix is in by now (the limit is far above 5 bytes).
                return Err(too_large(prefix_len(&buf).unwrap_or(buf.len()), max));
            }
            buf.extend_from_slice(&data);
        }
    }
    one_message(buf.freeze(), max)
}

fn prefix_len(buf: &[u8]) -> Option<usize> {
    Some(u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?) as usize)
}

fn too_large(len: usize, max: usize) -> Status {
    Status::out_of_range(format!(
        "Error, decoded message length too large: found {len} bytes, the limit is: {max} bytes"
    ))
}

/// Checks a unary request body: one uncompressed message whose prefix gives its length.
fn one_message(mut buf: Bytes, max: usize) -> Result<Bytes, Status> {
    if buf.is_empty() {
        return Err(Status::internal("Missing request message."));
    }
    if buf.len() < 5 {
        return Err(Status::internal("Unexpected EOF decoding stream."));
    }
    match buf.get_u8() {
        0 => {}
        1 => {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ))
        }
        f => {
            return Err(Status::internal(format!(
                "protocol error: received message with invalid compression flag: {f} (valid flags are 0 and 1), while sending request"
            )))
        }
    }
    let len = buf.get_u32() as usize;
    if len > max {
        return Err(too_large(len, max));
    }
    if buf.len() < len {
        return Err(Status::internal("Unexpected EOF decoding stream."));
    }
    if buf.len() > len {
        return Err(Status::internal(
            "a unary request holds more than one message",
        ));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn framed(flag: u8, message: &[u8]) -> Bytes {
        let mut b = vec![flag];
        b.extend((message.len() as u32).to_be_bytes());
        b.extend(message);
        Bytes::from(b)
    }

    /// Bodies that are not one plain message are refused with tonic's codes and texts.
    #[test]
    fn request_bodies_are_checked() {
        assert_eq!(one_message(framed(0, b"abc"), 10).unwrap(), &b"abc"[..]);
        assert_eq!(one_message(framed(0, b""), 10).unwrap(), &b""[..]);

        let cases: Vec<(Bytes, Code, &str)> = vec![
            (Bytes::new(), Code::Internal, "Missing request message."),
            (
                Bytes::from_static(&[0, 0]),
                Code::Internal,
                "Unexpected EOF",
            ),
            (framed(1, b"abc"), Code::Internal, "compressed-flag"),
            (
                framed(7, b"abc"),
                Code::Internal,
                "invalid compression flag: 7",
            ),
            (
                framed(0, b"abcdefghijk"),
                Code::OutOfRange,
                "found 11 bytes, the limit is: 10",
            ),
            (
                framed(0, b"abc").slice(..6),
                Code::Internal,
                "Unexpected EOF",
            ),
            (
                Bytes::from([&framed(0, b"a")[..], &framed(0, b"b")[..]].concat()),
                Code::Internal,
                "more than one message",
            ),
        ];
        for (body, code, text) in cases {
            let e = one_message(body.clone(), 10).expect_err("refused");
            assert_eq!(e.code(), code, "{body:?}: {e:?}");
            assert!(e.message().contains(text), "{body:?}: {e:?}");
        }
    }
}
