//! One probe attempt of each kind a manifest can ask for: HTTP(S) GET, TCP
//! connect, or a command.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hotswap_common::manifest::HealthCheck;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::http_client::{HttpError, fmt_duration, get, io_reason};

/// Why a probe failed: the module counts as failing it, whatever the cause.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("http probe {url}: {source}")]
    Http { url: String, source: HttpError },
    #[error("http probe {url}: status {status}")]
    Status { url: String, status: u16 },
    #[error("tcp probe {addr}: {reason}")]
    Tcp { addr: String, reason: String },
    /// The command could not run, failed, or timed out.
    #[error("{0}")]
    Exec(String),
}

/// One probe attempt. `env` is added to the environment of exec probes;
/// `cwd` is their working directory (and the base of a relative `argv[0]`).
/// `timeout` bounds the whole attempt.
pub async fn probe_once(
    check: &HealthCheck,
    timeout: Duration,
    env: &[(String, String)],
    cwd: &Path,
) -> Result<(), ProbeError> {
    let started = std::time::Instant::now();
    let (kind, result) = match check {
        HealthCheck::Http(url) => ("http", probe_http(url, timeout).await),
        HealthCheck::Tcp(addr) => ("tcp", probe_tcp(addr, timeout).await),
        HealthCheck::Exec(argv) => ("exec", probe_exec(argv, timeout, env, cwd).await),
    };
    crate::metrics::PROBE_SECONDS
        .get_or_create(&crate::metrics::ProbeLabels {
            kind,
            result: if result.is_ok() { "ok" } else { "fail" },
        })
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn probe_http(url: &str, timeout: Duration) -> Result<(), ProbeError> {
    // No body limit: a probe only needs the status line, so it stops reading
    // after the headers and a slow or huge body cannot fail it.
    let (status, _) = get(url, timeout, None)
        .await
        .map_err(|source| ProbeError::Http {
            url: url.to_string(),
            source,
        })?;
    if (200..=399).contains(&status) {
        Ok(())
    } else {
        Err(ProbeError::Status {
            url: url.to_string(),
            status,
        })
    }
}

async fn probe_tcp(addr: &str, timeout: Duration) -> Result<(), ProbeError> {
    let failed = |reason: String| ProbeError::Tcp {
        addr: addr.to_string(),
        reason,
    };
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(failed(io_reason(&e))),
        Err(_) => Err(failed(format!("timed out after {}", fmt_duration(timeout)))),
    }
}

/// How much of an exec probe's output ends up in the error message: the end
/// is where scripts print why they failed.
const OUTPUT_TAIL: usize = 512;

/// After an exec probe exits, how long to wait for its output pipes to
/// close. A background process it started may hold them open forever.
const OUTPUT_GRACE: Duration = Duration::from_millis(100);

async fn probe_exec(
    argv: &[String],
    timeout: Duration,
    env: &[(String, String)],
    cwd: &Path,
) -> Result<(), ProbeError> {
    exec(argv, timeout, env, cwd)
        .await
        .map_err(ProbeError::Exec)
}

async fn exec(
    argv: &[String],
    timeout: Duration,
    env: &[(String, String)],
    cwd: &Path,
) -> Result<(), String> {
    let what = format!("exec probe {}", argv.join(" "));
    let Some((program, args)) = argv.split_first() else {
        return Err("exec probe: empty command".to_string());
    };
    let program = resolve_program(program, cwd);
    let mut command = Command::new(&program);
    command
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // If the probe future is dropped (agent shutting down, module
        // stopped), the child must not outlive it.
        .kill_on_drop(true)
        // Its own process group, so that on timeout we can kill whatever a
        // probe script started too, not just the shell.
        .process_group(0);
    let mut child = command
        .spawn()
        .map_err(|e| format!("{what}: cannot start {}: {e}", program.display()))?;

    let output = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        readers.push(tokio::spawn(collect_tail(stdout, output.clone())));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.push(tokio::spawn(collect_tail(stderr, output.clone())));
    }

    let deadline = Instant::now() + timeout;
    let waited = tokio::time::timeout_at(deadline, child.wait()).await;
    let result = match waited {
        Ok(Ok(status)) => {
            let grace = Instant::now() + OUTPUT_GRACE;
            for reader in &mut readers {
                let _ = tokio::time::timeout_at(grace, reader).await;
            }
            if status.success() {
                Ok(())
            } else {
                Err(format!("{what}: {}", describe_exit(status)))
            }
        }
        Ok(Err(e)) => {
            kill_group(&mut child).await;
            Err(format!("{what}: waiting for the command failed: {e}"))
        }
        Err(_) => {
            kill_group(&mut child).await;
            Err(format!(
                "{what}: timed out after {}, killed",
                fmt_duration(timeout)
            ))
        }
    };
    for reader in &readers {
        reader.abort();
    }
    result.map_err(|message| {
        let tail = output.lock().map(|t| tail_text(&t)).unwrap_or_default();
        if tail.is_empty() {
            message
        } else {
            format!("{message}: {tail}")
        }
    })
}

/// A relative `argv[0]` with a slash (`./check.sh`, `bin/check`) means the
/// module's directory; a bare name is looked up in PATH as usual. Resolved
/// here because how `Command` treats a relative program together with
/// `current_dir` is platform-specific.
fn resolve_program(program: &str, cwd: &Path) -> PathBuf {
    let path = Path::new(program);
    if program.contains('/') && path.is_relative() {
        cwd.join(path)
    } else {
        path.to_path_buf()
    }
}

/// Read a pipe to its end, keeping only the last [`OUTPUT_TAIL`] bytes of
/// everything written to `tail` (shared by stdout and stderr, so the tail is
/// in arrival order).
async fn collect_tail<R: AsyncRead + Unpin>(mut pipe: R, tail: Arc<Mutex<Vec<u8>>>) {
    let mut chunk = [0u8; 4096];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let Ok(mut tail) = tail.lock() else { return };
                push_tail(&mut tail, &chunk[..n], OUTPUT_TAIL);
            }
        }
    }
}

fn push_tail(tail: &mut Vec<u8>, data: &[u8], limit: usize) {
    tail.extend_from_slice(data);
    if tail.len() > limit {
        let excess = tail.len() - limit;
        tail.drain(..excess);
    }
}

fn tail_text(tail: &[u8]) -> String {
    // Lossy: the cut may fall inside a UTF-8 sequence, and probe output is
    // only for humans anyway.
    String::from_utf8_lossy(tail).trim().to_string()
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("exited abnormally ({status})"),
    }
}

/// Kill the probe's process group and the process itself, then reap it.
async fn kill_group(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        // SAFETY: kill(2) takes no pointers. The child is not reaped yet, so
        // its pid (= its process group id, from process_group(0)) cannot
        // have been reused by an unrelated process.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_client::http_get;
    use crate::http_client::test_servers::{Reply, closed_port, server, tls_server};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[test]
    fn output_tail_keeps_the_end() {
        let mut tail = Vec::new();
        push_tail(&mut tail, b"hello ", 8);
        push_tail(&mut tail, b"world", 8);
        assert_eq!(tail, b"lo world");
        push_tail(&mut tail, &[b'x'; 20], 8);
        assert_eq!(tail, b"xxxxxxxx");
    }
    #[test]
    fn relative_programs_resolve_against_cwd() {
        let cwd = Path::new("/srv/module");
        assert_eq!(
            resolve_program("./check.sh", cwd),
            PathBuf::from("/srv/module/./check.sh")
        );
        assert_eq!(
            resolve_program("bin/check", cwd),
            PathBuf::from("/srv/module/bin/check")
        );
        assert_eq!(
            resolve_program("/bin/true", cwd),
            PathBuf::from("/bin/true")
        );
        assert_eq!(resolve_program("true", cwd), PathBuf::from("true"));
    }

    async fn probe(check: HealthCheck, timeout: Duration) -> Result<(), String> {
        probe_once(&check, timeout, &[], Path::new("/"))
            .await
            .map_err(|e| e.to_string())
    }

    fn http(addr: &str, path: &str) -> HealthCheck {
        HealthCheck::Http(format!("http://{addr}{path}"))
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn http_probe_healthy_on_2xx_and_3xx() {
        for status in [200, 204, 301, 399] {
            let addr = server(Reply::Status(status)).await;
            probe(http(&addr, "/healthz"), SECOND)
                .await
                .unwrap_or_else(|e| panic!("status {status}: {e}"));
        }
    }

    #[tokio::test]
    async fn http_probe_unhealthy_on_503() {
        let addr = server(Reply::Status(503)).await;
        let err = probe(http(&addr, "/healthz"), SECOND).await.unwrap_err();
        assert_eq!(err, format!("http probe http://{addr}/healthz: status 503"));
        let addr = server(Reply::Status(404)).await;
        let err = probe(http(&addr, "/"), SECOND).await.unwrap_err();
        assert!(err.ends_with("status 404"), "{err}");
    }

    #[tokio::test]
    async fn http_probe_times_out() {
        let addr = server(Reply::Silent).await;
        let started = Instant::now();
        let err = probe(http(&addr, "/healthz"), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            format!("http probe http://{addr}/healthz: timed out after 200ms")
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn http_probe_connection_refused() {
        let addr = closed_port().await;
        let err = probe(http(&addr, "/healthz"), SECOND).await.unwrap_err();
        assert_eq!(
            err,
            format!("http probe http://{addr}/healthz: connection refused")
        );
    }

    #[tokio::test]
    async fn http_probe_garbage_response() {
        let addr = server(Reply::Raw("SSH-2.0-OpenSSH_9.6\r\n\r\n")).await;
        let err = probe(http(&addr, "/"), SECOND).await.unwrap_err();
        assert!(err.contains("malformed status line"), "{err}");
        let addr = server(Reply::Raw("")).await;
        let err = probe(http(&addr, "/"), SECOND).await.unwrap_err();
        assert!(
            err.contains("connection closed without a response"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn http_probe_bad_url() {
        let err = probe(HealthCheck::Http("localhost:8080".into()), SECOND)
            .await
            .unwrap_err();
        assert!(
            err.starts_with("http probe localhost:8080: invalid URL"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn tcp_probe_ok_and_refused() {
        let addr = server(Reply::Status(200)).await;
        probe(HealthCheck::Tcp(addr), SECOND).await.unwrap();
        let addr = closed_port().await;
        let err = probe(HealthCheck::Tcp(addr.clone()), SECOND)
            .await
            .unwrap_err();
        assert_eq!(err, format!("tcp probe {addr}: connection refused"));
    }

    fn exec(argv: &[&str]) -> HealthCheck {
        HealthCheck::Exec(argv.iter().map(|s| s.to_string()).collect())
    }

    #[tokio::test]
    async fn exec_probe_exit_status() {
        probe(exec(&["true"]), SECOND).await.unwrap();
        let err = probe(exec(&["false"]), SECOND).await.unwrap_err();
        assert_eq!(err, "exec probe false: exited with status 1");
    }

    #[tokio::test]
    async fn exec_probe_reports_output_tail() {
        let script = "echo starting; i=0; while [ $i -lt 200 ]; do echo line $i; i=$((i+1)); done; echo 'db unreachable' >&2; exit 3";
        let err = probe(exec(&["sh", "-c", script]), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.contains("exited with status 3: "), "{err}");
        assert!(err.ends_with("db unreachable"), "{err}");
        let (_, output) = err.split_once("exited with status 3: ").unwrap();
        assert!(
            !output.contains("starting"),
            "only the tail is kept: {output}"
        );
        assert!(output.len() <= OUTPUT_TAIL, "{}", output.len());
    }

    #[tokio::test]
    async fn exec_probe_timeout_kills() {
        let started = Instant::now();
        let err = probe(exec(&["sleep", "5"]), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(err, "exec probe sleep 5: timed out after 200ms, killed");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    /// Whether a process is gone (or a zombie nobody reaped yet).
    fn is_dead(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    #[tokio::test]
    async fn exec_probe_timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        // The shell starts a background `sleep` and records its pid: killing
        // only the shell would leave the sleep running.
        let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let err = probe(exec(&["sh", "-c", &script]), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(err.ends_with("timed out after 300ms, killed"), "{err}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let pid = pid.trim();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_dead(pid) {
            assert!(
                Instant::now() < deadline,
                "background process {pid} survived"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn exec_probe_env_and_cwd() {
        let check = exec(&["sh", "-c", r#"test "$X" = y"#]);
        let env = [("X".to_string(), "y".to_string())];
        probe_once(&check, SECOND, &env, Path::new("/"))
            .await
            .unwrap();
        let env = [("X".to_string(), "z".to_string())];
        probe_once(&check, SECOND, &env, Path::new("/"))
            .await
            .unwrap_err();

        let dir = tempfile::tempdir().unwrap();
        let check = exec(&["sh", "-c", r#"test "$(pwd -P)" = "$1""#, "sh"]);
        let real = dir.path().canonicalize().unwrap();
        let HealthCheck::Exec(mut argv) = check else {
            unreachable!()
        };
        argv.push(real.display().to_string());
        probe_once(&HealthCheck::Exec(argv), SECOND, &[], dir.path())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn exec_probe_relative_program() {
        let dir = tempfile::tempdir().unwrap();
        // A symlink rather than a written script: executing a file another
        // test thread may still hold open for writing fails with ETXTBSY.
        std::os::unix::fs::symlink("/bin/sh", dir.path().join("check")).unwrap();
        let check = exec(&["./check", "-c", "exit 0"]);
        probe_once(&check, SECOND, &[], dir.path()).await.unwrap();

        let check = exec(&["./missing"]);
        let err = probe_once(&check, SECOND, &[], dir.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("exec probe ./missing: cannot start"),
            "{err}"
        );

        let err = probe(HealthCheck::Exec(Vec::new()), SECOND)
            .await
            .unwrap_err();
        assert_eq!(err, "exec probe: empty command");
    }

    #[tokio::test]
    async fn https_probe_accepts_self_signed() {
        let addr = tls_server(200).await;
        let url = format!("https://{addr}/healthz");
        probe(HealthCheck::Http(url.clone()), Duration::from_secs(5))
            .await
            .unwrap();
        let (status, body) = http_get(&url, Duration::from_secs(5)).await.unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"secure"[..]));

        // By name too: the certificate is for "localhost" but would be
        // accepted for any name.
        let port = addr.rsplit(':').next().unwrap();
        probe(
            HealthCheck::Http(format!("https://localhost:{port}/")),
            Duration::from_secs(5),
        )
        .await
        .unwrap();

        let addr = tls_server(500).await;
        let err = probe(
            HealthCheck::Http(format!("https://{addr}/")),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(err.ends_with("status 500"), "{err}");
    }

    #[tokio::test]
    async fn https_probe_against_plain_http_fails() {
        // A plain HTTP server that answers at once (a real one would answer
        // the ClientHello with 400 Bad Request).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
            let _ = stream.shutdown().await;
        });
        let err = probe(HealthCheck::Http(format!("https://{addr}/")), SECOND)
            .await
            .unwrap_err();
        assert!(err.contains("tls handshake failed"), "{err}");
    }
}
