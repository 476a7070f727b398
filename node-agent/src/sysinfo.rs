//! Node and process resource usage from Linux `/proc`: node CPU (as a rate
//! between two samples, [`CpuSampler`]), node memory, and the resident
//! memory and CPU time of one module process ([`process_usage`]), turned
//! into a module's CPU share by [`ProcessSampler`]. The parsers are pure
//! functions over the file text, so they are tested with fixed input.

use std::path::Path;
use std::time::{Duration, Instant};

use hotswap_common::status::ModuleUsage;

/// Node resource usage at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NodeUsage {
    /// 0..=100 over all cores, since the previous sample.
    pub cpu_percent: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

/// Computes node CPU usage between consecutive samples; keeps the previous
/// `/proc/stat` totals.
#[derive(Clone, Debug)]
pub struct CpuSampler {
    /// `(idle, total)` ticks at the previous sample.
    previous: (u64, u64),
}

impl CpuSampler {
    /// Reads `/proc/stat` once, so the first [`sample`](Self::sample)
    /// reports usage since now. If that read fails the baseline is zero and
    /// the first sample reports the average since boot, which is still a
    /// meaningful number.
    pub fn new() -> Self {
        let previous = read("/proc/stat")
            .and_then(|text| parse_proc_stat(&text))
            .unwrap_or((0, 0));
        CpuSampler { previous }
    }

    /// CPU usage since the previous sample, and memory now.
    pub fn sample(&mut self) -> Result<NodeUsage, SysinfoError> {
        let current = parse_proc_stat(&read("/proc/stat")?)?;
        let cpu_percent = cpu_percent(self.previous, current);
        self.previous = current;
        let (memory_used_bytes, memory_total_bytes) = parse_meminfo(&read("/proc/meminfo")?)?;
        Ok(NodeUsage {
            cpu_percent,
            memory_used_bytes,
            memory_total_bytes,
        })
    }
}

impl Default for CpuSampler {
    fn default() -> Self {
        Self::new()
    }
}

/// Busy share of the ticks between two `(idle, total)` readings, in percent.
fn cpu_percent(previous: (u64, u64), current: (u64, u64)) -> f64 {
    // Saturating: the counters only go backwards if something is very wrong
    // (or the host was checkpointed); report idle rather than garbage.
    let total = current.1.saturating_sub(previous.1);
    let idle = current.0.saturating_sub(previous.0);
    if total == 0 {
        return 0.0;
    }
    let busy = total.saturating_sub(idle);
    (busy as f64 / total as f64 * 100.0).clamp(0.0, 100.0)
}

/// `(idle, total)` ticks from the aggregate `cpu ` line of `/proc/stat`.
/// Idle includes iowait: a CPU waiting for I/O is free to run other work.
/// Total is user..steal; guest and guest_nice are left out because the
/// kernel already counts them in user and nice.
pub fn parse_proc_stat(text: &str) -> Result<(u64, u64), SysinfoError> {
    let line = text
        .lines()
        .find(|line| line.starts_with("cpu "))
        .ok_or("/proc/stat has no aggregate \"cpu\" line")?;
    let fields: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .map(|field| {
            field
                .parse()
                .map_err(|_| format!("/proc/stat: invalid cpu field {field:?}"))
        })
        .collect::<Result<_, _>>()?;
    // user nice system idle are there since forever; later fields were added
    // by newer kernels and count as 0 when missing.
    if fields.len() < 4 {
        return Err(SysinfoError::Malformed(format!(
            "/proc/stat: the cpu line has {} fields, expected at least 4",
            fields.len()
        )));
    }
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    let idle = field(3).saturating_add(field(4));
    let total = (0..8).map(field).fold(0u64, u64::saturating_add);
    Ok((idle, total))
}

/// `(used, total)` bytes from `/proc/meminfo`, used = MemTotal -
/// MemAvailable. Kernels older than 3.14 have no MemAvailable; there the
/// classic estimate MemFree + Buffers + Cached stands in for it.
pub fn parse_meminfo(text: &str) -> Result<(u64, u64), SysinfoError> {
    let mut total = None;
    let mut available = None;
    let (mut free, mut buffers, mut cached) = (None, None, None);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key.trim() {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            "MemFree" => &mut free,
            "Buffers" => &mut buffers,
            "Cached" => &mut cached,
            _ => continue,
        };
        *slot = Some(parse_kib(key.trim(), value)?);
    }
    let total = total.ok_or("/proc/meminfo has no MemTotal")?;
    let available = match (available, free) {
        (Some(available), _) => available,
        (None, Some(free)) => free
            .saturating_add(buffers.unwrap_or(0))
            .saturating_add(cached.unwrap_or(0)),
        (None, None) => {
            return Err("/proc/meminfo has neither MemAvailable nor MemFree".into());
        }
    };
    Ok((total.saturating_sub(available), total))
}

/// A meminfo value like `  16314092 kB`, in bytes.
fn parse_kib(key: &str, value: &str) -> Result<u64, SysinfoError> {
    let invalid = || {
        SysinfoError::Malformed(format!(
            "/proc/meminfo: invalid {key} value {:?}",
            value.trim()
        ))
    };
    let mut parts = value.split_ascii_whitespace();
    let number: u64 = parts
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(invalid)?;
    match parts.next() {
        Some("kB") => number.checked_mul(1024).ok_or_else(invalid),
        None => Ok(number),
        Some(_) => Err(invalid()),
    }
}

/// Resident memory (bytes) and total CPU time (user + system, in clock
/// ticks) of one process, from `/proc/<pid>/stat` and `/proc/<pid>/statm`.
/// Used per module process.
pub fn process_usage(pid: u32) -> Result<(u64, u64), SysinfoError> {
    let dir = Path::new("/proc").join(pid.to_string());
    let ticks = parse_pid_stat(&read(dir.join("stat"))?)
        .map_err(|e| SysinfoError::Malformed(format!("/proc/{pid}/stat: {e}")))?;
    let resident = parse_statm(&read(dir.join("statm"))?, page_size())
        .map_err(|e| SysinfoError::Malformed(format!("/proc/{pid}/statm: {e}")))?;
    Ok((resident, ticks))
}

/// A module process's usage between consecutive samples: what canary
/// analysis compares. Keeps the previous sample's process and CPU time; a
/// new process (a swap, a restart) starts over, so one sample never mixes
/// two processes.
#[derive(Clone, Debug, Default)]
pub struct ProcessSampler {
    /// `(pid, CPU ticks, when)` at the previous sample.
    previous: Option<(u32, u64, Instant)>,
}

impl ProcessSampler {
    /// Usage of `pid` since the previous sample of the same process; `None`
    /// on the first sample of a process (there is no interval yet).
    pub fn sample(&mut self, pid: u32, now: Instant) -> Result<Option<ModuleUsage>, SysinfoError> {
        let (resident, ticks) = process_usage(pid)?;
        let usage = match self.previous {
            Some((was, before, at)) if was == pid => process_cpu_percent(
                before,
                ticks,
                now.saturating_duration_since(at),
                clock_ticks(),
            )
            .map(|cpu_percent| ModuleUsage {
                cpu_percent,
                memory_resident_bytes: resident,
            }),
            _ => None,
        };
        self.previous = Some((pid, ticks, now));
        Ok(usage)
    }

    /// The process the previous sample was of.
    pub fn pid(&self) -> Option<u32> {
        self.previous.map(|(pid, _, _)| pid)
    }
}

/// CPU of a process between two readings of its CPU time, in percent of
/// one core; `None` for an empty interval.
fn process_cpu_percent(
    before: u64,
    after: u64,
    elapsed: Duration,
    ticks_per_second: u64,
) -> Option<f64> {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 || ticks_per_second == 0 {
        return None;
    }
    // Saturating: a process's CPU time never goes backwards.
    let busy = after.saturating_sub(before) as f64 / ticks_per_second as f64;
    Some(busy / seconds * 100.0)
}

/// utime + stime (fields 14 and 15) of `/proc/<pid>/stat`. The command name
/// (field 2) is in parentheses and may itself contain spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_pid_stat(text: &str) -> Result<u64, SysinfoError> {
    let (_, after_comm) = text
        .rsplit_once(')')
        .ok_or("no closing parenthesis after the command name")?;
    let fields: Vec<&str> = after_comm.split_ascii_whitespace().collect();
    // fields[0] is field 3 (state), so field n is fields[n - 3].
    let field = |n: usize| -> Result<u64, String> {
        let text = fields
            .get(n - 3)
            .ok_or_else(|| format!("field {n} is missing"))?;
        text.parse()
            .map_err(|_| format!("field {n} is not a number: {text:?}"))
    };
    Ok(field(14)?.saturating_add(field(15)?))
}

/// Resident set size in bytes: field 2 of `/proc/<pid>/statm`, in pages.
fn parse_statm(text: &str, page_size: u64) -> Result<u64, SysinfoError> {
    let pages = text
        .split_ascii_whitespace()
        .nth(1)
        .ok_or("the resident field is missing")?;
    let pages: u64 = pages
        .parse()
        .map_err(|_| format!("the resident field is not a number: {pages:?}"))?;
    Ok(pages.saturating_mul(page_size))
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    // -1 (error) cannot happen for _SC_PAGESIZE on Linux; 4 KiB is the
    // right answer nearly everywhere if it somehow does.
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat` CPU times.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // 100 is what Linux reports on every architecture it runs on.
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

fn read(path: impl AsRef<Path>) -> Result<String, SysinfoError> {
    let path = path.as_ref();
    std::fs::read_to_string(path).map_err(|source| SysinfoError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Why a `/proc` reading failed; the next sample tries again.
#[derive(Debug, thiserror::Error)]
pub enum SysinfoError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The file does not read as its kernel documentation says.
    #[error("{0}")]
    Malformed(String),
}

impl From<String> for SysinfoError {
    fn from(reason: String) -> Self {
        SysinfoError::Malformed(reason)
    }
}

impl From<&str> for SysinfoError {
    fn from(reason: &str) -> Self {
        SysinfoError::Malformed(reason.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_STAT: &str = "\
cpu  10132153 290696 3084719 46828483 16683 0 25195 0 175628 0
cpu0 1393280 32966 572056 13343292 6130 0 17875 0 23933 0
cpu1 1335353 32990 526024 13390226 3372 0 3862 0 21453 0
intr 1462898 0 0 0
ctxt 4096
btime 1700000000
processes 86031
procs_running 2
";

    #[test]
    fn proc_stat_aggregate_line() {
        let (idle, total) = parse_proc_stat(PROC_STAT).unwrap();
        assert_eq!(idle, 46828483 + 16683);
        assert_eq!(
            total,
            10132153 + 290696 + 3084719 + 46828483 + 16683 + 25195,
            "guest time is already in user"
        );
    }

    #[test]
    fn proc_stat_old_kernel_and_errors() {
        // Four fields only (2.4-era kernels).
        assert_eq!(parse_proc_stat("cpu 1 2 3 4\n").unwrap(), (4, 10));
        assert!(
            parse_proc_stat("cpu0 1 2 3 4\n")
                .unwrap_err()
                .to_string()
                .contains("no aggregate")
        );
        assert!(
            parse_proc_stat("cpu 1 2 x 4\n")
                .unwrap_err()
                .to_string()
                .contains("invalid cpu field \"x\"")
        );
        assert!(
            parse_proc_stat("cpu 1 2 3\n")
                .unwrap_err()
                .to_string()
                .contains("expected at least 4")
        );
    }

    #[test]
    fn cpu_percent_between_samples() {
        assert_eq!(cpu_percent((100, 200), (150, 300)), 50.0);
        assert_eq!(cpu_percent((100, 200), (200, 300)), 0.0);
        assert_eq!(cpu_percent((100, 200), (100, 300)), 100.0);
        // No ticks passed, or counters went backwards.
        assert_eq!(cpu_percent((100, 200), (100, 200)), 0.0);
        assert_eq!(cpu_percent((100, 200), (50, 100)), 0.0);
    }

    const MEMINFO: &str = "\
MemTotal:       16314092 kB
MemFree:         1200000 kB
MemAvailable:    8000000 kB
Buffers:          300000 kB
Cached:          5000000 kB
SwapCached:            0 kB
HugePages_Total:       0
";

    #[test]
    fn meminfo_used_and_total() {
        let (used, total) = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(total, 16314092 * 1024);
        assert_eq!(used, (16314092 - 8000000) * 1024);
    }

    #[test]
    fn meminfo_without_memavailable() {
        let text = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 250 kB\n";
        assert_eq!(parse_meminfo(text).unwrap(), (600 * 1024, 1000 * 1024));
    }

    #[test]
    fn meminfo_errors() {
        assert!(
            parse_meminfo("MemFree: 1 kB\n")
                .unwrap_err()
                .to_string()
                .contains("no MemTotal")
        );
        assert!(
            parse_meminfo("MemTotal: 1 kB\n")
                .unwrap_err()
                .to_string()
                .contains("neither MemAvailable nor MemFree")
        );
        assert!(
            parse_meminfo("MemTotal: lots kB\nMemAvailable: 1 kB\n")
                .unwrap_err()
                .to_string()
                .contains("invalid MemTotal value \"lots kB\"")
        );
    }

    #[test]
    fn pid_stat_with_tricky_command_name() {
        let text = "1234 (my (weird) proc) S 1 1234 1234 0 -1 4194560 1000 0 0 0 250 75 3 4 20 0 1 0 100 123456 789 18446744073709551615\n";
        assert_eq!(parse_pid_stat(text).unwrap(), 325);
        assert!(
            parse_pid_stat("1234 (x) S 1 2 3\n")
                .unwrap_err()
                .to_string()
                .contains("field 14 is missing")
        );
        assert!(
            parse_pid_stat("1234 no parens")
                .unwrap_err()
                .to_string()
                .contains("no closing parenthesis")
        );
    }

    #[test]
    fn statm_resident_pages() {
        assert_eq!(
            parse_statm("5000 1200 300 10 0 900 0\n", 4096).unwrap(),
            1200 * 4096
        );
        assert!(parse_statm("5000\n", 4096).is_err());
        assert!(parse_statm("5000 x\n", 4096).is_err());
    }

    #[test]
    fn live_proc() {
        let mut sampler = CpuSampler::new();
        // Burn a little CPU so the interval is not empty.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let usage = sampler.sample().unwrap();
        assert!((0.0..=100.0).contains(&usage.cpu_percent), "{usage:?}");
        assert!(usage.memory_total_bytes > 0);
        assert!(usage.memory_used_bytes <= usage.memory_total_bytes);
        let again = sampler.sample().unwrap();
        assert!((0.0..=100.0).contains(&again.cpu_percent), "{again:?}");

        let (resident, ticks) = process_usage(std::process::id()).unwrap();
        assert!(resident > 0);
        // The test binary has run for a while, but may be under one tick.
        let _ = ticks;

        let err = process_usage(u32::MAX).unwrap_err().to_string();
        assert!(err.contains("/proc/4294967295/stat"), "{err}");
    }

    #[test]
    fn process_cpu_in_percent_of_one_core() {
        let second = Duration::from_secs(1);
        assert_eq!(process_cpu_percent(0, 100, second, 100), Some(100.0));
        assert_eq!(process_cpu_percent(10, 60, 2 * second, 100), Some(25.0));
        // Two cores busy for the whole interval.
        assert_eq!(process_cpu_percent(0, 400, 2 * second, 100), Some(200.0));
        assert_eq!(process_cpu_percent(7, 7, second, 100), Some(0.0));
        assert_eq!(
            process_cpu_percent(9, 7, second, 100),
            Some(0.0),
            "backwards reads as idle"
        );
        assert_eq!(process_cpu_percent(0, 5, Duration::ZERO, 100), None);
        assert_eq!(process_cpu_percent(0, 5, second, 0), None);
    }

    /// A busy process reads busier than a sleeping one over the same
    /// interval, and a sample of another process starts over.
    #[test]
    fn live_process_samples() {
        let spawn = |script: &str| {
            std::process::Command::new("sh")
                .args(["-c", script])
                .spawn()
                .expect("sh")
        };
        let mut busy = spawn("while :; do :; done");
        let mut idle = spawn("exec sleep 60");
        let (mut busy_sampler, mut idle_sampler) =
            (ProcessSampler::default(), ProcessSampler::default());
        let start = Instant::now();
        assert_eq!(
            busy_sampler.sample(busy.id(), start).unwrap(),
            None,
            "first sample"
        );
        assert_eq!(
            idle_sampler.sample(idle.id(), start).unwrap(),
            None,
            "first sample"
        );
        // Long enough for many clock ticks of a busy loop, even on a loaded host.
        std::thread::sleep(Duration::from_millis(1500));
        let now = Instant::now();
        let hot = busy_sampler
            .sample(busy.id(), now)
            .unwrap()
            .expect("second sample");
        let cold = idle_sampler
            .sample(idle.id(), now)
            .unwrap()
            .expect("second sample");
        assert!(hot.cpu_percent > cold.cpu_percent, "{hot:?} vs {cold:?}");
        assert!(cold.cpu_percent < 5.0, "{cold:?}");
        assert!(hot.memory_resident_bytes > 0 && cold.memory_resident_bytes > 0);
        // The same sampler on another process: no interval yet.
        assert_eq!(busy_sampler.sample(idle.id(), now).unwrap(), None);
        assert_eq!(busy_sampler.pid(), Some(idle.id()));
        for child in [&mut busy, &mut idle] {
            child.kill().ok();
            child.wait().ok();
        }
    }
}
