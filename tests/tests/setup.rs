//! `make test` is the whole set-up: its `deps` step installs what the tests
//! need beyond Rust with `scripts/ci-deps.sh` as root, and otherwise names
//! what is missing and the command that installs it, before anything builds.
//! Nothing here installs anything: the install path is only ever reached by
//! `make` itself.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hotswap_tests::TestDir;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `make` in the workspace, free of the flags of a `make test` running us.
fn make() -> Command {
    let mut command = Command::new("make");
    command
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .arg("-C")
        .arg(workspace())
        .arg("--no-print-directory");
    command
}

/// The commands `make TARGET` would run, without running them.
fn make_dry_run(target: &str) -> Vec<String> {
    let out = make()
        .args(["-n", target])
        .output()
        .expect("run make (the tests run from make test)");
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).lines().map(str::to_string).collect()
}

#[test]
fn make_test_and_chaos_see_to_their_dependencies_before_building() {
    for target in ["test", "chaos"] {
        let commands = make_dry_run(target);
        let deps = commands
            .iter()
            .position(|c| c.contains("scripts/ci-deps.sh --check") && c.contains("id -u"));
        let build = commands.iter().position(|c| c.contains("cargo build"));
        assert!(
            deps.is_some() && deps < build,
            "make {target}: no deps step before the build: {commands:#?}"
        );
    }
}

/// Missing Python packages (a Python that does not exist) are reported with
/// the install command, exit 1, and nothing is installed.
fn check_with_missing_python(command: &mut Command) -> Output {
    command
        .env("PYTHON", "/nonexistent/python3")
        .output()
        .expect("run the dependency check")
}

fn assert_names_what_is_missing(out: &Output) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for expected in [
        "ci-deps: the tests need what is not installed here:",
        "grpcio==1.85.1",
        "for /nonexistent/python3 (tests/tests/interop.rs)",
        "install it with: sudo bash scripts/ci-deps.sh",
    ] {
        assert!(stderr.contains(expected), "{expected:?} missing: {stderr}");
    }
    assert!(
        !text(&out.stdout).contains("installing"),
        "installed something: {out:?}"
    );
}

#[test]
fn dependency_check_names_what_is_missing_and_how_to_install_it() {
    let out = check_with_missing_python(
        Command::new("bash")
            .arg(workspace().join("scripts/ci-deps.sh"))
            .arg("--check"),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_names_what_is_missing(&out);

    let usage = Command::new("bash")
        .arg(workspace().join("scripts/ci-deps.sh"))
        .arg("--install-everything")
        .output()
        .expect("run ci-deps.sh");
    assert_eq!(usage.status.code(), Some(2), "{usage:?}");
    assert!(text(&usage.stderr).contains("usage:"), "{usage:?}");
}

#[test]
fn make_deps_as_another_user_checks_instead_of_installing() {
    // An `id` that says uid 1000, first on PATH, stands for a user other
    // than root whoever runs the tests.
    let dir = TestDir::new();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let fake_id = bin.join("id");
    std::fs::write(&fake_id, "#!/bin/sh\necho 1000\n").expect("fake id");
    std::fs::set_permissions(&fake_id, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Never reach the installing branch by accident.
    let uid = Command::new("sh")
        .args(["-c", "id -u"])
        .env("PATH", &path)
        .output()
        .expect("sh");
    assert_eq!(text(&uid.stdout).trim(), "1000", "the fake id is not used");

    let out = check_with_missing_python(make().arg("deps").env("PATH", &path));
    assert_names_what_is_missing(&out);
}
