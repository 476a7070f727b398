//! Signed artifacts end to end: the CLI's offline commands, push to a real
//! control plane, and distribution to an agent's store over mTLS.

use std::path::{Path, PathBuf};

use hotswap_agent::artifacts::{ArtifactStore, FetchError, TrustSource};
use hotswap_common::artifact::unpack::Limits;
use hotswap_common::tls::{self, ClientIdentity, ControlPlaneUrl, ServerTrust};
use hotswap_tests::{
    Agent, ControlPlane, CutProxy, S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, SeaweedS3, TestDir,
    ctl_offline, pack_bundle as pack, runtime, write_module,
};

struct Publisher {
    key: PathBuf,
    public: PathBuf,
}

fn publisher(dir: &Path, name: &str) -> Publisher {
    let out = dir.join(name);
    let generated = ctl_offline(&[
        "-o",
        "json",
        "keys",
        "generate",
        "--out",
        out.to_str().expect("utf8"),
    ])
    .json();
    assert!(
        generated["key_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("ed25519:")),
        "{generated}"
    );
    Publisher {
        key: dir.join(format!("{name}.key")),
        public: dir.join(format!("{name}.pub")),
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

/// Re-seal a file whose bytes were edited: recompute the integrity trailer,
/// so only the signatures stand between the edit and acceptance.
fn reseal(bytes: &mut [u8]) {
    let n = bytes.len();
    let trailer = hotswap_common::artifact::format::trailer_for(&bytes[..n - 32])
        .expect("a whole file's header and content");
    bytes[n - 32..].copy_from_slice(&trailer);
}

fn blob_count(cp: &ControlPlane) -> usize {
    std::fs::read_dir(cp.data_dir.join("blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn offline_commands_sign_verify_and_inspect() {
    let dir = TestDir::new();
    let ci = publisher(dir.path(), "ci");
    let release = publisher(dir.path(), "release");
    let artifact = pack(dir.path(), "hello", "1.0.0", b"v1", &ci.key);

    let verified = ctl_offline(&[
        "-o",
        "json",
        "module",
        "verify",
        path(&artifact),
        "--pub",
        path(&ci.public),
    ])
    .json();
    assert_eq!(verified["module"], "hello@1.0.0");
    let wrong = ctl_offline(&[
        "module",
        "verify",
        path(&artifact),
        "--pub",
        path(&release.public),
    ]);
    assert_eq!(wrong.code, 1);
    assert!(
        wrong.stderr.contains("signed only by untrusted key"),
        "{wrong:?}"
    );

    let signed = ctl_offline(&[
        "-o",
        "json",
        "module",
        "sign",
        path(&artifact),
        "--key",
        path(&release.key),
    ])
    .json();
    assert_eq!(signed["signatures"].as_array().map(Vec::len), Some(2));
    ctl_offline(&[
        "module",
        "verify",
        path(&artifact),
        "--pub",
        path(&release.public),
    ])
    .ok();

    let inspected = ctl_offline(&["-o", "json", "module", "inspect", path(&artifact)]).json();
    assert_eq!(inspected["name"], "hello");
    assert_eq!(inspected["runtime"], "bundle");
    assert!(
        inspected["digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:"))
    );

    // Private keys are 0600; a second generate refuses to overwrite.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&ci.key)
            .expect("key")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let again = ctl_offline(&["keys", "generate", "--out", path(&dir.path().join("ci"))]);
    assert_eq!(again.code, 1);
    assert!(again.stderr.contains("refusing to overwrite"), "{again:?}");

    // A flipped byte is caught locally before anything is sent.
    let mut bytes = std::fs::read(&artifact).expect("read");
    bytes[40] ^= 1;
    let bad = dir.path().join("bad.hsm");
    std::fs::write(&bad, &bytes).expect("write");
    let out = ctl_offline(&["module", "verify", path(&bad), "--pub", path(&ci.public)]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("integrity check failed"), "{out:?}");

    // Pack refuses a manifest with an unknown key, naming file and key.
    let src = dir.path().join("broken");
    write_module(&src, "broken", "1.0.0", b"x");
    std::fs::write(
        src.join("module.toml"),
        "name = \"broken\"\nversion = \"1.0.0\"\nruntime = \"bundle\"\nbogus = 1\n",
    )
    .expect("manifest");
    let out = ctl_offline(&[
        "module",
        "pack",
        path(&src),
        "--key",
        path(&ci.key),
        "-o",
        path(&dir.path().join("x.hsm")),
    ]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("module.toml")
            && out.stderr.contains("bogus")
            && out.stderr.contains("unknown key"),
        "{out:?}"
    );
}

#[test]
fn push_is_verified_idempotent_and_immutable() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let ci = publisher(dir.path(), "ci");
    let artifact = pack(dir.path(), "hello", "1.0.0", b"v1", &ci.key);

    let out = cp.ctl(&["module", "push", path(&artifact)]);
    assert_eq!(out.code, 1, "untrusted key must be refused: {out:?}");
    assert!(
        out.stderr.contains("no valid signature by a trusted key"),
        "{out:?}"
    );
    assert_eq!(blob_count(&cp), 0);

    cp.ctl(&["keys", "trust", path(&ci.public), "--name", "ci"])
        .ok();
    let pushed = cp
        .ctl(&["-o", "json", "module", "push", path(&artifact)])
        .json();
    assert_eq!(pushed["name"], "hello");
    assert_eq!(pushed["signed_by"], serde_json::json!(["ci"]));
    let again = cp
        .ctl(&["-o", "json", "module", "push", path(&artifact)])
        .json();
    assert_eq!(
        again["digest"], pushed["digest"],
        "same artifact twice is a no-op"
    );

    let other = pack(
        &dir.path().join("other"),
        "hello",
        "1.0.0",
        b"different",
        &ci.key,
    );
    let out = cp.ctl(&["module", "push", path(&other)]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("versions are immutable"), "{out:?}");

    let v2 = pack(dir.path(), "hello", "1.1.0", b"v2", &ci.key);
    cp.ctl(&["module", "push", path(&v2)]).ok();
    let module = cp.ctl(&["-o", "json", "module", "get", "hello"]).json();
    let versions: Vec<&str> = module["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter_map(|v| v["version"].as_str())
        .collect();
    assert_eq!(versions, ["1.1.0", "1.0.0"], "newest first");
    for field in ["version", "digest", "size", "signed_by", "pushed_at"] {
        assert!(
            module["versions"][0].get(field).is_some(),
            "module version lacks {field}: {module}"
        );
    }
    let list = cp.ctl(&["-o", "json", "module", "list"]).json();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(blob_count(&cp), 2);

    // A descriptor carries the trusted keys, so that an agent verifying the
    // artifact needs no ListKeys call; a revoked key is left out of it.
    let other_key = publisher(dir.path(), "second");
    cp.ctl(&["keys", "trust", path(&other_key.public), "--name", "second"])
        .ok();
    let described = |cp: &ControlPlane| {
        let (profile, url) = (cp.admin_profile(), cp.url());
        runtime().block_on(async move {
            let channel = hotswap_tests::channel_for(&profile, &url);
            hotswap_common::pb::artifacts_client::ArtifactsClient::new(channel)
                .describe_artifact(hotswap_common::pb::DescribeArtifactRequest {
                    name: "hello".into(),
                    version: "1.1.0".into(),
                })
                .await
                .expect("describe")
                .into_inner()
        })
    };
    let names = |d: &hotswap_common::pb::ArtifactDescriptor| -> Vec<String> {
        let mut names: Vec<String> = d.trusted_keys.iter().map(|k| k.name.clone()).collect();
        names.sort();
        names
    };
    let descriptor = described(&cp);
    assert!(descriptor.trusted_keys_included);
    assert_eq!(names(&descriptor), ["ci", "second"]);
    cp.ctl(&["keys", "revoke", "second"]).ok();
    assert_eq!(names(&described(&cp)), ["ci"], "a revoked key is not sent");

    // Revoking the only key makes new pushes signed by it fail.
    cp.ctl(&["keys", "revoke", "ci"]).ok();
    let v3 = pack(dir.path(), "hello", "1.2.0", b"v3", &ci.key);
    let out = cp.ctl(&["module", "push", path(&v3)]);
    assert_eq!(out.code, 1, "{out:?}");
    let keys = cp.ctl(&["-o", "json", "keys", "list"]).json();
    assert!(
        keys.as_array()
            .expect("keys")
            .iter()
            .all(|k| k["status"] == "revoked"),
        "{keys}"
    );
    let descriptor = described(&cp);
    assert!(descriptor.trusted_keys_included && descriptor.trusted_keys.is_empty());

    // Durable across a kill.
    cp.kill();
    cp.start();
    let module = cp.ctl(&["-o", "json", "module", "get", "hello"]).json();
    assert_eq!(module["versions"].as_array().map(Vec::len), Some(2));
}

#[test]
fn control_plane_rejects_altered_and_oversized_artifacts_and_stores_nothing() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init_with_settings(dir.path(), "max_artifact_bytes = 65536\n");
    cp.start();
    let ci = publisher(dir.path(), "ci");
    cp.ctl(&["keys", "trust", path(&ci.public), "--name", "ci"])
        .ok();
    let artifact = pack(dir.path(), "hello", "1.0.0", b"payload bytes", &ci.key);
    let original = std::fs::read(&artifact).expect("read");

    let try_push = |name: &str, bytes: &[u8], expect: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).expect("write");
        let out = cp.ctl(&["module", "push", path(&file)]);
        assert_eq!(out.code, 1, "{name}: {out:?}");
        assert!(
            out.stderr.contains(expect),
            "{name}: expected {expect:?} in {}",
            out.stderr
        );
    };

    // Payload byte changed, trailer recomputed: only the signature catches it.
    let mut tampered = original.clone();
    let payload_byte = tampered.len() - 32 - 2 - 121 - 5;
    tampered[payload_byte] ^= 0x20;
    reseal(&mut tampered);
    try_push("tampered.hsm", &tampered, "does not verify");

    // Renamed and re-versioned: the manifest text edited in place.
    for (from, to, label) in [
        ("hello", "hallo", "renamed"),
        ("1.0.0", "9.0.0", "re-versioned"),
    ] {
        let mut edited = original.clone();
        let at = edited
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .expect("manifest text");
        edited[at..at + to.len()].copy_from_slice(to.as_bytes());
        reseal(&mut edited);
        try_push(&format!("{label}.hsm"), &edited, "does not verify");
    }

    // Truncated: caught by the CLI's local check before upload.
    try_push(
        "truncated.hsm",
        &original[..original.len() / 2],
        "truncated",
    );

    // Oversized: the server's limit applies while streaming.
    let big = pack(
        dir.path(),
        "big",
        "1.0.0",
        &pseudo_random(200 * 1024),
        &ci.key,
    );
    let out = cp.ctl(&["module", "push", path(&big)]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("larger than the upload limit of 65536 bytes"),
        "{out:?}"
    );

    assert_eq!(
        cp.ctl(&["-o", "json", "module", "list"]).json(),
        serde_json::json!([])
    );
    assert_eq!(blob_count(&cp), 0, "nothing stored");
    let leftovers = std::fs::read_dir(cp.data_dir.join("blobs/tmp"))
        .expect("tmp")
        .count();
    assert_eq!(leftovers, 0, "uploads cleaned up");
}

fn pseudo_random(len: usize) -> Vec<u8> {
    // Incompressible but deterministic (xorshift), so zstd cannot shrink it.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// An enrolled node's identity, for calling the control plane as that node.
fn node_channel(agent: &Agent, url: &str) -> hotswap_agent::control_plane::Connection {
    let read = |f: &str| {
        std::fs::read_to_string(agent.data_dir.join("identity").join(f)).expect("identity")
    };
    let (ca, cert, key) = (read("ca.crt"), read("node.crt"), read("node.key"));
    let config = tls::client_config(
        ServerTrust::Ca(ca),
        Some(ClientIdentity {
            cert_pem: &cert,
            key_pem: &key,
        }),
    )
    .expect("config");
    let channel = tls::connect_lazy(
        &ControlPlaneUrl::parse(url).expect("url"),
        config,
        &Default::default(),
    )
    .expect("channel");
    hotswap_agent::control_plane::Connection::new(channel)
}

fn enrolled_agent(dir: &TestDir, cp: &ControlPlane) -> Agent {
    let (token, fp) = cp.token(&[]);
    let mut agent = Agent::new(dir.path(), "node-1");
    agent.enroll(&cp.url(), &token, &fp, &[]);
    cp.wait_status("node-1", "connected");
    assert!(agent.stop().success());
    agent
}

/// A running control plane that trusts a publisher "ci", and that publisher.
fn control_plane_trusting_ci(dir: &TestDir) -> (ControlPlane, Publisher) {
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let ci = publisher(dir.path(), "ci");
    cp.ctl(&["keys", "trust", path(&ci.public), "--name", "ci"])
        .ok();
    (cp, ci)
}

/// The artifact store of an enrolled agent, trusting the control plane's keys.
fn agent_store(agent: &Agent) -> ArtifactStore {
    ArtifactStore::open(
        &agent.data_dir,
        TrustSource::ControlPlane,
        Limits::default(),
    )
    .expect("store")
}

#[test]
fn agent_fetches_verifies_caches_and_reinstalls_offline() {
    let dir = TestDir::new();
    let (mut cp, ci) = control_plane_trusting_ci(&dir);
    for (version, payload) in [("1.0.0", &b"first"[..]), ("2.0.0", &b"second"[..])] {
        let artifact = pack(dir.path(), "hello", version, payload, &ci.key);
        cp.ctl(&["module", "push", path(&artifact)]).ok();
    }
    let agent = enrolled_agent(&dir, &cp);
    let rt = runtime();
    let channel = rt.block_on(async { node_channel(&agent, &cp.url()) });
    let store = agent_store(&agent);

    rt.block_on(async {
        let v1 = store
            .fetch(&channel, "hello", "1.0.0")
            .await
            .expect("fetch v1");
        assert!(v1.downloaded > 0);
        let again = store
            .fetch(&channel, "hello", "1.0.0")
            .await
            .expect("fetch v1 again");
        assert_eq!(again.downloaded, 0, "second fetch comes from the cache");
        store
            .fetch(&channel, "hello", "2.0.0")
            .await
            .expect("fetch v2");
        let dir_v1 = store
            .install("hello", "1.0.0", 1)
            .await
            .expect("install v1");
        assert_eq!(
            std::fs::read(dir_v1.join("data.bin")).expect("payload"),
            b"first"
        );
        let dir_v2 = store
            .install("hello", "2.0.0", 1)
            .await
            .expect("install v2");
        assert_eq!(
            std::fs::read(dir_v2.join("data.bin")).expect("payload"),
            b"second"
        );
        assert!(
            std::fs::read_to_string(dir_v2.join("module.toml"))
                .expect("manifest")
                .contains("2.0.0")
        );
        let missing = store
            .fetch(&channel, "hello", "3.0.0")
            .await
            .expect_err("unknown version");
        assert!(matches!(missing, FetchError::Rejected(_)), "{missing}");
    });

    // Control plane gone: the previous version reinstalls from the cache alone.
    cp.kill();
    std::fs::remove_dir_all(store.module_dir("hello", "1.0.0")).expect("remove v1");
    rt.block_on(async {
        let dir_v1 = store
            .install("hello", "1.0.0", 1)
            .await
            .expect("reinstall v1 offline");
        assert_eq!(
            std::fs::read(dir_v1.join("data.bin")).expect("payload"),
            b"first"
        );
    });

    // A cached artifact altered on disk is refused at install time.
    let cache = agent.data_dir.join("artifacts/cache");
    let cached = std::fs::read_dir(&cache)
        .expect("cache")
        .filter_map(Result::ok)
        .next()
        .expect("entry")
        .path();
    let mut bytes = std::fs::read(&cached).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&cached, bytes).expect("write");
    std::fs::remove_dir_all(agent.data_dir.join("artifacts/modules/hello"))
        .expect("remove installs");
    rt.block_on(async {
        let a = store.install("hello", "1.0.0", 1).await;
        let b = store.install("hello", "2.0.0", 1).await;
        assert!(
            a.is_err() || b.is_err(),
            "the altered cache entry must be refused"
        );
    });
}

#[test]
fn interrupted_transfer_resumes_from_where_it_stopped() {
    let dir = TestDir::new();
    let (cp, ci) = control_plane_trusting_ci(&dir);
    let payload = pseudo_random(3 * 1024 * 1024);
    let artifact = pack(dir.path(), "big", "1.0.0", &payload, &ci.key);
    cp.ctl(&["module", "push", path(&artifact)]).ok();
    let agent = enrolled_agent(&dir, &cp);
    let proxy = CutProxy::start(cp.grpc.expect("grpc"), 1024 * 1024);
    let rt = runtime();
    let store = agent_store(&agent);

    rt.block_on(async {
        let cut = node_channel(&agent, &format!("https://{}", proxy.addr));
        let err = store
            .fetch(&cut, "big", "1.0.0")
            .await
            .expect_err("the proxy cuts the transfer");
        assert!(matches!(err, FetchError::Transient(_)), "{err}");
        let partial_dir = agent.data_dir.join("artifacts/partial");
        let partial: u64 = std::fs::read_dir(&partial_dir)
            .expect("partial")
            .filter_map(Result::ok)
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        // The partial file is the artifact file being written: its header,
        // then the content that arrived.
        let header = hotswap_common::artifact::format::CONTENT_OFFSET;
        assert!(partial > header, "some bytes arrived before the cut");
        let partial = partial - header;

        let direct = node_channel(&agent, &cp.url());
        let done = store.fetch(&direct, "big", "1.0.0").await.expect("resume");
        assert!(
            done.downloaded > 0 && done.downloaded < done.info.content_len,
            "resumed, not restarted: {} of {}",
            done.downloaded,
            done.info.content_len
        );
        assert_eq!(done.downloaded + partial, done.info.content_len);
        let installed = store.install("big", "1.0.0", 1).await.expect("install");
        assert_eq!(
            std::fs::read(installed.join("data.bin")).expect("payload"),
            payload
        );
    });
}

#[test]
fn content_that_does_not_match_its_digest_is_refused_and_nothing_is_kept() {
    let dir = TestDir::new();
    let (mut cp, ci) = control_plane_trusting_ci(&dir);
    let artifact = pack(
        dir.path(),
        "hello",
        "1.0.0",
        &pseudo_random(200_000),
        &ci.key,
    );
    cp.ctl(&["module", "push", path(&artifact)]).ok();
    let agent = enrolled_agent(&dir, &cp);

    // Rot one byte of the stored blob behind the control plane's back (it
    // serves blobs as stored; the agent is the one that checks).
    cp.kill();
    let blob = std::fs::read_dir(cp.data_dir.join("blobs/sha256"))
        .expect("blobs")
        .filter_map(Result::ok)
        .next()
        .expect("one blob")
        .path();
    let mut bytes = std::fs::read(&blob).expect("blob");
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x40;
    std::fs::write(&blob, bytes).expect("rot");
    cp.start();

    let rt = runtime();
    let store = agent_store(&agent);
    rt.block_on(async {
        let channel = node_channel(&agent, &cp.url());
        let err = store
            .fetch(&channel, "hello", "1.0.0")
            .await
            .expect_err("rotten content");
        assert!(matches!(err, FetchError::Rejected(_)), "{err}");
        assert!(err.to_string().contains("does not match digest"), "{err}");
    });
    for sub in ["cache", "partial", "modules/hello"] {
        let left: Vec<_> = std::fs::read_dir(agent.data_dir.join("artifacts").join(sub))
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{sub} keeps {left:?}");
    }
    assert!(store.cached_digest("hello", "1.0.0").is_none());
}

#[test]
fn pinned_keys_override_the_control_plane_trust_set() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let ci = publisher(dir.path(), "ci");
    let other = publisher(dir.path(), "other");
    cp.ctl(&["keys", "trust", path(&ci.public), "--name", "ci"])
        .ok();
    let artifact = pack(dir.path(), "hello", "1.0.0", b"x", &ci.key);
    cp.ctl(&["module", "push", path(&artifact)]).ok();
    let agent = enrolled_agent(&dir, &cp);
    let pinned = vec![(
        "other".to_string(),
        std::fs::read_to_string(&other.public).expect("pub"),
    )];
    let store = ArtifactStore::open(
        &agent.data_dir,
        TrustSource::Pinned(pinned),
        Limits::default(),
    )
    .expect("store");
    let rt = runtime();
    rt.block_on(async {
        let err = store
            .fetch(&node_channel(&agent, &cp.url()), "hello", "1.0.0")
            .await
            .expect_err("not pinned");
        assert!(matches!(err, FetchError::Rejected(_)), "{err}");
        assert!(err.to_string().contains("untrusted key"), "{err}");
    });
    let cached = std::fs::read_dir(agent.data_dir.join("artifacts/cache"))
        .expect("cache")
        .count();
    assert_eq!(cached, 0, "nothing cached");
    assert!(
        !store.module_dir("hello", "1.0.0").exists(),
        "nothing installed"
    );
}

/// Signature times: a signature dated far ahead (80 years, or u64::MAX ms)
/// was accepted at push and by `module verify`, and `module inspect` showed
/// u64::MAX as 1970. Now a signature more than the clock skew (1 h) ahead
/// does not count, with a message saying so, and inspect says what it sees.
#[test]
fn signatures_dated_in_the_future_are_refused_and_shown_as_they_are() {
    use hotswap_common::artifact::keys::load_signing_key;
    use hotswap_common::artifact::pack::add_signature;
    use hotswap_common::timefmt::now_ms;
    let dir = TestDir::new();
    let (mut cp, ci) = control_plane_trusting_ci(&dir);
    let key = load_signing_key(&ci.key).expect("key");
    let year_ms = 365 * 86_400 * 1000;
    for (version, signed_at) in [("1.0.0", now_ms() + 80 * year_ms), ("1.0.1", u64::MAX)] {
        let artifact = pack(dir.path(), "future", version, b"x", &ci.key);
        // Re-signed by the same key: its only signature is the future one.
        add_signature(&artifact, &key, signed_at, None).expect("sign");
        let verify = ctl_offline(&[
            "module",
            "verify",
            path(&artifact),
            "--pub",
            path(&ci.public),
        ]);
        assert_eq!(verify.code, 1, "{version}: {verify:?}");
        assert!(
            verify.stderr.contains("more than 1 h ahead"),
            "{version}: {verify:?}"
        );
        let push = cp.ctl(&["module", "push", path(&artifact)]);
        assert_eq!(push.code, 1, "{version}: {push:?}");
        assert!(
            push.stderr.contains("more than 1 h ahead"),
            "{version}: {push:?}"
        );
        let inspect = ctl_offline(&["-o", "json", "module", "inspect", path(&artifact)]).json();
        let shown = inspect["signatures"][0]["signed_at"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!shown.starts_with("1970"), "{version}: {inspect}");
        if signed_at == u64::MAX {
            assert!(shown.contains("out of range"), "{inspect}");
        }
    }
    // Within the skew (a publisher's clock a little ahead) is fine.
    let artifact = pack(dir.path(), "future", "1.0.2", b"x", &ci.key);
    add_signature(&artifact, &key, now_ms() + 30 * 60 * 1000, None).expect("sign");
    cp.ctl(&["module", "push", path(&artifact)]).ok();
    cp.stop();
}

/// A tar header for a regular file `name` of `size` bytes (GNU format,
/// checksum set), built by hand so any size can be declared.
fn tar_header(name: &str, size: u64) -> Vec<u8> {
    let mut header = vec![0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    header[100..107].copy_from_slice(b"0000644");
    header[108..115].copy_from_slice(b"0000000");
    header[116..123].copy_from_slice(b"0000000");
    header[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    header[136..147].copy_from_slice(b"00000000000");
    header[156] = b'0';
    header[257..265].copy_from_slice(b"ustar  \0");
    header[148..156].fill(b' ');
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    header
}

/// Part of a hand-made zstd frame.
enum Segment<'a> {
    Bytes(&'a [u8]),
    Zeros(u64),
}

/// A valid zstd frame of raw and RLE blocks (RFC 8878 §3.1.1): no
/// compression library needed, and `Zeros` of a gigabyte costs 4 bytes per
/// 128 KiB, which is what makes a decompression bomb cheap to build.
fn zstd_frame(segments: &[Segment<'_>]) -> Vec<u8> {
    const BLOCK: u64 = 128 * 1024;
    let mut blocks: Vec<(u32, Vec<u8>)> = Vec::new(); // (type | size << 3, body)
    for segment in segments {
        match segment {
            Segment::Bytes(bytes) => {
                for chunk in bytes.chunks(BLOCK as usize) {
                    blocks.push(((chunk.len() as u32) << 3, chunk.to_vec()));
                }
            }
            &Segment::Zeros(mut left) => {
                while left > 0 {
                    let n = left.min(BLOCK);
                    blocks.push((1 << 1 | (n as u32) << 3, vec![0]));
                    left -= n;
                }
            }
        }
    }
    // Magic, a descriptor with no content size, a 128 KiB window.
    let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 7 << 3];
    let last = blocks.len().saturating_sub(1);
    for (i, (header, body)) in blocks.into_iter().enumerate() {
        let header = header | u32::from(i == last);
        frame.extend_from_slice(&header.to_le_bytes()[..3]);
        frame.extend_from_slice(&body);
    }
    frame
}

/// A tar archive of `files` (name, size), every file zeros, zstd-framed.
fn zeros_payload(files: &[(&str, u64)]) -> Vec<u8> {
    let headers: Vec<Vec<u8>> = files.iter().map(|(n, s)| tar_header(n, *s)).collect();
    let mut segments = Vec::new();
    for ((_, size), header) in files.iter().zip(&headers) {
        segments.push(Segment::Bytes(header));
        segments.push(Segment::Zeros(size.div_ceil(512) * 512));
    }
    segments.push(Segment::Zeros(1024)); // end of archive
    zstd_frame(&segments)
}

/// An artifact of `manifest` and `payload` signed by `key`, written as
/// `dir/file`: what `module pack` would refuse to build.
fn crafted_artifact(dir: &Path, file: &str, manifest: &str, payload: &[u8], key: &Path) -> PathBuf {
    use hotswap_common::artifact::format::{encode_content, read_artifact_from, write_artifact};
    use hotswap_common::artifact::keys::{load_signing_key, sign};
    let key = load_signing_key(key).expect("signing key");
    let content = encode_content(manifest, payload);
    let mut unsigned = Vec::new();
    write_artifact(&mut unsigned, &content, &[]).expect("write");
    let info = read_artifact_from(std::io::Cursor::new(&unsigned), unsigned.len() as u64)
        .expect("crafted artifact reads");
    let signature = sign(&info, &key, hotswap_common::timefmt::now_ms(), None);
    let mut bytes = Vec::new();
    write_artifact(&mut bytes, &content, &[signature]).expect("write");
    let out = dir.join(file);
    std::fs::write(&out, bytes).expect("write artifact");
    out
}

/// Push a file over the API itself, bypassing the CLI's local checks.
fn push_raw(cp: &ControlPlane, file: &Path) -> Result<(), tonic::Status> {
    use hotswap_common::pb;
    use hotswap_common::profile::Profile;
    let profile = Profile::load(&cp.admin_profile()).expect("profile");
    let config = tls::client_config(
        ServerTrust::Ca(profile.ca_cert.clone()),
        Some(ClientIdentity {
            cert_pem: &profile.client_cert,
            key_pem: &profile.client_key,
        }),
    )
    .expect("tls config");
    let bytes = std::fs::read(file).expect("read artifact");
    let chunks: Vec<pb::PushArtifactChunk> = bytes
        .chunks(1024 * 1024)
        .map(|c| pb::PushArtifactChunk { data: c.to_vec() })
        .collect();
    let url = ControlPlaneUrl::parse(&cp.url()).expect("url");
    runtime().block_on(async move {
        let channel = tls::connect_lazy(&url, config, &Default::default()).expect("channel");
        pb::artifacts_client::ArtifactsClient::new(channel)
            .push_artifact(tokio_stream::iter(chunks))
            .await
            .map(drop)
    })
}

/// Issue 18, item 6: the control plane accepted artifacts that no agent
/// could install (each failed later, on every node of a deployment). Push
/// now applies the agents' own limits, from the same `Limits` the unpack
/// uses, and names what is wrong; nothing is stored.
#[test]
fn push_refuses_artifacts_no_agent_can_install() {
    let dir = TestDir::new();
    let (cp, ci) = control_plane_trusting_ci(&dir);
    let bundle = |version: &str| {
        format!("name = \"hello\"\nversion = \"{version}\"\nruntime = \"bundle\"\n")
    };
    let good_payload = zeros_payload(&[("data.bin", 10)]);
    let long_version = format!("1.0.0-{}", "a".repeat(5000));
    let names: Vec<String> = (0..10_001).map(|i| format!("f{i}")).collect();
    let many: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 0)).collect();
    // Two files of 600 MiB each: 1.2 GiB unpacked from a 40 KiB payload.
    let bomb = zeros_payload(&[("a.bin", 600 << 20), ("b.bin", 600 << 20)]);
    assert!(bomb.len() < 64 * 1024, "a cheap bomb: {} bytes", bomb.len());
    let cases = [
        (
            "long-version.hsm",
            bundle(&long_version),
            good_payload.clone(),
            "version is 5006 bytes long; agents install versions of at most 128 bytes",
        ),
        (
            "many-entries.hsm",
            bundle("1.0.1"),
            zeros_payload(&many),
            "the payload has more than 10000 entries, the most agents unpack",
        ),
        (
            "not-zstd.hsm",
            bundle("1.0.2"),
            tar_header("data.bin", 0),
            "the payload is not zstd-compressed (it starts with 0x64617461)",
        ),
        (
            "bomb.hsm",
            bundle("1.0.3"),
            bomb,
            "the payload unpacks to more than 1073741824 bytes, the most agents unpack \
             (entry \"b.bin\" declares 629145600 bytes with 444596224 left)",
        ),
    ];
    for (file, manifest, payload, expected) in &cases {
        let artifact = crafted_artifact(dir.path(), file, manifest, payload, &ci.key);
        let status = push_raw(&cp, &artifact).expect_err(file);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{file}: {status:?}"
        );
        assert!(
            status.message().contains("cannot be installed by agents: ")
                && status.message().contains(expected),
            "{file}: expected {expected:?} in {:?}",
            status.message()
        );
        let out = cp.ctl(&["module", "push", path(&artifact)]);
        assert_eq!(out.code, 1, "{file}: {out:?}");
        assert!(out.stderr.contains(expected), "{file}: {out:?}");
        assert!(
            out.stderr.lines().count() == 1 && !out.stderr.contains(&"a".repeat(100)),
            "{file}: one short line: {out:?}"
        );
    }
    assert_eq!(
        cp.ctl(&["-o", "json", "module", "list"]).json(),
        serde_json::json!([])
    );
    assert_eq!(blob_count(&cp), 0, "nothing stored");

    // The same hand-made framing is accepted when within the limits, so the
    // refusals above are about the limits and not the crafting.
    let fine = crafted_artifact(
        dir.path(),
        "fine.hsm",
        &bundle("1.0.4"),
        &good_payload,
        &ci.key,
    );
    push_raw(&cp, &fine).expect("an installable crafted artifact is accepted");
    let unpacked = dir.path().join("unpacked-fine");
    hotswap_common::artifact::unpack::unpack_payload(
        std::io::Cursor::new(&good_payload),
        &unpacked,
        &Limits::default(),
    )
    .expect("the hand-made frame is real zstd");
    assert_eq!(
        std::fs::read(unpacked.join("data.bin")).expect("data"),
        vec![0u8; 10]
    );
}

/// Keys of the objects under `prefix` in the harness's bucket.
async fn object_keys(s3: &SeaweedS3, prefix: &str) -> std::collections::BTreeSet<String> {
    use futures_util::StreamExt;
    let raw = s3_client(s3);
    let prefix = object_store::path::Path::from(prefix);
    object_store::ObjectStore::list(&raw, Some(&prefix))
        .map(|meta| meta.expect("list objects").location.to_string())
        .collect()
        .await
}

fn s3_client(s3: &SeaweedS3) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&s3.bucket)
        .with_region(S3_REGION)
        .with_endpoint(&s3.endpoint)
        .with_allow_http(true)
        .with_access_key_id(S3_ACCESS_KEY)
        .with_secret_access_key(S3_SECRET_KEY)
        .build()
        .expect("s3 client")
}

#[test]
fn with_the_s3_backend_content_lives_in_the_bucket_and_is_checked_on_the_way_out() {
    let s3 = SeaweedS3::start("hotswap-artifacts");
    let dir = TestDir::new();
    let mut cp = ControlPlane::init_with_settings(
        dir.path(),
        &format!(
            "[blobs]\nbackend = \"s3\"\nbucket = \"{}\"\nprefix = \"cluster\"\nendpoint = \"{}\"\nregion = \"{S3_REGION}\"\n",
            s3.bucket, s3.endpoint
        ),
    );
    cp.set_env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY);
    cp.set_env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY);
    cp.start();
    let ci = publisher(dir.path(), "ci");
    cp.ctl(&["keys", "trust", path(&ci.public), "--name", "ci"])
        .ok();
    // Small (served from memory after one read) and big (streamed).
    let small = pseudo_random(100_000);
    let big = pseudo_random(9 * 1024 * 1024);
    for (version, payload) in [("1.0.0", &small), ("3.0.0", &big)] {
        let artifact = pack(dir.path(), "hello", version, payload, &ci.key);
        cp.ctl(&["module", "push", path(&artifact)]).ok();
    }
    let rt = runtime();
    assert_eq!(rt.block_on(object_keys(&s3, "cluster/sha256")).len(), 2);
    assert_eq!(blob_count(&cp), 0, "nothing in the local blob directory");

    let agent = enrolled_agent(&dir, &cp);
    let store = agent_store(&agent);
    rt.block_on(async {
        let channel = node_channel(&agent, &cp.url());
        for (version, payload) in [("1.0.0", &small), ("3.0.0", &big)] {
            store
                .fetch(&channel, "hello", version)
                .await
                .unwrap_or_else(|e| panic!("fetch {version}: {e}"));
            let installed = store
                .install("hello", version, 1)
                .await
                .unwrap_or_else(|e| panic!("install {version}: {e}"));
            assert_eq!(
                &std::fs::read(installed.join("data.bin")).expect("payload"),
                payload
            );
        }
    });

    // A version whose object is rewritten in the bucket behind the control
    // plane's back: the control plane refuses to serve it.
    let before = rt.block_on(object_keys(&s3, "cluster/sha256"));
    let artifact = pack(
        dir.path(),
        "hello",
        "2.0.0",
        &pseudo_random(50_000),
        &ci.key,
    );
    cp.ctl(&["module", "push", path(&artifact)]).ok();
    let after = rt.block_on(object_keys(&s3, "cluster/sha256"));
    let key = after
        .difference(&before)
        .next()
        .expect("a new object")
        .clone();
    rt.block_on(async {
        let raw = s3_client(&s3);
        let key = object_store::path::Path::from(key.as_str());
        let mut bytes = object_store::ObjectStoreExt::get(&raw, &key)
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes")
            .to_vec();
        let at = bytes.len() - 100;
        bytes[at] ^= 0x40;
        object_store::ObjectStoreExt::put(&raw, &key, bytes.into())
            .await
            .expect("rot");
        let channel = node_channel(&agent, &cp.url());
        let err = store
            .fetch(&channel, "hello", "2.0.0")
            .await
            .expect_err("rotten content");
        assert!(err.to_string().contains("corrupt"), "{err}");
    });
    assert!(store.cached_digest("hello", "2.0.0").is_none());
}

/// `run --blobs s3://BUCKET/PREFIX --s3-endpoint URL --s3-region R` (SPEC §7)
/// selects the bucket without a config file; a malformed `--blobs` is
/// refused before anything starts.
#[test]
fn blob_flags_select_the_bucket_and_bad_ones_are_refused() {
    let s3 = SeaweedS3::start("hotswap-flags");
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    let (status, log) = cp.start_refused(&["--blobs", "ftp://somewhere"]);
    assert!(!status.success());
    assert!(
        log.contains("expected s3://BUCKET[/PREFIX] or local"),
        "{log}"
    );

    cp.set_env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY);
    cp.set_env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY);
    let blobs = format!("s3://{}/by-flag", s3.bucket);
    cp.start_with_args(&[
        "--blobs",
        &blobs,
        "--s3-endpoint",
        &s3.endpoint,
        "--s3-region",
        S3_REGION,
    ]);
    let ci = publisher(dir.path(), "ci");
    cp.ctl(&["keys", "trust", path(&ci.public), "--name", "ci"])
        .ok();
    let artifact = pack(
        dir.path(),
        "hello",
        "1.0.0",
        &pseudo_random(50_000),
        &ci.key,
    );
    cp.ctl(&["module", "push", path(&artifact)]).ok();
    let rt = runtime();
    assert_eq!(rt.block_on(object_keys(&s3, "by-flag/sha256")).len(), 1);
    assert_eq!(blob_count(&cp), 0, "nothing in the local blob directory");
}

/// `init --blobs s3://BUCKET` creates the bucket when it is missing, finds
/// it on a second init, and refuses a malformed URL before writing the
/// data directory.
#[test]
fn init_creates_the_bucket_it_is_given() {
    let s3 = SeaweedS3::start("hotswap-existing");
    let dir = TestDir::new();
    let init = |data_dir: &str, blobs: &str| {
        std::process::Command::new(hotswap_tests::binary("hotswap-control-plane"))
            .args(["init", "--data-dir"])
            .arg(dir.path().join(data_dir))
            .args(["--blobs", blobs, "--s3-endpoint", &s3.endpoint])
            .args(["--s3-region", S3_REGION])
            .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
            .output()
            .expect("run init")
    };
    let first = init("one", "s3://made-by-init/prefix");
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{first:?}");
    assert!(stdout.contains("created bucket made-by-init"), "{stdout}");
    let second = init("two", "s3://made-by-init");
    assert!(second.status.success(), "{second:?}");
    assert!(
        String::from_utf8_lossy(&second.stdout).contains("bucket made-by-init exists"),
        "{second:?}"
    );
    let bad = init("three", "s3://No_Such");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("lowercase"),
        "{bad:?}"
    );
    assert!(!dir.path().join("three").exists(), "nothing written");
}
