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

    /// A copy of rows `start..end` (clamped to the rows there are).
    pub fn rows_range(&self, start: usize, end: usize) -> Self {
        let start = start.min(self.rows());
        let end = end.clamp(start, self.rows());
        let width: usize = self.shape.iter().skip(1).product();
        let span = start * width..end * width;
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = end - start;
        }
        let data = match &self.data {
            TensorData::F32(v) => TensorData::F32(v.get(span).unwrap_or_default().to_vec()),
            TensorData::I64(v) => TensorData::I64(v.get(span).unwrap_or_default().to_vec()),
            TensorData::U8(v) => TensorData::U8(v.get(span).unwrap_or_default().to_vec()),
        };
        Self { shape, data }
    }

    /// Appends `other`'s rows (same datatype and row shape) to this tensor's.
    pub fn append_rows(&mut self, other: Tensor) -> Result<(), String> {
        if self.shape.get(1..) != other.shape.get(1..) {
            return Err(format!(
                "cannot append rows of shape {:?} to {:?}",
                other.shape, self.shape
            ));
        }
        match (&mut self.data, other.data) {
            (TensorData::F32(a), TensorData::F32(b)) => a.extend(b),
            (TensorData::I64(a), TensorData::I64(b)) => a.extend(b),
            (TensorData::U8(a), TensorData::U8(b)) => a.extend(b),
            (a, b) => {
                return Err(format!(
                    "cannot append {} rows to {} rows",
                    b.dtype().as_str(),
                    a.dtype().as_str()
                ));
            }
        }
        if let Some(first) = self.shape.first_mut() {
            *first += other.shape.first().copied().unwrap_or(0);
        }
        Ok(())
    }
}
