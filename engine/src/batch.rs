//! Joining requests into one batch and splitting the outputs back.
//!
//! Sequence models: each request is `[n_i, L_i]`; the batch is padded to the
//! longest `L` with zeros (id 0 = `[PAD]`, mask 0, type 0), so padding never
//! changes a result (the engine honours the mask). Fixed-shape models:
//! requests are concatenated along the batch dimension.

use crate::engine::EngineError;
use crate::spec::{InputKind, ModelSpec};
use crate::tensor::{Tensor, TensorData};

/// Joins requests (each a list of tensors in spec input order) into one batch.
/// Returns the batch inputs and the row count of each request.
pub fn join(
    spec: &ModelSpec,
    requests: &[&[Tensor]],
) -> Result<(Vec<Tensor>, Vec<usize>), EngineError> {
    let rows: Vec<usize> = requests
        .iter()
        .map(|r| r.first().map_or(0, Tensor::rows))
        .collect();
    let total: usize = rows.iter().sum();
    let mut out = Vec::with_capacity(spec.inputs.len());
    for (idx, input) in spec.inputs.iter().enumerate() {
        let parts: Vec<&Tensor> = requests
            .iter()
            .map(|r| {
                r.get(idx).ok_or_else(|| {
                    EngineError::InvalidInput(format!("missing input {}", input.name))
                })
            })
            .collect::<Result<_, _>>()?;
        let joined = match spec.kind {
            InputKind::Sequence => {
                let max_len = parts
                    .iter()
                    .map(|t| t.shape.get(1).copied().unwrap_or(0))
                    .max()
                    .unwrap_or(0);
                let mut data = Vec::with_capacity(total * max_len);
                for t in &parts {
                    let TensorData::I64(v) = &t.data else {
                        return Err(EngineError::InvalidInput(format!(
                            "{} must be INT64",
                            input.name
                        )));
                    };
                    let len = t.shape.get(1).copied().unwrap_or(0);
                    for row in v.chunks(len.max(1)).take(t.rows()) {
                        data.extend_from_slice(row);
                        data.resize(data.len() + (max_len - len), 0);
                    }
                }
                Tensor::i64(vec![total, max_len], data)
            }
            InputKind::Fixed => {
                let mut shape = parts.first().map(|t| t.shape.clone()).unwrap_or_default();
                if let Some(first) = shape.first_mut() {
                    *first = total;
                }
                let data = match parts.first().map(|t| t.dtype()) {
                    Some(crate::tensor::DataType::Uint8) => {
                        let mut v = Vec::new();
                        for t in &parts {
                            let TensorData::U8(d) = &t.data else {
                                return Err(EngineError::InvalidInput(
                                    "mixed datatypes in one batch".into(),
                                ));
                            };
                            v.extend_from_slice(d);
                        }
                        TensorData::U8(v)
                    }
                    _ => {
                        let mut v = Vec::new();
                        for t in &parts {
                            let TensorData::F32(d) = &t.data else {
                                return Err(EngineError::InvalidInput(
                                    "mixed datatypes in one batch".into(),
                                ));
                            };
                            v.extend_from_slice(d);
                        }
                        TensorData::F32(v)
                    }
                };
                Tensor { shape, data }
            }
        };
        out.push(joined);
    }
    Ok((out, rows))
}

/// Splits batch outputs (`[total, ...]` FP32 tensors) into one list per request.
pub fn split(outputs: Vec<Tensor>, rows: &[usize]) -> Vec<Vec<Tensor>> {
    let mut per_request: Vec<Vec<Tensor>> = rows
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for out in outputs {
        let width: usize = out.shape.iter().skip(1).product();
        let TensorData::F32(data) = out.data else {
            continue;
        };
        let mut offset = 0;
        for (dst, &r) in per_request.iter_mut().zip(rows) {
            let mut shape = out.shape.clone();
            if let Some(first) = shape.first_mut() {
                *first = r;
            }
            let end = (offset + r * width).min(data.len());
            dst.push(Tensor::f32(shape, data[offset..end].to_vec()));
            offset = end;
        }
    }
    per_request
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::TensorSpec;
    use crate::tensor::DataType;

    fn bert_spec() -> ModelSpec {
        ModelSpec {
            inputs: ["input_ids", "attention_mask"]
                .iter()
                .map(|n| TensorSpec::new(n, DataType::Int64, &[-1, -1]))
                .collect(),
            outputs: vec![TensorSpec::new("embedding", DataType::Fp32, &[-1, 2])],
            kind: InputKind::Sequence,
            also_accepts: vec![],
            value_ranges: vec![],
            max_sequence_len: None,
        }
    }

    #[test]
    fn sequences_of_different_lengths_are_padded_with_zeros_and_a_zero_mask() {
        let a = [
            Tensor::i64(vec![1, 2], vec![5, 6]),
            Tensor::i64(vec![1, 2], vec![1, 1]),
        ];
        let b = [
            Tensor::i64(vec![2, 3], vec![1, 2, 3, 4, 5, 6]),
            Tensor::i64(vec![2, 3], vec![1; 6]),
        ];
        let (batch, rows) = join(&bert_spec(), &[&a, &b]).unwrap();
        assert_eq!(rows, vec![1, 2]);
        assert_eq!(
            batch[0],
            Tensor::i64(vec![3, 3], vec![5, 6, 0, 1, 2, 3, 4, 5, 6])
        );
        assert_eq!(
            batch[1],
            Tensor::i64(vec![3, 3], vec![1, 1, 0, 1, 1, 1, 1, 1, 1])
        );
    }

    #[test]
    fn outputs_split_back_by_request_rows() {
        let out = Tensor::f32(vec![3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let parts = split(vec![out], &[1, 2]);
        assert_eq!(parts[0][0], Tensor::f32(vec![1, 2], vec![1.0, 2.0]));
        assert_eq!(
            parts[1][0],
            Tensor::f32(vec![2, 2], vec![3.0, 4.0, 5.0, 6.0])
        );
    }

    #[test]
    fn image_requests_concatenate_along_the_batch_dimension() {
        let spec = ModelSpec {
            inputs: vec![TensorSpec::new("input", DataType::Fp32, &[-1, 1, 1, 2])],
            outputs: vec![],
            kind: InputKind::Fixed,
            also_accepts: vec![],
            value_ranges: vec![],
            max_sequence_len: None,
        };
        let a = [Tensor::f32(vec![1, 1, 1, 2], vec![1.0, 2.0])];
        let b = [Tensor::f32(vec![1, 1, 1, 2], vec![3.0, 4.0])];
        let (batch, _) = join(&spec, &[&a, &b]).unwrap();
        assert_eq!(
            batch[0],
            Tensor::f32(vec![2, 1, 1, 2], vec![1.0, 2.0, 3.0, 4.0])
        );
    }
}
