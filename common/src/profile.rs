//! Operator profiles: one TOML file with the control plane endpoint, the CA
//! that signs it, and the operator's client certificate and key. It holds a
//! private key, so it is written 0600.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `https://host:port` of the control plane; for replicas, several
    /// separated by commas (a TOML array of URLs reads the same).
    #[serde(deserialize_with = "endpoint_list")]
    pub endpoint: String,
    /// PEM of the CA that issued the server certificate.
    pub ca_cert: String,
    /// PEM of this operator's client certificate.
    pub client_cert: String,
    /// PEM of this operator's private key.
    pub client_key: String,
}

/// `endpoint` as one string or an array of strings, kept as one
/// comma-separated string.
fn endpoint_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(url) => url,
        OneOrMany::Many(urls) => urls.join(","),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read profile {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("profile {path} is invalid: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("cannot write profile {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Profile {
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ProfileError::Parse {
            path: path.to_path_buf(),
            reason: e.message().to_string(),
        })
    }

    /// The profile's file content, TOML.
    pub fn to_toml(&self, path: &Path) -> Result<String, ProfileError> {
        toml::to_string(self).map_err(|e| ProfileError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), ProfileError> {
        let text = self.to_toml(path)?;
        fsutil::write_atomic(path, text.as_bytes(), fsutil::PRIVATE_FILE_MODE).map_err(|source| {
            ProfileError::Write {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// `~/.config/hotswap/profile.toml` (or under `$XDG_CONFIG_HOME`).
    pub fn default_path() -> PathBuf {
        let config_home = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
            .unwrap_or_else(|| PathBuf::from("."));
        config_home.join("hotswap").join("profile.toml")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_unknown_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.toml");
        let profile = Profile {
            endpoint: "https://127.0.0.1:7443".into(),
            ca_cert: "CA\n".into(),
            client_cert: "CERT\n".into(),
            client_key: "KEY\n".into(),
        };
        profile.save(&path).expect("save");
        assert_eq!(Profile::load(&path).expect("load"), profile);

        std::fs::write(&path, "endpoint = \"x\"\nbogus = 1\n").expect("write");
        let err = Profile::load(&path).expect_err("unknown key").to_string();
        assert!(err.contains("bogus"), "{err}");
        let err = Profile::load(&dir.path().join("missing.toml"))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("cannot read profile"), "{err}");
    }

    #[test]
    fn an_endpoint_list_reads_as_one_string() {
        let text = "endpoint = [\"https://a:7443\", \"https://b:7443\"]\nca_cert = \"c\"\nclient_cert = \"d\"\nclient_key = \"e\"\n";
        let profile: Profile = toml::from_str(text).expect("array");
        assert_eq!(profile.endpoint, "https://a:7443,https://b:7443");
    }
}
