//! Resolves a container's environment (`env`, `envFrom`, `valueFrom`) and expands `$(VAR)`
//! references in env values, `command` and `args`, the way the kubelet does.
//!
//! Pure: ConfigMaps and Secrets are fetched by the caller and passed in as [`Sources`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, EnvVarSource, Pod};

/// The data of the ConfigMaps and Secrets of one namespace that the pod refers to.
/// A name mapped to `None` was looked up and does not exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// ConfigMap name → data and binaryData.
    pub config_maps: BTreeMap<String, Option<BTreeMap<String, Vec<u8>>>>,
    /// Secret name → data.
    pub secrets: BTreeMap<String, Option<BTreeMap<String, Vec<u8>>>>,
}

/// Why a container's environment could not be built (the kubelet reports these as
/// `CreateContainerConfigError`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// A referenced ConfigMap does not exist.
    #[error("configmap {0:?} not found")]
    ConfigMapMissing(String),
    /// A referenced ConfigMap key does not exist.
    #[error("couldn't find key {key:?} in ConfigMap {name:?}")]
    ConfigMapKeyMissing {
        /// ConfigMap name.
        name: String,
        /// Missing key.
        key: String,
    },
    /// A referenced Secret does not exist.
    #[error("secret {0:?} not found")]
    SecretMissing(String),
    /// A referenced Secret key does not exist.
    #[error("couldn't find key {key:?} in Secret {name:?}")]
    SecretKeyMissing {
        /// Secret name.
        name: String,
        /// Missing key.
        key: String,
    },
    /// A `fieldRef` names a field this agent does not support.
    #[error("unsupported fieldRef fieldPath {0:?}")]
    UnsupportedFieldPath(String),
    /// `valueFrom` is empty or uses a source this agent does not support.
    #[error("env var {0:?}: unsupported valueFrom")]
    UnsupportedValueFrom(String),
}

/// Pod facts that only exist at run time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeFacts {
    /// The pod's IP.
    pub pod_ip: String,
    /// The node's IP.
    pub host_ip: String,
}

/// Resolves the value of one `fieldRef` path.
pub fn field_ref(pod: &Pod, facts: &RuntimeFacts, path: &str) -> Result<String, EnvError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        "status.podIP" | "status.podIPs" => facts.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.clone(),
        other => {
            let lookup = |prefix: &str, map: Option<&BTreeMap<String, String>>| {
                let key = other
                    .strip_prefix(prefix)?
                    .strip_prefix('\'')?
                    .strip_suffix("']")?;
                Some(map.and_then(|m| m.get(key)).cloned().unwrap_or_default())
            };
            if let Some(v) = lookup("metadata.labels[", meta.labels.as_ref()) {
                v
            } else if let Some(v) = lookup("metadata.annotations[", meta.annotations.as_ref()) {
                v
            } else {
                return Err(EnvError::UnsupportedFieldPath(other.to_owned()));
            }
        }
    };
    Ok(value)
}

/// Env values are text: bytes that are not UTF-8 are replaced.
fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

fn value_from(
    name: &str,
    source: &EnvVarSource,
    pod: &Pod,
    container: &Container,
    facts: &RuntimeFacts,
    sources: &Sources,
) -> Result<Option<String>, EnvError> {
    if let Some(f) = &source.field_ref {
        return field_ref(pod, facts, &f.field_path).map(Some);
    }
    if let Some(r) = &source.config_map_key_ref {
        let optional = r.optional.unwrap_or(false);
        return match sources.config_maps.get(&r.name).and_then(Option::as_ref) {
            None if optional => Ok(None),
            None => Err(EnvError::ConfigMapMissing(r.name.clone())),
            Some(data) => match data.get(&r.key) {
                Some(v) => Ok(Some(text(v))),
                None if optional => Ok(None),
                None => Err(EnvError::ConfigMapKeyMissing {
                    name: r.name.clone(),
                    key: r.key.clone(),
                }),
            },
        };
    }
    if let Some(r) = &source.secret_key_ref {
        let optional = r.optional.unwrap_or(false);
        return match sources.secrets.get(&r.name).and_then(Option::as_ref) {
            None if optional => Ok(None),
            None => Err(EnvError::SecretMissing(r.name.clone())),
            Some(data) => match data.get(&r.key) {
                Some(v) => Ok(Some(text(v))),
                None if optional => Ok(None),
                None => Err(EnvError::SecretKeyMissing {
                    name: r.name.clone(),
                    key: r.key.clone(),
                }),
            },
        };
    }
    if let Some(r) = &source.resource_field_ref {
        // No cgroups here: report the container's own limit (else request), else "0".
        let resources = container.resources.as_ref();
        let key = r
            .resource
            .trim_start_matches("limits.")
            .trim_start_matches("requests.");
        let q = resources
            .and_then(|res| res.limits.as_ref())
            .and_then(|l| l.get(key))
            .or_else(|| {
                resources
                    .and_then(|res| res.requests.as_ref())
                    .and_then(|l| l.get(key))
            });
        return Ok(Some(
            q.map(|q| q.0.clone()).unwrap_or_else(|| "0".to_owned()),
        ));
    }
    Err(EnvError::UnsupportedValueFrom(name.to_owned()))
}

/// Builds the container's environment in Kubernetes order: `envFrom` sources first, then `env`
/// (later entries win), with `$(VAR)` in `env` values expanded against the variables defined so
/// far (including `base`, the agent-provided variables, which come first and may be overridden).
pub fn resolve_env(
    pod: &Pod,
    container: &Container,
    facts: &RuntimeFacts,
    sources: &Sources,
    base: &[(String, String)],
) -> Result<Vec<(String, String)>, EnvError> {
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        if let Some(slot) = env.iter_mut().find(|(name, _)| *name == k) {
            slot.1 = v;
        } else {
            env.push((k, v));
        }
    };
    for (k, v) in base {
        set(&mut env, k.clone(), v.clone());
    }
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match sources.config_maps.get(&r.name).and_then(Option::as_ref) {
                Some(data) => {
                    for (k, v) in data {
                        set(&mut env, format!("{prefix}{k}"), text(v));
                    }
                }
                None if r.optional.unwrap_or(false) => {}
                None => return Err(EnvError::ConfigMapMissing(r.name.clone())),
            }
        }
        if let Some(r) = &from.secret_ref {
            match sources.secrets.get(&r.name).and_then(Option::as_ref) {
                Some(data) => {
                    for (k, v) in data {
                        set(&mut env, format!("{prefix}{k}"), text(v));
                    }
                }
                None if r.optional.unwrap_or(false) => {}
                None => return Err(EnvError::SecretMissing(r.name.clone())),
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(from)) => value_from(&var.name, from, pod, container, facts, sources)?,
            (Some(v), None) => Some(expand(v, &env)),
            (None, None) => Some(String::new()),
        };
        if let Some(v) = value {
            set(&mut env, var.name.clone(), v);
        }
    }
    Ok(env)
}

/// Expands `$(NAME)` references against `vars`; `$$` escapes `$`; unknown references stay as
/// written (the Kubernetes rule).
pub fn expand(input: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match vars.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The ConfigMap and Secret names a container's env refers to (to fetch before [`resolve_env`]).
pub fn referenced_sources(container: &Container) -> (Vec<String>, Vec<String>) {
    let mut cms = Vec::new();
    let mut secrets = Vec::new();
    for from in container.env_from.iter().flatten() {
        if let Some(r) = &from.config_map_ref {
            cms.push(r.name.clone());
        }
        if let Some(r) = &from.secret_ref {
            secrets.push(r.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(from) = &var.value_from {
            if let Some(r) = &from.config_map_key_ref {
                cms.push(r.name.clone());
            }
            if let Some(r) = &from.secret_key_ref {
                secrets.push(r.name.clone());
            }
        }
    }
    (cms, secrets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p1", "namespace": "ns1", "uid": "u-1", "labels": {"app": "web"}},
            "spec": {"nodeName": "tandem-node-1", "serviceAccountName": "op", "containers": [{"name": "c"}]}
        }))
        .expect("valid pod")
    }

    fn container(v: serde_json::Value) -> Container {
        serde_json::from_value(v).expect("valid container")
    }

    fn facts() -> RuntimeFacts {
        RuntimeFacts {
            pod_ip: "10.244.0.7".into(),
            host_ip: "10.244.0.1".into(),
        }
    }

    fn sources() -> Sources {
        let mut s = Sources::default();
        s.config_maps.insert(
            "cfg".into(),
            Some(BTreeMap::from([
                ("A".into(), b"1".to_vec()),
                ("B".into(), b"2".to_vec()),
            ])),
        );
        s.config_maps.insert("gone".into(), None);
        s.secrets.insert(
            "sec".into(),
            Some(BTreeMap::from([("pw".into(), b"hunter2".to_vec())])),
        );
        s
    }

    fn get<'a>(env: &'a [(String, String)], k: &str) -> Option<&'a str> {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn field_refs_resolve_name_namespace_ip_node_and_service_account() {
        let c = container(json!({"name": "c", "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        ]}));
        let env = resolve_env(&pod(), &c, &facts(), &sources(), &[]).expect("env");
        assert_eq!(get(&env, "POD_NAME"), Some("p1"));
        assert_eq!(get(&env, "POD_NAMESPACE"), Some("ns1"));
        assert_eq!(get(&env, "POD_IP"), Some("10.244.0.7"));
        assert_eq!(get(&env, "NODE"), Some("tandem-node-1"));
        assert_eq!(get(&env, "SA"), Some("op"));
        assert_eq!(get(&env, "APP"), Some("web"));
    }

    #[test]
    fn env_from_comes_first_and_env_overrides_it() {
        let c = container(json!({"name": "c",
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "X_"}, {"secretRef": {"name": "sec"}}],
            "env": [{"name": "X_A", "value": "override"}]}));
        let env = resolve_env(&pod(), &c, &facts(), &sources(), &[]).expect("env");
        assert_eq!(get(&env, "X_A"), Some("override"));
        assert_eq!(get(&env, "X_B"), Some("2"));
        assert_eq!(get(&env, "pw"), Some("hunter2"));
    }

    #[test]
    fn key_refs_read_config_maps_and_secrets() {
        let c = container(json!({"name": "c", "env": [
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "A"}}},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "pw"}}},
        ]}));
        let env = resolve_env(&pod(), &c, &facts(), &sources(), &[]).expect("env");
        assert_eq!(get(&env, "A"), Some("1"));
        assert_eq!(get(&env, "PW"), Some("hunter2"));
    }

    #[test]
    fn missing_required_config_map_is_an_error_but_optional_is_skipped() {
        let c = container(json!({"name": "c", "env": [
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "A"}}}]}));
        assert_eq!(
            resolve_env(&pod(), &c, &facts(), &sources(), &[]),
            Err(EnvError::ConfigMapMissing("gone".into()))
        );
        let c = container(json!({"name": "c", "env": [
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "A", "optional": true}}}]}));
        let env = resolve_env(&pod(), &c, &facts(), &sources(), &[]).expect("env");
        assert_eq!(get(&env, "A"), None);
        let c = container(json!({"name": "c", "env": [
            {"name": "A", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "nope"}}}]}));
        assert!(matches!(
            resolve_env(&pod(), &c, &facts(), &sources(), &[]),
            Err(EnvError::SecretKeyMissing { .. })
        ));
    }

    #[test]
    fn values_expand_earlier_variables_and_keep_unknown_references() {
        let c = container(json!({"name": "c", "env": [
            {"name": "HOST", "value": "h"},
            {"name": "URL", "value": "http://$(HOST):$(PORT)/$$(HOST)"},
        ]}));
        let env = resolve_env(
            &pod(),
            &c,
            &facts(),
            &sources(),
            &[("BASE".into(), "b".into())],
        )
        .expect("env");
        assert_eq!(get(&env, "URL"), Some("http://h:$(PORT)/$(HOST)"));
        assert_eq!(get(&env, "BASE"), Some("b"));
    }

    #[test]
    fn expand_handles_edge_cases() {
        let vars = vec![("A".to_owned(), "x".to_owned())];
        assert_eq!(expand("$(A)$(A)", &vars), "xx");
        assert_eq!(expand("a$b", &vars), "a$b");
        assert_eq!(expand("$(A", &vars), "$(A");
        assert_eq!(expand("$", &vars), "$");
        assert_eq!(expand("$$$(A)", &vars), "$x");
    }

    #[test]
    fn referenced_sources_lists_env_and_env_from_names() {
        let c = container(json!({"name": "c",
            "envFrom": [{"configMapRef": {"name": "a"}}],
            "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}));
        assert_eq!(
            referenced_sources(&c),
            (vec!["a".to_owned()], vec!["s".to_owned()])
        );
    }
}
