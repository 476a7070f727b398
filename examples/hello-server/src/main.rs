//! `hello-server`: the example HTTP module for the hotswap process runtime.
//!
//! This file owns startup (flags, socket activation or binding), the accept
//! loop, signal handling and the graceful drain that makes start-first swaps
//! lossless: on SIGTERM or SIGINT the server stops calling accept() at once,
//! so connections still queued on the shared listening socket go to the
//! successor the agent already started on it, then finishes the requests it
//! has, and exits 0.

mod activation;
mod http;
mod metrics;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use clap::builder::BoolishValueParser;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout};

use crate::activation::ListenEnv;
use crate::http::{App, Shutdown};

/// Longest wait for in-flight requests after a stop signal. Below the
/// example manifest's `stop_timeout` (10s) so we exit 0 rather than being
/// killed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(8);

/// Example HTTP module for the hotswap process runtime.
///
/// Serves `/`, `/healthz` and `/metrics`. Takes its listening socket from
/// LISTEN_FDS (socket activation, the socket named "http") when given one,
/// otherwise binds --listen. Every flag can also be set through the
/// environment, so a module manifest can set them in `[process] env`.
#[derive(Debug, Parser)]
#[command(name = "hello-server")]
struct Args {
    /// Address to bind when not socket-activated.
    #[arg(long, env = "HELLO_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Version reported by `/` and the x-hello-version header.
    #[arg(
        long,
        env = "HOTSWAP_VERSION",
        default_value = "dev",
        value_parser = parse_label
    )]
    version_label: String,

    /// Answer 503 on /healthz, always.
    #[arg(long, env = "HELLO_UNHEALTHY", value_parser = BoolishValueParser::new())]
    unhealthy: bool,

    /// Sleep this long before answering `/`.
    #[arg(long, env = "HELLO_SLOW_MS", value_name = "MS", default_value_t = 0)]
    slow_ms: u64,

    /// Answer this fraction (0.0 to 1.0) of requests on `/` with 500, spread
    /// evenly (deterministic).
    #[arg(
        long,
        env = "HELLO_ERROR_RATE",
        value_name = "FRACTION",
        default_value_t = 0.0,
        value_parser = parse_rate
    )]
    error_rate: f64,

    /// Exit with status 1 this long after starting, to exercise crash loops.
    #[arg(long, env = "HELLO_CRASH_AFTER_MS", value_name = "MS")]
    crash_after_ms: Option<u64>,

    /// Wait this long before accepting connections, to simulate a slow start.
    #[arg(
        long,
        env = "HELLO_START_DELAY_MS",
        value_name = "MS",
        default_value_t = 0
    )]
    start_delay_ms: u64,
}

fn parse_label(s: &str) -> Result<String, String> {
    // The label goes into a response header, so it must not smuggle in
    // line breaks or other control characters.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "invalid version label {s:?}: expected printable ascii without spaces"
        ));
    }
    Ok(s.to_string())
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!(
            "invalid error rate {s:?}: expected a number from 0.0 to 1.0"
        )),
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    let args = Args::parse();
    // Environment changes are only sound while single-threaded, so the
    // activation variables are taken before the runtime starts.
    // SAFETY: no other thread exists yet.
    let listen_env = unsafe { ListenEnv::take() };
    match run(args, &listen_env, started) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args, listen_env: &ListenEnv, started: Instant) -> anyhow::Result<()> {
    let (listener, activated) = match listen_env.select(std::process::id())? {
        Some(selected) => (activation::adopt(selected)?, true),
        None => {
            let listener = std::net::TcpListener::bind(args.listen)
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            listener
                .set_nonblocking(true)
                .context("cannot make the listener non-blocking")?;
            (listener, false)
        }
    };
    let addr = listener
        .local_addr()
        .context("cannot read the listener's address")?;
    eprintln!(
        "hello-server: starting version={} socket_activated={activated} listen={addr} pid={}",
        args.version_label,
        std::process::id()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args, listener, started))
}

async fn serve(
    args: Args,
    listener: std::net::TcpListener,
    started: Instant,
) -> anyhow::Result<()> {
    let listener =
        TcpListener::from_std(listener).context("cannot register the listener with tokio")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = Shutdown::new(stop_rx);
    // Installed before the start delay so a stop during it is graceful too.
    watch_signals(stop_tx)?;

    if let Some(ms) = args.crash_after_ms {
        let at = tokio::time::Instant::from_std(started) + Duration::from_millis(ms);
        tokio::spawn(async move {
            sleep_until(at).await;
            eprintln!("hello-server: exiting with status 1 as asked by --crash-after-ms {ms}");
            std::process::exit(1);
        });
    }

    if args.start_delay_ms > 0 {
        eprintln!(
            "hello-server: waiting {} ms before accepting (--start-delay-ms)",
            args.start_delay_ms
        );
        tokio::select! {
            _ = sleep(Duration::from_millis(args.start_delay_ms)) => {}
            _ = shutdown.wait() => {
                eprintln!("hello-server: stopped before accepting any connection");
                return Ok(());
            }
        }
    }

    let app = Arc::new(App::new(
        args.version_label,
        args.unhealthy,
        Duration::from_millis(args.slow_ms),
        args.error_rate,
    ));
    eprintln!(
        "hello-server: accepting connections ({} ms after start)",
        started.elapsed().as_millis()
    );

    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            // Shutdown first: once signalled, not one more accept().
            biased;
            _ = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Responses are written in one piece; no reason to let
                    // Nagle hold them back.
                    let _ = stream.set_nodelay(true);
                    conns.spawn(http::serve_connection(stream, app.clone(), shutdown.clone()));
                }
                Err(e) => {
                    // Usually fd exhaustion; back off rather than spin.
                    eprintln!("hello-server: accept failed: {e}");
                    sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    // Closes only our fd: the socket stays open in the agent and in the
    // successor, whose accept() takes over the shared backlog.
    drop(listener);
    eprintln!(
        "hello-server: stopped accepting; draining {} connection(s)",
        conns.len()
    );
    let drained = timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    if !drained {
        eprintln!(
            "hello-server: drain timed out after {}s; dropping {} connection(s)",
            DRAIN_TIMEOUT.as_secs(),
            conns.len()
        );
        conns.abort_all();
    }
    eprintln!(
        "hello-server: stopped after {} ms, {} request(s) answered on /",
        started.elapsed().as_millis(),
        app.metrics.requests()
    );
    Ok(())
}

/// The first SIGTERM or SIGINT starts the graceful stop; a second one exits
/// at once (e.g. an impatient Ctrl-C).
fn watch_signals(stop: watch::Sender<bool>) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        eprintln!("hello-server: received {name}, stopping gracefully");
        stop.send_replace(true);
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        eprintln!("hello-server: received {name} again, exiting at once");
        std::process::exit(1);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_env() {
        let args = Args::try_parse_from([
            "hello-server",
            "--version-label",
            "1.2.3",
            "--unhealthy",
            "--error-rate",
            "0.25",
        ])
        .expect("valid flags");
        assert_eq!(args.version_label, "1.2.3");
        assert!(args.unhealthy);
        assert_eq!(args.error_rate, 0.25);

        for bad in [
            &["hello-server", "--error-rate", "1.5"][..],
            &["hello-server", "--error-rate", "NaN"][..],
            &["hello-server", "--version-label", "a\r\nb"][..],
        ] {
            assert!(Args::try_parse_from(bad).is_err(), "{bad:?} accepted");
        }
    }
}
