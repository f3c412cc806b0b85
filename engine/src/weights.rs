//! safetensors → named FP32 tensors, taken one by one with the shape the
//! architecture expects, so a missing or mis-shaped tensor is a clear error.

use std::collections::HashMap;

use safetensors::{Dtype, SafeTensors};

/// Why weights could not be read or did not fit the architecture.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file is not a valid safetensors file.
    #[error("model.safetensors is not a valid safetensors file: {0}")]
    Format(#[source] safetensors::SafeTensorError),
    /// A tensor the architecture needs is absent.
    #[error("missing tensor `{0}` in model.safetensors")]
    Missing(String),
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Shape the architecture needs.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a type other than F32.
    #[error("tensor `{name}` is {dtype}, expected F32")]
    Dtype {
        /// Tensor name.
        name: String,
        /// The stored type.
        dtype: String,
    },
}

struct Entry {
    shape: Vec<usize>,
    dtype: Dtype,
    data: Vec<f32>,
}

/// All tensors of a safetensors file, decoded to f32 where stored as F32.
pub struct Weights {
    entries: HashMap<String, Entry>,
    prefix: String,
}

impl Weights {
    /// Parses a safetensors buffer.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WeightsError> {
        let st = SafeTensors::deserialize(bytes).map_err(WeightsError::Format)?;
        let mut entries = HashMap::new();
        for (name, view) in st.tensors() {
            let data = if view.dtype() == Dtype::F32 {
                view.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            } else {
                Vec::new()
            };
            entries.insert(
                name,
                Entry {
                    shape: view.shape().to_vec(),
                    dtype: view.dtype(),
                    data,
                },
            );
        }
        Ok(Self {
            entries,
            prefix: String::new(),
        })
    }

    /// Looks names up under `prefix` when present in the file (e.g. `bert.`
    /// for checkpoints saved from `BertForMaskedLM`).
    pub fn with_prefix_if_present(mut self, prefix: &str, probe: &str) -> Self {
        if !self.entries.contains_key(probe)
            && self.entries.contains_key(&format!("{prefix}{probe}"))
        {
            self.prefix = prefix.to_owned();
        }
        self
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(&format!("{}{name}", self.prefix))
    }

    /// Removes and returns tensor `name`, checking it has exactly `shape`.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightsError> {
        let key = format!("{}{name}", self.prefix);
        let entry = self
            .entries
            .get(&key)
            .ok_or_else(|| WeightsError::Missing(name.to_owned()))?;
        if entry.dtype != Dtype::F32 {
            return Err(WeightsError::Dtype {
                name: name.to_owned(),
                dtype: format!("{:?}", entry.dtype),
            });
        }
        if entry.shape != shape {
            return Err(WeightsError::Shape {
                name: name.to_owned(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        Ok(self
            .entries
            .remove(&key)
            .map(|e| e.data)
            .unwrap_or_default())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Serializes `(name, shape, data)` triples as a safetensors buffer.
    pub(crate) fn safetensors_bytes(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, shape, data) in tensors {
            let n = data.len() * 4;
            header.insert(
                (*name).to_owned(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}),
            );
            offset += n;
        }
        let mut h = serde_json::to_vec(&header).unwrap();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        for (_, _, data) in tensors {
            for v in data {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    #[test]
    fn taking_a_present_tensor_with_the_right_shape_returns_its_values() {
        let bytes = safetensors_bytes(&[("a.weight", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])]);
        let mut w = Weights::from_bytes(&bytes).unwrap();
        assert_eq!(
            w.take("a.weight", &[2, 2]).unwrap(),
            vec![1.0, 2.0, 3.0, 4.0]
        );
    }

    #[test]
    fn a_missing_tensor_is_named_in_the_error() {
        let bytes = safetensors_bytes(&[("a.weight", vec![1], vec![1.0])]);
        let err = Weights::from_bytes(&bytes)
            .unwrap()
            .take("b.weight", &[1])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing tensor `b.weight` in model.safetensors"
        );
    }

    #[test]
    fn a_mis_shaped_tensor_reports_both_shapes() {
        let bytes = safetensors_bytes(&[("a.weight", vec![2, 2], vec![0.0; 4])]);
        let err = Weights::from_bytes(&bytes)
            .unwrap()
            .take("a.weight", &[4])
            .unwrap_err();
        assert!(err.to_string().contains("[2, 2]") && err.to_string().contains("[4]"));
    }

    #[test]
    fn garbage_bytes_are_a_format_error() {
        assert!(matches!(
            Weights::from_bytes(b"definitely not safetensors"),
            Err(WeightsError::Format(_))
        ));
    }
}
