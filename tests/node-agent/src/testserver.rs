//! The `tandem-testserver` image: `GET /` answers `{"pod": $POD_NAME, "ip": $POD_IP}`,
//! `GET /healthz` answers 200. With `--grpc-port` it also serves grpc.health.v1 (SERVING).

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context;
use axum::{Json, Router, routing::get};
use clap::Args;

/// Flags of `tandem-node-agent testserver`.
#[derive(Debug, Clone, Args)]
pub struct TestserverArgs {
    /// HTTP port.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Optional gRPC health port.
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// Address to bind (inside the pod's namespace: all addresses).
    #[arg(long, default_value_t = Ipv4Addr::UNSPECIFIED)]
    pub bind: Ipv4Addr,
}

/// The body of `GET /`.
pub fn identity(pod: Option<String>, ip: Option<String>) -> serde_json::Value {
    serde_json::json!({ "pod": pod, "ip": ip })
}

fn router() -> Router {
    let pod = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok());
    let ip = std::env::var("POD_IP").ok();
    let body = identity(pod, ip);
    Router::new()
        .route("/", get(move || async move { Json(body.clone()) }))
        .route("/healthz", get(|| async { "ok" }))
}

/// Serves until SIGTERM/SIGINT.
pub async fn run(args: &TestserverArgs) -> anyhow::Result<()> {
    let addr = SocketAddr::from((args.bind, args.port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, "testserver listening");
    if let Some(port) = args.grpc_port {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let gaddr = SocketAddr::from((args.bind, port));
        tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve(gaddr)
                .await
            {
                tracing::error!(error = %e, "grpc health server failed");
            }
        });
    }
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving")
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_names_the_pod_and_its_ip() {
        assert_eq!(
            identity(Some("web-1".into()), Some("10.244.0.2".into())),
            serde_json::json!({"pod": "web-1", "ip": "10.244.0.2"})
        );
        assert_eq!(
            identity(None, None),
            serde_json::json!({"pod": null, "ip": null})
        );
    }
}
