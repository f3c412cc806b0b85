//! The OIP v2 REST form (KServe v2 HTTP/JSON, with Triton's binary-data
//! extension that tritonclient.http uses by default): health, metadata, infer.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRef, State};
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::common::body::{bytes_to_reserve, discard, read_body};
use crate::common::budget::Budget;
use crate::common::rest::{self, ModelPath};

use super::grpc::model_metadata;
use super::service::Worker;
use super::trace::request_span;

/// The largest request body, compressed or decompressed (the gRPC message limit too).
pub const MAX_BODY_BYTES: usize = 256 << 20;

/// What the handlers share: the worker, and the budget of body bytes (shared with the gRPC
/// server).
#[derive(Clone)]
struct Rest {
    worker: Arc<Worker>,
    budget: Budget,
}

impl FromRef<Rest> for Arc<Worker> {
    fn from_ref(r: &Rest) -> Self {
        Arc::clone(&r.worker)
    }
}

/// The REST router; infer bodies reserve their bytes from `budget`.
pub fn router(w: Arc<Worker>, budget: Budget) -> Router {
    let router = Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(metadata))
        .route("/v2/models/{name}/versions/{version}", get(metadata_v))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_v),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
        .with_state(Rest { worker: w, budget });
    rest::with_fallbacks(router)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    rest::error_json(status, msg.into())
}

async fn ready(State(w): State<Arc<Worker>>) -> StatusCode {
    if w.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn server_metadata() -> Response {
    axum::Json(json!({"name": "tandem-worker", "version": env!("CARGO_PKG_VERSION"), "extensions": ["binary_tensor_data"]}))
        .into_response()
}

fn metadata_for(w: &Worker, name: &str, version: &str) -> Response {
    if let Err(e) = w.check_served(name, version) {
        return error(StatusCode::NOT_FOUND, e.to_string());
    }
    let Some(m) = model_metadata(w) else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "model is not loaded yet");
    };
    let t = |v: &[tandem_proto::inference::model_metadata_response::TensorMetadata]| -> Vec<Value> {
        v.iter()
            .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
            .collect()
    };
    axum::Json(json!({"name": m.name, "versions": m.versions, "platform": m.platform, "inputs": t(&m.inputs), "outputs": t(&m.outputs)}))
        .into_response()
}

async fn metadata(State(w): State<Arc<Worker>>, ModelPath(name): ModelPath<String>) -> Response {
    metadata_for(&w, &name, "")
}

async fn metadata_v(
    State(w): State<Arc<Worker>>,
    ModelPath((name, version)): ModelPath<(String, String)>,
) -> Response {
    metadata_for(&w, &name, &version)
}

/// The status code alone, as the protocol's health answers are, or a 404 naming what is
/// served.
fn ready_for(w: &Worker, name: &str, version: &str) -> Response {
    if let Err(e) = w.check_served(name, version) {
        error(StatusCode::NOT_FOUND, e.to_string())
    } else if w.is_ready() {
        StatusCode::OK.into_response()
    } else {
        StatusCode::SERVICE_UNAVAILABLE.into_response()
    }
}

async fn model_ready(State(w): State<Arc<Worker>>, ModelPath(name): ModelPath<String>) -> Response {
    ready_for(&w, &name, "")
}

async fn model_ready_v(
    State(w): State<Arc<Worker>>,
    ModelPath((name, version)): ModelPath<(String, String)>,
) -> Response {
    ready_for(&w, &name, &version)
}

async fn infer(
    State(r): State<Rest>,
    ModelPath(name): ModelPath<String>,
    http: Version,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_common(r, name, String::new(), http, headers, body).await
}

async fn infer_v(
    State(r): State<Rest>,
    ModelPath((name, version)): ModelPath<(String, String)>,
    http: Version,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_common(r, name, version, http, headers, body).await
}

async fn infer_common(
    Rest { worker: w, budget }: Rest,
    name: String,
    version: String,
    http: Version,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Held until the answer is made: the tensors decoded from the body live that long.
    let _reserved = match budget.try_reserve(bytes_to_reserve(&headers, MAX_BODY_BYTES)) {
        Ok(r) => r,
        Err(full) => {
            w.infer_refused();
            discard(http, &headers, body, MAX_BODY_BYTES).await;
            return error(StatusCode::TOO_MANY_REQUESTS, full.to_string());
        }
    };
    let body = match read_body(http, &headers, body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            w.infer_rejected();
            return error(e.http_status(), e.to_string());
        }
    };
    let (req, binary_out) =
        match rest::parse_infer_request(&name, &version, &headers, &body, MAX_BODY_BYTES) {
            Ok(r) => r,
            Err(msg) => {
                w.infer_rejected();
                return error(StatusCode::BAD_REQUEST, msg);
            }
        };
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let span = request_span(&req.model_name, traceparent);
    match w.infer(req, span).await {
        Ok(resp) => rest::infer_response(&resp, &binary_out),
        Err(e) => error(e.http_status(), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::{Request, header};
    use tandem_proto::inference::ModelInferRequest;
    use tower::ServiceExt;

    use super::super::testing::held_worker;
    use super::*;

    fn worker() -> Arc<Worker> {
        Arc::new(Worker::new("m".into(), "1".into(), String::new()))
    }

    /// The router, with room for any request.
    fn app(w: Arc<Worker>) -> Router {
        let budget = Budget::new(1 << 30, "--max-request-bytes-in-flight", Default::default());
        router(w, budget)
    }

    async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// One row of 2 MiB of FP32 zeros for the held worker's model, as binary tensor data, its
    /// length declared.
    fn two_mib_request() -> Request<Body> {
        let json = r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1,524288],"parameters":{"binary_data_size":2097152}}]}"#;
        let mut body = json.as_bytes().to_vec();
        body.resize(json.len() + (2 << 20), 0);
        Request::post("/v2/models/m/infer")
            .header(rest::HEADER_LEN, json.len())
            .header(header::CONTENT_LENGTH, body.len())
            .body(Body::from(body))
            .unwrap()
    }

    #[tokio::test]
    async fn a_body_that_would_pass_the_budget_is_refused_with_429_until_the_one_held_is_answered()
    {
        let (w, mut gate) = held_worker();
        let budget = Budget::new(
            3 << 20,
            "--max-request-bytes-in-flight",
            w.metrics.request_bytes_in_flight.clone(),
        );
        let app = router(Arc::clone(&w), budget.clone());
        let held = app.clone();
        let first = tokio::spawn(async move { send(&held, two_mib_request()).await });
        gate.arrived.recv().await.unwrap();
        assert_eq!(budget.reserved(), (2 << 20) + 1024);

        let (status, body) = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            send(&app, two_mib_request()),
        )
        .await
        .expect("refused at once, not queued");
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            body["error"],
            "worker is receiving 2 MiB of request bodies; this request's 2 MiB would pass its \
             budget of 3 MiB (--max-request-bytes-in-flight); retry later"
        );

        gate.open();
        assert_eq!(first.await.unwrap().0, StatusCode::OK);
        assert_eq!(send(&app, two_mib_request()).await.0, StatusCode::OK);
        assert_eq!(budget.reserved(), 0);
        crate::inference::service::assert_one_refusal_counted(&w);
    }

    #[tokio::test]
    async fn a_model_name_that_is_not_utf8_is_refused_as_json_like_any_client_error() {
        let app = app(worker());
        for req in [
            Request::post("/v2/models/%ff%fe/infer").body(Body::from(r#"{"inputs":[]}"#)),
            Request::get("/v2/models/m/versions/%c3%28/ready").body(Body::empty()),
        ] {
            let (status, body) = send(&app, req.unwrap()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            let says = body["error"].as_str().expect("a JSON error");
            assert!(says.contains("UTF-8"), "{says}");
        }
    }

    #[tokio::test]
    async fn a_version_not_served_is_refused_naming_the_version_asked_and_the_one_served() {
        let w = worker();
        let app = app(Arc::clone(&w));
        let says =
            "model \"m\" version \"2\" is not served here (this worker serves version \"1\")";
        for req in [
            Request::get("/v2/models/m/versions/2").body(Body::empty()),
            Request::get("/v2/models/m/versions/2/ready").body(Body::empty()),
            Request::post("/v2/models/m/versions/2/infer").body(Body::from(r#"{"inputs":[]}"#)),
        ] {
            let (status, body) = send(&app, req.unwrap()).await;
            assert_eq!(status, StatusCode::NOT_FOUND);
            assert_eq!(body["error"], says);
        }
        let err = w
            .infer(
                ModelInferRequest {
                    model_name: "m".into(),
                    model_version: "7".into(),
                    ..Default::default()
                },
                tracing::Span::none(),
            )
            .await
            .unwrap_err();
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), says.replace("\"2\"", "\"7\""));
        let (status, body) = send(
            &app,
            Request::get("/v2/models/other/ready")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "model \"other\" is not served here");
    }

    #[tokio::test]
    async fn an_output_asking_for_classification_is_refused_over_rest_and_grpc() {
        let w = worker();
        let app = app(Arc::clone(&w));
        let post = Request::post("/v2/models/m/infer")
            .body(Body::from(
                r#"{"inputs":[],"outputs":[{"name":"logits","parameters":{"classification":3}}]}"#,
            ))
            .unwrap();
        let (status, body) = send(&app, post).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let says = body["error"].as_str().unwrap();
        assert!(
            says.contains("asks for the classification extension") && says.contains("Tandem"),
            "{says}"
        );
        let (rest_req, _) = rest::parse_infer_request(
            "m",
            "",
            &HeaderMap::new(),
            &bytes::Bytes::from_static(
                br#"{"inputs":[],"outputs":[{"name":"logits","parameters":{"classification":1}}]}"#,
            ),
            1 << 10,
        )
        .unwrap();
        let status =
            tonic::Status::from(w.infer(rest_req, tracing::Span::none()).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(w.stats().errors_total, 2);
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_get_a_json_error_naming_them() {
        let app = app(worker());
        let get = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
        for (req, status, says) in [
            (get("/unknown"), 404, "no such endpoint: GET /unknown"),
            (
                get("/v2/models/m/config"),
                404,
                "model configuration (GET /v2/models/m/config) is not supported by Tandem",
            ),
            (
                get("/v2/models/m/versions/1/stats"),
                404,
                "model statistics (GET /v2/models/m/versions/1/stats) is not supported by Tandem",
            ),
            (
                get("/v2/models/stats"),
                404,
                "model statistics (GET /v2/models/stats) is not supported by Tandem",
            ),
            (
                Request::post("/v2/repository/index")
                    .body(Body::empty())
                    .unwrap(),
                404,
                "the model repository extension (POST /v2/repository/index) is not supported by Tandem",
            ),
            (
                get("/v2/models/m/infer"),
                405,
                "method GET is not allowed on /v2/models/m/infer; use POST",
            ),
        ] {
            let (got, body) = send(&app, req).await;
            assert_eq!((got.as_u16(), body["error"].as_str()), (status, Some(says)));
        }
    }

    #[tokio::test]
    async fn malformed_rest_bodies_are_counted_as_invalid_requests_and_errors() {
        let w = worker();
        let app = app(Arc::clone(&w));
        let not_json = Request::post("/v2/models/m/infer")
            .body(Body::from("not json"))
            .unwrap();
        let (status, body) = send(&app, not_json).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("request JSON is invalid")
        );
        let brotli = Request::post("/v2/models/m/versions/1/infer")
            .header(header::CONTENT_ENCODING, "br")
            .body(Body::from("{}"))
            .unwrap();
        let (status, _) = send(&app, brotli).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

        let stats = w.stats();
        assert_eq!((stats.requests_total, stats.errors_total), (2, 2));
        assert!(
            w.metrics
                .encode()
                .contains("tandem_inference_requests_total{outcome=\"invalid\"} 2"),
            "{}",
            w.metrics.encode()
        );
    }
}
