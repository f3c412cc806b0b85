//! Service account credentials for pods: TokenRequest (bound to the pod) and the kubeconfig
//! that points the pod's clients at the pod-reachable API address.

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

/// TokenRequest failures.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The API call failed.
    #[error("TokenRequest for serviceaccount {namespace}/{name}: {source}")]
    Request {
        /// Namespace.
        namespace: String,
        /// ServiceAccount name.
        name: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The API server answered without a token.
    #[error("TokenRequest for serviceaccount {0} returned no token")]
    Empty(String),
}

/// A token and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The JWT.
    pub token: String,
    /// Expiry reported by the API server.
    pub expires: Option<Timestamp>,
}

/// Identifies the pod a token is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID.
    pub uid: String,
    /// ServiceAccount name.
    pub service_account: String,
}

/// Requests a token for the pod's ServiceAccount, bound to the pod.
pub async fn request(
    client: &kube::Client,
    pod: &PodRef,
    audience: Option<&str>,
    expiration_seconds: i64,
) -> Result<IssuedToken, TokenError> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &pod.namespace);
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_owned()]),
            expiration_seconds: Some(expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(pod.name.clone()),
                uid: Some(pod.uid.clone()),
            }),
        }),
        ..TokenRequest::default()
    };
    let resp: TokenRequest = api
        .create_subresource("token", &pod.service_account, &PostParams::default(), &req)
        .await
        .map_err(|source| TokenError::Request {
            namespace: pod.namespace.clone(),
            name: pod.service_account.clone(),
            source,
        })?;
    let status = resp.status.unwrap_or_default();
    match status.token {
        Some(token) if !token.is_empty() => Ok(IssuedToken {
            token,
            expires: status.expiration_timestamp.map(|t| t.0),
        }),
        _ => Err(TokenError::Empty(format!(
            "{}/{}",
            pod.namespace, pod.service_account
        ))),
    }
}

/// A kubeconfig (JSON is valid YAML) that reads the token from `token_file` on every refresh,
/// so rewriting that file rotates the credential without restarting the process.
pub fn kubeconfig(server: &str, ca_file: &str, token_file: &str, namespace: &str) -> String {
    let cfg = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "tandem", "cluster": {"server": server, "certificate-authority": ca_file}}],
        "users": [{"name": "pod", "user": {"tokenFile": token_file}}],
        "contexts": [{"name": "tandem", "context": {"cluster": "tandem", "user": "pod", "namespace": namespace}}],
        "current-context": "tandem",
    });
    serde_json::to_string_pretty(&cfg).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_points_at_the_pod_reachable_server_with_a_token_file() {
        let text = kubeconfig("https://10.244.0.1:6443", "/s/ca.crt", "/s/token", "ns1");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://10.244.0.1:6443"
        );
        assert_eq!(v["users"][0]["user"]["tokenFile"], "/s/token");
        assert_eq!(v["contexts"][0]["context"]["namespace"], "ns1");
        assert_eq!(v["current-context"], "tandem");
    }
}
