//! A follower forwards the engine's operator calls (deployments, pipelines,
//! clusters) to the leader on behalf of their callers (SPEC §7): on a real
//! etcd with artifacts in SeaweedFS, two replicas of one cluster.

use std::path::Path;
use std::time::{Duration, Instant};

use hotswap_tests::marker::{activations, push_marker};
use hotswap_tests::{
    Agent, ControlPlane, EtcdCluster, SeaweedS3, TestDir, ctl_offline, eventually,
};
use serde_json::Value;

/// A lazy mTLS channel to `url` from the source address `from`, with the
/// CA of the data dir `data_dir` and the certificate `cert_pem`/`key_pem`.
fn channel_from(
    from: std::net::IpAddr,
    url: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> tonic::transport::Channel {
    use hotswap_common::tls::{self, ChannelOptions, ClientIdentity, ControlPlaneUrl, ServerTrust};
    let config = tls::client_config(
        ServerTrust::Ca(ca_pem.to_string()),
        Some(ClientIdentity { cert_pem, key_pem }),
    )
    .expect("tls config");
    let options = ChannelOptions {
        local_addr: Some(from),
        ..ChannelOptions::default()
    };
    tls::connect_lazy(&ControlPlaneUrl::parse(url).expect("url"), config, &options)
        .expect("channel")
}

/// An approval of deployment `id` carrying `headers`, over `channel`.
fn approve_with_headers(
    runtime: &tokio::runtime::Runtime,
    channel: tonic::transport::Channel,
    id: &str,
    headers: &[(&'static str, String)],
) -> tonic::Status {
    use hotswap_common::pb;
    runtime.block_on(async {
        let mut request = tonic::Request::new(pb::ControlDeploymentRequest {
            id: id.to_string(),
            action: "approve".into(),
            reason: "forged".into(),
        });
        for (name, value) in headers {
            request
                .metadata_mut()
                .insert(*name, value.parse().expect("header value"));
        }
        match pb::deployments_client::DeploymentsClient::new(channel)
            .control_deployment(request)
            .await
        {
            Ok(response) => panic!("approved: {:?}", response.into_inner()),
            Err(status) => status,
        }
    })
}

/// SPEC §7: every replica serves every operator call. A deployment created,
/// approved and watched through the follower runs on the leader as its
/// callers' own; the follower lists what the leader lists; the leader
/// audits the real users at their own addresses; forwarding headers from
/// anyone but a replica are not honoured, and a call is forwarded once.
#[test]
fn a_follower_forwards_deployments_to_the_leader_as_their_caller() {
    let dir = TestDir::new();
    let etcd = EtcdCluster::start(1);
    let s3 = SeaweedS3::start("hotswap-forward");
    let mut a = ControlPlane::init_on_etcd(dir.path(), "cp-a", &etcd.endpoints(), &s3);
    let mut b = a.replica("cp-b");
    a.start_replica();
    a.wait_serving();
    eventually("cp-a to lead", || {
        let out = a.ctl(&["deploy", "list"]);
        (out.code == 0).then_some(()).ok_or(out.stderr)
    });
    b.start_replica();
    b.wait_serving();

    let dave = a.user_profile("dave", "deployer");
    let alice = a.user_profile("alice", "approver");
    let rita = a.user_profile("rita", "viewer");
    let key_base = dir.path().join("publisher");
    ctl_offline(&[
        "keys",
        "generate",
        "--out",
        key_base.to_str().expect("utf8"),
    ])
    .ok();
    let trusted = b.ctl(&[
        "keys",
        "trust",
        dir.path().join("publisher.pub").to_str().expect("utf8"),
        "--name",
        "publisher",
    ]);
    assert_eq!(trusted.code, 0, "{trusted:?}");
    let (token, fp) = a.token(&["--uses", "10", "--label", "environment=production"]);
    let both = format!("{},{}", a.url(), b.url());
    let mut agents = Vec::new();
    for name in ["n1", "n2"] {
        let mut agent = Agent::new(dir.path(), name);
        agent.enroll(&both, &token, &fp, &[]);
        a.wait_status(name, "connected");
        agents.push(agent);
    }
    let log = dir.path().join("activations.log");
    push_marker(
        &b,
        dir.path(),
        &dir.path().join("publisher.key"),
        "1.0.0",
        &log,
    );

    // Created through the follower by a deployer: production waits for a
    // second person.
    let created = b.ctl_with_profile(
        &dave,
        &[
            "-o",
            "json",
            "deploy",
            "create",
            "marker@1.0.0",
            "--env",
            "production",
            "--strategy",
            "rolling",
            "--batch-size",
            "1",
        ],
    );
    assert_eq!(created.code, 0, "{created:?}");
    assert_eq!(created.json()["state"], "awaiting_approval", "{created:?}");
    assert_eq!(created.json()["created_by"], "dave", "{created:?}");
    let id = created.json()["id"].as_str().expect("id").to_string();

    // Watched through the follower from before the approval: the stream is
    // proxied as it goes.
    let mut watch = b
        .ctl_command(
            &a.admin_profile(),
            &b.url(),
            &["-o", "json", "deploy", "watch", &id, "--timeout", "90s"],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn deploy watch");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = watch.stdout.take().expect("watch stdout");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let first = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("the watch's first state within 30 s");
    let mut watched = vec![first];

    // The leader judges the deployer by their own role.
    let denied = b.ctl_with_profile(&dave, &["deploy", "approve", &id, "--reason", "mine"]);
    assert_eq!(denied.code, 5, "{denied:?}");
    assert!(
        denied.stderr.contains("user \"dave\" has role deployer"),
        "{denied:?}"
    );

    // A reader forging the admin's identity in the forwarding headers, from
    // 127.0.0.2: through the follower (which replaces them) and straight to
    // the leader (which ignores them from a user), rita is rita.
    let read = |path: &Path| std::fs::read_to_string(path).expect("read");
    let ca_pem = read(&a.data_dir.join("ca.crt"));
    let admin = hotswap_common::profile::Profile::load(&a.admin_profile()).expect("admin");
    let rita_profile = hotswap_common::profile::Profile::load(&rita).expect("rita");
    let admin_fingerprint =
        hotswap_common::pki::pem_fingerprint(&admin.client_cert).expect("fingerprint");
    let forged = [
        ("x-hotswap-on-behalf-of", "admin".to_string()),
        ("x-hotswap-on-behalf-of-cert", admin_fingerprint.clone()),
        ("x-hotswap-forwarded-for", "10.1.2.3:4".to_string()),
    ];
    let elsewhere: std::net::IpAddr = [127, 0, 0, 2].into();
    // Channels are made inside the runtime that drives them.
    let runtime = hotswap_tests::runtime();
    let _entered = runtime.enter();
    for url in [b.url(), a.url()] {
        let channel = channel_from(
            elsewhere,
            &url,
            &ca_pem,
            &rita_profile.client_cert,
            &rita_profile.client_key,
        );
        let status = approve_with_headers(&runtime, channel, &id, &forged);
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{url}: {status:?}"
        );
        assert!(
            status.message().contains("user \"rita\" has role viewer"),
            "{url}: {status:?}"
        );
    }
    // A client claiming its call was forwarded already is not forwarded.
    let channel = channel_from(
        elsewhere,
        &b.url(),
        &ca_pem,
        &rita_profile.client_cert,
        &rita_profile.client_key,
    );
    let status = approve_with_headers(
        &runtime,
        channel,
        &id,
        &[("x-hotswap-forwarded-by", "cp-x".to_string())],
    );
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("replica cp-b does not lead either: replica cp-x forwarded this call here"),
        "{status:?}"
    );
    // The replicas' own certificate speaks only for someone.
    let channel = channel_from(
        elsewhere,
        &a.url(),
        &ca_pem,
        &read(&a.data_dir.join("replica.crt")),
        &read(&a.data_dir.join("replica.key")),
    );
    let status = approve_with_headers(&runtime, channel, &id, &[]);
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status
            .message()
            .contains("only forwards calls on behalf of an operator"),
        "{status:?}"
    );

    // Approved through the follower by an approver; the leader runs it.
    let approved = b.ctl_with_profile(&alice, &["-o", "json", "deploy", "approve", &id]);
    assert_eq!(approved.code, 0, "{approved:?}");
    watched.extend(lines.iter());
    let _ = reader.join();
    let finished = watch.wait_with_output().expect("deploy watch");
    assert!(
        finished.status.success(),
        "{watched:?} {}",
        String::from_utf8_lossy(&finished.stderr)
    );
    let states: Vec<Value> = watched
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    let state = |d: Option<&Value>| {
        d.and_then(|d| d["state"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(state(states.first()), "awaiting_approval", "{watched:?}");
    assert_eq!(state(states.last()), "succeeded", "{watched:?}");
    assert_eq!(
        states.last().map(|d| d["approved_by"].clone()),
        Some(Value::from("alice")),
        "{watched:?}"
    );
    let counts = activations(&log);
    for name in ["n1", "n2"] {
        assert_eq!(
            counts.get(&(name.to_string(), "1.0.0".to_string())),
            Some(&1),
            "{name} activated exactly once: {counts:?}"
        );
    }

    // The follower lists exactly what the leader lists.
    let on_leader = a.ctl(&["-o", "json", "deploy", "list"]);
    let on_follower = b.ctl(&["-o", "json", "deploy", "list"]);
    assert_eq!(on_leader.code, 0, "{on_leader:?}");
    assert_eq!(on_follower.code, 0, "{on_follower:?}");
    assert_eq!(on_follower.json(), on_leader.json());
    assert_eq!(on_leader.json().as_array().map(Vec::len), Some(1));

    // Clusters and pipelines go to the leader as well.
    let clusters_leader = a.ctl(&["-o", "json", "clusters", "list"]);
    let clusters_follower = b.ctl(&["-o", "json", "clusters", "list"]);
    assert_eq!(clusters_follower.code, 0, "{clusters_follower:?}");
    let names = |out: &hotswap_tests::CtlOutput| -> Vec<String> {
        out.json()
            .as_array()
            .map(|all| {
                all.iter()
                    .map(|c| c["environment"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(names(&clusters_follower), names(&clusters_leader));
    assert!(names(&clusters_leader).contains(&"production".to_string()));
    let no_pipeline = b.ctl(&["pipeline", "get", "p-none"]);
    assert_ne!(no_pipeline.code, 0, "{no_pipeline:?}");
    assert!(
        !no_pipeline.stderr.contains("does not lead"),
        "answered by the leader: {no_pipeline:?}"
    );
    let no_abort = b.ctl(&["pipeline", "abort", "p-none"]);
    assert_eq!(no_abort.code, 1, "{no_abort:?}");
    assert!(
        no_abort.stderr.contains("not found") && !no_abort.stderr.contains("does not lead"),
        "answered by the leader: {no_abort:?}"
    );
    // The history is read on any replica, from the shared store.
    let history = |cp: &hotswap_tests::ControlPlane| {
        let out = cp.ctl(&["-o", "json", "history", "diff", "--from", "0"]);
        assert_eq!(out.code, 0, "{out:?}");
        out.json()
    };
    assert_eq!(history(&b), history(&a));

    // What forwarding costs: ListDeployments on one connection, straight
    // to the leader and through the follower.
    let latency = |url: &str| {
        use hotswap_common::pb;
        let channel = hotswap_tests::channel_for(&a.admin_profile(), url);
        let mut client = pb::deployments_client::DeploymentsClient::new(channel);
        let mut took: Vec<Duration> = (0..60)
            .map(|_| {
                let started = Instant::now();
                runtime
                    .block_on(client.list_deployments(pb::ListDeploymentsRequest::default()))
                    .expect("list deployments");
                started.elapsed()
            })
            .skip(10)
            .collect();
        took.sort();
        took[took.len() / 2]
    };
    let direct = latency(&a.url());
    let forwarded = latency(&b.url());
    eprintln!(
        "ListDeployments median: {direct:?} on the leader, {forwarded:?} through the follower"
    );

    // The leader's audit log names the real users, at their own addresses.
    let audit = a.ctl(&["-o", "json", "audit", "list", "--action", "deploy."]);
    assert_eq!(audit.code, 0, "{audit:?}");
    let summary: Vec<String> = audit
        .json()
        .as_array()
        .expect("array")
        .iter()
        .map(|r| {
            let ip = r["peer"]
                .as_str()
                .and_then(|p| p.parse::<std::net::SocketAddr>().ok())
                .map(|p| p.ip().to_string())
                .unwrap_or_else(|| format!("{}", r["peer"]));
            format!(
                "{} {} {} {}",
                r["user"].as_str().unwrap_or_default(),
                r["action"].as_str().unwrap_or_default(),
                r["result"].as_str().unwrap_or_default(),
                ip
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            "dave deploy.create ok 127.0.0.1",
            "dave deploy.approve denied 127.0.0.1",
            "rita deploy.approve denied 127.0.0.2",
            "rita deploy.approve denied 127.0.0.2",
            "replica:cluster deploy.approve denied 127.0.0.2",
            "alice deploy.approve ok 127.0.0.1",
        ],
        "{audit:?}"
    );
    let verified = a.ctl(&["-o", "json", "audit", "verify"]);
    assert_eq!(verified.code, 0, "{verified:?}");
    drop(agents);
}
