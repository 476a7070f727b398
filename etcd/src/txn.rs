//! Transactions: the compares that guard them, the operations on either
//! branch, and their results; with the conversions to and from etcd's wire
//! messages.

use crate::kv::{KeyValue, LeaseId};
use crate::pb;
use crate::prefix_end;

/// How a key's attribute is compared with the given value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

impl CompareOp {
    fn to_pb(self) -> pb::compare::CompareResult {
        match self {
            CompareOp::Equal => pb::compare::CompareResult::Equal,
            CompareOp::NotEqual => pb::compare::CompareResult::NotEqual,
            CompareOp::Greater => pb::compare::CompareResult::Greater,
            CompareOp::Less => pb::compare::CompareResult::Less,
        }
    }
}

/// What a compare looks at. A key that does not exist has version,
/// create revision and mod revision 0.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CompareTarget {
    Value(Vec<u8>),
    Version(i64),
    CreateRevision(i64),
    ModRevision(i64),
}

/// One guard of a transaction: `key`'s attribute `op` a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    key: Vec<u8>,
    op: CompareOp,
    target: CompareTarget,
}

impl Compare {
    /// The key compared.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Compare the key's value (a missing key fails every value compare).
    pub fn value(key: impl Into<Vec<u8>>, op: CompareOp, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            op,
            target: CompareTarget::Value(value.into()),
        }
    }

    /// Compare the key's version (the number of puts since it was created).
    pub fn version(key: impl Into<Vec<u8>>, op: CompareOp, version: i64) -> Self {
        Self {
            key: key.into(),
            op,
            target: CompareTarget::Version(version),
        }
    }

    /// Compare the revision at which the key was created.
    pub fn create_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: i64) -> Self {
        Self {
            key: key.into(),
            op,
            target: CompareTarget::CreateRevision(revision),
        }
    }

    /// Compare the revision of the key's last change.
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: i64) -> Self {
        Self {
            key: key.into(),
            op,
            target: CompareTarget::ModRevision(revision),
        }
    }

    /// The key does not exist (its create revision is 0).
    pub fn absent(key: impl Into<Vec<u8>>) -> Self {
        Self::create_revision(key, CompareOp::Equal, 0)
    }

    /// The key exists.
    pub fn present(key: impl Into<Vec<u8>>) -> Self {
        Self::create_revision(key, CompareOp::Greater, 0)
    }

    pub(crate) fn to_pb(&self) -> pb::Compare {
        use pb::compare::{CompareTarget as Target, TargetUnion};
        let (target, union) = match &self.target {
            CompareTarget::Value(v) => (Target::Value, TargetUnion::Value(v.clone())),
            CompareTarget::Version(v) => (Target::Version, TargetUnion::Version(*v)),
            CompareTarget::CreateRevision(r) => (Target::Create, TargetUnion::CreateRevision(*r)),
            CompareTarget::ModRevision(r) => (Target::Mod, TargetUnion::ModRevision(*r)),
        };
        pb::Compare {
            result: self.op.to_pb() as i32,
            target: target as i32,
            key: self.key.clone(),
            target_union: Some(union),
        }
    }
}

/// One operation of a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Write `value` at `key`, attached to `lease` if given.
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    /// Delete `key`, or every key under it when `prefix`.
    Delete { key: Vec<u8>, prefix: bool },
    /// Read `key`, or every key under it when `prefix`.
    Get { key: Vec<u8>, prefix: bool },
}

impl TxnOp {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    pub fn put_with_lease(
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        }
    }

    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        TxnOp::Delete {
            key: key.into(),
            prefix: false,
        }
    }

    pub fn delete_prefix(prefix: impl Into<Vec<u8>>) -> Self {
        TxnOp::Delete {
            key: prefix.into(),
            prefix: true,
        }
    }

    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        TxnOp::Get {
            key: key.into(),
            prefix: false,
        }
    }

    pub fn get_prefix(prefix: impl Into<Vec<u8>>) -> Self {
        TxnOp::Get {
            key: prefix.into(),
            prefix: true,
        }
    }

    pub(crate) fn to_pb(&self) -> pb::RequestOp {
        use pb::request_op::Request;
        let range_end = |key: &[u8], prefix: bool| {
            if prefix { prefix_end(key) } else { Vec::new() }
        };
        let request = match self {
            TxnOp::Put { key, value, lease } => Request::RequestPut(pb::PutRequest {
                key: key.clone(),
                value: value.clone(),
                lease: lease.map_or(0, |lease| lease.0),
            }),
            TxnOp::Delete { key, prefix } => Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key: key.clone(),
                range_end: range_end(key, *prefix),
            }),
            TxnOp::Get { key, prefix } => Request::RequestRange(pb::RangeRequest {
                key: key.clone(),
                range_end: range_end(key, *prefix),
                limit: 0,
                revision: 0,
            }),
        };
        pb::RequestOp {
            request: Some(request),
        }
    }
}

/// What one operation of the branch that ran gave back, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOpResult {
    Put,
    Delete { deleted: i64 },
    Get { kvs: Vec<KeyValue> },
}

/// The outcome of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every compare held (the success branch ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    pub responses: Vec<TxnOpResult>,
}

impl TxnResult {
    pub(crate) fn from_pb(response: pb::TxnResponse) -> Self {
        use pb::response_op::Response;
        let responses = response
            .responses
            .into_iter()
            .filter_map(|op| op.response)
            .map(|op| match op {
                Response::ResponsePut(_) => TxnOpResult::Put,
                Response::ResponseDeleteRange(d) => TxnOpResult::Delete { deleted: d.deleted },
                Response::ResponseRange(r) => TxnOpResult::Get {
                    kvs: r.kvs.into_iter().map(KeyValue::from_pb).collect(),
                },
            })
            .collect();
        TxnResult {
            succeeded: response.succeeded,
            revision: response.header.map(|h| h.revision).unwrap_or_default(),
            responses,
        }
    }
}

/// The wire request for a transaction.
pub(crate) fn txn_request(
    compares: &[Compare],
    success: &[TxnOp],
    failure: &[TxnOp],
) -> pb::TxnRequest {
    pb::TxnRequest {
        compare: compares.iter().map(Compare::to_pb).collect(),
        success: success.iter().map(TxnOp::to_pb).collect(),
        failure: failure.iter().map(TxnOp::to_pb).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::compare::{CompareResult, CompareTarget as Target, TargetUnion};

    fn check(compare: Compare, result: CompareResult, target: Target, union: TargetUnion) {
        let wire = compare.to_pb();
        assert_eq!(wire.key, b"k".to_vec());
        assert_eq!(wire.result, result as i32, "{compare:?}");
        assert_eq!(wire.target, target as i32, "{compare:?}");
        assert_eq!(wire.target_union, Some(union), "{compare:?}");
    }

    #[test]
    fn compares_name_their_target_and_value() {
        check(
            Compare::value("k", CompareOp::Equal, "v"),
            CompareResult::Equal,
            Target::Value,
            TargetUnion::Value(b"v".to_vec()),
        );
        check(
            Compare::version("k", CompareOp::Greater, 3),
            CompareResult::Greater,
            Target::Version,
            TargetUnion::Version(3),
        );
        check(
            Compare::create_revision("k", CompareOp::Less, 9),
            CompareResult::Less,
            Target::Create,
            TargetUnion::CreateRevision(9),
        );
        check(
            Compare::mod_revision("k", CompareOp::NotEqual, 11),
            CompareResult::NotEqual,
            Target::Mod,
            TargetUnion::ModRevision(11),
        );
        check(
            Compare::absent("k"),
            CompareResult::Equal,
            Target::Create,
            TargetUnion::CreateRevision(0),
        );
        check(
            Compare::present("k"),
            CompareResult::Greater,
            Target::Create,
            TargetUnion::CreateRevision(0),
        );
    }

    #[test]
    fn ops_cover_a_key_or_a_prefix() {
        use pb::request_op::Request;
        let request = |op: TxnOp| op.to_pb().request.expect("request set");
        assert_eq!(
            request(TxnOp::put_with_lease("k", "v", LeaseId(5))),
            Request::RequestPut(pb::PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                lease: 5
            })
        );
        assert_eq!(
            request(TxnOp::delete("k")),
            Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key: b"k".to_vec(),
                range_end: Vec::new()
            })
        );
        assert_eq!(
            request(TxnOp::delete_prefix("a/")),
            Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key: b"a/".to_vec(),
                range_end: b"a0".to_vec()
            })
        );
        assert_eq!(
            request(TxnOp::get_prefix("a/")),
            Request::RequestRange(pb::RangeRequest {
                key: b"a/".to_vec(),
                range_end: b"a0".to_vec(),
                limit: 0,
                revision: 0
            })
        );
    }
}
