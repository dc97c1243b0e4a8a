//! The host runtime: the current generation, the caches, and reloading.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, RwLock};

use crate::cache::{Bounds, CacheStats, Store};
use crate::events::{CacheCount, Event, EventSink};
use crate::generation::{CallError, Generation};
use crate::host_api::HostTable;
use crate::loader::{Library, LoadError};

/// How a host is set up.
#[derive(Clone)]
pub struct Config {
    /// The plugin library to load and watch.
    pub library: PathBuf,
    /// Cache bounds set by the user; they win over the plugin's declarations.
    pub cache_bounds: HashMap<String, Bounds>,
    /// Where the host's events go (nowhere by default).
    pub events: Option<EventSink>,
    /// A function to call, with no arguments, after every successful load;
    /// its outcome is an [`Event::Then`] (`keepwarm run --then FN`).
    pub then: Option<String>,
}

impl Config {
    /// A configuration for `library` with no overrides and no event sink.
    pub fn new(library: impl Into<PathBuf>) -> Config {
        Config {
            library: library.into(),
            cache_bounds: HashMap::new(),
            events: None,
            then: None,
        }
    }

    /// Sends the host's events to `sink`.
    pub fn on_event(mut self, sink: impl Fn(&Event) + Send + Sync + 'static) -> Config {
        self.events = Some(Arc::new(sink));
        self
    }

    /// Calls `function` (no arguments) after every successful load.
    pub fn then(mut self, function: impl Into<String>) -> Config {
        self.then = Some(function.into());
        self
    }

    /// Bounds the cache `name` (winning over the plugin's declaration).
    pub fn cache(mut self, name: impl Into<String>, bounds: Bounds) -> Config {
        self.cache_bounds.insert(name.into(), bounds);
        self
    }
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq)]
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
    /// Set while the library path is missing: "waiting for LIB to reappear …".
    pub waiting: Option<String>,
    /// How many loads failed since the host started.
    pub failed_reloads: u64,
    /// How long the live generation took to load, in milliseconds.
    pub load_ms: Option<f64>,
    /// When the live generation went live, in seconds since the Unix epoch.
    pub loaded_at: Option<f64>,
    /// The host's process id.
    pub pid: u32,
}

impl Drop for Host {
    /// Unloads the live generation and removes the host's files, as
    /// [`Host::shutdown`] does (without waiting: nothing can be calling
    /// through a host that is being dropped).
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

impl Status {
    /// The status as the JSON object `keepwarm status --json` prints.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "library": self.library,
            "plugin": self.plugin,
            "generation": self.generation,
            "functions": self.functions,
            "caches": self.caches,
            "last_error": self.last_error,
            "waiting": self.waiting,
            "failed_reloads": self.failed_reloads,
            "load_ms": self.load_ms,
            "loaded_at": self.loaded_at,
            "pid": self.pid,
        })
    }

    /// The status from that JSON object.
    pub fn from_json(value: &serde_json::Value) -> Result<Status, String> {
        let o = crate::json::Object::new(
            value,
            "a status",
            &[
                "library",
                "plugin",
                "generation",
                "functions",
                "caches",
                "last_error",
                "waiting",
                "failed_reloads",
                "load_ms",
                "loaded_at",
                "pid",
            ],
        )?;
        Ok(Status {
            library: o.str("library")?,
            plugin: o.opt_str("plugin")?,
            generation: o.u64("generation")?,
            functions: o.strings("functions")?,
            caches: o.strings("caches")?,
            last_error: o.opt_str("last_error")?,
            waiting: o.opt_str("waiting")?,
            failed_reloads: o.u64("failed_reloads")?,
            load_ms: o.opt_f64("load_ms")?,
            loaded_at: o.opt_f64("loaded_at")?,
            pid: u32::try_from(o.u64("pid")?).map_err(|e| format!("pid: {e}"))?,
        })
    }
}

crate::json::via_json!(Status);

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
    /// Set by [`Host::shutdown`]: nothing loads any more.
    shut_down: bool,
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
    /// The kind of the last transient failure reported, so a retry that
    /// fails the same way says nothing.
    last_transient: Mutex<Option<std::mem::Discriminant<LoadError>>>,
    /// Set while the library path is missing.
    waiting: Mutex<Option<String>>,
    /// The identity of the file last read, and why it was refused if it
    /// was: a call compares it with the file on disk (see
    /// [`Host::catch_up`]).
    seen: Mutex<Option<(crate::loader::FileId, Option<String>)>>,
    failed_reloads: Mutex<u64>,
    events: Arc<RwLock<Option<EventSink>>>,
    then: Option<String>,
    shadow_dir: crate::paths::ShadowDir,
}

impl Host {
    /// A host for `config`, with nothing loaded yet (call [`Host::reload`]).
    pub fn new(config: Config) -> crate::error::Result<Arc<Host>> {
        use crate::error::Context;
        let library = std::path::absolute(&config.library)
            .context(|| format!("resolving {}", config.library.display()))?;
        // A private directory (mode 0700, removed on shutdown) for shadow
        // copies; those of hosts that died are swept first.
        let runtime = crate::paths::runtime_dir()?;
        crate::paths::sweep_dead_shadow_dirs(&runtime);
        let shadow_dir = crate::paths::ShadowDir::create_in(&runtime)?;
        Ok(Arc::new(Host {
            library,
            store: Arc::new(Store::with_overrides(config.cache_bounds)),
            current: RwLock::new(None),
            reload: Mutex::new(ReloadState {
                next_generation: 1,
                shut_down: false,
                failed_hash: None,
            }),
            last_error: Mutex::new(None),
            last_transient: Mutex::new(None),
            waiting: Mutex::new(None),
            seen: Mutex::new(None),
            failed_reloads: Mutex::new(0),
            events: Arc::new(RwLock::new(config.events)),
            then: config.then,
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

    /// Shuts the host down: waits up to `grace` for calls in flight on the
    /// live generation to return, unloads it (on_unload, dlclose) and removes
    /// the shadow directory. Returns false when calls were still running at
    /// the deadline (they keep their generation alive; its files are removed
    /// all the same). Further reloads do nothing.
    pub fn shutdown(&self, grace: Duration) -> bool {
        // Hold the reload lock to the end: no new generation after this.
        let mut state = self.reload.lock();
        state.shut_down = true;
        let generation = self.current.write().take();
        let mut drained = true;
        if let Some(generation) = generation {
            let deadline = Instant::now() + grace;
            while Arc::strong_count(&generation) > 1 {
                if Instant::now() >= deadline {
                    drained = false;
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(generation);
        }
        self.shadow_dir.remove();
        drained
    }

    /// Sends `event` to the sink, if there is one.
    pub fn emit(&self, event: &Event) {
        let sink = self.events.read().clone();
        if let Some(sink) = sink {
            sink(event)
        }
    }

    /// Sends the host's events to `sink` from now on (`None`: nowhere).
    pub fn set_event_sink(&self, sink: Option<EventSink>) {
        *self.events.write() = sink;
    }

    /// The live generation's number (0 before the first load).
    pub fn generation_number(&self) -> u64 {
        self.current.read().as_ref().map_or(0, |g| g.number)
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
        if state.shut_down {
            return Ok(Reloaded::Unchanged);
        }
        let (bytes, file) = match crate::loader::read_library(&self.library) {
            Ok(read) => read,
            Err(e) => {
                let quiet = matches!(e, LoadError::Missing(_))
                    || (!force && (e.is_incomplete() || e.is_transient()));
                drop(state);
                if !quiet {
                    self.report_failure(&e);
                }
                return Err(e);
            }
        };
        self.set_waiting(false);
        let hash = crc32fast::hash(&bytes);
        let current = self.current();
        if !force && current.as_ref().is_some_and(|g| g.content_hash == hash) {
            *self.seen.lock() = Some((file, None));
            return Ok(Reloaded::Unchanged);
        }
        if !force && state.failed_hash == Some(hash) {
            *self.seen.lock() = Some((file, self.last_error.lock().clone()));
            return Ok(Reloaded::Unchanged);
        }
        let number = state.next_generation;
        let result = self.load_generation(number, hash, file, &bytes, started);
        match result {
            Ok((generation, reset)) => {
                state.next_generation += 1;
                state.failed_hash = None;
                *self.last_transient.lock() = None;
                *self.last_error.lock() = None;
                *self.seen.lock() = Some((file, None));
                let event = self.loaded_event(&generation, &reset);
                // The swap: new calls go to the new generation at once; the
                // old one retires when its in-flight calls drop their Arcs.
                let old = self.current.write().replace(generation);
                drop(old);
                self.emit(&event);
                drop(state);
                self.run_then();
                Ok(Reloaded::Loaded {
                    generation: number,
                    reset,
                })
            }
            Err(e) if (e.is_incomplete() || e.is_transient()) && !force => Err(e),
            Err(e) => {
                // Broken bytes are reported once; a machine problem (no
                // space, an I/O error) is retried on the next attempt.
                if !e.is_transient() {
                    state.failed_hash = Some(hash);
                }
                drop(state);
                self.report_failure(&e);
                if !e.is_transient() {
                    *self.seen.lock() = Some((file, self.last_error.lock().clone()));
                }
                Err(e)
            }
        }
    }

    fn load_generation(
        &self,
        number: u64,
        hash: u32,
        file: crate::loader::FileId,
        bytes: &[u8],
        started: Instant,
    ) -> Result<(Arc<Generation>, Vec<String>), LoadError> {
        let shadow = self
            .shadow_dir
            .path()
            .join(format!("gen-{number}-{}", self.file_name()));
        let mut library = Library::open(bytes, shadow)?;
        let declared = library
            .caches
            .iter()
            .filter(|d| d.code_hash != 0)
            .map(|d| (Box::from(d.name.as_bytes()), d.code_hash))
            .collect();
        let table = HostTable::new(number, Arc::clone(&self.store), self.sink(), declared);
        // SAFETY: host tables are never freed, so the table outlives the
        // library whatever happens.
        if let Err(e) = unsafe { library.run_on_load(table.as_ptr()) } {
            // Refused: nothing the plugin kept of the table may act any more.
            table.retire();
            drop(library);
            return Err(e);
        }
        let mut reset = Vec::new();
        for decl in &library.caches {
            if self.store.declare(&decl.name, decl.bounds, decl.code_hash) {
                reset.push(decl.name.clone());
            }
        }
        let generation = Generation::new(number, hash, file, started.elapsed(), library, table);
        Ok((Arc::new(generation), reset))
    }

    fn loaded_event(&self, g: &Generation, reset: &[String]) -> Event {
        let kept = self
            .store
            .stats()
            .into_iter()
            .filter(|s| !reset.contains(&s.name))
            .map(|s| CacheCount {
                name: s.name,
                entries: s.entries,
            })
            .collect();
        Event::Loaded {
            generation: g.number,
            file: self.file_name(),
            load_ms: g.load_time.as_secs_f64() * 1000.0,
            functions: g.function_names().len(),
            kept,
            reset: reset.to_vec(),
        }
    }

    /// Calls the `--then` function, if any, and reports what it answered.
    fn run_then(&self) {
        let Some(function) = &self.then else { return };
        let outcome = self.call_json(function, &[]).map_err(|e| e.to_string());
        self.emit(&Event::Then {
            function: function.clone(),
            outcome,
        });
    }

    /// Records whether the library path is missing (deleted by `cargo
    /// clean`, not built yet); says so once when that changes.
    pub fn set_waiting(&self, missing: bool) {
        let mut waiting = self.waiting.lock();
        if missing && waiting.is_none() {
            let message = format!(
                "waiting for {} to reappear (deleted, or not built yet: cargo build); it loads as soon as it is back",
                self.library.display()
            );
            *waiting = Some(message);
            drop(waiting);
            self.emit(&Event::Waiting {
                library: self.library.clone(),
                serving: self.current().map(|g| g.number),
            });
        } else if !missing {
            *waiting = None;
        }
    }

    /// Reports a failure that may go away by itself (no space, an I/O
    /// error) once per kind, not at every retry.
    pub fn report_transient(&self, error: &LoadError) {
        let kind = std::mem::discriminant(error);
        let mut last = self.last_transient.lock();
        if *last == Some(kind) {
            return;
        }
        *last = Some(kind);
        drop(last);
        self.report_failure(error);
    }

    /// Counts and reports a failed load; the live generation keeps serving.
    pub fn report_failure(&self, error: &LoadError) {
        *self.failed_reloads.lock() += 1;
        let file = self.file_name();
        *self.last_error.lock() = Some(format!("refused {file}: {error}"));
        self.emit(&Event::Refused {
            file,
            error: error.to_string(),
            serving: self.current().map(|g| g.number),
        });
    }

    /// The sink the host tables of this host's generations report to (it
    /// follows [`Host::set_event_sink`]).
    fn sink(&self) -> EventSink {
        let events = Arc::clone(&self.events);
        Arc::new(move |event| {
            let sink = events.read().clone();
            if let Some(sink) = sink {
                sink(event)
            }
        })
    }

    /// Makes sure the build on disk is the one that answers: when the file
    /// at the library path is not the one last read (a build landed and the
    /// watcher has not loaded it yet), loads it now, waiting up to `within`
    /// for a file still being written. Returns a warning when the build on
    /// disk was refused (the live generation answers instead) or did not
    /// settle in time. Costs one `stat` when nothing changed.
    pub fn catch_up(&self, within: Duration) -> Option<String> {
        let on_disk = crate::loader::FileId::at(&self.library)?;
        let seen = self.seen.lock().clone();
        match seen {
            Some((file, None)) if file == on_disk => return None,
            Some((file, Some(why))) if file == on_disk => return Some(self.refused_note(&why)),
            _ => {}
        }
        let deadline = Instant::now() + within;
        loop {
            match self.reload(false) {
                Ok(_) => {
                    return match self.seen.lock().clone() {
                        Some((_, Some(why))) => Some(self.refused_note(&why)),
                        _ => None,
                    }
                }
                Err(e) if e.is_incomplete() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(LoadError::Missing(_)) => return None,
                Err(e) => return Some(self.refused_note(&e.to_string())),
            }
        }
    }

    fn refused_note(&self, why: &str) -> String {
        format!(
            "the build on disk was not loaded ({why}); generation {} answered",
            self.generation_number()
        )
    }

    /// Calls an exported function with typed arguments and result, through
    /// serde: `args` is one argument, or a tuple of several (`&(2, 3)`), or
    /// `&()` for none; the JSON result is decoded into `R`. A value that
    /// serializes as a sequence is taken as the list of arguments: pass one
    /// sequence argument as a 1-tuple, `&(vec![1, 2],)`.
    ///
    /// ```no_run
    /// # let host = keepwarm::Host::new(keepwarm::Config::new("libexample_plugin.so")).unwrap();
    /// let square: u64 = host.call("square", &10u64)?;
    /// let primes: u64 = host.call("count_primes", &(100u64,))?;
    /// let version: String = host.call("version", &())?;
    /// # Ok::<(), keepwarm::CallError>(())
    /// ```
    pub fn call<R, A>(&self, function: &str, args: &A) -> Result<R, CallError>
    where
        R: serde::de::DeserializeOwned,
        A: serde::Serialize + ?Sized,
    {
        let args = match serde_json::to_value(args) {
            Ok(serde_json::Value::Array(all)) => all,
            Ok(serde_json::Value::Null) => Vec::new(),
            Ok(one) => vec![one],
            Err(e) => {
                return Err(CallError::BadArguments(format!(
                    "the arguments of `{function}` do not serialize to JSON: {e}"
                )))
            }
        };
        let value = self.call_json(function, &args)?;
        serde_json::from_value(value.clone()).map_err(|e| {
            CallError::BadResult(format!(
                "the result of `{function}` ({value}) is not a {}: {e}",
                std::any::type_name::<R>()
            ))
        })
    }

    /// Calls an exported function with JSON arguments, returning its JSON
    /// result. The generation stays alive for the duration of the call.
    pub fn call_json(
        &self,
        function: &str,
        args: &[serde_json::Value],
    ) -> Result<serde_json::Value, CallError> {
        // A thread that calls plugins through the host is the host's (or
        // its embedder's), not one a plugin started.
        crate::threads::register_current();
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
            waiting: self.waiting.lock().clone(),
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
