//! The connection to the cluster and the key-value calls: one HTTP/2
//! connection at a time (over TLS for `https://` endpoints), to an endpoint
//! picked at random; when it fails the next call connects to another. Every
//! call has a deadline.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::endpoint::{EtcdEndpoint, parse_endpoints};
use crate::error::{Error, error_chain};
use crate::kv::{KeyValue, LeaseId};
use crate::pb;
use crate::pb::kv_client::KvClient;
use crate::pb::maintenance_client::MaintenanceClient;
use crate::prefix_end;
use crate::tls::EtcdTls;
use crate::txn::{Compare, TxnOp, TxnResult, txn_request};

/// How the client connects and how long it waits.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub endpoints: Vec<EtcdEndpoint>,
    /// For one TCP connection to one endpoint. On loopback a dead member
    /// refuses at once; the bound matters for hosts that drop packets.
    pub connect_timeout: Duration,
    /// For one call, failovers to other endpoints included.
    pub request_timeout: Duration,
    /// Keys per page when [`Client::range`] reads a whole prefix.
    pub page_size: i64,
    /// Client TLS. With it every endpoint must be `https://`, without it
    /// every endpoint must be `http://`: [`Client::connect`] refuses a mix,
    /// so a typo in one URL cannot send requests (and their data) in the
    /// clear, and an `https://` endpoint is never trusted on the system's
    /// roots (see [`EtcdTls`]).
    pub tls: Option<EtcdTls>,
}

impl ClientConfig {
    /// Defaults for `endpoints`: connect within 2 s, answer within 5 s
    /// (etcd itself gives up on a proposal after about 5 s when it has no
    /// quorum, so a shorter deadline would turn slow into failed), pages of
    /// 1000 keys.
    pub fn new(endpoints: Vec<EtcdEndpoint>) -> Self {
        Self {
            endpoints,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            page_size: 1000,
            tls: None,
        }
    }

    /// The same settings, connecting over client TLS.
    pub fn with_tls(self, tls: EtcdTls) -> Self {
        Self {
            tls: Some(tls),
            ..self
        }
    }

    /// Refuse endpoints whose scheme does not match the TLS setting.
    fn check_schemes(&self) -> Result<(), Error> {
        for endpoint in &self.endpoints {
            let reason = match (&self.tls, endpoint.is_https()) {
                (Some(_), true) | (None, false) => continue,
                (Some(_), false) => {
                    "plain http, but client TLS is configured: every endpoint must be https://"
                }
                (None, true) => {
                    "https needs client TLS settings with the CA that signed the members' \
                     certificates (ca_file); the system's roots are not used"
                }
            };
            return Err(Error::InvalidEndpoint {
                endpoint: endpoint.url().to_string(),
                reason: reason.to_string(),
            });
        }
        Ok(())
    }

    /// Defaults for a comma-separated endpoint list.
    pub fn from_list(list: &str) -> Result<Self, Error> {
        Ok(Self::new(parse_endpoints(list)?))
    }
}

/// One page of a range read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangePage {
    pub kvs: Vec<KeyValue>,
    /// Whether keys remain after this page (ask again after the last key).
    pub more: bool,
    /// The revision the page was read at; pass it to the next page's read
    /// so all pages show one snapshot.
    pub revision: i64,
}

/// One member's view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub member_id: u64,
    /// The leader's member id, 0 while there is none.
    pub leader: u64,
    pub raft_term: u64,
    pub revision: i64,
    pub version: String,
}

/// Whether a failed call may be sent again to another endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Reads: sending twice changes nothing.
    Always,
    /// Writes: only when the connection could not even be made, so the
    /// request cannot have reached etcd. A write cut off mid-flight may
    /// have been applied; the caller decides (its compares make a second
    /// try safe or show that the first one landed).
    IfNotSent,
}

/// A client for an etcd cluster; cheap to clone, clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    current: Mutex<Current>,
}

#[derive(Default)]
struct Current {
    connected: Option<(usize, Channel)>,
    /// The endpoint whose connection failed last, tried last next time.
    last_failed: Option<usize>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.inner.config.endpoints)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connect to one of the endpoints (in random order). Endpoints whose
    /// scheme does not match `config.tls` are refused before any connection.
    pub async fn connect(config: ClientConfig) -> Result<Self, Error> {
        if config.endpoints.is_empty() {
            return Err(Error::NoEndpoints);
        }
        config.check_schemes()?;
        let client = Self {
            inner: Arc::new(Inner {
                config,
                current: Mutex::new(Current::default()),
            }),
        };
        client.channel("connect").await?;
        Ok(client)
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The endpoint the client is connected to now, if any.
    pub async fn current_endpoint(&self) -> Option<EtcdEndpoint> {
        let current = self.inner.current.lock().await;
        current
            .connected
            .as_ref()
            .map(|(index, _)| self.inner.config.endpoints[*index].clone())
    }

    /// The connection to use, made now if there is none.
    pub(crate) async fn channel(&self, op: &'static str) -> Result<(usize, Channel), Error> {
        let mut current = self.inner.current.lock().await;
        if let Some(connected) = &current.connected {
            return Ok(connected.clone());
        }
        let endpoints = &self.inner.config.endpoints;
        let mut order: Vec<usize> = (0..endpoints.len()).collect();
        order.shuffle(&mut rand::rng());
        if let Some(failed) = current.last_failed {
            order.retain(|&i| i != failed);
            order.push(failed);
        }
        let mut last = String::from("no endpoint tried");
        for index in order {
            let endpoint = &endpoints[index];
            match self.open(endpoint).await {
                Ok(channel) => {
                    tracing::debug!(endpoint = %endpoint, "connected to etcd");
                    current.connected = Some((index, channel.clone()));
                    return Ok((index, channel));
                }
                Err(e) => {
                    tracing::debug!(endpoint = %endpoint, error = %e, "etcd endpoint unreachable");
                    last = format!("{endpoint}: {e}");
                }
            }
        }
        Err(Error::Unreachable {
            op,
            endpoints: endpoints
                .iter()
                .map(EtcdEndpoint::url)
                .collect::<Vec<_>>()
                .join(","),
            last,
        })
    }

    async fn open(&self, endpoint: &EtcdEndpoint) -> Result<Channel, String> {
        let timeout = self.inner.config.connect_timeout;
        let mut builder = tonic::transport::Endpoint::from_shared(endpoint.url().to_string())
            .map_err(|e| e.to_string())?;
        if let Some(tls) = &self.inner.config.tls {
            // The member's certificate must name the host of its URL.
            builder = builder
                .tls_config(tls.tonic_config(endpoint.host()))
                .map_err(|e| format!("client TLS: {}", error_chain(&e)))?;
        }
        let builder = builder
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            // HTTP/2 pings find a member that vanished without closing the
            // connection (a partition), so watches and keep-alives move on
            // within seconds instead of waiting for TCP to give up.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true);
        match tokio::time::timeout(timeout, builder.connect()).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(e)) => Err(error_chain(&e)),
            Err(_) => Err(format!("no connection within {timeout:?}")),
        }
    }

    /// Drop the connection to `index` (if it is still the current one), so
    /// the next call connects to another endpoint.
    pub(crate) async fn forget(&self, index: usize) {
        let mut current = self.inner.current.lock().await;
        if current.connected.as_ref().is_some_and(|(i, _)| *i == index) {
            tracing::debug!(endpoint = %self.inner.config.endpoints[index], "leaving etcd endpoint");
            current.connected = None;
            current.last_failed = Some(index);
        }
    }

    /// Run one unary call with the request deadline, failing over to other
    /// endpoints as `retry` allows. `revision` is only for error messages
    /// (the revision asked for, or the lease).
    pub(crate) async fn unary<T, F, Fut>(
        &self,
        op: &'static str,
        retry: Retry,
        revision: i64,
        mut call: F,
    ) -> Result<T, Error>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let timeout = self.inner.config.request_timeout;
        let attempts = self.inner.config.endpoints.len().max(1);
        let mut tried: Option<usize> = None;
        let attempt_all = async {
            let mut last = None;
            for _ in 0..attempts {
                let (index, channel) = self.channel(op).await?;
                tried = Some(index);
                let status = match call(channel).await {
                    Ok(value) => return Ok(value),
                    Err(status) => status,
                };
                let error = Error::from_status(op, &status, revision);
                // Unavailable: this member cannot serve now (gone, or
                // without a leader); Cancelled: the connection died under
                // the call. Either way the next call goes elsewhere.
                if !matches!(
                    crate::error::code_of(&status),
                    tonic::Code::Unavailable | tonic::Code::Cancelled
                ) {
                    return Err(error);
                }
                self.forget(index).await;
                let again = match retry {
                    Retry::Always => true,
                    Retry::IfNotSent => never_connected(&status),
                };
                if !again {
                    return Err(error);
                }
                tracing::debug!(op, error = %error, "retrying on another etcd endpoint");
                last = Some(error);
            }
            Err(last.unwrap_or(Error::NoEndpoints))
        };
        match tokio::time::timeout(timeout, attempt_all).await {
            Ok(result) => result,
            Err(_) => {
                if let Some(index) = tried {
                    self.forget(index).await;
                }
                Err(Error::DeadlineExceeded { op, timeout })
            }
        }
    }

    /// The value at `key`, if there is one (a linearizable read).
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<KeyValue>, Error> {
        let key = key.into();
        let response = self
            .unary("get", Retry::Always, 0, |channel| {
                let request = pb::RangeRequest {
                    key: key.clone(),
                    range_end: Vec::new(),
                    limit: 1,
                    revision: 0,
                };
                async move { KvClient::new(channel).range(request).await }
            })
            .await?;
        Ok(response
            .into_inner()
            .kvs
            .into_iter()
            .next()
            .map(KeyValue::from_pb))
    }

    /// The cluster's current revision, read linearizably: it is at least
    /// that of every write acknowledged anywhere before the call, whichever
    /// member answers (a `status` reports only the answering member's own
    /// applied revision, which may lag behind the leader's).
    pub async fn current_revision(&self, key: impl Into<Vec<u8>>) -> Result<i64, Error> {
        let key = key.into();
        let response = self
            .unary("range", Retry::Always, 0, |channel| {
                let request = pb::RangeRequest {
                    key: key.clone(),
                    range_end: Vec::new(),
                    limit: 1,
                    revision: 0,
                };
                async move { KvClient::new(channel).range(request).await }
            })
            .await?;
        revision_of("range", response.into_inner().header)
    }

    /// One page of the keys under `prefix`, in key order: at most `limit`
    /// keys after `start_after` (from the first key when `None`), read at
    /// `revision` (the current one when 0).
    pub async fn range_page(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        revision: i64,
        limit: i64,
    ) -> Result<RangePage, Error> {
        let key = match start_after {
            // The smallest key greater than the last one seen.
            Some(last) => [last, &[0]].concat(),
            None => prefix.to_vec(),
        };
        let range_end = prefix_end(prefix);
        let response = self
            .unary("range", Retry::Always, revision, |channel| {
                let request = pb::RangeRequest {
                    key: key.clone(),
                    range_end: range_end.clone(),
                    limit,
                    revision,
                };
                async move { KvClient::new(channel).range(request).await }
            })
            .await?
            .into_inner();
        let header = response.header.ok_or(Error::Malformed {
            op: "range",
            what: "no header",
        })?;
        Ok(RangePage {
            kvs: response.kvs.into_iter().map(KeyValue::from_pb).collect(),
            more: response.more,
            revision: header.revision,
        })
    }

    /// Every key under `prefix`, read in pages of `page_size` at one
    /// revision, and that revision (watch from it to follow later changes).
    ///
    /// A page larger than a response may be (tonic decodes at most 4 MiB;
    /// a page of large values passes that long before `page_size` keys) is
    /// asked for again with half the keys, and the rest of the listing goes
    /// on with the smaller pages. One key always fits: etcd takes no value
    /// larger than its `--max-request-bytes`.
    pub async fn range(&self, prefix: &[u8]) -> Result<(i64, Vec<KeyValue>), Error> {
        let mut limit = self.inner.config.page_size.max(1);
        let mut revision = 0;
        let mut kvs: Vec<KeyValue> = Vec::new();
        loop {
            let last = kvs.last().map(|kv| kv.key.clone());
            let page = match self
                .range_page(prefix, last.as_deref(), revision, limit)
                .await
            {
                Ok(page) => page,
                Err(e) if e.is_response_too_large() && limit > 1 => {
                    limit = (limit / 2).max(1);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if revision == 0 {
                revision = page.revision;
            }
            kvs.extend(page.kvs);
            if !page.more {
                return Ok((revision, kvs));
            }
        }
    }

    /// Write `value` at `key`; the revision of the write.
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<i64, Error> {
        self.put_request(key.into(), value.into(), 0).await
    }

    /// Write `value` at `key`, deleted when `lease` ends.
    pub async fn put_with_lease(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Result<i64, Error> {
        self.put_request(key.into(), value.into(), lease.0).await
    }

    async fn put_request(&self, key: Vec<u8>, value: Vec<u8>, lease: i64) -> Result<i64, Error> {
        let response = self
            .unary("put", Retry::IfNotSent, 0, |channel| {
                let request = pb::PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    lease,
                };
                async move { KvClient::new(channel).put(request).await }
            })
            .await?
            .into_inner();
        revision_of("put", response.header)
    }

    /// Delete `key`; how many keys were deleted (0 or 1).
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<i64, Error> {
        self.delete_request(key.into(), Vec::new()).await
    }

    /// Delete every key under `prefix`; how many were deleted.
    pub async fn delete_prefix(&self, prefix: &[u8]) -> Result<i64, Error> {
        self.delete_request(prefix.to_vec(), prefix_end(prefix))
            .await
    }

    async fn delete_request(&self, key: Vec<u8>, range_end: Vec<u8>) -> Result<i64, Error> {
        let response = self
            .unary("delete", Retry::IfNotSent, 0, |channel| {
                let request = pb::DeleteRangeRequest {
                    key: key.clone(),
                    range_end: range_end.clone(),
                };
                async move { KvClient::new(channel).delete_range(request).await }
            })
            .await?;
        Ok(response.into_inner().deleted)
    }

    /// Run `success` if every compare holds, `failure` otherwise, atomically.
    pub async fn txn(
        &self,
        compares: &[Compare],
        success: &[TxnOp],
        failure: &[TxnOp],
    ) -> Result<TxnResult, Error> {
        let request = txn_request(compares, success, failure);
        let response = self
            .unary("txn", Retry::IfNotSent, 0, |channel| {
                let request = request.clone();
                async move { KvClient::new(channel).txn(request).await }
            })
            .await?;
        Ok(TxnResult::from_pb(response.into_inner()))
    }

    /// Drop the history before `revision`; returns once the compaction is
    /// applied on the member that answered, so reads and watches from older
    /// revisions fail with [`Error::Compacted`] from then on.
    pub async fn compact(&self, revision: i64) -> Result<(), Error> {
        self.unary("compact", Retry::IfNotSent, revision, |channel| {
            let request = pb::CompactionRequest {
                revision,
                physical: true,
            };
            async move { KvClient::new(channel).compact(request).await }
        })
        .await?;
        Ok(())
    }

    /// The status of the member the client is connected to.
    pub async fn status(&self) -> Result<MemberStatus, Error> {
        let response = self
            .unary("status", Retry::Always, 0, |channel| async move {
                MaintenanceClient::new(channel)
                    .status(pb::StatusRequest {})
                    .await
            })
            .await?
            .into_inner();
        let header = response.header.ok_or(Error::Malformed {
            op: "status",
            what: "no header",
        })?;
        Ok(MemberStatus {
            member_id: header.member_id,
            leader: response.leader,
            raft_term: response.raft_term,
            revision: header.revision,
            version: response.version,
        })
    }
}

pub(crate) fn revision_of(
    op: &'static str,
    header: Option<pb::ResponseHeader>,
) -> Result<i64, Error> {
    header.map(|h| h.revision).ok_or(Error::Malformed {
        op,
        what: "no header",
    })
}

/// Whether the call failed while connecting, before anything was sent.
pub(crate) fn never_connected(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some_tls() -> EtcdTls {
        let ca = rcgen::generate_simple_self_signed(vec!["ca".to_string()])
            .expect("rcgen makes a certificate");
        EtcdTls::from_pem(&ca.cert.pem(), None).expect("a valid CA")
    }

    #[test]
    fn schemes_must_match_the_tls_setting() {
        let check = |list: &str, tls: bool, expected: Result<(), &str>| {
            let mut config = ClientConfig::from_list(list).expect("endpoints parse");
            if tls {
                config = config.with_tls(some_tls());
            }
            let got = config.check_schemes().map_err(|e| e.to_string());
            assert_eq!(got, expected.map_err(str::to_string), "{list} (tls: {tls})");
        };
        check("http://a:1,http://b:2", false, Ok(()));
        check("https://a:1,https://b:2", true, Ok(()));
        check(
            "https://a:1,http://b:2",
            true,
            Err(
                "etcd endpoint \"http://b:2\": plain http, but client TLS is configured: \
                 every endpoint must be https://",
            ),
        );
        check(
            "http://a:1,https://b:2",
            false,
            Err(
                "etcd endpoint \"https://b:2\": https needs client TLS settings with the CA \
                 that signed the members' certificates (ca_file); the system's roots are not used",
            ),
        );
    }

    #[tokio::test]
    async fn connect_refuses_a_mix_before_dialing() {
        // Nothing listens on port 1; the refusal must come from the check,
        // not from a connection attempt.
        let config = ClientConfig::from_list("http://127.0.0.1:1")
            .expect("endpoints parse")
            .with_tls(some_tls());
        let error = Client::connect(config)
            .await
            .expect_err("http with TLS is refused");
        assert!(matches!(error, Error::InvalidEndpoint { .. }), "{error}");
    }
}
