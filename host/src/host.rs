//! The host runtime: the current generation, the caches, and reloading.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::cache::{Bounds, CacheStats, Store};
use crate::generation::{CallError, Generation};
use crate::host_api::{HostTable, LogSink};
use crate::loader::{Library, LoadError};

/// Where the host's own lines (reloads, plugin logs) go.
pub type Printer = Arc<dyn Fn(&str) + Send + Sync>;

/// How a host is set up.
#[derive(Clone)]
pub struct Config {
    /// The plugin library to load and watch.
    pub library: PathBuf,
    /// Cache bounds set by the user; they win over the plugin's declarations.
    pub cache_bounds: HashMap<String, Bounds>,
    /// Where the host's lines go (standard output by default).
    pub printer: Printer,
}

impl Config {
    /// A configuration for `library` with no overrides, printing to stdout.
    pub fn new(library: impl Into<PathBuf>) -> Config {
        Config {
            library: library.into(),
            cache_bounds: HashMap::new(),
            printer: Arc::new(|line| println!("{line}")),
        }
    }
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// The watched library path.
    pub library: String,
    /// The plugin's name, when one is loaded.
    pub plugin: Option<String>,
    /// The live generation (0: nothing loaded yet).
    pub generation: u64,
    /// Its exported functions.
    pub functions: Vec<String>,
    /// The caches the host holds.
    pub caches: Vec<String>,
    /// Why the last load failed, if the last attempt failed.
    pub last_error: Option<String>,
    /// How many loads failed since the host started.
    pub failed_reloads: u64,
    /// How long the live generation took to load, in milliseconds.
    pub load_ms: Option<f64>,
    /// When the live generation went live, in seconds since the Unix epoch.
    pub loaded_at: Option<f64>,
    /// The host's process id.
    pub pid: u32,
}

/// What a reload attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// A new generation is live.
    Loaded {
        /// Its number.
        generation: u64,
        /// Caches reset because their code hash changed.
        reset: Vec<String>,
    },
    /// The file has the content that is already live (or that already failed).
    Unchanged,
}

struct ReloadState {
    next_generation: u64,
    /// The content that failed last, so the same broken bytes are reported once.
    failed_hash: Option<u32>,
}

/// A running keepwarm host: the library it serves, the caches it owns, and
/// the live generation.
pub struct Host {
    library: PathBuf,
    store: Arc<Store>,
    current: RwLock<Option<Arc<Generation>>>,
    reload: Mutex<ReloadState>,
    last_error: Mutex<Option<String>>,
    failed_reloads: Mutex<u64>,
    printer: Arc<RwLock<Printer>>,
    shadow_dir: tempfile::TempDir,
}

impl Host {
    /// A host for `config`, with nothing loaded yet (call [`Host::reload`]).
    pub fn new(config: Config) -> anyhow::Result<Arc<Host>> {
        let library = std::path::absolute(&config.library)?;
        // A private directory (mode 0700, removed on drop) for shadow copies.
        let shadow_dir = tempfile::Builder::new()
            .prefix("keepwarm-shadow-")
            .tempdir_in(crate::paths::runtime_dir()?)?;
        Ok(Arc::new(Host {
            library,
            store: Arc::new(Store::with_overrides(config.cache_bounds)),
            current: RwLock::new(None),
            reload: Mutex::new(ReloadState {
                next_generation: 1,
                failed_hash: None,
            }),
            last_error: Mutex::new(None),
            failed_reloads: Mutex::new(0),
            printer: Arc::new(RwLock::new(config.printer)),
            shadow_dir,
        }))
    }

    /// The watched library path (absolute).
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// The directory holding this host's shadow copies.
    pub fn shadow_dir(&self) -> &Path {
        self.shadow_dir.path()
    }

    /// The caches.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Prints one host line.
    pub fn print(&self, line: &str) {
        let printer = Arc::clone(&self.printer.read());
        printer(line)
    }

    /// Sends the host's lines somewhere else from now on (the prompt routes
    /// them above its input line).
    pub fn set_printer(&self, printer: Printer) {
        *self.printer.write() = printer;
    }

    /// The live generation, if any.
    pub fn current(&self) -> Option<Arc<Generation>> {
        self.current.read().clone()
    }

    fn file_name(&self) -> String {
        self.library
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.library.display().to_string())
    }

    /// Loads the library if its content differs from the live generation's
    /// (or always, with `force`). On failure the live generation keeps
    /// serving. An incomplete file is returned as
    /// `Err(LoadError::Incomplete)` without being counted or reported, so the
    /// watcher can retry; use [`Host::report_failure`] when it gives up.
    pub fn reload(&self, force: bool) -> Result<Reloaded, LoadError> {
        let started = Instant::now();
        let mut state = self.reload.lock();
        let bytes = match std::fs::read(&self.library) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LoadError::Missing(self.library.clone()))
            }
            Err(e) => {
                return Err(LoadError::Io(format!(
                    "reading {}: {e}",
                    self.library.display()
                )))
            }
        };
        let hash = crc32fast::hash(&bytes);
        let current = self.current();
        if !force
            && (current.as_ref().is_some_and(|g| g.content_hash == hash)
                || state.failed_hash == Some(hash))
        {
            return Ok(Reloaded::Unchanged);
        }
        let number = state.next_generation;
        let result = self.load_generation(number, hash, &bytes, started);
        match result {
            Ok((generation, reset)) => {
                state.next_generation += 1;
                state.failed_hash = None;
                *self.last_error.lock() = None;
                let line = self.loaded_line(&generation, &reset);
                // The swap: new calls go to the new generation at once; the
                // old one retires when its in-flight calls drop their Arcs.
                let old = self.current.write().replace(generation);
                drop(old);
                self.print(&line);
                Ok(Reloaded::Loaded {
                    generation: number,
                    reset,
                })
            }
            Err(e) if e.is_incomplete() && !force => Err(e),
            Err(e) => {
                state.failed_hash = Some(hash);
                drop(state);
                self.report_failure(&e);
                Err(e)
            }
        }
    }

    fn load_generation(
        &self,
        number: u64,
        hash: u32,
        bytes: &[u8],
        started: Instant,
    ) -> Result<(Arc<Generation>, Vec<String>), LoadError> {
        let shadow = self
            .shadow_dir
            .path()
            .join(format!("gen-{number}-{}", self.file_name()));
        let library = Library::open(bytes, shadow)?;
        let table = HostTable::new(number, Arc::clone(&self.store), self.log_sink());
        // SAFETY: the table is moved into the Generation together with the
        // library, and the Generation drops the library first.
        unsafe { library.run_on_load(table.as_ptr())? };
        let mut reset = Vec::new();
        for decl in &library.caches {
            if self.store.declare(&decl.name, decl.bounds, decl.code_hash) {
                reset.push(decl.name.clone());
            }
        }
        let generation = Generation::new(number, hash, started.elapsed(), library, table);
        Ok((Arc::new(generation), reset))
    }

    fn loaded_line(&self, g: &Generation, reset: &[String]) -> String {
        let ms = g.load_time.as_secs_f64() * 1000.0;
        let verb = if g.number == 1 { "loaded" } else { "reloaded" };
        let caches: Vec<String> = self
            .store
            .stats()
            .into_iter()
            .filter(|s| !reset.contains(&s.name))
            .map(|s| format!("{} ({})", s.name, s.entries))
            .collect();
        let mut line = format!(
            "keepwarm: generation {} {verb} in {ms:.1} ms: {} ({} functions)",
            g.number,
            self.file_name(),
            g.function_names().len()
        );
        if g.number > 1 {
            if caches.is_empty() {
                line.push_str("; no caches to keep");
            } else {
                line.push_str(&format!("; caches kept: {}", caches.join(", ")));
            }
        }
        if !reset.is_empty() {
            line.push_str(&format!(
                "; reset because their code changed: {}",
                reset.join(", ")
            ));
        }
        line
    }

    /// Counts and prints a failed load; the live generation keeps serving.
    pub fn report_failure(&self, error: &LoadError) {
        *self.failed_reloads.lock() += 1;
        let message = format!("refused {}: {error}", self.file_name());
        *self.last_error.lock() = Some(message.clone());
        let serving = match self.current() {
            Some(g) => format!("generation {} keeps serving", g.number),
            None => "nothing is loaded yet".to_owned(),
        };
        self.print(&format!("keepwarm: {message} ({serving})"));
    }

    fn log_sink(&self) -> LogSink {
        let printer = Arc::clone(&self.printer);
        Arc::new(move |generation, level, message| {
            let tag = match level {
                keepwarm_api::abi::KW_LOG_ERROR => " error",
                keepwarm_api::abi::KW_LOG_WARN => " warn",
                keepwarm_api::abi::KW_LOG_DEBUG => " debug",
                _ => "",
            };
            let print = Arc::clone(&printer.read());
            print(&format!("[gen {generation}{tag}] {message}"))
        })
    }

    /// Calls an exported function with JSON arguments, returning its JSON
    /// result. The generation stays alive for the duration of the call.
    pub fn call(
        &self,
        function: &str,
        args: &[serde_json::Value],
    ) -> Result<serde_json::Value, CallError> {
        let generation = self.current().ok_or(CallError::NotLoaded)?;
        let args = serde_json::to_vec(args).expect("JSON values always serialize");
        let bytes = generation.call(function, &args)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            CallError::BadResult(format!(
                "the plugin function `{function}` returned invalid JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            ))
        })
    }

    /// Figures of every cache, or of one.
    pub fn stats(&self, cache: Option<&str>) -> Option<Vec<CacheStats>> {
        match cache {
            None => Some(self.store.stats()),
            Some(name) => self.store.get(name).map(|c| vec![c.stats()]),
        }
    }

    /// Resets one cache; `None` if there is no cache of that name.
    pub fn reset(&self, cache: &str) -> Option<u64> {
        self.store.reset(cache)
    }

    /// Resets every cache; returns the entries dropped.
    pub fn reset_all(&self) -> u64 {
        self.store.reset_all()
    }

    /// What is loaded.
    pub fn status(&self) -> Status {
        let g = self.current();
        Status {
            library: self.library.display().to_string(),
            plugin: g.as_ref().map(|g| g.plugin_name().to_owned()),
            generation: g.as_ref().map_or(0, |g| g.number),
            functions: g.as_ref().map(|g| g.function_names()).unwrap_or_default(),
            caches: self
                .store
                .all()
                .iter()
                .map(|c| c.name().to_owned())
                .collect(),
            last_error: self.last_error.lock().clone(),
            failed_reloads: *self.failed_reloads.lock(),
            load_ms: g.as_ref().map(|g| g.load_time.as_secs_f64() * 1000.0),
            loaded_at: g.as_ref().map(|g| {
                g.loaded_at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO)
                    .as_secs_f64()
            }),
            pid: std::process::id(),
        }
    }
}
