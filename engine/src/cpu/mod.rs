//! The CPU engine: the `gemm` crate for matrix products plus our own ops,
//! run on a dedicated rayon pool of a configured size.

pub mod bert;
pub mod gemm;
pub mod ops;
pub mod vision;

use crate::config::{Architecture, VisionConfig};
use crate::engine::{Engine, EngineError};
use crate::spec::ModelSpec;
use crate::tensor::{Tensor, TensorData};
use crate::weights::{Weights, WeightsError};

/// Why the CPU engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CpuBuildError {
    /// The weights do not fit the architecture.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The worker thread pool could not be started.
    #[error("cannot start the CPU thread pool: {0}")]
    ThreadPool(String),
}

enum Model {
    Bert(bert::Bert),
    EfficientNet(vision::EfficientNetLite0, VisionConfig),
    ResNet(vision::ResNet, VisionConfig),
}

/// A model running on CPU threads.
pub struct CpuEngine {
    model: Model,
    spec: ModelSpec,
    threads: usize,
    pool: rayon::ThreadPool,
}

impl CpuEngine {
    /// Builds the CPU model for `arch` from `weights`, using `threads` threads.
    pub fn new(
        arch: &Architecture,
        spec: ModelSpec,
        weights: Weights,
        threads: usize,
    ) -> Result<Self, CpuBuildError> {
        let model = match arch {
            Architecture::Bert(c) => Model::Bert(bert::Bert::load(c, weights)?),
            Architecture::EfficientNetLite0(v) => {
                Model::EfficientNet(vision::EfficientNetLite0::load(v, weights)?, v.clone())
            }
            Architecture::ResNet { vision: v, depths } => {
                Model::ResNet(vision::ResNet::load(v, *depths, weights)?, v.clone())
            }
        };
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tandem-cpu-{i}"))
            .build()
            .map_err(|e| CpuBuildError::ThreadPool(e.to_string()))?;
        Ok(Self {
            model,
            spec,
            threads,
            pool,
        })
    }
}

fn i64s<'a>(t: &'a Tensor, name: &str) -> Result<&'a [i64], EngineError> {
    match &t.data {
        TensorData::I64(v) => Ok(v),
        _ => Err(EngineError::InvalidInput(format!("{name} must be INT64"))),
    }
}

impl Engine for CpuEngine {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
        let threads = self.threads;
        match &self.model {
            Model::Bert(m) => {
                let [ids, mask, types] = inputs else {
                    return Err(EngineError::InvalidInput(
                        "expected input_ids, attention_mask, token_type_ids".into(),
                    ));
                };
                let (n, l) = match ids.shape[..] {
                    [n, l] => (n, l),
                    _ => return Err(EngineError::InvalidInput("input_ids must be [N, L]".into())),
                };
                if mask.shape != ids.shape || types.shape != ids.shape {
                    return Err(EngineError::InvalidInput(
                        "input_ids, attention_mask and token_type_ids must have the same shape"
                            .into(),
                    ));
                }
                let (a, b, c) = (
                    i64s(ids, "input_ids")?,
                    i64s(mask, "attention_mask")?,
                    i64s(types, "token_type_ids")?,
                );
                // The checks the worker runs per request, run again here for callers of the
                // engine alone; one definition of what a request may hold.
                self.spec
                    .check_values(inputs)
                    .map_err(EngineError::InvalidInput)?;
                let out = self.pool.install(|| m.forward(a, b, c, n, l, threads))?;
                Ok(vec![Tensor::f32(vec![n, m.hidden_size()], out)])
            }
            Model::EfficientNet(_, v) | Model::ResNet(_, v) => {
                let [x] = inputs else {
                    return Err(EngineError::InvalidInput("expected one image input".into()));
                };
                let s = v.image_size;
                let n = x.rows();
                if x.shape != [n, vision::CHANNELS, s, s] || !x.is_consistent() {
                    return Err(EngineError::InvalidInput(format!(
                        "input must be [N, 3, {s}, {s}], got {:?}",
                        x.shape
                    )));
                }
                let xf = vision::to_f32(&x.data, &v.norm, s * s);
                let out = self.pool.install(|| match &self.model {
                    Model::EfficientNet(m, _) => m.forward(&xf, n, threads),
                    Model::ResNet(m, _) => m.forward(&xf, n, threads),
                    Model::Bert(_) => Vec::new(),
                });
                Ok(vec![Tensor::f32(vec![n, v.num_classes], out)])
            }
        }
    }
}
