//! Manifest variables: `${NODE_NAME}`, `${NODE_LABEL_<key>}` and
//! `${MODULE_DIR}`, checked for syntax at parse time and expanded on a node,
//! which alone knows its name, labels and module directory.

use std::collections::BTreeMap;

const ALLOWED_VARS: &str = "allowed: ${NODE_NAME}, ${NODE_LABEL_<key>}, ${MODULE_DIR}";

/// What a node substitutes for manifest variables.
#[derive(Clone, Copy, Debug)]
pub struct Vars<'a> {
    pub node_name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub module_dir: &'a str,
}

/// Expand `${NODE_NAME}`, `${NODE_LABEL_<key>}` and `${MODULE_DIR}` in one
/// value. Unknown variables, labels the node does not have and an
/// unterminated `${` are errors. A `$` not followed by `{` is kept as is, and
/// `$$` is not an escape.
pub fn expand(value: &str, vars: &Vars<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    for piece in pieces(value)? {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::NodeName => out.push_str(vars.node_name),
            Piece::ModuleDir => out.push_str(vars.module_dir),
            Piece::Label(key) => match vars.labels.get(key) {
                Some(label) => out.push_str(label),
                None => {
                    return Err(format!(
                        "node has no label {key:?} (used by ${{NODE_LABEL_{key}}})"
                    ));
                }
            },
        }
    }
    Ok(out)
}

/// A literal run or a variable of a manifest value.
enum Piece<'s> {
    Text(&'s str),
    NodeName,
    ModuleDir,
    Label(&'s str),
}

/// Split a value into literal text and variables, rejecting bad variables.
/// Shared by parse-time validation and [`expand`] so both agree exactly.
fn pieces(value: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        if start > 0 {
            out.push(Piece::Text(&rest[..start]));
        }
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("unterminated \"${{\" in {value:?}: missing \"}}\""));
        };
        let name = &after[..end];
        let piece = match name {
            "NODE_NAME" => Piece::NodeName,
            "MODULE_DIR" => Piece::ModuleDir,
            _ => match name.strip_prefix("NODE_LABEL_") {
                Some(key) => {
                    // A key that can never be a label would only fail later,
                    // on every node; catch the typo at publish time instead.
                    crate::labels::validate_label(key, "")
                        .map_err(|e| format!("invalid variable ${{{name}}}: {e}"))?;
                    Piece::Label(key)
                }
                None => return Err(format!("unknown variable ${{{name}}}; {ALLOWED_VARS}")),
            },
        };
        out.push(piece);
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

/// Check the variables of `value` without expanding them: what parsing does
/// for every value that may hold variables.
pub(super) fn check_syntax(value: &str) -> Result<(), String> {
    pieces(value).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn expand_variables() {
        let labels = BTreeMap::from([
            ("zone".to_string(), "eu-1".to_string()),
            ("rack.id".to_string(), "r7".to_string()),
        ]);
        let vars = Vars {
            node_name: "node-a",
            labels: &labels,
            module_dir: "/var/lib/hotswap/modules/hello",
        };
        assert_eq!(expand("plain", &vars), Ok("plain".to_string()));
        assert_eq!(expand("", &vars), Ok(String::new()));
        assert_eq!(expand("${NODE_NAME}", &vars), Ok("node-a".to_string()));
        assert_eq!(
            expand("${MODULE_DIR}/bin/x", &vars),
            Ok("/var/lib/hotswap/modules/hello/bin/x".to_string())
        );
        assert_eq!(
            expand(
                "${NODE_NAME}@${NODE_LABEL_zone}/${NODE_LABEL_rack.id}",
                &vars
            ),
            Ok("node-a@eu-1/r7".to_string())
        );
        // A lone "$" and "$$" are literal.
        assert_eq!(
            expand("$HOME $ $$ a$", &vars),
            Ok("$HOME $ $$ a$".to_string())
        );
        assert_eq!(expand("$${NODE_NAME}", &vars), Ok("$node-a".to_string()));
        // "}" without "${" is literal too.
        assert_eq!(expand("{}}", &vars), Ok("{}}".to_string()));

        let err = expand("${NODE_LABEL_region}", &vars).expect_err("missing label");
        assert!(err.contains("node has no label \"region\""), "{err}");
        let err = expand("x ${FOO} y", &vars).expect_err("unknown");
        assert!(err.contains("unknown variable ${FOO}"), "{err}");
        assert!(err.contains("allowed: ${NODE_NAME}"), "{err}");
        let err = expand("${node_name}", &vars).expect_err("case matters");
        assert!(err.contains("unknown variable ${node_name}"), "{err}");
        let err = expand("a ${NODE_NAME", &vars).expect_err("unterminated");
        assert!(err.contains("unterminated"), "{err}");
        let err = expand("${NODE_NAME}${", &vars).expect_err("unterminated");
        assert!(err.contains("unterminated"), "{err}");
    }

    #[test]
    fn check_syntax_agrees_with_expand_on_bad_variables() {
        for bad in ["${FOO}", "${NODE_NAME", "${NODE_LABEL_Zone}", "a${"] {
            assert!(check_syntax(bad).is_err(), "{bad}");
        }
        for good in [
            "",
            "$x",
            "${NODE_NAME}",
            "${NODE_LABEL_zone}",
            "${MODULE_DIR}/a",
        ] {
            assert_eq!(check_syntax(good), Ok(()), "{good}");
        }
    }

    proptest! {
        #[test]
        fn expand_without_variables_is_identity(text in "[^{]*") {
            let labels = BTreeMap::new();
            let vars = Vars { node_name: "n", labels: &labels, module_dir: "/m" };
            prop_assert_eq!(expand(&text, &vars), Ok(text.clone()));
        }
    }
}
