//! Process signals for the daemons: the first SIGTERM or SIGINT starts a
//! graceful shutdown; a second one exits at once.

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
