//! OIP v2 request bodies for one BYTES input (`INPUT`, shape `[N]`): the
//! gRPC `ModelInferRequest` and the REST binary tensor extension body
//! (JSON header, then the raw tensor; `Inference-Header-Content-Length`).

use bytes::{BufMut, Bytes, BytesMut};
use tandem_proto::inference::ModelInferRequest;
use tandem_proto::inference::model_infer_request::InferInputTensor;

/// Name of the client input.
pub const INPUT: &str = "INPUT";

/// BYTES tensor contents: each element as a 4-byte little-endian length, then its bytes.
pub fn bytes_tensor(items: &[&[u8]]) -> Bytes {
    let mut out = BytesMut::with_capacity(items.iter().map(|i| i.len() + 4).sum());
    for item in items {
        out.put_u32_le(item.len() as u32);
        out.put_slice(item);
    }
    out.freeze()
}

/// The gRPC request for `items` (raw contents, no copy of the tensor bytes).
pub fn grpc_request(model: &str, tensor: Bytes, n: usize) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.to_owned(),
        inputs: vec![InferInputTensor {
            name: INPUT.into(),
            datatype: "BYTES".into(),
            shape: vec![n as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![tensor],
        ..Default::default()
    }
}

/// The REST binary-extension body for `tensor` and the JSON header's length.
pub fn rest_body(tensor: &[u8], n: usize) -> (Bytes, usize) {
    let header = serde_json::json!({
        "inputs": [{
            "name": INPUT, "datatype": "BYTES", "shape": [n],
            "parameters": {"binary_data_size": tensor.len()},
        }],
    })
    .to_string();
    let mut body = BytesMut::with_capacity(header.len() + tensor.len());
    body.put_slice(header.as_bytes());
    body.put_slice(tensor);
    (body.freeze(), header.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_elements_are_length_prefixed_little_endian() {
        let t = bytes_tensor(&[b"ab", b""]);
        assert_eq!(&t[..], &[2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0]);
    }

    #[test]
    fn the_rest_body_is_the_json_header_followed_by_the_tensor() {
        let t = bytes_tensor(&[b"hi"]);
        let (body, hl) = rest_body(&t, 1);
        let header: serde_json::Value = serde_json::from_slice(&body[..hl]).unwrap();
        assert_eq!(header["inputs"][0]["parameters"]["binary_data_size"], 6);
        assert_eq!(&body[hl..], &t[..]);
    }
}
