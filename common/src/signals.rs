//! Process setup for the daemons: signals (the first SIGTERM or SIGINT
//! starts a graceful shutdown; a second one exits at once) and the limit on
//! open files.

use tokio_util::sync::CancellationToken;

/// Cancel `token` on the first SIGTERM or SIGINT; exit 130 on the second.
pub async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received; shutting down (send again to exit at once)");
    token.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    std::process::exit(130);
}

/// Log a fatal error and print it as the one-line reason on stderr.
pub fn fail(error: &dyn std::fmt::Display) -> std::process::ExitCode {
    tracing::error!(error = %error, "fatal");
    eprintln!("error: {error}");
    std::process::ExitCode::FAILURE
}

/// Raise the soft limit on open files to the hard limit. Every agent session
/// is a socket of the control plane's, and the usual soft default (1024, or
/// what a login shell was given) is far below a fleet; the hard limit is the
/// administrator's (systemd `LimitNOFILE=`, see deploy/). Returns the limit
/// now in force.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}
