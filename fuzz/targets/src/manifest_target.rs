//! Target `manifest`: `module.toml` text through the parser, and every value
//! of an accepted manifest through variable expansion, as a node does it.

use std::collections::BTreeMap;
use std::time::Duration;

use hotswap_common::manifest::{Manifest, Vars, expand, parse_manifest};

/// Parse `data` as a manifest (lossily decoded when it is not UTF-8, so
/// mutations that break an encoding still reach the parser) and, when it is
/// accepted, expand each templated value with a node's variables.
pub fn manifest(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(manifest) = parse_manifest("fuzz/module.toml", &text) else {
        return;
    };
    check_accepted(&manifest);
    expand_all(&manifest);
}

/// What parse-time validation promises to the code that uses a manifest.
fn check_accepted(manifest: &Manifest) {
    assert_eq!(
        manifest.process.is_some(),
        manifest.runtime == hotswap_common::manifest::Runtime::Process,
        "a process section exactly for the process runtime"
    );
    assert_eq!(
        manifest.bundle.is_some(),
        manifest.runtime == hotswap_common::manifest::Runtime::Bundle,
        "a bundle section exactly for the bundle runtime"
    );
    if let Some(process) = &manifest.process {
        assert!(
            !process.command.is_empty(),
            "an accepted command is never empty"
        );
        assert!(process.sockets.len() <= 16, "at most 16 sockets");
    }
    if let Some(health) = &manifest.health {
        assert!(
            !health.timeout.is_zero() && health.timeout <= Duration::from_secs(3600),
            "health timeout above zero and at most an hour"
        );
    }
}

/// Expand every value that may hold variables; parse-time validation and
/// expansion share one tokenizer, so an accepted value may only fail to
/// expand for a label the node lacks.
fn expand_all(manifest: &Manifest) {
    let labels = BTreeMap::from([
        ("zone".to_string(), "eu-1".to_string()),
        ("port".to_string(), "8080".to_string()),
    ]);
    let vars = Vars {
        node_name: "node-a",
        labels: &labels,
        module_dir: "/var/lib/hotswap/modules/fuzz",
    };
    let mut values: Vec<&str> = Vec::new();
    values.extend(manifest.description.as_deref());
    if let Some(process) = &manifest.process {
        values.extend(process.command.iter().map(String::as_str));
        values.extend(process.env.values().map(String::as_str));
        values.extend(process.sockets.iter().map(|s| s.listen.as_str()));
        for socket in &process.sockets {
            let _ = socket.literal_addr();
        }
    }
    if let Some(bundle) = &manifest.bundle {
        for hook in [&bundle.activate, &bundle.deactivate].into_iter().flatten() {
            values.extend(hook.iter().map(String::as_str));
        }
    }
    if let Some(health) = &manifest.health {
        match &health.check {
            hotswap_common::manifest::HealthCheck::Http(url) => values.push(url),
            hotswap_common::manifest::HealthCheck::Tcp(addr) => values.push(addr),
            hotswap_common::manifest::HealthCheck::Exec(command) => {
                values.extend(command.iter().map(String::as_str));
            }
        }
    }
    if let Some(metrics) = &manifest.metrics {
        values.push(&metrics.prometheus);
    }
    for value in values {
        if let Err(reason) = expand(value, &vars) {
            assert!(
                reason.starts_with("node has no label"),
                "accepted value {value:?} fails to expand: {reason}"
            );
        }
    }
}
