//! `hotswapctl ui` (SPEC §8) against a real control plane and agents: the
//! token traded for a cookie and 401 for anything else (plain HTTP), and
//! in Debian's headless chromium driven by Selenium
//! (tests/browser/dashboard.py): the fleet page lists the nodes, a running
//! canary's page moves from wave 1 to wave 2 by itself, a viewer sees no
//! controls, and an approver approves through the page and the audit log
//! names them.
//!
//! `HOTSWAP_UI_SCREENSHOT=PATH` saves the live canary's page as a PNG (how
//! docs/dashboard.png was made).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hotswap_tests::{
    CANARY_LOAD_PER_SECOND, ControlPlane, Fleet, Load, TestDir, eventually, patience,
};
use serde_json::Value;

/// A running `hotswapctl ui --no-open`, stopped with SIGTERM on drop.
struct Dashboard {
    child: Child,
    /// `http://127.0.0.1:PORT/?token=...` as printed.
    url: String,
    /// `127.0.0.1:PORT`.
    addr: String,
    token: String,
}

impl Dashboard {
    fn start(cp: &ControlPlane, profile: &Path) -> Self {
        let mut child = cp
            .ctl_command(profile, &cp.url(), &["ui", "--no-open"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hotswapctl ui");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(patience())
            .expect("hotswapctl ui printed no URL in time");
        let url = line
            .trim()
            .strip_prefix("dashboard: ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        let rest = url.strip_prefix("http://").expect("http URL");
        let (addr, query) = rest.split_once("/?token=").expect("token in the URL");
        assert!(addr.starts_with("127.0.0.1:"), "{url}");
        assert_eq!(query.len(), 64, "a 32-byte hex token: {url}");
        Self {
            url: url.clone(),
            addr: addr.to_string(),
            token: query.to_string(),
            child,
        }
    }

    /// SIGTERM, and the process ends cleanly.
    fn stop(mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + patience();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "hotswapctl ui exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "hotswapctl ui ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection, read to the end.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect to the dashboard");
    stream
        .set_read_timeout(Some(patience()))
        .expect("read timeout");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read reply");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

fn selenium_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/selenium-venv/bin/python");
    for (tool, path) in [
        ("selenium", python.as_path()),
        ("chromium", Path::new("/usr/bin/chromium")),
        ("chromium-driver", Path::new("/usr/bin/chromedriver")),
    ] {
        assert!(
            path.exists(),
            "{tool} is missing ({}): run `sudo bash scripts/ci-deps.sh`",
            path.display()
        );
    }
    python
}

/// Trade the dashboard's token for its session cookie; `name=value`.
fn session_cookie(ui: &Dashboard) -> String {
    let trade = http(&ui.addr, "GET", &format!("/?token={}", ui.token), &[], "");
    assert_eq!(trade.status, 303, "{}", trade.body);
    let cookie = trade.header("set-cookie").expect("a cookie");
    cookie.split(';').next().unwrap_or_default().to_string()
}

/// tests/browser/dashboard.py running, its stdout read line by line.
struct Browser {
    child: Child,
    lines: mpsc::Receiver<String>,
    args: Vec<String>,
}

impl Browser {
    fn start(args: &[&str]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/dashboard.py");
        let mut child = Command::new(selenium_python())
            .arg(script)
            .args(args)
            .env("SE_OFFLINE", "true")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run the browser script");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// The next line it prints; panics if it exits first.
    fn line(&mut self) -> String {
        match self.lines.recv_timeout(patience() * 2) {
            Ok(line) => line,
            Err(_) => {
                let status = self.child.wait().expect("wait");
                panic!(
                    "browser {:?} printed nothing more ({status}); its stderr is above",
                    self.args
                )
            }
        }
    }

    /// Its final JSON line, and it exited 0.
    fn finish(mut self) -> Value {
        let line = self.line();
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "browser {:?}: {status}", self.args);
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("browser {:?} printed no JSON ({e}): {line}", self.args))
    }
}

/// Run tests/browser/dashboard.py to the end; its JSON line.
fn browser(args: &[&str]) -> Value {
    Browser::start(args).finish()
}

#[test]
fn only_the_token_and_its_cookie_open_the_dashboard() {
    let dir = TestDir::new();
    let fleet = Fleet::start(&dir, &[]);
    let ui = Dashboard::start(&fleet.cp, &fleet.cp.admin_profile());

    // Neither token nor cookie: 401, for pages, assets and streams alike.
    for path in ["/", "/events", "/assets/app.js", "/live/events"] {
        let reply = http(&ui.addr, "GET", path, &[], "");
        assert_eq!(reply.status, 401, "{path}: {}", reply.body);
    }
    // A wrong token (of the right length, and not) is no better.
    let wrong = "0".repeat(64);
    for token in [wrong.as_str(), "x", ""] {
        let reply = http(&ui.addr, "GET", &format!("/?token={token}"), &[], "");
        assert_eq!(reply.status, 401, "token {token:?}");
        assert!(reply.header("set-cookie").is_none());
    }

    // The token is traded for a cookie, with a redirect that drops it.
    let trade = http(
        &ui.addr,
        "GET",
        &format!("/events?kind=x&token={}", ui.token),
        &[],
        "",
    );
    assert_eq!(trade.status, 303, "{}", trade.body);
    assert_eq!(trade.header("location"), Some("/events?kind=x"));
    let set_cookie = trade.header("set-cookie").expect("a cookie").to_string();
    assert_eq!(
        session_cookie(&ui),
        set_cookie.split(';').next().unwrap_or_default()
    );
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(
        !set_cookie.contains(&ui.token),
        "the cookie is not the token"
    );
    let cookie = set_cookie
        .split(';')
        .next()
        .expect("name=value")
        .to_string();

    let fleet_page = http(&ui.addr, "GET", "/", &[("Cookie", &cookie)], "");
    assert_eq!(fleet_page.status, 200);
    assert!(
        fleet_page.body.contains(r#"data-node="node-1""#),
        "{}",
        fleet_page.body
    );
    let forged = http(&ui.addr, "GET", "/", &[("Cookie", "hotswap_ui=forged")], "");
    assert_eq!(forged.status, 401);

    // A control without the form token is refused before any call.
    let no_csrf = http(
        &ui.addr,
        "POST",
        "/deployments/d-1/control",
        &[("Cookie", &cookie)],
        "action=pause&csrf=wrong",
    );
    assert_eq!(no_csrf.status, 403, "{}", no_csrf.body);

    // Page weight: each page's HTML plus the script and stylesheet it loads.
    let assets: usize = ["/assets/app.js", "/assets/app.css"]
        .iter()
        .map(|p| {
            let r = http(&ui.addr, "GET", p, &[("Cookie", &cookie)], "");
            assert_eq!(r.status, 200, "{p}");
            r.body.len()
        })
        .sum();
    for path in ["/", "/environments", "/deployments", "/events", "/audit"] {
        let r = http(&ui.addr, "GET", path, &[("Cookie", &cookie)], "");
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert!(r.body.contains("<main id=\"main\">"), "{path}");
        eprintln!(
            "page weight {path}: {} bytes HTML + {assets} bytes JS and CSS = {} bytes",
            r.body.len(),
            r.body.len() + assets
        );
    }
    ui.stop();

    // Anything but loopback is refused before listening.
    let refused = fleet.cp.ctl(&["ui", "--no-open", "--listen", "0.0.0.0:0"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("loopback"), "{refused:?}");
}

/// `deploy promote ID` once the deployment waits for it.
fn promote_when_waiting(cp: &ControlPlane, id: &str) {
    eventually(&format!("{id} waiting for deploy promote"), || {
        let d = cp.ctl(&["-o", "json", "deploy", "get", id]).json();
        match d["waiting_for"].as_str() {
            Some("deploy promote") => Ok(()),
            other => Err(format!("{}: waiting for {other:?}", d["state"])),
        }
    });
    cp.ctl(&["deploy", "promote", id]).ok();
}

#[test]
fn the_dashboard_follows_a_canary_and_offers_only_what_the_role_allows() {
    let dir = TestDir::new();
    let (mut fleet, ports) = Fleet::start_many_with_settings(
        &dir,
        "qa",
        &["a", "b"],
        concat!(
            "[environments.dev]\nstrategy = \"direct\"\n",
            "[environments.qa]\nstrategy = \"rolling\"\n",
            "[environments.staging]\nstrategy = \"blue-green\"\n",
            "[environments.production]\nstrategy = \"direct\"\nrequire_approval = true\n",
        ),
    );
    fleet.add_node("p", "production");
    fleet.push_hello_per_node("1.0.0", "");
    let first = fleet.cp.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "hello@1.0.0",
        "--env",
        "qa",
        "--strategy",
        "direct",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert_eq!(first.code, 0, "{first:?}");
    fleet.push_hello_per_node("1.1.0", "");

    let admin = Dashboard::start(&fleet.cp, &fleet.cp.admin_profile());
    let viewer_profile = fleet.cp.user_profile("v", "viewer");
    let viewer = Dashboard::start(&fleet.cp, &viewer_profile);
    let approver_profile = fleet.cp.user_profile("ann", "approver");
    let approver = Dashboard::start(&fleet.cp, &approver_profile);

    let shown = browser(&["fleet", &admin.url, "production", "a", "b", "p"]);
    assert_eq!(shown["filtered"], serde_json::json!(["p"]), "{shown}");

    // A canary in two steps, each waiting for `deploy promote`: the page
    // opens on wave 1 and the test promotes once the browser shows it.
    // Traffic on both nodes gives its analysis numbers to chart.
    let loads: Vec<Load> = ports
        .iter()
        .map(|p| Load::paced(*p, CANARY_LOAD_PER_SECOND))
        .collect();
    let created = fleet.cp.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "hello@1.1.0",
        "--env",
        "qa",
        "--strategy",
        "canary",
        "--steps",
        "50,100",
        "--step-duration",
        "3s",
        "--analysis-warmup",
        "1s",
        "--analysis-min-requests",
        "20",
        "--manual-promote",
    ]);
    let id = created.json()["id"].as_str().expect("id").to_string();
    let screenshot = std::env::var("HOTSWAP_UI_SCREENSHOT").ok();
    let mut live_args = vec!["live", admin.url.as_str(), id.as_str()];
    if let Some(path) = &screenshot {
        live_args.push(path);
    }
    let mut live = Browser::start(&live_args);
    assert_eq!(live.line(), "ready", "the page shows wave 1");
    let viewer_page = {
        let (url, id) = (viewer.url.clone(), id.clone());
        std::thread::spawn(move || browser(&["viewer", &url, &id]))
    };
    promote_when_waiting(&fleet.cp, &id);
    let live = live.finish();
    let seen_by_viewer = viewer_page.join().expect("viewer browser");
    eprintln!("live canary page: {live}");
    assert_eq!(seen_by_viewer["controls"], 0, "{seen_by_viewer}");
    assert_eq!(seen_by_viewer["role"], "viewer", "{seen_by_viewer}");
    let admin_controls: Vec<&str> = live["controls"]
        .as_array()
        .expect("controls")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        admin_controls.contains(&"pause") && admin_controls.contains(&"rollback"),
        "an admin sees the controls of a running canary: {live}"
    );
    assert!(live["patches"].as_u64().unwrap_or(0) >= 1, "{live}");
    // Step 1's verdict with its numbers and sample sizes, and the charts
    // of canary against baseline with the thresholds drawn in.
    let verdicts: Vec<&str> = live["verdicts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        verdicts
            .iter()
            .any(|v| v.contains("passed") && v.contains('%') && v.contains("req on 1 node(s)")),
        "{live}"
    );
    for (series, at_least) in [("canary", 1), ("baseline", 1), ("thresholds", 2)] {
        assert!(
            live["charts"][series].as_u64() >= Some(at_least),
            "{series}: {live}"
        );
    }
    let latencies: Vec<f64> = live["latencies_ms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect();
    if !latencies.is_empty() {
        let mut sorted = latencies.clone();
        sorted.sort_by(f64::total_cmp);
        eprintln!(
            "event to page: {} live events, median {} ms, max {} ms",
            sorted.len(),
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1]
        );
    }
    eventually(&format!("{id} succeeded"), || {
        let d = fleet.cp.ctl(&["-o", "json", "deploy", "get", &id]).json();
        if d["waiting_for"] == "deploy promote" {
            fleet.cp.ctl(&["deploy", "promote", &id]).ok();
        }
        match d["state"].as_str() {
            Some("succeeded") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    for load in loads {
        let stats = load.finish();
        assert!(stats.failures.is_empty(), "{:?}", stats.failures);
    }
    let cookie = session_cookie(&admin);
    let page = http(
        &admin.addr,
        "GET",
        &format!("/deployments/{id}"),
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(page.status, 200, "{}", page.body);
    eprintln!(
        "page weight /deployments/{id} (ended canary, 2 steps): {} bytes HTML",
        page.body.len()
    );

    // Production needs a second person: the admin deploys, the approver
    // approves on the page.
    let waiting = fleet.cp.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "hello@1.0.0",
        "--env",
        "production",
    ]);
    let waiting = waiting.json();
    assert_eq!(waiting["state"], "awaiting_approval", "{waiting}");
    let prod_id = waiting["id"].as_str().expect("id").to_string();
    let approved = browser(&[
        "approve",
        &approver.url,
        &prod_id,
        "checked on the dashboard",
    ]);
    assert_ne!(approved["state"], "awaiting_approval", "{approved}");
    let d = fleet
        .cp
        .ctl(&["-o", "json", "deploy", "get", &prod_id])
        .json();
    assert_eq!(d["approved_by"], "ann", "{d}");
    let audit = fleet
        .cp
        .ctl(&["-o", "json", "audit", "list", "--action", "deploy.approve"])
        .json();
    let records = audit.as_array().expect("records");
    assert!(
        records.iter().any(|r| r["user"] == "ann"
            && r["role"] == "approver"
            && r["target"] == prod_id.as_str()
            && r["result"] == "ok"),
        "the audit log names the approver: {audit}"
    );

    admin.stop();
    viewer.stop();
    approver.stop();
}
