//! What a model advertises over OIP v2 `ModelMetadata`: input and output
//! names, datatypes and shapes (`-1` for variable dimensions).

use crate::tensor::{DataType, Tensor, TensorData};

/// One input or output of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name on the wire (`input_ids`, `embedding`, `input`, `logits`...).
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Dimensions including the batch dimension; `-1` = variable.
    pub dims: Vec<i64>,
}

impl TensorSpec {
    /// A spec from its parts.
    pub fn new(name: &str, datatype: DataType, dims: &[i64]) -> Self {
        Self {
            name: name.to_owned(),
            datatype,
            dims: dims.to_vec(),
        }
    }

    /// Whether a concrete shape fits these dims (same rank, fixed dims equal).
    pub fn accepts_shape(&self, shape: &[usize]) -> bool {
        shape.len() == self.dims.len()
            && self
                .dims
                .iter()
                .zip(shape)
                .all(|(&d, &s)| d < 0 || d as usize == s)
    }
}

/// The kind of batching a model needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// `[N, L]` token sequences: requests of different `L` are padded together.
    Sequence,
    /// Fixed-shape rows (images): requests are concatenated along `N`.
    Fixed,
}

/// A model's OIP v2 signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// Inputs, in the order engines receive them.
    pub inputs: Vec<TensorSpec>,
    /// Outputs, in the order engines produce them.
    pub outputs: Vec<TensorSpec>,
    /// How requests are joined into a batch.
    pub kind: InputKind,
    /// Data types accepted for each input besides the advertised one (e.g. an
    /// FP32 image model that also takes UINT8 and normalizes on the engine).
    pub also_accepts: Vec<(String, DataType)>,
    /// Integer inputs whose values must lie in a range, such as token ids in the vocabulary.
    pub value_ranges: Vec<ValueRange>,
    /// The longest sequence a sequence model takes (its position embeddings).
    pub max_sequence_len: Option<usize>,
}

/// The values an INT64 input may hold: `0..end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueRange {
    /// Input name.
    pub input: String,
    /// One past the largest value allowed.
    pub end: i64,
    /// What the range is, for the error message (`the vocabulary`).
    pub meaning: &'static str,
}

impl ModelSpec {
    /// A BERT sentence encoder's signature: `input_ids`, `attention_mask` and
    /// `token_type_ids`, INT64 `[-1, -1]`, in; `embedding`, FP32 `[-1, hidden]`, out. Token
    /// ids must lie in `0..vocab`, token types in `0..types`, mask values are 0 or 1, and
    /// sequences hold at most `max_len` tokens.
    pub fn bert(hidden: usize, vocab: usize, types: usize, max_len: usize) -> Self {
        let end = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        ModelSpec {
            inputs: ["input_ids", "attention_mask", "token_type_ids"]
                .iter()
                .map(|n| TensorSpec::new(n, DataType::Int64, &[-1, -1]))
                .collect(),
            outputs: vec![TensorSpec::new(
                "embedding",
                DataType::Fp32,
                &[-1, end(hidden)],
            )],
            kind: InputKind::Sequence,
            also_accepts: vec![],
            value_ranges: vec![
                ValueRange {
                    input: "input_ids".into(),
                    end: end(vocab),
                    meaning: "the vocabulary",
                },
                ValueRange {
                    input: "token_type_ids".into(),
                    end: end(types),
                    meaning: "the token types",
                },
                // The engines keep a token where its mask is not 0; refusing other values
                // keeps a request from meaning something else here than in the reference.
                ValueRange {
                    input: "attention_mask".into(),
                    end: 2,
                    meaning: "the mask values",
                },
            ],
            max_sequence_len: Some(max_len),
        }
    }

    /// The spec of the input called `name`.
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|s| s.name == name)
    }

    /// Whether `dtype` is acceptable for input `name`.
    pub fn accepts_dtype(&self, name: &str, dtype: DataType) -> bool {
        self.input(name).is_some_and(|s| s.datatype == dtype)
            || self
                .also_accepts
                .iter()
                .any(|(n, d)| n == name && *d == dtype)
    }

    /// Checks one request's values (`inputs` in spec order, shapes and datatypes already
    /// checked): sequence length and value ranges. Callers check each request before it is
    /// batched, so one request's bad values fail that request alone rather than the batch it
    /// would have joined.
    pub fn check_values(&self, inputs: &[Tensor]) -> Result<(), String> {
        if let (Some(max), Some(first)) = (self.max_sequence_len, inputs.first())
            && let Some(&len) = first.shape.get(1)
            && len > max
        {
            return Err(format!(
                "sequence length {len} exceeds the model's maximum of {max}"
            ));
        }
        for range in &self.value_ranges {
            let Some((spec, t)) = self
                .inputs
                .iter()
                .zip(inputs)
                .find(|(s, _)| s.name == range.input)
            else {
                continue;
            };
            let TensorData::I64(values) = &t.data else {
                continue;
            };
            if let Some((at, v)) = values
                .iter()
                .enumerate()
                .find(|(_, v)| !(0..range.end).contains(*v))
            {
                let row_len = t.shape.get(1).copied().unwrap_or(1).max(1);
                return Err(format!(
                    "{} value {v} at [{}, {}] is outside {} (0..{})",
                    spec.name,
                    at / row_len,
                    at % row_len,
                    range.meaning,
                    range.end
                ));
            }
        }
        for (spec, t) in self.inputs.iter().zip(inputs) {
            let TensorData::F32(values) = &t.data else {
                continue;
            };
            // NaN or infinity (JSON's 1e39 overflows to it) runs through every layer and comes
            // back as `null` outputs: refused, naming the first one, rather than answered.
            if let Some((at, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(format!(
                    "input {:?}: element {at} is {v}; inputs must be finite numbers",
                    spec.name
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(ids: &[i64], types: &[i64]) -> Vec<Tensor> {
        let shape = vec![1, ids.len()];
        vec![
            Tensor::i64(shape.clone(), ids.to_vec()),
            Tensor::i64(shape.clone(), vec![1; ids.len()]),
            Tensor::i64(shape, types.to_vec()),
        ]
    }

    #[test]
    fn values_are_checked_against_the_vocabulary_the_token_types_the_mask_and_the_longest_sequence()
    {
        let spec = ModelSpec::bert(4, 100, 2, 8);
        assert_eq!(spec.check_values(&request(&[0, 99, 5], &[0, 1, 0])), Ok(()));
        assert_eq!(
            spec.check_values(&request(&[0, 100, 5], &[0, 0, 0])),
            Err("input_ids value 100 at [0, 1] is outside the vocabulary (0..100)".into())
        );
        assert_eq!(
            spec.check_values(&request(&[-1, 1, 5], &[0, 0, 0])),
            Err("input_ids value -1 at [0, 0] is outside the vocabulary (0..100)".into())
        );
        assert_eq!(
            spec.check_values(&request(&[1, 1, 5], &[0, 0, 2])),
            Err("token_type_ids value 2 at [0, 2] is outside the token types (0..2)".into())
        );
        let mut two_in_mask = request(&[1, 1, 5], &[0, 0, 0]);
        two_in_mask[1] = Tensor::i64(vec![1, 3], vec![1, 2, 1]);
        assert_eq!(
            spec.check_values(&two_in_mask),
            Err("attention_mask value 2 at [0, 1] is outside the mask values (0..2)".into())
        );
        assert_eq!(
            spec.check_values(&request(&[1; 9], &[0; 9])),
            Err("sequence length 9 exceeds the model's maximum of 8".into())
        );
    }

    #[test]
    fn a_nan_or_infinite_float_input_is_refused_naming_the_element() {
        let spec = ModelSpec {
            inputs: vec![TensorSpec::new("input", DataType::Fp32, &[-1, 3])],
            outputs: vec![TensorSpec::new("logits", DataType::Fp32, &[-1, 2])],
            kind: InputKind::Fixed,
            also_accepts: vec![],
            value_ranges: vec![],
            max_sequence_len: None,
        };
        let with = |v: f32| vec![Tensor::f32(vec![2, 3], vec![0.0, 1.0, -2.5, 3.0, v, 0.5])];
        assert_eq!(spec.check_values(&with(4.0)), Ok(()));
        assert_eq!(
            spec.check_values(&with(f32::NAN)),
            Err("input \"input\": element 4 is NaN; inputs must be finite numbers".into())
        );
        assert_eq!(
            spec.check_values(&with(f32::INFINITY)),
            Err("input \"input\": element 4 is inf; inputs must be finite numbers".into())
        );
    }

    #[test]
    fn variable_dims_accept_any_size_but_fixed_dims_must_match() {
        let spec = TensorSpec::new("input", DataType::Fp32, &[-1, 3, 224, 224]);
        assert!(spec.accepts_shape(&[7, 3, 224, 224]));
        assert!(!spec.accepts_shape(&[7, 3, 224, 225]));
        assert!(!spec.accepts_shape(&[3, 224, 224]));
    }
}
