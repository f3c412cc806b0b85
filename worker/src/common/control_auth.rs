//! Who may call `tandem.v1.WorkerControl`, on both roles: with a control token configured,
//! only callers that send it.
//!
//! Whoever can call `SetRoutes` on a preprocess pod decides where its pipeline's inference
//! traffic goes. The operator therefore gives every worker pod of a pipeline the pipeline's
//! token (`--control-token`, `TANDEM_CONTROL_TOKEN`) and sends it on each call as gRPC metadata
//! `authorization: Bearer <token>`. [`server`] wraps a role's `WorkerControl` service in
//! [`ControlAuth`], a tonic interceptor that refuses a call without that metadata, or with
//! another token, as `UNAUTHENTICATED`, and counts the refusal. Without a token (standalone
//! use, an operator that sends none) every call is taken, as before. Only the control port is
//! guarded: the OIP ports serve clients, which hold no token.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use subtle::ConstantTimeEq as _;
use tandem_proto::tandem::v1::worker_control_server::{WorkerControl, WorkerControlServer};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};

/// Calls refused for a missing or wrong token, by reason (exposed as `..._total`).
pub const UNAUTHENTICATED: &str = "tandem_worker_control_unauthenticated";

/// Fewest bytes a control token may have: the operator's are 64 hex characters (an
/// HMAC-SHA256), and a short one would be a guessable secret.
pub const MIN_TOKEN_BYTES: usize = 16;

/// The metadata key the token travels in.
const METADATA_KEY: &str = "authorization";

/// What a call without the metadata is told.
const MISSING: &str = "WorkerControl needs \"authorization: Bearer <token>\" (this pod was started with a control token)";

/// What a call with another token is told (never the token sent or the one expected).
const WRONG: &str = "wrong control token";

/// `--control-token` as given on the command line or in `TANDEM_CONTROL_TOKEN`, not yet
/// checked. It is a secret: its `Debug` form hides it, and [`ControlAuth::new`] checks it
/// rather than a clap value parser, whose errors quote the value.
#[derive(Clone)]
pub struct ControlToken(String);

impl From<String> for ControlToken {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl std::fmt::Debug for ControlToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlToken(<hidden>)")
    }
}

/// Why a control token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ControlAuthError {
    /// Shorter than [`MIN_TOKEN_BYTES`].
    #[error(
        "the control token (--control-token, TANDEM_CONTROL_TOKEN) is {0} bytes long; it must be \
         at least {MIN_TOKEN_BYTES} (the operator gives each pipeline a 64-hex-character HMAC), \
         or empty to take WorkerControl calls without one"
    )]
    TooShort(usize),
}

/// Labels of [`UNAUTHENTICATED`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `missing` (no `authorization` metadata) or `wrong` (anything but `Bearer <token>`).
    pub reason: &'static str,
}

/// The counter of refused calls, registered in a role's registry.
pub type Refusals = Family<RefusalLabels, Counter>;

/// Creates the [`UNAUTHENTICATED`] counter and registers it in `registry`.
pub fn register(registry: &mut Registry) -> Refusals {
    let refusals = Refusals::default();
    registry.register(
        UNAUTHENTICATED,
        "WorkerControl calls refused for a missing or wrong control token, by reason",
        refusals.clone(),
    );
    refusals
}

/// The control port's check: the interceptor [`server`] puts before the service.
#[derive(Clone)]
pub struct ControlAuth {
    /// `Bearer <token>`, or `None` to take every call.
    expected: Option<Arc<[u8]>>,
    refusals: Refusals,
}

impl std::fmt::Debug for ControlAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlAuth")
            .field("requires_token", &self.requires_token())
            .finish_non_exhaustive()
    }
}

impl ControlAuth {
    /// The check for `token` (none or empty: no check), counting refusals in `refusals`.
    /// Logs, once per worker, whether the control port requires a token.
    pub fn new(token: Option<&ControlToken>, refusals: Refusals) -> Result<Self, ControlAuthError> {
        let token = token.map(|t| t.0.as_str()).filter(|t| !t.is_empty());
        let expected = match token {
            Some(t) if t.len() < MIN_TOKEN_BYTES => {
                return Err(ControlAuthError::TooShort(t.len()));
            }
            Some(t) => Some(format!("Bearer {t}").into_bytes().into()),
            None => None,
        };
        let auth = Self { expected, refusals };
        if auth.requires_token() {
            tracing::info!(
                "control port requires a control token: WorkerControl calls without \"authorization: Bearer <token>\" are refused"
            );
        } else {
            tracing::info!(
                "control port takes WorkerControl calls without a token (no --control-token)"
            );
        }
        Ok(auth)
    }

    /// Whether calls must carry the token.
    pub fn requires_token(&self) -> bool {
        self.expected.is_some()
    }

    /// `Ok` when `request` may reach the service, else the `UNAUTHENTICATED` status.
    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(expected) = &self.expected else {
            return Ok(());
        };
        let reason = match request.metadata().get(METADATA_KEY) {
            None => "missing",
            // Constant time in the bytes compared; a length that differs answers at once, but
            // every token the operator gives has the same length.
            Some(given) if bool::from(given.as_bytes().ct_eq(expected)) => return Ok(()),
            Some(_) => "wrong",
        };
        self.refusals.get_or_create(&RefusalLabels { reason }).inc();
        // Debug, not warn: a peer that floods the port would flood the log. The counter is
        // the signal to alert on.
        let peer = request.remote_addr();
        tracing::debug!(
            ?peer,
            reason,
            "WorkerControl call refused: no valid control token"
        );
        Err(Status::unauthenticated(if reason == "missing" {
            MISSING
        } else {
            WRONG
        }))
    }
}

impl Interceptor for ControlAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(&request)?;
        Ok(request)
    }
}

/// A role's `WorkerControl` service behind `auth`: the one way both roles build their
/// control server.
pub fn server<T: WorkerControl>(
    service: T,
    auth: ControlAuth,
) -> InterceptedService<WorkerControlServer<T>, ControlAuth> {
    WorkerControlServer::with_interceptor(service, auth)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn auth(token: &str) -> Result<ControlAuth, ControlAuthError> {
        ControlAuth::new(
            Some(&ControlToken::from(token.to_owned())),
            Refusals::default(),
        )
    }

    fn with_authorization(value: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(v) = value {
            r.metadata_mut()
                .insert(METADATA_KEY, v.parse().expect("ASCII metadata"));
        }
        r
    }

    fn refused(a: &ControlAuth, reason: &'static str) -> u64 {
        a.refusals.get_or_create(&RefusalLabels { reason }).get()
    }

    #[test]
    fn a_token_shorter_than_16_bytes_is_refused_without_quoting_it() {
        let e = auth("fifteen-bytes!!").unwrap_err();
        assert_eq!(
            e.to_string(),
            "the control token (--control-token, TANDEM_CONTROL_TOKEN) is 15 bytes long; it must \
             be at least 16 (the operator gives each pipeline a 64-hex-character HMAC), or empty \
             to take WorkerControl calls without one"
        );
        assert!(!e.to_string().contains("fifteen"));
        assert!(auth("sixteen-bytes!!!").is_ok());
    }

    #[test]
    fn no_token_or_an_empty_one_lets_every_call_through() {
        for a in [
            ControlAuth::new(None, Refusals::default()).unwrap(),
            auth("").unwrap(),
        ] {
            assert!(!a.requires_token());
            assert!(a.check(&with_authorization(None)).is_ok());
            assert!(
                a.check(&with_authorization(Some("Bearer anything")))
                    .is_ok()
            );
        }
    }

    #[test]
    fn only_the_exact_bearer_token_passes_and_each_refusal_is_counted_by_reason() {
        let a = auth(TOKEN).unwrap();
        assert!(a.requires_token());
        let ok = format!("Bearer {TOKEN}");
        assert!(a.check(&with_authorization(Some(&ok))).is_ok());

        let e = a.check(&with_authorization(None)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(e.message(), MISSING);
        let bad = [
            TOKEN.to_owned(),
            format!("bearer {TOKEN}"),
            format!("Bearer {}", &TOKEN[1..]),
            format!("Bearer {TOKEN}0"),
            format!("Bearer {}", TOKEN.replace('f', "e")),
        ];
        for value in &bad {
            let e = a.check(&with_authorization(Some(value))).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            assert_eq!(e.message(), "wrong control token");
        }
        assert_eq!(refused(&a, "missing"), 1);
        assert_eq!(refused(&a, "wrong"), bad.len() as u64);
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let t = ControlToken::from(TOKEN.to_owned());
        assert_eq!(format!("{t:?}"), "ControlToken(<hidden>)");
        let a = auth(TOKEN).unwrap();
        let shown = format!("{a:?}");
        assert!(!shown.contains(TOKEN), "{shown}");
        assert_eq!(shown, "ControlAuth { requires_token: true, .. }");
    }
}
