//! Listening sockets whose accepted connections have `TCP_NODELAY` and TCP keepalive set.
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

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::TcpIncoming;

/// Idle time before the first keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Time between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel closes the connection.
pub const KEEPALIVE_RETRIES: u32 = 3;

/// Binds `addr` for a tonic server; every accepted connection gets `TCP_NODELAY` and keepalive.
pub async fn grpc_incoming(addr: SocketAddr, what: &str) -> anyhow::Result<TcpIncoming> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {what} {addr}"))?;
    Ok(TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(KEEPALIVE_IDLE))
        .with_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .with_keepalive_retries(Some(KEEPALIVE_RETRIES)))
}

/// Binds `addr` for `axum::serve`; every accepted connection gets `TCP_NODELAY` and keepalive.
pub async fn http_listener(
    addr: SocketAddr,
    what: &str,
) -> anyhow::Result<impl axum::serve::Listener<Io = TcpStream, Addr = SocketAddr>> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {what} {addr}"))?;
    Ok(listener.tap_io(|stream: &mut TcpStream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on an accepted connection");
        }
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_RETRIES);
        if let Err(e) = socket2::SockRef::from(&*stream).set_tcp_keepalive(&keepalive) {
            tracing::debug!(error = %e, "could not set TCP keepalive on an accepted connection");
        }
    }))
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
        let mut incoming = grpc_incoming(loopback(), "gRPC").await.unwrap();
        let addr = incoming.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
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
}
