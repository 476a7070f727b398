//! A webhook receiver for tests (SPEC §9): Python's `http.server`, which
//! checks each delivery's HMAC-SHA256 signature and appends it to a file.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::daemon::{eventually, free_port};

const RECEIVER: &str = r#"
import hashlib, hmac, http.server, json, sys
port, secret, out = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        got = self.headers.get("X-Hotswap-Signature", "")
        record = {
            "seq": int(self.headers["X-Hotswap-Delivery"]),
            "kind": self.headers["X-Hotswap-Event"],
            "signature_ok": hmac.compare_digest(want, got),
            "body": json.loads(body),
        }
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.send_response(200 if record["signature_ok"] else 401)
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer.allow_reuse_address = True
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
if len(sys.argv) > 5:
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[4], sys.argv[5])
    server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// The secret the receiver checks signatures with.
pub const WEBHOOK_SECRET: &str = "correct horse battery staple";

/// The Python receiver on a fixed port, appending each delivery to a file.
pub struct WebhookReceiver {
    pub port: u16,
    script: PathBuf,
    record: PathBuf,
    child: Option<Child>,
    /// Certificate and key files: HTTPS instead of HTTP.
    tls: Option<(PathBuf, PathBuf)>,
}

impl WebhookReceiver {
    pub fn new(dir: &Path) -> Self {
        let script = dir.join("receiver.py");
        std::fs::write(&script, RECEIVER).expect("write receiver");
        Self {
            port: free_port(),
            script,
            record: dir.join("deliveries.jsonl"),
            child: None,
            tls: None,
        }
    }

    /// Serve HTTPS with this certificate and key (PEM files).
    pub fn with_tls(mut self, cert: PathBuf, key: PathBuf) -> Self {
        self.tls = Some((cert, key));
        self
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/hook", self.port)
    }

    pub fn start(&mut self) {
        let mut command = Command::new("python3");
        command
            .arg(&self.script)
            .arg(self.port.to_string())
            .arg(WEBHOOK_SECRET)
            .arg(&self.record)
            .stdout(Stdio::null());
        if let Some((cert, key)) = &self.tls {
            command.arg(cert).arg(key);
        }
        let child = command.spawn().expect("start python3 receiver");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        eventually("the receiver to listen", || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every delivery so far, in arrival order.
    pub fn deliveries(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The sequence numbers of the event deliveries (not tests), in
    /// arrival order.
    pub fn seqs(&self) -> Vec<u64> {
        self.deliveries()
            .iter()
            .filter(|d| d["kind"] != "webhook.test")
            .filter_map(|d| d["seq"].as_u64())
            .collect()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}
