//! Pipelines under operator control (SPEC §9): `pipeline list`, `get` in
//! its JSON shape, and `abort`, which aborts the running stage's
//! deployment and starts no later stage.

use hotswap_tests::{Fleet, TestDir, eventually};
use serde_json::Value;

/// dev bakes for ten minutes (blue-green), so its stage is still running
/// when the test aborts the pipeline; qa would deploy at once.
const SETTINGS: &str = "pipeline = [\"dev\", \"qa\"]\n[deploy]\nbake_time = \"10m\"\n[environments.dev]\nstrategy = \"blue-green\"\n[environments.qa]\nstrategy = \"direct\"\n";

#[test]
fn an_aborted_pipeline_aborts_its_running_stage_and_never_starts_the_next() {
    let dir = TestDir::new();
    let (mut fleet, _) = Fleet::start_many_with_settings(&dir, "dev", &["dev-1"], SETTINGS);
    fleet.add_node("qa-1", "qa");
    fleet.push_hello_per_node("1.0.0", "");

    let run = fleet
        .cp
        .ctl(&["-o", "json", "pipeline", "run", "hello@1.0.0"]);
    assert_eq!(run.code, 0, "{run:?}");
    let id = run.json()["id"].as_str().expect("pipeline id").to_string();

    // The dev stage runs (baking) with its deployment.
    let running: Value = eventually("the dev stage's deployment to bake", || {
        let got = fleet.cp.ctl(&["-o", "json", "pipeline", "get", &id]).json();
        let deployment = got["stages"][0]["deployment_id"].as_str().unwrap_or("");
        if deployment.is_empty() {
            return Err(format!("no deployment yet: {got}"));
        }
        let d = fleet
            .cp
            .ctl(&["-o", "json", "deploy", "get", deployment])
            .json();
        match d["progress"]["healthy"].as_u64() {
            Some(1) => Ok(got),
            _ => Err(format!("dev not healthy yet: {d}")),
        }
    });
    // The JSON shape of SPEC §9.
    for field in [
        "id",
        "module",
        "version",
        "target",
        "state",
        "stages",
        "created_by",
        "created_at",
        "finished_at",
        "reason",
    ] {
        assert!(
            running.get(field).is_some(),
            "pipeline lacks {field}: {running}"
        );
    }
    assert_eq!(running["target"], "qa", "{running}");
    assert_eq!(running["state"], "running", "{running}");
    assert_eq!(running["created_by"], "admin", "{running}");
    assert!(running["finished_at"].is_null(), "{running}");
    let dev_deployment = running["stages"][0]["deployment_id"]
        .as_str()
        .expect("deployment")
        .to_string();

    let list = fleet
        .cp
        .ctl(&["-o", "json", "pipeline", "list", "--active"])
        .json();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["id"], id.as_str());

    let aborted = fleet.cp.ctl(&[
        "-o",
        "json",
        "pipeline",
        "abort",
        &id,
        "--reason",
        "wrong build",
    ]);
    assert_eq!(aborted.code, 0, "{aborted:?}");
    let aborted = aborted.json();
    assert_eq!(aborted["state"], "aborted", "{aborted}");
    assert_eq!(
        aborted["reason"], "aborted at dev: wrong build",
        "{aborted}"
    );
    assert_eq!(aborted["stages"][0]["state"], "aborted", "{aborted}");
    assert_eq!(aborted["stages"][1]["state"], "waiting", "{aborted}");
    assert_eq!(aborted["stages"][1]["deployment_id"], "", "{aborted}");
    assert!(aborted["finished_at"].is_string(), "{aborted}");

    let deployment = fleet
        .cp
        .ctl(&["-o", "json", "deploy", "get", &dev_deployment])
        .json();
    assert_eq!(deployment["state"], "aborted", "{deployment}");
    assert!(
        deployment["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&format!("pipeline {id} aborted"))),
        "{deployment}"
    );

    // Aborting again is refused (exit 1, saying why); nothing is listed
    // as active any more.
    let again = fleet.cp.ctl(&["pipeline", "abort", &id]);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(
        again.stderr.contains("is aborted, not running"),
        "{again:?}"
    );
    let active = fleet
        .cp
        .ctl(&["-o", "json", "pipeline", "list", "--active"])
        .json();
    assert_eq!(active.as_array().map(Vec::len), Some(0), "{active}");
    let unknown = fleet.cp.ctl(&["pipeline", "abort", "p-none"]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(unknown.stderr.contains("not found"), "{unknown:?}");

    // The audit log names who aborted it.
    let audit = fleet
        .cp
        .ctl(&["-o", "json", "audit", "list", "--action", "pipeline.abort"])
        .json();
    let records = audit.as_array().expect("audit records");
    assert!(
        records
            .iter()
            .any(|r| r["target"] == id.as_str() && r["result"] == "ok" && r["user"] == "admin"),
        "{audit}"
    );

    // qa never gets a deployment, also after a few engine passes.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let qa = fleet
        .cp
        .ctl(&["-o", "json", "deploy", "list", "--env", "qa"])
        .json();
    assert_eq!(qa.as_array().map(Vec::len), Some(0), "{qa}");
    let after = fleet.cp.ctl(&["-o", "json", "pipeline", "get", &id]).json();
    assert_eq!(after["state"], "aborted", "{after}");
    assert_eq!(after["stages"][1]["state"], "waiting", "{after}");
    assert_eq!(fleet.version_on("qa-1", "hello"), "");
}
