//! Pure builders: `(validated pipeline, observed state, operator config) -> desired objects`.
//!
//! No client, no clock: given the same inputs they return the same objects, so server-side apply
//! of their output is idempotent and the unit tests below pin every field that matters.

mod config;
mod objects;
mod workload;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, EnvVar, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;

use crate::crd::{Color, GROUP, ModelRef, VERSION};
use crate::validate::ValidatedPipeline;

pub use config::{CONFIG_FILE, CONFIG_MOUNT_DIR, WorkerConfig, render_worker_config};

/// `app.kubernetes.io/name` of every worker object.
pub const APP_NAME: &str = "tandem-worker";
/// `app.kubernetes.io/managed-by` of every object this operator owns.
pub const MANAGED_BY: &str = "tandem-operator";
/// Label key: application name.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// Label key: the pipeline an object belongs to.
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
/// Label key: `preprocess` or `inference`.
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// Label key: the managing tool.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label key: the operator version that last applied the object.
pub const LABEL_VERSION: &str = "app.kubernetes.io/version";
/// Label key: inference color.
pub const LABEL_COLOR: &str = "tandem.dev/color";
/// Pod-template annotation carrying the hash of the worker config, so config changes roll pods.
pub const ANNOTATION_CONFIG_HASH: &str = "tandem.dev/config-hash";

/// Worker HTTP port (Open Inference Protocol REST and health endpoints).
pub const PORT_HTTP: i32 = 8000;
/// Worker gRPC port (Open Inference Protocol).
pub const PORT_GRPC: i32 = 8001;
/// Worker Prometheus metrics port.
pub const PORT_METRICS: i32 = 9090;
/// Worker `tandem.v1.WorkerControl` port.
pub const PORT_CONTROL: i32 = 9091;

/// A pipeline stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// The CPU front stage.
    Preprocess,
    /// The model stage.
    Inference,
}

impl Stage {
    /// Lowercase name, as used in object names and the component label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Preprocess => "preprocess",
            Self::Inference => "inference",
        }
    }
}

/// Object names derived from a pipeline name. Every name fits 63 characters for names up to
/// [`crate::crd::MAX_PIPELINE_NAME_LEN`].
pub mod names {
    use super::Color;

    /// The client-facing Service (the pipeline's front door).
    pub fn service(pipeline: &str) -> String {
        pipeline.to_owned()
    }
    /// The preprocess Deployment (and its PodDisruptionBudget).
    pub fn preprocess(pipeline: &str) -> String {
        format!("{pipeline}-preprocess")
    }
    /// The inference Deployment of a color (and its PodDisruptionBudget).
    pub fn inference(pipeline: &str, color: Color) -> String {
        format!("{pipeline}-inference-{}", color.as_str())
    }
    /// The workers' ConfigMap.
    pub fn config(pipeline: &str) -> String {
        format!("{pipeline}-config")
    }
    /// The workers' ServiceAccount.
    pub fn service_account(pipeline: &str) -> String {
        format!("{pipeline}-worker")
    }
}

/// One inference color to run, as decided from status (and later by the rollout machine).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColorPlan {
    /// Which color.
    pub color: Color,
    /// The model it serves.
    pub model: ModelRef,
    /// Pods to run: the stage's desired count from status within the spec's bounds, or,
    /// while a rollout runs two colors, this color's share of that count (the second color's
    /// `maxSurge` pods come on top of the bounds, not a second full set). Used as is.
    pub replicas: i32,
}

/// What the builders need to know beyond the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Inference colors to run, active first. Colors not listed are retired.
    pub colors: Vec<ColorPlan>,
    /// Desired preprocess pods from status.
    pub preprocess_desired: Option<i32>,
}

/// Operator-wide settings the objects depend on.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildConfig {
    /// Worker container image.
    pub worker_image: String,
    /// `imagePullPolicy` for workers; the cluster default when `None`.
    pub image_pull_policy: Option<String>,
    /// Secrets (in the pipeline's namespace) worker pods pull their image with.
    pub image_pull_secrets: Vec<String>,
    /// Operator version, recorded in `app.kubernetes.io/version` on the objects (not on the pods).
    pub operator_version: String,
    /// Where workers export their spans (OTLP/gRPC); no tracing on workers when `None`.
    pub worker_tracing: Option<WorkerTracing>,
    /// Derives the pipeline's worker control token, handed to every worker container as
    /// `TANDEM_CONTROL_TOKEN` ([`crate::control_auth`]); no token when `None`.
    pub control_key: Option<crate::control_auth::ControlKeys>,
}

/// OTLP export settings handed to every worker container as the standard
/// `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_TRACES_SAMPLER*` variables.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerTracing {
    /// OTLP/gRPC collector endpoint, e.g. `http://otel-collector.observability:4317`.
    pub endpoint: String,
    /// Fraction of new traces kept (0.0–1.0); a request's own sampled flag is followed
    /// (`parentbased_traceidratio`).
    pub sampling_ratio: f64,
}

/// Every object a pipeline owns, in apply order.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// Identity of the worker pods.
    pub service_account: ServiceAccount,
    /// `pipeline.yaml` for the workers.
    pub config_map: ConfigMap,
    /// The preprocess front door.
    pub service: Service,
    /// The preprocess Deployment, then one inference Deployment per color.
    pub deployments: Vec<Deployment>,
    /// One PodDisruptionBudget per Deployment, same names.
    pub pdbs: Vec<PodDisruptionBudget>,
}

/// Why objects could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The worker config could not be serialized.
    #[error("rendering the worker config")]
    RenderConfig(#[source] serde_yaml_ng::Error),
    /// No inference color was planned.
    #[error("no inference color to build")]
    NoColors,
}

/// Builds every desired object of a pipeline.
pub fn build(
    v: &ValidatedPipeline,
    observed: &Observed,
    cfg: &BuildConfig,
) -> Result<Desired, BuildError> {
    if observed.colors.is_empty() {
        return Err(BuildError::NoColors);
    }
    let config_yaml = render_worker_config(v).map_err(BuildError::RenderConfig)?;
    let config_map = objects::config_map(v, cfg, &config_yaml);
    let mut deployments = vec![workload::preprocess_deployment(
        v,
        cfg,
        &config_yaml,
        observed.preprocess_desired,
    )];
    for plan in &observed.colors {
        deployments.push(workload::inference_deployment(v, cfg, plan));
    }
    if let Some(key) = &cfg.control_key {
        let token = key
            .current()
            .token(&v.meta.namespace, &v.meta.name, &v.meta.uid);
        for d in &mut deployments {
            with_control_token(d, &token);
        }
    }
    let pdbs = deployments
        .iter()
        .map(|d| objects::pdb_for(v, cfg, d))
        .collect();
    Ok(Desired {
        service_account: objects::service_account(v, cfg),
        config_map,
        service: objects::service(v, cfg),
        deployments,
        pdbs,
    })
}

/// Gives every container of `d`'s pods the pipeline's control token (one token for both
/// stages: it is the pipeline's, not a pod's).
fn with_control_token(d: &mut Deployment, token: &str) {
    let containers = d
        .spec
        .iter_mut()
        .flat_map(|s| s.template.spec.iter_mut())
        .flat_map(|s| s.containers.iter_mut());
    for c in containers {
        c.env.get_or_insert_default().push(EnvVar {
            name: crate::control_auth::TOKEN_ENV.to_owned(),
            value: Some(token.to_owned()),
            ..EnvVar::default()
        });
    }
}

/// Labels that select a stage's pods (stable: Deployment selectors are immutable).
pub fn selector_labels(
    pipeline: &str,
    stage: Stage,
    color: Option<Color>,
) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (LABEL_NAME.to_owned(), APP_NAME.to_owned()),
        (LABEL_INSTANCE.to_owned(), pipeline.to_owned()),
        (LABEL_COMPONENT.to_owned(), stage.as_str().to_owned()),
    ]);
    if let Some(c) = color {
        l.insert(LABEL_COLOR.to_owned(), c.as_str().to_owned());
    }
    l
}

/// The label selector (as a string) that finds every object a pipeline owns.
pub fn owned_selector(pipeline: &str) -> String {
    format!("{LABEL_INSTANCE}={pipeline},{LABEL_MANAGED_BY}={MANAGED_BY}")
}

fn labels(
    v: &ValidatedPipeline,
    cfg: &BuildConfig,
    stage: Option<Stage>,
    color: Option<Color>,
) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (LABEL_NAME.to_owned(), APP_NAME.to_owned()),
        (LABEL_INSTANCE.to_owned(), v.meta.name.clone()),
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (LABEL_VERSION.to_owned(), cfg.operator_version.clone()),
    ]);
    if let Some(s) = stage {
        l.insert(LABEL_COMPONENT.to_owned(), s.as_str().to_owned());
    }
    if let Some(c) = color {
        l.insert(LABEL_COLOR.to_owned(), c.as_str().to_owned());
    }
    l
}

/// The labels of a worker pod: the Deployment's without `app.kubernetes.io/version`, so an
/// operator upgrade that changes nothing else in the pod template does not roll every worker
/// pod of every pipeline (inference pods would download and load their models again).
fn pod_labels(
    v: &ValidatedPipeline,
    cfg: &BuildConfig,
    stage: Stage,
    color: Option<Color>,
) -> BTreeMap<String, String> {
    let mut l = labels(v, cfg, Some(stage), color);
    l.remove(LABEL_VERSION);
    l
}

/// The owner reference every owned object carries, so the garbage collector removes it with
/// the pipeline. `blockOwnerDeletion` stays unset: setting it requires `update` on
/// `inferencepipelines/finalizers` (OwnerReferencesPermissionEnforcement), a permission the
/// operator otherwise does not need; background deletion does not use it.
pub fn owner_reference(v: &ValidatedPipeline) -> OwnerReference {
    OwnerReference {
        api_version: format!("{GROUP}/{VERSION}"),
        kind: "InferencePipeline".to_owned(),
        name: v.meta.name.clone(),
        uid: v.meta.uid.clone(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

fn object_meta(
    v: &ValidatedPipeline,
    cfg: &BuildConfig,
    name: String,
    stage: Option<Stage>,
    color: Option<Color>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(v.meta.namespace.clone()),
        labels: Some(labels(v, cfg, stage, color)),
        owner_references: Some(vec![owner_reference(v)]),
        ..ObjectMeta::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_fixtures::text_pipeline;
    use crate::validate::validate;

    pub fn cfg() -> BuildConfig {
        BuildConfig {
            worker_image: "tandem-worker:0.1.0".into(),
            image_pull_policy: None,
            image_pull_secrets: Vec::new(),
            operator_version: "0.1.0".into(),
            worker_tracing: None,
            control_key: None,
        }
    }

    pub fn blue(v: &ValidatedPipeline) -> Observed {
        Observed {
            colors: vec![ColorPlan {
                color: Color::Blue,
                model: ModelRef::from(&v.inference.model),
                replicas: 1,
            }],
            preprocess_desired: None,
        }
    }

    #[test]
    fn a_fresh_pipeline_gets_preprocess_then_blue_inference_with_matching_pdbs() {
        let v = validate(&text_pipeline()).unwrap();
        let d = build(&v, &blue(&v), &cfg()).unwrap();
        let names: Vec<_> = d
            .deployments
            .iter()
            .map(|d| d.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["minilm-preprocess", "minilm-inference-blue"]);
        let pdbs: Vec<_> = d
            .pdbs
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(pdbs, names);
        assert_eq!(d.service.metadata.name.as_deref(), Some("minilm"));
        assert_eq!(d.config_map.metadata.name.as_deref(), Some("minilm-config"));
        assert_eq!(
            d.service_account.metadata.name.as_deref(),
            Some("minilm-worker")
        );
    }

    #[test]
    fn every_object_is_labelled_and_owned_by_the_pipeline() {
        let v = validate(&text_pipeline()).unwrap();
        let d = build(&v, &blue(&v), &cfg()).unwrap();
        let metas = [
            &d.service_account.metadata,
            &d.config_map.metadata,
            &d.service.metadata,
            &d.deployments[0].metadata,
            &d.deployments[1].metadata,
            &d.pdbs[0].metadata,
            &d.pdbs[1].metadata,
        ];
        for m in metas {
            let l = m.labels.as_ref().unwrap();
            assert_eq!(l[LABEL_NAME], "tandem-worker");
            assert_eq!(l[LABEL_INSTANCE], "minilm");
            assert_eq!(l[LABEL_MANAGED_BY], "tandem-operator");
            assert_eq!(m.namespace.as_deref(), Some("ml"));
            let owners = m.owner_references.as_ref().unwrap();
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].kind, "InferencePipeline");
            assert_eq!(owners[0].api_version, "tandem.dev/v1alpha1");
            assert_eq!(owners[0].uid, v.meta.uid);
            assert_eq!(owners[0].controller, Some(true));
        }
        let l = d.deployments[1].metadata.labels.as_ref().unwrap();
        assert_eq!(l[LABEL_COMPONENT], "inference");
        assert_eq!(l[LABEL_COLOR], "blue");
    }

    #[test]
    fn with_a_control_key_every_worker_container_gets_the_pipelines_token_and_without_none() {
        let v = validate(&text_pipeline()).unwrap();
        let mut obs = blue(&v);
        obs.colors.push(ColorPlan {
            color: Color::Green,
            model: ModelRef::from(&v.inference.model),
            replicas: 1,
        });
        let tokens = |cfg: &BuildConfig| -> Vec<Option<String>> {
            build(&v, &obs, cfg)
                .unwrap()
                .deployments
                .into_iter()
                .flat_map(|d| d.spec.unwrap().template.spec.unwrap().containers)
                .map(|c| {
                    c.env
                        .unwrap_or_default()
                        .into_iter()
                        .find(|e| e.name == "TANDEM_CONTROL_TOKEN")
                        .and_then(|e| e.value)
                })
                .collect()
        };
        assert_eq!(tokens(&cfg()), [None, None, None]);
        let key = crate::control_auth::ControlKey::from_bytes(&[b'k'; 32]).unwrap();
        let want = key.token(&v.meta.namespace, &v.meta.name, &v.meta.uid);
        let with = BuildConfig {
            control_key: Some(crate::control_auth::ControlKeys::new(key, None)),
            ..cfg()
        };
        assert_eq!(
            tokens(&with),
            [Some(want.clone()), Some(want.clone()), Some(want)],
            "preprocess, blue and green: one token per pipeline"
        );
    }

    #[test]
    fn a_second_color_adds_a_green_deployment_after_blue() {
        let v = validate(&text_pipeline()).unwrap();
        let mut obs = blue(&v);
        obs.colors.push(ColorPlan {
            color: Color::Green,
            model: ModelRef::from(&v.inference.model),
            replicas: 2,
        });
        let d = build(&v, &obs, &cfg()).unwrap();
        assert_eq!(
            d.deployments[2].metadata.name.as_deref(),
            Some("minilm-inference-green")
        );
        assert_eq!(d.pdbs.len(), 3);
    }

    #[test]
    fn building_without_colors_is_an_error() {
        let v = validate(&text_pipeline()).unwrap();
        let obs = Observed {
            colors: vec![],
            preprocess_desired: None,
        };
        assert!(matches!(build(&v, &obs, &cfg()), Err(BuildError::NoColors)));
    }

    #[test]
    fn names_fit_a_dns_label_at_the_longest_allowed_pipeline_name() {
        let n = "a".repeat(crate::crd::MAX_PIPELINE_NAME_LEN);
        assert!(names::inference(&n, Color::Green).len() <= 63);
        assert!(names::preprocess(&n).len() <= 63);
        assert!(names::config(&n).len() <= 63);
        assert!(names::service_account(&n).len() <= 63);
    }
}
