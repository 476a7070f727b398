//! WebAssembly components for the wasm runtime's tests, built without a
//! Rust wasm target (rustup cannot download one here): the handler in
//! `tests/fixtures/wasm/handler/app.py` by componentize-py (from
//! `scripts/ci-deps.sh`), against the `wasi:http` WIT the agent's own
//! `wasmtime-wasi-http` crate ships. Built once per checkout and cached
//! under `target/wasm-fixtures/`, by the hash of everything that goes in.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use hotswap_common::artifact::Digest;

/// The crate whose `wit/` directory holds the `wasi:http` WIT (the version
/// the agent links).
const WIT_CRATE: &str = "wasmtime-wasi-http-48.0.8";

/// The workspace's target directory (`CARGO_TARGET_DIR`, else `target/`):
/// where `scripts/ci-deps.sh` puts the componentize-py virtualenv.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// `wasmtime-wasi-http`'s `wit/` in cargo's registry sources.
fn wit_dir() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("CARGO_HOME or HOME");
    let sources = cargo_home.join("registry").join("src");
    let found = std::fs::read_dir(&sources)
        .into_iter()
        .flatten()
        .flatten()
        .map(|index| index.path().join(WIT_CRATE).join("wit"))
        .find(|wit| wit.join("deps").join("http.wit").is_file());
    found.unwrap_or_else(|| {
        panic!(
            "no {WIT_CRATE}/wit under {}: build the workspace first (cargo fetches the crate)",
            sources.display()
        )
    })
}

/// `wasi:http/proxy@0.2.N`, from the package line of the WIT's http.wit.
fn proxy_world(wit: &Path) -> String {
    let http = std::fs::read_to_string(wit.join("deps").join("http.wit")).expect("http.wit");
    let package = http
        .lines()
        .find_map(|l| l.trim().strip_prefix("package wasi:http@"))
        .and_then(|rest| rest.strip_suffix(';'))
        .expect("a `package wasi:http@VERSION;` line");
    format!("wasi:http/proxy@{package}")
}

/// The handler component's path, built on first use.
pub fn handler_component() -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let source = repo_root().join("tests/fixtures/wasm/handler");
    let app = std::fs::read(source.join("app.py")).expect("app.py");
    let wit = wit_dir();
    let world = proxy_world(&wit);
    let tool = target_dir().join("componentize-venv/bin/componentize-py");
    assert!(
        tool.is_file(),
        "{} is missing: run `bash scripts/ci-deps.sh` (make test does)",
        tool.display()
    );
    let mut key = app.clone();
    key.extend_from_slice(world.as_bytes());
    key.extend_from_slice(tool.display().to_string().as_bytes());
    let out_dir = target_dir().join("wasm-fixtures");
    let out = out_dir.join(format!("handler-{}.wasm", &Digest::of(&key).hex()[..16]));
    if out.is_file() {
        return out;
    }
    std::fs::create_dir_all(&out_dir).expect("fixtures dir");
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let started = std::time::Instant::now();
    let built = Command::new(&tool)
        .arg("-d")
        .arg(&wit)
        .args(["-w", &world, "componentize", "-p"])
        .arg(&source)
        .arg("app")
        .arg("-o")
        .arg(&tmp)
        .current_dir(&out_dir)
        .output()
        .expect("run componentize-py");
    assert!(
        built.status.success(),
        "componentize-py failed ({}): {}",
        built.status,
        String::from_utf8_lossy(&built.stderr)
            .lines()
            .filter(|l| !l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    std::fs::rename(&tmp, &out).expect("move the component in place");
    eprintln!(
        "built {} in {:?} ({} bytes)",
        out.display(),
        started.elapsed(),
        std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0)
    );
    out
}
