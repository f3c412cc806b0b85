//! Builders for the supporting objects: ServiceAccount, ConfigMap, Service, PodDisruptionBudget.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    BuildConfig, CONFIG_FILE, PORT_GRPC, PORT_HTTP, Stage, names, object_meta, selector_labels,
};
use crate::validate::ValidatedPipeline;

/// The workers' identity. Workers never call the Kubernetes API (the operator pushes routes
/// to them), so no token is mounted.
pub fn service_account(v: &ValidatedPipeline, cfg: &BuildConfig) -> ServiceAccount {
    ServiceAccount {
        metadata: object_meta(v, cfg, names::service_account(&v.meta.name), None, None),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

/// `pipeline.yaml` for the preprocess workers.
pub fn config_map(v: &ValidatedPipeline, cfg: &BuildConfig, yaml: &str) -> ConfigMap {
    ConfigMap {
        metadata: object_meta(v, cfg, names::config(&v.meta.name), None, None),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_owned(), yaml.to_owned())])),
        ..ConfigMap::default()
    }
}

/// The pipeline's front door: gRPC and HTTP of the preprocess pods.
pub fn service(v: &ValidatedPipeline, cfg: &BuildConfig) -> Service {
    Service {
        metadata: object_meta(
            v,
            cfg,
            names::service(&v.meta.name),
            Some(Stage::Preprocess),
            None,
        ),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector_labels(&v.meta.name, Stage::Preprocess, None)),
            ports: Some(vec![
                ServicePort {
                    name: Some("grpc".to_owned()),
                    port: PORT_GRPC,
                    target_port: Some(IntOrString::String("grpc".to_owned())),
                    protocol: Some("TCP".to_owned()),
                    app_protocol: Some("kubernetes.io/h2c".to_owned()),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("http".to_owned()),
                    port: PORT_HTTP,
                    target_port: Some(IntOrString::String("http".to_owned())),
                    protocol: Some("TCP".to_owned()),
                    app_protocol: Some("http".to_owned()),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// A PodDisruptionBudget with the Deployment's name and selector: voluntary evictions (node
/// drains) take at most one pod of a stage at a time. Unhealthy pods may always be evicted, so
/// a crash-looping stage never blocks a drain.
pub fn pdb_for(v: &ValidatedPipeline, cfg: &BuildConfig, d: &Deployment) -> PodDisruptionBudget {
    let labels = d.metadata.labels.clone().unwrap_or_default();
    let stage = match labels.get(super::LABEL_COMPONENT).map(String::as_str) {
        Some("inference") => Stage::Inference,
        _ => Stage::Preprocess,
    };
    let color = labels
        .get(super::LABEL_COLOR)
        .and_then(|c| match c.as_str() {
            "blue" => Some(crate::crd::Color::Blue),
            "green" => Some(crate::crd::Color::Green),
            _ => None,
        });
    let selector = d
        .spec
        .as_ref()
        .map(|s| s.selector.clone())
        .unwrap_or_default();
    PodDisruptionBudget {
        metadata: object_meta(
            v,
            cfg,
            d.metadata.name.clone().unwrap_or_default(),
            Some(stage),
            color,
        ),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: selector.match_labels,
                match_expressions: None,
            }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".to_owned()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    use crate::build::tests::{blue, cfg};
    use crate::build::{LABEL_COMPONENT, build};
    use crate::test_fixtures::text_pipeline;
    use crate::validate::validate;

    #[test]
    fn the_worker_service_account_mounts_no_token() {
        let v = validate(&text_pipeline()).unwrap();
        let d = build(&v, &blue(&v), &cfg()).unwrap();
        assert_eq!(
            d.service_account.automount_service_account_token,
            Some(false)
        );
    }

    #[test]
    fn the_front_door_serves_grpc_and_http_of_preprocess_pods_only() {
        let v = validate(&text_pipeline()).unwrap();
        let d = build(&v, &blue(&v), &cfg()).unwrap();
        let spec = d.service.spec.unwrap();
        let ports: Vec<_> = spec
            .ports
            .unwrap()
            .iter()
            .map(|p| (p.name.clone().unwrap(), p.port))
            .collect();
        assert_eq!(
            ports,
            [("grpc".to_owned(), 8001), ("http".to_owned(), 8000)]
        );
        let sel = spec.selector.unwrap();
        assert_eq!(sel[LABEL_COMPONENT], "preprocess");
        assert_eq!(sel["app.kubernetes.io/instance"], "minilm");
    }

    #[test]
    fn each_pdb_selects_exactly_its_deployments_pods() {
        let v = validate(&text_pipeline()).unwrap();
        let d = build(&v, &blue(&v), &cfg()).unwrap();
        for (dep, pdb) in d.deployments.iter().zip(&d.pdbs) {
            let want = dep.spec.as_ref().unwrap().selector.match_labels.clone();
            let got = pdb
                .spec
                .as_ref()
                .unwrap()
                .selector
                .as_ref()
                .unwrap()
                .match_labels
                .clone();
            assert_eq!(got, want);
            assert_eq!(pdb.metadata.labels, dep.metadata.labels);
        }
    }

    #[test]
    fn the_config_map_holds_the_rendered_pipeline_yaml() {
        let v = validate(&text_pipeline()).unwrap();
        let d = build(&v, &blue(&v), &cfg()).unwrap();
        let data = d.config_map.data.unwrap();
        assert!(data["pipeline.yaml"].starts_with("pipeline: minilm\n"));
    }
}
