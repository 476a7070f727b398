//! Socket activation: taking the listening socket the agent (or systemd)
//! passed in through `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`.
//!
//! The rule implemented here:
//! - `LISTEN_FDS` unset or `0`: not activated, the caller binds `--listen`.
//! - `LISTEN_PID` set and not our pid: the fds were meant for another
//!   process (e.g. a parent that forgot to clear its environment), so they
//!   are ignored, as `sd_listen_fds` does.
//! - `LISTEN_PID` unset: the fds are accepted. systemd always sets it, but a
//!   parent cannot know the child's pid before `exec` without a shell
//!   wrapper, so tests and simple supervisors leave it out.
//! - The socket used is the one named `http` in `LISTEN_FDNAMES`
//!   (colon-separated, one name per fd from fd 3 on), or fd 3 when no names
//!   are given.
//!
//! The three variables are always removed from our environment so nothing
//! we might start later believes the fds are meant for it.

use std::env;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, RawFd};

use anyhow::{Context, bail};

/// First fd passed by socket activation (after stdin, stdout, stderr).
const FIRST_FD: RawFd = 3;
/// Name of the socket this server serves HTTP on.
const SOCKET_NAME: &str = "http";

/// The raw environment of socket activation, read once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ListenEnv {
    pub fds: Option<String>,
    pub pid: Option<String>,
    pub names: Option<String>,
}

impl ListenEnv {
    /// Read the variables and remove them from the environment.
    ///
    /// # Safety
    ///
    /// Must be called while the process is single-threaded: changing the
    /// environment races with any other thread reading it.
    pub unsafe fn take() -> ListenEnv {
        let read = |name: &str| env::var_os(name).map(|v| v.to_string_lossy().into_owned());
        let taken = ListenEnv {
            fds: read("LISTEN_FDS"),
            pid: read("LISTEN_PID"),
            names: read("LISTEN_FDNAMES"),
        };
        for name in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            // SAFETY: the caller guarantees no other thread exists yet.
            unsafe { env::remove_var(name) };
        }
        taken
    }

    /// Which fd to serve on, or `None` when not socket-activated.
    pub fn select(&self, own_pid: u32) -> anyhow::Result<Option<Selected>> {
        let Some(fds) = self.fds.as_deref() else {
            return Ok(None);
        };
        let count: u16 = fds.trim().parse().map_err(|_| {
            anyhow::anyhow!("invalid LISTEN_FDS {fds:?}: expected a count of file descriptors")
        })?;
        if let Some(pid) = self.pid.as_deref() {
            let pid: u32 = pid.trim().parse().map_err(|_| {
                anyhow::anyhow!("invalid LISTEN_PID {pid:?}: expected a process id")
            })?;
            if pid != own_pid {
                eprintln!(
                    "hello-server: ignoring LISTEN_FDS: LISTEN_PID {pid} is not this process ({own_pid})"
                );
                return Ok(None);
            }
        }
        if count == 0 {
            return Ok(None);
        }
        let index = match self.names.as_deref() {
            None | Some("") => 0,
            Some(names) => names
                .split(':')
                .position(|n| n == SOCKET_NAME)
                .with_context(|| {
                    format!("no socket named {SOCKET_NAME:?} in LISTEN_FDNAMES {names:?}")
                })?,
        };
        if index >= usize::from(count) {
            bail!(
                "socket {SOCKET_NAME:?} is at position {index} in LISTEN_FDNAMES but LISTEN_FDS \
                 is only {count}"
            );
        }
        Ok(Some(Selected {
            fd: FIRST_FD + index as RawFd,
            count,
        }))
    }
}

/// The fd chosen by [`ListenEnv::select`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selected {
    /// The fd of the `http` socket.
    pub fd: RawFd,
    /// How many fds were passed in total (fds 3..3+count).
    pub count: u16,
}

/// Wrap the selected fd as a non-blocking listener, ready for tokio.
///
/// The socket is used as-is: it is neither re-bound nor closed, because the
/// agent keeps the same socket open across versions and hands it to our
/// successor; the backlog is shared.
pub fn adopt(selected: Selected) -> anyhow::Result<TcpListener> {
    for fd in FIRST_FD..FIRST_FD + RawFd::from(selected.count) {
        // Passed fds arrive without close-on-exec; set it (as sd_listen_fds
        // does) so a program we might run does not hold the socket open.
        // SAFETY: fcntl on an integer fd has no memory-safety requirements.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags == -1 {
            bail!(
                "fd {fd} from LISTEN_FDS is not open: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    }
    let fd = selected.fd;
    // SAFETY: the fd is open (checked above) and, by the socket-activation
    // protocol, handed to this process to own.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    listener
        .local_addr()
        .with_context(|| format!("fd {fd} from LISTEN_FDS is not a TCP socket"))?;
    // tokio requires non-blocking sockets. The flag lives on the shared
    // open file, which is fine: every holder of it is an async server.
    listener
        .set_nonblocking(true)
        .with_context(|| format!("cannot make fd {fd} non-blocking"))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(fds: Option<&str>, pid: Option<&str>, names: Option<&str>) -> ListenEnv {
        ListenEnv {
            fds: fds.map(str::to_string),
            pid: pid.map(str::to_string),
            names: names.map(str::to_string),
        }
    }

    fn fd(env: &ListenEnv) -> Option<RawFd> {
        env.select(42).expect("valid").map(|s| s.fd)
    }

    #[test]
    fn selects_the_http_socket() {
        assert_eq!(fd(&env(None, None, None)), None);
        assert_eq!(fd(&env(Some("0"), None, None)), None);
        assert_eq!(fd(&env(Some("1"), None, None)), Some(3));
        assert_eq!(fd(&env(Some("1"), Some("42"), Some("http"))), Some(3));
        assert_eq!(fd(&env(Some("2"), Some("42"), Some("admin:http"))), Some(4));
        // Meant for another process: ignored, the caller binds --listen.
        assert_eq!(fd(&env(Some("1"), Some("41"), Some("http"))), None);
    }

    #[test]
    fn rejects_bad_values() {
        let err = |e: ListenEnv| e.select(42).expect_err("invalid").to_string();
        assert!(err(env(Some("x"), None, None)).contains("invalid LISTEN_FDS"));
        assert!(err(env(Some("1"), Some("me"), None)).contains("invalid LISTEN_PID"));
        assert!(err(env(Some("1"), None, Some("admin"))).contains("no socket named"));
        assert!(err(env(Some("1"), None, Some("admin:http"))).contains("only 1"));
    }
}
