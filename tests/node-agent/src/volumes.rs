//! Pod volumes: plans the files of ConfigMap, Secret, projected, downwardAPI and emptyDir
//! volumes (pure, [`plan_volume`]) and writes them under the pod's directory ([`write_files`]).
//! Service account tokens in projected volumes are planned as [`Content::Token`] and filled in by
//! the pod runtime, which requests and refreshes them.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{KeyToPath, Pod, Volume};

use crate::env::{RuntimeFacts, Sources, field_ref};

/// Why a volume cannot be materialised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// A referenced ConfigMap is missing.
    #[error("volume {volume:?}: configmap {name:?} not found")]
    ConfigMapMissing {
        /// Volume name.
        volume: String,
        /// ConfigMap name.
        name: String,
    },
    /// A referenced Secret is missing.
    #[error("volume {volume:?}: secret {name:?} not found")]
    SecretMissing {
        /// Volume name.
        volume: String,
        /// Secret name.
        name: String,
    },
    /// An item names a key that does not exist.
    #[error("volume {volume:?}: key {key:?} not found")]
    KeyMissing {
        /// Volume name.
        volume: String,
        /// The key.
        key: String,
    },
    /// An item path escapes the volume.
    #[error("volume {volume:?}: path {path:?} must be relative without '..'")]
    BadPath {
        /// Volume name.
        volume: String,
        /// The path.
        path: String,
    },
    /// A downward API field cannot be resolved.
    #[error("volume {volume:?}: {message}")]
    Field {
        /// Volume name.
        volume: String,
        /// Why.
        message: String,
    },
    /// A volume type this agent does not implement.
    #[error(
        "volume {0:?}: unsupported volume type (supported: configMap, secret, projected, downwardAPI, emptyDir, hostPath)"
    )]
    Unsupported(String),
    /// Writing the files failed.
    #[error("writing volume files under {path}: {message}")]
    Io {
        /// The path.
        path: String,
        /// Why.
        message: String,
    },
}

/// The content of one planned file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Fixed bytes.
    Bytes(Vec<u8>),
    /// A service account token for the pod, requested with this audience and lifetime.
    Token {
        /// Audience (`None` = the API server's default).
        audience: Option<String>,
        /// Requested lifetime in seconds.
        expiration_seconds: i64,
    },
}

/// One file of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// Path relative to the volume root.
    pub path: PathBuf,
    /// Its content.
    pub content: Content,
}

/// What a volume becomes on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumePlan {
    /// A directory under the pod dir holding these files (empty for emptyDir).
    Files {
        /// The files.
        files: Vec<PlannedFile>,
        /// emptyDir: created once and kept across container restarts.
        persistent: bool,
    },
    /// A host path bound as is.
    HostPath(PathBuf),
}

fn safe_path(volume: &str, p: &str) -> Result<PathBuf, VolumeError> {
    let path = PathBuf::from(p);
    let ok = !p.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(path)
    } else {
        Err(VolumeError::BadPath {
            volume: volume.to_owned(),
            path: p.to_owned(),
        })
    }
}

fn key_files(
    volume: &str,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    optional: bool,
) -> Result<Vec<PlannedFile>, VolumeError> {
    match items {
        None => data
            .iter()
            .map(|(k, v)| {
                Ok(PlannedFile {
                    path: safe_path(volume, k)?,
                    content: Content::Bytes(v.clone()),
                })
            })
            .collect(),
        Some(items) => {
            let mut out = Vec::new();
            for item in items {
                match data.get(&item.key) {
                    Some(v) => out.push(PlannedFile {
                        path: safe_path(volume, &item.path)?,
                        content: Content::Bytes(v.clone()),
                    }),
                    None if optional => {}
                    None => {
                        return Err(VolumeError::KeyMissing {
                            volume: volume.to_owned(),
                            key: item.key.clone(),
                        });
                    }
                }
            }
            Ok(out)
        }
    }
}

fn lookup<'a>(
    map: &'a BTreeMap<String, Option<BTreeMap<String, Vec<u8>>>>,
    name: &str,
) -> Option<&'a BTreeMap<String, Vec<u8>>> {
    map.get(name).and_then(Option::as_ref)
}

/// Plans one volume's files.
pub fn plan_volume(
    vol: &Volume,
    pod: &Pod,
    facts: &RuntimeFacts,
    sources: &Sources,
) -> Result<VolumePlan, VolumeError> {
    let name = vol.name.as_str();
    let empty = BTreeMap::new();
    if vol.empty_dir.is_some() {
        return Ok(VolumePlan::Files {
            files: Vec::new(),
            persistent: true,
        });
    }
    if let Some(h) = &vol.host_path {
        return Ok(VolumePlan::HostPath(PathBuf::from(&h.path)));
    }
    if let Some(cm) = &vol.config_map {
        let optional = cm.optional.unwrap_or(false);
        let data = match lookup(&sources.config_maps, &cm.name) {
            Some(d) => d,
            None if optional => &empty,
            None => {
                return Err(VolumeError::ConfigMapMissing {
                    volume: name.to_owned(),
                    name: cm.name.clone(),
                });
            }
        };
        return Ok(VolumePlan::Files {
            files: key_files(name, data, cm.items.as_ref(), optional)?,
            persistent: false,
        });
    }
    if let Some(sec) = &vol.secret {
        let optional = sec.optional.unwrap_or(false);
        let secret_name = sec.secret_name.clone().unwrap_or_default();
        let data = match lookup(&sources.secrets, &secret_name) {
            Some(d) => d,
            None if optional => &empty,
            None => {
                return Err(VolumeError::SecretMissing {
                    volume: name.to_owned(),
                    name: secret_name,
                });
            }
        };
        return Ok(VolumePlan::Files {
            files: key_files(name, data, sec.items.as_ref(), optional)?,
            persistent: false,
        });
    }
    if let Some(d) = &vol.downward_api {
        let mut files = Vec::new();
        for item in d.items.iter().flatten() {
            files.push(downward_file(name, item, pod, facts)?);
        }
        return Ok(VolumePlan::Files {
            files,
            persistent: false,
        });
    }
    if let Some(p) = &vol.projected {
        let mut files = Vec::new();
        for src in p.sources.iter().flatten() {
            if let Some(t) = &src.service_account_token {
                files.push(PlannedFile {
                    path: safe_path(name, &t.path)?,
                    content: Content::Token {
                        audience: t.audience.clone().filter(|a| !a.is_empty()),
                        expiration_seconds: t.expiration_seconds.unwrap_or(3600).max(600),
                    },
                });
            }
            if let Some(cm) = &src.config_map {
                let optional = cm.optional.unwrap_or(false);
                match lookup(&sources.config_maps, &cm.name) {
                    Some(d) => files.extend(key_files(name, d, cm.items.as_ref(), optional)?),
                    None if optional => {}
                    None => {
                        return Err(VolumeError::ConfigMapMissing {
                            volume: name.to_owned(),
                            name: cm.name.clone(),
                        });
                    }
                }
            }
            if let Some(sec) = &src.secret {
                let optional = sec.optional.unwrap_or(false);
                match lookup(&sources.secrets, &sec.name) {
                    Some(d) => files.extend(key_files(name, d, sec.items.as_ref(), optional)?),
                    None if optional => {}
                    None => {
                        return Err(VolumeError::SecretMissing {
                            volume: name.to_owned(),
                            name: sec.name.clone(),
                        });
                    }
                }
            }
            if let Some(d) = &src.downward_api {
                for item in d.items.iter().flatten() {
                    files.push(downward_file(name, item, pod, facts)?);
                }
            }
        }
        return Ok(VolumePlan::Files {
            files,
            persistent: false,
        });
    }
    Err(VolumeError::Unsupported(name.to_owned()))
}

fn downward_file(
    volume: &str,
    item: &k8s_openapi::api::core::v1::DownwardAPIVolumeFile,
    pod: &Pod,
    facts: &RuntimeFacts,
) -> Result<PlannedFile, VolumeError> {
    let field = item.field_ref.as_ref().ok_or_else(|| VolumeError::Field {
        volume: volume.to_owned(),
        message: format!("item {:?}: only fieldRef is supported", item.path),
    })?;
    let value = match field.field_path.as_str() {
        "metadata.labels" | "metadata.annotations" => {
            let map = if field.field_path == "metadata.labels" {
                pod.metadata.labels.clone()
            } else {
                pod.metadata.annotations.clone()
            };
            map.unwrap_or_default()
                .iter()
                .map(|(k, v)| format!("{k}={v:?}\n"))
                .collect::<String>()
        }
        path => field_ref(pod, facts, path).map_err(|e| VolumeError::Field {
            volume: volume.to_owned(),
            message: e.to_string(),
        })?,
    };
    Ok(PlannedFile {
        path: safe_path(volume, &item.path)?,
        content: Content::Bytes(value.into_bytes()),
    })
}

/// The ConfigMap and Secret names the pod's volumes refer to.
pub fn referenced_sources(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let mut cms = Vec::new();
    let mut secrets = Vec::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        if let Some(cm) = &v.config_map {
            cms.push(cm.name.clone());
        }
        if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secrets.push(s);
        }
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(cm) = &src.config_map {
                cms.push(cm.name.clone());
            }
            if let Some(s) = &src.secret {
                secrets.push(s.name.clone());
            }
        }
    }
    (cms, secrets)
}

/// Writes `files` under `root` (creating it), each atomically via a temp file and rename so a
/// reader never sees a half-written file. Token contents come from `token_for`.
pub fn write_files(
    root: &Path,
    files: &[PlannedFile],
    token_for: &dyn Fn(&Option<String>, i64) -> Option<String>,
) -> Result<(), VolumeError> {
    let io = |p: &Path, e: std::io::Error| VolumeError::Io {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    for f in files {
        let bytes = match &f.content {
            Content::Bytes(b) => b.clone(),
            Content::Token {
                audience,
                expiration_seconds,
            } => match token_for(audience, *expiration_seconds) {
                Some(t) => t.into_bytes(),
                None => continue,
            },
        };
        let path = root.join(&f.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        let tmp = path.with_file_name(format!(
            ".{}.tmp",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        std::fs::write(&tmp, &bytes).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p1", "namespace": "ns1", "labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c"}]}
        }))
        .expect("pod")
    }

    fn vol(v: serde_json::Value) -> Volume {
        serde_json::from_value(v).expect("volume")
    }

    fn sources() -> Sources {
        let mut s = Sources::default();
        s.config_maps.insert(
            "cfg".into(),
            Some(BTreeMap::from([("app.yaml".into(), b"x: 1".to_vec())])),
        );
        s.config_maps.insert(
            "kube-root-ca.crt".into(),
            Some(BTreeMap::from([("ca.crt".into(), b"PEM".to_vec())])),
        );
        s.secrets.insert(
            "sec".into(),
            Some(BTreeMap::from([("k".into(), b"v".to_vec())])),
        );
        s
    }

    fn files(plan: VolumePlan) -> Vec<PlannedFile> {
        match plan {
            VolumePlan::Files { files, .. } => files,
            VolumePlan::HostPath(p) => panic!("unexpected host path {p:?}"),
        }
    }

    #[test]
    fn config_map_volumes_hold_every_key_or_the_listed_items() {
        let f = files(
            plan_volume(
                &vol(json!({"name": "c", "configMap": {"name": "cfg"}})),
                &pod(),
                &RuntimeFacts::default(),
                &sources(),
            )
            .expect("plan"),
        );
        assert_eq!(
            f,
            vec![PlannedFile {
                path: "app.yaml".into(),
                content: Content::Bytes(b"x: 1".to_vec())
            }]
        );
        let f = files(
            plan_volume(
                &vol(json!({"name": "c", "secret": {"secretName": "sec", "items": [{"key": "k", "path": "sub/key"}]}})),
                &pod(),
                &RuntimeFacts::default(),
                &sources(),
            )
            .expect("plan"),
        );
        assert_eq!(f[0].path, PathBuf::from("sub/key"));
    }

    #[test]
    fn the_service_account_projection_plans_token_ca_and_namespace() {
        let v = vol(
            json!({"name": "kube-api-access-x", "projected": {"sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}
            ]}}),
        );
        let f = files(plan_volume(&v, &pod(), &RuntimeFacts::default(), &sources()).expect("plan"));
        assert_eq!(f.len(), 3);
        assert_eq!(
            f[0].content,
            Content::Token {
                audience: None,
                expiration_seconds: 3607
            }
        );
        assert_eq!(f[2].content, Content::Bytes(b"ns1".to_vec()));
    }

    #[test]
    fn missing_sources_and_escaping_paths_are_errors() {
        let v = vol(json!({"name": "c", "configMap": {"name": "nope"}}));
        assert!(matches!(
            plan_volume(&v, &pod(), &RuntimeFacts::default(), &sources()),
            Err(VolumeError::ConfigMapMissing { .. })
        ));
        let v = vol(json!({"name": "c", "configMap": {"name": "nope", "optional": true}}));
        assert!(plan_volume(&v, &pod(), &RuntimeFacts::default(), &sources()).is_ok());
        let v = vol(
            json!({"name": "c", "configMap": {"name": "cfg", "items": [{"key": "app.yaml", "path": "../x"}]}}),
        );
        assert!(matches!(
            plan_volume(&v, &pod(), &RuntimeFacts::default(), &sources()),
            Err(VolumeError::BadPath { .. })
        ));
        let v = vol(json!({"name": "c", "persistentVolumeClaim": {"claimName": "x"}}));
        assert_eq!(
            plan_volume(&v, &pod(), &RuntimeFacts::default(), &sources()),
            Err(VolumeError::Unsupported("c".into()))
        );
    }

    #[test]
    fn written_files_appear_under_the_root_with_tokens_filled_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = vec![
            PlannedFile {
                path: "a/b.txt".into(),
                content: Content::Bytes(b"hi".to_vec()),
            },
            PlannedFile {
                path: "token".into(),
                content: Content::Token {
                    audience: None,
                    expiration_seconds: 600,
                },
            },
        ];
        write_files(dir.path(), &files, &|_, _| Some("tok".into())).expect("write");
        assert_eq!(
            std::fs::read(dir.path().join("a/b.txt")).expect("read"),
            b"hi"
        );
        assert_eq!(
            std::fs::read(dir.path().join("token")).expect("read"),
            b"tok"
        );
    }
}
