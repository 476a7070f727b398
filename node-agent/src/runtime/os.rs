//! Thin, checked wrappers over the Linux calls the process runtime needs
//! that std does not offer: pidfds (signal and watch a process without pid
//! reuse races, and take back its listening sockets after an agent restart),
//! process start times from /proc, and listening sockets with the options a
//! shared listener needs, and waiting for a process to exit through its pidfd.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use socket2::{Domain, Socket, Type};
use tokio::sync::watch;

/// Bind a listening TCP socket the agent owns and hands to module processes.
/// `SO_REUSEPORT` lets a restarted agent bind the address again should it
/// fail to take the original socket back from a running process, so that
/// module's next version can start beside it (the kernel only joins sockets
/// that both set it). That is the one sharing the agent needs, between
/// versions of one module: the kernel cannot tell it from two modules on one
/// port, so callers claim the address in the node's
/// `ListenerBook` (in the listeners module) first, which refuses an
/// address another module holds.
pub fn bind_listener(addr: SocketAddr) -> io::Result<OwnedFd> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    // A deep backlog holds connections while versions change hands.
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The local address a socket is bound to, if it is a listening TCP socket.
pub fn listening_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    let socket = Socket::from(fd.try_clone().ok()?);
    let listening = socket.is_listener().ok()?;
    let addr = socket.local_addr().ok()?.as_socket()?;
    listening.then_some(addr)
}

/// A pidfd for `pid`.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; the result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Send a signal through a pidfd: never hits a recycled pid.
pub fn pidfd_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: syscall with a valid fd, a signal number and null siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Duplicate file descriptor `target_fd` of the process behind `pidfd`.
pub fn pidfd_getfd(pidfd: &OwnedFd, target_fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: syscall with a valid pidfd and an fd number; returns a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Start time of a process in clock ticks since boot (field 22 of
/// /proc/<pid>/stat). With the pid it identifies a process across pid reuse.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')' come fields 3.. ; starttime is field 22, i.e. the 20th here.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is alive and still the process that started at `start_ticks`.
pub fn is_same_process(pid: u32, start_ticks: u64) -> bool {
    process_start_ticks(pid) == Some(start_ticks)
}

/// Resolve a signal name from the manifest (already validated) to a number.
pub fn signal_number(name: &str) -> i32 {
    match name {
        "SIGINT" => libc::SIGINT,
        "SIGQUIT" => libc::SIGQUIT,
        "SIGHUP" => libc::SIGHUP,
        "SIGUSR1" => libc::SIGUSR1,
        "SIGUSR2" => libc::SIGUSR2,
        "SIGKILL" => libc::SIGKILL,
        _ => libc::SIGTERM,
    }
}

/// Resolve when the watched process has exited, with how it ended.
pub async fn wait_exited(mut exited: watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(how) = exited.borrow_and_update().clone() {
            return how;
        }
        if exited.changed().await.is_err() {
            return "exit watcher ended".to_string();
        }
    }
}

/// Watch an adopted (not our child) process for exit through its pidfd,
/// which becomes readable when the process ends.
pub fn watch_pidfd_exit(pidfd: &OwnedFd) -> watch::Receiver<Option<String>> {
    let (tx, rx) = watch::channel(None);
    let fd = match pidfd.try_clone() {
        Ok(fd) => fd,
        Err(e) => {
            let _ = tx.send(Some(format!("cannot watch: {e}")));
            return rx;
        }
    };
    tokio::spawn(async move {
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open
        // and refers to the same pidfd for the AsyncFd's whole life.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        };
        let how = match registered {
            Ok(async_fd) => match async_fd.readable().await {
                Ok(_) => "exited (adopted process; exit status unknown)".to_string(),
                Err(e) => format!("cannot watch: {e}"),
            },
            Err(e) => format!("cannot watch: {e}"),
        };
        let _ = tx.send(Some(how));
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_identity() {
        let pid = std::process::id();
        let ticks = process_start_ticks(pid).expect("own start time");
        assert!(is_same_process(pid, ticks));
        assert!(!is_same_process(pid, ticks + 1));
        assert!(process_start_ticks(u32::MAX - 1).is_none());
    }

    #[test]
    fn listener_binds_and_reports_its_address() {
        let fd = bind_listener("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listening_addr(&fd).expect("listening");
        assert_eq!(addr.ip().to_string(), "127.0.0.1");
        // A second listener on the same port works thanks to SO_REUSEPORT.
        let again = bind_listener(addr).expect("rebind with reuseport");
        assert_eq!(listening_addr(&again), Some(addr));
    }

    #[test]
    fn pidfd_of_a_child_can_signal_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pidfd = pidfd_open(child.id()).expect("pidfd");
        pidfd_signal(&pidfd, libc::SIGKILL).expect("signal");
        let status = child.wait().expect("wait");
        assert!(!status.success());
    }
}
