//! Deployment windows and freezes (SPEC §9) with the real binaries: an ad
//! hoc freeze refuses deployments and pipelines with its id, creator and
//! reason; an admin's `--override-freeze` goes through and is audited; a
//! non-admin's is denied; deleting the freeze lifts it; a config freeze
//! refuses the same way; bad input changes nothing; a bad config refuses to
//! start. Windows: with the control plane's wall clock placed by
//! libfaketime outside and inside a window, a deployment created outside
//! waits paused before wave 1, a running one waits at its next wave
//! boundary in `paused` with the reason, neither counts against
//! `--pause-timeout`, and both go on by themselves inside.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hotswap_tests::marker::write_marker;
use hotswap_tests::{Fleet, TestDir, eventually};
use serde_json::Value;

fn push_marker(fleet: &Fleet, version: &str, log: &Path) {
    fleet.push("marker", version, |dir| {
        write_marker(dir, version, log, false)
    });
}

const ENVIRONMENTS: &str = "pipeline = [\"dev\", \"qa\", \"staging\"]\n[environments.dev]\nstrategy = \"direct\"\n[environments.qa]\nstrategy = \"rolling\"\n[environments.staging]\nstrategy = \"direct\"\nfreeze = [\"00:00-24:00 UTC\"]\n";

fn deployment(fleet: &Fleet, id: &str) -> Value {
    fleet.cp.ctl(&["-o", "json", "deploy", "get", id]).json()
}

fn node_state(d: &Value, node: &str) -> String {
    d["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["node"] == node))
        .and_then(|n| n["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

#[test]
fn a_freeze_refuses_with_its_reason_the_admin_override_is_audited_and_deleting_it_lifts_it() {
    let dir = TestDir::new();
    let (fleet, _) = Fleet::start_many_with_settings(&dir, "qa", &["a"], ENVIRONMENTS);
    let log = dir.path().join("activations.log");
    for version in ["1.0.0", "1.1.0", "1.2.0"] {
        push_marker(&fleet, version, &log);
    }
    let cp = &fleet.cp;
    let dan = cp.user_profile("dan", "deployer");
    let erin = cp.user_profile("erin", "deployer");
    let admin = cp.admin_profile();

    // Bad input: a clear error, and no freeze made.
    for (args, code, says) in [
        (
            vec!["--env", "qa", "--until", "tomorrow", "--reason", "x"],
            2,
            "not an RFC 3339 time",
        ),
        (
            vec!["--env", "qa", "--for=-1h", "--reason", "x"],
            2,
            "--for",
        ),
        (
            vec!["--env", "qa", "--for", "0s", "--reason", "x"],
            2,
            "longer than zero",
        ),
        (
            vec!["--env", "nope", "--for", "1h", "--reason", "x"],
            1,
            "--env \"nope\": unknown environment (configured: dev, qa, staging)",
        ),
        (
            vec!["--env", "qa", "--for", "1h", "--reason", " "],
            1,
            "--reason must say why",
        ),
        (
            vec![
                "--env",
                "qa",
                "--until",
                "2020-01-01T00:00:00Z",
                "--reason",
                "x",
            ],
            1,
            "is not in the future",
        ),
        (vec!["--env", "qa", "--reason", "x"], 2, "--until"),
    ] {
        let mut full = vec!["freeze", "create"];
        full.extend(args.iter().copied());
        let out = cp.ctl_with_profile(&dan, &full);
        assert_eq!(out.code, code, "{args:?}: {out:?}");
        assert!(out.stderr.contains(says), "{args:?}: {out:?}");
    }
    assert_eq!(
        cp.ctl(&["-o", "json", "freeze", "list"]).json(),
        serde_json::json!([])
    );

    // A deployer freezes qa.
    let freeze = cp
        .ctl_with_profile(
            &dan,
            &[
                "-o",
                "json",
                "freeze",
                "create",
                "--env",
                "qa",
                "--for",
                "1h",
                "--reason",
                "release party",
            ],
        )
        .json();
    let id = freeze["id"].as_str().expect("id").to_string();
    assert_eq!(freeze["environment"], "qa");
    assert_eq!(freeze["created_by"], "dan");
    assert_eq!(freeze["reason"], "release party");
    assert!(
        freeze["from"].is_string() && freeze["until"].is_string(),
        "{freeze}"
    );
    let listed = cp
        .ctl(&["-o", "json", "freeze", "list", "--env", "qa"])
        .json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["id"], id.as_str());

    // Refused, naming the freeze, who and why.
    let refused = cp.ctl_with_profile(&dan, &["deploy", "create", "marker@1.0.0", "--env", "qa"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    for part in [
        id.as_str(),
        "created by dan",
        "release party",
        "--override-freeze",
    ] {
        assert!(refused.stderr.contains(part), "{part}: {refused:?}");
    }
    let pipeline = cp.ctl_with_profile(&dan, &["pipeline", "run", "marker@1.0.0", "--to", "qa"]);
    assert_eq!(pipeline.code, 1, "{pipeline:?}");
    assert!(
        pipeline.stderr.contains(&id) && pipeline.stderr.contains("release party"),
        "{pipeline:?}"
    );
    // A dry run still shows the plan.
    let plan = cp.ctl_with_profile(
        &dan,
        &[
            "deploy",
            "create",
            "marker@1.0.0",
            "--env",
            "qa",
            "--dry-run",
        ],
    );
    assert_eq!(plan.code, 0, "{plan:?}");
    // Only an admin may override.
    let denied = cp.ctl_with_profile(
        &dan,
        &[
            "deploy",
            "create",
            "marker@1.0.0",
            "--env",
            "qa",
            "--override-freeze",
        ],
    );
    assert_eq!(denied.code, 5, "{denied:?}");
    assert!(
        denied
            .stderr
            .contains("--override-freeze needs the admin role"),
        "{denied:?}"
    );
    let overridden = cp.ctl_with_profile(
        &admin,
        &[
            "-o",
            "json",
            "deploy",
            "create",
            "marker@1.0.0",
            "--env",
            "qa",
            "--override-freeze",
            "--wait",
            "--timeout",
            "60s",
        ],
    );
    assert_eq!(overridden.code, 0, "{overridden:?}");
    let audit = cp
        .ctl(&["-o", "json", "audit", "list", "--action", "deploy.create"])
        .json();
    let targets: Vec<String> = audit
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["result"] == "ok")
        .map(|r| r["target"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        targets.iter().any(|t| t.contains(&format!(
            "--override-freeze (freeze {id} by dan: release party)"
        ))),
        "{targets:?}"
    );

    // Another deployer cannot lift dan's freeze; dan can.
    let out = cp.ctl_with_profile(&erin, &["freeze", "delete", &id]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("created by dan"), "{out:?}");
    assert_eq!(
        cp.ctl_with_profile(&dan, &["freeze", "delete", &id]).code,
        0
    );
    assert_eq!(
        cp.ctl(&["-o", "json", "freeze", "list"]).json(),
        serde_json::json!([])
    );
    let out = cp.ctl_with_profile(&dan, &["freeze", "delete", &id]);
    assert_eq!(out.code, 1, "deleting twice: {out:?}");
    let lifted = cp.ctl_with_profile(
        &dan,
        &[
            "deploy",
            "create",
            "marker@1.1.0",
            "--env",
            "qa",
            "--wait",
            "--timeout",
            "60s",
        ],
    );
    assert_eq!(lifted.code, 0, "{lifted:?}");
    let audit = cp
        .ctl(&["-o", "json", "audit", "list", "--action", "freeze."])
        .json();
    let actions: Vec<&str> = audit
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["result"] == "ok")
        .filter_map(|r| r["action"].as_str())
        .collect();
    assert_eq!(actions, ["freeze.create", "freeze.delete"], "{audit}");

    // Frozen again: the admin overrides for a pipeline too; a deployer
    // cannot.
    let again = cp
        .ctl_with_profile(
            &dan,
            &[
                "-o", "json", "freeze", "create", "--env", "qa", "--for", "1h", "--reason", "again",
            ],
        )
        .json();
    assert!(again["id"].is_string(), "{again}");
    let denied = cp.ctl_with_profile(
        &dan,
        &[
            "pipeline",
            "run",
            "marker@1.2.0",
            "--to",
            "qa",
            "--override-freeze",
        ],
    );
    assert_eq!(denied.code, 5, "{denied:?}");
    let piped = cp.ctl_with_profile(
        &admin,
        &[
            "-o",
            "json",
            "pipeline",
            "run",
            "marker@1.2.0",
            "--to",
            "qa",
            "--override-freeze",
        ],
    );
    assert_eq!(piped.code, 0, "{piped:?}");
    let audit = cp
        .ctl(&["-o", "json", "audit", "list", "--action", "pipeline.run"])
        .json();
    assert!(
        audit
            .as_array()
            .expect("records")
            .iter()
            .any(|r| r["result"] == "ok"
                && r["target"]
                    .as_str()
                    .is_some_and(|t| t.contains("--override-freeze"))),
        "{audit}"
    );
    // The config freeze of staging (all week) refuses the same way.
    let refused = cp.ctl(&["deploy", "create", "marker@1.2.0", "--env", "staging"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("frozen by the config freeze \"00:00-24:00 UTC\"")
            && refused.stderr.contains("config file"),
        "{refused:?}"
    );
}

#[test]
fn a_bad_window_or_freeze_in_the_config_refuses_to_start_naming_the_environment_and_entry() {
    let dir = TestDir::new();
    let mut cp = hotswap_tests::ControlPlane::init_with_settings(
        dir.path(),
        "pipeline = [\"qa\"]\n[environments.qa]\nstrategy = \"rolling\"\nwindows = [\"Mon-Thu 09:00-16:00 Mars/Olympus\"]\nfreeze = [\"Fri 16:00 - Mon 25:00 UTC\"]\n",
    );
    let (status, log) = cp.start_refused(&[]);
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(
            "environments.qa.windows[0] \"Mon-Thu 09:00-16:00 Mars/Olympus\": unknown time zone"
        ),
        "{log}"
    );
    assert!(
        log.contains(
            "environments.qa.freeze[0] \"Fri 16:00 - Mon 25:00 UTC\": \"25:00\" is out of range"
        ),
        "{log}"
    );
}

/// libfaketime's preload library, installed by scripts/ci-deps.sh.
fn libfaketime() -> PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| {
        panic!(
            "libfaketime is missing: run scripts/ci-deps.sh as root (it installs Debian's faketime)"
        )
    })
}

/// A window from `from` to `to` minutes after the real now, as a weekly
/// span in UTC ("Thursday 07:10 - Thursday 08:10 UTC").
fn window_from_now(from: i64, to: i64) -> String {
    let now = time::OffsetDateTime::now_utc();
    let at = |minutes: i64| {
        let t = now + time::Duration::minutes(minutes);
        format!("{} {:02}:{:02}", t.weekday(), t.hour(), t.minute())
    };
    format!("{} - {} UTC", at(from), at(to))
}

#[test]
fn outside_a_window_deployments_wait_paused_at_a_wave_boundary_and_go_on_inside() {
    let library = libfaketime();
    let dir = TestDir::new();
    // The window opens 20 minutes from now and lasts an hour. The control
    // plane's wall clock follows an offset in a file: +0 is before the
    // window, +25m inside it.
    let window = window_from_now(20, 80);
    let settings = format!(
        "pipeline = [\"qa\"]\n[environments.qa]\nstrategy = \"rolling\"\nwindows = [\"{window}\"]\n"
    );
    let (mut fleet, _) = Fleet::start_many_with_settings(&dir, "qa", &["a", "b"], &settings);
    let offset = dir.path().join("clock-offset");
    let outside = |offset: &Path| std::fs::write(offset, "+0\n").expect("offset");
    let inside = |offset: &Path| std::fs::write(offset, "+25m\n").expect("offset");
    outside(&offset);
    fleet.cp.follow_clock_offset(&library, &offset);
    fleet.cp.kill();
    fleet.cp.start();
    for agent in fleet.agents() {
        fleet.cp.wait_status(&agent.name, "connected");
    }
    let log = dir.path().join("activations.log");
    push_marker(&fleet, "1.0.0", &log);
    push_marker(&fleet, "1.1.0", &log);
    let rolling = [
        "--strategy",
        "rolling",
        "--batch-size",
        "1",
        "--min-healthy-time",
        "8s",
        "--pause-timeout",
        "2s",
    ];

    // The dry run says when the waves could start: at the window's opening.
    let mut args = vec![
        "-o",
        "json",
        "deploy",
        "create",
        "marker@1.0.0",
        "--env",
        "qa",
        "--dry-run",
    ];
    args.extend(rolling);
    let plan = fleet.cp.ctl(&args).json();
    let first = &plan["waves"][0];
    assert!(
        first["window"].as_str().is_some_and(
            |w| w.starts_with(&format!("outside deployment window {window}; next opens "))
        ),
        "{plan}"
    );
    assert!(first["earliest_start"].is_string(), "{plan}");

    // Created outside the window: it exists and waits before wave 1.
    let mut args = vec![
        "-o",
        "json",
        "deploy",
        "create",
        "marker@1.0.0",
        "--env",
        "qa",
    ];
    args.extend(rolling);
    let created = fleet.cp.ctl(&args).json();
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(created["state"], "paused", "{created}");
    assert!(
        created["reason"].as_str().is_some_and(
            |r| r.starts_with(&format!("outside deployment window {window}; next opens "))
        ),
        "{created}"
    );
    // Longer than --pause-timeout (2s): a window wait is not a pause that
    // times out. A bare wait on purpose: nothing may happen in it.
    std::thread::sleep(Duration::from_secs(4));
    let d = deployment(&fleet, &id);
    assert_eq!(d["state"], "paused", "{d}");
    assert_eq!(
        (node_state(&d, "a"), node_state(&d, "b")),
        ("waiting".into(), "waiting".into()),
        "{d}"
    );
    // An operator cannot resume it into a closed window.
    let out = fleet.cp.ctl(&["deploy", "resume", &id]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("resumes by itself"), "{out:?}");

    // Inside the window: wave 1 begins by itself.
    inside(&offset);
    eventually("wave 1 to begin inside the window", || {
        let d = deployment(&fleet, &id);
        match (d["state"].as_str(), node_state(&d, "a").as_str()) {
            (Some("running"), "updating" | "healthy") => Ok(()),
            _ => Err(d.to_string()),
        }
    });
    // The window closes during wave 1's 8s hold: wave 2 does not begin;
    // the deployment waits at the boundary, paused with the reason.
    outside(&offset);
    let held = eventually("the deployment to wait at the wave boundary", || {
        let d = deployment(&fleet, &id);
        if d["state"] == "paused" {
            Ok(d)
        } else {
            Err(d.to_string())
        }
    });
    assert_eq!(node_state(&held, "a"), "healthy", "{held}");
    assert_eq!(node_state(&held, "b"), "waiting", "{held}");
    assert!(
        held["reason"].as_str().is_some_and(
            |r| r.starts_with("outside deployment window ") && r.contains("; next opens ")
        ),
        "{held}"
    );
    std::thread::sleep(Duration::from_secs(4));
    let d = deployment(&fleet, &id);
    assert_eq!(
        (d["state"].as_str(), node_state(&d, "b")),
        (Some("paused"), "waiting".to_string()),
        "{d}"
    );
    assert_eq!(fleet.version_on("b", "marker"), "", "b was not touched");

    // Inside again: wave 2 begins and the deployment succeeds.
    inside(&offset);
    let out = fleet
        .cp
        .ctl(&["-o", "json", "deploy", "watch", &id, "--timeout", "90s"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.last_json_line()["state"], "succeeded", "{out:?}");
    assert_eq!(fleet.version_on("b", "marker"), "1.0.0");
    // The events tell the story.
    let events = fleet.cp.ctl(&["-o", "json", "events", "--limit", "500"]);
    let paused = events
        .stdout
        .lines()
        .filter(|l| l.contains("deployment.paused") && l.contains("outside deployment window"))
        .count();
    assert!(paused >= 1, "{}", events.stdout);
    assert!(
        events
            .stdout
            .lines()
            .any(|l| l.contains("deployment.created")
                && l.contains("paused: outside deployment window")),
        "{}",
        events.stdout
    );
}
