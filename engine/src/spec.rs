//! What a model advertises over OIP v2 `ModelMetadata`: input and output
//! names, datatypes and shapes (`-1` for variable dimensions).

use crate::tensor::DataType;

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
}

impl ModelSpec {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_dims_accept_any_size_but_fixed_dims_must_match() {
        let spec = TensorSpec::new("input", DataType::Fp32, &[-1, 3, 224, 224]);
        assert!(spec.accepts_shape(&[7, 3, 224, 224]));
        assert!(!spec.accepts_shape(&[7, 3, 224, 225]));
        assert!(!spec.accepts_shape(&[3, 224, 224]));
    }
}
