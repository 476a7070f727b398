//! Parsing `module.toml` into a validated [`Manifest`]: the TOML is walked
//! by hand as a `toml::Table` instead of deserialized with serde, so that
//! every error names the full dotted key (`process.sockets[1].listen`) and
//! the first error is deterministic.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use toml::{Table, Value};

use super::types::{
    BundleSpec, HealthCheck, HealthSpec, Manifest, ManifestError, MetricsSpec, ProcessSpec,
    Runtime, SIGNALS, SocketSpec, StopSignal, SwapStrategy, WasmSpec,
};
use super::vars;
use crate::timefmt::parse_duration;

const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_HEALTHY_THRESHOLD: u32 = 1;
const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_REQUESTS_TOTAL: &str = "http_requests_total";
const DEFAULT_ERRORS_TOTAL: &str = "http_errors_total";
const DEFAULT_LATENCY_SECONDS: &str = "http_request_duration_seconds";

/// Upper bound for stop and start timeouts: longer waits stall a rollout
/// across the fleet and almost always mean a typo (`10h` for `10s`).
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
const THRESHOLDS: std::ops::RangeInclusive<i64> = 1..=100;
/// Each socket is an fd the agent keeps open across swaps; bound the count.
const MAX_SOCKETS: usize = 16;
/// Set by the agent for socket activation; a module must not override them.
const RESERVED_ENV: [&str; 3] = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];
const RESERVED_ENV_PREFIX: &str = "HOTSWAP_";
const DEFAULT_WASM_MAX_MEMORY: u64 = 64 << 20;
/// A 32-bit linear memory holds at most 4 GiB; one page is 64 KiB.
const WASM_MEMORY: std::ops::RangeInclusive<u64> = (64 << 10)..=(4 << 30);
const DEFAULT_WASM_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_WASM_CONCURRENCY: u32 = 1000;
/// Each request in flight holds an instance slot of the pooling allocator.
const WASM_CONCURRENCY: std::ops::RangeInclusive<i64> = 1..=10_000;

/// Parse a byte size: a whole number of bytes, or one with a unit (`64MiB`,
/// `512 KiB`, `1GiB`, `10MB`; `B`, `KiB`/`MiB`/`GiB`, `KB`/`MB`/`GB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let number: u64 = digits.parse().map_err(|_| {
        format!("invalid size {text:?}: expected a number with a unit such as 64MiB")
    })?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB or GB)"
            ));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// A byte size in the largest binary unit that divides it (`64MiB`).
pub fn format_size(bytes: u64) -> String {
    for (unit, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= factor && bytes.is_multiple_of(factor) {
            return format!("{}{unit}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

/// Parse and validate manifest text. `file` is only used in error messages
/// (e.g. `"hello/module.toml"`).
pub fn parse_manifest(file: &str, text: &str) -> Result<Manifest, ManifestError> {
    let table: Table = text
        .parse()
        .map_err(|e: toml::de::Error| error(file, "-", syntax_reason(text, &e)))?;
    let root = Section {
        file,
        path: String::new(),
        table: &table,
    };
    parse_root(&root)
}

/// Read and parse a manifest file; an unreadable file is an error naming it.
pub fn load_manifest(path: &Path) -> Result<Manifest, ManifestError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| error(&file, "-", format!("cannot read manifest: {e}")))?;
    parse_manifest(&file, &text)
}

fn error(file: &str, key: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError {
        file: file.to_string(),
        key: key.into(),
        reason: reason.into(),
    }
}

/// One-line reason for a TOML syntax error, with the position when known.
fn syntax_reason(text: &str, e: &toml::de::Error) -> String {
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
        .trim_end_matches('.')
        .to_string();
    let before = e.span().and_then(|span| text.get(..span.start));
    match before {
        Some(before) => {
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("invalid TOML at line {line}, column {column}: {message}")
        }
        None => format!("invalid TOML: {message}"),
    }
}

/// Dotted path of `key` under `parent`; keys that are not bare TOML keys are
/// quoted so the path stays unambiguous.
fn join(parent: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let segment = if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if parent.is_empty() {
        segment
    } else {
        format!("{parent}.{segment}")
    }
}

/// Name of a TOML type for "expected ..., found ..." messages.
fn found(value: &Value) -> &'static str {
    value.type_str()
}

/// Whether `s` is one `first` character followed by `min_rest..=max_rest`
/// `rest` characters (a hand-rolled `^[first][rest]{min,max}$`).
fn shaped(
    s: &str,
    first: fn(char) -> bool,
    rest: fn(char) -> bool,
    min_rest: usize,
    max_rest: usize,
) -> bool {
    let mut chars = s.chars();
    let Some(head) = chars.next() else {
        return false;
    };
    let tail = chars.as_str();
    first(head) && (min_rest..=max_rest).contains(&tail.len()) && tail.chars().all(rest)
}

fn lower_or_digit(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A module name as manifests allow it (see [`crate::ids::ModuleName`]).
pub fn valid_module_name(s: &str) -> bool {
    crate::ids::is_module_name(s)
}

fn valid_socket_name(s: &str) -> bool {
    shaped(
        s,
        lower_or_digit,
        |c| lower_or_digit(c) || c == '-' || c == '_',
        0,
        31,
    )
}

fn valid_env_name(s: &str) -> bool {
    shaped(
        s,
        |c| c.is_ascii_alphabetic() || c == '_',
        |c| c.is_ascii_alphanumeric() || c == '_',
        0,
        usize::MAX,
    )
}

fn valid_metric_name(s: &str) -> bool {
    shaped(
        s,
        |c| c.is_ascii_alphabetic() || c == '_' || c == ':',
        |c| c.is_ascii_alphanumeric() || c == '_' || c == ':',
        0,
        usize::MAX,
    )
}

fn check_url(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    match rest {
        Some(rest) if !rest.is_empty() => Ok(()),
        _ => Err(format!("expected an http:// or https:// URL, found {s:?}")),
    }
}

fn check_host_port(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("expected host:port, found {s:?}"));
    };
    if host.is_empty() {
        return Err(format!("host must not be empty in {s:?}"));
    }
    // Without brackets "::1:80" is ambiguous; require the URL form "[::1]:80".
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!(
            "IPv6 host must be in brackets (e.g. [::1]:8080) in {s:?}"
        ));
    }
    let port_ok = !port.is_empty()
        && port.chars().all(|c| c.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p != 0);
    if !port_ok {
        return Err(format!(
            "port must be a number from 1 to 65535, found {port:?} in {s:?}"
        ));
    }
    Ok(())
}

/// A table of the manifest and its dotted path ("" for the root).
struct Section<'a> {
    file: &'a str,
    path: String,
    table: &'a Table,
}

impl<'a> Section<'a> {
    /// Full path of `key` in this table; `""` names the table itself.
    fn key(&self, key: &str) -> String {
        if key.is_empty() {
            self.path.clone()
        } else {
            join(&self.path, key)
        }
    }

    fn error(&self, key: &str, reason: impl Into<String>) -> ManifestError {
        error(self.file, self.key(key), reason)
    }

    fn deny_unknown(&self, allowed: &[&str]) -> Result<(), ManifestError> {
        match self.table.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(key) => Err(self.error(
                key,
                format!("unknown key (allowed: {})", allowed.join(", ")),
            )),
            None => Ok(()),
        }
    }

    fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    fn missing(&self, key: &str) -> ManifestError {
        self.error(key, "missing required key")
    }

    fn table(&self, key: &str) -> Result<Option<Section<'a>>, ManifestError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(Value::Table(table)) => Ok(Some(Section {
                file: self.file,
                path: self.key(key),
                table,
            })),
            Some(other) => {
                Err(self.error(key, format!("expected a table, found {}", found(other))))
            }
        }
    }

    /// A string value, type-checked but otherwise raw.
    fn string(&self, key: &str) -> Result<Option<&'a str>, ManifestError> {
        self.table
            .get(key)
            .map(|v| as_str(self.file, &self.key(key), v))
            .transpose()
    }

    fn required_string(&self, key: &str) -> Result<&'a str, ManifestError> {
        self.string(key)?.ok_or_else(|| self.missing(key))
    }

    /// A free-form string that may contain variables; checks their syntax.
    fn text(&self, key: &str) -> Result<Option<&'a str>, ManifestError> {
        let value = self.string(key)?;
        if let Some(value) = value {
            check_vars(self.file, &self.key(key), value)?;
        }
        Ok(value)
    }

    fn url(&self, key: &str) -> Result<Option<&'a str>, ManifestError> {
        let value = self.text(key)?;
        if let Some(value) = value {
            check_url(value).map_err(|r| self.error(key, r))?;
        }
        Ok(value)
    }

    /// A command line whose program stays inside the module dir (see
    /// [`check_program_inside`]); used for `process.command`, the bundle
    /// hooks and health `exec` alike, as SPEC §3 says of every command.
    fn command(&self, key: &str) -> Result<Option<Vec<String>>, ManifestError> {
        let Some(value) = self.table.get(key) else {
            return Ok(None);
        };
        let full_key = self.key(key);
        let line = command(self.file, &full_key, value)?;
        if let Some(program) = line.first() {
            check_program_inside(self.file, &full_key, program)?;
        }
        Ok(Some(line))
    }

    fn duration(
        &self,
        key: &str,
        default: Duration,
        max: Option<Duration>,
    ) -> Result<Duration, ManifestError> {
        let Some(text) = self.string(key)? else {
            return Ok(default);
        };
        let value = parse_duration(text).map_err(|r| self.error(key, r))?;
        if value.is_zero() {
            return Err(self.error(key, "must be greater than zero"));
        }
        if let Some(max) = max
            && value > max
        {
            return Err(self.error(
                key,
                format!(
                    "must be at most {}, found {}",
                    humantime::format_duration(max),
                    humantime::format_duration(value)
                ),
            ));
        }
        Ok(value)
    }

    fn threshold(&self, key: &str, default: u32) -> Result<u32, ManifestError> {
        let value = match self.table.get(key) {
            None => return Ok(default),
            Some(Value::Integer(n)) => *n,
            Some(other) => {
                return Err(self.error(key, format!("expected an integer, found {}", found(other))));
            }
        };
        if !THRESHOLDS.contains(&value) {
            return Err(self.error(
                key,
                format!(
                    "must be between {} and {}, found {value}",
                    THRESHOLDS.start(),
                    THRESHOLDS.end()
                ),
            ));
        }
        u32::try_from(value).map_err(|_| self.error(key, format!("out of range: {value}")))
    }

    fn metric_name(&self, key: &str, default: &str) -> Result<String, ManifestError> {
        let Some(name) = self.string(key)? else {
            return Ok(default.to_string());
        };
        if !valid_metric_name(name) {
            return Err(self.error(
                key,
                format!("invalid metric name {name:?}: must match [a-zA-Z_:][a-zA-Z0-9_:]*"),
            ));
        }
        Ok(name.to_string())
    }
}

fn as_str<'v>(file: &str, key: &str, value: &'v Value) -> Result<&'v str, ManifestError> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(error(
            file,
            key,
            format!("expected a string, found {}", found(other)),
        )),
    }
}

fn check_vars(file: &str, key: &str, value: &str) -> Result<(), ManifestError> {
    vars::check_syntax(value).map_err(|r| error(file, key, r))
}

/// A non-empty array of non-empty strings (a command line).
fn command(file: &str, key: &str, value: &Value) -> Result<Vec<String>, ManifestError> {
    let Value::Array(items) = value else {
        return Err(error(
            file,
            key,
            format!("expected an array of strings, found {}", found(value)),
        ));
    };
    if items.is_empty() {
        return Err(error(file, key, "must not be empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let item_key = format!("{key}[{i}]");
            let s = as_str(file, &item_key, item)?;
            if s.is_empty() {
                return Err(error(file, &item_key, "must not be empty"));
            }
            check_vars(file, &item_key, s)?;
            Ok(s.to_string())
        })
        .collect()
}

/// Relative programs resolve inside the module dir (the agent joins them
/// to it); a ".." component would let a module run files it does not ship,
/// so it is refused for every command of the manifest. Absolute paths
/// (system interpreters) are allowed on purpose, and arguments are the
/// program's business.
fn check_program_inside(file: &str, key: &str, program: &str) -> Result<(), ManifestError> {
    if !program.starts_with('/') && program.split('/').any(|part| part == "..") {
        return Err(error(
            file,
            key,
            format!(
                "relative program path {program:?} has a \"..\" component; it must not \
                 leave the module dir"
            ),
        ));
    }
    Ok(())
}

fn parse_root(root: &Section<'_>) -> Result<Manifest, ManifestError> {
    root.deny_unknown(&[
        "name",
        "version",
        "runtime",
        "description",
        "process",
        "bundle",
        "wasm",
        "health",
        "metrics",
    ])?;

    let name = root.required_string("name")?;
    if !valid_module_name(name) {
        return Err(root.error(
            "name",
            format!(
                "invalid module name {name:?}: must be 2 to 63 characters of lowercase \
                 letters, digits and '-', starting with a letter or digit"
            ),
        ));
    }

    let version_text = root.required_string("version")?;
    let version = semver::Version::parse(version_text).map_err(|e| {
        root.error(
            "version",
            format!(
                "invalid semver version {version_text:?}: {}",
                e.to_string().trim_end_matches('.')
            ),
        )
    })?;

    let runtime = match root.required_string("runtime")? {
        "process" => Runtime::Process,
        "bundle" => Runtime::Bundle,
        "wasm" => Runtime::Wasm,
        other => {
            return Err(root.error(
                "runtime",
                format!("expected \"process\", \"bundle\" or \"wasm\", found {other:?}"),
            ));
        }
    };

    let description = root.text("description")?.map(str::to_string);

    let not_allowed = |key: &str| {
        root.error(
            key,
            format!("section not allowed with runtime = \"{runtime}\""),
        )
    };
    // Only the runtime's own section may be there.
    let others: &[&str] = match runtime {
        Runtime::Process => &["bundle", "wasm"],
        Runtime::Bundle => &["process", "wasm"],
        Runtime::Wasm => &["process", "bundle"],
    };
    let required = |key: &str| {
        root.error(
            key,
            format!("missing section required by runtime = \"{runtime}\""),
        )
    };
    let (mut process, mut bundle, mut wasm) = (None, None, None);
    match runtime {
        Runtime::Process => {
            let section = root.table("process")?.ok_or_else(|| required("process"))?;
            process = Some(parse_process(&section)?);
        }
        Runtime::Bundle => {
            if let Some(other) = others.iter().find(|k| root.has(k)) {
                return Err(not_allowed(other));
            }
            bundle = Some(match root.table("bundle")? {
                Some(section) => parse_bundle(&section)?,
                None => BundleSpec::default(),
            });
        }
        Runtime::Wasm => {
            let section = root.table("wasm")?.ok_or_else(|| required("wasm"))?;
            wasm = Some(parse_wasm(&section)?);
        }
    }
    if let Some(other) = others.iter().find(|k| root.has(k)) {
        return Err(not_allowed(other));
    }

    let health = root
        .table("health")?
        .map(|s| parse_health(&s))
        .transpose()?;
    let metrics = root
        .table("metrics")?
        .map(|s| parse_metrics(&s))
        .transpose()?;

    Ok(Manifest {
        name: name.to_string(),
        version,
        runtime,
        description,
        process,
        bundle,
        wasm,
        health,
        metrics,
    })
}

fn parse_process(s: &Section<'_>) -> Result<ProcessSpec, ManifestError> {
    s.deny_unknown(&[
        "command",
        "env",
        "swap",
        "stop_signal",
        "stop_timeout",
        "sockets",
    ])?;

    let command = s.command("command")?.ok_or_else(|| s.missing("command"))?;

    let env = parse_env(s)?;

    let swap = match s.string("swap")? {
        None | Some("start-first") => SwapStrategy::StartFirst,
        Some("stop-first") => SwapStrategy::StopFirst,
        Some(other) => {
            return Err(s.error(
                "swap",
                format!("expected \"start-first\" or \"stop-first\", found {other:?}"),
            ));
        }
    };

    let stop_signal = match s.string("stop_signal")? {
        None => StopSignal::TERM,
        Some(text) => StopSignal::parse(text).ok_or_else(|| {
            let names: Vec<&str> = SIGNALS.iter().map(|s| s.name).collect();
            s.error(
                "stop_signal",
                format!(
                    "unsupported signal {text:?}; expected one of {}",
                    names.join(", ")
                ),
            )
        })?,
    };

    let stop_timeout = s.duration("stop_timeout", DEFAULT_STOP_TIMEOUT, Some(MAX_TIMEOUT))?;
    let sockets = parse_sockets(s)?;

    Ok(ProcessSpec {
        command,
        env,
        swap,
        stop_signal,
        stop_timeout,
        sockets,
    })
}

/// An `env` table: variable names checked, reserved ones refused.
fn parse_env(s: &Section<'_>) -> Result<BTreeMap<String, String>, ManifestError> {
    let mut env = BTreeMap::new();
    if let Some(section) = s.table("env")? {
        for (name, value) in section.table {
            if !valid_env_name(name) {
                return Err(section.error(
                    name,
                    format!("invalid environment variable name {name:?}: must match [A-Za-z_][A-Za-z0-9_]*"),
                ));
            }
            if name.starts_with(RESERVED_ENV_PREFIX) || RESERVED_ENV.contains(&name.as_str()) {
                return Err(section.error(
                    name,
                    format!(
                        "environment variable {name} is reserved: the agent sets it \
                         (reserved: {RESERVED_ENV_PREFIX}*, {})",
                        RESERVED_ENV.join(", ")
                    ),
                ));
            }
            let key = section.key(name);
            let value = as_str(s.file, &key, value)?;
            check_vars(s.file, &key, value)?;
            env.insert(name.clone(), value.to_string());
        }
    }
    Ok(env)
}

/// The `[wasm]` section (SPEC §10).
fn parse_wasm(s: &Section<'_>) -> Result<WasmSpec, ManifestError> {
    s.deny_unknown(&[
        "component",
        "max_memory",
        "request_timeout",
        "max_concurrent_requests",
        "env",
        "sockets",
    ])?;
    let component = s.required_string("component")?.to_string();
    if component.is_empty()
        || component.starts_with('/')
        || component.split('/').any(|part| part == "..")
    {
        return Err(s.error(
            "component",
            format!(
                "component path {component:?} must be relative to the module dir and stay \
                 inside it (no leading '/', no \"..\")"
            ),
        ));
    }
    let max_memory = match s.string("max_memory")? {
        None => DEFAULT_WASM_MAX_MEMORY,
        Some(text) => {
            let bytes = parse_size(text).map_err(|r| s.error("max_memory", r))?;
            if !WASM_MEMORY.contains(&bytes) {
                return Err(s.error(
                    "max_memory",
                    format!(
                        "must be between {} (one page) and {} (a 32-bit memory), found {text}",
                        format_size(*WASM_MEMORY.start()),
                        format_size(*WASM_MEMORY.end())
                    ),
                ));
            }
            bytes
        }
    };
    let request_timeout = s.duration(
        "request_timeout",
        DEFAULT_WASM_REQUEST_TIMEOUT,
        Some(MAX_TIMEOUT),
    )?;
    let max_concurrent_requests = match s.table.get("max_concurrent_requests") {
        None => DEFAULT_WASM_CONCURRENCY,
        Some(Value::Integer(n)) if WASM_CONCURRENCY.contains(n) => {
            u32::try_from(*n).unwrap_or(DEFAULT_WASM_CONCURRENCY)
        }
        Some(Value::Integer(n)) => {
            return Err(s.error(
                "max_concurrent_requests",
                format!(
                    "must be between {} and {}, found {n}",
                    WASM_CONCURRENCY.start(),
                    WASM_CONCURRENCY.end()
                ),
            ));
        }
        Some(other) => {
            return Err(s.error(
                "max_concurrent_requests",
                format!("expected an integer, found {}", found(other)),
            ));
        }
    };
    let env = parse_env(s)?;
    let sockets = parse_sockets(s)?;
    if sockets.is_empty() {
        return Err(s.error(
            "sockets",
            "a wasm module needs at least one [[wasm.sockets]] entry: the agent serves the \
             component's HTTP on them",
        ));
    }
    Ok(WasmSpec {
        component,
        max_memory,
        request_timeout,
        max_concurrent_requests,
        env,
        sockets,
    })
}

fn parse_sockets(s: &Section<'_>) -> Result<Vec<SocketSpec>, ManifestError> {
    let items = match s.table.get("sockets") {
        None => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(s.error(
                "sockets",
                format!("expected an array of tables, found {}", found(other)),
            ));
        }
    };
    if items.len() > MAX_SOCKETS {
        return Err(s.error(
            "sockets",
            format!(
                "at most {MAX_SOCKETS} sockets are allowed, found {}",
                items.len()
            ),
        ));
    }
    let mut sockets: Vec<SocketSpec> = Vec::with_capacity(items.len());
    let mut names = BTreeSet::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("{}[{i}]", s.key("sockets"));
        let Value::Table(table) = item else {
            return Err(error(
                s.file,
                path,
                format!("expected a table, found {}", found(item)),
            ));
        };
        let entry = Section {
            file: s.file,
            path,
            table,
        };
        entry.deny_unknown(&["name", "listen"])?;

        let name = entry.required_string("name")?;
        if !valid_socket_name(name) {
            return Err(entry.error(
                "name",
                format!(
                    "invalid socket name {name:?}: must be 1 to 32 characters of lowercase \
                     letters, digits, '-' and '_', starting with a letter or digit"
                ),
            ));
        }
        if !names.insert(name) {
            return Err(entry.error("name", format!("duplicate socket name {name:?}")));
        }

        let listen_text = entry.required_string("listen")?;
        if listen_text.contains("${") {
            // Node-specific (e.g. `127.0.0.1:${NODE_LABEL_port}`): only the
            // variables are checked here; the agent parses the expanded value.
            check_vars(entry.file, &join(&entry.path, "listen"), listen_text)?;
            if sockets.iter().any(|o: &SocketSpec| o.listen == listen_text) {
                return Err(
                    entry.error("listen", format!("duplicate listen address {listen_text}"))
                );
            }
        } else {
            let listen: SocketAddr = listen_text.parse().map_err(|e| {
                entry.error(
                    "listen",
                    format!(
                        "invalid socket address {listen_text:?}: {e}; expected ip:port such as \
                         127.0.0.1:8080 or [::1]:8080"
                    ),
                )
            })?;
            if let Some(other) = sockets.iter().find(|o| o.literal_addr() == Some(listen)) {
                return Err(entry.error(
                    "listen",
                    format!(
                        "duplicate listen address {listen} (also used by socket {:?})",
                        other.name
                    ),
                ));
            }
        }
        let listen = listen_text.to_string();
        sockets.push(SocketSpec {
            name: name.to_string(),
            listen,
        });
    }
    Ok(sockets)
}

fn parse_bundle(s: &Section<'_>) -> Result<BundleSpec, ManifestError> {
    s.deny_unknown(&["activate", "deactivate"])?;
    Ok(BundleSpec {
        activate: s.command("activate")?,
        deactivate: s.command("deactivate")?,
    })
}

fn parse_health(s: &Section<'_>) -> Result<HealthSpec, ManifestError> {
    s.deny_unknown(&[
        "http",
        "tcp",
        "exec",
        "interval",
        "timeout",
        "healthy_threshold",
        "unhealthy_threshold",
        "start_timeout",
    ])?;

    let kinds: Vec<&str> = ["http", "tcp", "exec"]
        .into_iter()
        .filter(|k| s.has(k))
        .collect();
    // The getters below return `Some` because `kinds` only lists present
    // keys; the defaults are never used.
    let check = match kinds.as_slice() {
        [] => return Err(s.error("", "one of http, tcp or exec is required")),
        ["http"] => HealthCheck::Http(s.url("http")?.unwrap_or_default().to_string()),
        ["tcp"] => {
            let target = s.text("tcp")?.unwrap_or_default();
            check_host_port(target).map_err(|r| s.error("tcp", r))?;
            HealthCheck::Tcp(target.to_string())
        }
        ["exec"] => HealthCheck::Exec(s.command("exec")?.unwrap_or_default()),
        _ => {
            return Err(s.error(
                "",
                format!(
                    "only one of http, tcp or exec may be set, found {}",
                    kinds.join(" and ")
                ),
            ));
        }
    };

    let interval = s.duration("interval", DEFAULT_INTERVAL, None)?;
    // A timeout longer than the interval is valid, as in Docker and
    // Kubernetes: probes never overlap, the next one starts when the last
    // ended (see `node_agent::health`).
    let timeout = s.duration("timeout", DEFAULT_TIMEOUT, Some(MAX_TIMEOUT))?;
    let healthy_threshold = s.threshold("healthy_threshold", DEFAULT_HEALTHY_THRESHOLD)?;
    let unhealthy_threshold = s.threshold("unhealthy_threshold", DEFAULT_UNHEALTHY_THRESHOLD)?;
    let start_timeout = s.duration("start_timeout", DEFAULT_START_TIMEOUT, Some(MAX_TIMEOUT))?;

    Ok(HealthSpec {
        check,
        interval,
        timeout,
        healthy_threshold,
        unhealthy_threshold,
        start_timeout,
    })
}

fn parse_metrics(s: &Section<'_>) -> Result<MetricsSpec, ManifestError> {
    s.deny_unknown(&[
        "prometheus",
        "requests_total",
        "errors_total",
        "latency_seconds",
    ])?;
    let prometheus = s
        .url("prometheus")?
        .ok_or_else(|| s.missing("prometheus"))?;
    Ok(MetricsSpec {
        prometheus: prometheus.to_string(),
        requests_total: s.metric_name("requests_total", DEFAULT_REQUESTS_TOTAL)?,
        errors_total: s.metric_name("errors_total", DEFAULT_ERRORS_TOTAL)?,
        latency_seconds: s.metric_name("latency_seconds", DEFAULT_LATENCY_SECONDS)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::types::MANIFEST_FILE;
    use proptest::prelude::*;

    const HEAD_P: &str = "name = \"hello\"\nversion = \"1.2.0\"\nruntime = \"process\"\n";
    const HEAD_B: &str = "name = \"hello\"\nversion = \"1.2.0\"\nruntime = \"bundle\"\n";

    /// A process manifest with a minimal `[process]`; `body` continues that
    /// table and may open further sections.
    fn p(body: &str) -> String {
        format!("{HEAD_P}[process]\ncommand = [\"bin/hello\"]\n{body}")
    }

    /// A process manifest whose `[process]` table is entirely `body`.
    fn praw(body: &str) -> String {
        format!("{HEAD_P}[process]\n{body}")
    }

    /// A bundle manifest followed by `body`.
    fn b(body: &str) -> String {
        format!("{HEAD_B}{body}")
    }

    type Expected<'a> = Result<fn(&Manifest) -> bool, (&'a str, &'a str)>;

    fn check(text: &str, expected: Expected<'_>) {
        let got = parse_manifest("hello/module.toml", text);
        match (expected, got) {
            (Ok(predicate), Ok(manifest)) => {
                assert!(
                    predicate(&manifest),
                    "predicate failed for {text:?}: {manifest:#?}"
                )
            }
            (Ok(_), Err(e)) => panic!("expected success for {text:?}, got error: {e}"),
            (Err((key, fragment)), Ok(m)) => {
                panic!("expected error {key}: {fragment} for {text:?}, got {m:#?}")
            }
            (Err((key, fragment)), Err(e)) => {
                assert_eq!(e.file, "hello/module.toml");
                assert_eq!(e.key, key, "wrong key for {text:?}: {e}");
                assert!(
                    e.reason.contains(fragment),
                    "reason for {text:?} lacks {fragment:?}: {e}"
                );
                assert!(!e.reason.contains('\n'), "multi-line reason: {e:?}");
                assert!(!e.reason.ends_with('.'), "trailing period: {e:?}");
            }
        }
    }

    const FULL_PROCESS: &str = r#"
name = "hello"
version = "1.2.0-rc.1+build.5"
runtime = "process"
description = "says hello on ${NODE_NAME}"

[process]
command = ["bin/hello", "--flag", "--dir=${MODULE_DIR}/data"]
env = { GREETING = "hi", ZONE = "${NODE_LABEL_zone}", _x1 = "" }
swap = "stop-first"
stop_signal = "QUIT"
stop_timeout = "2m 30s"
[[process.sockets]]
name = "http"
listen = "127.0.0.1:8080"
[[process.sockets]]
name = "admin_2"
listen = "[::1]:9090"

[health]
http = "http://127.0.0.1:8080/healthz?node=${NODE_NAME}"
interval = "2s"
timeout = "500ms"
healthy_threshold = 2
unhealthy_threshold = 5
start_timeout = "1h"

[metrics]
prometheus = "https://127.0.0.1:8080/metrics"
requests_total = "app_requests_total"
errors_total = "app:errors_total"
latency_seconds = "_latency"
"#;

    const FULL_BUNDLE: &str = r#"
name = "static-site"
version = "0.1.0"
runtime = "bundle"

[bundle]
activate = ["bin/reload.sh", "${MODULE_DIR}"]
deactivate = ["bin/stop.sh"]

[health]
exec = ["bin/check.sh", "--quick"]
"#;

    #[test]
    fn full_process_manifest() {
        let m = parse_manifest("m", FULL_PROCESS).expect("valid");
        let expected = Manifest {
            name: "hello".into(),
            version: semver::Version::parse("1.2.0-rc.1+build.5").expect("semver"),
            runtime: Runtime::Process,
            description: Some("says hello on ${NODE_NAME}".into()),
            process: Some(ProcessSpec {
                command: vec![
                    "bin/hello".into(),
                    "--flag".into(),
                    "--dir=${MODULE_DIR}/data".into(),
                ],
                env: BTreeMap::from([
                    ("GREETING".to_string(), "hi".to_string()),
                    ("ZONE".to_string(), "${NODE_LABEL_zone}".to_string()),
                    ("_x1".to_string(), String::new()),
                ]),
                swap: SwapStrategy::StopFirst,
                stop_signal: StopSignal {
                    name: "SIGQUIT",
                    number: 3,
                },
                stop_timeout: Duration::from_secs(150),
                sockets: vec![
                    SocketSpec {
                        name: "http".into(),
                        listen: "127.0.0.1:8080".to_string(),
                    },
                    SocketSpec {
                        name: "admin_2".into(),
                        listen: "[::1]:9090".to_string(),
                    },
                ],
            }),
            bundle: None,
            wasm: None,
            health: Some(HealthSpec {
                check: HealthCheck::Http("http://127.0.0.1:8080/healthz?node=${NODE_NAME}".into()),
                interval: Duration::from_secs(2),
                timeout: Duration::from_millis(500),
                healthy_threshold: 2,
                unhealthy_threshold: 5,
                start_timeout: Duration::from_secs(3600),
            }),
            metrics: Some(MetricsSpec {
                prometheus: "https://127.0.0.1:8080/metrics".into(),
                requests_total: "app_requests_total".into(),
                errors_total: "app:errors_total".into(),
                latency_seconds: "_latency".into(),
            }),
        };
        assert_eq!(m, expected);
        assert_eq!(m.runtime.as_str(), "process");
    }

    #[test]
    fn full_bundle_manifest() {
        let m = parse_manifest("m", FULL_BUNDLE).expect("valid");
        let expected = Manifest {
            name: "static-site".into(),
            version: semver::Version::new(0, 1, 0),
            runtime: Runtime::Bundle,
            description: None,
            process: None,
            bundle: Some(BundleSpec {
                activate: Some(vec!["bin/reload.sh".into(), "${MODULE_DIR}".into()]),
                deactivate: Some(vec!["bin/stop.sh".into()]),
            }),
            wasm: None,
            health: Some(HealthSpec {
                check: HealthCheck::Exec(vec!["bin/check.sh".into(), "--quick".into()]),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                healthy_threshold: 1,
                unhealthy_threshold: 3,
                start_timeout: Duration::from_secs(30),
            }),
            metrics: None,
        };
        assert_eq!(m, expected);
        assert_eq!(m.runtime.as_str(), "bundle");
    }

    #[test]
    fn defaults_are_filled_in() {
        let m = parse_manifest("m", &p("")).expect("valid");
        assert_eq!(
            m.process,
            Some(ProcessSpec {
                command: vec!["bin/hello".into()],
                env: BTreeMap::new(),
                swap: SwapStrategy::StartFirst,
                stop_signal: StopSignal {
                    name: "SIGTERM",
                    number: 15
                },
                stop_timeout: Duration::from_secs(10),
                sockets: vec![],
            })
        );
        assert_eq!(m.description, None);
        assert_eq!(m.bundle, None);
        assert_eq!(m.health, None);
        assert_eq!(m.metrics, None);

        let m = parse_manifest("m", &b("")).expect("valid");
        assert_eq!(m.bundle, Some(BundleSpec::default()));
        assert_eq!(m.process, None);

        let m = parse_manifest(
            "m",
            &b("[health]\ntcp = \"${NODE_NAME}:80\"\n[metrics]\nprometheus = \"http://x/m\"\n"),
        )
        .expect("valid");
        assert_eq!(
            m.health,
            Some(HealthSpec {
                check: HealthCheck::Tcp("${NODE_NAME}:80".into()),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                healthy_threshold: 1,
                unhealthy_threshold: 3,
                start_timeout: Duration::from_secs(30),
            })
        );
        assert_eq!(
            m.metrics,
            Some(MetricsSpec {
                prometheus: "http://x/m".into(),
                requests_total: "http_requests_total".into(),
                errors_total: "http_errors_total".into(),
                latency_seconds: "http_request_duration_seconds".into(),
            })
        );
    }

    #[test]
    fn signals() {
        let all = [
            ("TERM", 15),
            ("INT", 2),
            ("QUIT", 3),
            ("HUP", 1),
            ("USR1", 10),
            ("USR2", 12),
            ("KILL", 9),
        ];
        for (bare, number) in all {
            let canonical = format!("SIG{bare}");
            for spelled in [bare.to_string(), canonical.clone()] {
                let m = parse_manifest("m", &p(&format!("stop_signal = \"{spelled}\"")))
                    .expect("valid signal");
                let signal = m.process.expect("process").stop_signal;
                assert_eq!(signal.name, canonical);
                assert_eq!(signal.number, number);
            }
        }
    }

    #[test]
    fn manifest_table() {
        // Syntax and types.
        check("name = ", Err(("-", "invalid TOML at line 1")));
        check(
            "name = \"a\"\nname = \"b\"",
            Err(("-", "invalid TOML at line 2")),
        );
        check(
            "name = \"hello\"\nversion = 1\n",
            Err(("version", "expected a string, found integer")),
        );
        check(
            &format!("{HEAD_P}process = \"x\""),
            Err(("process", "expected a table, found string")),
        );

        // Unknown keys everywhere, with full paths.
        check(&p("").replace("name", "nme"), Err(("nme", "unknown key")));
        check(&p("[proces]\n"), Err(("proces", "unknown key")));
        check(
            &praw("comand = [\"x\"]"),
            Err(("process.comand", "unknown key")),
        );
        check(
            &p("[[process.sockets]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nport = 1"),
            Err(("process.sockets[0].port", "unknown key")),
        );
        check(
            &b("[bundle]\nactivat = [\"x\"]"),
            Err(("bundle.activat", "unknown key")),
        );
        check(
            &p("[health]\nhttp = \"http://x\"\nretries = 1"),
            Err(("health.retries", "unknown key")),
        );
        check(
            &p("[metrics]\nprometheus = \"http://x\"\nurl = 1"),
            Err(("metrics.url", "unknown key")),
        );
        check(
            &p("\"odd key\" = 1"),
            Err(("process.\"odd key\"", "unknown key")),
        );
        // Unknown top-level keys are reported before anything else.
        check("zzz = 1", Err(("zzz", "unknown key")));

        // name
        check("version = \"1.0.0\"", Err(("name", "missing required key")));
        check(
            &p("").replace("\"hello\"", "\"Hello\""),
            Err(("name", "invalid module name \"Hello\"")),
        );
        check(
            &p("").replace("\"hello\"", "\"h\""),
            Err(("name", "2 to 63")),
        );
        check(
            &p("").replace("\"hello\"", "\"-ab\""),
            Err(("name", "invalid module name")),
        );
        check(
            &p("").replace("\"hello\"", "\"a_b\""),
            Err(("name", "invalid module name")),
        );
        let long = "a".repeat(64);
        check(
            &p("").replace("\"hello\"", &format!("\"{long}\"")),
            Err(("name", "2 to 63")),
        );
        let max = "a".repeat(63);
        check(
            &p("").replace("\"hello\"", &format!("\"{max}\"")),
            Ok(|m| m.name.len() == 63),
        );
        check(
            &p("").replace("\"hello\"", "\"0-\""),
            Ok(|m| m.name == "0-"),
        );

        // version
        check("name = \"hello\"", Err(("version", "missing required key")));
        check(
            &p("").replace("1.2.0", "1.2"),
            Err((
                "version",
                "invalid semver version \"1.2\": unexpected end of input",
            )),
        );
        check(
            &p("").replace("1.2.0", "v1.2.0"),
            Err(("version", "invalid semver")),
        );
        check(
            &p("").replace("1.2.0", "1.2.0-a.01"),
            Err(("version", "invalid leading zero in pre-release identifier")),
        );

        // runtime
        check(
            "name = \"hello\"\nversion = \"1.2.0\"",
            Err(("runtime", "missing required key")),
        );
        check(
            &p("").replace("\"process\"", "\"docker\""),
            Err((
                "runtime",
                "expected \"process\", \"bundle\" or \"wasm\", found \"docker\"",
            )),
        );

        // description
        check(
            &format!("description = 5\n{}", p("")),
            Err(("description", "expected a string, found integer")),
        );
        check(
            &format!("description = \"${{X}}\"\n{}", p("")),
            Err(("description", "unknown variable ${X}")),
        );

        // Sections by runtime.
        check(
            HEAD_P,
            Err((
                "process",
                "missing section required by runtime = \"process\"",
            )),
        );
        check(
            &p("[bundle]\n"),
            Err(("bundle", "section not allowed with runtime = \"process\"")),
        );
        check(
            &b("[process]\ncommand = [\"x\"]"),
            Err(("process", "section not allowed with runtime = \"bundle\"")),
        );
        check(
            &b("bundle = 1"),
            Err(("bundle", "expected a table, found integer")),
        );

        // process.command
        check(&praw(""), Err(("process.command", "missing required key")));
        check(
            &praw("command = []"),
            Err(("process.command", "must not be empty")),
        );
        check(
            &praw("command = \"bin/x\""),
            Err((
                "process.command",
                "expected an array of strings, found string",
            )),
        );
        check(
            &praw("command = [\"x\", \"\"]"),
            Err(("process.command[1]", "must not be empty")),
        );
        check(
            &praw("command = [\"x\", 1]"),
            Err(("process.command[1]", "expected a string, found integer")),
        );
        check(
            &praw("command = [\"../x\"]"),
            Err(("process.command", "must not leave the module dir")),
        );
        check(
            &praw("command = [\"bin/../../x\"]"),
            Err(("process.command", "must not leave the module dir")),
        );
        check(
            &praw("command = [\"${MODULE_DIR}/../x\"]"),
            Err(("process.command", "must not leave the module dir")),
        );
        check(
            &praw("command = [\"x\", \"${NOPE}\"]"),
            Err(("process.command[1]", "unknown variable ${NOPE}")),
        );
        check(
            &praw("command = [\"/usr/bin/python3\", \"../shared/app.py\"]"),
            Ok(|m| {
                m.process
                    .as_ref()
                    .is_some_and(|p| p.command[0] == "/usr/bin/python3")
            }),
        );
        check(&praw("command = [\"/opt/../usr/bin/x\"]"), Ok(|_| true));
        check(&praw("command = [\"bin/..x\"]"), Ok(|_| true));

        // process.env
        check(
            &p("env = 1"),
            Err(("process.env", "expected a table, found integer")),
        );
        check(
            &p("env = { \"1BAD\" = \"x\" }"),
            Err(("process.env.1BAD", "invalid environment variable name")),
        );
        check(
            &p("env = { \"A.B\" = \"x\" }"),
            Err(("process.env.\"A.B\"", "invalid environment variable name")),
        );
        check(
            &p("env = { A-B = \"x\" }"),
            Err(("process.env.A-B", "invalid environment variable name")),
        );
        check(
            &p("env = { HOTSWAP_X = \"x\" }"),
            Err(("process.env.HOTSWAP_X", "reserved")),
        );
        for name in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            check(
                &p(&format!("env = {{ {name} = \"x\" }}")),
                Err((&format!("process.env.{name}"), "reserved")),
            );
        }
        check(
            &p("env = { A = 1 }"),
            Err(("process.env.A", "expected a string, found integer")),
        );
        check(
            &p("env = { A = \"${B}\" }"),
            Err(("process.env.A", "unknown variable ${B}")),
        );
        check(
            &p("env = { LISTEN = \"$HOME\" }"),
            Ok(|m| {
                m.process
                    .as_ref()
                    .is_some_and(|p| p.env["LISTEN"] == "$HOME")
            }),
        );

        // process.swap / stop_signal / stop_timeout
        check(
            &p("swap = \"blue-green\""),
            Err(("process.swap", "expected \"start-first\" or \"stop-first\"")),
        );
        check(
            &p("swap = true"),
            Err(("process.swap", "expected a string, found boolean")),
        );
        check(
            &p("stop_signal = \"SIGSTOP\""),
            Err((
                "process.stop_signal",
                "unsupported signal \"SIGSTOP\"; expected one of SIGTERM",
            )),
        );
        check(
            &p("stop_signal = \"sigterm\""),
            Err(("process.stop_signal", "unsupported")),
        );
        check(
            &p("stop_signal = 15"),
            Err(("process.stop_signal", "expected a string")),
        );
        check(
            &p("stop_timeout = \"soon\""),
            Err(("process.stop_timeout", "invalid duration \"soon\"")),
        );
        check(
            &p("stop_timeout = \"0s\""),
            Err(("process.stop_timeout", "greater than zero")),
        );
        check(
            &p("stop_timeout = \"61m\""),
            Err(("process.stop_timeout", "must be at most 1h, found 1h 1m")),
        );
        check(
            &p("stop_timeout = 10"),
            Err(("process.stop_timeout", "expected a string, found integer")),
        );
        check(
            &p("stop_timeout = \"1h\""),
            Ok(|m| {
                m.process
                    .as_ref()
                    .is_some_and(|p| p.stop_timeout == Duration::from_secs(3600))
            }),
        );

        // process.sockets
        let socket = |name: &str, listen: &str| {
            format!("[[process.sockets]]\nname = \"{name}\"\nlisten = \"{listen}\"\n")
        };
        check(
            &p("sockets = 1"),
            Err((
                "process.sockets",
                "expected an array of tables, found integer",
            )),
        );
        check(
            &p("sockets = [1]"),
            Err(("process.sockets[0]", "expected a table, found integer")),
        );
        check(
            &p("sockets = []"),
            Ok(|m| m.process.as_ref().is_some_and(|p| p.sockets.is_empty())),
        );
        check(
            &p("[[process.sockets]]\nlisten = \"127.0.0.1:1\""),
            Err(("process.sockets[0].name", "missing required key")),
        );
        check(
            &p("[[process.sockets]]\nname = \"a\""),
            Err(("process.sockets[0].listen", "missing required key")),
        );
        check(
            &p(&socket("Http", "127.0.0.1:1")),
            Err(("process.sockets[0].name", "invalid socket name \"Http\"")),
        );
        check(
            &p(&socket(&"a".repeat(33), "127.0.0.1:1")),
            Err(("process.sockets[0].name", "invalid socket name")),
        );
        check(&p(&socket(&"a".repeat(32), "127.0.0.1:1")), Ok(|_| true));
        check(&p(&socket("a", "127.0.0.1:1")), Ok(|_| true));
        check(
            &p(&format!(
                "{}{}",
                socket("a", "127.0.0.1:1"),
                socket("a", "127.0.0.1:2")
            )),
            Err(("process.sockets[1].name", "duplicate socket name \"a\"")),
        );
        check(
            &p(&format!(
                "{}{}",
                socket("a", "127.0.0.1:1"),
                socket("b", "127.0.0.1:1")
            )),
            Err((
                "process.sockets[1].listen",
                "duplicate listen address 127.0.0.1:1 (also used by socket \"a\")",
            )),
        );
        check(
            &p(&socket("a", "localhost:80")),
            Err((
                "process.sockets[0].listen",
                "invalid socket address \"localhost:80\"",
            )),
        );
        // Node-specific addresses are checked for their variables here and
        // parsed on the node after expansion.
        check(
            &p(&socket("a", "127.0.0.1:${NODE_LABEL_port}")),
            Ok(|m| {
                m.process
                    .as_ref()
                    .is_some_and(|p| p.sockets[0].literal_addr().is_none())
            }),
        );
        check(
            &p(&socket("a", "127.0.0.1:${PORT}")),
            Err(("process.sockets[0].listen", "unknown variable ${PORT}")),
        );
        let seventeen: String = (0..17)
            .map(|i| socket(&format!("s{i}"), &format!("127.0.0.1:{}", 1000 + i)))
            .collect();
        check(
            &p(&seventeen),
            Err((
                "process.sockets",
                "at most 16 sockets are allowed, found 17",
            )),
        );
        let sixteen: String = (0..16)
            .map(|i| socket(&format!("s{i}"), &format!("127.0.0.1:{}", 1000 + i)))
            .collect();
        check(
            &p(&sixteen),
            Ok(|m| m.process.as_ref().is_some_and(|p| p.sockets.len() == 16)),
        );

        // bundle
        check(
            &b("[bundle]\nactivate = []"),
            Err(("bundle.activate", "must not be empty")),
        );
        check(
            &b("[bundle]\ndeactivate = [\"\"]"),
            Err(("bundle.deactivate[0]", "must not be empty")),
        );
        check(
            &b("[bundle]\ndeactivate = \"x\""),
            Err(("bundle.deactivate", "expected an array of strings")),
        );
        check(
            &b("[bundle]\nactivate = [\"x\"]"),
            Ok(|m| {
                m.bundle
                    == Some(BundleSpec {
                        activate: Some(vec!["x".into()]),
                        deactivate: None,
                    })
            }),
        );

        // health
        check(
            &b("health = 1"),
            Err(("health", "expected a table, found integer")),
        );
        check(
            &p("[health]\n"),
            Err(("health", "one of http, tcp or exec is required")),
        );
        check(
            &p("[health]\ninterval = \"1s\""),
            Err(("health", "one of http, tcp or exec is required")),
        );
        check(
            &p("[health]\nhttp = \"http://x\"\ntcp = \"x:1\""),
            Err(("health", "only one of http, tcp or exec may be set")),
        );
        check(
            &p("[health]\nhttp = \"ftp://x\""),
            Err(("health.http", "expected an http:// or https:// URL")),
        );
        check(
            &p("[health]\nhttp = \"http://\""),
            Err(("health.http", "expected an http://")),
        );
        check(
            &p("[health]\nhttp = 80"),
            Err(("health.http", "expected a string, found integer")),
        );
        check(
            &p("[health]\nhttp = \"http://127.0.0.1/${FOO}\""),
            Err((
                "health.http",
                "unknown variable ${FOO}; allowed: ${NODE_NAME}, ${NODE_LABEL_<key>}, ${MODULE_DIR}",
            )),
        );
        check(
            &p("[health]\nhttp = \"http://x/${NODE_NAME\""),
            Err(("health.http", "unterminated")),
        );
        check(
            &p("[health]\ntcp = \"localhost\""),
            Err(("health.tcp", "expected host:port")),
        );
        check(
            &p("[health]\ntcp = \":80\""),
            Err(("health.tcp", "host must not be empty")),
        );
        check(
            &p("[health]\ntcp = \"x:0\""),
            Err(("health.tcp", "port must be a number from 1 to 65535")),
        );
        check(
            &p("[health]\ntcp = \"x:65536\""),
            Err(("health.tcp", "port must be")),
        );
        check(
            &p("[health]\ntcp = \"x:+80\""),
            Err(("health.tcp", "port must be")),
        );
        check(
            &p("[health]\ntcp = \"x:\""),
            Err(("health.tcp", "port must be")),
        );
        check(
            &p("[health]\ntcp = \"::1:80\""),
            Err(("health.tcp", "IPv6 host must be in brackets")),
        );
        check(&p("[health]\ntcp = \"[::1]:65535\""), Ok(|_| true));
        check(&p("[health]\ntcp = \"${NODE_LABEL_ip}:80\""), Ok(|_| true));
        check(
            &p("[health]\ntcp = \"${HOST}:80\""),
            Err(("health.tcp", "unknown variable ${HOST}")),
        );
        check(
            &p("[health]\nexec = []"),
            Err(("health.exec", "must not be empty")),
        );
        check(
            &p("[health]\nexec = [\"\"]"),
            Err(("health.exec[0]", "must not be empty")),
        );
        check(
            &p("[health]\nexec = \"x\""),
            Err(("health.exec", "expected an array of strings")),
        );
        check(
            &p("[health]\nexec = [\"x\"]\ninterval = \"0ms\""),
            Err(("health.interval", "greater than zero")),
        );
        check(
            &p("[health]\nexec = [\"x\"]\ninterval = \"often\""),
            Err(("health.interval", "invalid duration \"often\"")),
        );
        check(
            &p("[health]\nexec = [\"x\"]\ntimeout = \"0s\""),
            Err(("health.timeout", "greater than zero")),
        );
        check(
            &p("[health]\nexec = [\"x\"]\ntimeout = \"2s\""),
            Ok(|m| {
                m.health.as_ref().is_some_and(|h| {
                    (h.timeout, h.interval) == (Duration::from_secs(2), Duration::from_secs(1))
                })
            }),
        );
        check(
            &p("[health]\nexec = [\"x\"]\ntimeout = \"30s\"\ninterval = \"100ms\""),
            Ok(|m| {
                m.health
                    .as_ref()
                    .is_some_and(|h| h.timeout == Duration::from_secs(30))
            }),
        );
        check(
            &p("[health]\nexec = [\"x\"]\ntimeout = \"2s\"\ninterval = \"2s\""),
            Ok(|m| m.health.as_ref().is_some_and(|h| h.timeout == h.interval)),
        );
        check(
            &p("[health]\nexec = [\"x\"]\ntimeout = \"2h\""),
            Err(("health.timeout", "must be at most 1h, found 2h")),
        );
        check(
            &p("[health]\nexec = [\"x\"]\nhealthy_threshold = 0"),
            Err((
                "health.healthy_threshold",
                "must be between 1 and 100, found 0",
            )),
        );
        check(
            &p("[health]\nexec = [\"x\"]\nunhealthy_threshold = 101"),
            Err((
                "health.unhealthy_threshold",
                "must be between 1 and 100, found 101",
            )),
        );
        check(
            &p("[health]\nexec = [\"x\"]\nhealthy_threshold = \"2\""),
            Err((
                "health.healthy_threshold",
                "expected an integer, found string",
            )),
        );
        check(
            &p("[health]\nexec = [\"x\"]\nunhealthy_threshold = 1.5"),
            Err((
                "health.unhealthy_threshold",
                "expected an integer, found float",
            )),
        );
        check(
            &p("[health]\nexec = [\"x\"]\nhealthy_threshold = 100\nunhealthy_threshold = 1"),
            Ok(|m| {
                m.health
                    .as_ref()
                    .is_some_and(|h| h.healthy_threshold == 100 && h.unhealthy_threshold == 1)
            }),
        );
        check(
            &p("[health]\nexec = [\"x\"]\nstart_timeout = \"2h\""),
            Err(("health.start_timeout", "must be at most 1h, found 2h")),
        );
        check(
            &p("[health]\nexec = [\"x\"]\nstart_timeout = \"0s\""),
            Err(("health.start_timeout", "greater than zero")),
        );

        // metrics
        check(
            &b("metrics = []"),
            Err(("metrics", "expected a table, found array")),
        );
        check(
            &p("[metrics]\n"),
            Err(("metrics.prometheus", "missing required key")),
        );
        check(
            &p("[metrics]\nprometheus = \"127.0.0.1:8080/metrics\""),
            Err(("metrics.prometheus", "expected an http:// or https:// URL")),
        );
        check(
            &p("[metrics]\nprometheus = \"http://${NODE_NAME}:8080/metrics\""),
            Ok(|m| {
                m.metrics
                    .as_ref()
                    .is_some_and(|x| x.prometheus == "http://${NODE_NAME}:8080/metrics")
            }),
        );
        check(
            &p("[metrics]\nprometheus = \"http://${METRICS}\""),
            Err(("metrics.prometheus", "unknown variable ${METRICS}")),
        );
        for key in ["requests_total", "errors_total", "latency_seconds"] {
            check(
                &p(&format!(
                    "[metrics]\nprometheus = \"http://x\"\n{key} = \"1bad\""
                )),
                Err((&format!("metrics.{key}"), "invalid metric name \"1bad\"")),
            );
            check(
                &p(&format!(
                    "[metrics]\nprometheus = \"http://x\"\n{key} = \"a-b\""
                )),
                Err((&format!("metrics.{key}"), "invalid metric name")),
            );
            check(
                &p(&format!("[metrics]\nprometheus = \"http://x\"\n{key} = 1")),
                Err((
                    &format!("metrics.{key}"),
                    "expected a string, found integer",
                )),
            );
        }

        // Variables: label keys must be possible label keys.
        check(
            &p("env = { Z = \"${NODE_LABEL_Zone}\" }"),
            Err(("process.env.Z", "invalid variable ${NODE_LABEL_Zone}")),
        );
        check(
            &p("env = { Z = \"${NODE_LABEL_}\" }"),
            Err(("process.env.Z", "invalid variable ${NODE_LABEL_}")),
        );
    }

    /// SPEC §3: relative paths of every command resolve inside the module
    /// dir, so no command may climb out of it with "..", not only
    /// `process.command` (issue 18, item 8).
    #[test]
    fn no_command_leaves_the_module_dir() {
        let leave = "must not leave the module dir";
        let exec = |cmd: &str| p(&format!("[health]\nexec = {cmd}"));
        let hook = |key: &str, cmd: &str| b(&format!("[bundle]\n{key} = {cmd}"));
        let cases: Vec<(String, Expected<'_>)> = vec![
            (
                hook("activate", r#"["../x"]"#),
                Err(("bundle.activate", leave)),
            ),
            (
                hook("activate", r#"["bin/../../etc/x"]"#),
                Err(("bundle.activate", leave)),
            ),
            (
                hook("activate", r#"["${MODULE_DIR}/../other/bin/x"]"#),
                Err(("bundle.activate", leave)),
            ),
            (
                hook("deactivate", r#"["../x"]"#),
                Err(("bundle.deactivate", leave)),
            ),
            (
                hook("deactivate", r#"["./../x", "arg"]"#),
                Err(("bundle.deactivate", leave)),
            ),
            (exec(r#"["../check.sh"]"#), Err(("health.exec", leave))),
            (
                exec(r#"["bin/../../check.sh"]"#),
                Err(("health.exec", leave)),
            ),
            (
                praw(r#"command = ["../x"]"#),
                Err(("process.command", leave)),
            ),
            // Absolute programs, ".." in arguments and names merely
            // starting with dots stay allowed, as for process.command.
            (hook("activate", r#"["/bin/sh", "../x.sh"]"#), Ok(|_| true)),
            (hook("deactivate", r#"["bin/..stop"]"#), Ok(|_| true)),
            (exec(r#"["/usr/bin/test", "-f", "../x"]"#), Ok(|_| true)),
            (exec(r#"["./bin/check.sh"]"#), Ok(|_| true)),
        ];
        for (text, expected) in cases {
            check(&text, expected);
        }
        let e = parse_manifest("hello/module.toml", &hook("activate", r#"["../x"]"#))
            .expect_err("a hook leaving the module dir is refused");
        assert_eq!(
            e.to_string(),
            "hello/module.toml: bundle.activate: relative program path \"../x\" has a \"..\" \
             component; it must not leave the module dir"
        );
    }

    const HEAD_W: &str = "name = \"edge\"\nversion = \"1.0.0\"\nruntime = \"wasm\"\n";
    const SOCKET_W: &str = "[[wasm.sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:8080\"\n";

    /// A wasm manifest: `[wasm]` with `body`, then one socket.
    fn w(body: &str) -> String {
        format!("{HEAD_W}[wasm]\ncomponent = \"handler.wasm\"\n{body}{SOCKET_W}")
    }

    #[test]
    fn wasm_manifest_full_and_defaults() {
        let m = parse_manifest(
            "m.toml",
            &w("max_memory = \"32MiB\"\nrequest_timeout = \"2s\"\nmax_concurrent_requests = 50\nenv = { GREETING = \"hi ${NODE_NAME}\" }\n"),
        )
        .expect("valid");
        assert_eq!(m.runtime, Runtime::Wasm);
        let wasm = m.wasm.expect("wasm");
        assert_eq!(wasm.component, "handler.wasm");
        assert_eq!(wasm.max_memory, 32 << 20);
        assert_eq!(wasm.request_timeout, Duration::from_secs(2));
        assert_eq!(wasm.max_concurrent_requests, 50);
        assert_eq!(wasm.env["GREETING"], "hi ${NODE_NAME}");
        assert_eq!(wasm.sockets[0].listen, "127.0.0.1:8080");
        assert!(m.process.is_none() && m.bundle.is_none());

        let d = parse_manifest("m.toml", &w(""))
            .expect("valid")
            .wasm
            .expect("wasm");
        assert_eq!(
            (d.max_memory, d.request_timeout, d.max_concurrent_requests),
            (64 << 20, Duration::from_secs(10), 1000)
        );
    }

    #[test]
    fn wasm_manifest_errors_name_the_key() {
        let cases: Vec<(String, &str, &str)> = vec![
            (
                HEAD_W.to_string(),
                "wasm",
                "missing section required by runtime = \"wasm\"",
            ),
            (w("bogus = 1\n"), "wasm.bogus", "unknown key"),
            (
                format!("{HEAD_W}[wasm]\n{SOCKET_W}"),
                "wasm.component",
                "missing required key",
            ),
            (
                format!("{HEAD_W}[wasm]\ncomponent = \"../x.wasm\"\n{SOCKET_W}"),
                "wasm.component",
                "stay inside it",
            ),
            (
                format!("{HEAD_W}[wasm]\ncomponent = \"/etc/x.wasm\"\n{SOCKET_W}"),
                "wasm.component",
                "relative to the module dir",
            ),
            (
                w("max_memory = \"lots\"\n"),
                "wasm.max_memory",
                "invalid size",
            ),
            (
                w("max_memory = \"8GiB\"\n"),
                "wasm.max_memory",
                "must be between 64KiB",
            ),
            (
                w("max_memory = \"10 parsecs\"\n"),
                "wasm.max_memory",
                "unknown unit",
            ),
            (
                w("request_timeout = \"0s\"\n"),
                "wasm.request_timeout",
                "greater than zero",
            ),
            (
                w("max_concurrent_requests = 0\n"),
                "wasm.max_concurrent_requests",
                "between 1 and 10000",
            ),
            (
                w("max_concurrent_requests = \"many\"\n"),
                "wasm.max_concurrent_requests",
                "expected an integer",
            ),
            (
                w("env = { HOTSWAP_X = \"1\" }\n"),
                "wasm.env.HOTSWAP_X",
                "reserved",
            ),
            (
                format!("{HEAD_W}[wasm]\ncomponent = \"h.wasm\"\n"),
                "wasm.sockets",
                "at least one [[wasm.sockets]]",
            ),
            (
                format!("{}[process]\ncommand = [\"x\"]\n", w("")),
                "process",
                "section not allowed with runtime = \"wasm\"",
            ),
            (
                format!("{HEAD_P}[process]\ncommand = [\"x\"]\n[wasm]\ncomponent = \"h.wasm\"\n"),
                "wasm",
                "section not allowed with runtime = \"process\"",
            ),
        ];
        for (text, key, reason) in cases {
            let e = parse_manifest("m.toml", &text).expect_err(&text);
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
    }

    #[test]
    fn sizes_parse_and_format() {
        for (text, bytes) in [
            ("65536", 65536),
            ("64KiB", 64 << 10),
            ("64MiB", 64 << 20),
            ("1 GiB", 1 << 30),
            ("10MB", 10_000_000),
            ("5kB", 5_000),
            ("12B", 12),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "MiB",
            "-1MiB",
            "1.5MiB",
            "1 TiB",
            "99999999999999999999",
            "18446744073709551615GiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(format_size(64 << 20), "64MiB");
        assert_eq!(format_size(4 << 30), "4GiB");
        assert_eq!(format_size(1536), "1536B");
        assert_eq!(format_size(3 << 10), "3KiB");
    }

    proptest! {
        #[test]
        fn formatted_sizes_parse_back(bytes in 0u64..(1 << 40)) {
            prop_assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        }
    }

    #[test]
    fn first_error_wins_in_section_order() {
        // Bad name and bad process: the top-level error is reported.
        check(
            &praw("comand = 1").replace("\"hello\"", "\"H\""),
            Err(("name", "invalid module name")),
        );
        // Bad process and bad health: process comes first.
        check(
            &p("swap = \"x\"\n[health]\n"),
            Err(("process.swap", "expected")),
        );
        // Bad health and bad metrics: health comes first.
        check(&p("[health]\n[metrics]\n"), Err(("health", "one of")));
        // Bad process and a forbidden bundle: process comes first.
        check(
            &praw("command = []\n[bundle]\n"),
            Err(("process.command", "must not be empty")),
        );
    }

    #[test]
    fn error_display_names_file_key_and_reason() {
        let e = parse_manifest("hello/module.toml", &p("stop_timeout = \"soon\""))
            .expect_err("bad duration");
        let text = e.to_string();
        assert!(
            text.starts_with("hello/module.toml: process.stop_timeout: invalid duration \"soon\""),
            "{text}"
        );
    }

    #[test]
    fn load_missing_file_names_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nope").join(MANIFEST_FILE);
        let err = load_manifest(&path).expect_err("missing");
        assert_eq!(err.file, path.display().to_string());
        assert_eq!(err.key, "-");
        assert!(err.reason.contains("cannot read manifest"), "{err}");
        assert!(err.to_string().contains("nope/module.toml"), "{err}");
    }

    #[test]
    fn load_reads_and_parses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(MANIFEST_FILE);
        std::fs::write(&path, FULL_BUNDLE).expect("write");
        let m = load_manifest(&path).expect("valid");
        assert_eq!(m.name, "static-site");

        std::fs::write(&path, "name = 1").expect("write");
        let err = load_manifest(&path).expect_err("invalid");
        assert_eq!(err.file, path.display().to_string());
        assert_eq!(err.key, "name");
    }

    /// Lines that exercise many paths of the parser when shuffled together.
    const FRAGMENTS: &[&str] = &[
        "name = \"hello\"",
        "name = \"\"",
        "version = \"1.2.0\"",
        "version = \"1.2\"",
        "runtime = \"process\"",
        "runtime = \"bundle\"",
        "description = \"${NODE_LABEL_x}${\"",
        "[process]",
        "command = [\"bin/hello\", \"${MODULE_DIR}\"]",
        "command = [\"../x\"]",
        "env = { A = \"${NODE_NAME}\", HOTSWAP_X = \"1\" }",
        "swap = \"stop-first\"",
        "stop_signal = \"KILL\"",
        "stop_timeout = \"99999999999999999999h\"",
        "[[process.sockets]]",
        "name = \"http\"",
        "listen = \"[::1]:8080\"",
        "[bundle]",
        "activate = [\"x\", 1]",
        "[health]",
        "http = \"http://é${NODE_NAME}\"",
        "tcp = \"é:é\"",
        "exec = [\"x\"]",
        "timeout = \"1ms\"",
        "healthy_threshold = -9223372036854775808",
        "[metrics]",
        "prometheus = \"https://x\"",
        "latency_seconds = \"é\"",
    ];

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(text in ".*") {
            let _ = parse_manifest("fuzz", &text);
        }

        #[test]
        fn never_panics_on_shuffled_fragments(
            lines in prop::collection::vec(prop::sample::select(FRAGMENTS), 0..24)
        ) {
            let _ = parse_manifest("fuzz", &lines.join("\n"));
        }

        #[test]
        fn name_and_version_round_trip(
            name in "[a-z0-9][a-z0-9-]{1,62}",
            version in "(0|[1-9][0-9]{0,8})\\.(0|[1-9][0-9]{0,8})\\.(0|[1-9][0-9]{0,8})(-[a-z][a-z0-9]{0,5}(\\.[a-z][a-z0-9]{0,3})?)?(\\+[a-z0-9]{1,6})?",
        ) {
            let text = format!("name = \"{name}\"\nversion = \"{version}\"\nruntime = \"bundle\"\n");
            let m = parse_manifest("prop", &text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&m.name, &name);
            prop_assert_eq!(m.version.to_string(), version);
        }
    }
}
