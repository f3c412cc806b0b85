//! The OIP v2 REST infer request and response bodies, read and written the same way by both
//! worker roles: JSON, or JSON followed by binary tensor data (the binary tensor extension
//! `tritonclient.http` uses: header `Inference-Header-Content-Length`, per-input
//! `binary_data_size`, per-output `binary_data` or the request's `binary_data_output`).
//!
//! JSON tensor data is decoded straight into the raw little-endian encoding the gRPC form
//! carries ([`decode_json_data`]), never into a `serde_json::Value` tree: as a tree, a body of
//! small numbers took about 17 times its size in memory, and of short strings about 33 times.
//! Every error is a message for the client (HTTP 400).
//!
//! Both roles' routers also answer, through [`with_fallbacks`], a path they do not serve (404)
//! and a method a path does not take (405) with the protocol's `{"error": "..."}` body, naming
//! the path and method, and saying so when it is a part of Triton's API Tandem does not
//! implement (model configuration, statistics, the model repository).

use std::marker::PhantomData;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bytes::Bytes;
use serde::de::{
    DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Unexpected, Visitor,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use tandem_proto::inference::infer_parameter::ParameterChoice;
use tandem_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use tandem_proto::inference::{InferParameter, ModelInferRequest, ModelInferResponse};

use super::tensor::{self, DataType};

/// The header that splits a body into its JSON part and its binary part.
pub const HEADER_LEN: &str = "inference-header-content-length";

/// How many inputs, and how many outputs, a request may name: far more than any model has.
const MAX_TENSORS: usize = 1024;
/// How many dimensions a shape may have.
const MAX_DIMS: usize = 64;
/// How many entries a `parameters` object may have.
const MAX_PARAMETERS: usize = 64;

// Every list and map of the request is capped while it is read, and parameter values are
// scalars: uncapped, a body of `{"name":""}` outputs or of a parameter holding a long array
// made the parser allocate 10-15 times the body (a 34 MiB body, 350 MB).
#[derive(Debug, Deserialize)]
struct RestRequest<'a> {
    #[serde(default, deserialize_with = "string_id")]
    id: Option<String>,
    #[serde(default, deserialize_with = "parameters")]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow, deserialize_with = "inputs")]
    inputs: Vec<RestInput<'a>>,
    #[serde(default, deserialize_with = "outputs")]
    outputs: Option<Vec<RestOutput>>,
}

#[derive(Debug, Deserialize)]
struct RestInput<'a> {
    name: String,
    #[serde(deserialize_with = "shape")]
    shape: Vec<i64>,
    datatype: String,
    #[serde(default, deserialize_with = "parameters")]
    parameters: Option<Map<String, Value>>,
    /// Left as JSON text and decoded by [`decode_json_data`].
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
struct RestOutput {
    name: String,
    #[serde(default, deserialize_with = "parameters")]
    parameters: Option<Map<String, Value>>,
}

fn inputs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<RestInput<'de>>, D::Error> {
    d.deserialize_seq(Capped::new(MAX_TENSORS, "inputs"))
}

fn outputs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<RestOutput>>, D::Error> {
    d.deserialize_seq(Capped::new(MAX_TENSORS, "outputs"))
        .map(Some)
}

fn shape<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
    d.deserialize_seq(Capped::new(MAX_DIMS, "shape dimensions"))
}

/// A JSON array of at most `max` elements, refused as soon as it holds more.
struct Capped<T> {
    max: usize,
    what: &'static str,
    of: PhantomData<T>,
}

impl<T> Capped<T> {
    fn new(max: usize, what: &'static str) -> Self {
        Self {
            max,
            what,
            of: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Capped<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "an array of at most {} {}", self.max, self.what)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        while let Some(x) = seq.next_element()? {
            if out.len() == self.max {
                return Err(A::Error::custom(format!(
                    "more than {} {}",
                    self.max, self.what
                )));
            }
            out.push(x);
        }
        Ok(out)
    }
}

/// A `parameters` object: at most [`MAX_PARAMETERS`] entries, each a boolean, number, string
/// or null (what the protocol's parameters are); `null` for the whole is no parameters.
fn parameters<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Map<String, Value>>, D::Error> {
    struct Params;
    impl<'de> Visitor<'de> for Params {
        type Value = Option<Map<String, Value>>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "an object of at most {MAX_PARAMETERS} parameters")
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                if out.len() == MAX_PARAMETERS {
                    return Err(A::Error::custom(format!(
                        "more than {MAX_PARAMETERS} parameters"
                    )));
                }
                let value = map.next_value_seed(Scalar)?;
                out.insert(key, value);
            }
            Ok(Some(out))
        }
    }
    d.deserialize_any(Params)
}

/// A parameter value: a boolean, number, string or null.
struct Scalar;

impl<'de> DeserializeSeed<'de> for Scalar {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Scalar {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a parameter value: a boolean, number or string")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

/// The protocol's `id` is a string; anything else is refused rather than dropped (and read
/// without building a `Value` of it: an id can be as long as the body).
fn string_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Id;
    impl<'de> Visitor<'de> for Id {
        type Value = Option<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("\"id\" as a string")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(Id)
}

/// Which outputs the client wants as binary data after the JSON header.
#[derive(Debug, Default)]
pub struct BinaryOutputs {
    all: bool,
    names: Vec<String>,
}

impl BinaryOutputs {
    /// Whether output `name` goes in the binary part.
    pub fn wants(&self, name: &str) -> bool {
        self.all || self.names.iter().any(|n| n == name)
    }
}

fn flag(params: Option<&Map<String, Value>>, key: &str) -> bool {
    params
        .and_then(|p| p.get(key))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// A JSON parameter value (a scalar, see [`Scalar`]) in the gRPC form; `None` for null.
fn parameter(v: Value) -> Option<InferParameter> {
    let choice = match v {
        Value::Bool(b) => ParameterChoice::BoolParam(b),
        Value::String(s) => ParameterChoice::StringParam(s),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => ParameterChoice::Int64Param(i),
            (None, Some(u)) => ParameterChoice::Uint64Param(u),
            _ => ParameterChoice::DoubleParam(n.as_f64()?),
        },
        Value::Null | Value::Array(_) | Value::Object(_) => return None,
    };
    Some(InferParameter {
        parameter_choice: Some(choice),
    })
}

/// Parses a REST infer body into the gRPC request form (every input as
/// `raw_input_contents`) and the outputs wanted in binary. JSON data may decode to at most
/// `max_tensor_bytes` over all inputs (numbers take more room decoded than as text: `0,` is
/// 2 bytes of JSON and 8 of INT64).
pub fn parse_infer_request(
    model_name: &str,
    model_version: &str,
    headers: &HeaderMap,
    body: &Bytes,
    max_tensor_bytes: usize,
) -> Result<(ModelInferRequest, BinaryOutputs), String> {
    let json_len = match headers.get(HEADER_LEN) {
        Some(v) => {
            let n: usize = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or("Inference-Header-Content-Length is not a number")?;
            if n > body.len() {
                return Err(format!(
                    "Inference-Header-Content-Length {n} is larger than the body ({} bytes)",
                    body.len()
                ));
            }
            n
        }
        None => body.len(),
    };
    let header: RestRequest = serde_json::from_slice(&body[..json_len])
        .map_err(|e| format!("request JSON is invalid: {e}"))?;
    let mut binary = body.slice(json_len..);
    let mut budget = max_tensor_bytes;
    let mut inputs = Vec::with_capacity(header.inputs.len());
    let mut raw = Vec::with_capacity(header.inputs.len());
    for input in header.inputs {
        let name = &input.name;
        let size = match input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
        {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        format!(
                            "input {name:?}: binary_data_size must be a non-negative integer, got {v}"
                        )
                    })?,
            ),
        };
        let contents = match (size, input.data) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "input {name:?} has both data and binary_data_size; send one"
                ));
            }
            (Some(size), None) => {
                if size > binary.len() {
                    return Err(format!(
                        "input {name:?}: binary_data_size {size} exceeds the {} binary bytes left in the body",
                        binary.len()
                    ));
                }
                binary.split_to(size)
            }
            (None, Some(data)) => {
                let datatype =
                    DataType::parse(&input.datatype).map_err(|e| format!("input {name:?}: {e}"))?;
                let limit = Limit {
                    left: budget,
                    total: max_tensor_bytes,
                };
                let raw = decode_json_data(datatype, data, limit)
                    .map_err(|e| format!("input {name:?}: {e}"))?;
                budget -= raw.len();
                raw
            }
            (None, None) => {
                return Err(format!(
                    "input {name:?} has neither data nor parameters.binary_data_size"
                ));
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
    if !binary.is_empty() {
        return Err(format!(
            "{} bytes of binary data left after the inputs' binary_data_size",
            binary.len()
        ));
    }
    let mut bin = BinaryOutputs {
        all: flag(header.parameters.as_ref(), "binary_data_output"),
        names: vec![],
    };
    let outputs = header
        .outputs
        .unwrap_or_default()
        .into_iter()
        .map(|o| {
            if flag(o.parameters.as_ref(), "binary_data") {
                bin.names.push(o.name.clone());
            }
            InferRequestedOutputTensor {
                name: o.name,
                parameters: o
                    .parameters
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(k, _)| k != "binary_data")
                    .filter_map(|(k, v)| Some((k, parameter(v)?)))
                    .collect(),
            }
        })
        .collect();
    Ok((
        ModelInferRequest {
            model_name: model_name.to_owned(),
            model_version: model_version.to_owned(),
            id: header.id.unwrap_or_default(),
            parameters: Default::default(),
            inputs,
            outputs,
            raw_input_contents: raw,
        },
        bin,
    ))
}

/// The part of Triton's REST API, beyond the OIP v2 core, that `path` belongs to, where
/// Tandem does not implement it.
fn unsupported_part(path: &str) -> Option<&'static str> {
    let path = path.trim_end_matches('/');
    let model = path.starts_with("/v2/models/");
    if path.starts_with("/v2/repository") {
        Some("the model repository extension")
    } else if model && path.ends_with("/config") {
        Some("model configuration")
    } else if model && path.ends_with("/stats") {
        Some("model statistics")
    } else if path.starts_with("/v2/systemsharedmemory") || path.starts_with("/v2/cudasharedmemory")
    {
        Some("the shared-memory extension")
    } else if path.starts_with("/v2/trace") {
        Some("trace settings")
    } else if path.starts_with("/v2/logging") {
        Some("log settings")
    } else {
        None
    }
}

/// `axum::extract::Path` whose refusal is JSON like every other client error: a model name
/// that is not UTF-8 once percent-decoded (`/v2/models/%ff/infer`) gets 400 `{"error": ...}`,
/// not axum's plain text.
#[derive(Debug)]
pub struct ModelPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ModelPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Self(v)),
            Err(e) => Err(error_json(e.status(), e.body_text())),
        }
    }
}

/// A client error as OIP v2 REST answers it: `{"error": "..."}`, the message cut to
/// [`bounded_message`](super::bounded_message)'s size.
pub fn error_json(status: StatusCode, message: String) -> Response {
    let message = super::bounded_message(message);
    (status, axum::Json(json!({ "error": message }))).into_response()
}

/// A path the REST router does not serve: 404 naming it.
async fn no_route(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let message = match unsupported_part(path) {
        Some(part) => format!("{part} ({method} {path}) is not supported by Tandem"),
        None => format!("no such endpoint: {method} {path}"),
    };
    error_json(StatusCode::NOT_FOUND, message)
}

/// A path served with another method: 405 naming both (axum adds the `Allow` header).
async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let expected = if path.ends_with("/infer") {
        "POST"
    } else {
        "GET"
    };
    error_json(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {path}; use {expected}"),
    )
}

/// Completes a role's REST router (call it last): JSON errors for unknown paths and methods,
/// and `/v2/models/stats` (Triton's statistics of every model) refused as not supported
/// rather than taken by `/v2/models/{name}` for a model called "stats".
pub fn with_fallbacks(router: Router) -> Router {
    router
        .route("/v2/models/stats", any(no_route))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
}

/// How many decoded bytes an input's JSON data may take: `left` of the request's `total`.
#[derive(Debug, Clone, Copy)]
struct Limit {
    /// What this input may take.
    left: usize,
    /// The request's limit, for the message.
    total: usize,
}

/// Decodes an input's JSON `data` (nested arrays or a single value) into its raw little-endian
/// form, within `max`: BYTES elements as 4-byte lengths then bytes, numbers as `datatype`'s
/// elements.
fn decode_json_data(datatype: DataType, data: &RawValue, max: Limit) -> Result<Bytes, String> {
    if datatype == DataType::Fp16 {
        return Err("FP16 data has no JSON form here; send it as binary data".into());
    }
    let mut out = Vec::new();
    let mut json = serde_json::Deserializer::from_str(data.get());
    Elements {
        datatype,
        out: &mut out,
        max,
    }
    .deserialize(&mut json)
    .map_err(|e| e.to_string())?;
    Ok(Bytes::from(out))
}

fn over_limit<E: serde::de::Error>(max: Limit) -> E {
    E::custom(format!(
        "the request's data decodes to more than its limit of {} tensor bytes",
        max.total
    ))
}

/// Decodes a JSON value, or nested arrays of them, into `datatype`'s raw encoding as it reads:
/// strings for BYTES, booleans for BOOL, numbers otherwise; a value the datatype cannot hold
/// is refused.
struct Elements<'o> {
    datatype: DataType,
    out: &'o mut Vec<u8>,
    max: Limit,
}

impl Elements<'_> {
    /// Appends `parts` as one element, within the limit.
    fn put<E: serde::de::Error>(self, parts: &[&[u8]]) -> Result<(), E> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if self.out.len() + len > self.max.left {
            return Err(over_limit(self.max));
        }
        parts.iter().for_each(|p| self.out.extend_from_slice(p));
        Ok(())
    }

    /// The error for a value of the wrong kind: a string where numbers go, a number where
    /// strings go.
    fn wrong_kind<E: serde::de::Error>(&self, v: Unexpected) -> E {
        E::invalid_type(v, self)
    }

    fn out_of_range<E: serde::de::Error>(&self, v: impl std::fmt::Display) -> E {
        E::custom(format!(
            "{v} is not {} {} value",
            self.datatype.article(),
            self.datatype.as_str()
        ))
    }

    fn integer<E: serde::de::Error>(self, v: i128, kind: Unexpected) -> Result<(), E> {
        macro_rules! put {
            ($t:ty) => {
                match <$t>::try_from(v) {
                    Ok(x) => self.put(&[&x.to_le_bytes()]),
                    Err(_) => Err(self.out_of_range(v)),
                }
            };
        }
        match self.datatype {
            DataType::Uint8 => put!(u8),
            DataType::Uint16 => put!(u16),
            DataType::Uint32 => put!(u32),
            DataType::Uint64 => put!(u64),
            DataType::Int8 => put!(i8),
            DataType::Int16 => put!(i16),
            DataType::Int32 => put!(i32),
            DataType::Int64 => put!(i64),
            // Integers in JSON are valid floats; precision follows the datatype.
            DataType::Fp32 => self.put(&[&(v as f32).to_le_bytes()]),
            DataType::Fp64 => self.put(&[&(v as f64).to_le_bytes()]),
            DataType::Bytes => Err(self.wrong_kind(kind)),
            DataType::Bool | DataType::Fp16 => Err(self.out_of_range(v)),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Elements<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self.datatype {
            DataType::Bytes => f.write_str("BYTES data: strings, or arrays of them"),
            DataType::Bool => f.write_str("BOOL data: true or false, or arrays of them"),
            d => write!(f, "{} data: numbers, or arrays of them", d.as_str()),
        }
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        if self.datatype != DataType::Bytes {
            return Err(self.wrong_kind(Unexpected::Str(v)));
        }
        let len = u32::try_from(v.len()).map_err(|_| E::custom("a BYTES element over 4 GiB"))?;
        self.put(&[&len.to_le_bytes(), v.as_bytes()])
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        match self.datatype {
            DataType::Bool => self.put(&[&[u8::from(v)]]),
            DataType::Bytes => Err(self.wrong_kind(Unexpected::Bool(v))),
            _ => Err(self.out_of_range(v)),
        }
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.integer(i128::from(v), Unexpected::Unsigned(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.integer(i128::from(v), Unexpected::Signed(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        match self.datatype {
            DataType::Fp32 => self.put(&[&(v as f32).to_le_bytes()]),
            DataType::Fp64 => self.put(&[&v.to_le_bytes()]),
            DataType::Bytes => Err(self.wrong_kind(Unexpected::Float(v))),
            DataType::Bool | DataType::Fp16 => Err(self.out_of_range(v)),
            // An integer datatype: `101.0` and `1e3` are read as floats, and are refused as
            // such, whatever their value (`{:?}` keeps the fraction: "101.0", not "101").
            d => Err(E::custom(format!(
                "{v:?} is not an integer, as {} data must be",
                d.as_str()
            ))),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (datatype, max) = (self.datatype, self.max);
        while seq
            .next_element_seed(Elements {
                datatype,
                out: &mut *self.out,
                max,
            })?
            .is_some()
        {}
        Ok(())
    }
}

/// An output tensor in the JSON part of a response.
#[derive(Serialize)]
struct RestOutputTensor<'a> {
    name: &'a str,
    datatype: &'a str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
}

#[derive(Serialize)]
struct RestResponse<'a> {
    model_name: &'a str,
    model_version: &'a str,
    id: &'a str,
    outputs: Vec<RestOutputTensor<'a>>,
}

/// Renders a response: the outputs `bin` wants as binary data after the JSON header (with
/// `Inference-Header-Content-Length`), the others as JSON arrays.
pub fn infer_response(resp: &ModelInferResponse, bin: &BinaryOutputs) -> Response {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut tail: Vec<&Bytes> = Vec::new();
    for (o, raw) in resp.outputs.iter().zip(&resp.raw_output_contents) {
        let (parameters, data) = if bin.wants(&o.name) {
            tail.push(raw);
            (Some(json!({"binary_data_size": raw.len()})), None)
        } else {
            (None, Some(json_data(&o.datatype, raw)))
        };
        outputs.push(RestOutputTensor {
            name: &o.name,
            datatype: &o.datatype,
            shape: &o.shape,
            parameters,
            data,
        });
    }
    let header = RestResponse {
        model_name: &resp.model_name,
        model_version: &resp.model_version,
        id: &resp.id,
        outputs,
    };
    let header = match serde_json::to_vec(&header) {
        Ok(h) => h,
        Err(e) => {
            let body = json!({"error": format!("rendering the response: {e}")});
            return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response();
        }
    };
    if tail.is_empty() {
        return ([(header::CONTENT_TYPE, "application/json")], header).into_response();
    }
    let header_len = header.len();
    let mut body = header;
    body.reserve(tail.iter().map(|t| t.len()).sum());
    for t in tail {
        body.extend_from_slice(t);
    }
    let mut r = body.into_response();
    r.headers_mut()
        .insert(HEADER_LEN, HeaderValue::from(header_len));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

/// An output's raw little-endian contents as a flat JSON array (the shape travels beside it).
fn json_data(datatype: &str, raw: &Bytes) -> Value {
    fn each<const N: usize, T: Into<Value>>(raw: &[u8], f: fn([u8; N]) -> T) -> Value {
        Value::Array(
            raw.chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a).into()
                })
                .collect(),
        )
    }
    match DataType::parse(datatype) {
        Ok(DataType::Bool) => Value::Array(raw.iter().map(|&b| Value::Bool(b != 0)).collect()),
        Ok(DataType::Uint8) => each(raw, u8::from_le_bytes),
        Ok(DataType::Uint16) => each(raw, u16::from_le_bytes),
        Ok(DataType::Uint32) => each(raw, u32::from_le_bytes),
        Ok(DataType::Uint64) => each(raw, u64::from_le_bytes),
        Ok(DataType::Int8) => each(raw, i8::from_le_bytes),
        Ok(DataType::Int16) => each(raw, i16::from_le_bytes),
        Ok(DataType::Int32) => each(raw, i32::from_le_bytes),
        Ok(DataType::Int64) => each(raw, i64::from_le_bytes),
        Ok(DataType::Fp16) => each(raw, |b| f16_to_f32(u16::from_le_bytes(b))),
        Ok(DataType::Fp32) => each(raw, f32::from_le_bytes),
        Ok(DataType::Fp64) => each(raw, f64::from_le_bytes),
        Ok(DataType::Bytes) => Value::Array(
            tensor::decode_bytes_elements(raw)
                .unwrap_or_default()
                .iter()
                .map(|b| Value::String(String::from_utf8_lossy(b).into_owned()))
                .collect(),
        ),
        Err(_) => Value::Null,
    }
}

/// IEEE 754 half precision to single (exact: every half is a single).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match (exp, frac) {
        (0, 0) => sign,
        // Subnormal: value frac × 2^-24, exact in f32.
        (0, f) => {
            let v = (f as f32) * 2f32.powi(-24);
            return if sign == 0 { v } else { -v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, f) => sign | 0x7fc0_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(datatype: DataType, json: &str) -> Result<Bytes, String> {
        let v: Box<RawValue> = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let max = Limit {
            left: 1 << 20,
            total: 1 << 20,
        };
        decode_json_data(datatype, &v, max)
    }

    fn parse(json: &str, binary: &[u8]) -> Result<(ModelInferRequest, BinaryOutputs), String> {
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(binary);
        let mut h = HeaderMap::new();
        if !binary.is_empty() {
            h.insert(HEADER_LEN, HeaderValue::from(json.len()));
        }
        parse_infer_request("m", "", &h, &Bytes::from(body), 64)
    }

    #[test]
    fn json_strings_nested_or_not_become_the_bytes_encoding_with_escapes_decoded() {
        assert_eq!(
            raw(DataType::Bytes, r#"[["ab", "\u00e9"], ["\"q\""]]"#).unwrap(),
            tensor::encode_bytes_elements(["ab", "é", "\"q\""])
        );
        assert_eq!(
            raw(DataType::Bytes, r#""one""#).unwrap(),
            tensor::encode_bytes_elements(["one"])
        );
        assert_eq!(raw(DataType::Bytes, "[]").unwrap(), Bytes::new());
    }

    #[test]
    fn bytes_data_that_is_not_strings_is_refused() {
        for bad in ["[1, 2]", r#"["a", null]"#, r#"{"a": "b"}"#, "true"] {
            let err = raw(DataType::Bytes, bad).unwrap_err();
            assert!(
                err.contains("expected BYTES data: strings, or arrays of them"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn json_numbers_become_little_endian_elements_of_each_datatype() {
        assert_eq!(
            raw(DataType::Int64, "[[101, -2]]").unwrap().as_ref(),
            [101i64.to_le_bytes(), (-2i64).to_le_bytes()].concat()
        );
        assert_eq!(
            raw(DataType::Fp32, "[1.5, 2, -3]").unwrap().as_ref(),
            [1.5f32, 2.0, -3.0].map(f32::to_le_bytes).concat()
        );
        assert_eq!(raw(DataType::Uint8, "[0, 255]").unwrap().as_ref(), [0, 255]);
        assert_eq!(raw(DataType::Int8, "[-128]").unwrap().as_ref(), [0x80]);
        assert_eq!(
            raw(DataType::Uint16, "[65535]").unwrap().as_ref(),
            [0xff, 0xff]
        );
        assert_eq!(
            raw(DataType::Int32, "[-1]").unwrap().as_ref(),
            (-1i32).to_le_bytes()
        );
        assert_eq!(
            raw(DataType::Uint64, "[18446744073709551615]")
                .unwrap()
                .as_ref(),
            u64::MAX.to_le_bytes()
        );
        assert_eq!(
            raw(DataType::Fp64, "[0.1]").unwrap().as_ref(),
            0.1f64.to_le_bytes()
        );
        assert_eq!(
            raw(DataType::Bool, "[[true], [false]]").unwrap().as_ref(),
            [1, 0]
        );
        assert_eq!(raw(DataType::Int64, "7").unwrap().len(), 8);
    }

    #[test]
    fn json_numbers_a_datatype_cannot_hold_are_refused_by_value() {
        for (dt, json, says) in [
            (DataType::Uint8, "[256]", "256 is not a UINT8 value"),
            (DataType::Uint8, "[-1]", "-1 is not a UINT8 value"),
            (
                DataType::Int64,
                "[9223372036854775808]",
                "9223372036854775808 is not an INT64 value",
            ),
            (DataType::Int8, "[true]", "true is not an INT8 value"),
            (DataType::Bool, "[0.5]", "0.5 is not a BOOL value"),
            (DataType::Bool, "[1]", "1 is not a BOOL value"),
            (
                DataType::Fp32,
                r#"["1"]"#,
                "expected FP32 data: numbers, or arrays of them",
            ),
            (
                DataType::Fp32,
                "[null]",
                "expected FP32 data: numbers, or arrays of them",
            ),
            (DataType::Fp16, "[1]", "FP16 data has no JSON form here"),
        ] {
            let err = raw(dt, json).unwrap_err();
            assert!(err.contains(says), "{json}: {err}");
        }
    }

    #[test]
    fn json_floats_for_an_integer_datatype_are_refused_as_not_integers_even_when_whole() {
        for (dt, json, says) in [
            (
                DataType::Int64,
                "[1.5]",
                "1.5 is not an integer, as INT64 data must be",
            ),
            (
                DataType::Int64,
                "[101.0]",
                "101.0 is not an integer, as INT64 data must be",
            ),
            (
                DataType::Uint32,
                "[1e3]",
                "1000.0 is not an integer, as UINT32 data must be",
            ),
        ] {
            let err = raw(dt, json).unwrap_err();
            assert!(err.contains(says), "{json}: {err}");
        }
    }

    #[test]
    fn json_data_may_decode_to_at_most_the_tensor_byte_limit_over_all_inputs() {
        // 64 bytes in all: 8 INT64 values fit, a 9th does not, nor 7 more in a second input.
        let ints = |n: usize| vec!["0"; n].join(",");
        let one = |n: usize| {
            format!(
                r#"{{"name":"a","datatype":"INT64","shape":[{n}],"data":[{}]}}"#,
                ints(n)
            )
        };
        assert!(parse(&format!(r#"{{"inputs":[{}]}}"#, one(8)), &[]).is_ok());
        for json in [
            format!(r#"{{"inputs":[{}]}}"#, one(9)),
            format!(r#"{{"inputs":[{}, {}]}}"#, one(1), one(8)),
            r#"{"inputs":[{"name":"s","datatype":"BYTES","shape":[2],"data":["a", "01234567890123456789012345678901234567890123456789012345"]}]}"#.to_owned(),
        ] {
            let err = parse(&json, &[]).map(|_| ()).unwrap_err();
            assert!(
                err.contains("decodes to more than its limit of 64 tensor bytes"),
                "{json}: {err}"
            );
        }
    }

    #[test]
    fn lists_and_parameters_are_capped_while_read_and_parameter_values_are_scalars() {
        let input = r#"{"name":"x","datatype":"UINT8","shape":[1],"data":[1]}"#;
        let many = |item: &str, n: usize| vec![item; n].join(",");
        let ok = format!(
            r#"{{"parameters":{{{}}},"inputs":[{}],"outputs":[{}]}}"#,
            (0..64)
                .map(|i| format!(r#""p{i}":{i}"#))
                .collect::<Vec<_>>()
                .join(","),
            many(input, 1024),
            many(r#"{"name":"y","parameters":null}"#, 1024)
        );
        let (req, _) =
            parse_infer_request("m", "", &HeaderMap::new(), &Bytes::from(ok), 1 << 20).unwrap();
        assert_eq!((req.inputs.len(), req.outputs.len()), (1024, 1024));
        for (json, says) in [
            (
                format!(r#"{{"inputs":[{}]}}"#, many(input, 1025)),
                "more than 1024 inputs",
            ),
            (
                format!(
                    r#"{{"inputs":[],"outputs":[{}]}}"#,
                    many(r#"{"name":""}"#, 1025)
                ),
                "more than 1024 outputs",
            ),
            (
                format!(
                    r#"{{"inputs":[{{"name":"x","datatype":"UINT8","shape":[{}],"data":[]}}]}}"#,
                    many("1", 65)
                ),
                "more than 64 shape dimensions",
            ),
            (
                format!(
                    r#"{{"inputs":[],"parameters":{{{}}}}}"#,
                    (0..65)
                        .map(|i| format!(r#""p{i}":1"#))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                "more than 64 parameters",
            ),
            (
                r#"{"inputs":[],"parameters":{"p":[0,0,0]}}"#.to_owned(),
                "expected a parameter value: a boolean, number or string",
            ),
            (
                r#"{"inputs":[],"outputs":[{"name":"y","parameters":{"q":{"a":1}}}]}"#.to_owned(),
                "expected a parameter value: a boolean, number or string",
            ),
        ] {
            let err = parse(&json, &[]).map(|_| ()).unwrap_err();
            assert!(err.contains(says), "{}: {err}", &json[..json.len().min(80)]);
        }
    }

    #[test]
    fn requested_output_parameters_are_carried_into_the_grpc_form_but_binary_data() {
        let (req, bin) = parse(
            r#"{"inputs":[],"outputs":[{"name":"logits","parameters":{"classification":3,"binary_data":true,"x":null}}]}"#,
            &[],
        )
        .unwrap();
        assert!(bin.wants("logits"));
        let params = &req.outputs[0].parameters;
        assert_eq!(params.len(), 1, "{params:?}");
        assert_eq!(
            params["classification"].parameter_choice,
            Some(ParameterChoice::Int64Param(3))
        );
    }

    #[test]
    fn binary_inputs_are_cut_from_the_data_after_the_json_header() {
        let (req, bin) = parse(
            r#"{"id": "r1", "inputs":[{"name":"input","datatype":"UINT8","shape":[1,3],"parameters":{"binary_data_size":3}}],"outputs":[{"name":"logits","parameters":{"binary_data":true}}, {"name":"other"}]}"#,
            &[1, 2, 3],
        )
        .unwrap();
        assert_eq!(req.id, "r1");
        assert_eq!(req.raw_input_contents[0].as_ref(), &[1, 2, 3]);
        assert_eq!(req.outputs.len(), 2);
        assert!(bin.wants("logits"));
        assert!(!bin.wants("other"));
    }

    #[test]
    fn malformed_bodies_are_refused_with_a_message_naming_the_problem() {
        let bin =
            r#"{"name":"x","datatype":"UINT8","shape":[3],"parameters":{"binary_data_size":3}}"#;
        for (json, binary, says) in [
            (
                r#"{"id": 7, "inputs": []}"#.to_owned(),
                &[][..],
                "invalid type: integer `7`, expected \"id\" as a string",
            ),
            (
                r#"{"id": [7], "inputs": []}"#.to_owned(),
                &[][..],
                "invalid type: sequence, expected \"id\" as a string",
            ),
            (
                r#"{"inputs":[{"name":"x","datatype":"UINT8","shape":[3],"parameters":{"binary_data_size":-3}}]}"#.to_owned(),
                &[1, 2, 3][..],
                "input \"x\": binary_data_size must be a non-negative integer, got -3",
            ),
            (
                r#"{"inputs":[{"name":"x","datatype":"UINT8","shape":[3],"data":[1,2,3],"parameters":{"binary_data_size":3}}]}"#.to_owned(),
                &[1, 2, 3][..],
                "input \"x\" has both data and binary_data_size",
            ),
            (
                r#"{"inputs":[{"name":"x","datatype":"UINT8","shape":[3]}]}"#.to_owned(),
                &[][..],
                "input \"x\" has neither data nor parameters.binary_data_size",
            ),
            (
                format!(r#"{{"inputs":[{bin}]}}"#),
                &[1, 2][..],
                "binary_data_size 3 exceeds the 2 binary bytes left in the body",
            ),
            (
                format!(r#"{{"inputs":[{bin}]}}"#),
                &[1, 2, 3, 4, 5][..],
                "2 bytes of binary data left after the inputs' binary_data_size",
            ),
            (
                r#"{"inputs":[{"name":"x","datatype":"INT4","shape":[1],"data":[1]}]}"#.to_owned(),
                &[][..],
                "input \"x\": unknown datatype \"INT4\"",
            ),
            (
                r#"{"inputs":[{"name":"x","datatype":"UINT8","shape":[1],"data":[300]}]}"#.to_owned(),
                &[][..],
                "input \"x\": 300 is not a UINT8 value",
            ),
            (r#"{"inputs": "#.to_owned(), &[][..], "request JSON is invalid"),
        ] {
            let err = parse(&json, binary).map(|_| ()).unwrap_err();
            assert!(err.contains(says), "{json}: {err}");
        }
    }

    #[tokio::test]
    async fn responses_put_the_outputs_asked_for_in_binary_after_the_json_header() {
        let resp = ModelInferResponse {
            model_name: "m".into(),
            id: "r1".into(),
            outputs: vec![
                tandem_proto::inference::model_infer_response::InferOutputTensor {
                    name: "logits".into(),
                    datatype: "FP32".into(),
                    shape: vec![1, 2],
                    ..Default::default()
                },
                tandem_proto::inference::model_infer_response::InferOutputTensor {
                    name: "ids".into(),
                    datatype: "INT64".into(),
                    shape: vec![1],
                    ..Default::default()
                },
            ],
            raw_output_contents: vec![tensor::f32_to_le_bytes(&[0.5, -1.0]), {
                tensor::i64_to_le_bytes(&[-7])
            }],
            ..Default::default()
        };
        let bin = BinaryOutputs {
            all: false,
            names: vec!["logits".into()],
        };
        let r = infer_response(&resp, &bin);
        let header_len: usize = r.headers()[HEADER_LEN].to_str().unwrap().parse().unwrap();
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        let json: Value = serde_json::from_slice(&body[..header_len]).unwrap();
        assert_eq!(json["id"], "r1");
        assert_eq!(json["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(json["outputs"][1]["data"], json!([-7]));
        assert_eq!(&body[header_len..], tensor::f32_to_le_bytes(&[0.5, -1.0]));

        let r = infer_response(&resp, &BinaryOutputs::default());
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        let json: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["outputs"][0]["data"], json!([0.5, -1.0]));
    }

    #[test]
    fn half_precision_values_convert_exactly() {
        for (bits, v) in [
            (0x3c00u16, 1.0f32),
            (0xc000, -2.0),
            (0x0000, 0.0),
            (0x7bff, 65504.0),
            (0x0001, 2f32.powi(-24)),
            (0x8001, -(2f32.powi(-24))),
            (0x3555, 0.333_251_95),
        ] {
            assert_eq!(f16_to_f32(bits), v, "{bits:#06x}");
        }
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }
}
