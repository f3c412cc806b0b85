//! OIP v2 tensors ↔ engine tensors, checked against the model's spec. Pure.
//!
//! Inputs may arrive as `raw_input_contents` (little-endian bytes, the
//! Tandem and tritonclient default) or as typed `contents`; outputs always
//! leave as `raw_output_contents`.

use bytes::Bytes;
use tandem_engine::{DataType, ModelSpec, Tensor, TensorData};
use tandem_proto::inference::model_infer_response::InferOutputTensor;
use tandem_proto::inference::{InferTensorContents, ModelInferRequest};

use crate::common::tensor::{self, TensorError};

/// A request the model cannot take; the message is for the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    /// A required input is absent.
    #[error("missing input {0:?}")]
    MissingInput(String),
    /// An input the model does not have.
    #[error("unknown input {0:?}")]
    UnknownInput(String),
    /// Wrong datatype.
    #[error("input {name:?} has datatype {got}, expected {expected}")]
    Datatype {
        /// Input name.
        name: String,
        /// Datatype received.
        got: String,
        /// Datatype(s) accepted.
        expected: String,
    },
    /// Wrong shape.
    #[error("input {name:?} has shape {got:?}, expected {expected:?} (-1 = any)")]
    Shape {
        /// Input name.
        name: String,
        /// Shape received.
        got: Vec<i64>,
        /// Shape accepted.
        expected: Vec<i64>,
    },
    /// Inputs disagree on the batch size or sequence length.
    #[error("inputs disagree: {0}")]
    Inconsistent(String),
    /// Data size does not match shape × datatype.
    #[error("input {name:?}: expected {expected} elements, got {got}")]
    Size {
        /// Input name.
        name: String,
        /// Elements the shape needs.
        expected: usize,
        /// Elements received.
        got: usize,
    },
    /// Raw contents that are not one per input, or typed contents beside them.
    #[error(transparent)]
    Form(#[from] TensorError),
    /// A dimension of 0: no elements, whatever the other dimensions say.
    #[error("input {name:?} has shape {shape:?}: every dimension must be at least 1")]
    Empty {
        /// Input name.
        name: String,
        /// Shape received.
        shape: Vec<i64>,
    },
    /// A shape whose element count overflows.
    #[error("input {name:?} has shape {shape:?}, more elements than any request can carry")]
    TooLarge {
        /// Input name.
        name: String,
        /// Shape received.
        shape: Vec<i64>,
    },
    /// Raw contents that are not a whole number of elements.
    #[error(
        "input {name:?} has {got} bytes of raw contents, not a multiple of {size} (one {datatype})"
    )]
    Bytes {
        /// Input name.
        name: String,
        /// Bytes received.
        got: usize,
        /// Bytes per element.
        size: usize,
        /// The datatype sent.
        datatype: &'static str,
    },
    /// The same input twice.
    #[error("input {0:?} appears more than once")]
    Duplicate(String),
    /// A protocol extension Tandem does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// A requested output the model does not have.
    #[error("unknown output {0:?}")]
    UnknownOutput(String),
    /// A value the model cannot take (a token id outside the vocabulary, a sequence longer
    /// than the model's positions).
    #[error("{0}")]
    Value(String),
}

/// The typed data of one input before shape checks.
#[derive(Debug, Clone, PartialEq)]
pub struct RawInput {
    /// Tensor name.
    pub name: String,
    /// OIP datatype name.
    pub datatype: String,
    /// Shape as sent.
    pub shape: Vec<i64>,
    /// Elements, decoded.
    pub data: TensorData,
}

fn decode_raw(name: &str, dtype: DataType, bytes: &[u8]) -> Result<TensorData, ConvertError> {
    let size = dtype.size();
    if !bytes.len().is_multiple_of(size) {
        return Err(ConvertError::Bytes {
            name: name.into(),
            got: bytes.len(),
            size,
            datatype: dtype.as_str(),
        });
    }
    Ok(match dtype {
        DataType::Fp32 => TensorData::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DataType::Int64 => TensorData::I64(
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
        DataType::Uint8 => TensorData::U8(bytes.to_vec()),
    })
}

fn decode_typed(
    name: &str,
    dtype: DataType,
    c: &InferTensorContents,
) -> Result<TensorData, ConvertError> {
    // Values in another datatype's field would be ignored, and the input reported short.
    tensor::check_typed_field(name, dtype.as_str(), c)?;
    let out = match dtype {
        DataType::Fp32 => TensorData::F32(c.fp32_contents.clone()),
        DataType::Int64 => TensorData::I64(c.int64_contents.clone()),
        // OIP carries UINT8 (and other small unsigned types) in uint_contents.
        DataType::Uint8 => TensorData::U8(
            c.uint_contents
                .iter()
                .map(|v| {
                    u8::try_from(*v).map_err(|_| {
                        ConvertError::Value(format!(
                            "input {name:?}: {v} in uint_contents is not a UINT8 value (0 to 255)"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(out)
}

/// Decodes a request's inputs (raw or typed); `spec` only names the datatypes an input takes
/// when it has one no engine knows ([`to_engine_inputs`] checks the rest).
fn decode_inputs(spec: &ModelSpec, req: &ModelInferRequest) -> Result<Vec<RawInput>, ConvertError> {
    tensor::check_input_forms(req)?;
    let raw = &req.raw_input_contents;
    req.inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let dtype = DataType::parse(&input.datatype).ok_or_else(|| ConvertError::Datatype {
                name: input.name.clone(),
                got: input.datatype.clone(),
                expected: accepted(spec, &input.name),
            })?;
            let data = match raw.get(i) {
                Some(bytes) => decode_raw(&input.name, dtype, bytes)?,
                None => decode_typed(
                    &input.name,
                    dtype,
                    &input.contents.clone().unwrap_or_default(),
                )?,
            };
            Ok(RawInput {
                name: input.name.clone(),
                datatype: input.datatype.clone(),
                shape: input.shape.clone(),
                data,
            })
        })
        .collect()
}

/// A request's inputs as engine tensors in spec order, every check done.
pub fn engine_inputs(
    spec: &ModelSpec,
    req: &ModelInferRequest,
) -> Result<Vec<Tensor>, ConvertError> {
    to_engine_inputs(spec, decode_inputs(spec, req)?)
}

/// The datatypes `spec` takes for input `name`, for an error message.
fn accepted(spec: &ModelSpec, name: &str) -> String {
    let mut types: Vec<&str> = spec
        .input(name)
        .map(|s| s.datatype.as_str())
        .into_iter()
        .chain(
            spec.also_accepts
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, d)| d.as_str()),
        )
        .collect();
    if types.is_empty() {
        types = vec!["FP32", "INT64", "UINT8"];
    }
    types.join(" or ")
}

/// Orders and checks decoded inputs against `spec`. A sequence model's
/// `token_type_ids` may be left out (zeros are used, as BERT tokenizers produce
/// for single sentences).
fn to_engine_inputs(
    spec: &ModelSpec,
    mut inputs: Vec<RawInput>,
) -> Result<Vec<Tensor>, ConvertError> {
    if let Some(extra) = inputs.iter().find(|i| spec.input(&i.name).is_none()) {
        return Err(ConvertError::UnknownInput(extra.name.clone()));
    }
    for (i, input) in inputs.iter().enumerate() {
        if inputs[..i].iter().any(|earlier| earlier.name == input.name) {
            return Err(ConvertError::Duplicate(input.name.clone()));
        }
    }
    let mut out = Vec::with_capacity(spec.inputs.len());
    let mut first_shape: Option<Vec<usize>> = None;
    for s in &spec.inputs {
        let pos = inputs.iter().position(|i| i.name == s.name);
        let input = match pos {
            Some(p) => inputs.swap_remove(p),
            None if s.name == "token_type_ids" => {
                let Some(shape) = &first_shape else {
                    return Err(ConvertError::MissingInput(s.name.clone()));
                };
                out.push(Tensor::i64(shape.clone(), vec![0; shape.iter().product()]));
                continue;
            }
            None => return Err(ConvertError::MissingInput(s.name.clone())),
        };
        let dtype = input.data.dtype();
        if !spec.accepts_dtype(&s.name, dtype) {
            return Err(ConvertError::Datatype {
                name: s.name.clone(),
                got: input.datatype,
                expected: s.datatype.as_str().into(),
            });
        }
        if input.shape.iter().any(|d| *d < 0)
            || !s.accepts_shape(&input.shape.iter().map(|d| *d as usize).collect::<Vec<_>>())
        {
            return Err(ConvertError::Shape {
                name: s.name.clone(),
                got: input.shape,
                expected: s.dims.clone(),
            });
        }
        // With no zero dimension, the element count bounds every dimension by the data sent.
        if input.shape.contains(&0) {
            return Err(ConvertError::Empty {
                name: s.name.clone(),
                shape: input.shape,
            });
        }
        let shape: Vec<usize> = input.shape.iter().map(|d| *d as usize).collect();
        let Some(numel) = shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d)) else {
            return Err(ConvertError::TooLarge {
                name: s.name.clone(),
                shape: input.shape,
            });
        };
        if numel != input.data.len() {
            return Err(ConvertError::Size {
                name: s.name.clone(),
                expected: numel,
                got: input.data.len(),
            });
        }
        match &first_shape {
            Some(f) if *f != shape => {
                return Err(ConvertError::Inconsistent(format!(
                    "{} has shape {shape:?}, {} has {f:?}",
                    s.name, spec.inputs[0].name
                )));
            }
            Some(_) => {}
            None => first_shape = Some(shape.clone()),
        }
        out.push(Tensor {
            shape,
            data: input.data,
        });
    }
    // Checked here, per request: a bad value found by the engine would fail every request
    // batched with this one.
    spec.check_values(&out).map_err(ConvertError::Value)?;
    Ok(out)
}

/// Little-endian bytes of an FP32 tensor.
pub fn f32_bytes(t: &Tensor) -> Bytes {
    match &t.data {
        TensorData::F32(v) => {
            let mut b = Vec::with_capacity(v.len() * 4);
            for x in v {
                b.extend_from_slice(&x.to_le_bytes());
            }
            Bytes::from(b)
        }
        TensorData::I64(v) => {
            Bytes::from(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
        }
        TensorData::U8(v) => Bytes::from(v.clone()),
    }
}

/// Output tensors (metadata + raw contents), in spec order, filtered to
/// `requested` names when the client asked for specific outputs.
pub fn to_outputs(
    spec: &ModelSpec,
    outputs: &[Tensor],
    requested: &[String],
) -> (Vec<InferOutputTensor>, Vec<Bytes>) {
    let mut meta = Vec::new();
    let mut raw = Vec::new();
    for (s, t) in spec.outputs.iter().zip(outputs) {
        if !requested.is_empty() && !requested.contains(&s.name) {
            continue;
        }
        meta.push(InferOutputTensor {
            name: s.name.clone(),
            datatype: t.dtype().as_str().into(),
            shape: t.shape.iter().map(|d| *d as i64).collect(),
            ..Default::default()
        });
        raw.push(f32_bytes(t));
    }
    (meta, raw)
}

/// Builds an input tensor message (tests).
#[cfg(test)]
pub fn input_message(
    name: &str,
    datatype: &str,
    shape: &[i64],
) -> tandem_proto::inference::model_infer_request::InferInputTensor {
    tandem_proto::inference::model_infer_request::InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bert_spec() -> ModelSpec {
        ModelSpec::bert(384, 30522, 2, 512)
    }

    fn i64_raw(v: &[i64]) -> Bytes {
        Bytes::from(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    }

    #[test]
    fn raw_int64_inputs_decode_little_endian_and_missing_token_types_become_zeros() {
        let req = ModelInferRequest {
            inputs: vec![
                input_message("attention_mask", "INT64", &[1, 2]),
                input_message("input_ids", "INT64", &[1, 2]),
            ],
            raw_input_contents: vec![i64_raw(&[1, 1]), i64_raw(&[101, 102])],
            ..Default::default()
        };
        let t = engine_inputs(&bert_spec(), &req).unwrap();
        assert_eq!(t[0], Tensor::i64(vec![1, 2], vec![101, 102]));
        assert_eq!(t[1], Tensor::i64(vec![1, 2], vec![1, 1]));
        assert_eq!(t[2], Tensor::i64(vec![1, 2], vec![0, 0]));
    }

    #[test]
    fn typed_contents_are_accepted_too() {
        let mut ids = input_message("input_ids", "INT64", &[1, 1]);
        ids.contents = Some(InferTensorContents {
            int64_contents: vec![7],
            ..Default::default()
        });
        let mut mask = input_message("attention_mask", "INT64", &[1, 1]);
        mask.contents = Some(InferTensorContents {
            int64_contents: vec![1],
            ..Default::default()
        });
        let req = ModelInferRequest {
            inputs: vec![ids, mask],
            ..Default::default()
        };
        let t = engine_inputs(&bert_spec(), &req).unwrap();
        assert_eq!(t[0], Tensor::i64(vec![1, 1], vec![7]));
    }

    #[test]
    fn typed_values_in_another_datatypes_field_are_refused_naming_the_field() {
        let mut ids = input_message("input_ids", "INT64", &[1, 1]);
        ids.contents = Some(InferTensorContents {
            fp32_contents: vec![7.0],
            ..Default::default()
        });
        let req = ModelInferRequest {
            inputs: vec![ids],
            ..Default::default()
        };
        assert_eq!(
            engine_inputs(&bert_spec(), &req).unwrap_err().to_string(),
            "input \"input_ids\" is INT64, whose typed contents go in contents.int64_contents, \
             but it has contents.fp32_contents"
        );
        let mut pixels = input_message("input", "FP32", &[1, 1]);
        pixels.contents = Some(InferTensorContents {
            fp32_contents: vec![0.5],
            int64_contents: vec![1],
            ..Default::default()
        });
        let req = ModelInferRequest {
            inputs: vec![pixels],
            ..Default::default()
        };
        assert!(
            engine_inputs(&bert_spec(), &req)
                .unwrap_err()
                .to_string()
                .contains("but it has contents.int64_contents")
        );
    }

    #[test]
    fn a_typed_uint8_value_over_255_is_refused_by_value_not_as_a_disagreement() {
        let mut pixels = input_message("input", "UINT8", &[1, 2]);
        pixels.contents = Some(InferTensorContents {
            uint_contents: vec![7, 300],
            ..Default::default()
        });
        let req = ModelInferRequest {
            inputs: vec![pixels],
            ..Default::default()
        };
        assert_eq!(
            engine_inputs(&bert_spec(), &req).unwrap_err().to_string(),
            "input \"input\": 300 in uint_contents is not a UINT8 value (0 to 255)"
        );
    }

    #[test]
    fn a_wrong_datatype_names_the_input_and_the_expected_type() {
        let req = ModelInferRequest {
            inputs: vec![input_message("input_ids", "FP32", &[1, 1])],
            raw_input_contents: vec![Bytes::from(vec![0u8; 4])],
            ..Default::default()
        };
        let err = engine_inputs(&bert_spec(), &req).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input \"input_ids\" has datatype FP32, expected INT64"
        );
    }

    #[test]
    fn a_size_that_does_not_match_the_shape_is_refused() {
        let req = ModelInferRequest {
            inputs: vec![
                input_message("input_ids", "INT64", &[1, 3]),
                input_message("attention_mask", "INT64", &[1, 3]),
            ],
            raw_input_contents: vec![i64_raw(&[1, 2]), i64_raw(&[1, 1, 1])],
            ..Default::default()
        };
        assert!(matches!(
            engine_inputs(&bert_spec(), &req),
            Err(ConvertError::Size { .. })
        ));
    }

    #[test]
    fn inputs_with_different_shapes_are_inconsistent() {
        let req = ModelInferRequest {
            inputs: vec![
                input_message("input_ids", "INT64", &[1, 2]),
                input_message("attention_mask", "INT64", &[2, 1]),
            ],
            raw_input_contents: vec![i64_raw(&[1, 2]), i64_raw(&[1, 1])],
            ..Default::default()
        };
        assert!(matches!(
            engine_inputs(&bert_spec(), &req),
            Err(ConvertError::Inconsistent(_))
        ));
    }

    #[test]
    fn unknown_inputs_are_refused() {
        let req = ModelInferRequest {
            inputs: vec![input_message("pixels", "INT64", &[1, 1])],
            raw_input_contents: vec![i64_raw(&[1])],
            ..Default::default()
        };
        assert_eq!(
            engine_inputs(&bert_spec(), &req).unwrap_err(),
            ConvertError::UnknownInput("pixels".into())
        );
    }

    #[test]
    fn a_token_id_outside_the_vocabulary_is_refused_with_where_it_is() {
        let spec = bert_spec();
        let req = ModelInferRequest {
            inputs: vec![
                input_message("input_ids", "INT64", &[1, 3]),
                input_message("attention_mask", "INT64", &[1, 3]),
            ],
            raw_input_contents: vec![i64_raw(&[101, 999_999, 102]), i64_raw(&[1, 1, 1])],
            ..Default::default()
        };
        assert_eq!(
            engine_inputs(&spec, &req).unwrap_err().to_string(),
            "input_ids value 999999 at [0, 1] is outside the vocabulary (0..30522)"
        );
    }

    /// The error for one `input_ids` (and a matching mask) of `shape` with `raw` bytes each.
    fn refusal(shape: &[i64], ids: Bytes, mask: Bytes) -> String {
        let req = ModelInferRequest {
            inputs: vec![
                input_message("input_ids", "INT64", shape),
                input_message("attention_mask", "INT64", shape),
            ],
            raw_input_contents: vec![ids, mask],
            ..Default::default()
        };
        engine_inputs(&bert_spec(), &req).unwrap_err().to_string()
    }

    #[test]
    fn a_zero_dimension_is_refused_whatever_the_other_dimensions_say() {
        // [2^62, 0] holds no elements, so no byte count can contradict its 2^62 rows.
        for shape in [[1, 0], [0, 3], [1 << 62, 0]] {
            assert_eq!(
                refusal(&shape, Bytes::new(), Bytes::new()),
                format!(
                    "input \"input_ids\" has shape {shape:?}: every dimension must be at least 1"
                )
            );
        }
    }

    #[test]
    fn a_shape_whose_element_count_overflows_is_refused() {
        assert_eq!(
            refusal(&[1 << 32, 1 << 32], i64_raw(&[1]), i64_raw(&[1])),
            "input \"input_ids\" has shape [4294967296, 4294967296], more elements than any \
             request can carry"
        );
    }

    #[test]
    fn raw_contents_that_are_not_whole_elements_give_the_byte_count() {
        assert_eq!(
            refusal(&[1, 3], Bytes::from(vec![0u8; 25]), i64_raw(&[1, 1, 1])),
            "input \"input_ids\" has 25 bytes of raw contents, not a multiple of 8 (one INT64)"
        );
    }

    #[test]
    fn an_input_with_both_raw_and_typed_contents_is_refused() {
        let mut ids = input_message("input_ids", "INT64", &[1, 1]);
        ids.contents = Some(InferTensorContents {
            int64_contents: vec![7],
            ..Default::default()
        });
        let req = ModelInferRequest {
            inputs: vec![ids, input_message("attention_mask", "INT64", &[1, 1])],
            raw_input_contents: vec![i64_raw(&[1]), i64_raw(&[1])],
            ..Default::default()
        };
        assert_eq!(
            engine_inputs(&bert_spec(), &req).unwrap_err().to_string(),
            "input \"input_ids\" has typed contents beside raw_input_contents; send one form"
        );
    }

    #[test]
    fn an_input_sent_twice_is_refused() {
        let req = ModelInferRequest {
            inputs: vec![
                input_message("input_ids", "INT64", &[1, 1]),
                input_message("attention_mask", "INT64", &[1, 1]),
                input_message("input_ids", "INT64", &[1, 1]),
            ],
            raw_input_contents: vec![i64_raw(&[1]), i64_raw(&[1]), i64_raw(&[2])],
            ..Default::default()
        };
        assert_eq!(
            engine_inputs(&bert_spec(), &req).unwrap_err(),
            ConvertError::Duplicate("input_ids".into())
        );
    }

    #[test]
    fn a_datatype_no_engine_takes_is_answered_with_the_ones_this_input_takes() {
        let req = ModelInferRequest {
            inputs: vec![input_message("input_ids", "INT32", &[1, 1])],
            raw_input_contents: vec![Bytes::from(vec![0u8; 4])],
            ..Default::default()
        };
        assert_eq!(
            engine_inputs(&bert_spec(), &req).unwrap_err().to_string(),
            "input \"input_ids\" has datatype INT32, expected INT64"
        );
    }
}
