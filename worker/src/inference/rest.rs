//! The OIP v2 REST form (KServe v2 HTTP/JSON, with Triton's binary-data
//! extension that tritonclient.http uses by default): health, metadata, infer.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tandem_proto::inference::ModelInferRequest;
use tandem_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};

use crate::common::body::read_body;

use super::grpc::model_metadata;
use super::service::{InferError, Worker};
use super::trace::request_span;

const HEADER_LEN: &str = "inference-header-content-length";

/// The largest request body, compressed or decompressed (the gRPC message limit too).
pub const MAX_BODY_BYTES: usize = 256 << 20;

/// The REST router.
pub fn router(w: Arc<Worker>) -> Router {
    Router::new()
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
        .with_state(w)
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
    if !w.serves(name, version) {
        return error(
            StatusCode::NOT_FOUND,
            format!("model {name:?} is not served here"),
        );
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

fn ready_for(w: &Worker, name: &str, version: &str) -> StatusCode {
    if !w.serves(name, version) {
        StatusCode::NOT_FOUND
    } else if w.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn model_ready(State(w): State<Arc<Worker>>, Path(name): Path<String>) -> StatusCode {
    ready_for(&w, &name, "")
}

async fn model_ready_v(
    State(w): State<Arc<Worker>>,
    Path((name, version)): Path<(String, String)>,
) -> StatusCode {
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

/// Flattens nested JSON arrays of numbers into little-endian bytes of `datatype`.
fn json_data_to_bytes(data: &Value, datatype: &str, out: &mut Vec<u8>) -> Result<(), String> {
    match data {
        Value::Array(items) => {
            for v in items {
                json_data_to_bytes(v, datatype, out)?;
            }
            Ok(())
        }
        Value::Number(n) => {
            match datatype {
                "FP32" => {
                    out.extend_from_slice(&(n.as_f64().ok_or("not a number")? as f32).to_le_bytes())
                }
                "INT64" => out.extend_from_slice(
                    &n.as_i64()
                        .ok_or("INT64 data must be integers")?
                        .to_le_bytes(),
                ),
                "UINT8" => {
                    let v = n
                        .as_u64()
                        .and_then(|v| u8::try_from(v).ok())
                        .ok_or("UINT8 data must be 0..=255")?;
                    out.push(v);
                }
                other => return Err(format!("unsupported datatype {other}")),
            }
            Ok(())
        }
        other => Err(format!("tensor data must be numbers, got {other}")),
    }
}

/// Parses a REST infer body (JSON, optionally followed by binary tensors).
fn parse_request(
    name: String,
    version: String,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(ModelInferRequest, bool), String> {
    let json_len = match headers.get(HEADER_LEN) {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or("bad Inference-Header-Content-Length")?,
        None => body.len(),
    };
    if json_len > body.len() {
        return Err("Inference-Header-Content-Length exceeds the body".into());
    }
    let header: Value =
        serde_json::from_slice(&body[..json_len]).map_err(|e| format!("invalid JSON: {e}"))?;
    let mut binary = body.slice(json_len..);
    let mut req = ModelInferRequest {
        model_name: name,
        model_version: version,
        id: header
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        ..Default::default()
    };
    let inputs = header
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or("request has no \"inputs\" array")?;
    for input in inputs {
        let name = input
            .get("name")
            .and_then(Value::as_str)
            .ok_or("input without \"name\"")?;
        let datatype = input
            .get("datatype")
            .and_then(Value::as_str)
            .ok_or("input without \"datatype\"")?;
        let shape: Vec<i64> = input
            .get("shape")
            .and_then(Value::as_array)
            .ok_or("input without \"shape\"")?
            .iter()
            .map(|d| d.as_i64().ok_or("shape entries must be integers"))
            .collect::<Result<_, _>>()?;
        let raw = match input
            .pointer("/parameters/binary_data_size")
            .and_then(Value::as_u64)
        {
            Some(n) => {
                let n = usize::try_from(n).map_err(|_| "binary_data_size too large")?;
                if n > binary.len() {
                    return Err(format!(
                        "input {name:?}: binary_data_size {n} exceeds the binary payload"
                    ));
                }
                binary.split_to(n)
            }
            None => {
                let mut out = Vec::new();
                json_data_to_bytes(
                    input
                        .get("data")
                        .ok_or(format!("input {name:?} has no data"))?,
                    datatype,
                    &mut out,
                )
                .map_err(|e| format!("input {name:?}: {e}"))?;
                Bytes::from(out)
            }
        };
        req.inputs.push(InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            ..Default::default()
        });
        req.raw_input_contents.push(raw);
    }
    if !binary.is_empty() {
        return Err(format!(
            "{} bytes of binary payload left after the inputs' binary_data_size",
            binary.len()
        ));
    }
    let all_binary = header
        .pointer("/parameters/binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut binary_out = all_binary;
    if let Some(outputs) = header.get("outputs").and_then(Value::as_array) {
        for o in outputs {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or("output without \"name\"")?;
            binary_out |= o
                .pointer("/parameters/binary_data")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            req.outputs.push(InferRequestedOutputTensor {
                name: name.into(),
                ..Default::default()
            });
        }
    }
    Ok((req, binary_out))
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
        Err(e) => return error(e.http_status(), e.to_string()),
    };
    let (req, binary_out) = match parse_request(name, version, &headers, &body) {
        Ok(r) => r,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let span = request_span(&req.model_name, traceparent);
    let resp = match w.infer(req, span).await {
        Ok(r) => r,
        Err(e @ InferError::QueueFull(_)) => return error(e.http_status(), e.to_string()),
        Err(e) => return error(e.http_status(), e.to_string()),
    };
    let mut outputs = Vec::new();
    let mut payload: Vec<u8> = Vec::new();
    for (meta, raw) in resp.outputs.iter().zip(&resp.raw_output_contents) {
        if binary_out {
            outputs.push(
                json!({"name": meta.name, "datatype": meta.datatype, "shape": meta.shape,
                                "parameters": {"binary_data_size": raw.len()}}),
            );
            payload.extend_from_slice(raw);
        } else {
            let data: Vec<f32> = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            outputs.push(json!({"name": meta.name, "datatype": meta.datatype, "shape": meta.shape, "data": data}));
        }
    }
    let header = json!({"model_name": resp.model_name, "model_version": resp.model_version, "id": resp.id, "outputs": outputs});
    let header_bytes = header.to_string().into_bytes();
    if !binary_out {
        return ([(header::CONTENT_TYPE, "application/json")], header_bytes).into_response();
    }
    let header_len = header_bytes.len().to_string();
    let mut body = header_bytes;
    body.extend_from_slice(&payload);
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::HeaderName::from_static(HEADER_LEN), header_len),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_inputs_become_raw_little_endian_contents() {
        let body = Bytes::from(
            r#"{"inputs":[{"name":"input_ids","datatype":"INT64","shape":[1,2],"data":[[101,102]]}]}"#,
        );
        let (req, binary) =
            parse_request("m".into(), String::new(), &HeaderMap::new(), &body).unwrap();
        assert!(!binary);
        assert_eq!(req.raw_input_contents[0].len(), 16);
        assert_eq!(&req.raw_input_contents[0][..8], &101i64.to_le_bytes());
    }

    #[test]
    fn binary_inputs_are_cut_from_the_payload_after_the_json_header() {
        let json = r#"{"inputs":[{"name":"input","datatype":"UINT8","shape":[1,3],"parameters":{"binary_data_size":3}}],"outputs":[{"name":"logits","parameters":{"binary_data":true}}]}"#;
        let mut b = json.as_bytes().to_vec();
        b.extend_from_slice(&[1, 2, 3]);
        let mut h = HeaderMap::new();
        h.insert(HEADER_LEN, json.len().to_string().parse().unwrap());
        let (req, binary) = parse_request("m".into(), String::new(), &h, &Bytes::from(b)).unwrap();
        assert!(binary);
        assert_eq!(req.raw_input_contents[0].as_ref(), &[1, 2, 3]);
        assert_eq!(req.outputs[0].name, "logits");
    }

    #[test]
    fn a_binary_size_past_the_payload_is_refused() {
        let json = r#"{"inputs":[{"name":"input","datatype":"UINT8","shape":[1,3],"parameters":{"binary_data_size":9}}]}"#;
        let mut h = HeaderMap::new();
        h.insert(HEADER_LEN, json.len().to_string().parse().unwrap());
        assert!(parse_request("m".into(), String::new(), &h, &Bytes::from(json)).is_err());
    }

    #[test]
    fn binary_payload_no_input_claims_is_refused() {
        let json = r#"{"inputs":[{"name":"input","datatype":"UINT8","shape":[1,3],"parameters":{"binary_data_size":3}}]}"#;
        let mut b = json.as_bytes().to_vec();
        b.extend_from_slice(&[1, 2, 3, 4, 5]);
        let mut h = HeaderMap::new();
        h.insert(HEADER_LEN, json.len().to_string().parse().unwrap());
        assert_eq!(
            parse_request("m".into(), String::new(), &h, &Bytes::from(b)).unwrap_err(),
            "2 bytes of binary payload left after the inputs' binary_data_size"
        );
    }
}
