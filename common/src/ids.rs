//! Identifiers of the domain as types of their own, so a node id cannot be
//! passed where a deployment id or a module name is expected, and the rules
//! for names people choose live in one place ([`check_name`]).
//!
//! Each is a `String` underneath (serde-transparent, so stored records and
//! JSON are unchanged) and borrows as `&str` for map lookups.

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wrap an identifier that is already known to be well formed
            /// (generated here, or read back from our own records).
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

string_id!(
    /// A node's id: assigned by the control plane at enrollment (a UUID),
    /// never reused, and the subject of the node's certificate.
    NodeId
);

string_id!(
    /// A deployment's id (`d-` and ten hex digits), assigned at creation.
    DeploymentId
);

string_id!(
    /// A module's name as its manifest declares it (see [`ModuleName::parse`]).
    ModuleName
);

impl DeploymentId {
    /// A fresh id: `d-` and ten random hex digits.
    pub fn generate() -> Self {
        Self(format!("d-{}", hex::encode(rand::random::<[u8; 5]>())))
    }
}

impl NodeId {
    /// A fresh id: a random (version 4) UUID, as node certificates name it.
    pub fn generate() -> Self {
        let mut bytes = rand::random::<[u8; 16]>();
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        let hex = hex::encode(bytes);
        Self(format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        ))
    }
}

impl ModuleName {
    /// A module name as manifests allow it: 2 to 63 lowercase letters,
    /// digits and dashes, starting with a letter or digit.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        if is_module_name(name) {
            Ok(Self(name.to_string()))
        } else {
            Err(NameError {
                what: "module name",
                name: name.to_string(),
                rule: "2 to 63 characters of lowercase letters, digits and '-', starting with a letter or digit",
            })
        }
    }
}

/// Whether `name` is a valid module name (see [`ModuleName::parse`]).
pub fn is_module_name(name: &str) -> bool {
    let mut chars = name.chars();
    let lower_or_digit = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    chars.next().is_some_and(lower_or_digit)
        && (2..=63).contains(&name.len())
        && chars.all(|c| lower_or_digit(c) || c == '-')
}

/// A name that breaks its rule, with the rule in words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} {name:?} is invalid: {rule}")]
pub struct NameError {
    pub what: &'static str,
    pub name: String,
    pub rule: &'static str,
}

/// The kinds of names operators choose, each with its rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    /// `--name` of a node: a hostname-like word.
    Node,
    /// A publisher key's name.
    Key,
    /// A user's name: what certificates, audit records and approvals carry.
    User,
    /// `--name` of a control-plane replica (`servers get NAME`): a
    /// hostname-like word, by default the host name.
    Server,
}

impl NameKind {
    fn what(self) -> &'static str {
        match self {
            NameKind::Node => "node name",
            NameKind::Key => "key name",
            NameKind::User => "user name",
            NameKind::Server => "server name",
        }
    }

    fn max_len(self) -> usize {
        match self {
            NameKind::Node | NameKind::Key | NameKind::Server => 63,
            NameKind::User => 64,
        }
    }

    fn allows(self, c: char) -> bool {
        c.is_ascii_alphanumeric()
            || matches!(c, '-' | '_' | '.')
            || (self == NameKind::User && c == '@')
    }

    fn rule(self) -> &'static str {
        match self {
            NameKind::Node | NameKind::Key | NameKind::Server => {
                "1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
            }
            NameKind::User => {
                "1-64 letters, digits, '-', '_', '.' or '@', starting with a letter or digit"
            }
        }
    }
}

/// Check an operator-chosen name against its kind's rule.
pub fn check_name(kind: NameKind, name: &str) -> Result<(), NameError> {
    let valid = !name.is_empty()
        && name.len() <= kind.max_len()
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| kind.allows(c));
    if valid {
        Ok(())
    } else {
        Err(NameError {
            what: kind.what(),
            name: name.to_string(),
            rule: kind.rule(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_follow_their_rules() {
        assert!(check_name(NameKind::Node, "web-1.eu_west").is_ok());
        assert!(check_name(NameKind::Node, "a").is_ok());
        assert!(check_name(NameKind::Node, &"a".repeat(63)).is_ok());
        assert!(check_name(NameKind::Node, &"a".repeat(64)).is_err());
        assert!(check_name(NameKind::User, &"a".repeat(64)).is_ok());
        assert!(check_name(NameKind::User, "ci@example").is_ok());
        assert!(check_name(NameKind::Key, "ci@example").is_err());
        assert!(check_name(NameKind::Server, "cp-1.eu-west").is_ok());
        assert!(check_name(NameKind::Server, "cp@1").is_err());
        for bad in ["", "-web", ".web", "web 1", "wéb", "web/1"] {
            for kind in [
                NameKind::Node,
                NameKind::Key,
                NameKind::User,
                NameKind::Server,
            ] {
                assert!(check_name(kind, bad).is_err(), "{kind:?} {bad:?}");
            }
        }
        let error = check_name(NameKind::Key, "bad key").unwrap_err();
        assert_eq!(
            error.to_string(),
            "key name \"bad key\" is invalid: 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        );
    }

    #[test]
    fn module_names() {
        assert!(ModuleName::parse("hello").is_ok());
        assert!(ModuleName::parse("h1").is_ok());
        assert!(ModuleName::parse("h").is_err());
        assert!(ModuleName::parse("Hello").is_err());
        assert!(ModuleName::parse("-hello").is_err());
        assert!(ModuleName::parse("hello_world").is_err());
        assert!(ModuleName::parse(&"a".repeat(63)).is_ok());
        assert!(ModuleName::parse(&"a".repeat(64)).is_err());
    }

    #[test]
    fn generated_ids_have_their_shapes() {
        let d = DeploymentId::generate();
        assert!(
            d.as_str().starts_with("d-") && d.as_str().len() == 12,
            "{d}"
        );
        assert!(
            d.as_str()[2..].bytes().all(|b| b.is_ascii_hexdigit()),
            "{d}"
        );
        let n = NodeId::generate();
        let parts: Vec<usize> = n.as_str().split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{n}");
        assert_eq!(&n.as_str()[14..15], "4", "version 4: {n}");
        assert_ne!(NodeId::generate(), n);
        assert_ne!(DeploymentId::generate(), d);
    }

    #[test]
    fn ids_are_transparent_strings() {
        let id = NodeId::new("n-1");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"n-1\"");
        assert_eq!(serde_json::from_str::<NodeId>("\"n-1\"").unwrap(), id);
        let mut map = std::collections::HashMap::new();
        map.insert(id.clone(), 1);
        assert_eq!(map.get("n-1"), Some(&1));
        assert_eq!(id, "n-1");
    }

    proptest! {
        #[test]
        fn module_name_rule_matches_its_description(name in "[a-z0-9A-Z_.-]{0,70}") {
            let expected = (2..=63).contains(&name.len())
                && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            prop_assert_eq!(ModuleName::parse(&name).is_ok(), expected);
        }
    }
}
