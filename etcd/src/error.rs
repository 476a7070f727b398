//! The client's errors, sorted by whether a retry may help.

use std::time::Duration;

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no etcd endpoints given")]
    NoEndpoints,

    #[error("etcd endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },

    /// Client TLS settings given as PEM text are unusable, or the client
    /// certificate and key do not come as a pair.
    #[error("etcd client TLS {what}: {reason}")]
    InvalidTls { what: String, reason: String },

    /// A client TLS file cannot be read or holds no usable PEM.
    #[error("etcd client TLS {setting} {}: {reason}", path.display())]
    TlsFile {
        setting: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },

    /// No endpoint accepted a connection.
    #[error("etcd {op}: no endpoint is reachable ({endpoints}); last error: {last}")]
    Unreachable {
        op: &'static str,
        endpoints: String,
        last: String,
    },

    /// The request did not complete within its deadline.
    #[error("etcd {op}: no answer within {timeout:?}")]
    DeadlineExceeded { op: &'static str, timeout: Duration },

    /// etcd (or the transport) answered with a gRPC error.
    #[error("etcd {op}: {code:?}: {message}")]
    Status {
        op: &'static str,
        code: tonic::Code,
        message: String,
    },

    /// The revision asked for is older than etcd's compaction point: the
    /// history the caller wanted is gone, so it must re-list.
    #[error(
        "etcd {op}: revision {revision} has been compacted{}",
        compact_revision.map(|r| format!(" (history starts after {r})")).unwrap_or_default()
    )]
    Compacted {
        op: &'static str,
        revision: i64,
        compact_revision: Option<i64>,
    },

    /// The lease does not exist (expired or revoked).
    #[error("etcd lease {lease:x}: not found (expired or revoked)")]
    LeaseNotFound { lease: i64 },

    /// etcd canceled a watch for a reason other than compaction.
    #[error("etcd watch on {prefix:?}: canceled by etcd: {reason}")]
    WatchCanceled { prefix: String, reason: String },

    /// A response lacked something etcd always sends.
    #[error("etcd {op}: malformed response: {what}")]
    Malformed {
        op: &'static str,
        what: &'static str,
    },
}

impl Error {
    /// Whether trying again later (on this or another endpoint) may succeed:
    /// connection failures, deadlines, and etcd's own transient answers
    /// (no leader, leader changed, request timed out, too many requests).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::DeadlineExceeded { .. } => true,
            Error::Status { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Aborted
                    | tonic::Code::Cancelled
            ),
            Error::NoEndpoints
            | Error::InvalidEndpoint { .. }
            | Error::InvalidTls { .. }
            | Error::TlsFile { .. }
            | Error::Compacted { .. }
            | Error::LeaseNotFound { .. }
            | Error::WatchCanceled { .. }
            | Error::Malformed { .. } => false,
        }
    }

    /// Whether a response was larger than this client decodes (tonic's
    /// "decoded message length too large", `OutOfRange`): asking for less
    /// at once may succeed.
    pub fn is_response_too_large(&self) -> bool {
        matches!(
            self,
            Error::Status { code: tonic::Code::OutOfRange, message, .. }
                if message.contains("message length too large")
        )
    }

    /// Whether this is [`Error::Compacted`].
    pub fn is_compacted(&self) -> bool {
        matches!(self, Error::Compacted { .. })
    }

    /// Sort a gRPC status from a call into a typed error. etcd's messages
    /// are stable strings (`rpctypes` in etcd's source), so compaction and
    /// missing leases are recognized by them.
    pub(crate) fn from_status(op: &'static str, status: &tonic::Status, revision: i64) -> Self {
        let message = status.message();
        if message.contains("required revision has been compacted") {
            return Error::Compacted {
                op,
                revision,
                compact_revision: None,
            };
        }
        if message.contains("requested lease not found") {
            return Error::LeaseNotFound { lease: revision };
        }
        // A connection that failed under the call says only "transport
        // error"; why (a reset, or a TLS alert such as a client
        // certificate the member requires) is in the causes.
        let message = if connection_failed(status) {
            with_causes(message.to_string(), std::error::Error::source(status))
        } else {
            message.to_string()
        };
        Error::Status {
            op,
            code: code_of(status),
            message,
        }
    }
}

/// An error with its causes, `a: b: c`.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    with_causes(error.to_string(), error.source())
}

/// `text` followed by each cause that does not repeat what is already said.
fn with_causes(mut text: String, mut source: Option<&dyn std::error::Error>) -> String {
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The status's code, with a connection that failed under the call read as
/// `Unavailable`: tonic reports a connection reset or refused mid-call as
/// `Unknown: transport error`, which says nothing about etcd itself.
pub(crate) fn code_of(status: &tonic::Status) -> tonic::Code {
    if status.code() == tonic::Code::Unknown && connection_failed(status) {
        tonic::Code::Unavailable
    } else {
        status.code()
    }
}

/// Whether the status came from the transport (the connection), not from
/// an answer etcd sent.
fn connection_failed(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::transport::Error>() || error.is::<std::io::Error>() {
            return true;
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_too_large_to_decode_is_told_apart_from_compaction() {
        let too_large = Error::from_status(
            "range",
            &tonic::Status::out_of_range(
                "Error, decoded message length too large: found 5567323 bytes, the limit is: 4194304 bytes",
            ),
            0,
        );
        assert!(too_large.is_response_too_large(), "{too_large}");
        assert!(!too_large.is_transient() && !too_large.is_compacted());
        let compacted = Error::from_status(
            "range",
            &tonic::Status::out_of_range("etcdserver: mvcc: required revision has been compacted"),
            7,
        );
        assert!(!compacted.is_response_too_large());
    }

    #[test]
    fn statuses_are_sorted() {
        let check = |status: tonic::Status, transient: bool, compacted: bool| {
            let error = Error::from_status("range", &status, 7);
            assert_eq!(error.is_transient(), transient, "{error}");
            assert_eq!(error.is_compacted(), compacted, "{error}");
        };
        check(
            tonic::Status::unavailable("etcdserver: no leader"),
            true,
            false,
        );
        check(
            tonic::Status::out_of_range("etcdserver: mvcc: required revision has been compacted"),
            false,
            true,
        );
        check(
            tonic::Status::invalid_argument("etcdserver: key is not provided"),
            false,
            false,
        );
        check(
            tonic::Status::unavailable("etcdserver: request timed out"),
            true,
            false,
        );
        let lease = Error::from_status(
            "lease revoke",
            &tonic::Status::not_found("etcdserver: requested lease not found"),
            0x2a,
        );
        assert_eq!(
            lease.to_string(),
            "etcd lease 2a: not found (expired or revoked)"
        );
        assert!(!lease.is_transient());
    }

    #[test]
    fn a_connection_failed_under_a_call_is_transient() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let status = tonic::Status::from_error(Box::new(reset));
        assert_eq!(status.code(), tonic::Code::Unknown);
        let error = Error::from_status("put", &status, 0);
        assert!(error.is_transient(), "{error}");
        // The cause is said once, not repeated from the status's message.
        assert_eq!(error.to_string(), "etcd put: Unavailable: reset by peer");
        // An Unknown that etcd itself sent stays as it is.
        let answered = Error::from_status("put", &tonic::Status::unknown("etcdserver: odd"), 0);
        assert!(!answered.is_transient(), "{answered}");
    }
}
