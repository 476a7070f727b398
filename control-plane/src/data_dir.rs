//! The file layout of a control plane's data directory: where the CA, the
//! server's certificate, the database, the blobs and the published addresses
//! live. Everything that reads or writes those files names them through
//! [`DataDir`].

use std::path::{Path, PathBuf};

/// File layout of a control plane data directory.
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("server.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.root.join("server.key")
    }
    /// The replicas' client certificate: a follower forwards operator calls
    /// to the leader with it (absent in data dirs made before forwarding).
    pub fn replica_cert(&self) -> PathBuf {
        self.root.join("replica.crt")
    }
    pub fn replica_key(&self) -> PathBuf {
        self.root.join("replica.key")
    }
    /// The keys that seal TLS session tickets, so agents resume their
    /// sessions across a restart (see the tickets module).
    pub fn tls_tickets(&self) -> PathBuf {
        self.root.join("tls-tickets.json")
    }
    /// During a CA rotation: the old CA, still trusted for client certificates.
    pub fn ca_previous(&self) -> PathBuf {
        self.root.join("ca-previous.crt")
    }
    /// During a CA rotation: the new CA certified by the old one.
    pub fn ca_cross(&self) -> PathBuf {
        self.root.join("ca-cross.crt")
    }
    /// Staged files of a rotation (see the rotation module).
    pub fn pending(&self) -> PathBuf {
        self.root.join("pending")
    }
    pub fn admin_profile(&self) -> PathBuf {
        self.root.join("admin.profile.toml")
    }
    pub fn state(&self) -> PathBuf {
        self.root.join("state")
    }
    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }
    /// Where the bound addresses are published once listening.
    pub fn addresses(&self) -> PathBuf {
        self.root.join("run").join("addresses.json")
    }
}
