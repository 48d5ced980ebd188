//! gRPC front ends: the etcd v3 services on the client URLs and the peer service on the peer
//! URLs. Only this module and `error` know about tonic statuses.

pub mod auth;
mod authority;
pub mod cluster;
pub mod kv;
pub mod lease;
pub mod peer;
pub mod tls;
mod unary;
pub mod validate;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

use flotilla_proto::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
    lease_server::LeaseServer, maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use flotilla_proto::flotillapb::peer_server::PeerServer;
use futures::StreamExt;
use tokio::net::TcpListener;

use crate::member::Member;
use crate::raft::network::MAX_PEER_MESSAGE_BYTES;

/// gRPC framing allowance on top of the request limit, as etcd grants.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;
/// Concurrent HTTP/2 streams per client connection.
const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// The etcd services of one member, each reached by its gRPC path prefix.
///
/// Client connections are served by hyper directly, not through tonic's `Server`: that one
/// puts every request through a router, a boxed clone of the whole service stack, a
/// deadline layer and two body boxes before it reaches the service, which cost the members
/// about 4% of their CPU under many small writes. Requests here go from the connection
/// straight to the generated service. What this drops: the server-side `grpc-timeout`
/// deadline (a client that gives up resets its stream, which drops the call, and every
/// call is bounded by the member's own request timeout) and the connection details in each
/// request's extensions, which no service reads. The KV service's unary methods skip
/// tonic's streaming codec as well (`unary`).
#[derive(Clone)]
struct ClientServices {
    /// The KV methods' implementation, for the unary calls `unary` serves (the same one
    /// `kv` serves the rest from).
    kv_methods: Arc<kv::KvService>,
    /// Largest request message.
    max_message: usize,
    kv: KvServer<kv::KvService>,
    watch: WatchServer<watch::WatchService>,
    lease: LeaseServer<lease::LeaseService>,
    cluster: ClusterServer<cluster::ClusterService>,
    maintenance: MaintenanceServer<cluster::MaintenanceService>,
    auth: AuthServer<auth::AuthService>,
}

type GrpcResponse = http::Response<tonic::body::BoxBody>;
type GrpcFuture = tonic::codegen::BoxFuture<GrpcResponse, std::convert::Infallible>;

impl ClientServices {
    fn new(member: &Arc<Member>) -> ClientServices {
        let max = member.limits.max_request_bytes + GRPC_OVERHEAD_BYTES;
        let kv_methods = Arc::new(kv::KvService {
            member: member.clone(),
        });
        ClientServices {
            kv: KvServer::from_arc(kv_methods.clone()).max_decoding_message_size(max),
            kv_methods,
            max_message: max,
            watch: WatchServer::new(watch::WatchService {
                member: member.clone(),
            })
            .max_decoding_message_size(max),
            lease: LeaseServer::new(lease::LeaseService {
                member: member.clone(),
            })
            .max_decoding_message_size(max),
            cluster: ClusterServer::new(cluster::ClusterService {
                member: member.clone(),
            })
            .max_decoding_message_size(max),
            maintenance: MaintenanceServer::new(cluster::MaintenanceService {
                member: member.clone(),
            })
            .max_decoding_message_size(max),
            auth: AuthServer::new(auth::AuthService {
                member: member.clone(),
            })
            .max_decoding_message_size(max),
        }
    }
}

/// The service named by a gRPC path (`/package.Service/Method`), if the path has that shape.
fn grpc_service_name(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some(service)
}

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for ClientServices {
    type Response = GrpcResponse;
    type Error = std::convert::Infallible;
    type Future = GrpcFuture;

    fn call(&self, request: http::Request<hyper::body::Incoming>) -> GrpcFuture {
        use flotilla_proto::etcdserverpb::kv_server::Kv;
        use tonic::server::NamedService;
        use tower::Service;
        let kv = &self.kv_methods;
        let max = self.max_message;
        match request.uri().path() {
            "/etcdserverpb.KV/Range" => {
                let kv = kv.clone();
                return unary::call(request, max, move |r| async move { kv.range(r).await });
            }
            "/etcdserverpb.KV/Put" => {
                let kv = kv.clone();
                return unary::call(request, max, move |r| async move { kv.put(r).await });
            }
            "/etcdserverpb.KV/DeleteRange" => {
                let kv = kv.clone();
                return unary::call(
                    request,
                    max,
                    move |r| async move { kv.delete_range(r).await },
                );
            }
            "/etcdserverpb.KV/Txn" => {
                let kv = kv.clone();
                return unary::call(request, max, move |r| async move { kv.txn(r).await });
            }
            _ => {}
        }
        // The generated services are always ready; each call gets its own handle (a
        // reference count and the codec settings).
        match grpc_service_name(request.uri().path()) {
            Some(KvServer::<kv::KvService>::NAME) => self.kv.clone().call(request),
            Some(WatchServer::<watch::WatchService>::NAME) => self.watch.clone().call(request),
            Some(LeaseServer::<lease::LeaseService>::NAME) => self.lease.clone().call(request),
            Some(ClusterServer::<cluster::ClusterService>::NAME) => {
                self.cluster.clone().call(request)
            }
            Some(MaintenanceServer::<cluster::MaintenanceService>::NAME) => {
                self.maintenance.clone().call(request)
            }
            Some(AuthServer::<auth::AuthService>::NAME) => self.auth.clone().call(request),
            // grpc-go's words for a service it does not have.
            Some(service) => unimplemented(format!("unknown service {service}")),
            None => unimplemented(format!("malformed method name: {:?}", request.uri().path())),
        }
    }
}

fn unimplemented(message: String) -> GrpcFuture {
    Box::pin(std::future::ready(Ok(tonic::Status::unimplemented(
        message,
    )
    .into_http())))
}

pub async fn serve_clients(
    member: Arc<Member>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), std::io::Error> {
    let services = ClientServices::new(&member);
    match tls {
        None => serve_grpc(client_connections(listener), services, shutdown).await,
        Some(acceptor) => {
            serve_grpc(
                tls_client_connections(listener, acceptor),
                services,
                shutdown,
            )
            .await
        }
    }
}

/// Serves HTTP/2 gRPC on every connection `incoming` yields until `shutdown` completes,
/// then asks each connection to finish its open calls and waits until they all have.
async fn serve_grpc<IO>(
    incoming: impl futures::Stream<Item = std::io::Result<IO>>,
    services: ClientServices,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), std::io::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder =
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    // Each connection holds a receiver; the sender's value turns true at shutdown, and
    // `closed` resolves once every connection has ended.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut incoming = std::pin::pin!(incoming);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let io = tokio::select! {
            _ = &mut shutdown => break,
            io = incoming.next() => io,
        };
        let io = match io {
            Some(Ok(io)) => io,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "accepting a client connection failed");
                continue;
            }
            None => break,
        };
        let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), services.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "client connection ended");
                    }
                    return;
                }
                _ = stop.wait_for(|s| *s) => {}
            }
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "client connection ended");
            }
            drop(stop);
        });
    }
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
    Ok(())
}

/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
type TlsClientIo =
    authority::ClientIo<tokio::io::ReadHalf<TlsStream>, tokio::io::WriteHalf<TlsStream>>;

/// TLS connections, each through its handshake on its own task (a slow or failing client
/// holds up nobody), then through the authority shim.
fn tls_client_connections(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> impl futures::Stream<Item = std::io::Result<TlsClientIo>> {
    tls_connections(
        listener,
        acceptor,
        MAX_CLIENT_CONNECTIONS,
        |tls, info, permit| {
            let (r, w) = tokio::io::split(tls);
            authority::ClientIo::from_halves(r, w, info, permit)
        },
    )
}

/// Accepted connections through their TLS handshakes, each on its own task, at most `max`
/// open at once; `wrap` makes what the server reads from a finished handshake.
fn tls_connections<T: Send + 'static>(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    max: usize,
    wrap: impl Fn(
            TlsStream,
            tonic::transport::server::TcpConnectInfo,
            tokio::sync::OwnedSemaphorePermit,
        ) -> T
        + Clone
        + Send
        + 'static,
) -> impl futures::Stream<Item = std::io::Result<T>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<T>(128);
    tokio::spawn(async move {
        let permits = Arc::new(tokio::sync::Semaphore::new(max));
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let stream = tokio::select! {
                s = accept(&listener) => s,
                _ = tx.closed() => return,
            };
            let info = tonic::transport::server::TcpConnectInfo {
                local_addr: stream.local_addr().ok(),
                remote_addr: stream.peer_addr().ok(),
            };
            let (acceptor, tx, wrap) = (acceptor.clone(), tx.clone(), wrap.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(wrap(tls, info, permit)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = ?info.remote_addr, error = %e, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(peer = ?info.remote_addr, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

/// Client connections served at once; further clients wait in the listen backlog.
const MAX_CLIENT_CONNECTIONS: usize = 16 * 1024;

/// Accepts connections for as long as the listener lives. A failed accept (out of file
/// descriptors, say) is logged and retried after a pause instead of ending the server.
async fn accept(listener: &TcpListener) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                return stream;
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Accepted client connections, each behind the `:authority` shim and holding one of
/// `MAX_CLIENT_CONNECTIONS` permits until it closes.
fn client_connections(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<authority::ClientIo>> {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENT_CONNECTIONS));
    futures::stream::unfold((listener, permits), |(listener, permits)| async move {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let stream = accept(&listener).await;
        Some((
            Ok(authority::ClientIo::new(stream, permit)),
            (listener, permits),
        ))
    })
}

pub async fn serve_peers(
    member: Arc<Member>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // A leader that vanished without closing its connection leaves its append stream
        // open; the pings end it.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(
            PeerServer::new(peer::PeerService { member })
                .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES),
        );
    match tls {
        None => {
            router
                .serve_with_incoming_shutdown(peer_connections(listener), shutdown)
                .await
        }
        Some(acceptor) => {
            let incoming = tls_connections(
                listener,
                acceptor,
                MAX_PEER_CONNECTIONS,
                |tls, info, permit| tls::PeerTlsIo::new(tls, info, permit),
            );
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    }
}

/// Peer connections served at once over TLS.
const MAX_PEER_CONNECTIONS: usize = 1024;

/// Accepted peer connections. Nagle's algorithm is off (in `accept`): Raft messages are
/// small and a delayed acknowledgement would stall replication for tens of milliseconds.
fn peer_connections(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let stream = accept(&listener).await;
        Some((Ok(stream), listener))
    })
}

/// Parses an etcd-style URL (`http://host:port`) into a socket address to listen on.
pub fn listen_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if let Some(r) = url.strip_prefix("https://") {
        r
    } else {
        return Err(format!("{url}: URL scheme must be http or https"));
    };
    let host_port = rest.trim_end_matches('/');
    use std::net::ToSocketAddrs;
    host_port
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: resolves to no address"))
}
