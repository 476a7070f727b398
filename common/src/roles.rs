//! Operator roles and the permissions each grants: the pure table that the
//! control plane's authorization applies and its user records store, and
//! that the dashboard reads to show only the controls a role can use.

use serde::{Deserialize, Serialize};

/// An operator's role. Roles are not a ladder: a deployer cannot approve and
/// an approver cannot deploy, so one person cannot do both halves of the
/// two-person rule; only admin holds every permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Deployer,
    Approver,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Deployer, Role::Approver, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Result<Role, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == text)
            .ok_or_else(|| UnknownRole(text.to_string()))
    }

    pub fn allows(self, permission: Permission) -> bool {
        use Permission::*;
        match self {
            Role::Admin => true,
            Role::Viewer => matches!(permission, Read),
            Role::Deployer => matches!(permission, Read | Push | Deploy | Control),
            Role::Approver => {
                matches!(permission, Read | Approve | Control | ControlProtected)
            }
        }
    }
}

/// What a call needs. Each RPC maps to exactly one (see the services).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Any read: nodes, modules, keys, deployments, audit.
    Read,
    /// Upload artifacts.
    Push,
    /// Create deployments and run pipelines.
    Deploy,
    /// Pause, resume, promote, abort or roll back a deployment in an
    /// environment that is not protected.
    Control,
    /// The same in a protected environment (production by default).
    ControlProtected,
    /// Approve or reject a deployment awaiting approval.
    Approve,
    /// Tokens, publisher keys, users, node removal and raw desired state.
    Admin,
}

impl Permission {
    pub fn describe(self) -> &'static str {
        match self {
            Permission::Read => "reading fleet state",
            Permission::Push => "pushing artifacts",
            Permission::Deploy => "creating deployments",
            Permission::Control => "controlling deployments",
            Permission::ControlProtected => "controlling deployments in a protected environment",
            Permission::Approve => "approving or rejecting deployments",
            Permission::Admin => "this administrative call",
        }
    }

    /// The roles that hold this permission, for error messages.
    pub fn roles(self) -> Vec<&'static str> {
        Role::ALL
            .into_iter()
            .filter(|r| r.allows(self))
            .map(Role::as_str)
            .collect()
    }
}

/// A role name that is not one of [`Role::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}; expected viewer, deployer, approver or admin")]
pub struct UnknownRole(pub String);

#[cfg(test)]
mod tests {
    use super::*;
    use Permission::*;

    /// The role table, spelled out: any change to it must change this test.
    #[test]
    fn role_table() {
        let table: [(Role, &[Permission]); 4] = [
            (Role::Viewer, &[Read]),
            (Role::Deployer, &[Read, Push, Deploy, Control]),
            (Role::Approver, &[Read, Approve, Control, ControlProtected]),
            (
                Role::Admin,
                &[
                    Read,
                    Push,
                    Deploy,
                    Control,
                    ControlProtected,
                    Approve,
                    Admin,
                ],
            ),
        ];
        let all = [
            Read,
            Push,
            Deploy,
            Control,
            ControlProtected,
            Approve,
            Admin,
        ];
        for (role, granted) in table {
            for permission in all {
                assert_eq!(
                    role.allows(permission),
                    granted.contains(&permission),
                    "{role:?} {permission:?}"
                );
            }
        }
    }

    #[test]
    fn no_role_both_deploys_and_approves_except_admin() {
        for role in Role::ALL {
            if role != Role::Admin {
                assert!(!(role.allows(Deploy) && role.allows(Approve)), "{role:?}");
            }
        }
    }

    #[test]
    fn roles_parse_and_name() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()).ok(), Some(role));
        }
        assert!(Role::parse("root").is_err());
        assert_eq!(Approve.roles(), vec!["approver", "admin"]);
    }
}
