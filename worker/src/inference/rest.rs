//! The OIP v2 REST form (KServe v2 HTTP/JSON, with Triton's binary-data
//! extension that tritonclient.http uses by default): health, metadata, infer.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::common::body::read_body;
use crate::common::rest;

use super::grpc::model_metadata;
use super::service::Worker;
use super::trace::request_span;

/// The largest request body, compressed or decompressed (the gRPC message limit too).
pub const MAX_BODY_BYTES: usize = 256 << 20;

/// The REST router.
pub fn router(w: Arc<Worker>) -> Router {
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
        .with_state(w);
    rest::with_fallbacks(router)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": msg.into()}))).into_response()
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

async fn metadata(State(w): State<Arc<Worker>>, Path(name): Path<String>) -> Response {
    metadata_for(&w, &name, "")
}

async fn metadata_v(
    State(w): State<Arc<Worker>>,
    Path((name, version)): Path<(String, String)>,
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

async fn model_ready(State(w): State<Arc<Worker>>, Path(name): Path<String>) -> Response {
    ready_for(&w, &name, "")
}

async fn model_ready_v(
    State(w): State<Arc<Worker>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    ready_for(&w, &name, &version)
}

async fn infer(
    State(w): State<Arc<Worker>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_common(w, name, String::new(), headers, body).await
}

async fn infer_v(
    State(w): State<Arc<Worker>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_common(w, name, version, headers, body).await
}

async fn infer_common(
    w: Arc<Worker>,
    name: String,
    version: String,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&headers, body, MAX_BODY_BYTES).await {
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

    use super::*;

    fn worker() -> Arc<Worker> {
        Arc::new(Worker::new("m".into(), "1".into(), String::new()))
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

    #[tokio::test]
    async fn a_version_not_served_is_refused_naming_the_version_asked_and_the_one_served() {
        let w = worker();
        let app = router(Arc::clone(&w));
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
        let app = router(Arc::clone(&w));
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
        let app = router(worker());
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
        let app = router(Arc::clone(&w));
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
