//! Why a deployment or pipeline call did not happen, by case. The API edge
//! (the error module) maps every variant to its gRPC code and message.
//!
//! Failures of the registry and the store pass through as their own errors
//! (`Registry`, `Storage`), and trust refusals as the trust module's.

use super::current::Downgrade;
use super::machine::Refusal;
use super::spec::SpecError;
use crate::registry::RegistryError;
use crate::store::StoreError;
use crate::trust::TrustError;

/// No deployment or pipeline with that id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{kind} {id:?} not found")]
pub struct NotFound {
    /// `deployment` or `pipeline`.
    pub kind: &'static str,
    pub id: String,
}

/// The artifact to deploy was never pushed (the edge says how to push it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("artifact {module}@{version} not found")]
pub struct ArtifactNotFound {
    pub module: String,
    pub version: String,
}

/// Why `deploy create` did not start a deployment. The cases a pipeline
/// acts on are variants of their own, so it matches them instead of
/// reading message text.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("version {version:?} is not semver: {reason}")]
    InvalidVersion { version: String, reason: String },
    #[error(transparent)]
    ArtifactNotFound(#[from] ArtifactNotFound),
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    /// Yanked, or short of trusted signatures.
    #[error(transparent)]
    NotDeployable(TrustError),
    #[error(transparent)]
    Downgrade(#[from] Downgrade),
    /// A freeze covers the environment (SPEC §9).
    #[error(transparent)]
    Frozen(#[from] crate::freeze::Frozen),
    #[error("environment {environment:?} has no nodes{} to deploy to", scope(*selector))]
    NoNodes { environment: String, selector: bool },
    #[error(
        "no connected node in environment {environment:?}{} to deploy to ({enrolled} enrolled, all disconnected)",
        scope(*selector)
    )]
    AllDisconnected {
        environment: String,
        selector: bool,
        enrolled: usize,
    },
    #[error(
        "deployment {id} of {module}@{version} to {environment} is still {state}; wait for it, or abort it first"
    )]
    AlreadyActive {
        id: String,
        module: String,
        version: String,
        environment: String,
        state: &'static str,
    },
    /// The registry failed or refused (a node it does not know).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StoreError),
}

fn scope(selector: bool) -> &'static str {
    if selector {
        " matching the selector"
    } else {
        ""
    }
}

/// Why an operator control (promote, pause, resume, abort, approve,
/// reject, rollback) was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    NotFound(#[from] NotFound),
    /// The machine refused it in the deployment's state.
    #[error("deployment {id}: {refusal}")]
    Refused { id: String, refusal: Refusal },
    /// The registry failed or refused (a node it does not know).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StoreError),
}

/// Why `pipeline run` did not start a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    NotFound(#[from] NotFound),
    #[error(transparent)]
    ArtifactNotFound(#[from] ArtifactNotFound),
    /// The requested last environment is not one of the pipeline's.
    #[error("{environment:?} is not in the pipeline ({})", order.join(" -> "))]
    NotInPipeline {
        environment: String,
        order: Vec<String>,
    },
    /// An environment on the way would refuse the artifact.
    #[error("environment {environment}: {error}")]
    NotDeployable {
        environment: String,
        error: TrustError,
    },
    #[error(transparent)]
    Downgrade(#[from] Downgrade),
    /// A freeze covers an environment on the way (SPEC §9).
    #[error(transparent)]
    Frozen(#[from] crate::freeze::Frozen),
    /// `pipeline abort` of a pipeline that has ended.
    #[error("pipeline {id} is {state}, not running: there is nothing to abort")]
    NotRunning { id: String, state: &'static str },
    /// Aborting the running stage's deployment failed.
    #[error("cannot abort the running stage's deployment: {0}")]
    Abort(Box<ControlError>),
    /// The registry failed or refused (a node it does not know).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ApiError;

    #[test]
    fn create_errors_read_as_before_and_map_to_their_codes() {
        let cases = [
            (
                CreateError::NoNodes {
                    environment: "qa".into(),
                    selector: false,
                },
                "environment \"qa\" has no nodes to deploy to",
            ),
            (
                CreateError::AllDisconnected {
                    environment: "qa".into(),
                    selector: true,
                    enrolled: 3,
                },
                "no connected node in environment \"qa\" matching the selector to deploy to (3 enrolled, all disconnected)",
            ),
        ];
        for (error, text) in cases {
            assert_eq!(error.to_string(), text);
            match ApiError::from(error) {
                ApiError::FailedPrecondition(message) => assert_eq!(message, text),
                other => panic!("{text}: mapped to {other:?}"),
            }
        }
        // Another active deployment is a conflict (HTTP 409), not a state
        // the caller fixes first.
        let active = CreateError::AlreadyActive {
            id: "d-1".into(),
            module: "web".into(),
            version: "2.0.0".into(),
            environment: "qa".into(),
            state: "running",
        };
        let text =
            "deployment d-1 of web@2.0.0 to qa is still running; wait for it, or abort it first";
        assert_eq!(active.to_string(), text);
        match ApiError::from(active) {
            ApiError::AlreadyExists(message) => assert_eq!(message, text),
            other => panic!("{text}: mapped to {other:?}"),
        }
        let missing = CreateError::from(RegistryError::UnknownNode("n-1".into()));
        assert!(matches!(ApiError::from(missing), ApiError::NotFound(_)));
    }
}
