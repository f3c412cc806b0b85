//! OIP v2 REST for clients and the health probes, on the HTTP port:
//! `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2`,
//! `GET /v2/models/{name}[/versions/{v}]`, `.../ready`, and
//! `POST /v2/models/{name}[/versions/{v}]/infer`.
//!
//! Requests are JSON, or JSON followed by binary tensor data (the binary
//! tensor extension used by `tritonclient.http`: header
//! `Inference-Header-Content-Length`, per-input `binary_data_size`). Responses
//! use binary data when the client asks for it (`binary_data_output` or an
//! output's `binary_data`), JSON arrays otherwise. Errors are `{"error": "..."}`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use bytes::{BufMut as _, BytesMut};
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use tandem_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use tandem_proto::inference::{ModelInferRequest, ModelInferResponse};

use super::error::RequestError;
use super::service::{Service, trace_from_header};
use crate::common::tensor::{self, DataType};

use crate::common::body::{BodyError, read_body};

const HEADER_LEN: &str = "inference-header-content-length";

#[derive(Debug, Deserialize)]
struct RestRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow)]
    inputs: Vec<RestInput<'a>>,
    #[serde(default)]
    outputs: Option<Vec<RestOutput>>,
}

#[derive(Debug, Deserialize)]
struct RestInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    /// Left as JSON text, decoded straight into the BYTES encoding ([`BytesElements`]): as a
    /// `Value` tree, 4-byte strings took ~33 times their size in memory.
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
struct RestOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// The REST router.
pub fn router(service: Arc<Service>) -> axum::Router {
    axum::Router::new()
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
        .with_state(service)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
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

async fn model_metadata(State(s): State<Arc<Service>>, Path(name): Path<String>) -> Response {
    model_metadata_v(State(s), Path((name, String::new()))).await
}

async fn model_metadata_v(
    State(s): State<Arc<Service>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    if !s.serves(&name, &version) {
        return request_error(&RequestError::ModelNotFound(name));
    }
    Json(metadata_json(&s)).into_response()
}

async fn model_ready(State(s): State<Arc<Service>>, Path(name): Path<String>) -> Response {
    model_ready_v(State(s), Path((name, String::new()))).await
}

async fn model_ready_v(
    State(s): State<Arc<Service>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    if !s.serves(&name, &version) {
        return request_error(&RequestError::ModelNotFound(name));
    }
    ready(State(s)).await.into_response()
}

async fn infer(
    state: State<Arc<Service>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_v(state, Path((name, String::new())), headers, body).await
}

async fn infer_v(
    State(s): State<Arc<Service>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // JSON framing adds overhead beyond the tensor bytes that the limit is about.
    let limit = s.config().limits.max_request_bytes.saturating_add(64 << 10);
    let body = match read_body(&headers, body, limit).await {
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
    let (req, binary_out) = match parse_request(&name, &version, &headers, body) {
        Ok(r) => r,
        Err(e) => {
            s.infer_rejected("http", &e);
            return request_error(&e);
        }
    };
    let trace = trace_from_header(headers.get("traceparent").and_then(|v| v.to_str().ok()));
    match s.infer(req.0, trace, "http").await {
        Ok(resp) => render_response(resp, &binary_out),
        Err(e) => request_error(&e),
    }
}

/// Which outputs the client wants in binary form.
#[derive(Debug, Default)]
struct BinaryOutputs {
    all: bool,
    names: Vec<String>,
}

impl BinaryOutputs {
    fn wants(&self, name: &str) -> bool {
        self.all || self.names.iter().any(|n| n == name)
    }
}

struct Parsed(ModelInferRequest);

fn flag(params: &Option<Map<String, Value>>, key: &str) -> bool {
    params
        .as_ref()
        .and_then(|p| p.get(key))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn parse_request(
    name: &str,
    version: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(Parsed, BinaryOutputs), RequestError> {
    let json_len = match headers.get(HEADER_LEN) {
        Some(v) => {
            let n: usize = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| {
                    RequestError::invalid("Inference-Header-Content-Length is not a number")
                })?;
            if n > body.len() {
                return Err(RequestError::invalid(format!(
                    "Inference-Header-Content-Length {n} is larger than the body ({} bytes)",
                    body.len()
                )));
            }
            n
        }
        None => body.len(),
    };
    let header: RestRequest = serde_json::from_slice(&body[..json_len])
        .map_err(|e| RequestError::invalid(format!("request JSON is invalid: {e}")))?;
    let mut binary = body.slice(json_len..);
    let mut inputs = Vec::with_capacity(header.inputs.len());
    let mut raw = Vec::with_capacity(header.inputs.len());
    for input in header.inputs {
        let size = input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
            .and_then(Value::as_u64);
        let contents = match (size, &input.data) {
            (Some(size), _) => {
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                if size > binary.len() {
                    return Err(RequestError::invalid(format!(
                        "input {:?}: binary_data_size {size} exceeds the {} binary bytes left in the body",
                        input.name,
                        binary.len()
                    )));
                }
                binary.split_to(size)
            }
            (None, Some(data)) if input.datatype == DataType::Bytes.as_str() => {
                let mut out = BytesMut::new();
                let mut json = serde_json::Deserializer::from_str(data.get());
                BytesElements(&mut out)
                    .deserialize(&mut json)
                    .map_err(|m| RequestError::invalid(format!("input {:?}: {m}", input.name)))?;
                out.freeze()
            }
            // Non-BYTES JSON data is refused by the datatype check later.
            (None, Some(_)) => Bytes::new(),
            (None, None) => {
                return Err(RequestError::invalid(format!(
                    "input {:?} has neither data nor binary_data_size",
                    input.name
                )));
            }
        };
        raw.push(contents);
        inputs.push(InferInputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            ..Default::default()
        });
    }
    let mut bin = BinaryOutputs {
        all: flag(&header.parameters, "binary_data_output"),
        names: vec![],
    };
    let outputs = header
        .outputs
        .unwrap_or_default()
        .into_iter()
        .map(|o| {
            if flag(&o.parameters, "binary_data") {
                bin.names.push(o.name.clone());
            }
            InferRequestedOutputTensor {
                name: o.name,
                ..Default::default()
            }
        })
        .collect();
    Ok((
        Parsed(ModelInferRequest {
            model_name: name.to_owned(),
            model_version: version.to_owned(),
            id: header.id.unwrap_or_default(),
            parameters: Default::default(),
            inputs,
            outputs,
            raw_input_contents: raw,
        }),
        bin,
    ))
}

/// Decodes a JSON string, or nested arrays of them, into the BYTES encoding (each element's
/// 4-byte little-endian length, then its bytes) as it reads.
struct BytesElements<'o>(&'o mut BytesMut);

impl<'de> DeserializeSeed<'de> for BytesElements<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BytesElements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("BYTES data: strings, or arrays of them")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        let len = u32::try_from(v.len()).map_err(|_| E::custom("a BYTES element over 4 GiB"))?;
        self.0.put_u32_le(len);
        self.0.put_slice(v.as_bytes());
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(BytesElements(&mut *self.0))?
            .is_some()
        {}
        Ok(())
    }
}

fn json_data(datatype: &str, raw: &Bytes) -> Value {
    match datatype {
        "FP32" => json!(tensor::le_bytes_to_f32(raw).unwrap_or_default()),
        "INT64" => json!(tensor::le_bytes_to_i64(raw).unwrap_or_default()),
        "BYTES" => json!(
            tensor::decode_bytes_elements(raw)
                .unwrap_or_default()
                .iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect::<Vec<_>>()
        ),
        "UINT8" => json!(raw.to_vec()),
        _ => Value::Null,
    }
}

fn render_response(resp: ModelInferResponse, bin: &BinaryOutputs) -> Response {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut tail: Vec<Bytes> = Vec::new();
    for (o, raw) in resp.outputs.iter().zip(resp.raw_output_contents.iter()) {
        if bin.wants(&o.name) {
            outputs.push(json!({"name": o.name, "datatype": o.datatype, "shape": o.shape, "parameters": {"binary_data_size": raw.len()}}));
            tail.push(raw.clone());
        } else {
            outputs.push(json!({"name": o.name, "datatype": o.datatype, "shape": o.shape, "data": json_data(&o.datatype, raw)}));
        }
    }
    let header = json!({"model_name": resp.model_name, "model_version": resp.model_version, "id": resp.id, "outputs": outputs});
    let header = header.to_string().into_bytes();
    if tail.is_empty() {
        return (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            header,
        )
            .into_response();
    }
    let mut body = Vec::with_capacity(header.len() + tail.iter().map(Bytes::len).sum::<usize>());
    body.extend_from_slice(&header);
    for t in &tail {
        body.extend_from_slice(t);
    }
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut()
        .insert(HEADER_LEN, HeaderValue::from(header.len()));
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elements(json: &str) -> Result<Bytes, String> {
        let mut out = BytesMut::new();
        let mut de = serde_json::Deserializer::from_str(json);
        BytesElements(&mut out)
            .deserialize(&mut de)
            .map_err(|e| e.to_string())?;
        Ok(out.freeze())
    }

    #[test]
    fn json_strings_nested_or_not_become_the_bytes_encoding_with_escapes_decoded() {
        assert_eq!(
            elements(r#"[["ab", "\u00e9"], ["\"q\""]]"#).unwrap(),
            tensor::encode_bytes_elements(["ab", "é", "\"q\""])
        );
        assert_eq!(
            elements(r#""one""#).unwrap(),
            tensor::encode_bytes_elements(["one"])
        );
        assert_eq!(elements("[]").unwrap(), Bytes::new());
    }

    #[test]
    fn json_data_that_is_not_strings_is_refused() {
        for bad in ["[1, 2]", r#"["a", null]"#, r#"{"a": "b"}"#, "true"] {
            let err = elements(bad).unwrap_err();
            assert!(
                err.contains("expected BYTES data: strings, or arrays of them"),
                "{bad}: {err}"
            );
        }
    }
}
