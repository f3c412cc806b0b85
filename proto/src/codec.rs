//! The gRPC codec of the generated services: prost's, except that a `ModelInferRequest` is
//! checked for what it would cost to decode before prost decodes it.
//!
//! Why: prost allocates a struct for every entry of a repeated message or bytes field, so a
//! message of empty entries costs far more in memory than on the wire. An `inputs` entry is 2
//! bytes on the wire and about 300 bytes decoded: a 9.5 MiB request of empty inputs took a
//! preprocess worker to 1.5 GB, and the transport limit (twice `maxRequestBytes`, 130 MiB by
//! default; 256 MiB on inference workers) would have let through one that no pod survives.
//! [`decode_overhead`] walks the wire format (no allocation) and adds up what decoding would
//! allocate beyond the message's own bytes; over [`MAX_DECODE_OVERHEAD`] the request is
//! refused with `INVALID_ARGUMENT` before prost sees it. Payload bytes are not counted: they
//! are shared with the receive buffer (`bytes::Bytes`) or copied once, within the transport
//! limit.

use std::any::TypeId;

use bytes::Buf as _;
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::inference::ModelInferRequest;

/// The most a request may cost to decode beyond its own bytes.
pub const MAX_DECODE_OVERHEAD: u64 = 64 << 20;

/// Approximate heap and struct bytes prost spends per entry (measured on x86-64: 5 million
/// empty entries of each kind took 1.5 GB, 366 MB and 175 MB).
const PER_INPUT: u64 = 320;
const PER_OUTPUT: u64 = 80;
const PER_BYTES: u64 = 32;
const PER_PARAMETER: u64 = 128;

/// [`ProstCodec`] with [`decode_overhead`] checked for `ModelInferRequest`.
#[derive(Debug)]
pub struct BoundedCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(self.0.decoder())
    }
}

/// [`ProstDecoder`] that refuses a `ModelInferRequest` too costly to decode.
#[derive(Debug)]
pub struct BoundedDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default + 'static> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // The receive buffer holds the whole message, so `chunk` is all of it.
        check_decode_cost::<U>(buf.chunk())?;
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Refuses a `ModelInferRequest` (`msg`, in wire format) whose [`decode_overhead`] is over
/// [`MAX_DECODE_OVERHEAD`]; other message types pass.
pub fn check_decode_cost<U: 'static>(msg: &[u8]) -> Result<(), Status> {
    if TypeId::of::<U>() != TypeId::of::<ModelInferRequest>() {
        return Ok(());
    }
    let cost = decode_overhead(msg);
    if cost.bytes > MAX_DECODE_OVERHEAD {
        return Err(Status::invalid_argument(format!(
            "the request would take about {} MiB to decode beyond its own size ({cost}), more \
             than the {} MiB allowed",
            cost.bytes >> 20,
            MAX_DECODE_OVERHEAD >> 20
        )));
    }
    Ok(())
}

/// What decoding a `ModelInferRequest` would allocate beyond its bytes, and what it holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeCost {
    /// Estimated bytes.
    pub bytes: u64,
    /// `inputs` entries.
    pub inputs: u64,
    /// `outputs` entries.
    pub outputs: u64,
    /// `raw_input_contents` entries and `bytes_contents` elements.
    pub byte_strings: u64,
    /// Parameter map entries, at every level.
    pub parameters: u64,
    /// Shape dimensions and typed numeric values.
    pub numbers: u64,
}

impl std::fmt::Display for DecodeCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} inputs, {} outputs, {} byte strings, {} parameters, {} numbers",
            self.inputs, self.outputs, self.byte_strings, self.parameters, self.numbers
        )
    }
}

impl DecodeCost {
    fn entry(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// `count` numbers of `size` bytes each that took `wire` bytes on the wire.
    fn numbers(&mut self, count: u64, size: u64, wire: u64) {
        self.numbers = self.numbers.saturating_add(count);
        self.entry(count.saturating_mul(size).saturating_sub(wire));
    }

    fn parameter(&mut self) {
        self.parameters += 1;
        self.entry(PER_PARAMETER);
    }
}

/// Walks a `ModelInferRequest` in wire format and estimates what prost would allocate to decode
/// it beyond the message's own bytes. Malformed data ends the walk (prost refuses it anyway).
pub fn decode_overhead(msg: &[u8]) -> DecodeCost {
    let mut cost = DecodeCost::default();
    for (field, value) in Fields(msg) {
        match (field, value) {
            (4, _) => cost.parameter(),
            (5, Value::Len(input)) => {
                cost.inputs += 1;
                cost.entry(PER_INPUT);
                input_overhead(input, &mut cost);
            }
            (6, Value::Len(output)) => {
                cost.outputs += 1;
                cost.entry(PER_OUTPUT);
                for (field, _) in Fields(output) {
                    if field == 2 {
                        cost.parameter();
                    }
                }
            }
            (7, _) => {
                cost.byte_strings += 1;
                cost.entry(PER_BYTES);
            }
            _ => {}
        }
    }
    cost
}

/// An `InferInputTensor`: shape (3), parameters (4), contents (5).
fn input_overhead(input: &[u8], cost: &mut DecodeCost) {
    for (field, value) in Fields(input) {
        match (field, value) {
            (3, Value::Len(packed)) => cost.numbers(varints(packed), 8, packed.len() as u64),
            (3, _) => cost.numbers(1, 8, 2),
            (4, _) => cost.parameter(),
            (5, Value::Len(contents)) => contents_overhead(contents, cost),
            _ => {}
        }
    }
}

/// An `InferTensorContents`: bool (1), int32 (2), int64 (3), uint32 (4), uint64 (5) as
/// varints, fp32 (6) and fp64 (7) fixed-size, bytes (8).
fn contents_overhead(contents: &[u8], cost: &mut DecodeCost) {
    for (field, value) in Fields(contents) {
        let size = match field {
            1 => 1,
            2 | 4 | 6 => 4,
            3 | 5 | 7 => 8,
            8 => {
                cost.byte_strings += 1;
                cost.entry(PER_BYTES);
                continue;
            }
            _ => continue,
        };
        match value {
            // Packed varints; packed fixed-size values decode to their own size.
            Value::Len(packed) if matches!(field, 1..=5) => {
                cost.numbers(varints(packed), size, packed.len() as u64)
            }
            Value::Len(packed) => {
                cost.numbers(packed.len() as u64 / size, size, packed.len() as u64)
            }
            _ => cost.numbers(1, size, 2),
        }
    }
}

/// How many varints a packed field holds: one per byte without the continuation bit.
fn varints(packed: &[u8]) -> u64 {
    packed.iter().filter(|&&b| b & 0x80 == 0).count() as u64
}

/// A field's value in wire format.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Varint,
    Fixed,
    Len(&'a [u8]),
}

/// The fields of a message in wire format, until its end or the first malformed one.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = (u64, Value<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let key = read_varint(&mut self.0)?;
        let value = match key & 7 {
            0 => read_varint(&mut self.0).map(|_| Value::Varint),
            1 => self.take(8).map(|_| Value::Fixed),
            2 => {
                let len = usize::try_from(read_varint(&mut self.0)?).ok()?;
                self.take(len).map(Value::Len)
            }
            5 => self.take(4).map(|_| Value::Fixed),
            _ => None,
        };
        if value.is_none() {
            self.0 = &[];
        }
        Some((key >> 3, value?))
    }
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
}

fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::InferTensorContents;
    use crate::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};

    fn input(name: &str, shape: Vec<i64>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: "INT64".into(),
            shape,
            ..Default::default()
        }
    }

    #[test]
    fn an_ordinary_request_costs_next_to_nothing_beyond_its_bytes() {
        let req = ModelInferRequest {
            model_name: "minilm".into(),
            inputs: vec![
                input("input_ids", vec![8, 128]),
                input("attention_mask", vec![8, 128]),
            ],
            outputs: vec![InferRequestedOutputTensor {
                name: "embedding".into(),
                ..Default::default()
            }],
            raw_input_contents: vec![vec![0u8; 8192].into(), vec![0u8; 8192].into()],
            ..Default::default()
        };
        let cost = decode_overhead(&req.encode_to_vec());
        assert_eq!(
            (cost.inputs, cost.outputs, cost.byte_strings, cost.numbers),
            (2, 1, 2, 4)
        );
        assert!(cost.bytes < 1024, "{cost:?}");
    }

    #[test]
    fn every_kind_of_entry_is_counted_and_typed_numbers_by_their_decoded_size() {
        let mut typed = input("x", vec![2]);
        typed.contents = Some(InferTensorContents {
            int64_contents: vec![1, 300],
            fp32_contents: vec![0.5; 3],
            bytes_contents: vec![vec![1u8].into(); 5],
            ..Default::default()
        });
        let mut params = std::collections::HashMap::new();
        params.insert("a".to_owned(), Default::default());
        typed.parameters = params.clone();
        let req = ModelInferRequest {
            inputs: vec![typed],
            outputs: vec![InferRequestedOutputTensor {
                name: "y".into(),
                parameters: params.clone(),
            }],
            parameters: params,
            ..Default::default()
        };
        let cost = decode_overhead(&req.encode_to_vec());
        assert_eq!(
            cost,
            DecodeCost {
                // Shape [2] is 1 byte packed, 8 decoded; int64 [1, 300] 3 bytes packed, 16
                // decoded; fp32 12 bytes either way.
                bytes: PER_INPUT
                    + PER_OUTPUT
                    + 3 * PER_PARAMETER
                    + 5 * PER_BYTES
                    + (8 - 1)
                    + (16 - 3),
                inputs: 1,
                outputs: 1,
                byte_strings: 5,
                parameters: 3,
                numbers: 1 + 2 + 3,
            }
        );
    }

    #[test]
    fn a_request_of_empty_entries_costs_what_prost_would_allocate() {
        // 1000 empty inputs: 2 bytes each on the wire, about 300 decoded.
        let wire = b"\x2a\x00".repeat(1000);
        let cost = decode_overhead(&wire);
        assert_eq!(cost.inputs, 1000);
        assert_eq!(cost.bytes, 1000 * PER_INPUT);
        // A shape of a million one-byte dimensions: 8 MB decoded.
        let mut shape = vec![0x1a];
        prost::encoding::encode_varint(1_000_000, &mut shape);
        shape.extend(std::iter::repeat_n(1u8, 1_000_000));
        let mut wire = vec![0x2a];
        prost::encoding::encode_varint(shape.len() as u64, &mut wire);
        wire.extend(shape);
        assert_eq!(decode_overhead(&wire).bytes, PER_INPUT + 7_000_000);
    }

    #[test]
    fn malformed_data_ends_the_walk_without_panicking() {
        for wire in [
            &b"\x2a\xff\xff"[..],
            b"\x2a\x05\x00",
            b"\xff",
            b"\x2b",
            b"\x2a",
        ] {
            let cost = decode_overhead(wire);
            assert!(cost.bytes <= PER_INPUT, "{wire:?}: {cost:?}");
        }
    }

    #[test]
    fn an_over_costly_infer_request_is_refused_and_other_messages_pass() {
        let entries = MAX_DECODE_OVERHEAD / PER_INPUT + 1;
        let wire = b"\x2a\x00".repeat(entries as usize);
        let err = check_decode_cost::<ModelInferRequest>(&wire).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains(&format!("{entries} inputs")),
            "{}",
            err.message()
        );
        assert!(check_decode_cost::<ModelInferRequest>(&wire[2..]).is_ok());
        assert!(check_decode_cost::<crate::inference::ModelInferResponse>(&wire).is_ok());
    }
}
