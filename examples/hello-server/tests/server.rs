//! Integration tests for `hello-server`: socket activation, the routes and
//! metrics, the fault-injection flags, and the graceful stop that makes a
//! start-first swap on a shared listening socket lose no request.
//!
//! Every server gets its socket the way the agent passes it: the test binds
//! a listener and the child receives it as fd 3 with `LISTEN_FDS=1`. Because
//! the listener exists before the child, requests queue in its backlog and
//! no readiness polling is needed before the first request.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_hello-server");
/// Upper bound for anything the tests wait for.
const PATIENCE: Duration = Duration::from_secs(5);
/// Poll interval for bounded waits.
const POLL: Duration = Duration::from_millis(20);
/// Variables that would change the server's behaviour if inherited from
/// whoever runs the tests.
const SERVER_ENV: [&str; 10] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "HOTSWAP_VERSION",
    "HELLO_LISTEN",
    "HELLO_UNHEALTHY",
    "HELLO_SLOW_MS",
    "HELLO_ERROR_RATE",
    "HELLO_CRASH_AFTER_MS",
    "HELLO_START_DELAY_MS",
];

// ---------------------------------------------------------------- servers

/// A running `hello-server`, killed on drop so a failing test leaks nothing.
struct Server {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// The stderr reader; joined after exit so the log is complete.
    reader: Option<thread::JoinHandle<()>>,
}

impl Server {
    /// Start `hello-server ARGS` socket-activated on `listener`, without
    /// LISTEN_PID (see below for the variant with it).
    fn activated(listener: &TcpListener, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = command(BIN);
        cmd.args(args);
        cmd.envs(env.iter().copied());
        pass_listener(&mut cmd, listener);
        Server::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Server {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn hello-server");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        // Drained continuously so the child never blocks on a full pipe.
        let reader = thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("log lock").push(line);
            }
        });
        Server {
            child,
            log,
            reader: Some(reader),
        }
    }

    fn log(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Wait for a log line containing `needle` and return it.
    fn wait_log(&self, needle: &str) -> String {
        let mut found = None;
        wait_until(&format!("log line {needle:?}"), || {
            found = self
                .log
                .lock()
                .expect("log lock")
                .iter()
                .find(|l| l.contains(needle))
                .cloned();
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no log line {needle:?}; log:\n{}", self.log()))
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill has no memory-safety requirements; the child is ours
        // and not yet reaped (the Child still owns it), so the pid is valid.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill: {}", io::Error::last_os_error());
    }

    /// Wait for the child to exit, failing the test after `within`.
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The pipe reaches EOF once the child is gone; until the
                // reader sees it, the last lines may be missing.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "hello-server still running after {within:?}; log:\n{}",
                self.log()
            );
            thread::sleep(POLL);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command with the server-affecting environment cleared.
fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for var in SERVER_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// Hand `listener` to the child as fd 3, as the agent does.
fn pass_listener(cmd: &mut Command, listener: &TcpListener) {
    let fd = listener.as_raw_fd();
    cmd.env("LISTEN_FDS", "1").env("LISTEN_FDNAMES", "http");
    // SAFETY: the closure runs between fork and exec and only calls dup2 and
    // fcntl, which are async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                // dup2 onto itself would keep close-on-exec; clear it.
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) == -1 {
                // dup2 leaves the new fd without close-on-exec.
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------- client

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

fn connect(addr: SocketAddr) -> io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect(addr)?;
    // A hung server fails the test instead of hanging it.
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.set_write_timeout(Some(PATIENCE))?;
    Ok(BufReader::new(stream))
}

/// Read one response. `Ok(None)`: the server closed the connection before
/// sending a single byte.
fn read_reply(conn: &mut BufReader<TcpStream>) -> io::Result<Option<Reply>> {
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            return Err(bad("eof inside the response head".into()));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
        headers.insert(name.to_ascii_lowercase(), value.trim().to_string());
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("missing content-length".into()))?;
    let mut body = vec![0; len];
    conn.read_exact(&mut body)?;
    let body = String::from_utf8(body).map_err(|e| bad(e.to_string()))?;
    Ok(Some(Reply {
        status,
        headers,
        body,
    }))
}

fn request(path: &str, keep_alive: bool) -> String {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: {connection}\r\n\r\n")
}

/// One request on a fresh connection.
fn get(addr: SocketAddr, path: &str) -> Reply {
    let mut conn = connect(addr).expect("connect");
    conn.get_mut()
        .write_all(request(path, false).as_bytes())
        .expect("send request");
    read_reply(&mut conn)
        .expect("read response")
        .expect("a response, not a bare close")
}

/// The value of an unlabelled sample, or of a labelled one when `name`
/// includes its labels.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

// ---------------------------------------------------------------- tests

#[test]
fn routes_and_metrics() {
    let listener = bind();
    let addr = listener.local_addr().expect("addr");
    let server = Server::activated(&listener, &["--version-label", "1.2.3"], &[]);

    for _ in 0..3 {
        let r = get(addr, "/");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "hello from 1.2.3\n");
        assert_eq!(r.header("x-hello-version"), Some("1.2.3"));
    }
    let health = get(addr, "/healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    assert_eq!(get(addr, "/nope").status, 404);

    let m = get(addr, "/metrics");
    assert_eq!(m.status, 200);
    assert!(
        m.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{m:?}"
    );
    // Only requests on / count; /healthz, /metrics and the 404 do not.
    assert_eq!(metric(&m.body, "http_requests_total"), 3.0);
    assert_eq!(metric(&m.body, "http_errors_total"), 0.0);
    assert_eq!(metric(&m.body, "http_request_duration_seconds_count"), 3.0);
    assert!(metric(&m.body, "http_request_duration_seconds_sum") >= 0.0);
    let mut previous = 0.0;
    for le in [
        "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "+Inf",
    ] {
        let n = metric(
            &m.body,
            &format!("http_request_duration_seconds_bucket{{le=\"{le}\"}}"),
        );
        assert!(n >= previous, "bucket le={le} decreases:\n{}", m.body);
        previous = n;
    }
    assert_eq!(previous, 3.0, "+Inf bucket must equal the count");

    get(addr, "/");
    let m = get(addr, "/metrics");
    assert_eq!(metric(&m.body, "http_requests_total"), 4.0);
    assert_eq!(metric(&m.body, "http_request_duration_seconds_count"), 4.0);

    let start = server.wait_log("starting");
    assert!(start.contains("version=1.2.3"), "{start}");
    assert!(start.contains("socket_activated=true"), "{start}");
    assert!(start.contains(&format!("listen={addr}")), "{start}");
}

#[test]
fn keep_alive_reuses_the_connection() {
    let listener = bind();
    let addr = listener.local_addr().expect("addr");
    let _server = Server::activated(&listener, &[], &[]);

    let mut conn = connect(addr).expect("connect");
    for _ in 0..3 {
        conn.get_mut()
            .write_all(request("/", true).as_bytes())
            .expect("send");
        let r = read_reply(&mut conn).expect("read").expect("response");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("keep-alive"));
    }
    // Asking to close is honoured: the response says so, then EOF.
    conn.get_mut()
        .write_all(request("/", false).as_bytes())
        .expect("send");
    let r = read_reply(&mut conn).expect("read").expect("response");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(read_reply(&mut conn).expect("eof").is_none());
}

#[test]
fn version_label_falls_back_to_env_then_dev() {
    let listener = bind();
    let addr = listener.local_addr().expect("addr");
    let server = Server::activated(&listener, &[], &[("HOTSWAP_VERSION", "2.0.0")]);
    assert_eq!(get(addr, "/").body, "hello from 2.0.0\n");
    drop(server);

    let listener = bind();
    let addr = listener.local_addr().expect("addr");
    let _server = Server::activated(&listener, &[], &[]);
    let r = get(addr, "/");
    assert_eq!(r.body, "hello from dev\n");
    assert_eq!(r.header("x-hello-version"), Some("dev"));
}

#[test]
fn unhealthy_answers_503() {
    let listener = bind();
    let addr = listener.local_addr().expect("addr");
    // Through the environment, as a manifest's [process] env would set it.
    let _server = Server::activated(&listener, &[], &[("HELLO_UNHEALTHY", "1")]);
    assert_eq!(get(addr, "/healthz").status, 503);
    assert_eq!(get(addr, "/").status, 200, "only the health check fails");
}

#[test]
fn error_rate_injects_counted_500s() {
    let listener = bind();
    let addr = listener.local_addr().expect("addr");
    let _server = Server::activated(&listener, &["--error-rate", "1.0"], &[]);
    for _ in 0..3 {
        assert_eq!(get(addr, "/").status, 500);
    }
    let m = get(addr, "/metrics").body;
    assert_eq!(metric(&m, "http_requests_total"), 3.0);
    assert_eq!(metric(&m, "http_errors_total"), 3.0);

    let listener = bind();
    let addr = listener.local_addr().expect("addr");
    let _server = Server::activated(&listener, &[], &[("HELLO_ERROR_RATE", "0.5")]);
    let statuses: Vec<u16> = (0..4).map(|_| get(addr, "/").status).collect();
    assert_eq!(statuses, [200, 500, 200, 500], "every second request fails");
    assert_eq!(
        metric(&get(addr, "/metrics").body, "http_errors_total"),
        2.0
    );
}

#[test]
fn slow_requests_land_in_the_right_bucket() {
    let listener = bind();
    let addr = listener.local_addr().expect("addr");
    let _server = Server::activated(&listener, &["--slow-ms", "120"], &[]);
    let t = Instant::now();
    assert_eq!(get(addr, "/").status, 200);
    assert!(t.elapsed() >= Duration::from_millis(120));
    let m = get(addr, "/metrics").body;
    assert_eq!(
        metric(&m, "http_request_duration_seconds_bucket{le=\"0.1\"}"),
        0.0
    );
    // No upper bound on a loaded machine; only that it was counted.
    assert_eq!(
        metric(&m, "http_request_duration_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    assert!(metric(&m, "http_request_duration_seconds_sum") >= 0.12);
}

#[test]
fn start_delay_holds_connections_in_the_backlog() {
    let listener = bind();
    let addr = listener.local_addr().expect("addr");
    let t = Instant::now();
    let _server = Server::activated(&listener, &["--start-delay-ms", "300"], &[]);
    // Connecting succeeds at once (the kernel queues it); the answer waits.
    assert_eq!(get(addr, "/").status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));

    // A stop during the delay is still graceful and prompt.
    let listener = bind();
    let mut server = Server::activated(&listener, &["--start-delay-ms", "60000"], &[]);
    server.wait_log("waiting");
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(PATIENCE).success(), "{}", server.log());
}

#[test]
fn crash_after_exits_non_zero() {
    let listener = bind();
    let mut server = Server::activated(&listener, &["--crash-after-ms", "200"], &[]);
    let status = server.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(1), "{}", server.log());
}

#[test]
fn listen_pid_must_match_when_set() {
    // The strict systemd form: a shell learns its own pid ($$) and execs
    // the server, which keeps that pid.
    let listener = bind();
    let addr = listener.local_addr().expect("addr");
    let mut cmd = command("/bin/sh");
    cmd.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\"", BIN])
        .args(["--version-label", "pid"]);
    pass_listener(&mut cmd, &listener);
    let server = Server::spawn(cmd);
    assert_eq!(get(addr, "/").body, "hello from pid\n");
    assert!(
        server
            .wait_log("starting")
            .contains("socket_activated=true")
    );

    // Fds meant for another process are left alone and --listen is bound.
    let listener = bind();
    let mut cmd = command(BIN);
    cmd.args(["--listen", "127.0.0.1:0"]).env("LISTEN_PID", "1");
    pass_listener(&mut cmd, &listener);
    let server = Server::spawn(cmd);
    let start = server.wait_log("starting");
    assert!(start.contains("socket_activated=false"), "{start}");
    let own: SocketAddr = start
        .split(' ')
        .find_map(|w| w.strip_prefix("listen="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no listen= address in {start:?}"));
    assert_ne!(Some(own), listener.local_addr().ok());
    assert_eq!(get(own, "/").status, 200);
}

// ---------------------------------------------------------------- swaps

/// What one client thread saw.
#[derive(Debug, Default)]
struct Stats {
    /// Successful responses per `x-hello-version`.
    by_version: BTreeMap<String, u64>,
    /// Requests resent because an idle kept-alive connection was closed
    /// before the server read them (allowed, HTTP clients do the same).
    retried: u64,
    /// Responses on a reused connection.
    reused: u64,
    failures: Vec<String>,
}

impl Stats {
    fn seen(&self, version: &str) -> u64 {
        self.by_version.get(version).copied().unwrap_or(0)
    }

    fn fail(&mut self, what: String) {
        // Bounded: a broken server should not grow this without limit.
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
    }
}

/// Send requests back to back until `stop`, over one kept-alive connection
/// (`keep_alive`) or a fresh connection per request.
fn client(addr: SocketAddr, keep_alive: bool, stop: Arc<AtomicBool>, stats: Arc<Mutex<Stats>>) {
    let mut kept: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) {
        let reused = kept.is_some();
        let mut conn = match kept.take() {
            Some(conn) => conn,
            None => match connect(addr) {
                Ok(conn) => conn,
                Err(e) => {
                    stats.lock().expect("stats").fail(format!("connect: {e}"));
                    thread::sleep(POLL);
                    continue;
                }
            },
        };
        let kind = if reused { "reused" } else { "fresh" };
        if let Err(e) = conn
            .get_mut()
            .write_all(request("/", keep_alive).as_bytes())
        {
            stats
                .lock()
                .expect("stats")
                .fail(format!("write on a {kind} connection: {e}"));
            continue;
        }
        let reply = read_reply(&mut conn);
        let mut stats = stats.lock().expect("stats");
        match reply {
            Ok(Some(r)) if r.status == 200 => {
                let version = r.header("x-hello-version").unwrap_or("?").to_string();
                *stats.by_version.entry(version).or_default() += 1;
                if reused {
                    stats.reused += 1;
                }
                if keep_alive && r.header("connection") != Some("close") {
                    kept = Some(conn);
                }
            }
            Ok(Some(r)) => stats.fail(format!("status {} on a {kind} connection", r.status)),
            // The server closed an idle kept-alive connection as our request
            // crossed it: resend on a new connection (the next iteration).
            Ok(None) if reused => stats.retried += 1,
            Ok(None) => stats.fail("fresh connection closed without a response".into()),
            Err(e) => stats.fail(format!("read on a {kind} connection: {e}")),
        }
    }
}

#[test]
fn graceful_swaps_lose_no_requests() {
    let listener = bind();
    let addr = listener.local_addr().expect("addr");
    // Slow enough that a request is usually in flight when SIGTERM lands.
    let start = |version: &str| {
        let server = Server::activated(
            &listener,
            &["--version-label", version, "--slow-ms", "5"],
            &[],
        );
        server.wait_log("accepting");
        server
    };

    let stop = Arc::new(AtomicBool::new(false));
    let kept_stats = Arc::new(Mutex::new(Stats::default()));
    let fresh_stats = Arc::new(Mutex::new(Stats::default()));
    let mut old = start("v1");
    let clients = [(true, &kept_stats), (false, &fresh_stats)].map(|(keep_alive, stats)| {
        let (stop, stats) = (Arc::clone(&stop), Arc::clone(stats));
        thread::spawn(move || client(addr, keep_alive, stop, stats))
    });
    let both_saw = |version: &str, n: u64| {
        kept_stats.lock().expect("stats").seen(version) >= n
            && fresh_stats.lock().expect("stats").seen(version) >= n
    };
    wait_until("both clients served by v1", || both_saw("v1", 10));

    // Two swaps, as the agent does them: start the new version on the same
    // socket, wait until it accepts, then stop the old one.
    for version in ["v2", "v3"] {
        let new = start(version);
        let stopped_at = Instant::now();
        old.signal(libc::SIGTERM);
        let status = old.wait_exit(PATIENCE);
        assert!(
            status.success(),
            "old server exited with {status}; log:\n{}",
            old.log()
        );
        assert!(stopped_at.elapsed() < PATIENCE);
        assert!(old.log().contains("stopped accepting"), "{}", old.log());
        wait_until(&format!("both clients served by {version}"), || {
            both_saw(version, 10)
        });
        old = new;
    }

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    for (name, stats) in [("keep-alive", &kept_stats), ("fresh", &fresh_stats)] {
        let stats = stats.lock().expect("stats");
        eprintln!("{name} client: {stats:?}");
        assert!(
            stats.failures.is_empty(),
            "{name} client failed requests: {:#?}",
            stats.failures
        );
    }
    assert!(
        kept_stats.lock().expect("stats").reused > 0,
        "the keep-alive client never reused a connection"
    );

    old.signal(libc::SIGTERM);
    assert!(old.wait_exit(PATIENCE).success(), "{}", old.log());
}
