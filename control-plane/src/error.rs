//! Errors of the control plane's API and their one mapping to gRPC status
//! codes. Every handler returns [`ApiError`]; nothing else builds a `Status`.

use tonic::Status;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// No usable credentials: no client certificate, or a rejected join token.
    #[error("{0}")]
    Unauthenticated(String),
    /// Credentials are valid but do not allow this call.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unavailable(String),
    /// A rate limit: the message says which and when to retry.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller took too long: an upload that stopped sending.
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Storage(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::registry::RegistryError> for ApiError {
    fn from(error: crate::registry::RegistryError) -> Self {
        use crate::registry::RegistryError as E;
        let message = error.to_string();
        match error {
            E::EmptyQuery | E::AmbiguousPrefix { .. } => ApiError::InvalidArgument(message),
            E::NotFound(_) | E::UnknownNode(_) => ApiError::NotFound(message),
            E::Removed(_) | E::NotEnrolled(_) | E::StaleCertificate(_) => {
                ApiError::PermissionDenied(message)
            }
            E::Storage(e) => ApiError::Storage(e),
        }
    }
}

impl From<crate::trust::TrustError> for ApiError {
    fn from(error: crate::trust::TrustError) -> Self {
        use crate::trust::TrustError as E;
        match error {
            E::Storage(e) => ApiError::Storage(e),
            refused @ (E::Yanked(_) | E::Unsigned { .. }) => {
                ApiError::FailedPrecondition(refused.to_string())
            }
        }
    }
}

impl From<crate::roles::UnknownRole> for ApiError {
    fn from(error: crate::roles::UnknownRole) -> Self {
        ApiError::InvalidArgument(error.to_string())
    }
}

impl From<hotswap_common::ids::NameError> for ApiError {
    fn from(error: hotswap_common::ids::NameError) -> Self {
        ApiError::InvalidArgument(error.to_string())
    }
}

impl ApiError {
    /// A local I/O failure while serving a call: out of space is an outage
    /// the operator fixes and the caller retries (`Unavailable`); anything
    /// else is internal.
    pub fn io(context: &str, error: &std::io::Error) -> Self {
        match error.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                ApiError::Unavailable(format!(
                    "{context}: {error}; free space in the control plane's data directory and retry"
                ))
            }
            _ => ApiError::Internal(format!("{context}: {error}")),
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        let message = err.to_string();
        match err {
            ApiError::InvalidArgument(_) => Status::invalid_argument(message),
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::AlreadyExists(_) => Status::already_exists(message),
            ApiError::FailedPrecondition(_) => Status::failed_precondition(message),
            ApiError::Unauthenticated(_) => Status::unauthenticated(message),
            ApiError::PermissionDenied(_) => Status::permission_denied(message),
            ApiError::Unavailable(_) => Status::unavailable(message),
            ApiError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            ApiError::ResourceExhausted(_) => Status::resource_exhausted(message),
            // Storage that cannot write (a full disk, a deleted database) is
            // an outage the caller can retry after, not a bug: say so, with
            // the reason.
            ApiError::Storage(
                StoreError::Failed(_) | StoreError::Replaced(_) | StoreError::Io(_),
            ) => {
                tracing::error!(error = %message, "request refused: storage failed");
                Status::unavailable(message)
            }
            ApiError::Storage(_) | ApiError::Internal(_) => {
                tracing::error!(error = %message, "request failed");
                Status::internal(message)
            }
        }
    }
}

impl From<crate::registry::RegistryError> for Status {
    fn from(err: crate::registry::RegistryError) -> Self {
        ApiError::from(err).into()
    }
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Self {
        ApiError::Storage(err).into()
    }
}
