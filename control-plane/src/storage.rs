//! Storage failure and recovery. sled makes the first I/O error of a write
//! (a full disk, a failing device) permanent for the open database: every
//! later flush fails, and whatever it still accepts in memory would never
//! reach the disk. [`watch`] notices such a failure within a second even
//! when no request hit it, marks the control plane not ready, and, once the
//! data directory's file system has room again, ends the server's run loop
//! with a restart request so the binary re-executes itself
//! and reopens the database, which recovers everything that was flushed.
//! Meanwhile [`Store::ensure_writable`] refuses every change up front and
//! reads keep answering.
//!
//! The watcher also notices a database directory deleted or replaced under
//! the running process (`rm -rf DATA/state`): sled keeps writing into the
//! files it holds open, so without the check every write would be
//! acknowledged and lost at the next start. That failure is not restarted
//! away: a restart would find no database, and refuses to start (see
//! the server's start and `--recover-empty-db`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hotswap_common::admin::Readiness;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::Store;

/// How often the storage is checked, and free space polled after a failure.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes available to unprivileged writers on the file system of `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))?;
    // SAFETY: statvfs(3) writes into the zeroed struct we pass and reads the
    // NUL-terminated path, which outlives the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// What the watcher needs.
pub struct Watch {
    pub store: Store,
    pub data_dir: PathBuf,
    pub min_free_bytes: u64,
    pub readiness: Readiness,
    pub metrics: Arc<Metrics>,
    /// Set before `shutdown` is cancelled when the storage asks for a restart.
    pub restart: Arc<AtomicBool>,
    pub shutdown: CancellationToken,
}

/// Run until shutdown, or until a failed storage has room again (then ask
/// for a restart and cancel `shutdown`).
pub async fn watch(w: Watch) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut announced = false;
    loop {
        tokio::select! {
            _ = w.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if w.store.failure().is_none() {
            // Cheap when nothing is dirty; surfaces a failure that happened
            // in a background write nobody waited for, and checks that the
            // database is still the one opened (a flush does, after it).
            let _ = w.store.flush().await;
        }
        let Some(failure) = w.store.failure() else {
            continue;
        };
        if !announced {
            announced = true;
            w.readiness.set(false);
            w.metrics.storage_failed.set(1);
            if failure.recovers_on_restart() {
                tracing::error!(error = %failure, data_dir = %w.data_dir.display(), min_free_bytes = w.min_free_bytes, "storage failed: not ready; changes are refused, reads still answer; restarting by itself once the data directory has room");
            } else {
                tracing::error!(error = %failure, data_dir = %w.data_dir.display(), "storage failed: not ready; changes are refused, reads still answer from memory; stop the control plane and restore the data directory from a backup (a restart without a database is refused)");
            }
        }
        if !failure.recovers_on_restart() {
            continue;
        }
        match free_bytes(&w.data_dir) {
            Ok(free) if free >= w.min_free_bytes => {
                tracing::warn!(
                    free_bytes = free,
                    "the data directory has room again: restarting to reopen the database"
                );
                w.restart.store(true, Ordering::SeqCst);
                w.shutdown.cancel();
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the free space of the data directory")
            }
        }
    }
}
