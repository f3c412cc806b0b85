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
