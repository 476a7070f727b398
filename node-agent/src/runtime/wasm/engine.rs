//! Engines and compiled components: one wasmtime [`Engine`] per instance
//! budget (a module's `max_memory` and `max_concurrent_requests`), whose
//! pooling allocator caps every instance's memory at `max_memory`; its
//! epoch ticks every [`EPOCH_TICK`] while it lives. Components are
//! compiled on the blocking pool and kept on disk by content digest and
//! engine compatibility (wasmtime version and settings), so an agent
//! restart or a second version with the same bytes does not compile again.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hotswap_common::artifact::Digest;
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often every engine's epoch advances: the granularity of
/// `request_timeout`, and how often a busy component yields its thread.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Core instances, memories and tables one component instance may hold.
/// A componentize-py component (CPython, its libc and WASI adapter) uses a
/// handful of each.
const CORE_INSTANCES_PER_COMPONENT: u32 = 32;
const MEMORIES_PER_COMPONENT: u32 = 4;
const TABLES_PER_COMPONENT: u32 = 8;

/// What an engine is sized for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Budget {
    pub max_memory: u64,
    pub max_concurrent_requests: u32,
}

impl Budget {
    /// Instances alive at once: every request of the version serving, those
    /// still finishing on the previous one, and probes of a candidate.
    fn instances(&self) -> u32 {
        self.max_concurrent_requests
            .saturating_mul(2)
            .saturating_add(4)
    }
}

/// A component ready to pre-instantiate, and what getting it cost.
pub struct Compiled {
    pub component: Component,
    pub compile_time: Duration,
    /// Loaded from the on-disk cache rather than compiled.
    pub cache_hit: bool,
}

/// The agent's engines, shared by every wasm module of the node.
#[derive(Clone)]
pub struct Engines {
    cache_dir: PathBuf,
    engines: Arc<Mutex<BTreeMap<Budget, Engine>>>,
}

impl Engines {
    pub fn new(cache_dir: PathBuf) -> Self {
        Self {
            cache_dir,
            engines: Arc::default(),
        }
    }

    /// The engine for `budget`, created (and its epoch ticker started) on
    /// first use.
    pub fn engine(&self, budget: Budget) -> Result<Engine, String> {
        let mut engines = self.engines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(engine) = engines.get(&budget) {
            return Ok(engine.clone());
        }
        let engine = new_engine(budget)?;
        start_ticker(&engine);
        engines.insert(budget, engine.clone());
        Ok(engine)
    }

    /// Compile `bytes` for `engine`, or load the result of an earlier
    /// compile. Runs on the blocking pool: compiling a large component takes
    /// seconds of CPU and must not hold a runtime thread.
    pub async fn compile(&self, engine: &Engine, bytes: Vec<u8>) -> Result<Compiled, String> {
        let engine = engine.clone();
        let path = self.cache_path(&engine, &bytes);
        tokio::task::spawn_blocking(move || compile_cached(&engine, &bytes, &path))
            .await
            .map_err(|e| format!("the compile task failed: {e}"))?
    }

    fn cache_path(&self, engine: &Engine, bytes: &[u8]) -> PathBuf {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        self.cache_dir.join(format!(
            "{}-{:016x}.cwasm",
            Digest::of(bytes).hex(),
            hasher.finish()
        ))
    }
}

fn new_engine(budget: Budget) -> Result<Engine, String> {
    let instances = budget.instances();
    let max_memory = usize::try_from(budget.max_memory)
        .map_err(|_| format!("max_memory {} does not fit this host", budget.max_memory))?;
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(instances)
        .total_core_instances(instances.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .total_memories(instances.saturating_mul(MEMORIES_PER_COMPONENT))
        .total_tables(instances.saturating_mul(TABLES_PER_COMPONENT))
        .total_stacks(instances)
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .max_memories_per_component(MEMORIES_PER_COMPONENT)
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .max_memory_size(max_memory);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        // Reserve address space for what an instance may use, not wasmtime's
        // default 4 GiB per memory: thousands of slots stay cheap.
        .memory_reservation(budget.max_memory)
        .memory_guard_size(64 << 10)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config).map_err(|e| format!("cannot create the wasm engine: {e:#}"))
}

/// Advance `engine`'s epoch every tick until the engine is dropped.
fn start_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the wasm epoch ticker: request timeouts will not fire");
    }
}

fn compile_cached(engine: &Engine, bytes: &[u8], path: &Path) -> Result<Compiled, String> {
    let started = Instant::now();
    if path.is_file() {
        // SAFETY: the file was written by `serialize` below, into the
        // agent's own data directory (as trusted as the agent's binary and
        // keys), and wasmtime checks it was made by a compatible engine.
        match unsafe { Component::deserialize_file(engine, path) } {
            Ok(component) => {
                return Ok(Compiled {
                    component,
                    compile_time: started.elapsed(),
                    cache_hit: true,
                });
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "compiled component unusable; compiling again");
                let _ = std::fs::remove_file(path);
            }
        }
    }
    let component = Component::new(engine, bytes).map_err(|e| describe_compile_error(bytes, &e))?;
    let compile_time = started.elapsed();
    match component.serialize() {
        Ok(serialized) => {
            if let Err(e) = write_atomically(path, &serialized) {
                tracing::warn!(path = %path.display(), error = %e, "cannot cache the compiled component");
            }
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot serialize the compiled component")
        }
    }
    Ok(Compiled {
        component,
        compile_time,
        cache_hit: false,
    })
}

/// Why `bytes` did not compile, in the words an operator needs: not wasm
/// at all, a core module where a component belongs, or the compiler's own.
fn describe_compile_error(bytes: &[u8], error: &wasmtime::Error) -> String {
    const MAGIC: &[u8] = b"\0asm";
    if !bytes.starts_with(MAGIC) {
        return "not a WebAssembly file (no \\0asm header)".to_string();
    }
    // Byte 4..8: version 1 and layer 0 is a core module; layer 1 a component.
    if bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
        return "a core WebAssembly module, not a component: build it as a component of the \
                wasi:http/proxy world (e.g. componentize-py, jco, cargo component)"
            .to_string();
    }
    format!("not a valid component: {error:#}")
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Budget {
        Budget {
            max_memory: 16 << 20,
            max_concurrent_requests: 4,
        }
    }

    #[tokio::test]
    async fn bad_bytes_are_named_for_what_they_are() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engines = Engines::new(dir.path().to_path_buf());
        let engine = engines.engine(budget()).expect("engine");
        let text = engines
            .compile(&engine, b"hello".to_vec())
            .await
            .err()
            .expect("not wasm");
        assert!(text.contains("not a WebAssembly file"), "{text}");
        // `(module)`: the smallest core module.
        let core = vec![0, b'a', b's', b'm', 1, 0, 0, 0];
        let text = engines
            .compile(&engine, core)
            .await
            .err()
            .expect("core module");
        assert!(text.contains("not a component"), "{text}");
        let torn = vec![0, b'a', b's', b'm', 0x0d, 0, 1, 0, 0xff];
        let text = engines
            .compile(&engine, torn)
            .await
            .err()
            .expect("torn component");
        assert!(text.starts_with("not a valid component"), "{text}");
        assert_eq!(
            std::fs::read_dir(dir.path())
                .map(|d| d.count())
                .unwrap_or(0),
            0,
            "nothing cached for what did not compile"
        );
    }

    #[tokio::test]
    async fn a_compiled_component_is_loaded_from_the_cache_the_second_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engines = Engines::new(dir.path().to_path_buf());
        let engine = engines.engine(budget()).expect("engine");
        // `(component)`: the smallest component.
        let bytes = vec![0, b'a', b's', b'm', 0x0d, 0, 1, 0];
        let first = engines
            .compile(&engine, bytes.clone())
            .await
            .expect("compile");
        assert!(!first.cache_hit);
        let second = engines.compile(&engine, bytes.clone()).await.expect("load");
        assert!(second.cache_hit);
        // Another engine's settings are another cache entry.
        let other = engines
            .engine(Budget {
                max_memory: 32 << 20,
                ..budget()
            })
            .expect("engine");
        assert!(
            !engines
                .compile(&other, bytes.clone())
                .await
                .expect("compile")
                .cache_hit
        );
        // A damaged cache file is compiled again, not trusted.
        for entry in std::fs::read_dir(dir.path()).expect("dir").flatten() {
            std::fs::write(entry.path(), b"garbage").expect("damage");
        }
        let again = engines.compile(&engine, bytes).await.expect("recompile");
        assert!(!again.cache_hit);
    }

    #[test]
    fn engines_are_shared_per_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engines = Engines::new(dir.path().to_path_buf());
        let a = engines.engine(budget()).expect("engine");
        let b = engines.engine(budget()).expect("engine");
        assert!(Engine::same(&a, &b));
    }
}
