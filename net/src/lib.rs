//! Listening sockets whose accepted connections have `TCP_NODELAY` and TCP keepalive set, and
//! the HTTP server that runs on them: the workers' REST, gRPC and `/metrics` ports and the
//! operator's `/metrics`, `/healthz` and `/readyz`.
//!
//! Neither tonic's `serve_with_incoming*` (it ignores `Server::tcp_nodelay` for a stream it
//! did not bind) nor `axum::serve` sets it on the connections it accepts. Without it, Nagle's
//! algorithm holds a small response write while an earlier small segment of the connection,
//! such as an HTTP/2 `WINDOW_UPDATE` sent while a large request arrived, waits for the peer's
//! delayed ACK (up to 40 ms on Linux): measured on an inference worker, 71 ms per request at
//! the client for 39 ms in the server (docs/benchmarks.md).
//!
//! Keepalive: a client that vanished without closing (its node failed, the network split) would
//! otherwise hold its connection, a file descriptor and its buffers, for as long as the worker
//! runs. With probes after [`KEEPALIVE_IDLE`] of silence, such a connection is closed about
//! 90 s later.
//!
//! [`serve_http`] replaces `axum::serve`, which has no limit on how long a client may take to
//! send its request headers: a client that opens connections and trickles bytes would hold
//! each for ever.
//!
//! [`grpc_incoming`] hands tonic a connection only once its client has sent a byte, within
//! [`FIRST_BYTE_TIMEOUT`]. hyper's HTTP/2 server has no handshake timeout, and its pings start
//! after the handshake, so a client that connected and sent nothing held its connection, a
//! task and a file descriptor for as long as the worker ran (TCP keepalive does not help: the
//! client's kernel answers the probes).

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Idle time before the first keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Time between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel closes the connection.
pub const KEEPALIVE_RETRIES: u32 = 3;

/// The longest a gRPC client may take to send the first byte on a new connection (REST's
/// limit is [`HEADER_READ_TIMEOUT`], for the first byte and then for the whole head).
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause after an `accept` that failed (e.g. out of file descriptors) before the next one.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Connections that have sent their first byte and wait for tonic to take them.
const READY_CONNECTIONS: usize = 64;

/// Sets `TCP_NODELAY` and keepalive on an accepted connection.
fn tune(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY on an accepted connection");
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not set TCP keepalive on an accepted connection");
    }
}

/// Whether the client sends a byte within `limit`.
async fn first_byte(stream: &TcpStream, limit: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, stream.peek(&mut byte)).await,
        Ok(Ok(1))
    )
}

/// The connections of a port bound by [`grpc_incoming`], for tonic's
/// `serve_with_incoming_shutdown`.
pub struct GrpcIncoming {
    local_addr: SocketAddr,
    connections: mpsc::Receiver<std::io::Result<TcpStream>>,
}

impl GrpcIncoming {
    /// The bound address (the port the OS chose when asked for 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Stream for GrpcIncoming {
    type Item = std::io::Result<TcpStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.connections.poll_recv(cx)
    }
}

/// Binds `addr` for a tonic server. Every accepted connection gets `TCP_NODELAY` and
/// keepalive, and reaches tonic once its client has sent a byte: a connection silent for
/// `first_byte_timeout` is closed, and so are those still silent when tonic stops accepting
/// (it drops the [`GrpcIncoming`] at shutdown, which also closes the port).
pub async fn grpc_incoming(
    addr: SocketAddr,
    what: &str,
    first_byte_timeout: Duration,
) -> anyhow::Result<GrpcIncoming> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {what} {addr}"))?;
    let local_addr = listener.local_addr()?;
    let (ready, connections) = mpsc::channel(READY_CONNECTIONS);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = ready.closed() => break,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                // The client gave up before it was accepted: nothing is wrong here.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a gRPC connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            tune(&stream);
            let ready = ready.clone();
            tokio::spawn(async move {
                let spoke = tokio::select! {
                    spoke = first_byte(&stream, first_byte_timeout) => spoke,
                    () = ready.closed() => false,
                };
                if spoke {
                    // Err: tonic stopped accepting meanwhile; the connection is dropped.
                    let _ = ready.send(Ok(stream)).await;
                }
            });
        }
    });
    Ok(GrpcIncoming {
        local_addr,
        connections,
    })
}

/// Binds `addr` for [`serve_http`]; every accepted connection gets `TCP_NODELAY` and keepalive.
pub async fn http_listener(
    addr: SocketAddr,
    what: &str,
) -> anyhow::Result<impl axum::serve::Listener<Io = TcpStream, Addr = SocketAddr>> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {what} {addr}"))?;
    Ok(listener.tap_io(|stream: &mut TcpStream| tune(stream)))
}

/// The longest an HTTP/1 client may take to send a request's headers (hyper's default, which
/// only applies with a timer, and `axum::serve` sets none).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` (HTTP/1 and HTTP/2) on `listener` until `shutdown` resolves. Then it
/// accepts no more connections, asks each open one to close once its requests are answered
/// (HTTP/2 `GOAWAY`, HTTP/1 keep-alive off) and returns when all have closed: the same as
/// `axum::serve(..).with_graceful_shutdown(..)`, plus `header_read_timeout` for HTTP/1.
pub async fn serve_http<L>(
    mut listener: L,
    router: axum::Router,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) where
    L: axum::serve::Listener<Io = TcpStream>,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // Tells connections still waiting for their first byte to go at shutdown.
    let (stopping, stop) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let io = tokio::select! {
            (io, _) = listener.accept() => io,
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            // hyper's timer starts with the request head, after the protocol has been told
            // from the first bytes: a client that sends none is cut off here, or at shutdown.
            let spoke = tokio::select! {
                spoke = first_byte(&io, header_read_timeout) => spoke,
                _ = stop.wait_for(|s| *s) => false,
            };
            if !spoke {
                return;
            }
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned();
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    // No receiver left only means no connection is waiting for its first byte.
    let _ = stopping.send(true);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener as _;
    use futures::StreamExt as _;

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// (TCP_NODELAY, SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT) of a socket.
    fn options(stream: &TcpStream) -> (bool, bool, Duration, Duration, u32) {
        let s = socket2::SockRef::from(stream);
        (
            stream.nodelay().unwrap(),
            s.keepalive().unwrap(),
            s.tcp_keepalive_time().unwrap(),
            s.tcp_keepalive_interval().unwrap(),
            s.tcp_keepalive_retries().unwrap(),
        )
    }

    #[tokio::test]
    async fn connections_accepted_for_grpc_and_http_have_nodelay_and_keepalive_set() {
        let want = (
            true,
            true,
            KEEPALIVE_IDLE,
            KEEPALIVE_INTERVAL,
            KEEPALIVE_RETRIES,
        );
        let mut incoming = grpc_incoming(loopback(), "gRPC", FIRST_BYTE_TIMEOUT)
            .await
            .unwrap();
        let client = TcpStream::connect(incoming.local_addr()).await.unwrap();
        client.try_write(b"P").unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert_eq!(options(&accepted), want, "gRPC connection");

        let mut listener = http_listener(loopback(), "HTTP").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await;
        assert_eq!(options(&accepted), want, "HTTP connection");

        // What the two replace: a plain listener's accepted connection has both off.
        let plain = TcpListener::bind(loopback()).await.unwrap();
        let _client = TcpStream::connect(plain.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = plain.accept().await.unwrap();
        let (nodelay, keepalive, ..) = options(&accepted);
        assert!(!nodelay && !keepalive);
    }

    #[tokio::test]
    async fn a_grpc_connection_reaches_the_server_once_it_has_sent_a_byte_and_a_silent_one_is_closed()
     {
        let mut incoming = grpc_incoming(loopback(), "gRPC", Duration::from_millis(200))
            .await
            .unwrap();
        let addr = incoming.local_addr();
        let mut silent = TcpStream::connect(addr).await.unwrap();

        assert!(
            tokio::time::timeout(Duration::from_millis(100), incoming.next())
                .await
                .is_err(),
            "a connection that has sent nothing was handed to the server"
        );
        assert!(
            closes(&mut silent).await,
            "a connection that sent nothing was kept open"
        );
        let speaker = TcpStream::connect(addr).await.unwrap();
        speaker.try_write(b"P").unwrap();
        let handed = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .expect("handed over once it spoke")
            .unwrap()
            .unwrap();
        assert_eq!(handed.peer_addr().unwrap(), speaker.local_addr().unwrap());
        // The byte is still there for the server to read.
        let mut byte = [0u8; 1];
        handed.peek(&mut byte).await.unwrap();
        assert_eq!(&byte, b"P");
    }

    #[tokio::test]
    async fn silent_grpc_connections_are_closed_and_the_port_refuses_new_ones_once_the_server_stops_accepting()
     {
        let incoming = grpc_incoming(loopback(), "gRPC", Duration::from_secs(60))
            .await
            .unwrap();
        let addr = incoming.local_addr();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;

        drop(incoming);

        assert!(
            closes(&mut silent).await,
            "a silent connection outlived the server's accepting"
        );
        let mut refused = false;
        for _ in 0..50 {
            if TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "the port still accepts");
    }

    /// Whether the server closes the connection within 5 s.
    async fn closes(stream: &mut TcpStream) -> bool {
        read_to_close(stream, Duration::from_secs(5))
            .await
            .is_some()
    }

    /// Reads until the server closes the connection; `None` if it has not after `limit`.
    async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Option<String> {
        use tokio::io::AsyncReadExt as _;
        let mut out = Vec::new();
        match tokio::time::timeout(limit, stream.read_to_end(&mut out)).await {
            Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
            Err(_) => None,
        }
    }

    /// `serve_http` on a loopback port with `/ok` and a 400 ms `/slow`; send on the returned
    /// channel to shut it down.
    async fn start_http(
        header_read_timeout: Duration,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let router = axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    "slow"
                }),
            );
        let listener = http_listener(loopback(), "HTTP").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_http(
            listener,
            router,
            header_read_timeout,
            async move {
                let _ = stopped.await;
            },
        ));
        (addr, stop, server)
    }

    #[tokio::test]
    async fn a_silent_client_or_one_that_trickles_its_headers_is_cut_off_and_one_in_flight_is_answered_at_shutdown()
     {
        use tokio::io::AsyncWriteExt as _;
        let (addr, stop, server) = start_http(Duration::from_millis(200)).await;

        // Nothing sent, or headers never finished: the connection is closed after the timeout.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(
            closes(&mut silent).await,
            "a connection that sent nothing was kept open"
        );
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /ok HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
        assert!(
            closes(&mut slow).await,
            "a connection with unfinished headers was kept open"
        );

        // A whole request is answered.
        let mut ok = TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut ok, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );

        // Shutdown while a request is in flight: it is answered, then the server returns.
        let mut in_flight = TcpStream::connect(addr).await.unwrap();
        in_flight
            .write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        let answer = read_to_close(&mut in_flight, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(answer.ends_with("slow"), "{answer}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server returned after its last connection closed")
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }

    #[tokio::test]
    async fn a_connection_that_has_sent_nothing_does_not_hold_up_shutdown() {
        let (addr, stop, server) = start_http(Duration::from_secs(60)).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("shutdown waited on a connection that had sent nothing")
            .unwrap();
        assert!(
            read_to_close(&mut idle, Duration::from_secs(1))
                .await
                .is_some()
        );
    }
}
