//! Deployment builders for both stages and the hardened worker pod they share.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, LocalObjectReference, ObjectFieldSelector, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use sha2::{Digest, Sha256};

use super::{
    ANNOTATION_CONFIG_HASH, BuildConfig, CONFIG_FILE, CONFIG_MOUNT_DIR, ColorPlan, PORT_CONTROL,
    PORT_GRPC, PORT_HTTP, PORT_METRICS, Stage, names, object_meta, pod_labels, selector_labels,
};
use crate::crd::{Color, Device};
use crate::validate::{PodScheduling, ValidatedPipeline};

/// Extended resource a CUDA inference pod requests.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Unprivileged user and group the workers run as.
const WORKER_UID: i64 = 65532;
/// Preprocess pods keep taking requests for 5 s after SIGTERM (endpoints drop them
/// meanwhile), then drain for as long as an accepted request may take (held up to 60 s for an
/// inference stage scaling from zero, then forwarded with a 30 s deadline); the kubelet's
/// SIGKILL must come after that.
const PREPROCESS_GRACE_SECONDS: i64 = 100;
/// Inference pods drain a full queue of batches before exiting; generous because a lost
/// in-flight request is worse than a slow scale-down.
const INFERENCE_GRACE_SECONDS: i64 = 120;
/// How long a new worker pod must have been Ready before a Deployment update counts it and
/// deletes a pod it replaces. Without it the old pod got SIGTERM the moment its replacement was
/// Ready, before the operator had pushed the replacement's address to the preprocess pods (a
/// router pass and a push, well under a second) or Service endpoints listed it: requests
/// routed to the old pod then had nowhere to be retried.
const MIN_READY_SECONDS: i32 = 5;

/// The preprocess Deployment. `config_yaml` is hashed into a pod annotation so a config change
/// rolls the pods.
pub fn preprocess_deployment(
    v: &ValidatedPipeline,
    cfg: &BuildConfig,
    config_yaml: &str,
    desired: Option<i32>,
) -> Deployment {
    let name = names::preprocess(&v.meta.name);
    let config_path = format!("{CONFIG_MOUNT_DIR}/{CONFIG_FILE}");
    let container = Container {
        args: Some(vec![
            "preprocess".to_owned(),
            "--config".to_owned(),
            config_path,
        ]),
        resources: Some(
            v.preprocess
                .resources
                .clone()
                .unwrap_or_else(|| requests("100m", "128Mi")),
        ),
        volume_mounts: Some(vec![
            tmp_mount(),
            VolumeMount {
                name: "config".to_owned(),
                mount_path: CONFIG_MOUNT_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        startup_probe: Some(http_probe("/v2/health/live", 2, 30)),
        ..worker_container(cfg, Stage::Preprocess, None, &v.meta.name)
    };
    let volumes = vec![
        tmp_volume(),
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::config(&v.meta.name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let annotations =
        BTreeMap::from([(ANNOTATION_CONFIG_HASH.to_owned(), short_hash(config_yaml))]);
    deployment(
        v,
        cfg,
        name,
        Stage::Preprocess,
        None,
        v.preprocess.replicas.clamp(desired),
        pod_spec(
            cfg,
            &v.meta.name,
            container,
            volumes,
            PREPROCESS_GRACE_SECONDS,
            &v.preprocess.scheduling,
        ),
        annotations,
    )
}

/// The inference Deployment of one color.
pub fn inference_deployment(
    v: &ValidatedPipeline,
    cfg: &BuildConfig,
    plan: &ColorPlan,
) -> Deployment {
    let inf = &v.inference;
    let device = match inf.device {
        Device::Cuda => "cuda",
        Device::Cpu => "cpu",
    };
    let max_delay_ms = inf.max_delay.as_millis().to_string();
    let args = [
        "inference",
        "--model-uri",
        &plan.model.uri,
        "--model-sha256",
        &plan.model.sha256,
        "--model-name",
        &plan.model.name,
        "--model-version",
        &plan.model.version,
        "--device",
        device,
        "--max-batch-size",
        &inf.max_batch_size.to_string(),
        "--max-delay-ms",
        &max_delay_ms,
        "--max-queue-depth",
        &inf.max_queue_depth.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let mut resources = inf
        .resources
        .clone()
        .unwrap_or_else(|| requests("500m", "1Gi"));
    if inf.device == Device::Cuda {
        add_gpu(&mut resources);
    }
    let container = Container {
        args: Some(args),
        resources: Some(resources),
        volume_mounts: Some(vec![tmp_mount()]),
        // Downloading and loading weights can take minutes; liveness must not kill a pod
        // that is still loading.
        startup_probe: Some(http_probe("/v2/health/live", 5, 120)),
        ..worker_container(cfg, Stage::Inference, Some(plan.color), &v.meta.name)
    };
    deployment(
        v,
        cfg,
        names::inference(&v.meta.name, plan.color),
        Stage::Inference,
        Some(plan.color),
        plan.replicas,
        pod_spec(
            cfg,
            &v.meta.name,
            container,
            vec![tmp_volume()],
            INFERENCE_GRACE_SECONDS,
            &inf.scheduling,
        ),
        BTreeMap::new(),
    )
}

#[allow(clippy::too_many_arguments)] // private assembly step; callers name every argument
fn deployment(
    v: &ValidatedPipeline,
    cfg: &BuildConfig,
    name: String,
    stage: Stage,
    color: Option<Color>,
    replicas: i32,
    pod: PodSpec,
    annotations: BTreeMap<String, String>,
) -> Deployment {
    Deployment {
        metadata: object_meta(v, cfg, name, Some(stage), color),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            revision_history_limit: Some(3),
            min_ready_seconds: Some(MIN_READY_SECONDS),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&v.meta.name, stage, color)),
                match_expressions: None,
            },
            // Surge instead of taking pods away: capacity never drops during an update.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels(v, cfg, stage, color)),
                    annotations: (!annotations.is_empty()).then_some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

fn pod_spec(
    cfg: &BuildConfig,
    pipeline: &str,
    container: Container,
    volumes: Vec<Volume>,
    grace: i64,
    scheduling: &PodScheduling,
) -> PodSpec {
    let pull_secrets = cfg
        .image_pull_secrets
        .iter()
        .map(|name| LocalObjectReference { name: name.clone() })
        .collect::<Vec<_>>();
    PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        image_pull_secrets: (!pull_secrets.is_empty()).then_some(pull_secrets),
        service_account_name: Some(names::service_account(pipeline)),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(grace),
        // `None` when unset: a pipeline without `scheduling` keeps its pod template, and its
        // pods, across the operator upgrade that added the field.
        node_selector: scheduling.node_selector.clone(),
        tolerations: scheduling.tolerations.clone(),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(WORKER_UID),
            run_as_group: Some(WORKER_UID),
            fs_group: Some(WORKER_UID),
            seccomp_profile: Some(runtime_default()),
            ..PodSecurityContext::default()
        }),
        ..PodSpec::default()
    }
}

fn worker_container(
    cfg: &BuildConfig,
    stage: Stage,
    color: Option<Color>,
    pipeline: &str,
) -> Container {
    let mut env = vec![
        field_env("POD_IP", "status.podIP"),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        plain_env("TANDEM_PIPELINE", pipeline),
        plain_env("TANDEM_STAGE", stage.as_str()),
    ];
    if let Some(c) = color {
        env.push(plain_env("TANDEM_COLOR", c.as_str()));
    }
    if let Some(t) = &cfg.worker_tracing {
        env.push(plain_env("OTEL_EXPORTER_OTLP_ENDPOINT", &t.endpoint));
        env.push(plain_env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"));
        env.push(plain_env(
            "OTEL_TRACES_SAMPLER_ARG",
            &t.sampling_ratio.to_string(),
        ));
    }
    Container {
        name: stage.as_str().to_owned(),
        image: Some(cfg.worker_image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        command: Some(vec!["tandem-worker".to_owned()]),
        env: Some(env),
        ports: Some(vec![
            port("http", PORT_HTTP),
            port("grpc", PORT_GRPC),
            port("metrics", PORT_METRICS),
            port("control", PORT_CONTROL),
        ]),
        readiness_probe: Some(http_probe("/v2/health/ready", 2, 3)),
        liveness_probe: Some(http_probe("/v2/health/live", 10, 3)),
        // Workers write why they failed (a checksum mismatch, a missing file) to the
        // termination log; a crash before that leaves the end of the log as the message. The
        // pipeline's status quotes it (`status::pod_problem`).
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

// Probes use the port number, not its name: the same pod spec then works with agents that do
// not resolve named ports.
fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(PORT_HTTP),
            scheme: Some("HTTP".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: number,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: Some("v1".to_owned()),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    }
}

// A read-only root filesystem still needs scratch space: downloaded weights and tokenizers.
fn tmp_volume() -> Volume {
    Volume {
        name: "tmp".to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }
}

fn tmp_mount() -> VolumeMount {
    VolumeMount {
        name: "tmp".to_owned(),
        mount_path: "/tmp".to_owned(),
        ..VolumeMount::default()
    }
}

fn requests(cpu: &str, memory: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(memory.to_owned())),
        ])),
        ..ResourceRequirements::default()
    }
}

/// Adds one GPU unless the user already asked for a count. Extended resources need equal
/// requests and limits, so both are set.
fn add_gpu(r: &mut ResourceRequirements) {
    let gpus = r
        .limits
        .as_ref()
        .and_then(|l| l.get(GPU_RESOURCE))
        .or_else(|| r.requests.as_ref().and_then(|l| l.get(GPU_RESOURCE)))
        .cloned()
        .unwrap_or_else(|| Quantity("1".to_owned()));
    r.limits
        .get_or_insert_with(BTreeMap::new)
        .insert(GPU_RESOURCE.to_owned(), gpus.clone());
    r.requests
        .get_or_insert_with(BTreeMap::new)
        .insert(GPU_RESOURCE.to_owned(), gpus);
}

fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::{blue, cfg};
    use crate::build::{Observed, WorkerTracing, build, render_worker_config};
    use crate::crd::ModelRef;
    use crate::test_fixtures::{image_pipeline, text_pipeline};
    use crate::validate::validate;

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn worker_pods_are_non_root_read_only_and_drop_all_capabilities() {
        let v = validate(&text_pipeline()).unwrap();
        for d in build(&v, &blue(&v), &cfg()).unwrap().deployments {
            let p = pod(&d);
            let psc = p.security_context.as_ref().unwrap();
            assert_eq!(psc.run_as_non_root, Some(true));
            assert_eq!(
                psc.seccomp_profile.as_ref().unwrap().type_,
                "RuntimeDefault"
            );
            assert_eq!(p.automount_service_account_token, Some(false));
            assert_eq!(p.service_account_name.as_deref(), Some("minilm-worker"));
            let c = &p.containers[0];
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(
                sc.capabilities.as_ref().unwrap().drop.as_deref(),
                Some(&["ALL".to_owned()][..])
            );
            assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
            assert!(p.termination_grace_period_seconds.unwrap() >= 60);
            assert_eq!(
                c.termination_message_policy.as_deref(),
                Some("FallbackToLogsOnError")
            );
        }
    }

    #[test]
    fn an_update_surges_and_removes_an_old_pod_only_once_its_replacement_has_been_ready_a_while() {
        let v = validate(&text_pipeline()).unwrap();
        for d in build(&v, &blue(&v), &cfg()).unwrap().deployments {
            let spec = d.spec.as_ref().unwrap();
            assert_eq!(
                spec.min_ready_seconds,
                Some(MIN_READY_SECONDS),
                "{:?}",
                d.metadata.name
            );
            let rolling = spec
                .strategy
                .as_ref()
                .and_then(|s| s.rolling_update.as_ref())
                .unwrap();
            assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
            assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
        }
    }

    #[test]
    fn probes_hit_the_oip_health_endpoints() {
        let v = validate(&text_pipeline()).unwrap();
        for d in build(&v, &blue(&v), &cfg()).unwrap().deployments {
            let c = &pod(&d).containers[0];
            let path = |p: &Option<Probe>| {
                p.as_ref()
                    .unwrap()
                    .http_get
                    .as_ref()
                    .unwrap()
                    .path
                    .clone()
                    .unwrap()
            };
            assert_eq!(path(&c.readiness_probe), "/v2/health/ready");
            assert_eq!(path(&c.liveness_probe), "/v2/health/live");
            assert_eq!(path(&c.startup_probe), "/v2/health/live");
        }
    }

    #[test]
    fn pods_learn_their_ip_name_and_namespace_from_the_downward_api() {
        let v = validate(&text_pipeline()).unwrap();
        let d = &build(&v, &blue(&v), &cfg()).unwrap().deployments[1];
        let env = pod(d).containers[0].env.clone().unwrap();
        let field = |n: &str| {
            env.iter()
                .find(|e| e.name == n)
                .and_then(|e| e.value_from.clone())
                .and_then(|f| f.field_ref)
                .map(|f| f.field_path)
        };
        assert_eq!(field("POD_IP").as_deref(), Some("status.podIP"));
        assert_eq!(field("POD_NAME").as_deref(), Some("metadata.name"));
        assert_eq!(
            field("POD_NAMESPACE").as_deref(),
            Some("metadata.namespace")
        );
    }

    #[test]
    fn workers_export_spans_only_when_the_operator_is_given_a_collector() {
        let v = validate(&text_pipeline()).unwrap();
        let env_of = |cfg: &BuildConfig| -> Vec<Vec<(String, String)>> {
            build(&v, &blue(&v), cfg)
                .unwrap()
                .deployments
                .iter()
                .map(|d| {
                    pod(d).containers[0]
                        .env
                        .clone()
                        .unwrap()
                        .into_iter()
                        .filter(|e| e.name.starts_with("OTEL_"))
                        .map(|e| (e.name, e.value.unwrap_or_default()))
                        .collect()
                })
                .collect()
        };
        assert!(env_of(&cfg()).iter().all(Vec::is_empty));
        let traced = BuildConfig {
            worker_tracing: Some(WorkerTracing {
                endpoint: "http://collector.obs:4317".into(),
                sampling_ratio: 0.25,
            }),
            ..cfg()
        };
        let want = vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
                "http://collector.obs:4317".to_owned(),
            ),
            (
                "OTEL_TRACES_SAMPLER".to_owned(),
                "parentbased_traceidratio".to_owned(),
            ),
            ("OTEL_TRACES_SAMPLER_ARG".to_owned(), "0.25".to_owned()),
        ];
        let envs = env_of(&traced);
        assert_eq!(envs.len(), 2, "preprocess and inference");
        for env in envs {
            assert_eq!(env, want);
        }
    }

    #[test]
    fn worker_pods_pull_with_the_configured_secrets_and_none_by_default() {
        let v = validate(&text_pipeline()).unwrap();
        let secrets_of = |cfg: &BuildConfig| -> Vec<Option<Vec<String>>> {
            build(&v, &blue(&v), cfg)
                .unwrap()
                .deployments
                .iter()
                .map(|d| {
                    pod(d)
                        .image_pull_secrets
                        .as_ref()
                        .map(|s| s.iter().map(|r| r.name.clone()).collect())
                })
                .collect()
        };
        assert_eq!(secrets_of(&cfg()), vec![None, None]);
        let with = BuildConfig {
            image_pull_secrets: vec!["regcred".into(), "mirror".into()],
            ..cfg()
        };
        let want = Some(vec!["regcred".to_owned(), "mirror".to_owned()]);
        assert_eq!(secrets_of(&with), vec![want.clone(), want]);
    }

    #[test]
    fn cuda_inference_requests_one_gpu_and_cpu_inference_none() {
        let v = validate(&text_pipeline()).unwrap();
        let d = &build(&v, &blue(&v), &cfg()).unwrap().deployments[1];
        let r = pod(d).containers[0].resources.clone().unwrap();
        assert_eq!(r.limits.unwrap()[GPU_RESOURCE], Quantity("1".into()));
        assert_eq!(r.requests.unwrap()[GPU_RESOURCE], Quantity("1".into()));
        let pre = pod(&build(&v, &blue(&v), &cfg()).unwrap().deployments[0]).containers[0]
            .resources
            .clone()
            .unwrap();
        assert!(pre.limits.is_none_or(|l| !l.contains_key(GPU_RESOURCE)));

        let v = validate(&image_pipeline()).unwrap();
        let d = &build(&v, &blue(&v), &cfg()).unwrap().deployments[1];
        let r = pod(d).containers[0].resources.clone().unwrap();
        assert!(r.limits.is_none_or(|l| !l.contains_key(GPU_RESOURCE)));
    }

    #[test]
    fn a_user_gpu_count_is_kept() {
        let mut p = text_pipeline();
        p.spec.inference.resources = Some(crate::crd::Resources {
            limits: [(GPU_RESOURCE, Quantity("2".into()))].into_iter().collect(),
            ..crate::crd::Resources::default()
        });
        let v = validate(&p).unwrap();
        let d = &build(&v, &blue(&v), &cfg()).unwrap().deployments[1];
        let r = pod(d).containers[0].resources.clone().unwrap();
        assert_eq!(r.requests.unwrap()[GPU_RESOURCE], Quantity("2".into()));
    }

    #[test]
    fn inference_args_carry_the_model_and_batching_flags() {
        let v = validate(&text_pipeline()).unwrap();
        let d = &build(&v, &blue(&v), &cfg()).unwrap().deployments[1];
        let c = &pod(d).containers[0];
        assert_eq!(
            c.command.as_deref(),
            Some(&["tandem-worker".to_owned()][..])
        );
        let args = c.args.clone().unwrap().join(" ");
        assert_eq!(
            args,
            format!(
                "inference --model-uri file:///models/minilm/model.safetensors --model-sha256 {} \
                 --model-name minilm --model-version 2 --device cuda --max-batch-size 32 \
                 --max-delay-ms 2 --max-queue-depth 1024",
                crate::test_fixtures::SHA
            )
        );
    }

    #[test]
    fn preprocess_runs_with_the_mounted_config_and_its_hash() {
        let v = validate(&text_pipeline()).unwrap();
        let d = &build(&v, &blue(&v), &cfg()).unwrap().deployments[0];
        let c = &pod(d).containers[0];
        assert_eq!(
            c.args.clone().unwrap().join(" "),
            "preprocess --config /etc/tandem/pipeline.yaml"
        );
        let hash = &d
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[ANNOTATION_CONFIG_HASH];
        assert_eq!(hash, &short_hash(&render_worker_config(&v).unwrap()));
    }

    #[test]
    fn inference_runs_the_planned_count_and_preprocess_its_desired_count_within_bounds() {
        let v = validate(&text_pipeline()).unwrap();
        let plan = |replicas| ColorPlan {
            color: Color::Blue,
            model: ModelRef::from(&v.inference.model),
            replicas,
        };
        let replicas = |d: Deployment| d.spec.unwrap().replicas.unwrap();
        // The plan is already within bounds (or a rollout's split); the builder keeps it.
        assert_eq!(replicas(inference_deployment(&v, &cfg(), &plan(3))), 3);
        assert_eq!(replicas(inference_deployment(&v, &cfg(), &plan(1))), 1);
        assert_eq!(replicas(preprocess_deployment(&v, &cfg(), "", Some(0))), 1);
        assert_eq!(replicas(preprocess_deployment(&v, &cfg(), "", Some(3))), 3);
    }

    #[test]
    fn an_operator_upgrade_alone_leaves_every_pod_template_unchanged() {
        let v = validate(&text_pipeline()).unwrap();
        let templates = |version: &str| {
            let cfg = BuildConfig {
                operator_version: version.into(),
                ..cfg()
            };
            let built = build(&v, &blue(&v), &cfg).unwrap().deployments;
            let labels = built[0].metadata.labels.clone().unwrap();
            let templates: Vec<_> = built
                .into_iter()
                .map(|d| d.spec.unwrap().template)
                .collect();
            (labels, templates)
        };
        let (old_labels, old) = templates("0.1.0");
        let (new_labels, new) = templates("0.1.1");
        assert_eq!(old, new, "a new pod template rolls every worker pod");
        // The objects themselves still say which operator version wrote them.
        assert_eq!(old_labels[crate::build::LABEL_VERSION], "0.1.0");
        assert_eq!(new_labels[crate::build::LABEL_VERSION], "0.1.1");
    }

    #[test]
    fn a_stage_s_scheduling_reaches_its_own_pod_spec_and_no_other() {
        let plain = validate(&text_pipeline()).unwrap();
        let plain = build(&plain, &blue(&plain), &cfg()).unwrap().deployments;
        let template = |d: &Deployment| d.spec.as_ref().unwrap().template.clone();
        let mut p = text_pipeline();
        p.spec.inference.scheduling = Some(crate::test_fixtures::gpu_scheduling());
        let v = validate(&p).unwrap();
        let built = build(&v, &blue(&v), &cfg()).unwrap().deployments;
        let (pre, inf) = (pod(&built[0]), pod(&built[1]));
        assert_eq!(
            inf.node_selector,
            Some(BTreeMap::from([(
                "nvidia.com/gpu.product".to_owned(),
                "NVIDIA-H100-80GB-HBM3".to_owned()
            )]))
        );
        let toleration = &inf.tolerations.as_ref().unwrap()[..];
        assert_eq!(toleration.len(), 1);
        assert_eq!(toleration[0].key.as_deref(), Some("nvidia.com/gpu"));
        assert_eq!(toleration[0].operator.as_deref(), Some("Exists"));
        assert_eq!(toleration[0].effect.as_deref(), Some("NoSchedule"));
        assert_eq!(toleration[0].value, None);
        assert_eq!((&pre.node_selector, &pre.tolerations), (&None, &None));
        assert_eq!(
            template(&built[0]),
            template(&plain[0]),
            "preprocess untouched"
        );

        // And the other way round, on every color.
        let mut p = text_pipeline();
        p.spec.preprocess.scheduling = Some(crate::test_fixtures::gpu_scheduling());
        let v = validate(&p).unwrap();
        let both = Observed {
            colors: vec![
                ColorPlan {
                    color: Color::Blue,
                    model: ModelRef::from(&v.inference.model),
                    replicas: 1,
                },
                ColorPlan {
                    color: Color::Green,
                    model: ModelRef::from(&v.inference.model),
                    replicas: 1,
                },
            ],
            preprocess_desired: None,
        };
        let built = build(&v, &both, &cfg()).unwrap().deployments;
        assert_eq!(built.len(), 3);
        assert!(pod(&built[0]).node_selector.is_some() && pod(&built[0]).tolerations.is_some());
        for d in &built[1..] {
            assert_eq!((&pod(d).node_selector, &pod(d).tolerations), (&None, &None));
        }
        assert_eq!(
            template(&built[1]),
            template(&plain[1]),
            "inference untouched"
        );
    }

    #[test]
    fn a_pipeline_without_scheduling_builds_the_pod_templates_it_built_before_the_field() {
        let templates = |p: &crate::crd::InferencePipeline| -> Vec<PodTemplateSpec> {
            let v = validate(p).unwrap();
            build(&v, &blue(&v), &cfg())
                .unwrap()
                .deployments
                .into_iter()
                .map(|d| d.spec.unwrap().template)
                .collect()
        };
        for absent in [text_pipeline(), image_pipeline()] {
            let before = templates(&absent);
            for t in &before {
                let json = serde_json::to_value(t).unwrap();
                let spec = json["spec"].as_object().unwrap();
                assert!(
                    !spec.contains_key("nodeSelector") && !spec.contains_key("tolerations"),
                    "{json}"
                );
            }
            // `scheduling: {}` (what is left after removing every entry) sets nothing either.
            let mut empty = absent.clone();
            empty.spec.preprocess.scheduling = Some(Box::default());
            empty.spec.inference.scheduling = Some(Box::default());
            assert_eq!(
                templates(&empty),
                before,
                "a new pod template rolls the pods"
            );
        }
    }

    /// docs/examples/networkpolicy/worker-control.yaml, which docs/operations.md tells users
    /// to apply: it must select every worker pod the operator builds, keep the data and metrics
    /// ports open and let only the operator reach the control port.
    #[test]
    fn the_documented_network_policy_selects_every_worker_pod_and_guards_only_the_control_port() {
        use k8s_openapi::api::networking::v1::NetworkPolicy;
        let policy: NetworkPolicy = serde_yaml_ng::from_str(include_str!(
            "../../../docs/examples/networkpolicy/worker-control.yaml"
        ))
        .unwrap();
        let spec = policy.spec.unwrap();
        let selector = spec.pod_selector.unwrap().match_labels.unwrap();
        for pipeline in [text_pipeline(), crate::test_fixtures::image_pipeline()] {
            let v = validate(&pipeline).unwrap();
            for d in build(&v, &blue(&v), &cfg()).unwrap().deployments {
                let labels = d.spec.unwrap().template.metadata.unwrap().labels.unwrap();
                for (k, val) in &selector {
                    assert_eq!(labels.get(k), Some(val), "{k}");
                }
            }
        }
        let rules = spec.ingress.unwrap();
        let ports = |i: usize| -> Vec<i32> {
            rules[i]
                .ports
                .iter()
                .flatten()
                .map(|p| match p.port {
                    Some(IntOrString::Int(n)) => n,
                    _ => panic!("numeric ports"),
                })
                .collect()
        };
        assert_eq!(rules.len(), 2);
        assert!(rules[0].from.is_none(), "open to every pod");
        assert_eq!(ports(0), [PORT_HTTP, PORT_GRPC, PORT_METRICS]);
        let from = rules[1].from.as_ref().unwrap();
        assert_eq!(from.len(), 1);
        assert!(from[0].namespace_selector.is_some() && from[0].pod_selector.is_some());
        assert_eq!(ports(1), [PORT_CONTROL]);
    }

    #[test]
    fn deployment_selectors_are_the_stable_subset_of_pod_labels() {
        let v = validate(&text_pipeline()).unwrap();
        for d in build(&v, &blue(&v), &cfg()).unwrap().deployments {
            let spec = d.spec.unwrap();
            let sel = spec.selector.match_labels.unwrap();
            let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
            for (k, val) in &sel {
                assert_eq!(pod_labels.get(k), Some(val));
            }
            assert!(!sel.contains_key(crate::build::LABEL_VERSION));
        }
    }
}
