//! The etcd v3 client the HA store talks through: it owns the connection to
//! an etcd cluster (several endpoints tried in random order, with failover
//! when one goes away), per-request deadlines, typed errors, and the
//! operations the store needs — reads and paged ranges at a revision, puts,
//! deletes, compare-and-swap transactions, compaction, leases with a
//! concurrent keep-alive that reports when the lease is lost, and prefix
//! watches that resume after a dropped connection and surface compaction as
//! an error of its own so callers re-list.
//!
//! `https://` endpoints speak client TLS, with mutual TLS for members run
//! with `--client-cert-auth`: [`EtcdTls`] holds the CA that signed the
//! members' certificates (required; the system's roots are not used) and
//! an optional client certificate and key, checked when it is made. The
//! member's certificate must name the host of its endpoint. A client
//! refuses a mix: every endpoint is `https://` with TLS set, `http://`
//! without.
//!
//! The wire format is etcd's (`proto/etcd.proto`, a slice of etcd v3.4's
//! API compiled with protox, so no protoc is needed). The generated `pb`
//! types stay inside this crate: callers see [`KeyValue`], [`Compare`],
//! [`TxnOp`], [`WatchEvent`] and [`Error`].
//!
//! Modules: `endpoint` (parsing the endpoint list), `error`, `kv` (keys and
//! lease ids), `election` (leader election with a fenced leadership), `txn` (compare
//! and operation builders), `tls` (client TLS settings), `client`
//! (connections, failover, key-value calls), `lease` (grant, keep-alive,
//! revoke) and `watch`.

mod client;
mod election;
mod endpoint;
mod error;
mod kv;
mod lease;
mod tls;
mod txn;
mod watch;

pub use client::{Client, ClientConfig, MemberStatus, RangePage};
pub use election::{Election, Leadership};
pub use endpoint::{EtcdEndpoint, parse_endpoints};
pub use error::Error;
pub use kv::{KeyValue, LeaseId};
pub use lease::{KeepAlive, Lease, LeaseLost};
pub use tls::EtcdTls;
pub use txn::{Compare, CompareOp, TxnOp, TxnOpResult, TxnResult};
pub use watch::{WatchBatch, WatchBatches, WatchEvent, WatchEventKind, WatchStream};

/// The etcd v3 API slice, generated from `proto/etcd.proto`. Public only
/// for the peer benchmarks, which drive etcd at the wire level; everything
/// else goes through [`Client`].
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

/// The smallest key after every key that starts with `prefix`, the
/// `range_end` that makes a range or watch cover the prefix. An empty
/// prefix, or one of only 0xff bytes, covers every key: etcd spells that
/// `range_end = "\0"`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        let check = |prefix: &[u8], expected: &[u8]| {
            assert_eq!(prefix_end(prefix), expected, "prefix {prefix:?}");
        };
        check(b"/hotswap/", b"/hotswap0");
        check(b"a", b"b");
        check(b"a\xff", b"b");
        check(b"\xff\xff", b"\0");
        check(b"", b"\0");
    }
}
