//! OIP v2 REST for clients and the health probes, on the HTTP port:
//! `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2`,
//! `GET /v2/models/{name}[/versions/{v}]`, `.../ready`, and
//! `POST /v2/models/{name}[/versions/{v}]/infer`.
//!
//! Infer bodies are read and written by [`crate::common::rest`] (JSON, or JSON followed by
//! binary tensor data, as `tritonclient.http` sends), once the bytes they may take are
//! reserved from the worker's [`Budget`]. Errors are `{"error": "..."}`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::error::RequestError;
use super::service::{Service, trace_from_header};
use crate::common::body::{BodyError, bytes_to_reserve, discard, read_body};
use crate::common::budget::Budget;
use crate::common::rest::{self, ModelPath};

/// What the handlers share: the service, and the budget of body bytes (shared with the gRPC
/// server).
#[derive(Clone)]
struct Rest {
    service: Arc<Service>,
    budget: Budget,
}

impl FromRef<Rest> for Arc<Service> {
    fn from_ref(r: &Rest) -> Self {
        Arc::clone(&r.service)
    }
}

impl FromRef<Rest> for Budget {
    fn from_ref(r: &Rest) -> Self {
        r.budget.clone()
    }
}

/// The REST router; infer bodies reserve their bytes from `budget`.
pub fn router(service: Arc<Service>, budget: Budget) -> axum::Router {
    let router = axum::Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_v),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_v),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
        .layer(DefaultBodyLimit::disable())
        .with_state(Rest { service, budget });
    rest::with_fallbacks(router)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    rest::error_json(status, message.into())
}

fn request_error(e: &RequestError) -> Response {
    error(e.http_status(), e.to_string())
}

/// The protocol's health answers are the status code alone, with an empty body.
async fn ready(State(s): State<Arc<Service>>) -> StatusCode {
    if s.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn server_metadata() -> Response {
    Json(json!({"name": "tandem-preprocess", "version": env!("CARGO_PKG_VERSION"), "extensions": ["binary_tensor_data"]})).into_response()
}

fn metadata_json(s: &Service) -> Value {
    let m = s.metadata();
    let t = |v: &[tandem_proto::inference::model_metadata_response::TensorMetadata]| {
        v.iter()
            .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
            .collect::<Vec<_>>()
    };
    json!({"name": m.name, "versions": m.versions, "platform": m.platform, "inputs": t(&m.inputs), "outputs": t(&m.outputs)})
}

async fn model_metadata(
    State(s): State<Arc<Service>>,
    ModelPath(name): ModelPath<String>,
) -> Response {
    model_metadata_v(State(s), ModelPath((name, String::new()))).await
}

async fn model_metadata_v(
    State(s): State<Arc<Service>>,
    ModelPath((name, version)): ModelPath<(String, String)>,
) -> Response {
    if let Err(e) = s.check_served(&name, &version) {
        return request_error(&e.into());
    }
    Json(metadata_json(&s)).into_response()
}

async fn model_ready(
    State(s): State<Arc<Service>>,
    ModelPath(name): ModelPath<String>,
) -> Response {
    model_ready_v(State(s), ModelPath((name, String::new()))).await
}

async fn model_ready_v(
    State(s): State<Arc<Service>>,
    ModelPath((name, version)): ModelPath<(String, String)>,
) -> Response {
    if let Err(e) = s.check_served(&name, &version) {
        return request_error(&e.into());
    }
    ready(State(s)).await.into_response()
}

async fn infer(
    state: State<Arc<Service>>,
    budget: State<Budget>,
    ModelPath(name): ModelPath<String>,
    http: Version,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_v(
        state,
        budget,
        ModelPath((name, String::new())),
        http,
        headers,
        body,
    )
    .await
}

async fn infer_v(
    State(s): State<Arc<Service>>,
    State(budget): State<Budget>,
    ModelPath((name, version)): ModelPath<(String, String)>,
    http: Version,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // JSON framing adds overhead beyond the tensor bytes that the limit is about.
    let limit = s.config().limits.max_request_bytes.saturating_add(64 << 10);
    // Held until the answer is made: the tensors decoded from the body live that long.
    let _reserved = match budget.try_reserve(bytes_to_reserve(&headers, limit)) {
        Ok(r) => r,
        Err(full) => {
            let e = RequestError::ResourceExhausted(full.to_string());
            s.infer_rejected("http", &e);
            discard(http, &headers, body, limit).await;
            return request_error(&e);
        }
    };
    let body = match read_body(http, &headers, body, limit).await {
        Ok(b) => b,
        Err(b) => {
            let e = RequestError::invalid(match &b {
                BodyError::TooLarge(_) => format!(
                    "request body is over the limit of {} bytes (limits.maxRequestBytes)",
                    s.config().limits.max_request_bytes
                ),
                other => other.to_string(),
            });
            s.infer_rejected("http", &e);
            return error(b.http_status(), e.to_string());
        }
    };
    let (req, binary_out) = match rest::parse_infer_request(
        &name,
        &version,
        &headers,
        &body,
        s.config().limits.max_request_bytes,
    ) {
        Ok(r) => r,
        Err(message) => {
            let e = RequestError::invalid(message);
            s.infer_rejected("http", &e);
            return request_error(&e);
        }
    };
    // The request holds what it needs (the tensor bytes it refers to are shared, not copied);
    // the rest of the body is not kept while the request is served.
    drop(body);
    let trace = trace_from_header(headers.get("traceparent").and_then(|v| v.to_str().ok()));
    match s.infer(req, trace, "http").await {
        Ok(resp) => rest::infer_response(&resp, &binary_out),
        Err(e) => request_error(&e),
    }
}
