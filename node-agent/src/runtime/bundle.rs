//! The bundle runtime: a version is a directory; activating it flips the
//! module's `current` symlink to it atomically (a new link renamed over the
//! old one), then runs the `activate` hook. If the hook fails the link flips
//! back, so `current` always names a version that activated successfully.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::{ActivateError, base_env, resolve_program};

/// Why a hook did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} did not finish within {}s", timeout.as_secs())]
    Timeout { program: String, timeout: Duration },
    #[error("waiting for {program}: {source}")]
    Wait {
        program: String,
        source: std::io::Error,
    },
    /// The hook ran and failed; the end of what it wrote to stderr.
    #[error("{program} exited with {status}: {stderr_tail}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr_tail: String,
    },
}

/// Why deactivating a bundle did not go cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DeactivateError {
    #[error("cannot remove current: {0}")]
    Clear(std::io::Error),
    #[error("deactivate hook failed: {0}")]
    Hook(HookError),
}

/// Hooks that run longer than this are killed and count as failed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

fn current_link(module_root: &Path) -> PathBuf {
    module_root.join("current")
}

/// The version `current` points at, if any.
pub fn current(module_root: &Path) -> Option<String> {
    let target = std::fs::read_link(current_link(module_root)).ok()?;
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Point `current` at `version` atomically.
pub fn flip(module_root: &Path, version: &str) -> std::io::Result<()> {
    let tmp = module_root.join(format!(".current.{:016x}", rand::random::<u64>()));
    std::os::unix::fs::symlink(version, &tmp)?;
    if let Err(e) = std::fs::rename(&tmp, current_link(module_root)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    hotswap_common::fsutil::sync_dir(module_root)
}

/// Remove `current` (the module is no longer active).
pub fn clear(module_root: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(current_link(module_root)) {
        Ok(()) => hotswap_common::fsutil::sync_dir(module_root),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Flip to `version` and run its activate hook; on failure flip back to
/// `previous` (or clear `current` when there was none). Cancelling `preempt`
/// while the hook runs kills the hook and flips back the same way.
pub async fn activate(
    module_root: &Path,
    version: &str,
    previous: Option<&str>,
    hook: Option<&[String]>,
    env: &[(String, String)],
    preempt: &CancellationToken,
) -> Result<(), ActivateError> {
    flip(module_root, version).map_err(|e| {
        ActivateError::Infrastructure(format!("cannot flip current to {version}: {e}"))
    })?;
    let Some(hook) = hook else { return Ok(()) };
    let dir = module_root.join(version);
    let outcome = tokio::select! {
        biased;
        // Dropping the hook's future kills it (`kill_on_drop`).
        _ = preempt.cancelled() => Err(ActivateError::Preempted(format!(
            "activate hook of {version} preempted by a new desired state"
        ))),
        ran = run_hook(hook, &dir, env, HOOK_TIMEOUT) => ran.map_err(|e| {
            ActivateError::Release(format!("activate hook failed: {e}"))
        }),
    };
    if let Err(e) = outcome {
        let restored = match previous {
            Some(previous) => {
                flip(module_root, previous).map(|()| format!("flipped back to {previous}"))
            }
            None => clear(module_root).map(|()| "no previous version to flip back to".to_string()),
        };
        let restored = restored.unwrap_or_else(|e| format!("flipping back failed too: {e}"));
        return Err(e.map_message(|m| format!("{m}; {restored}")));
    }
    Ok(())
}

/// Run the deactivate hook of the active version and clear `current`.
pub async fn deactivate(
    module_root: &Path,
    version: &str,
    hook: Option<&[String]>,
    env: &[(String, String)],
) -> Result<(), DeactivateError> {
    let result = match hook {
        Some(hook) => run_hook(hook, &module_root.join(version), env, HOOK_TIMEOUT).await,
        None => Ok(()),
    };
    clear(module_root).map_err(DeactivateError::Clear)?;
    result.map_err(DeactivateError::Hook)
}

/// Run a hook in `dir` with the SPEC environment; its output is logged.
pub async fn run_hook(
    command: &[String],
    dir: &Path,
    env: &[(String, String)],
    timeout: Duration,
) -> Result<(), HookError> {
    let program = resolve_program(&command[0], dir);
    let mut child = tokio::process::Command::new(&program)
        .args(&command[1..])
        .current_dir(dir)
        .env_clear()
        .envs(base_env())
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| HookError::Spawn {
            program: program.clone(),
            source,
        })?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let output = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut out).await;
        }
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut err).await;
        }
        (out, err)
    };
    let run = async {
        let (out, err) = output.await;
        (child.wait().await, out, err)
    };
    let (status, out, err) =
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| HookError::Timeout {
                program: program.clone(),
                timeout,
            })?;
    let status = status.map_err(|source| HookError::Wait {
        program: program.clone(),
        source,
    })?;
    let tail = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let trimmed = text.trim();
        trimmed[trimmed.len().saturating_sub(512)..].to_string()
    };
    if !out.is_empty() {
        tracing::info!(hook = %program, output = %tail(&out), "hook output");
    }
    if status.success() {
        Ok(())
    } else {
        Err(HookError::Failed {
            stderr_tail: tail(&err),
            program,
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir.join("bin")).expect("bin");
        let path = dir.join("bin").join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[tokio::test]
    async fn flip_activate_and_flip_back_on_hook_failure() {
        let root = tempfile::tempdir().expect("tempdir");
        let v1 = root.path().join("1.0.0");
        let v2 = root.path().join("2.0.0");
        script(&v1, "ok.sh", "echo \"$HOTSWAP_VERSION\" > ../activated");
        script(&v2, "fail.sh", "echo broken config >&2; exit 3");
        let hook_ok = vec!["bin/ok.sh".to_string()];
        let env = vec![("HOTSWAP_VERSION".to_string(), "1.0.0".to_string())];
        let never = CancellationToken::new();
        activate(root.path(), "1.0.0", None, Some(&hook_ok), &env, &never)
            .await
            .expect("v1");
        assert_eq!(current(root.path()).as_deref(), Some("1.0.0"));
        assert_eq!(
            std::fs::read_to_string(root.path().join("activated"))
                .expect("ran")
                .trim(),
            "1.0.0"
        );

        let hook_fail = vec!["bin/fail.sh".to_string()];
        let err = activate(
            root.path(),
            "2.0.0",
            Some("1.0.0"),
            Some(&hook_fail),
            &[],
            &never,
        )
        .await
        .expect_err("hook fails");
        assert!(matches!(err, ActivateError::Release(_)), "{err:?}");
        let err = err.to_string();
        assert!(
            err.contains("broken config") && err.contains("flipped back to 1.0.0"),
            "{err}"
        );
        assert_eq!(
            current(root.path()).as_deref(),
            Some("1.0.0"),
            "current flipped back"
        );
    }

    #[tokio::test]
    async fn first_activation_failure_clears_current_and_hooks_time_out() {
        let root = tempfile::tempdir().expect("tempdir");
        let v1 = root.path().join("1.0.0");
        script(&v1, "slow.sh", "sleep 30");
        let err = run_hook(
            &["bin/slow.sh".to_string()],
            &v1,
            &[],
            Duration::from_millis(200),
        )
        .await
        .expect_err("timeout")
        .to_string();
        assert!(err.contains("did not finish within"), "{err}");
        script(&v1, "fail.sh", "exit 1");
        activate(
            root.path(),
            "1.0.0",
            None,
            Some(&["bin/fail.sh".to_string()]),
            &[],
            &CancellationToken::new(),
        )
        .await
        .expect_err("fails");
        assert_eq!(current(root.path()), None);
    }

    #[tokio::test]
    async fn a_preempted_hook_is_killed_and_current_flips_back() {
        let root = tempfile::tempdir().expect("tempdir");
        let v1 = root.path().join("1.0.0");
        let v2 = root.path().join("2.0.0");
        std::fs::create_dir_all(&v1).expect("v1");
        // Writes its pid, then would take far longer than the test.
        script(&v2, "slow.sh", "echo $$ > ../hook.pid; exec sleep 60");
        flip(root.path(), "1.0.0").expect("flip");
        let preempt = CancellationToken::new();
        let cancel = preempt.clone();
        let pid_file = root.path().join("hook.pid");
        let canceller = tokio::spawn(async move {
            while !pid_file.exists() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            cancel.cancel();
        });
        let started = std::time::Instant::now();
        let err = activate(
            root.path(),
            "2.0.0",
            Some("1.0.0"),
            Some(&["bin/slow.sh".to_string()]),
            &[],
            &preempt,
        )
        .await
        .expect_err("preempted");
        canceller.await.expect("canceller");
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(matches!(err, ActivateError::Preempted(_)), "{err:?}");
        assert!(err.to_string().contains("flipped back to 1.0.0"), "{err}");
        assert_eq!(current(root.path()).as_deref(), Some("1.0.0"));
        let pid: i32 = std::fs::read_to_string(root.path().join("hook.pid"))
            .expect("pid")
            .trim()
            .parse()
            .expect("pid number");
        // The hook was killed (kill_on_drop) and reaped by tokio: its pid
        // disappears (a zombie counts as gone too).
        let gone = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |stat| stat.contains(") Z "))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !gone() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(), "hook process {pid} still runs");
    }

    #[tokio::test]
    async fn deactivate_runs_hook_and_clears() {
        let root = tempfile::tempdir().expect("tempdir");
        let v1 = root.path().join("1.0.0");
        script(&v1, "stop.sh", "touch ../stopped");
        flip(root.path(), "1.0.0").expect("flip");
        deactivate(
            root.path(),
            "1.0.0",
            Some(&["bin/stop.sh".to_string()]),
            &[],
        )
        .await
        .expect("deactivate");
        assert!(root.path().join("stopped").exists());
        assert_eq!(current(root.path()), None);
    }
}
