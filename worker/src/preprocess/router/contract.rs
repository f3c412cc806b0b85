//! What this worker sends to a model and reads back, and whether a model's OIP v2
//! `ModelMetadata` can take it.
//!
//! A pipeline whose preprocess settings do not fit its model (a 320×320 resize for a 224×224
//! network, NHWC for an NCHW one, a classifier's post-processing in front of an embedding
//! model) fails every request. The inference pod says so per request, but the pipeline's pods
//! are all ready, so nothing else would. The router checks each color's model against this
//! contract when a routing table names it, and `GetStats` reports the mismatches, from where
//! the operator puts them in the pipeline's status.
//!
//! Only names, ranks and fixed dimensions are compared. Datatypes are not: OIP v2 metadata
//! names one datatype per input, and Tandem's image models advertise FP32 while also taking
//! UINT8 (normalizing on the device), so a datatype check would refuse a working pipeline.

use tandem_proto::inference::ModelMetadataResponse;
use tandem_proto::inference::model_metadata_response::TensorMetadata;

use crate::config::{Layout, PipelineConfig, Postprocess, Preprocess};
use crate::preprocess::service::names;

/// One dimension of a tensor this worker sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    /// Set per request (the batch, a text's length).
    Varies,
    /// Always this size.
    Fixed(i64),
}

/// One input tensor this worker sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// Its name on the wire.
    pub name: &'static str,
    /// Its dimensions, batch first.
    pub dims: Vec<Dim>,
}

/// What the pipeline needs from a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contract {
    /// The inputs every request carries.
    pub inputs: Vec<Sent>,
    /// The output the post-processing reads, if it reads a fixed one.
    pub output: Option<&'static str>,
    /// The post-processing's name, for messages.
    pub postprocess: &'static str,
}

impl Contract {
    /// The contract of a pipeline configuration.
    pub fn of(cfg: &PipelineConfig) -> Self {
        use Dim::{Fixed, Varies};
        let inputs = match &cfg.preprocess {
            Preprocess::Text(_) => [
                names::INPUT_IDS,
                names::ATTENTION_MASK,
                names::TOKEN_TYPE_IDS,
            ]
            .into_iter()
            .map(|name| Sent {
                name,
                dims: vec![Varies, Varies],
            })
            .collect(),
            Preprocess::Image(i) => {
                let (h, w) = (
                    Fixed(i64::from(i.resize.height)),
                    Fixed(i64::from(i.resize.width)),
                );
                let dims = match i.layout {
                    Layout::Nchw => vec![Varies, Fixed(3), h, w],
                    Layout::Nhwc => vec![Varies, h, w, Fixed(3)],
                };
                vec![Sent {
                    name: names::IMAGE_INPUT,
                    dims,
                }]
            }
        };
        let (output, postprocess) = match cfg.postprocess {
            Postprocess::None => (None, "none"),
            Postprocess::Embedding => (Some(names::EMBEDDING), "embedding"),
            Postprocess::Classification { .. } => (Some(names::LOGITS), "classification"),
        };
        Self {
            inputs,
            output,
            postprocess,
        }
    }

    /// Whether a model with this metadata takes what the pipeline sends and has the output it
    /// reads; `Err` says what differs, every difference found.
    ///
    /// A server that lists no inputs (or no outputs) says nothing about them, and they are
    /// not checked: minimal OIP servers, such as the serving benchmark's stub, answer
    /// metadata that way.
    pub fn check(&self, model: &ModelMetadataResponse) -> Result<(), String> {
        let mut problems = Vec::new();
        let inputs_listed = !model.inputs.is_empty();
        for sent in self.inputs.iter().filter(|_| inputs_listed) {
            match model.inputs.iter().find(|t| t.name == sent.name) {
                None => problems.push(format!(
                    "input {:?}: sent, but the model has no such input (it takes {})",
                    sent.name,
                    listed(&model.inputs)
                )),
                Some(t) if !fits(&sent.dims, &t.shape) => problems.push(format!(
                    "input {:?}: sent as {}, the model takes {}",
                    sent.name,
                    shown(&sent.dims),
                    dims(&t.shape)
                )),
                Some(_) => {}
            }
        }
        if let Some(out) = self.output
            && !model.outputs.is_empty()
            && !model.outputs.iter().any(|t| t.name == out)
        {
            problems.push(format!(
                "output {out:?}: read by the {} post-processing, but the model has no such output (it has {})",
                self.postprocess,
                listed(&model.outputs)
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// Same rank, and every dimension the model fixes is the size sent. A dimension the worker
/// varies fits only one the model leaves variable (`-1`).
fn fits(sent: &[Dim], model: &[i64]) -> bool {
    sent.len() == model.len()
        && sent.iter().zip(model).all(|(s, &m)| match s {
            Dim::Varies => m < 0,
            Dim::Fixed(n) => m < 0 || m == *n,
        })
}

fn shown(d: &[Dim]) -> String {
    let parts: Vec<String> = d
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Fixed(n) => n.to_string(),
            Dim::Varies if i == 0 => "N".to_owned(),
            Dim::Varies => "L".to_owned(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

fn dims(d: &[i64]) -> String {
    let parts: Vec<String> = d.iter().map(i64::to_string).collect();
    format!("[{}]", parts.join(", "))
}

fn listed(ts: &[TensorMetadata]) -> String {
    let names: Vec<String> = ts
        .iter()
        .map(|t| format!("{:?} {}", t.name, dims(&t.shape)))
        .collect();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(inputs: &[(&str, &[i64])], outputs: &[(&str, &[i64])]) -> ModelMetadataResponse {
        let t = |ts: &[(&str, &[i64])]| {
            ts.iter()
                .map(|(name, shape)| TensorMetadata {
                    name: (*name).to_owned(),
                    datatype: "FP32".to_owned(),
                    shape: shape.to_vec(),
                })
                .collect()
        };
        ModelMetadataResponse {
            name: "m".into(),
            versions: vec!["1".into()],
            platform: "tandem".into(),
            inputs: t(inputs),
            outputs: t(outputs),
        }
    }

    fn image(size: u32, layout: &str, post: &str) -> PipelineConfig {
        PipelineConfig::parse(&format!(
            "pipeline: p\nmodel: {{name: m, version: '1'}}\npreprocess:\n  image:\n    resize: {{width: {size}, height: {size}}}\n    layout: {layout}\npostprocess: {{kind: {post}}}\n"
        ))
        .expect("valid config")
    }

    fn text(post: &str) -> PipelineConfig {
        PipelineConfig::parse(&format!(
            "pipeline: p\nmodel: {{name: m, version: '1'}}\npreprocess:\n  text: {{tokenizer: t.json, maxLength: 128}}\npostprocess: {{kind: {post}}}\n"
        ))
        .expect("valid config")
    }

    /// Tensor names and shapes, as a model lists them.
    type Listed = &'static [(&'static str, &'static [i64])];

    const EFFICIENTNET: (Listed, Listed) =
        (&[("input", &[-1, 3, 224, 224])], &[("logits", &[-1, 1000])]);

    #[test]
    fn an_image_pipeline_sized_for_its_model_fits() {
        let m = meta(EFFICIENTNET.0, EFFICIENTNET.1);
        assert_eq!(
            Contract::of(&image(224, "NCHW", "Classification")).check(&m),
            Ok(())
        );
        // A model that takes any size takes 320 too.
        let any = meta(&[("input", &[-1, 3, -1, -1])], EFFICIENTNET.1);
        assert_eq!(
            Contract::of(&image(320, "NCHW", "Classification")).check(&any),
            Ok(())
        );
    }

    #[test]
    fn a_size_or_layout_the_model_does_not_take_is_named_with_both_shapes() {
        let m = meta(EFFICIENTNET.0, EFFICIENTNET.1);
        assert_eq!(
            Contract::of(&image(320, "NCHW", "Classification")).check(&m),
            Err(
                "input \"input\": sent as [N, 3, 320, 320], the model takes [-1, 3, 224, 224]"
                    .into()
            )
        );
        assert_eq!(
            Contract::of(&image(224, "NHWC", "Classification")).check(&m),
            Err(
                "input \"input\": sent as [N, 224, 224, 3], the model takes [-1, 3, 224, 224]"
                    .into()
            )
        );
    }

    #[test]
    fn a_post_processing_output_the_model_lacks_is_named_with_what_it_has() {
        let m = meta(EFFICIENTNET.0, EFFICIENTNET.1);
        assert_eq!(
            Contract::of(&image(224, "NCHW", "Embedding")).check(&m),
            Err("output \"embedding\": read by the embedding post-processing, but the model has no such output (it has \"logits\" [-1, 1000])".into())
        );
        // Without post-processing, any outputs do.
        assert_eq!(Contract::of(&image(224, "NCHW", "None")).check(&m), Ok(()));
    }

    #[test]
    fn text_inputs_must_exist_and_leave_the_batch_and_length_variable() {
        let seq: &[i64] = &[-1, -1];
        let minilm = meta(
            &[
                ("input_ids", seq),
                ("attention_mask", seq),
                ("token_type_ids", seq),
            ],
            &[("embedding", &[-1, 384])],
        );
        assert_eq!(Contract::of(&text("Embedding")).check(&minilm), Ok(()));

        let fixed_length = meta(
            &[
                ("input_ids", &[-1, 128]),
                ("attention_mask", seq),
                ("token_type_ids", seq),
            ],
            &[("embedding", &[-1, 384])],
        );
        assert_eq!(
            Contract::of(&text("Embedding")).check(&fixed_length),
            Err("input \"input_ids\": sent as [N, L], the model takes [-1, 128]".into())
        );

        let no_segments = meta(
            &[("input_ids", seq), ("attention_mask", seq)],
            &[("embedding", &[-1, 384])],
        );
        assert_eq!(
            Contract::of(&text("Embedding")).check(&no_segments),
            Err("input \"token_type_ids\": sent, but the model has no such input (it takes \"input_ids\" [-1, -1], \"attention_mask\" [-1, -1])".into())
        );
    }

    #[test]
    fn a_server_that_lists_no_inputs_or_outputs_is_not_checked_for_them() {
        let contract = Contract::of(&image(320, "NCHW", "Classification"));
        assert_eq!(contract.check(&meta(&[], &[])), Ok(()));
        assert_eq!(
            contract.check(&meta(&[], &[("embedding", &[-1, 384])])),
            Err("output \"logits\": read by the classification post-processing, but the model has no such output (it has \"embedding\" [-1, 384])".into())
        );
    }

    #[test]
    fn every_difference_is_reported_at_once() {
        let m = meta(
            &[("pixels", &[-1, 3, 224, 224])],
            &[("probabilities", &[-1, 1000])],
        );
        let err = Contract::of(&image(224, "NCHW", "Classification"))
            .check(&m)
            .expect_err("two differences");
        assert!(err.contains("input \"input\": sent, but the model has no such input (it takes \"pixels\" [-1, 3, 224, 224])"), "{err}");
        assert!(err.contains("output \"logits\": read by the classification post-processing, but the model has no such output (it has \"probabilities\" [-1, 1000])"), "{err}");
    }
}
