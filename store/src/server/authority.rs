//! Accepting etcd clients that put a URL in HTTP/2's `:authority`.
//!
//! etcd's Go client dials per-endpoint maintenance calls (`endpoint status`, `hashkv`,
//! `--cluster` forms) with the whole endpoint URL, `http://host:port`, as the `:authority`
//! pseudo-header. etcd's Go server takes it; the HTTP/2 library under tonic refuses such a
//! stream with PROTOCOL_ERROR. This shim sits between the socket and the HTTP/2 server: it
//! reads the client's frames up to its first header block and, if that block's authority is
//! a URL, rewrites every header block on the connection with the scheme dropped. Otherwise
//! (every other client) it hands the socket back and steps out of the way.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use fluke_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tonic::transport::server::{Connected, TcpConnectInfo};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Largest frame the shim reads (HTTP/2's ceiling for SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME: usize = (1 << 24) - 1;
/// Largest header block the shim assembles.
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// Frame size the shim writes: HTTP/2's default, which every server accepts.
const OUT_FRAME: usize = 16_384;
const PIPE_BYTES: usize = 64 * 1024;

/// A client connection as the HTTP/2 server sees it: the two halves of a TCP socket, or of
/// a TLS stream over one.
pub struct ClientIo<R = OwnedReadHalf, W = OwnedWriteHalf> {
    pipe: Option<DuplexStream>,
    handback: Option<oneshot::Receiver<R>>,
    direct: Option<R>,
    writer: W,
    info: TcpConnectInfo,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl ClientIo {
    pub fn new(stream: TcpStream, permit: tokio::sync::OwnedSemaphorePermit) -> ClientIo {
        let info = TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: stream.peer_addr().ok(),
        };
        let (reader, writer) = stream.into_split();
        ClientIo::from_halves(reader, writer, info, permit)
    }
}

impl<R, W> ClientIo<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// A connection from its read and write halves (`tokio::io::split` of a TLS stream).
    pub fn from_halves(
        reader: R,
        writer: W,
        info: TcpConnectInfo,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> ClientIo<R, W> {
        let (pipe_in, pipe_out) = tokio::io::duplex(PIPE_BYTES);
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            if let Err(e) = pump(reader, pipe_in, tx).await {
                tracing::debug!(error = %e, "client connection ended in the authority shim");
            }
        });
        ClientIo {
            pipe: Some(pipe_out),
            handback: Some(rx),
            direct: None,
            writer,
            info,
            _permit: permit,
        }
    }
}

impl<R, W> Connected for ClientIo<R, W> {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for ClientIo<R, W> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if let Some(direct) = this.direct.as_mut() {
                return Pin::new(direct).poll_read(cx, buf);
            }
            if let Some(pipe) = this.pipe.as_mut() {
                let before = buf.filled().len();
                match Pin::new(pipe).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) if buf.filled().len() == before => this.pipe = None,
                    other => return other,
                }
            }
            // The pipe is drained: either the socket comes back, or the connection is over.
            let Some(rx) = this.handback.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(reader)) => {
                    this.handback = None;
                    this.direct = Some(reader);
                }
                Poll::Ready(Err(_)) => {
                    this.handback = None;
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

use std::future::Future;

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for ClientIo<R, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.writer.is_write_vectored()
    }
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.payload.len());
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes()[1..]);
        out.push(self.kind);
        out.push(self.flags);
        out.extend_from_slice(&self.stream.to_be_bytes());
        out.extend_from_slice(&self.payload);
        out
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    if len > MAX_FRAME {
        return Err(invalid("frame too large"));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]),
        payload,
    })
}

/// The header block fragment of a HEADERS frame, without padding and priority fields.
fn fragment(f: &Frame) -> io::Result<&[u8]> {
    let mut p = f.payload.as_slice();
    let mut pad = 0usize;
    if f.kind == FRAME_HEADERS && f.flags & FLAG_PADDED != 0 {
        pad = *p.first().ok_or_else(|| invalid("short padded frame"))? as usize;
        p = &p[1..];
    }
    if f.kind == FRAME_HEADERS && f.flags & FLAG_PRIORITY != 0 {
        p = p.get(5..).ok_or_else(|| invalid("short priority frame"))?;
    }
    p.get(
        ..p.len()
            .checked_sub(pad)
            .ok_or_else(|| invalid("bad padding"))?,
    )
    .ok_or_else(|| invalid("bad padding"))
}

/// Reads one whole header block: a HEADERS frame and its CONTINUATION frames.
async fn read_header_block<R: AsyncRead + Unpin>(
    r: &mut R,
    first: Frame,
) -> io::Result<(Vec<Frame>, Vec<u8>)> {
    let mut block = fragment(&first)?.to_vec();
    let mut done = first.flags & FLAG_END_HEADERS != 0;
    let mut frames = vec![first];
    while !done {
        let f = read_frame(r).await?;
        if f.kind != FRAME_CONTINUATION {
            return Err(invalid("header block interrupted"));
        }
        done = f.flags & FLAG_END_HEADERS != 0;
        block.extend_from_slice(&f.payload);
        if block.len() > MAX_HEADER_BLOCK {
            return Err(invalid("header block too large"));
        }
        frames.push(f);
    }
    Ok((frames, block))
}

/// Drops a URL scheme from an authority: `http://h:p` → `h:p`.
pub fn fix_authority(value: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(value).ok()?;
    let (_, rest) = text.split_once("://")?;
    Some(rest.trim_end_matches('/').as_bytes().to_vec())
}

/// Encodes headers as literals that never touch the HPACK dynamic table, so the server's
/// decoder needs no state shared with the client's encoder.
fn encode_plain(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        out.extend(fluke_hpack::encoder::encode_integer(name.len(), 7));
        out.extend_from_slice(name);
        out.extend(fluke_hpack::encoder::encode_integer(value.len(), 7));
        out.extend_from_slice(value);
    }
    out
}

fn rewritten_block(stream: u32, end_stream: bool, headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let block = encode_plain(headers);
    let chunks: Vec<&[u8]> = if block.is_empty() {
        vec![&[][..]]
    } else {
        block.chunks(OUT_FRAME).collect()
    };
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let kind = if i == 0 {
            FRAME_HEADERS
        } else {
            FRAME_CONTINUATION
        };
        let mut flags = 0;
        if i == 0 && end_stream {
            flags |= FLAG_END_STREAM;
        }
        if last {
            flags |= FLAG_END_HEADERS;
        }
        out.extend(
            Frame {
                kind,
                flags,
                stream,
                payload: chunk.to_vec(),
            }
            .encode(),
        );
    }
    out
}

async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    mut pipe: DuplexStream,
    handback: oneshot::Sender<R>,
) -> io::Result<()> {
    let mut preface = [0u8; 24];
    let mut got = 0;
    while got < preface.len() {
        let n = reader.read(&mut preface[got..]).await?;
        if n == 0 {
            return Ok(());
        }
        got += n;
        if preface[..got] != PREFACE[..got] {
            break; // not HTTP/2 with prior knowledge: let the server answer it
        }
    }
    pipe.write_all(&preface[..got]).await?;
    if got < preface.len() || preface != *PREFACE {
        return hand_back(pipe, reader, handback).await;
    }
    let mut decoder = Decoder::new();
    let mut rewriting = false;
    loop {
        let frame = read_frame(&mut reader).await?;
        if frame.kind != FRAME_HEADERS {
            pipe.write_all(&frame.encode()).await?;
            continue;
        }
        let stream = frame.stream;
        let end_stream = frame.flags & FLAG_END_STREAM != 0;
        let (frames, block) = read_header_block(&mut reader, frame).await?;
        let mut headers = decoder
            .decode(&block)
            .map_err(|e| invalid(&format!("hpack: {e:?}")))?;
        let mut changed = false;
        for (name, value) in headers.iter_mut() {
            if name.as_slice() == b":authority" {
                if let Some(fixed) = fix_authority(value) {
                    *value = fixed;
                    changed = true;
                }
            }
        }
        if !rewriting && !changed {
            for f in &frames {
                pipe.write_all(&f.encode()).await?;
            }
            return hand_back(pipe, reader, handback).await;
        }
        rewriting = true;
        pipe.write_all(&rewritten_block(stream, end_stream, &headers))
            .await?;
    }
}

async fn hand_back<R>(
    mut pipe: DuplexStream,
    reader: R,
    handback: oneshot::Sender<R>,
) -> io::Result<()> {
    pipe.flush().await?;
    drop(pipe);
    let _ = handback.send(reader);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_urls_lose_their_scheme() {
        assert_eq!(
            fix_authority(b"http://127.0.0.1:2379"),
            Some(b"127.0.0.1:2379".to_vec())
        );
        assert_eq!(fix_authority(b"https://h:1/"), Some(b"h:1".to_vec()));
        assert_eq!(fix_authority(b"127.0.0.1:2379"), None);
    }

    #[test]
    fn plain_encoding_decodes_to_the_same_headers() {
        let headers = vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":authority".to_vec(), b"127.0.0.1:2379".to_vec()),
            (b"x-long".to_vec(), vec![b'v'; 300]),
        ];
        let mut d = Decoder::new();
        assert_eq!(d.decode(&encode_plain(&headers)).expect("decodes"), headers);
    }
}
