//! The chaos suite of high availability (SPEC §7): two control-plane
//! replicas (three in the follower scenario) on a real 3-member etcd
//! cluster with artifacts in SeaweedFS, three agents that know every
//! replica, faults at random moments of rolling deployments, checked
//! against §7's guarantees.
//!
//! - the leading replica killed with SIGKILL at a random point (also while
//!   `deploy create` is in flight), and sometimes the new leader too while
//!   it resumes: the other replica leads within the lease plus a retry,
//!   every deployment acknowledged finishes (one not acknowledged either
//!   exists and finishes or does not exist), every node activates the
//!   version exactly once, the event log stays gap-free and the audit log
//!   one chain;
//! - one etcd member killed (sometimes etcd's leader) during a rollout:
//!   writes still succeed, the deployment finishes, and the member, started
//!   again, rejoins and serves what was written while it was down;
//! - the leading replica partitioned from etcd (its endpoints are proxies
//!   that go silent): it loses its lease, is fenced (nothing of it lands
//!   after the next leader's election: no event number twice or missing,
//!   no node activated twice), says it is not ready, the other replica
//!   leads and finishes the deployment, and once the partition heals the
//!   old leader serves again as a follower;
//! - a follower that holds agent sessions killed with SIGKILL at a random
//!   point (sometimes while it forwards `deploy create`): its agents are in
//!   session on a survivor within 5 s, every survivor's `nodes list` and
//!   `servers list` stop showing anything held by the dead replica once
//!   its lease expires, the leader keeps leading, the deployment finishes
//!   with each node activated once, logs whole as above; the follower,
//!   started again, rejoins.
//!
//! Each trial reports its failover time: from the fault to the new leader
//! answering `deploy get` (in the follower scenario: each agent's time
//! back in session, and when the dead replica's sessions vanished). `HOTSWAP_CHAOS_TRIALS` sets the trials per
//! scenario (default 1 here, the short run inside `make test`; `make chaos`
//! runs 25) and `HOTSWAP_CHAOS_SEED` the seed. Each scenario prints one
//! `CHAOS {json}` line; docs/reliability.md records them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hotswap_tests::{
    Agent, Chaos, ControlPlane, CtlOutput, EtcdCluster, PartitionProxy, SeaweedS3, TestDir,
    ctl_offline, eventually, send_kill, session_records, try_http_get,
};
use rand::Rng;
use serde_json::{Value, json};

/// Trials of each scenario inside `make test`: one cluster start and one
/// fault each, about half a minute per scenario.
const MAKE_TEST_TRIALS: usize = 1;

/// The nodes of every scenario.
const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// Replicas of one cluster, the etcd cluster and S3 under them, and the
/// agents rolled out to (three, enrolled with every replica's URL unless
/// a scenario says otherwise). Fields drop in order: agents, then
/// replicas, then what they stand on.
struct Ha {
    agents: Vec<Agent>,
    replicas: Vec<ControlPlane>,
    /// Which of `replicas` leads, as last seen.
    leader: usize,
    etcd: EtcdCluster,
    _s3: SeaweedS3,
    /// The bundle hooks' log: `<node> <version>` per activation.
    log: PathBuf,
    key: PathBuf,
    dir: TestDir,
}

impl Ha {
    /// Start two replicas and the three agents; `cp-a` reaches etcd at
    /// `a_endpoints` when given (proxies), and leads first.
    fn start(bucket: &str, etcd: EtcdCluster, a_endpoints: Option<&str>) -> Self {
        let mut ha = Self::cluster(bucket, etcd, a_endpoints, &["cp-a", "cp-b"]);
        let every = ha
            .replicas
            .iter()
            .map(ControlPlane::url)
            .collect::<Vec<_>>()
            .join(",");
        let token = ha.token("qa");
        for name in NODES {
            ha.enroll(name, &every, &token);
        }
        ha
    }

    /// Start the replicas `names` (the first leads; it reaches etcd at
    /// `a_endpoints` when given) and trust the publisher key; no agents.
    fn cluster(bucket: &str, etcd: EtcdCluster, a_endpoints: Option<&str>, names: &[&str]) -> Self {
        let dir = TestDir::new();
        let s3 = SeaweedS3::start(bucket);
        let mut a = ControlPlane::init_on_etcd(dir.path(), names[0], &etcd.endpoints(), &s3);
        let mut others: Vec<ControlPlane> = names[1..].iter().map(|n| a.replica(n)).collect();
        if let Some(endpoints) = a_endpoints {
            a.set_etcd_endpoints(endpoints);
        }
        a.start_replica();
        a.wait_serving();
        eventually("the first replica to lead", || {
            a.leads().then_some(()).ok_or_else(|| "follows".to_string())
        });
        for cp in &mut others {
            cp.start_replica();
            cp.wait_serving();
        }

        let key_base = dir.path().join("publisher");
        let generated = ctl_offline(&[
            "keys",
            "generate",
            "--out",
            key_base.to_str().expect("utf8"),
        ]);
        assert_eq!(generated.code, 0, "{generated:?}");
        let trusted = a.ctl(&[
            "keys",
            "trust",
            dir.path().join("publisher.pub").to_str().expect("utf8"),
            "--name",
            "publisher",
        ]);
        assert_eq!(trusted.code, 0, "{trusted:?}");
        let mut replicas = vec![a];
        replicas.extend(others);
        Self {
            agents: Vec::new(),
            replicas,
            leader: 0,
            etcd,
            _s3: s3,
            log: dir.path().join("activations.log"),
            key: dir.path().join("publisher.key"),
            dir,
        }
    }

    /// A join token for nodes of `environment`, with its CA fingerprint.
    fn token(&self, environment: &str) -> (String, String) {
        let label = format!("environment={environment}");
        self.leader().token(&["--uses", "10", "--label", &label])
    }

    /// Enroll agent `name` with `control_plane` (one URL or several) and
    /// wait until the leader shows it connected.
    fn enroll(&mut self, name: &str, control_plane: &str, (token, fp): &(String, String)) {
        let mut agent = Agent::new(self.dir.path(), name);
        agent.enroll(control_plane, token, fp, &[]);
        self.leader().wait_status(name, "connected");
        self.agents.push(agent);
    }

    fn leader(&self) -> &ControlPlane {
        &self.replicas[self.leader]
    }

    /// Pack and push `marker@version` to the leader (see `hotswap_tests::marker`).
    fn push_marker(&self, version: &str) {
        hotswap_tests::marker::push_marker(
            self.leader(),
            self.dir.path(),
            &self.key,
            version,
            &self.log,
        );
    }

    /// Activations per (node, version) in the hooks' log.
    fn activations(&self) -> BTreeMap<(String, String), usize> {
        hotswap_tests::marker::activations(&self.log)
    }

    /// Every node activated `version` `times` times since `before`, and
    /// nothing else.
    fn assert_activated(
        &self,
        trial: usize,
        before: &BTreeMap<(String, String), usize>,
        version: &str,
        times: usize,
    ) {
        let after = self.activations();
        for ((node, v), count) in &after {
            let new = count - before.get(&(node.clone(), v.clone())).copied().unwrap_or(0);
            let expected = if v == version { times } else { 0 };
            assert_eq!(
                new, expected,
                "trial {trial}: node {node} activated {v} {new} times: {after:?}"
            );
        }
        if times > 0 {
            for node in NODES {
                assert!(
                    after.contains_key(&(node.to_string(), version.to_string())),
                    "trial {trial}: {node} never activated {version}: {after:?}"
                );
            }
        }
    }

    /// `deploy create marker@VERSION`, rolling one node at a time with a
    /// hold between, so faults land between the first node and the last.
    fn create_on(cp: &ControlPlane, version: &str) -> CtlOutput {
        cp.ctl(&[
            "-o",
            "json",
            "deploy",
            "create",
            &format!("marker@{version}"),
            "--env",
            "qa",
            "--strategy",
            "rolling",
            "--batch-size",
            "1",
            "--min-healthy-time",
            "1s",
            "--health-deadline",
            "30s",
        ])
    }

    /// The deployment of `marker@version`, as the leader lists it.
    fn deployment_of(&self, version: &str) -> Option<Value> {
        let list = self.leader().ctl(&["-o", "json", "deploy", "list"]);
        assert_eq!(list.code, 0, "{list:?}");
        list.json()
            .as_array()?
            .iter()
            .find(|d| d["module"] == "marker" && d["version"] == version)
            .cloned()
    }

    /// Follow deployment `id` on the leader to its end; its final state.
    fn watch_to_end(&self, trial: usize, id: &str) -> String {
        let out = self
            .leader()
            .ctl(&["-o", "json", "deploy", "watch", id, "--timeout", "120s"]);
        assert!(
            out.code == 0 || out.code == 3,
            "trial {trial}: deployment {id} did not end: {out:?}"
        );
        out.last_json_line()["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// One event log, numbered without a gap or a repeat across every
    /// leader so far, and one audit chain. Returns the number of events.
    fn assert_logs_whole(&self, trial: usize) -> usize {
        let cp = self.leader();
        let events = cp.ctl(&["-o", "json", "events", "--since", "0", "--limit", "1000000"]);
        assert_eq!(events.code, 0, "{events:?}");
        let seqs: Vec<u64> = events
            .stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter_map(|e| e["seq"].as_u64())
            .collect();
        assert!(!seqs.is_empty(), "trial {trial}: no events");
        let first = seqs[0];
        assert_eq!(
            seqs,
            (first..first + seqs.len() as u64).collect::<Vec<_>>(),
            "trial {trial}: event numbers gap-free and each once"
        );
        let verified = cp.ctl(&["-o", "json", "audit", "verify"]);
        assert_eq!(verified.code, 0, "trial {trial}: {verified:?}");
        seqs.len()
    }

    fn wait_agents_connected(&self) {
        for agent in &self.agents {
            self.leader().wait_status(&agent.name, "connected");
        }
    }

    /// Wait until replica `i` leads; how long that took from `since`.
    fn wait_leads(&mut self, i: usize, since: Instant, id: Option<&str>) -> Duration {
        let cp = &self.replicas[i];
        let name = cp
            .data_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        eventually(&format!("{name:?} to lead"), || {
            if !cp.leads() {
                return Err("not leading".to_string());
            }
            let out = match id {
                Some(id) => cp.ctl(&["deploy", "get", id]),
                None => cp.ctl(&["deploy", "list"]),
            };
            (out.code == 0).then_some(()).ok_or(out.stderr)
        });
        self.leader = i;
        since.elapsed()
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Times a replica's log says it lost a lease it restarts for: its
/// leadership, or the session lease its shared sessions live under
/// (whichever etcd let go first).
trait LeasesLost {
    fn leases_lost(&self) -> usize;
}

impl LeasesLost for str {
    fn leases_lost(&self) -> usize {
        self.matches("lost leadership").count() + self.matches("lost the session lease").count()
    }
}

/// Kill -9 of the leader at a random point of a rolling deployment,
/// sometimes also of the next leader while it resumes.
#[test]
fn leader_killed_at_random_points_of_rollouts() {
    let mut chaos = Chaos::with_default_trials("ha-leader-kill", MAKE_TEST_TRIALS);
    let mut ha = Ha::start("chaos-ha-kill", EtcdCluster::start(3), None);
    let mut outcomes = Vec::new();
    let mut failovers = Vec::new();
    for trial in 1..=chaos.trials {
        let version = format!("1.{trial}.0");
        ha.push_marker(&version);
        let before = ha.activations();
        // A quarter of the kills land while `deploy create` is in flight.
        let kill_after = if chaos.rng.random_bool(0.25) {
            chaos.millis(0..150)
        } else {
            chaos.millis(150..3000)
        };
        let second_kill = chaos.rng.random_bool(0.3).then(|| chaos.millis(0..1500));

        let old = ha.leader;
        let new = 1 - old;
        let pid = ha.replicas[old].pid();
        let created = std::thread::scope(|scope| {
            let cp = &ha.replicas[old];
            let call = scope.spawn(|| Ha::create_on(cp, &version));
            std::thread::sleep(kill_after);
            send_kill(pid);
            call.join().expect("create thread")
        });
        let killed_at = Instant::now();
        ha.replicas[old].kill();
        // Back at once, as a follower behind the other replica's candidacy.
        ha.replicas[old].start_replica();
        let acknowledged = created.code == 0;
        let id = acknowledged.then(|| created.json()["id"].as_str().expect("id").to_string());
        let failover = ha.wait_leads(new, killed_at, id.as_deref());
        failovers.push(ms(failover));
        ha.replicas[old].wait_serving();

        let second_failover = second_kill.map(|delay| {
            // The new leader, killed while it resumes the deployment.
            std::thread::sleep(delay);
            let killed_at = Instant::now();
            ha.replicas[new].kill();
            ha.replicas[new].start_replica();
            let took = ha.wait_leads(old, killed_at, id.as_deref());
            ha.replicas[new].wait_serving();
            failovers.push(ms(took));
            ms(took)
        });

        let found = ha.deployment_of(&version);
        let state = match &found {
            None => {
                assert!(
                    !acknowledged,
                    "trial {trial}: deployment of {version} acknowledged ({created:?}) but lost"
                );
                "never created".to_string()
            }
            Some(d) => {
                let found_id = d["id"].as_str().expect("id");
                if let Some(id) = &id {
                    assert_eq!(id, found_id, "trial {trial}");
                }
                let state = ha.watch_to_end(trial, found_id);
                assert_eq!(state, "succeeded", "trial {trial}: {d}");
                state
            }
        };
        ha.assert_activated(trial, &before, &version, usize::from(found.is_some()));
        ha.wait_agents_connected();
        let events = ha.assert_logs_whole(trial);
        outcomes.push(json!({
            "trial": trial,
            "kill_after_ms": ms(kill_after),
            "create_acknowledged": acknowledged,
            "failover_ms": ms(failover),
            "second_kill_after_ms": second_kill.map(ms),
            "second_failover_ms": second_failover,
            "outcome": state,
            "events": events,
        }));
    }
    chaos.report(json!({
        "failover_ms": summary(&failovers),
        "trials": outcomes,
    }));
}

/// Min, median and max of a list of milliseconds.
fn summary(values: &[u64]) -> Value {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    match (sorted.first(), sorted.last()) {
        (Some(min), Some(max)) => json!({
            "min": min,
            "median": sorted[sorted.len() / 2],
            "max": max,
            "n": sorted.len(),
        }),
        _ => Value::Null,
    }
}

/// The loopback address of an `http://127.0.0.1:PORT` etcd endpoint.
fn address_of(endpoint: &str) -> SocketAddr {
    endpoint
        .trim_start_matches("http://")
        .parse()
        .expect("a loopback etcd endpoint")
}

/// Which etcd member leads now, from their `/metrics`.
fn etcd_leader(etcd: &EtcdCluster) -> Option<usize> {
    (0..etcd.len()).find(|&i| {
        try_http_get(address_of(&etcd.endpoint(i)), "/metrics")
            .is_ok_and(|(_, body)| body.lines().any(|l| l == "etcd_server_is_leader 1"))
    })
}

/// The revision etcd member `i` answers a linearizable read at, reached
/// alone: it answers only once it has caught up with the cluster's leader.
fn member_revision(etcd: &EtcdCluster, i: usize) -> i64 {
    let runtime = hotswap_tests::runtime();
    runtime.block_on(async {
        let config = hotswap_etcd::ClientConfig::from_list(&etcd.endpoint(i)).expect("endpoint");
        let client = hotswap_etcd::Client::connect(config)
            .await
            .expect("connect to the member");
        let (revision, _) = client.range(b"/hotswap/meta/").await.expect("read");
        revision
    })
}

/// One etcd member killed during a rollout, sometimes etcd's leader.
#[test]
fn etcd_member_killed_during_rollouts() {
    let mut chaos = Chaos::with_default_trials("ha-etcd-member-kill", MAKE_TEST_TRIALS);
    let mut ha = Ha::start("chaos-ha-etcd", EtcdCluster::start(3), None);
    let mut outcomes = Vec::new();
    for trial in 1..=chaos.trials {
        let version = format!("1.{trial}.0");
        ha.push_marker(&version);
        let before = ha.activations();
        let kill_after = chaos.millis(0..2500);
        let leader_before = etcd_leader(&ha.etcd);
        // Half the time etcd's own leader, otherwise any member.
        let member = match leader_before {
            Some(leader) if chaos.rng.random_bool(0.5) => leader,
            _ => chaos.rng.random_range(0..ha.etcd.len()),
        };
        let was_etcd_leader = leader_before == Some(member);
        let lost_before = ha.leader().log().as_str().leases_lost();

        let created = Ha::create_on(ha.leader(), &version);
        assert_eq!(created.code, 0, "trial {trial}: {created:?}");
        let id = created.json()["id"].as_str().expect("id").to_string();
        std::thread::sleep(kill_after);
        ha.etcd.kill(member);
        let killed_at = Instant::now();

        // Whoever leads the engine now (the same replica, unless it lost
        // its lease while etcd elected a leader) answers, and finishes.
        let leader_at_kill = ha.leader;
        let (i, answered) = eventually("a replica to answer deploy get", || {
            (0..2)
                .find(|&i| {
                    ha.replicas[i].leads() && ha.replicas[i].ctl(&["deploy", "get", &id]).code == 0
                })
                .map(|i| (i, killed_at.elapsed()))
                .ok_or_else(|| "no replica answers".to_string())
        });
        // Writes go on, on the leader and on the follower. A write sent
        // in the moment etcd's leader died may be lost with it (etcd drops
        // a proposal forwarded to a dead leader, and the call runs out its
        // 5 s deadline): the caller is told and tries again, once.
        let mut write_ms = Vec::new();
        let mut first_attempt_errors = Vec::new();
        for i in [ha.leader, 1 - ha.leader] {
            let started = Instant::now();
            let mut out = ha.replicas[i].ctl(&["tokens", "create"]);
            if out.code != 0 {
                first_attempt_errors.push(out.stderr.trim().to_string());
                out = ha.replicas[i].ctl(&["tokens", "create"]);
            }
            assert_eq!(
                out.code, 0,
                "trial {trial}: a write with etcd member m{member} down, tried twice: {out:?}"
            );
            write_ms.push(ms(started.elapsed()));
        }
        ha.leader = i;
        let state = ha.watch_to_end(trial, &id);
        assert_eq!(state, "succeeded", "trial {trial}");
        let down_for = killed_at.elapsed();
        ha.assert_activated(trial, &before, &version, 1);
        let lost_after = ha.replicas[leader_at_kill].log().as_str().leases_lost();

        // The member rejoins: it serves a read that includes what was
        // written while it was down.
        let revision_without = member_revision(&ha.etcd, (member + 1) % ha.etcd.len());
        let restarted = Instant::now();
        ha.etcd.restart(member);
        let revision = eventually("the restarted member to catch up", || {
            let revision = member_revision(&ha.etcd, member);
            (revision >= revision_without)
                .then_some(revision)
                .ok_or(format!("at {revision}, the cluster at {revision_without}"))
        });
        let rejoined = restarted.elapsed();
        ha.wait_agents_connected();
        let events = ha.assert_logs_whole(trial);
        outcomes.push(json!({
            "trial": trial,
            "member": member,
            "was_etcd_leader": was_etcd_leader,
            "kill_after_ms": ms(kill_after),
            "write_ms": write_ms,
            "write_first_attempt_errors": first_attempt_errors,
            "deploy_get_answered_after_ms": ms(answered),
            "control_plane_leader_kept": i == leader_at_kill && lost_after == lost_before,
            "outcome": state,
            "member_down_ms": ms(down_for),
            "member_rejoined_ms": ms(rejoined),
            "member_revision": revision,
            "events": events,
        }));
    }
    chaos.report(json!(outcomes));
}

/// `/readyz` of a replica's admin endpoint: its status code, or why it
/// did not answer.
fn readyz(cp: &ControlPlane) -> Result<u16, String> {
    try_http_get(cp.admin.expect("serving"), "/readyz").map(|(code, _)| code)
}

/// The leading replica cut off from etcd (and only from etcd: agents and
/// clients still reach it) at a random point of a rollout.
#[test]
fn leader_partitioned_from_etcd_is_fenced_and_replaced() {
    let mut chaos = Chaos::with_default_trials("ha-leader-etcd-partition", MAKE_TEST_TRIALS);
    let etcd = EtcdCluster::start(3);
    let proxies: Vec<PartitionProxy> = (0..etcd.len())
        .map(|i| PartitionProxy::start(address_of(&etcd.endpoint(i))))
        .collect();
    let proxied = proxies
        .iter()
        .map(|p| format!("http://{}", p.addr))
        .collect::<Vec<_>>()
        .join(",");
    let mut ha = Ha::start("chaos-ha-partition", etcd, Some(&proxied));
    let (a, b) = (0, 1);
    let mut outcomes = Vec::new();
    let mut failovers = Vec::new();
    for trial in 1..=chaos.trials {
        if ha.leader != a {
            // cp-a leads each trial: cp-b hands over and comes back.
            let stopping = Instant::now();
            ha.replicas[b].stop();
            ha.wait_leads(a, stopping, None);
            ha.replicas[b].start_replica();
            ha.replicas[b].wait_serving();
            // The agents cp-b held reconnect before the next deployment
            // looks for connected nodes.
            ha.wait_agents_connected();
        }
        let version = format!("1.{trial}.0");
        ha.push_marker(&version);
        let before = ha.activations();
        let lost_before = ha.replicas[a].log().as_str().leases_lost();
        let cut_after = chaos.millis(0..2500);
        let created = Ha::create_on(&ha.replicas[a], &version);
        assert_eq!(created.code, 0, "trial {trial}: {created:?}");
        let id = created.json()["id"].as_str().expect("id").to_string();
        std::thread::sleep(cut_after);
        for proxy in &proxies {
            proxy.partition();
        }
        let cut_at = Instant::now();

        // Watch both sides until cp-b leads and cp-a has said it lost the
        // lease and is not ready.
        let (mut b_leads, mut a_lost, mut a_not_ready) = (None, None, None);
        let mut a_readyz = Vec::new();
        eventually("cp-b to lead and cp-a to give up", || {
            if b_leads.is_none()
                && ha.replicas[b].leads()
                && ha.replicas[b].ctl(&["deploy", "get", &id]).code == 0
            {
                b_leads = Some(cut_at.elapsed());
            }
            if a_lost.is_none() && ha.replicas[a].log().as_str().leases_lost() > lost_before {
                a_lost = Some(cut_at.elapsed());
            }
            let ready = readyz(&ha.replicas[a]);
            if a_readyz.last() != Some(&ready) {
                a_readyz.push(ready.clone());
            }
            if a_not_ready.is_none() && ready.is_ok_and(|code| code != 200) {
                a_not_ready = Some(cut_at.elapsed());
            }
            match (b_leads, a_lost, a_not_ready) {
                (Some(_), Some(_), Some(_)) => Ok(()),
                other => Err(format!(
                    "(b leads, a lost, a not ready) at {other:?}; a readyz {a_readyz:?}"
                )),
            }
        });
        ha.leader = b;
        let (b_leads, a_lost, a_not_ready) = (
            b_leads.unwrap_or_default(),
            a_lost.unwrap_or_default(),
            a_not_ready.unwrap_or_default(),
        );
        failovers.push(ms(b_leads));
        // The lease is 5 s: cp-a stops trusting it within that, and etcd
        // lets it go soon after.
        assert!(
            a_lost < Duration::from_secs(7),
            "trial {trial}: cp-a noticed the lost lease after {a_lost:?}"
        );
        assert!(
            b_leads < Duration::from_secs(15),
            "trial {trial}: cp-b led after {b_leads:?}"
        );
        // cp-a, cut off, does not lead.
        assert!(!ha.replicas[a].leads(), "trial {trial}: cp-a still leads");

        let state = ha.watch_to_end(trial, &id);
        assert_eq!(state, "succeeded", "trial {trial}");
        ha.assert_activated(trial, &before, &version, 1);

        // Heal: cp-a serves again, as a follower of cp-b.
        let healed_at = Instant::now();
        for proxy in &proxies {
            proxy.heal();
        }
        eventually("cp-a to follow cp-b", || {
            let ready = readyz(&ha.replicas[a])?;
            // A follower again: not leading, and answering the engine's
            // calls by forwarding them to cp-b.
            let out = ha.replicas[a].ctl(&["deploy", "list"]);
            if ready == 200 && !ha.replicas[a].leads() && out.code == 0 && ha.replicas[b].leads() {
                Ok(())
            } else {
                Err(format!("readyz {ready}: {out:?}"))
            }
        });
        let rejoined = healed_at.elapsed();
        ha.wait_agents_connected();
        // Nothing of cp-a landed after cp-b took over: the event log has
        // no number twice or missing, no node activated twice.
        let events = ha.assert_logs_whole(trial);
        ha.assert_activated(trial, &before, &version, 1);
        outcomes.push(json!({
            "trial": trial,
            "cut_after_ms": ms(cut_after),
            "failover_ms": ms(b_leads),
            "old_leader_lost_lease_ms": ms(a_lost),
            "old_leader_not_ready_ms": ms(a_not_ready),
            "old_leader_readyz": format!("{a_readyz:?}"),
            "outcome": state,
            "rejoined_as_follower_ms": ms(rejoined),
            "events": events,
        }));
    }
    chaos.report(json!({
        "failover_ms": summary(&failovers),
        "trials": outcomes,
    }));
}

/// The replicas of the follower scenario: `cp-a` leads, `cp-b` and `cp-c`
/// follow.
const THREE: [&str; 3] = ["cp-a", "cp-b", "cp-c"];

/// One agent's own way to each replica: a proxy per replica, so that the
/// test decides where the agent's session lands (its ways to the other
/// replicas refuse while it starts) while the agent knows every replica and
/// fails over to any of them.
struct Routes(Vec<PartitionProxy>);

impl Routes {
    fn to(replicas: &[ControlPlane]) -> Self {
        Self(
            replicas
                .iter()
                .map(|cp| {
                    PartitionProxy::start(
                        cp.url()
                            .trim_start_matches("https://")
                            .parse()
                            .expect("a loopback replica address"),
                    )
                })
                .collect(),
        )
    }

    /// The agent's `--control-plane`: every route.
    fn urls(&self) -> String {
        self.0
            .iter()
            .map(PartitionProxy::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The replica (index into `THREE`) holding each node's session, by node
/// name, as the replicas published them on etcd.
fn holders(etcd: &EtcdCluster, names: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
    session_records(&etcd.endpoints())
        .into_iter()
        .filter_map(|(id, replica)| {
            let name = names.get(&id)?;
            let i = THREE.iter().position(|r| *r == replica)?;
            Some((name.clone(), i))
        })
        .collect()
}

/// Move the routed agents (the first `routes.len()` of `ha.agents`) onto
/// the replicas `placement` gives: an agent held elsewhere restarts while
/// its routes to every other replica refuse. Waits until etcd shows each
/// session where it belongs and every replica lists every node connected.
fn place_agents(
    ha: &mut Ha,
    routes: &[Routes],
    placement: &[usize],
    names: &BTreeMap<String, String>,
) {
    let now = holders(&ha.etcd, names);
    let moving: Vec<usize> = (0..routes.len())
        .filter(|&i| now.get(&ha.agents[i].name) != Some(&placement[i]))
        .collect();
    for &i in &moving {
        for (j, route) in routes[i].0.iter().enumerate() {
            if j != placement[i] {
                route.refuse();
            }
        }
        ha.agents[i].stop();
        ha.agents[i].start(&routes[i].urls(), &[]);
    }
    let want: BTreeMap<String, usize> = (0..routes.len())
        .map(|i| (ha.agents[i].name.clone(), placement[i]))
        .collect();
    eventually("the agents' sessions on their replicas", || {
        let seen = holders(&ha.etcd, names);
        let placed: BTreeMap<String, usize> = seen
            .into_iter()
            .filter(|(name, _)| want.contains_key(name))
            .collect();
        (placed == want)
            .then_some(())
            .ok_or(format!("held {placed:?}, want {want:?}"))
    });
    for &i in &moving {
        for route in &routes[i].0 {
            route.admit();
        }
    }
    for cp in &ha.replicas {
        for agent in &ha.agents {
            cp.wait_status(&agent.name, "connected");
        }
    }
}

/// What `servers list` on `cp` says of replica `name`: absent, or its
/// `(ready, sessions)`.
fn server_seen(cp: &ControlPlane, name: &str) -> Result<Option<(bool, u64)>, String> {
    let out = cp.ctl(&["-o", "json", "servers", "list"]);
    if out.code != 0 {
        return Err(out.stderr);
    }
    let list = out.json();
    let Some(all) = list.as_array() else {
        return Err(format!("servers list is not a list: {}", out.stdout));
    };
    Ok(all.iter().find(|s| s["name"] == name).map(|s| {
        (
            s["ready"].as_bool().unwrap_or(false),
            s["sessions"].as_u64().unwrap_or(0),
        )
    }))
}

/// Whether `cp` lists every rolled-out node running `marker@version`
/// (when a deployment of it exists), healthy, and `servers list` on it
/// shows `name` (itself), every replica holding sessions, and for every
/// replica it shows, the sessions `records` (node id to replica, from etcd)
/// say that replica holds.
fn fleet_truthful(
    cp: &ControlPlane,
    name: &str,
    version: Option<&str>,
    records: &BTreeMap<String, String>,
) -> Result<(), String> {
    if let Some(version) = version {
        for node in cp.nodes() {
            if !NODES.contains(&node["name"].as_str().unwrap_or_default()) {
                continue;
            }
            let runs = node["modules"].as_array().is_some_and(|modules| {
                modules.iter().any(|m| {
                    m["name"] == "marker" && m["version"] == version && m["health"] == "healthy"
                })
            });
            if !runs {
                return Err(format!("{name} shows {node}"));
            }
        }
    }
    let out = cp.ctl(&["-o", "json", "servers", "list"]);
    let listed = out.json();
    let all = listed.as_array().cloned().unwrap_or_default();
    if !all.iter().any(|s| s["name"] == name) {
        return Err(format!("{name} does not list itself: {}", out.stdout));
    }
    // Every replica holding a session is listed, wherever the list is asked.
    for holder in records.values() {
        if !all.iter().any(|s| s["name"] == holder.as_str()) {
            return Err(format!(
                "{name} does not list {holder}, which holds sessions: {}",
                out.stdout
            ));
        }
    }
    for server in &all {
        let held = records
            .values()
            .filter(|r| server["name"] == r.as_str())
            .count() as u64;
        if server["sessions"].as_u64() != Some(held) {
            return Err(format!(
                "{name} lists {server}, etcd has {held} sessions held by it"
            ));
        }
    }
    Ok(())
}

/// Kill -9 of a follower that holds agent sessions, at a random point of a
/// rolling deployment (every fourth trial while it forwards the `deploy
/// create` to the leader). Three replicas; the three agents rolled
/// out to reach each replica through a route of their own, and are placed
/// at random before each trial (the killed follower always holds some);
/// two more agents, outside the deployment, know only `cp-b` or only
/// `cp-c`.
#[test]
fn follower_holding_sessions_killed_during_rollouts() {
    let mut chaos = Chaos::with_default_trials("ha-follower-kill", MAKE_TEST_TRIALS);
    let mut ha = Ha::cluster("chaos-ha-follower", EtcdCluster::start(3), None, &THREE);
    let routes: Vec<Routes> = NODES.iter().map(|_| Routes::to(&ha.replicas)).collect();
    let qa = ha.token("qa");
    for (name, route) in NODES.iter().zip(&routes) {
        ha.enroll(name, &route.urls(), &qa);
    }
    // `pinned[i]`, known to replica `i` only (none for the leader).
    let pinned = [None, Some("n4"), Some("n5")];
    let dev = ha.token("dev");
    for (i, name) in pinned.iter().enumerate() {
        if let Some(name) = name {
            let url = ha.replicas[i].url();
            ha.enroll(name, &url, &dev);
        }
    }
    let names: BTreeMap<String, String> = ha
        .agents
        .iter()
        .map(|agent| (agent.node_id(), agent.name.clone()))
        .collect();
    let endpoints = ha.etcd.endpoints();

    let mut outcomes = Vec::new();
    let mut reconnects = Vec::new();
    let mut vanishes = Vec::new();
    for trial in 1..=chaos.trials {
        let leader = ha.leader;
        let followers: Vec<usize> = (0..THREE.len()).filter(|&i| i != leader).collect();
        let follower = followers[chaos.rng.random_range(0..followers.len())];
        let mut placement: Vec<usize> = NODES
            .iter()
            .map(|_| chaos.rng.random_range(0..THREE.len()))
            .collect();
        if !placement.contains(&follower) {
            let i = chaos.rng.random_range(0..placement.len());
            placement[i] = follower;
        }
        place_agents(&mut ha, &routes, &placement, &names);
        let held: Vec<String> = (0..NODES.len())
            .filter(|&i| placement[i] == follower)
            .map(|i| ha.agents[i].name.clone())
            .collect();

        let version = format!("1.{trial}.0");
        ha.push_marker(&version);
        let before = ha.activations();
        // Every fourth trial sends `deploy create` to the follower about to
        // die, which forwards it to the leader.
        let via_follower = trial % 4 == 0;
        let kill_after = if via_follower {
            // The call takes about a tenth of a second in a debug build.
            chaos.millis(0..100)
        } else {
            chaos.millis(0..4000)
        };
        let lost_before = ha.leader().log().as_str().leases_lost();
        let pid = ha.replicas[follower].pid();
        let (created, create_took) = std::thread::scope(|scope| {
            let cp = &ha.replicas[if via_follower { follower } else { leader }];
            let call = scope.spawn(|| {
                let started = Instant::now();
                (Ha::create_on(cp, &version), started.elapsed())
            });
            std::thread::sleep(kill_after);
            send_kill(pid);
            call.join().expect("create thread")
        });
        let killed_at = Instant::now();
        ha.replicas[follower].kill();
        // Where in the rollout the kill landed: nodes that had activated.
        let activated_at_kill = ha
            .activations()
            .iter()
            .filter(|((_, v), n)| *v == version && **n > 0)
            .count();
        let acknowledged = created.code == 0;
        let id = acknowledged.then(|| created.json()["id"].as_str().expect("id").to_string());

        // The killed follower's agents, in session again on a survivor:
        // when etcd first shows each one's session held there.
        let mut moved: BTreeMap<String, u64> = BTreeMap::new();
        while moved.len() < held.len() && killed_at.elapsed() < Duration::from_secs(15) {
            for (name, i) in holders(&ha.etcd, &names) {
                if held.contains(&name) && i != follower && !moved.contains_key(&name) {
                    moved.insert(name, ms(killed_at.elapsed()));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            moved.len(),
            held.len(),
            "trial {trial}: {held:?} of {} not all back in session: {moved:?}",
            THREE[follower]
        );
        for (name, took) in &moved {
            assert!(
                *took < 5000,
                "trial {trial}: {name} back in session {took} ms after the kill"
            );
            reconnects.push(*took);
        }

        // Every survivor tells the truth once the dead replica's lease is
        // gone: no session held by it, every rolled-out node connected, the
        // node that knows only the dead replica disconnected.
        let dead = THREE[follower];
        let survivors: Vec<usize> = (0..THREE.len()).filter(|&i| i != follower).collect();
        let vanished = eventually("the dead replica's sessions to vanish", || {
            let records = session_records(&endpoints);
            let left: Vec<&String> = records
                .iter()
                .filter(|(_, r)| *r == dead)
                .map(|(id, _)| id)
                .collect();
            if !left.is_empty() {
                return Err(format!("{dead} still holds {left:?}"));
            }
            for &s in &survivors {
                let cp = &ha.replicas[s];
                match server_seen(cp, dead)? {
                    None | Some((false, 0)) => {}
                    shown => return Err(format!("{} shows {dead} as {shown:?}", THREE[s])),
                }
                for node in cp.nodes() {
                    let name = node["name"].as_str().unwrap_or_default();
                    let status = node["status"].as_str().unwrap_or_default();
                    let only_via = pinned.iter().position(|p| *p == Some(name));
                    let want = if only_via == Some(follower) {
                        "disconnected"
                    } else {
                        "connected"
                    };
                    if status != want {
                        return Err(format!("{} shows {name} {status}", THREE[s]));
                    }
                }
            }
            Ok(killed_at.elapsed())
        });
        vanishes.push(ms(vanished));
        assert!(
            vanished < Duration::from_secs(8),
            "trial {trial}: {dead}'s sessions shown until {vanished:?} after the kill"
        );

        let found = ha.deployment_of(&version);
        let state = match &found {
            None => {
                assert!(
                    !acknowledged,
                    "trial {trial}: deployment of {version} acknowledged ({created:?}) but lost"
                );
                "never created".to_string()
            }
            Some(d) => {
                let found_id = d["id"].as_str().expect("id");
                if let Some(id) = &id {
                    assert_eq!(id, found_id, "trial {trial}");
                }
                let state = ha.watch_to_end(trial, found_id);
                assert_eq!(state, "succeeded", "trial {trial}: {d}");
                state
            }
        };
        ha.assert_activated(trial, &before, &version, usize::from(found.is_some()));
        // A follower's death does not move the engine.
        assert!(
            ha.leader().leads(),
            "trial {trial}: {} stopped leading",
            THREE[leader]
        );
        assert_eq!(
            ha.leader().log().as_str().leases_lost(),
            lost_before,
            "trial {trial}: the leader lost a lease when a follower died"
        );
        let events = ha.assert_logs_whole(trial);

        // The killed replica rejoins as a follower, and its own agent
        // comes back to it.
        let restarted = Instant::now();
        ha.replicas[follower].start_replica();
        ha.replicas[follower].wait_serving();
        eventually("the restarted replica to follow", || {
            let cp = &ha.replicas[follower];
            let out = cp.ctl(&["deploy", "list"]);
            let ready = readyz(cp)?;
            (ready == 200 && !cp.leads() && out.code == 0)
                .then_some(())
                .ok_or(format!("readyz {ready}: {out:?}"))
        });
        let rejoined = restarted.elapsed();
        for cp in &ha.replicas {
            for agent in &ha.agents {
                cp.wait_status(&agent.name, "connected");
            }
        }
        // Every replica, the rejoined one too, shows what the nodes run
        // and counts the sessions each replica it lists holds.
        for (i, cp) in ha.replicas.iter().enumerate() {
            eventually(&format!("{} to show the fleet as it is", THREE[i]), || {
                let records = session_records(&endpoints);
                fleet_truthful(
                    cp,
                    THREE[i],
                    found.as_ref().map(|_| version.as_str()),
                    &records,
                )
            });
        }
        outcomes.push(json!({
            "trial": trial,
            "killed": dead,
            "placement": placement.iter().map(|&i| THREE[i]).collect::<Vec<_>>(),
            "create_via_killed": via_follower,
            "kill_after_ms": ms(kill_after),
            "activated_at_kill": activated_at_kill,
            "create_acknowledged": acknowledged,
            "create_ms": ms(create_took),
            "reconnect_ms": moved,
            "sessions_vanished_ms": ms(vanished),
            "outcome": state,
            "events": events,
            "rejoined_ms": ms(rejoined),
        }));
    }
    chaos.report(json!({
        "reconnect_ms": summary(&reconnects),
        "sessions_vanished_ms": summary(&vanishes),
        "trials": outcomes,
    }));
}
