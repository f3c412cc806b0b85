//! Open Inference Protocol v2 tensor helpers shared by both roles.
//!
//! OIP v2 tensors travel either as typed `contents` or as `raw_*_contents`
//! (little-endian, row-major bytes). Tandem always sends raw contents and
//! accepts both. A BYTES tensor's raw form is each element as a 4-byte
//! little-endian length followed by that many bytes.
//!
//! Everything here is pure; the functions never panic on hostile input.

use bytes::{BufMut, Bytes, BytesMut};
use tandem_proto::inference::{InferTensorContents, ModelInferRequest};

/// Errors from reading or building tensors; messages name the problem for clients.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    /// The datatype string is not one OIP v2 defines.
    #[error("unknown datatype {0:?}")]
    UnknownDatatype(String),
    /// A dimension is negative or the element count overflows.
    #[error("invalid shape {0:?}")]
    InvalidShape(Vec<i64>),
    /// Raw contents do not have the size the shape and datatype require.
    #[error("input {name:?}: expected {expected} bytes for its shape and datatype, got {actual}")]
    SizeMismatch {
        /// Tensor name.
        name: String,
        /// Bytes the shape requires.
        expected: usize,
        /// Bytes received.
        actual: usize,
    },
    /// A BYTES element's length prefix runs past the end of the buffer.
    #[error("BYTES tensor is malformed: element {index} overruns the buffer")]
    BytesOverrun {
        /// Element index.
        index: usize,
    },
    /// A BYTES tensor holds a different number of elements than its shape says.
    #[error("BYTES tensor has {actual} elements, shape says {expected}")]
    BytesCount {
        /// Elements the shape requires.
        expected: usize,
        /// Elements found.
        actual: usize,
    },
    /// The request names no contents for an input.
    #[error("input {0:?} has no data (neither raw_input_contents nor contents)")]
    MissingContents(String),
    /// `raw_input_contents` is used but does not hold one entry per input.
    #[error("raw_input_contents must hold one entry per input ({expected}), got {got}")]
    RawCount {
        /// Inputs in the request.
        expected: usize,
        /// Raw buffers received.
        got: usize,
    },
    /// An input sent both as `raw_input_contents` and as typed `contents`.
    #[error("input {0:?} has typed contents beside raw_input_contents; send one form")]
    BothForms(String),
    /// Typed contents in a field other than the one for the input's datatype.
    #[error(
        "input {name:?} is {datatype}, whose typed contents go in contents.{expected}, but it has contents.{found}"
    )]
    WrongTypedField {
        /// Tensor name.
        name: String,
        /// The input's datatype.
        datatype: &'static str,
        /// The field for that datatype.
        expected: &'static str,
        /// The field the contents were in.
        found: &'static str,
    },
    /// Typed contents for a datatype that has no typed field (FP16).
    #[error(
        "input {name:?} is {datatype}, which has no typed contents field (send raw_input_contents), but it has contents.{found}"
    )]
    NoTypedField {
        /// Tensor name.
        name: String,
        /// The input's datatype.
        datatype: &'static str,
        /// The field the contents were in.
        found: &'static str,
    },
}

/// OIP v2 datatypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bytes,
}

impl DataType {
    /// Parses the protocol's datatype string ("FP32", "BYTES", ...).
    pub fn parse(s: &str) -> Result<Self, TensorError> {
        Ok(match s {
            "BOOL" => Self::Bool,
            "UINT8" => Self::Uint8,
            "UINT16" => Self::Uint16,
            "UINT32" => Self::Uint32,
            "UINT64" => Self::Uint64,
            "INT8" => Self::Int8,
            "INT16" => Self::Int16,
            "INT32" => Self::Int32,
            "INT64" => Self::Int64,
            "FP16" => Self::Fp16,
            "FP32" => Self::Fp32,
            "FP64" => Self::Fp64,
            "BYTES" => Self::Bytes,
            other => return Err(TensorError::UnknownDatatype(other.to_owned())),
        })
    }

    /// The protocol's datatype string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::Uint8 => "UINT8",
            Self::Uint16 => "UINT16",
            Self::Uint32 => "UINT32",
            Self::Uint64 => "UINT64",
            Self::Int8 => "INT8",
            Self::Int16 => "INT16",
            Self::Int32 => "INT32",
            Self::Int64 => "INT64",
            Self::Fp16 => "FP16",
            Self::Fp32 => "FP32",
            Self::Fp64 => "FP64",
            Self::Bytes => "BYTES",
        }
    }

    /// The indefinite article before the datatype's name as it is read: "an INT64", "an
    /// FP32", "a UINT8", "a BOOL".
    pub fn article(self) -> &'static str {
        match self {
            Self::Int8 | Self::Int16 | Self::Int32 | Self::Int64 => "an",
            Self::Fp16 | Self::Fp32 | Self::Fp64 => "an",
            _ => "a",
        }
    }

    /// Bytes per element; `None` for BYTES (variable length).
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            Self::Bool | Self::Uint8 | Self::Int8 => 1,
            Self::Uint16 | Self::Int16 | Self::Fp16 => 2,
            Self::Uint32 | Self::Int32 | Self::Fp32 => 4,
            Self::Uint64 | Self::Int64 | Self::Fp64 => 8,
            Self::Bytes => return None,
        })
    }
}

/// Number of elements in `shape`; rejects negative dimensions and overflow.
pub fn element_count(shape: &[i64]) -> Result<usize, TensorError> {
    shape.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d)
            .ok()
            .and_then(|d| acc.checked_mul(d))
            .ok_or_else(|| TensorError::InvalidShape(shape.to_vec()))
    })
}

/// Encodes elements in the BYTES raw form (4-byte LE length prefix each).
pub fn encode_bytes_elements<I, T>(items: I) -> Bytes
where
    I: IntoIterator<Item = T>,
    T: AsRef<[u8]>,
{
    let mut out = BytesMut::new();
    for item in items {
        let item = item.as_ref();
        // Elements over 4 GiB cannot be expressed in the protocol; truncating the
        // length would corrupt the stream, so they are clamped by construction:
        // callers never build such elements (requests are capped far below).
        let len = u32::try_from(item.len()).unwrap_or(u32::MAX);
        out.put_u32_le(len);
        out.put_slice(&item[..len as usize]);
    }
    out.freeze()
}

/// Splits a BYTES raw buffer into its elements without copying.
pub fn decode_bytes_elements(raw: &Bytes) -> Result<Vec<Bytes>, TensorError> {
    decode_bytes_elements_up_to(raw, usize::MAX)
}

/// As [`decode_bytes_elements`], but stops after `max + 1` elements: a caller expecting `max`
/// learns that there are more without splitting them all (each split element costs 32 bytes,
/// 6 times a 1-byte element's encoding).
pub fn decode_bytes_elements_up_to(raw: &Bytes, max: usize) -> Result<Vec<Bytes>, TensorError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < raw.len() && out.len() <= max {
        let index = out.len();
        let header = raw
            .get(pos..pos + 4)
            .ok_or(TensorError::BytesOverrun { index })?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let start = pos + 4;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= raw.len())
            .ok_or(TensorError::BytesOverrun { index })?;
        out.push(raw.slice(start..end));
        pos = end;
    }
    Ok(out)
}

/// Little-endian bytes of an `f32` slice.
pub fn f32_to_le_bytes(values: &[f32]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

/// Little-endian bytes of an `i64` slice.
pub fn i64_to_le_bytes(values: &[i64]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * 8);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

/// Reads little-endian `f32`s; `None` when the length is not a multiple of 4.
pub fn le_bytes_to_f32(raw: &[u8]) -> Option<Vec<f32>> {
    if !raw.len().is_multiple_of(4) {
        return None;
    }
    Some(
        raw.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// Reads little-endian `i64`s; `None` when the length is not a multiple of 8.
pub fn le_bytes_to_i64(raw: &[u8]) -> Option<Vec<i64>> {
    if !raw.len().is_multiple_of(8) {
        return None;
    }
    Some(
        raw.chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
    )
}

/// Checks how a request carries its inputs: either `raw_input_contents`, one entry per input
/// and no typed `contents` beside it, or typed `contents` alone.
pub fn check_input_forms(req: &ModelInferRequest) -> Result<(), TensorError> {
    let raw = &req.raw_input_contents;
    if raw.is_empty() {
        return Ok(());
    }
    if raw.len() != req.inputs.len() {
        return Err(TensorError::RawCount {
            expected: req.inputs.len(),
            got: raw.len(),
        });
    }
    match req.inputs.iter().find(|i| i.contents.is_some()) {
        Some(input) => Err(TensorError::BothForms(input.name.clone())),
        None => Ok(()),
    }
}

/// The raw bytes of input `index` of `req`: from `raw_input_contents` when the
/// request uses it (one entry per input, and no typed contents beside it), otherwise
/// re-encoded from the typed `contents`.
pub fn input_raw(req: &ModelInferRequest, index: usize) -> Result<Bytes, TensorError> {
    let input = req
        .inputs
        .get(index)
        .ok_or_else(|| TensorError::MissingContents(format!("#{index}")))?;
    check_input_forms(req)?;
    if let Some(raw) = req.raw_input_contents.get(index) {
        return Ok(raw.clone());
    }
    let contents = input
        .contents
        .as_ref()
        .ok_or_else(|| TensorError::MissingContents(input.name.clone()))?;
    check_typed_field(&input.name, &input.datatype, contents)?;
    Ok(contents_to_raw(contents))
}

/// The typed `contents` field that carries `datatype`'s elements, as the protocol assigns
/// them; `None` for FP16, which travels only as raw contents.
pub fn typed_field(datatype: DataType) -> Option<&'static str> {
    Some(match datatype {
        DataType::Bool => "bool_contents",
        DataType::Int8 | DataType::Int16 | DataType::Int32 => "int_contents",
        DataType::Int64 => "int64_contents",
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => "uint_contents",
        DataType::Uint64 => "uint64_contents",
        DataType::Fp32 => "fp32_contents",
        DataType::Fp64 => "fp64_contents",
        DataType::Bytes => "bytes_contents",
        DataType::Fp16 => return None,
    })
}

/// Checks that input `name`'s typed contents are all in the field for its datatype: a value
/// in another field would otherwise be reinterpreted (INT64 values read as BYTES length
/// prefixes) or dropped.
pub fn check_typed_field(
    name: &str,
    datatype: &str,
    c: &InferTensorContents,
) -> Result<(), TensorError> {
    let datatype = DataType::parse(datatype)?;
    let filled = [
        ("bool_contents", c.bool_contents.is_empty()),
        ("int_contents", c.int_contents.is_empty()),
        ("int64_contents", c.int64_contents.is_empty()),
        ("uint_contents", c.uint_contents.is_empty()),
        ("uint64_contents", c.uint64_contents.is_empty()),
        ("fp32_contents", c.fp32_contents.is_empty()),
        ("fp64_contents", c.fp64_contents.is_empty()),
        ("bytes_contents", c.bytes_contents.is_empty()),
    ];
    let expected = typed_field(datatype);
    let Some((found, _)) = filled
        .into_iter()
        .find(|(field, empty)| !empty && Some(*field) != expected)
    else {
        return Ok(());
    };
    Err(match expected {
        Some(expected) => TensorError::WrongTypedField {
            name: name.to_owned(),
            datatype: datatype.as_str(),
            expected,
            found,
        },
        None => TensorError::NoTypedField {
            name: name.to_owned(),
            datatype: datatype.as_str(),
            found,
        },
    })
}

/// Converts typed contents to their raw little-endian form (every field, in the order of the
/// message: callers reading a client's input check [`check_typed_field`] first).
pub fn contents_to_raw(c: &InferTensorContents) -> Bytes {
    if !c.bytes_contents.is_empty() {
        return encode_bytes_elements(c.bytes_contents.iter());
    }
    let mut out = Vec::new();
    out.extend(c.bool_contents.iter().map(|&b| u8::from(b)));
    c.int_contents
        .iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    c.int64_contents
        .iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    c.uint_contents
        .iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    c.uint64_contents
        .iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    c.fp32_contents
        .iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    c.fp64_contents
        .iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    Bytes::from(out)
}

/// Checks that fixed-size raw contents match their shape and datatype.
pub fn check_raw_size(
    name: &str,
    datatype: DataType,
    shape: &[i64],
    raw: &[u8],
) -> Result<(), TensorError> {
    let Some(size) = datatype.element_size() else {
        return Ok(());
    };
    let expected = element_count(shape)?
        .checked_mul(size)
        .ok_or_else(|| TensorError::InvalidShape(shape.to_vec()))?;
    if expected != raw.len() {
        return Err(TensorError::SizeMismatch {
            name: name.to_owned(),
            expected,
            actual: raw.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::inference::model_infer_request::InferInputTensor;

    fn bytes_input(name: &str, contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            contents,
            ..Default::default()
        }
    }

    #[test]
    fn raw_contents_must_be_one_per_input_and_alone() {
        let raw = encode_bytes_elements(["a"]);
        let mut req = ModelInferRequest {
            inputs: vec![bytes_input("TEXT", None)],
            raw_input_contents: vec![raw.clone()],
            ..Default::default()
        };
        assert_eq!(input_raw(&req, 0), Ok(raw.clone()));
        req.raw_input_contents.push(raw.clone());
        assert_eq!(
            input_raw(&req, 0).unwrap_err().to_string(),
            "raw_input_contents must hold one entry per input (1), got 2"
        );
        req.raw_input_contents.pop();
        let typed = InferTensorContents {
            bytes_contents: vec![Bytes::from_static(b"b")],
            ..Default::default()
        };
        req.inputs[0] = bytes_input("TEXT", Some(typed.clone()));
        assert_eq!(
            input_raw(&req, 0),
            Err(TensorError::BothForms("TEXT".into()))
        );
        req.raw_input_contents.clear();
        assert_eq!(input_raw(&req, 0), Ok(encode_bytes_elements(["b"])));
    }

    #[test]
    fn typed_contents_in_a_field_other_than_the_datatypes_are_refused_naming_both() {
        let int64s = InferTensorContents {
            // A length prefix of 4 then "abcd": read as BYTES, a well-formed element.
            int64_contents: vec![4, 0x6463_6261],
            ..Default::default()
        };
        let req = ModelInferRequest {
            inputs: vec![bytes_input("TEXT", Some(int64s.clone()))],
            ..Default::default()
        };
        assert_eq!(
            input_raw(&req, 0).unwrap_err().to_string(),
            "input \"TEXT\" is BYTES, whose typed contents go in contents.bytes_contents, \
             but it has contents.int64_contents"
        );
        let bytes = InferTensorContents {
            bytes_contents: vec![Bytes::from_static(b"a")],
            ..Default::default()
        };
        assert_eq!(
            check_typed_field("x", "FP32", &bytes)
                .unwrap_err()
                .to_string(),
            "input \"x\" is FP32, whose typed contents go in contents.fp32_contents, \
             but it has contents.bytes_contents"
        );
        let fp32s = InferTensorContents {
            fp32_contents: vec![1.0],
            ..Default::default()
        };
        assert!(check_typed_field("x", "FP32", &fp32s).is_ok());
        assert!(check_typed_field("x", "INT64", &int64s).is_ok());
        assert_eq!(
            check_typed_field("x", "FP16", &fp32s)
                .unwrap_err()
                .to_string(),
            "input \"x\" is FP16, which has no typed contents field (send raw_input_contents), \
             but it has contents.fp32_contents"
        );
        let small = InferTensorContents {
            int_contents: vec![-1],
            ..Default::default()
        };
        assert!(check_typed_field("x", "INT8", &small).is_ok());
        assert!(check_typed_field("x", "UINT8", &small).is_err());
    }

    #[test]
    fn splitting_up_to_a_count_stops_one_element_past_it() {
        let raw = encode_bytes_elements(["a", "b", "c", "d"]);
        assert_eq!(decode_bytes_elements_up_to(&raw, 1).unwrap().len(), 2);
        assert_eq!(decode_bytes_elements_up_to(&raw, 4).unwrap().len(), 4);
    }

    #[test]
    fn bytes_elements_round_trip_including_empty_ones() {
        let raw = encode_bytes_elements([&b"abc"[..], b"", b"\xff\x00"]);
        assert_eq!(&raw[..4], &3u32.to_le_bytes());
        let back = decode_bytes_elements(&raw).unwrap();
        assert_eq!(
            back,
            vec![
                Bytes::from_static(b"abc"),
                Bytes::new(),
                Bytes::from_static(b"\xff\x00")
            ]
        );
    }

    #[test]
    fn a_length_prefix_past_the_end_is_an_error_not_a_panic() {
        let mut raw = 10u32.to_le_bytes().to_vec();
        raw.extend_from_slice(b"abc");
        assert_eq!(
            decode_bytes_elements(&Bytes::from(raw)),
            Err(TensorError::BytesOverrun { index: 0 })
        );
        assert_eq!(
            decode_bytes_elements(&Bytes::from_static(b"\x01\x00")),
            Err(TensorError::BytesOverrun { index: 0 })
        );
        let huge = u32::MAX.to_le_bytes().to_vec();
        assert!(decode_bytes_elements(&Bytes::from(huge)).is_err());
    }

    #[test]
    fn element_count_rejects_negative_and_overflowing_shapes() {
        assert_eq!(element_count(&[2, 3]), Ok(6));
        assert_eq!(element_count(&[]), Ok(1));
        assert!(element_count(&[-1, 3]).is_err());
        assert!(element_count(&[i64::MAX, i64::MAX]).is_err());
    }

    #[test]
    fn raw_size_must_match_shape_and_datatype() {
        assert!(check_raw_size("x", DataType::Fp32, &[2, 2], &[0; 16]).is_ok());
        assert_eq!(
            check_raw_size("x", DataType::Fp32, &[2, 2], &[0; 15]),
            Err(TensorError::SizeMismatch {
                name: "x".into(),
                expected: 16,
                actual: 15
            })
        );
    }

    #[test]
    fn le_round_trips_for_f32_and_i64() {
        assert_eq!(
            le_bytes_to_f32(&f32_to_le_bytes(&[1.5, -2.0])).unwrap(),
            vec![1.5, -2.0]
        );
        assert_eq!(
            le_bytes_to_i64(&i64_to_le_bytes(&[7, -1])).unwrap(),
            vec![7, -1]
        );
        assert!(le_bytes_to_f32(&[0; 3]).is_none());
    }

    #[test]
    fn datatype_strings_round_trip() {
        for s in ["BOOL", "UINT8", "INT64", "FP32", "BYTES", "FP16"] {
            assert_eq!(DataType::parse(s).unwrap().as_str(), s);
        }
        assert!(DataType::parse("STRING").is_err());
    }
}
