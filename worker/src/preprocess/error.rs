//! The preprocess role's request error, mapped once to gRPC and HTTP.

use axum::http::StatusCode;

use crate::common::oip::NotServed;

/// Why a client request failed. Messages are meant for the client.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The request names a model, or a version of it, that this worker does not serve; the
    /// message names the version served.
    #[error(transparent)]
    NotServed(#[from] NotServed),
    /// The request is malformed or holds unusable data.
    #[error("{0}")]
    InvalidArgument(String),
    /// The admission queue is full.
    #[error("{0}")]
    ResourceExhausted(String),
    /// No inference endpoint could take the request, or the worker is stopping.
    #[error("{0}")]
    Unavailable(String),
    /// The inference call ran out of time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The inference stage answered with an error, or could not be reached. Codes that mean
    /// the same to the client (retry later, too busy, too slow, bad data) are kept; the rest
    /// (a model or method the pod lacks, its own failures) are this pipeline's fault, not the
    /// client's, and become `INTERNAL` / 502.
    #[error("inference pod {endpoint}: {}: {message}", code_label(*.code))]
    Upstream {
        /// gRPC code from the inference pod.
        code: tonic::Code,
        /// Its message.
        message: String,
        /// The pod's address.
        endpoint: String,
    },
    /// A bug or a broken invariant.
    #[error("internal error: {0}")]
    Internal(String),
}

impl RequestError {
    /// Shorthand for [`RequestError::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    /// The gRPC code.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::NotServed(_) => tonic::Code::NotFound,
            Self::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Self::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            Self::Unavailable(_) => tonic::Code::Unavailable,
            Self::DeadlineExceeded(_) => tonic::Code::DeadlineExceeded,
            Self::Upstream { code, .. } => match code {
                tonic::Code::Unavailable
                | tonic::Code::ResourceExhausted
                | tonic::Code::DeadlineExceeded
                | tonic::Code::InvalidArgument
                | tonic::Code::OutOfRange => *code,
                _ => tonic::Code::Internal,
            },
            Self::Internal(_) => tonic::Code::Internal,
        }
    }

    /// The HTTP status for the REST endpoint.
    pub fn http_status(&self) -> StatusCode {
        if let Self::Upstream { .. } = self
            && self.grpc_code() == tonic::Code::Internal
        {
            return StatusCode::BAD_GATEWAY;
        }
        match self.grpc_code() {
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
            tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Metric label for the outcome.
    pub fn code_label(&self) -> &'static str {
        code_label(self.grpc_code())
    }
}

/// Upper-snake name of a gRPC code, for metric labels.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<RequestError> for tonic::Status {
    fn from(e: RequestError) -> Self {
        tonic::Status::new(e.grpc_code(), crate::common::bounded_message(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(code: tonic::Code) -> RequestError {
        RequestError::Upstream {
            code,
            message: "why".into(),
            endpoint: "10.244.0.7:8001".into(),
        }
    }

    #[test]
    fn an_inference_pods_error_names_the_pod_and_is_the_clients_only_when_the_client_can_act() {
        // A model the pod does not serve is the pipeline's misconfiguration, not a model name
        // the client got wrong.
        let e = upstream(tonic::Code::NotFound);
        assert_eq!(
            e.to_string(),
            "inference pod 10.244.0.7:8001: NOT_FOUND: why"
        );
        assert_eq!(e.grpc_code(), tonic::Code::Internal);
        assert_eq!(e.http_status(), StatusCode::BAD_GATEWAY);
        for code in [
            tonic::Code::Unimplemented,
            tonic::Code::Internal,
            tonic::Code::Unknown,
        ] {
            assert_eq!(
                upstream(code).http_status(),
                StatusCode::BAD_GATEWAY,
                "{code:?}"
            );
        }
        for (code, http) in [
            (tonic::Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
            (
                tonic::Code::ResourceExhausted,
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (tonic::Code::DeadlineExceeded, StatusCode::GATEWAY_TIMEOUT),
            (tonic::Code::InvalidArgument, StatusCode::BAD_REQUEST),
        ] {
            assert_eq!(upstream(code).grpc_code(), code);
            assert_eq!(upstream(code).http_status(), http, "{code:?}");
        }
    }
}
