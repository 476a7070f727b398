//! Module runtimes: how an agent activates a version of a module.
//! [`bundle`] flips a `current` symlink and runs hooks; [`process`]
//! supervises a long-running program with agent-owned listening sockets,
//! each owned by one module of the node ([`listeners`]); `wasm` (with the
//! default `wasm` feature) serves WebAssembly components in process.

pub mod bundle;
pub mod ledger;
pub mod listeners;
pub mod os;
pub mod process;
#[cfg(feature = "wasm")]
pub mod wasm;
#[cfg(not(feature = "wasm"))]
#[path = "wasm_disabled.rs"]
pub mod wasm;

use std::path::Path;

pub use hotswap_common::status::Phase;

/// Why an activation did not make the new version the running one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ActivateError {
    /// The caller asked for something else while the new version was in its
    /// health gate; it was stopped and the previous version keeps serving.
    #[error("{0}")]
    Preempted(String),
    /// The version itself failed: it did not become healthy, exited during
    /// its start, or its program cannot run.
    #[error("{0}")]
    Release(String),
    /// Trouble on the node, not in the version: a listener that cannot be
    /// bound, a log or ledger that cannot be written, the supervisor gone.
    #[error("{0}")]
    Infrastructure(String),
}

impl ActivateError {
    pub fn map_message(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            ActivateError::Preempted(m) => ActivateError::Preempted(f(m)),
            ActivateError::Release(m) => ActivateError::Release(f(m)),
            ActivateError::Infrastructure(m) => ActivateError::Infrastructure(f(m)),
        }
    }
}

/// Whether an OS error is the node's trouble (disk, memory, process limits)
/// rather than the module's.
pub fn is_node_trouble(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::ENOSPC
                | libc::EDQUOT
                | libc::EIO
                | libc::EROFS
                | libc::ENOMEM
                | libc::EAGAIN
                | libc::EMFILE
                | libc::ENFILE
        )
    )
}

/// Environment every hook, health command and process gets (SPEC §3).
pub fn hotswap_env(
    module: &str,
    version: &str,
    previous: Option<&str>,
    module_dir: &Path,
    node: &str,
) -> Vec<(String, String)> {
    vec![
        ("HOTSWAP_MODULE".into(), module.into()),
        ("HOTSWAP_VERSION".into(), version.into()),
        (
            "HOTSWAP_PREVIOUS_VERSION".into(),
            previous.unwrap_or_default().into(),
        ),
        (
            "HOTSWAP_MODULE_DIR".into(),
            module_dir.display().to_string(),
        ),
        ("HOTSWAP_NODE".into(), node.into()),
    ]
}

/// The parts of the agent's own environment a module may see. Everything
/// else (notably `HOTSWAP_JOIN_TOKEN`) stays with the agent.
pub fn base_env() -> Vec<(String, String)> {
    let mut env = vec![(
        "PATH".to_string(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_string()),
    )];
    for key in ["LANG", "LC_ALL", "TZ", "HOME", "TMPDIR"] {
        if let Ok(value) = std::env::var(key) {
            env.push((key.to_string(), value));
        }
    }
    env
}

/// Resolve a manifest command's program: a path with a slash is relative to
/// the module directory, a bare name is looked up in PATH by the kernel's exec.
pub fn resolve_program(program: &str, module_dir: &Path) -> String {
    if program.contains('/') && !program.starts_with('/') {
        module_dir.join(program).display().to_string()
    } else {
        program.to_string()
    }
}

/// A command's program that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("{program}: {source}")]
    Missing {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} is not an executable file")]
    NotExecutable { program: String },
}

/// Check that a command's program exists and is executable (pre-check).
pub fn check_program(program: &str, module_dir: &Path) -> Result<(), ProgramError> {
    use std::os::unix::fs::PermissionsExt;
    let resolved = resolve_program(program, module_dir);
    if !resolved.contains('/') {
        return Ok(()); // PATH lookup happens at exec time.
    }
    let meta = std::fs::metadata(&resolved).map_err(|source| ProgramError::Missing {
        program: resolved.clone(),
        source,
    })?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(ProgramError::NotExecutable { program: resolved });
    }
    Ok(())
}
