//! The Prometheus `/metrics` endpoint, served on its own port.
//!
//! Each role builds one `prometheus_client` [`Registry`], registers its metrics
//! (names as constants in the role's own metrics module), and passes it to
//! [`serve`], which answers `GET /metrics` in the OpenMetrics text format until
//! shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus_client::registry::Registry;

use super::shutdown::Shutdown;

/// Errors starting the metrics server.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The port could not be bound.
    #[error("bind metrics port {addr}")]
    Bind {
        /// Address tried.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Renders the registry in the OpenMetrics text format.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

async fn handler(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    match render(&registry) {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The `/metrics` router, for embedding or for [`serve`].
pub fn router(registry: Arc<Registry>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(handler))
        .with_state(registry)
}

/// Binds `addr` and serves `/metrics` until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: Shutdown,
) -> Result<(), MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    super::net::serve_http(
        listener,
        router(registry),
        super::net::HEADER_READ_TIMEOUT,
        async move { shutdown.wait().await },
    )
    .await;
    Ok(())
}
