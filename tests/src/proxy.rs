//! Fault injection: TCP proxies that cut, partition or throttle the
//! connections through them, and a small disk that fills up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A TCP proxy that forwards to `upstream` and cuts every connection after
/// `budget` bytes have gone from upstream to the client: a transfer broken
/// mid-way, deterministically.
pub struct CutProxy {
    pub addr: SocketAddr,
}

impl CutProxy {
    pub fn start(upstream: SocketAddr, budget: u64) -> Self {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (mut c_read, mut s_write) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                    let _ = s_write.shutdown(Shutdown::Write);
                });
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let mut sent = 0u64;
                    let mut buf = [0u8; 8192];
                    while sent < budget {
                        let n = match s_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n.min((budget - sent) as usize),
                        };
                        if c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n as u64;
                    }
                    let _ = c_write.shutdown(Shutdown::Both);
                    let _ = s_read.shutdown(Shutdown::Both);
                });
            }
        });
        Self { addr }
    }
}

/// A TCP proxy that hands every byte from `upstream` to the client
/// `delay` late (and the client's bytes upstream at once): a replica whose
/// view of etcd lags behind, deterministically, since a watch event and the
/// answer to a read sent after it arrive in the order etcd sent them.
pub struct DelayProxy {
    pub addr: SocketAddr,
}

impl DelayProxy {
    pub fn start(upstream: SocketAddr, delay: Duration) -> Self {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::time::Instant;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (Ok(mut c_read), Ok(mut s_write)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                    let _ = s_write.shutdown(Shutdown::Write);
                });
                // Upstream's bytes, stamped when read, written once due;
                // `None` is upstream's end.
                let (tx, rx) = std::sync::mpsc::channel::<(Instant, Option<Vec<u8>>)>();
                let mut s_read = server;
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let chunk = match s_read.read(&mut buf) {
                            Ok(0) | Err(_) => None,
                            Ok(n) => Some(buf[..n].to_vec()),
                        };
                        let end = chunk.is_none();
                        if tx.send((Instant::now() + delay, chunk)).is_err() || end {
                            return;
                        }
                    }
                });
                let mut c_write = client;
                std::thread::spawn(move || {
                    for (due, chunk) in rx {
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        match chunk {
                            Some(bytes) if c_write.write_all(&bytes).is_ok() => {}
                            _ => break,
                        }
                    }
                    let _ = c_write.shutdown(Shutdown::Both);
                });
            }
        });
        Self { addr }
    }
}

/// A TCP proxy that can partition the network between its clients and
/// `upstream`. While open it forwards both ways. [`PartitionProxy::partition`]
/// makes every connection silent: bytes are read and dropped in both
/// directions and nothing is closed, as when packets are lost on the way,
/// so each side has to notice the silence by itself. Connections made
/// during the partition are accepted and silent too. After
/// [`PartitionProxy::heal`] new connections forward again; the silenced ones
/// stay silent, like TCP connections whose peer gave up during the outage.
/// [`PartitionProxy::refuse`] instead closes each new connection at once (a
/// port nothing listens on, as far as the client can tell) and leaves the
/// open ones alone, until [`PartitionProxy::admit`].
pub struct PartitionProxy {
    pub addr: SocketAddr,
    partitioned: std::sync::Arc<std::sync::atomic::AtomicBool>,
    refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections:
        std::sync::Arc<std::sync::Mutex<Vec<std::sync::Weak<std::sync::atomic::AtomicBool>>>>,
}

impl PartitionProxy {
    pub fn start(upstream: SocketAddr) -> Self {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex, Weak};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let partitioned = Arc::new(AtomicBool::new(false));
        let refusing = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<Weak<AtomicBool>>>> = Arc::default();
        let (flag, refuse, list) = (partitioned.clone(), refusing.clone(), connections.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let silent = Arc::new(AtomicBool::new(flag.load(Ordering::SeqCst)));
                {
                    let mut list = list.lock().unwrap_or_else(|e| e.into_inner());
                    list.retain(|w| w.strong_count() > 0);
                    list.push(Arc::downgrade(&silent));
                }
                if silent.load(Ordering::SeqCst) {
                    // Partitioned from the start: swallow, never connect.
                    std::thread::spawn(move || pump(client, None, silent));
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (client2, server2) = match (client.try_clone(), server.try_clone()) {
                    (Ok(c), Ok(s)) => (c, s),
                    _ => continue,
                };
                let silent2 = silent.clone();
                std::thread::spawn(move || pump(client, Some(server), silent));
                std::thread::spawn(move || pump(server2, Some(client2), silent2));
            }
        });
        Self {
            addr,
            partitioned,
            refusing,
            connections,
        }
    }

    /// `https://` URL of the proxy, for an agent's `--control-plane`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Cut every connection, present and future, silently.
    pub fn partition(&self) {
        use std::sync::atomic::Ordering;
        self.partitioned.store(true, Ordering::SeqCst);
        let list = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        for connection in list.iter().filter_map(std::sync::Weak::upgrade) {
            connection.store(true, Ordering::SeqCst);
        }
    }

    /// Let new connections through again.
    pub fn heal(&self) {
        self.partitioned
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Close every new connection as soon as it is accepted.
    pub fn refuse(&self) {
        self.refusing
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Forward new connections again after [`PartitionProxy::refuse`].
    pub fn admit(&self) {
        self.refusing
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copy `from` to `to` until either end closes; once `silent` is set, read
/// and drop instead (and close nothing).
fn pump(
    mut from: std::net::TcpStream,
    mut to: Option<std::net::TcpStream>,
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if silent.load(std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        if let Some(out) = to.as_mut()
            && out.write_all(&buf[..n]).is_err()
        {
            break;
        }
    }
    if !silent.load(std::sync::atomic::Ordering::SeqCst)
        && let Some(out) = to
    {
        let _ = out.shutdown(std::net::Shutdown::Write);
    }
}

/// A TCP proxy that forwards server→client freely and client→server at
/// about `bytes_per_second`, and stops forwarding client→server (without
/// closing anything) once `stall_after` bytes went through: a slow link,
/// and an upload that stalls while the connection stays up.
pub struct ThrottleProxy {
    pub addr: SocketAddr,
}

impl ThrottleProxy {
    pub fn start(upstream: SocketAddr, bytes_per_second: u64, stall_after: Option<u64>) -> Self {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (Ok(mut c_read), Ok(mut s_write)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                std::thread::spawn(move || {
                    // Ten slices a second.
                    let slice = (bytes_per_second / 10).max(1) as usize;
                    let mut buf = vec![0u8; slice];
                    let mut sent = 0u64;
                    loop {
                        if stall_after.is_some_and(|limit| sent >= limit) {
                            // Hold the connection open, forward nothing.
                            std::thread::sleep(Duration::from_secs(3600));
                            return;
                        }
                        let want = stall_after
                            .map_or(slice as u64, |limit| (limit - sent).min(slice as u64))
                            as usize;
                        let n = match c_read.read(&mut buf[..want]) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n as u64;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Self { addr }
    }

    /// `https://` URL of the proxy, for `hotswapctl --endpoint`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

/// Whether this process may mount file systems (root with CAP_SYS_ADMIN).
pub fn can_mount() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run_tool(command: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(command)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{command}: {e}"))
}

/// A small tmpfs mounted for one test, unmounted on drop.
pub struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    pub fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).expect("mount point");
        let out = run_tool(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                path.to_str().expect("utf8"),
            ],
        );
        assert!(out.status.success(), "mount: {out:?}");
        Self {
            path: path.to_path_buf(),
        }
    }

    /// Fill the file system to the last byte; the filler's path.
    pub fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let block = vec![0xa5u8; 64 * 1024];
        let mut size = block.len();
        // Large blocks first, then smaller ones for the tail.
        while size > 0 {
            match std::io::Write::write_all(&mut file, &block[..size]) {
                Ok(()) => {}
                Err(_) => size /= 2,
            }
        }
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = run_tool("umount", &["-l", self.path.to_str().unwrap_or_default()]);
    }
}
