//! A real S3: SeaweedFS's `weed mini` (master, volume, filer and S3 gateway
//! in one process) on loopback ports in a temporary directory, with one
//! identity whose keys tests use as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
//! and one bucket made at start-up. `scripts/ci-deps.sh` installs `weed` into
//! `target/seaweedfs-venv`. Stopped (and its files removed) on drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::daemon::{Daemon, TestDir, eventually, free_port, try_http, try_http_get};

/// The access key of the harness's one identity.
pub const S3_ACCESS_KEY: &str = "hotswap-test-key";
/// Its secret key.
pub const S3_SECRET_KEY: &str = "hotswap-test-secret";
/// The region the harness's clients name (SeaweedFS accepts any).
pub const S3_REGION: &str = "us-east-1";

/// Path of `weed`: `HOTSWAP_WEED` if set, else the virtualenv that
/// `scripts/ci-deps.sh` makes under the workspace's `target/`.
pub fn weed_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("HOTSWAP_WEED") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/seaweedfs-venv/bin/weed");
    assert!(
        path.exists(),
        "SeaweedFS's weed not found at {}; install it with `sudo bash scripts/ci-deps.sh`",
        path.display()
    );
    path
}

/// A running SeaweedFS with an S3 endpoint and one bucket.
pub struct SeaweedS3 {
    daemon: Daemon,
    /// `http://127.0.0.1:PORT`, the S3 endpoint.
    pub endpoint: String,
    /// The bucket made at start-up.
    pub bucket: String,
    /// The filer's HTTP address (files of bucket B under `/buckets/B/`).
    pub filer: SocketAddr,
    // Last: removed after the process stopped.
    dir: TestDir,
}

impl SeaweedS3 {
    /// Start SeaweedFS with the bucket `bucket` and wait until its S3
    /// gateway answers and the bucket exists.
    pub fn start(bucket: &str) -> Self {
        let dir = TestDir::new();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("seaweedfs data dir");
        let config = dir.path().join("s3.json");
        let identities = serde_json::json!({
            "identities": [{
                "name": "hotswap",
                "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        });
        std::fs::write(&config, identities.to_string()).expect("write s3 config");

        let port = |_: &str| free_port().to_string();
        let (s3, filer) = (free_port(), free_port());
        let mut command = Command::new(weed_binary());
        command
            .current_dir(dir.path())
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-s3.port.grpc={}", port("s3 grpc")))
            .arg(format!("-master.port={}", port("master")))
            .arg(format!("-master.port.grpc={}", port("master grpc")))
            .arg(format!("-volume.port={}", port("volume")))
            .arg(format!("-volume.port.grpc={}", port("volume grpc")))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-filer.port.grpc={}", port("filer grpc")))
            .arg(format!("-admin.port={}", port("admin")))
            .arg(format!("-admin.port.grpc={}", port("admin grpc")))
            .args([
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ])
            .arg(format!("-s3.config={}", config.display()))
            .arg(format!("-bucket={bucket}"));
        let daemon = Daemon::spawn("seaweedfs", command, dir.path().join("weed.log"));
        let mut this = Self {
            daemon,
            endpoint: format!("http://127.0.0.1:{s3}"),
            bucket: bucket.to_string(),
            filer: SocketAddr::from(([127, 0, 0, 1], filer)),
            dir,
        };
        let s3_addr = SocketAddr::from(([127, 0, 0, 1], s3));
        let bucket_dir = format!("/buckets/{bucket}/");
        eventually("SeaweedFS's S3 gateway and bucket", || {
            if let Some(status) = this.daemon.exited() {
                panic!("weed mini exited with {status} at start-up");
            }
            // Any S3 answer (an unsigned request is refused) means it listens.
            let (code, _) = try_http_get(s3_addr, "/")?;
            if code == 0 {
                return Err("S3 gateway gave no HTTP status".to_string());
            }
            match try_http_get(this.filer, &bucket_dir)? {
                (200, _) => {}
                (code, body) => return Err(format!("filer {bucket_dir}: {code} {body}")),
            }
            // And it stores content: the volume server registered with the
            // master (on a busy host that comes seconds after the gateway,
            // and a put before it times out assigning a volume).
            let probe = format!("{bucket_dir}.hotswap-ready");
            match try_http(this.filer, "PUT", &probe, b"ready")? {
                (200 | 201 | 204, _) => {}
                (code, body) => return Err(format!("filer PUT {probe}: {code} {body}")),
            }
            match try_http(this.filer, "DELETE", &probe, b"")? {
                (200 | 202 | 204, _) => Ok(()),
                (code, body) => Err(format!("filer DELETE {probe}: {code} {body}")),
            }
        });
        this
    }

    /// Where the harness keeps SeaweedFS's files and log.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for SeaweedS3 {
    fn drop(&mut self) {
        if self.daemon.exited().is_none() {
            crate::daemon::send_signal(self.daemon.child(), libc::SIGTERM);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while self.daemon.exited().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if self.daemon.exited().is_some() {
            // Reaped: nothing left to kill.
            self.daemon.child = None;
        }
        // The daemon's own drop kills what is left and, if the test
        // failed, prints the log.
    }
}

/// The environment a control plane needs to reach the test store.
pub fn credentials() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY),
        ("AWS_REGION", S3_REGION),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec()
}
