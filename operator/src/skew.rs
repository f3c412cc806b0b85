//! An installed CRD older than the operator. Helm installs a chart's CRDs only with the first
//! install, so an upgrade that skips `kubectl apply -f helm/tandem/crds/` (docs/operations.md,
//! "Upgrades") leaves a schema without the status fields the new operator writes. The API
//! server then refuses every server-side apply of status that carries one (`.status.rollout.
//! candidateUnavailableSince: field not declared in schema`, HTTP 500), and status stops
//! moving. These helpers recognise that answer so the operator can say what to do, in its log
//! and in a Warning Event on the pipeline, instead of a bare retry warning.

/// Event reason, and the word the logs use, for a write refused by an outdated CRD.
pub const REASON: &str = "CRDOutdated";

/// The field path the API server refused because the installed CRD does not declare it.
pub fn undeclared_field(e: &kube::Error) -> Option<&str> {
    let kube::Error::Api(s) = e else {
        return None;
    };
    let (head, _) = s.message.split_once(": field not declared in schema")?;
    head.rsplit(' ').next().filter(|f| f.starts_with('.'))
}

/// Says it where it can be read, since status cannot: an `ERROR` log line and a Warning
/// Event on the pipeline, by `action` (the loop whose write was refused).
pub fn report(
    events: &crate::events::Publisher,
    regarding: crate::events::Regarding<'_>,
    action: &'static str,
    field: &str,
) {
    let note = note(field);
    tracing::error!(
        pipeline = %format!("{}/{}", regarding.namespace, regarding.name),
        reason = REASON,
        "{note}"
    );
    let note = crate::events::Note {
        action,
        reason: REASON,
        note,
        warning: true,
        discriminator: "crd",
    };
    events.publish(regarding, note, k8s_openapi::jiff::Timestamp::now());
}

/// What a person reads about it.
pub fn note(field: &str) -> String {
    format!(
        "the installed InferencePipeline CRD is older than this operator: it does not declare {field}, so the API server refuses the pipeline's status; apply the CRD of this operator's release (kubectl apply --server-side -f helm/tandem/crds/; docs/operations.md, Upgrades)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure(message, "InternalError")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn the_field_an_outdated_crd_refuses_is_named() {
        // The API server's answer, as kube-apiserver v1.36 wrote it in an e2e run.
        let e = api_error(
            500,
            "failed to create typed patch object (/; tandem.dev/v1alpha1, Kind=InferencePipeline): .status.rollout.candidateUnavailableSince: field not declared in schema",
        );
        assert_eq!(
            undeclared_field(&e),
            Some(".status.rollout.candidateUnavailableSince")
        );
        assert!(note(".status.x").contains("kubectl apply --server-side -f helm/tandem/crds/"));
    }

    #[test]
    fn other_api_errors_are_not_an_outdated_crd() {
        assert_eq!(
            undeclared_field(&api_error(409, "the object has been modified")),
            None
        );
        assert_eq!(
            undeclared_field(&api_error(500, "field not declared in schema")),
            None,
            "no field path before it"
        );
    }
}
