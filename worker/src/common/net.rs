//! Listening sockets whose accepted connections have `TCP_NODELAY` set.
//!
//! Neither tonic's `serve_with_incoming*` (it ignores `Server::tcp_nodelay` for a stream it
//! did not bind) nor `axum::serve` sets it on the connections it accepts. Without it, Nagle's
//! algorithm holds a small response write while an earlier small segment of the connection,
//! such as an HTTP/2 `WINDOW_UPDATE` sent while a large request arrived, waits for the peer's
//! delayed ACK (up to 40 ms on Linux): measured on an inference worker, 71 ms per request at
//! the client for 39 ms in the server (docs/benchmarks.md).

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::TcpIncoming;

/// Binds `addr` for a tonic server; every accepted connection gets `TCP_NODELAY`.
pub async fn grpc_incoming(addr: SocketAddr, what: &str) -> anyhow::Result<TcpIncoming> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {what} {addr}"))?;
    Ok(TcpIncoming::from(listener).with_nodelay(Some(true)))
}

/// Binds `addr` for `axum::serve`; every accepted connection gets `TCP_NODELAY`.
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

    #[tokio::test]
    async fn connections_accepted_for_grpc_and_http_have_nodelay_set() {
        let mut incoming = grpc_incoming(loopback(), "gRPC").await.unwrap();
        let addr = incoming.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "gRPC connection without TCP_NODELAY"
        );

        let mut listener = http_listener(loopback(), "HTTP").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await;
        assert!(
            accepted.nodelay().unwrap(),
            "HTTP connection without TCP_NODELAY"
        );

        // What the two replace: a plain listener's accepted connection has it off.
        let plain = TcpListener::bind(loopback()).await.unwrap();
        let _client = TcpStream::connect(plain.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = plain.accept().await.unwrap();
        assert!(!accepted.nodelay().unwrap());
    }
}
