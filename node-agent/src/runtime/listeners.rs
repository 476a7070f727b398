//! Which module of this node owns each listening address the agent holds.
//!
//! Module listeners are bound with `SO_REUSEPORT` (see [`super::os`]): a
//! restarted agent that cannot take a socket back from a running version
//! binds the address again beside it, so the module's next version shares
//! the traffic instead of failing to start. The kernel cannot tell versions
//! of one module from two modules, so it would as gladly let module `b`
//! join module `a`'s port and split `a`'s traffic (and answer `b`'s health
//! probes with `a`). The book is the agent's own rule: an address, or one
//! that overlaps it, belongs to one module of the node at a time; versions of
//! that module share it, no other module gets it. It is claimed before a
//! listener is bound or taken back, released when the listener is closed,
//! and consulted by the pre-check so a conflict is a clear staging failure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Shared by the reconciler and every process supervisor of an agent.
#[derive(Clone, Debug, Default)]
pub struct ListenerBook {
    owners: Arc<Mutex<BTreeMap<SocketAddr, String>>>,
}

/// An address another module of the node already holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taken {
    /// The address it holds (equal to, or overlapping, the one asked for).
    pub held: SocketAddr,
    pub owner: String,
}

/// Whether two listening addresses compete for the same connections: the
/// same port and the same address, or either one the wildcard (which takes
/// every address of its family, and with dual-stack `[::]` both).
pub fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

impl ListenerBook {
    fn owners(&self) -> std::sync::MutexGuard<'_, BTreeMap<SocketAddr, String>> {
        // A panic while holding the lock cannot leave the map half-changed
        // (every change is one insert or retain), so a poisoned lock is fine.
        self.owners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The module other than `module` that holds `addr` or an address
    /// overlapping it, if any.
    pub fn taken(&self, module: &str, addr: SocketAddr) -> Option<Taken> {
        self.owners()
            .iter()
            .find(|(held, owner)| owner.as_str() != module && overlaps(**held, addr))
            .map(|(held, owner)| Taken {
                held: *held,
                owner: owner.clone(),
            })
    }

    /// Record `addr` as `module`'s, unless another module holds it (or an
    /// address overlapping it); checking and recording happen under one lock,
    /// so two supervisors binding at once cannot both win.
    pub fn claim(&self, module: &str, addr: SocketAddr) -> Result<(), Taken> {
        let mut owners = self.owners();
        if let Some((held, owner)) = owners
            .iter()
            .find(|(held, owner)| owner.as_str() != module && overlaps(**held, addr))
        {
            return Err(Taken {
                held: *held,
                owner: owner.clone(),
            });
        }
        owners.insert(addr, module.to_string());
        Ok(())
    }

    /// Forget `module`'s addresses for which `keep` is false.
    pub fn release_unless(&self, module: &str, keep: impl Fn(SocketAddr) -> bool) {
        self.owners()
            .retain(|addr, owner| owner.as_str() != module || keep(*addr));
    }
}

/// The message of a conflict, naming both modules, the socket and both
/// addresses: what an operator needs to pick another port.
pub fn conflict_message(module: &str, socket: &str, addr: SocketAddr, taken: &Taken) -> String {
    let held = if taken.held == addr {
        String::new()
    } else {
        format!(" (as {})", taken.held)
    };
    format!(
        "module {module:?}: socket {socket:?} listens on {addr}, which module {:?} already \
         listens on{held} on this node; two modules cannot share a listen address",
        taken.owner
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn overlap_table() {
        for (a, b, expected) in [
            ("127.0.0.1:80", "127.0.0.1:80", true),
            ("127.0.0.1:80", "127.0.0.1:81", false),
            ("127.0.0.1:80", "127.0.0.2:80", false),
            ("0.0.0.0:80", "127.0.0.1:80", true),
            ("127.0.0.1:80", "0.0.0.0:80", true),
            ("[::]:80", "127.0.0.1:80", true),
            ("[::1]:80", "127.0.0.1:80", false),
            ("0.0.0.0:80", "0.0.0.0:81", false),
        ] {
            assert_eq!(overlaps(addr(a), addr(b)), expected, "{a} vs {b}");
        }
    }

    #[test]
    fn one_module_per_address_versions_of_one_share_it() {
        let book = ListenerBook::default();
        let port = addr("127.0.0.1:18181");
        book.claim("a", port).expect("free");
        book.claim("a", port).expect("a module's own address again");
        let taken = book.claim("b", port).expect_err("a holds it");
        assert_eq!(
            taken,
            Taken {
                held: port,
                owner: "a".into()
            }
        );
        assert_eq!(book.taken("b", port), Some(taken.clone()));
        assert_eq!(book.taken("a", port), None);
        assert_eq!(
            conflict_message("b", "http", port, &taken),
            "module \"b\": socket \"http\" listens on 127.0.0.1:18181, which module \"a\" \
             already listens on on this node; two modules cannot share a listen address"
        );
        let wildcard = book
            .claim("b", addr("0.0.0.0:18181"))
            .expect_err("the wildcard overlaps a's address");
        assert!(
            conflict_message("b", "http", addr("0.0.0.0:18181"), &wildcard)
                .contains("(as 127.0.0.1:18181)")
        );
        book.claim("b", addr("127.0.0.1:18182"))
            .expect("another port");

        book.release_unless("a", |_| false);
        assert_eq!(book.taken("b", port), None);
        book.claim("b", port).expect("free once a closed it");
        book.release_unless("b", |a| a == port);
        assert_eq!(book.taken("c", addr("127.0.0.1:18182")), None);
        assert!(book.taken("c", port).is_some(), "kept");
    }
}
