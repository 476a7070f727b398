//! Facts about the machine this process runs on: its host name, the default
//! name of an agent's node and of a control-plane replica.

use std::path::Path;

/// Where Linux publishes the host name (what `uname -n` says).
const KERNEL_HOSTNAME: &str = "/proc/sys/kernel/hostname";

/// This host's name, or `None` when the kernel does not say (not Linux, no
/// `/proc`) or says nothing; callers choose their own default.
pub fn hostname() -> Option<String> {
    hostname_from(Path::new(KERNEL_HOSTNAME))
}

fn hostname_from(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|name| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_is_trimmed_and_never_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hostname");
        std::fs::write(&path, "web-1\n").expect("write");
        assert_eq!(hostname_from(&path).as_deref(), Some("web-1"));
        std::fs::write(&path, " \n").expect("write");
        assert_eq!(hostname_from(&path), None);
        assert_eq!(hostname_from(&dir.path().join("missing")), None);
    }
}
