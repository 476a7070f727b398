//! The `marker` test module: a bundle whose activate hook appends
//! `<node> <version> ok|fail` to a log, so a test counts how often each node
//! activated each version (exactly once, across kills and failovers).

use std::collections::BTreeMap;
use std::path::Path;

use crate::control_plane::ControlPlane;

/// Write the source of `marker@version` into `dir`; its hook logs to `log`
/// and fails (exit 1, logging `fail`) when `fail` is set.
pub fn write_marker(dir: &Path, version: &str, log: &Path, fail: bool) {
    std::fs::create_dir_all(dir.join("bin")).expect("bin");
    let (word, code) = if fail { ("fail", 1) } else { ("ok", 0) };
    let script = dir.join("bin/activate.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$HOTSWAP_NODE $HOTSWAP_VERSION {word}\" >> '{}'\nexit {code}\n",
            log.display()
        ),
    )
    .expect("hook");
    let mut permissions = std::fs::metadata(&script).expect("hook").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&script, permissions).expect("chmod hook");
    std::fs::write(
        dir.join("module.toml"),
        format!(
            "name = \"marker\"\nversion = \"{version}\"\nruntime = \"bundle\"\n\n[bundle]\nactivate = [\"bin/activate.sh\"]\n"
        ),
    )
    .expect("manifest");
}

/// Pack `marker@version` (signed with `key`) under `work` and push it to `cp`.
pub fn push_marker(cp: &ControlPlane, work: &Path, key: &Path, version: &str, log: &Path) {
    let src = work.join(format!("src-marker-{version}"));
    write_marker(&src, version, log, false);
    let out = work.join(format!("marker-{version}.hsm"));
    crate::load::pack_dir(&src, key, &out);
    let pushed = cp.ctl(&["module", "push", out.to_str().expect("utf8")]);
    assert_eq!(pushed.code, 0, "{pushed:?}");
}

/// Successful activations per (node, version) in the hook log.
pub fn activations(log: &Path) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        if let [node, version, "ok"] = line.split_whitespace().collect::<Vec<_>>()[..] {
            *counts
                .entry((node.to_string(), version.to_string()))
                .or_insert(0) += 1;
        }
    }
    counts
}
