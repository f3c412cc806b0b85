//! The tensors engines consume and produce: a shape plus typed, row-major data.

/// Element types the engines understand (OIP v2 names via [`DataType::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// `FP32`.
    Fp32,
    /// `INT64`.
    Int64,
    /// `UINT8`.
    Uint8,
}

impl DataType {
    /// The Open Inference Protocol v2 datatype name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fp32 => "FP32",
            Self::Int64 => "INT64",
            Self::Uint8 => "UINT8",
        }
    }

    /// Parses an OIP v2 datatype name; `None` for types no engine accepts.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "FP32" => Some(Self::Fp32),
            "INT64" => Some(Self::Int64),
            "UINT8" => Some(Self::Uint8),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::Fp32 => 4,
            Self::Int64 => 8,
            Self::Uint8 => 1,
        }
    }
}

/// Typed element storage.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 64-bit signed integers.
    I64(Vec<i64>),
    /// Bytes.
    U8(Vec<u8>),
}

impl TensorData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::U8(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> DataType {
        match self {
            Self::F32(_) => DataType::Fp32,
            Self::I64(_) => DataType::Int64,
            Self::U8(_) => DataType::Uint8,
        }
    }
}

/// A dense row-major tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements; `data.len()` equals the product of `shape`.
    pub data: TensorData,
}

impl Tensor {
    /// An FP32 tensor. The caller guarantees `data.len() == shape.iter().product()`.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self {
            shape,
            data: TensorData::F32(data),
        }
    }

    /// An INT64 tensor.
    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Self {
        Self {
            shape,
            data: TensorData::I64(data),
        }
    }

    /// A UINT8 tensor.
    pub fn u8(shape: Vec<usize>, data: Vec<u8>) -> Self {
        Self {
            shape,
            data: TensorData::U8(data),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DataType {
        self.data.dtype()
    }

    /// Number of elements the shape describes.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the data length matches the shape.
    pub fn is_consistent(&self) -> bool {
        self.numel() == self.data.len()
    }

    /// Rows (the first dimension), 0 for a scalar.
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }
}
