//! Errors of the control plane's API and their one mapping to gRPC status
//! codes. Every handler returns [`ApiError`]; nothing else builds a `Status`.

use tonic::Status;

use crate::deploy::current::Downgrade;
use crate::deploy::error::{ArtifactNotFound, ControlError, CreateError, NotFound, PipelineError};
use crate::deploy::spec::{Field, SpecError};
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

impl From<crate::replicas::ReplicaError> for ApiError {
    fn from(error: crate::replicas::ReplicaError) -> Self {
        use crate::replicas::ReplicaError as E;
        let message = error.to_string();
        match error {
            E::EmptyName => ApiError::InvalidArgument(message),
            E::NotFound(_) => ApiError::NotFound(message),
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

impl From<crate::webhooks::WebhookError> for ApiError {
    fn from(error: crate::webhooks::WebhookError) -> Self {
        ApiError::InvalidArgument(error.to_string())
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

/// The flag a user types for a deployment or pipeline option: the one
/// place the domain's [`Field`] meets the command line's spelling.
pub fn flag_name(field: Field) -> &'static str {
    match field {
        Field::BatchSize => "--batch-size",
        Field::Steps => "--steps",
        Field::StepDuration => "--step-duration",
        Field::ManualPromote => "--manual-promote",
        Field::AnalysisMinRequests => "--analysis-min-requests",
        Field::AnalysisWarmup => "--analysis-warmup",
        Field::PauseTimeout => "--pause-timeout",
        Field::BakeTime => "--bake-time",
        Field::MaxErrorRate => "--max-error-rate",
        Field::MaxLatencyIncrease => "--max-latency-increase",
        Field::MinHealthyTime => "--min-healthy-time",
        Field::HealthDeadline => "--health-deadline",
        Field::ProgressDeadline => "--progress-deadline",
        Field::AllowDowngrade => "--allow-downgrade",
        Field::PipelineEnd => "--to",
    }
}

impl From<SpecError> for ApiError {
    fn from(error: SpecError) -> Self {
        ApiError::InvalidArgument(error.message(flag_name))
    }
}

impl From<ArtifactNotFound> for ApiError {
    fn from(error: ArtifactNotFound) -> Self {
        ApiError::NotFound(format!(
            "{error}; push it with `hotswapctl module push` first"
        ))
    }
}

impl From<Downgrade> for ApiError {
    fn from(error: Downgrade) -> Self {
        ApiError::FailedPrecondition(format!(
            "{error}; pass {} to deploy the older version anyway",
            flag_name(Field::AllowDowngrade)
        ))
    }
}

impl From<NotFound> for ApiError {
    fn from(error: NotFound) -> Self {
        ApiError::NotFound(error.to_string())
    }
}

impl From<CreateError> for ApiError {
    fn from(error: CreateError) -> Self {
        match error {
            CreateError::InvalidVersion { .. } => ApiError::InvalidArgument(error.to_string()),
            CreateError::ArtifactNotFound(e) => e.into(),
            CreateError::InvalidSpec(e) => e.into(),
            CreateError::Downgrade(e) => e.into(),
            // HTTP 412 (SPEC §8: "frozen"); the CLI exits 1.
            CreateError::Frozen(e) => ApiError::FailedPrecondition(e.to_string()),
            CreateError::NoNodes { .. } | CreateError::AllDisconnected { .. } => {
                ApiError::FailedPrecondition(error.to_string())
            }
            // A conflict with another deployment, not a state to fix first:
            // HTTP 409 (SPEC §8). The CLI exits 1 for either code.
            CreateError::AlreadyActive { .. } => ApiError::AlreadyExists(error.to_string()),
            CreateError::NotDeployable(e) => e.into(),
            CreateError::Registry(e) => e.into(),
            CreateError::Storage(e) => ApiError::Storage(e),
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(error: ControlError) -> Self {
        match error {
            ControlError::NotFound(e) => e.into(),
            ControlError::Refused { .. } => ApiError::FailedPrecondition(error.to_string()),
            ControlError::Registry(e) => e.into(),
            ControlError::Storage(e) => ApiError::Storage(e),
        }
    }
}

impl From<crate::history::HistoryError> for ApiError {
    fn from(error: crate::history::HistoryError) -> Self {
        use crate::history::HistoryError;
        match error {
            HistoryError::Trimmed { .. } => ApiError::FailedPrecondition(error.to_string()),
            HistoryError::UnknownEnvironment { .. } => ApiError::NotFound(error.to_string()),
            HistoryError::Reversed { .. } => ApiError::InvalidArgument(error.to_string()),
        }
    }
}

impl From<PipelineError> for ApiError {
    fn from(error: PipelineError) -> Self {
        match error {
            PipelineError::NotFound(e) => e.into(),
            PipelineError::ArtifactNotFound(e) => e.into(),
            PipelineError::NotInPipeline { .. } => {
                ApiError::InvalidArgument(format!("{} {error}", flag_name(Field::PipelineEnd)))
            }
            PipelineError::NotDeployable { .. } => ApiError::FailedPrecondition(error.to_string()),
            PipelineError::Downgrade(e) => e.into(),
            PipelineError::Frozen(e) => ApiError::FailedPrecondition(e.to_string()),
            PipelineError::NotRunning { .. } => ApiError::FailedPrecondition(error.to_string()),
            PipelineError::Abort(e) => (*e).into(),
            PipelineError::Registry(e) => e.into(),
            PipelineError::Storage(e) => ApiError::Storage(e),
        }
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

impl From<NotFound> for Status {
    fn from(err: NotFound) -> Self {
        ApiError::from(err).into()
    }
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Self {
        ApiError::Storage(err).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::machine::{Refusal, State};

    fn check(error: impl Into<ApiError>, code: tonic::Code, message: &str) {
        let status = Status::from(error.into());
        assert_eq!((status.code(), status.message()), (code, message));
    }

    /// Deploy's errors reach the user with the codes and words they had
    /// when the engine built API errors itself.
    #[test]
    fn deploy_errors_keep_their_codes_and_words() {
        use tonic::Code;
        check(
            SpecError::MaxErrorRateOutOfRange { value: 1.5 },
            Code::InvalidArgument,
            "--max-error-rate 1.5 is not between 0 and 1",
        );
        check(
            CreateError::InvalidSpec(SpecError::OnlyFor {
                fields: &[Field::BatchSize],
                strategy: "rolling",
            }),
            Code::InvalidArgument,
            "--batch-size applies to the rolling strategy only",
        );
        check(
            CreateError::InvalidVersion {
                version: "x".into(),
                reason: "unexpected character 'x' while parsing major version number".into(),
            },
            Code::InvalidArgument,
            "version \"x\" is not semver: unexpected character 'x' while parsing major version number",
        );
        check(
            CreateError::ArtifactNotFound(ArtifactNotFound {
                module: "web".into(),
                version: "9.9.9".into(),
            }),
            Code::NotFound,
            "artifact web@9.9.9 not found; push it with `hotswapctl module push` first",
        );
        let downgrade = Downgrade {
            module: "web".into(),
            version: "1.0.0".into(),
            environment: "qa".into(),
            current: "2.0.0".into(),
            deployment_id: "d-1".into(),
        };
        let text = "web@1.0.0 is a downgrade: the current version of web in qa is 2.0.0 (deployment d-1); pass --allow-downgrade to deploy the older version anyway";
        check(
            CreateError::Downgrade(downgrade.clone()),
            Code::FailedPrecondition,
            text,
        );
        check(
            PipelineError::Downgrade(downgrade),
            Code::FailedPrecondition,
            text,
        );
        check(
            PipelineError::NotInPipeline {
                environment: "moon".into(),
                order: vec!["dev".into(), "qa".into()],
            },
            Code::InvalidArgument,
            "--to \"moon\" is not in the pipeline (dev -> qa)",
        );
        check(
            PipelineError::NotDeployable {
                environment: "qa".into(),
                error: crate::trust::TrustError::Yanked("web@2.0.0 was yanked".into()),
            },
            Code::FailedPrecondition,
            "environment qa: web@2.0.0 was yanked",
        );
        check(
            ControlError::NotFound(NotFound {
                kind: "deployment",
                id: "d-9".into(),
            }),
            Code::NotFound,
            "deployment \"d-9\" not found",
        );
        check(
            ControlError::Refused {
                id: "d-1".into(),
                refusal: Refusal::WrongState {
                    what: "resume",
                    state: State::Running,
                },
            },
            Code::FailedPrecondition,
            "deployment d-1: cannot resume a deployment that is running",
        );
        check(
            ControlError::Storage(StoreError::Io("No space left on device".into())),
            Code::Unavailable,
            "storage I/O error: No space left on device",
        );
    }
}
