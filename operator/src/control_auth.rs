//! Tokens for the workers' control port (`tandem.v1.WorkerControl`: `GetStats`, `SetRoutes`).
//!
//! Whoever can push a routing table to a preprocess pod decides where its pipeline's inference
//! traffic goes, so the control port takes calls only with the pipeline's token. The operator
//! holds one secret key (a file, mounted from a Secret the chart creates) and derives each
//! pipeline's token from it: `HMAC-SHA256(key, namespace NUL name NUL uid)`, hex. Every worker
//! pod of the pipeline gets its token in `TANDEM_CONTROL_TOKEN`; every call the operator makes
//! carries `authorization: Bearer <token>`. A token opens one pipeline only: someone who can
//! read a pipeline's pod spec (its namespace's users) learns nothing about another's, and the
//! operator stores no token anywhere but in the pod templates it writes. A pipeline created
//! again under the same name gets a new token (its UID changes).
//!
//! Without a key (`--control-key-file` unset) pods get no token and calls carry none: the
//! workers then take every call, as before.
//!
//! Changing the key changes every token, so every worker pod rolls; until a pod is replaced it
//! still holds the token derived from the old key. With that key given as the previous one
//! (`--previous-control-key-file`), a call a pod refuses with `UNAUTHENTICATED` is made once
//! more with the previous token ([`call`]), so pods not yet replaced keep taking routing
//! tables and stats polls through the roll. New pods only ever get the current token.

use std::fmt::Write as _;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Fewest key bytes accepted: the chart generates 64 characters.
pub const MIN_KEY_BYTES: usize = 32;

/// The operator's secret for deriving control tokens. Its `Debug` output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ControlKey(Box<[u8]>);

impl std::fmt::Debug for ControlKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlKey({} bytes)", self.0.len())
    }
}

/// Why a key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("reading the control key file {path}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Too short to be a secret.
    #[error(
        "the control key is {0} bytes; at least {MIN_KEY_BYTES} are needed (the chart generates 64 characters)"
    )]
    TooShort(usize),
}

impl ControlKey {
    /// The key in `path`, trailing whitespace (a newline left by an editor) removed.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// A key from its bytes, trailing whitespace removed.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let trimmed = bytes.trim_ascii_end();
        if trimmed.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort(trimmed.len()));
        }
        Ok(Self(trimmed.into()))
    }

    /// The control token of the pipeline `namespace/name` with `uid`: 64 hex characters.
    pub fn token(&self, namespace: &str, name: &str, uid: &str) -> String {
        // Any key length is valid for HMAC; this cannot fail.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            return String::new();
        };
        for (i, part) in [namespace, name, uid].into_iter().enumerate() {
            if i > 0 {
                mac.update(&[0]);
            }
            mac.update(part.as_bytes());
        }
        let mut hex = String::with_capacity(64);
        for b in mac.finalize().into_bytes() {
            // Writing to a String cannot fail.
            let _ = write!(hex, "{b:02x}");
        }
        hex
    }
}

/// The key tokens are derived from now and, during a rotation, the one before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlKeys {
    current: ControlKey,
    previous: Option<ControlKey>,
}

impl ControlKeys {
    /// The current key and, while pods may still carry tokens derived from it, the previous
    /// one (ignored when it equals the current key).
    pub fn new(current: ControlKey, previous: Option<ControlKey>) -> Self {
        let previous = previous.filter(|p| *p != current);
        Self { current, previous }
    }

    /// The key new pod templates get their token from.
    pub fn current(&self) -> &ControlKey {
        &self.current
    }

    /// Whether a previous key is still accepted.
    pub fn has_previous(&self) -> bool {
        self.previous.is_some()
    }

    /// The tokens of the pipeline `namespace/name` with `uid` a call may present.
    pub fn tokens(&self, namespace: &str, name: &str, uid: &str) -> Tokens {
        Tokens {
            current: self.current.token(namespace, name, uid).into(),
            previous: self
                .previous
                .as_ref()
                .map(|k| k.token(namespace, name, uid).into()),
        }
    }
}

/// A pipeline's current token and, during a key rotation, its previous one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// Derived from the current key: what new pods carry.
    pub current: Box<str>,
    /// Derived from the previous key: what pods not yet replaced carry.
    pub previous: Option<Box<str>>,
}

/// Makes a control call with the current token; when the pod refuses it as
/// `UNAUTHENTICATED` and a previous token exists, makes it once more with that one. `make`
/// builds the call for a token (`None`: no key, no token).
pub async fn call<T, F, Fut>(tokens: Option<&Tokens>, mut make: F) -> Result<T, tonic::Status>
where
    F: FnMut(Option<&str>) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let first = make(tokens.map(|t| &*t.current)).await;
    match (first, tokens.and_then(|t| t.previous.as_deref())) {
        (Err(status), Some(previous)) if status.code() == tonic::Code::Unauthenticated => {
            make(Some(previous)).await
        }
        (answer, _) => answer,
    }
}

/// The environment variable worker pods read their token from.
pub const TOKEN_ENV: &str = "TANDEM_CONTROL_TOKEN";

/// `message` as a request carrying `authorization: Bearer <token>` when there is a token.
pub fn request<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = token
        .filter(|t| !t.is_empty())
        .and_then(|t| format!("Bearer {t}").parse().ok())
    {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ControlKey {
        ControlKey::from_bytes(b"0123456789abcdef0123456789abcdef0123456789abcdef\n").unwrap()
    }

    #[test]
    fn a_token_is_the_hmac_of_namespace_name_and_uid_and_differs_per_pipeline() {
        let k = key();
        let t = k.token("ml", "embed", "u-1");
        assert_eq!(t.len(), 64);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(t, k.token("ml", "embed", "u-1"), "stable");
        assert_ne!(t, k.token("ml", "embed", "u-2"), "a pipeline created again");
        assert_ne!(t, k.token("ml", "chat", "u-1"));
        assert_ne!(t, k.token("other", "embed", "u-1"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(k.token("ab", "c", "u"), k.token("a", "bc", "u"));
        let other = ControlKey::from_bytes(&[7; 48]).unwrap();
        assert_ne!(t, other.token("ml", "embed", "u-1"), "another key");
        // Computed apart, with Python's hmac module: hmac.new(b"0123…cdef" (48 bytes, the
        // newline trimmed), b"ml\0embed\0u-1", hashlib.sha256).hexdigest().
        assert_eq!(
            t,
            "2f6ea257366220bc28ff153297c0e9d6d28eaf267ec2b6ffb158ad3737fcc716"
        );
    }

    #[test]
    fn a_short_key_is_refused_and_the_key_never_shows_in_debug_output() {
        let e = ControlKey::from_bytes(b"short key\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "the control key is 9 bytes; at least 32 are needed (the chart generates 64 characters)"
        );
        let k = key();
        assert_eq!(format!("{k:?}"), "ControlKey(48 bytes)");
    }

    /// A stand-in for a worker pod's control port: takes calls with `accepts` only, and
    /// records every token it was offered.
    async fn pod_call(
        accepts: &str,
        offered: &std::sync::Mutex<Vec<Option<String>>>,
        token: Option<String>,
    ) -> Result<&'static str, tonic::Status> {
        let taken = token.as_deref() == Some(accepts);
        offered.lock().unwrap().push(token);
        if taken {
            Ok("answer")
        } else {
            Err(tonic::Status::unauthenticated("wrong token"))
        }
    }

    #[tokio::test]
    async fn a_pod_still_on_the_previous_keys_token_is_called_again_with_it_and_others_once() {
        let old = key();
        let new = ControlKey::from_bytes(&[7; 48]).unwrap();
        let keys = ControlKeys::new(new.clone(), Some(old.clone()));
        let tokens = keys.tokens("ml", "embed", "u-1");
        assert_eq!(&*tokens.current, new.token("ml", "embed", "u-1"));
        let previous = old.token("ml", "embed", "u-1");
        assert_eq!(tokens.previous.as_deref(), Some(previous.as_str()));

        // A pod created before the rotation: refused once, then answered.
        let offered = std::sync::Mutex::new(Vec::new());
        let answer = call(Some(&tokens), |t| {
            pod_call(&previous, &offered, t.map(str::to_owned))
        })
        .await;
        assert_eq!(answer.unwrap(), "answer");
        assert_eq!(
            *offered.lock().unwrap(),
            [Some(tokens.current.to_string()), Some(previous.clone())]
        );

        // A pod created after it: one call.
        let offered = std::sync::Mutex::new(Vec::new());
        let answer = call(Some(&tokens), |t| {
            pod_call(&tokens.current, &offered, t.map(str::to_owned))
        })
        .await;
        assert_eq!(answer.unwrap(), "answer");
        assert_eq!(offered.lock().unwrap().len(), 1);

        // Without a previous key, the old pod stays refused: one call, its error returned.
        let current_only = ControlKeys::new(new.clone(), None).tokens("ml", "embed", "u-1");
        let offered = std::sync::Mutex::new(Vec::new());
        let e = call(Some(&current_only), |t| {
            pod_call(&previous, &offered, t.map(str::to_owned))
        })
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(offered.lock().unwrap().len(), 1);

        // Other errors are not retried with another token.
        let offered = std::sync::Mutex::new(Vec::new());
        let e = call(Some(&tokens), |t| {
            offered.lock().unwrap().push(t.map(str::to_owned));
            async { Err::<(), _>(tonic::Status::unavailable("down")) }
        })
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert_eq!(offered.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_previous_key_equal_to_the_current_one_is_no_previous_key() {
        let keys = ControlKeys::new(key(), Some(key()));
        assert!(!keys.has_previous());
        assert_eq!(keys.tokens("a", "b", "c").previous, None);
    }

    #[test]
    fn a_request_carries_the_bearer_token_only_when_there_is_one() {
        let r = request((), Some("abc"));
        assert_eq!(
            r.metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer abc")
        );
        assert!(request((), None).metadata().get("authorization").is_none());
        assert!(
            request((), Some(""))
                .metadata()
                .get("authorization")
                .is_none()
        );
    }
}
