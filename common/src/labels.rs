//! Node labels: `key=value` pairs. Keys and values are restricted to a
//! conservative character set so they are safe in selectors, file names,
//! environment variables (`NODE_LABEL_<key>`) and metrics.

use std::collections::BTreeMap;

/// Labels of a node, ordered for stable output.
pub type Labels = BTreeMap<String, String>;

/// The label that places a node in an environment (a cluster).
pub const ENVIRONMENT_LABEL: &str = "environment";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LabelError {
    #[error("label {0:?} is not of the form key=value")]
    MissingEquals(String),
    #[error("label key {key:?} is invalid: {reason}")]
    BadKey { key: String, reason: &'static str },
    #[error("label {key:?} has an invalid value {value:?}: {reason}")]
    BadValue {
        key: String,
        value: String,
        reason: &'static str,
    },
}

const MAX_KEY_LEN: usize = 63;
const MAX_VALUE_LEN: usize = 63;

/// Parse one `key=value` argument.
pub fn parse_label(arg: &str) -> Result<(String, String), LabelError> {
    let (key, value) = arg
        .split_once('=')
        .ok_or_else(|| LabelError::MissingEquals(arg.to_string()))?;
    validate_label(key, value)?;
    Ok((key.to_string(), value.to_string()))
}

/// Parse a list of `key=value` arguments into labels; a key given twice is an error.
pub fn parse_labels<S: AsRef<str>>(args: &[S]) -> Result<Labels, LabelError> {
    let mut labels = Labels::new();
    for arg in args {
        let (key, value) = parse_label(arg.as_ref())?;
        if labels.contains_key(&key) {
            return Err(LabelError::BadKey {
                key,
                reason: "given more than once",
            });
        }
        labels.insert(key, value);
    }
    Ok(labels)
}

/// Check a key and value against the label rules.
pub fn validate_label(key: &str, value: &str) -> Result<(), LabelError> {
    let bad_key = |reason| LabelError::BadKey {
        key: key.to_string(),
        reason,
    };
    if key.is_empty() {
        return Err(bad_key("empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(bad_key("longer than 63 characters"));
    }
    if !key.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return Err(bad_key("must start with a lowercase letter or digit"));
    }
    if !key
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
    {
        return Err(bad_key(
            "only lowercase letters, digits, '-', '_' and '.' are allowed",
        ));
    }
    let bad_value = |reason| LabelError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
        reason,
    };
    if value.len() > MAX_VALUE_LEN {
        return Err(bad_value("longer than 63 characters"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(bad_value(
            "only letters, digits, '-', '_' and '.' are allowed",
        ));
    }
    Ok(())
}

/// Validate every entry of a label map (for labels that arrive over the wire).
pub fn validate_labels(labels: &Labels) -> Result<(), LabelError> {
    labels.iter().try_for_each(|(k, v)| validate_label(k, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(arg: &str, expected: Result<(&str, &str), &str>) {
        let got = parse_label(arg);
        match expected {
            Ok((k, v)) => assert_eq!(got, Ok((k.to_string(), v.to_string())), "input {arg:?}"),
            Err(fragment) => {
                let err = got.expect_err(arg).to_string();
                assert!(
                    err.contains(fragment),
                    "input {arg:?}: error {err:?} lacks {fragment:?}"
                );
            }
        }
    }

    #[test]
    fn label_table() {
        check("environment=dev", Ok(("environment", "dev")));
        check("zone=eu-west-1.a", Ok(("zone", "eu-west-1.a")));
        check("empty=", Ok(("empty", "")));
        check("a=b=c", Err("invalid value"));
        check("novalue", Err("not of the form key=value"));
        check("=dev", Err("empty"));
        check("Env=dev", Err("must start with"));
        check("env$=dev", Err("only lowercase"));
        check("env=d ev", Err("only letters"));
        check(&format!("{}=x", "k".repeat(64)), Err("longer than 63"));
        check(&format!("k={}", "v".repeat(64)), Err("longer than 63"));
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let err = parse_labels(&["a=1", "a=2"]).expect_err("duplicate");
        assert!(err.to_string().contains("more than once"));
    }

    proptest! {
        #[test]
        fn valid_labels_round_trip(key in "[a-z0-9][a-z0-9._-]{0,62}", value in "[A-Za-z0-9._-]{0,63}") {
            let arg = format!("{key}={value}");
            prop_assert_eq!(parse_label(&arg), Ok((key, value)));
        }

        #[test]
        fn parse_never_panics(arg in ".*") {
            let _ = parse_label(&arg);
        }
    }
}
