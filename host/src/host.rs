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
    /// Keep the caches in the durable store in this directory
    /// (`--persist DIR`): a host started again on it is warm at once.
    pub persist: Option<PathBuf>,
    /// The durable store's byte bound (`--persist-max-bytes`); `None`: a
    /// quarter of the free space of its file system.
    pub persist_max_bytes: Option<u64>,
    /// Set in a worker of `keepwarm run`'s supervisor: the build to start
    /// on, the builds not to load, the crashes so far (see
    /// [`crate::supervision`]).
    pub supervised: Option<crate::supervision::Supervised>,
    /// Set in a worker of `keepwarm run`'s supervisor without `--persist`:
    /// the crash journal the caches are recorded in, and restored from
    /// (see [`crate::journal`]). Ignored with `persist`, whose store
    /// survives a crash by itself.
    pub journal: Option<Arc<crate::journal::Journal>>,
    /// A shared tier on a Redis server behind the local ones (`--shared
    /// URL`): see [`crate::shared`].
    pub shared: Option<crate::shared::SharedConfig>,
}

impl Default for Config {
    /// A configuration with no library (for [`Host::without_plugin`]), no
    /// overrides and no event sink.
    fn default() -> Config {
        Config::new(PathBuf::new())
    }
}

impl Config {
    /// A configuration for `library` with no overrides and no event sink.
    pub fn new(library: impl Into<PathBuf>) -> Config {
        Config {
            library: library.into(),
            cache_bounds: HashMap::new(),
            events: None,
            then: None,
            persist: None,
            persist_max_bytes: None,
            supervised: None,
            journal: None,
            shared: None,
        }
    }

    /// Keeps the caches in the durable store in `dir` (`--persist DIR`).
    pub fn persist(mut self, dir: impl Into<PathBuf>) -> Config {
        self.persist = Some(dir.into());
        self
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
    /// Every plugin of the host (the fields above are the first one's).
    pub plugins: Vec<PluginStatus>,
    /// The calls running now, oldest first.
    pub calls_in_flight: Vec<crate::in_flight::CallInFlight>,
    /// Each function of `functions` with its signature, in the same order.
    pub signatures: Vec<crate::signature::Signature>,
    /// The PID of the process running plugin code (`pid` is the supervisor's
    /// when one runs it, the same otherwise).
    pub worker_pid: u32,
    /// Times the supervisor restarted the worker after a crash.
    pub restarts: u64,
    /// The last crash, if any.
    pub last_crash: Option<crate::supervision::Crash>,
    /// Builds that are not loaded again until the file changes.
    pub bad_builds: Vec<crate::supervision::BadBuild>,
    /// The shared tier (`--shared`), if there is one.
    pub shared: Option<crate::shared::SharedStatus>,
}

/// One plugin's part of [`Status`].
#[derive(Debug, Clone, PartialEq)]
pub struct PluginStatus {
    /// The watched library path.
    pub library: String,
    /// The plugin's name, when one is loaded.
    pub plugin: Option<String>,
    /// The live generation (0: nothing loaded yet).
    pub generation: u64,
    /// Its exported functions.
    pub functions: Vec<String>,
    /// Why the last load failed, if the last attempt failed.
    pub last_error: Option<String>,
    /// Set while the library path is missing.
    pub waiting: Option<String>,
    /// How many loads failed.
    pub failed_reloads: u64,
    /// How long the live generation took to load, in milliseconds.
    pub load_ms: Option<f64>,
    /// When the live generation went live, in seconds since the Unix epoch.
    pub loaded_at: Option<f64>,
}

impl PluginStatus {
    /// As a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "library": self.library,
            "plugin": self.plugin,
            "generation": self.generation,
            "functions": self.functions,
            "last_error": self.last_error,
            "waiting": self.waiting,
            "failed_reloads": self.failed_reloads,
            "load_ms": self.load_ms,
            "loaded_at": self.loaded_at,
        })
    }

    /// From that JSON object.
    pub fn from_json(value: &serde_json::Value) -> Result<PluginStatus, String> {
        let o = crate::json::Object::new(
            value,
            "a plugin's status",
            &[
                "library",
                "plugin",
                "generation",
                "functions",
                "last_error",
                "waiting",
                "failed_reloads",
                "load_ms",
                "loaded_at",
            ],
        )?;
        Ok(PluginStatus {
            library: o.str("library")?,
            plugin: o.opt_str("plugin")?,
            generation: o.u64("generation")?,
            functions: o.strings("functions")?,
            last_error: o.opt_str("last_error")?,
            waiting: o.opt_str("waiting")?,
            failed_reloads: o.u64("failed_reloads")?,
            load_ms: o.opt_f64("load_ms")?,
            loaded_at: o.opt_f64("loaded_at")?,
        })
    }
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
            "plugins": self.plugins.iter().map(PluginStatus::to_json).collect::<Vec<_>>(),
            "calls_in_flight": self
                .calls_in_flight
                .iter()
                .map(crate::in_flight::CallInFlight::to_json)
                .collect::<Vec<_>>(),
            "signatures": self
                .signatures
                .iter()
                .map(crate::signature::Signature::to_json)
                .collect::<Vec<_>>(),
            "worker_pid": self.worker_pid,
            "restarts": self.restarts,
            "last_crash": self.last_crash.as_ref().map(crate::supervision::Crash::to_json),
            "bad_builds": self
                .bad_builds
                .iter()
                .map(crate::supervision::BadBuild::to_json)
                .collect::<Vec<_>>(),
            "shared": self.shared.as_ref().map(|s| serde_json::json!({
                "url": s.url,
                "prefix": s.prefix,
                "state": s.state,
                "last_error": s.last_error,
            })),
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
                "plugins",
                "calls_in_flight",
                "signatures",
                "worker_pid",
                "restarts",
                "last_crash",
                "bad_builds",
                "shared",
            ],
        )?;
        let pid = u32::try_from(o.u64("pid")?).map_err(|e| format!("pid: {e}"))?;
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
            pid,
            plugins: o
                .array_or_empty("plugins")?
                .iter()
                .map(PluginStatus::from_json)
                .collect::<Result<_, _>>()?,
            calls_in_flight: o
                .array_or_empty("calls_in_flight")?
                .iter()
                .map(crate::in_flight::CallInFlight::from_json)
                .collect::<Result<_, _>>()?,
            signatures: o
                .array_or_empty("signatures")?
                .iter()
                .map(crate::signature::Signature::from_json)
                .collect::<Result<_, _>>()?,
            worker_pid: match o.opt_u64("worker_pid")? {
                Some(w) => u32::try_from(w).map_err(|e| format!("worker_pid: {e}"))?,
                None => pid,
            },
            restarts: o.u64_or_0("restarts")?,
            last_crash: match value.get("last_crash") {
                None | Some(serde_json::Value::Null) => None,
                Some(c) => Some(crate::supervision::Crash::from_json(c)?),
            },
            bad_builds: o
                .array_or_empty("bad_builds")?
                .iter()
                .map(crate::supervision::BadBuild::from_json)
                .collect::<Result<_, _>>()?,
            shared: match value.get("shared") {
                None | Some(serde_json::Value::Null) => None,
                Some(s) => Some(crate::shared::SharedStatus::from_json(s)?),
            },
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
    /// The first load reads this copy of a build that worked, as this
    /// generation (a supervised worker's restart).
    start_from: Option<(PathBuf, u64)>,
    /// Set by [`Host::shutdown`]: nothing loads any more.
    shut_down: bool,
    /// The content that failed last, so the same broken bytes are reported once.
    failed_hash: Option<u32>,
}

/// Everything the plugins of one host share: the caches, where events go,
/// the shadow directory, the `then` function.
struct Shared {
    store: Arc<Store>,
    events: Arc<RwLock<Option<EventSink>>>,
    then: Option<String>,
    shadow_dir: crate::paths::ShadowDir,
    /// Successful loads of any plugin so far (see [`Host::loads`]).
    loads: std::sync::atomic::AtomicU64,
    /// The calls running now.
    calls: Arc<crate::in_flight::Calls>,
    /// What the supervisor said, when a supervisor runs this host.
    supervised: Option<crate::supervision::Supervised>,
    /// Builds not to load (a supervisor found they crash), with how.
    bad_builds: RwLock<Vec<crate::supervision::BadBuild>>,
}

impl Shared {
    fn emit(&self, event: &Event) {
        send(&self.events, event)
    }

    /// How the build with content `hash` crashed, if a supervisor found it
    /// bad.
    fn crashed(&self, hash: u32) -> Option<String> {
        self.bad_builds
            .read()
            .iter()
            .find(|b| b.hash == hash)
            .map(|b| format!("{}, as generation {}", b.why, b.generation))
    }

    /// The sink the host tables of this host's generations report to (it
    /// follows [`Host::set_event_sink`]).
    fn sink(&self) -> EventSink {
        let events = Arc::clone(&self.events);
        Arc::new(move |event| send(&events, event))
    }
}

/// The store of `--persist DIR`: the durable tier opened (locked, checked,
/// a damaged file moved aside), its caches known at once.
fn open_durable(
    dir: &Path,
    max_bytes: Option<u64>,
    overrides: HashMap<String, Bounds>,
    events: &Arc<RwLock<Option<EventSink>>>,
) -> crate::error::Result<Store> {
    let tier = crate::persist::SqliteTier::open(dir, max_bytes)
        .map_err(|e| crate::error::Error::new(e.to_string()))?;
    for note in &tier.notes {
        send(
            events,
            &Event::Store {
                message: note.clone(),
            },
        );
    }
    let warned = Arc::clone(events);
    let durable = crate::cache::Durable::new(
        Arc::new(tier),
        Arc::new(move |message: &str| {
            send(
                &warned,
                &Event::Store {
                    message: message.to_owned(),
                },
            )
        }),
    );
    let store = Store::with_durable(overrides, Arc::new(durable)).map_err(|e| {
        crate::error::Error::new(format!("reading the cache store in {}: {e}", dir.display()))
    })?;
    let known = store.all().len();
    send(
        events,
        &Event::Store {
            message: format!(
                "caches persist in {} ({known} cache{} there)",
                dir.join(crate::persist::FILE_NAME).display(),
                if known == 1 { "" } else { "s" }
            ),
        },
    );
    Ok(store)
}

/// The store of a supervised worker without `--persist`: memory caches
/// recorded in the crash journal, refilled from what it held.
fn open_journal(
    journal: Arc<crate::journal::Journal>,
    overrides: HashMap<String, Bounds>,
    events: &Arc<RwLock<Option<EventSink>>>,
) -> Store {
    let warned = Arc::clone(events);
    let warn: Arc<dyn Fn(&str) + Send + Sync> = Arc::new(move |message: &str| {
        send(
            &warned,
            &Event::Store {
                message: message.to_owned(),
            },
        )
    });
    {
        let warn = Arc::clone(&warn);
        journal.on_warning(move |m| warn(m));
    }
    let replayed = journal.take_replayed();
    for note in &replayed.notes {
        warn(note);
    }
    let durable = crate::cache::Durable::new(Arc::new(crate::journal::JournalTier(journal)), warn);
    let store = Store::with_durable(overrides, Arc::new(durable))
        .expect("the crash journal lists its caches without failing");
    store.restore(replayed);
    store
}

/// Sends `event` to the sink in `events`, if there is one (no lock held
/// while the sink runs).
fn send(events: &RwLock<Option<EventSink>>, event: &Event) {
    let sink = events.read().clone();
    if let Some(sink) = sink {
        sink(event)
    }
}

/// One plugin library of a host: the file it watches, its live generation,
/// and how its last loads went. Its caches are the host's.
pub struct Plugin {
    /// Its place among the host's plugins (0 for the first).
    index: usize,
    library: PathBuf,
    shared: Arc<Shared>,
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
    /// [`Plugin::catch_up`]).
    seen: Mutex<Option<(crate::loader::FileId, Option<String>)>>,
    failed_reloads: Mutex<u64>,
}

/// A running keepwarm host: the plugins it serves (one or more libraries,
/// each watched and reloaded on its own), and the caches they share.
pub struct Host {
    shared: Arc<Shared>,
    plugins: RwLock<Vec<Arc<Plugin>>>,
    /// The epoch page clients map (`keepwarm serve`), once attached.
    epochs: std::sync::OnceLock<Arc<crate::epochs::EpochPage>>,
}

impl Plugin {
    fn new(index: usize, library: PathBuf, shared: Arc<Shared>) -> Plugin {
        let supervised = shared.supervised.as_ref();
        let state = ReloadState {
            next_generation: supervised.map_or(1, |s| s.next_generation.max(1)),
            start_from: supervised
                .and_then(|s| s.start_from.clone())
                .filter(|_| index == 0),
            shut_down: false,
            failed_hash: None,
        };
        Plugin {
            index,
            library,
            shared,
            current: RwLock::new(None),
            reload: Mutex::new(state),
            last_error: Mutex::new(None),
            last_transient: Mutex::new(None),
            waiting: Mutex::new(None),
            seen: Mutex::new(None),
            failed_reloads: Mutex::new(0),
        }
    }

    /// The watched library path (absolute).
    pub fn library(&self) -> &Path {
        &self.library
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

    /// The plugin's name (from its descriptor), or its file's stem before
    /// the first load.
    pub fn name(&self) -> String {
        match self.current() {
            Some(g) => g.plugin_name().to_owned(),
            None => self
                .library
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// Loads the library if its content differs from the live generation's
    /// (or always, with `force`). On failure the live generation keeps
    /// serving. An incomplete file is returned as
    /// `Err(LoadError::Incomplete)` without being counted or reported, so the
    /// watcher can retry; use [`Plugin::report_failure`] when it gives up.
    pub fn reload(&self, force: bool) -> Result<Reloaded, LoadError> {
        let started = Instant::now();
        let mut state = self.reload.lock();
        if state.shut_down {
            return Ok(Reloaded::Unchanged);
        }
        let start_from = state.start_from.take();
        let from = start_from.as_ref().map_or(&self.library, |(path, _)| path);
        let (bytes, file) = match crate::loader::read_library(from) {
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
        let number = start_from.as_ref().map_or(state.next_generation, |s| s.1);
        let crashed = (!force)
            .then(|| self.shared.crashed(hash))
            .flatten()
            .map(LoadError::Crashed);
        let result = match crashed {
            Some(e) => Err(e),
            None => {
                if self.index == 0 {
                    crate::supervision::note_loading(number, hash);
                }
                let result = self.load_generation(number, hash, file, &bytes, started);
                if self.index == 0 {
                    crate::supervision::note_load_over(
                        result.as_ref().ok().map(|_| (number, hash)),
                    );
                }
                result
            }
        };
        if start_from.is_some() {
            // Read from a kept copy: what the watched path holds is still to
            // be looked at.
            *self.seen.lock() = None;
        }
        match result {
            Ok((generation, reset)) => {
                state.next_generation = state.next_generation.max(number + 1);
                // A bad build that a forced reload retried, and that loaded.
                self.shared.bad_builds.write().retain(|b| b.hash != hash);
                state.failed_hash = None;
                *self.last_transient.lock() = None;
                *self.last_error.lock() = None;
                if start_from.is_none() {
                    *self.seen.lock() = Some((file, None));
                }
                let first = self.current.read().is_none();
                let event = self.loaded_event(&generation, &reset, first);
                // The swap: new calls go to the new generation at once; the
                // old one retires when its in-flight calls drop their Arcs.
                let old = self.current.write().replace(generation);
                drop(old);
                self.shared
                    .loads
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                self.shared.emit(&event);
                drop(state);
                // A restart on a kept build is not a new build: `--then`
                // already ran for it (and may be what crashed).
                if start_from.is_none() {
                    self.run_then();
                }
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
        let shadow = self.shared.shadow_dir.path().join(match self.index {
            0 => format!("gen-{number}-{}", self.file_name()),
            i => format!("p{i}-gen-{number}-{}", self.file_name()),
        });
        let mut library = Library::open(bytes, shadow.clone())?;
        let declared = library
            .caches
            .iter()
            .filter(|d| d.code_hash != 0)
            .map(|d| (Box::from(d.name.as_bytes()), d.code_hash))
            .collect();
        let table = HostTable::new(
            number,
            Arc::clone(&self.shared.store),
            self.shared.sink(),
            declared,
            &library.name,
        );
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
            if self
                .shared
                .store
                .declare(&decl.name, decl.bounds, decl.code_hash)
            {
                reset.push(decl.name.clone());
            }
        }
        let generation = Generation::new(number, hash, file, started.elapsed(), library, table);
        if let (0, Some(dir)) = (
            self.index,
            self.shared
                .supervised
                .as_ref()
                .and_then(|s| s.keep_builds.as_ref()),
        ) {
            crate::supervision::keep_build(dir, &shadow, number, hash);
        }
        Ok((Arc::new(generation), reset))
    }

    fn loaded_event(&self, g: &Generation, reset: &[String], first: bool) -> Event {
        let kept = self
            .shared
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
            first,
            file: self.file_name(),
            load_ms: g.load_time.as_secs_f64() * 1000.0,
            functions: g.function_names().len(),
            kept,
            reset: reset.to_vec(),
        }
    }

    /// Calls the `--then` function, if any, and reports what it answered.
    fn run_then(&self) {
        let Some(function) = &self.shared.then else {
            return;
        };
        // With several plugins, the one that exports it (the first plugin
        // reports that it does not).
        let exports = self
            .current()
            .is_some_and(|g| g.function_names().iter().any(|f| f == function));
        if !exports && self.index > 0 {
            return;
        }
        let outcome = self.call_json(function, &[]).map_err(|e| e.to_string());
        self.shared.emit(&Event::Then {
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
            self.shared.emit(&Event::Waiting {
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
        self.shared.emit(&Event::Refused {
            file,
            error: error.to_string(),
            serving: self.current().map(|g| g.number),
        });
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

    /// Calls a function this plugin exports, with JSON arguments.
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
        let _running = self.shared.calls.start(function, &args, generation.number);
        let _noted = crate::supervision::note_call(function, generation.number);
        let bytes = generation.call(function, &args)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            CallError::BadResult(format!(
                "the plugin function `{function}` returned invalid JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            ))
        })
    }

    /// Stops loading, waits until `deadline` for calls in flight on the live
    /// generation, then unloads it. False when calls were still running.
    fn shut_down(&self, deadline: Instant) -> bool {
        // Hold the reload lock to the end: no new generation after this.
        let mut state = self.reload.lock();
        state.shut_down = true;
        let generation = self.current.write().take();
        let mut drained = true;
        if let Some(generation) = generation {
            while Arc::strong_count(&generation) > 1 {
                if Instant::now() >= deadline {
                    drained = false;
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(generation);
        }
        drained
    }

    /// This plugin's part of the status.
    pub fn status(&self) -> PluginStatus {
        let g = self.current();
        PluginStatus {
            library: self.library.display().to_string(),
            plugin: g.as_ref().map(|g| g.plugin_name().to_owned()),
            generation: g.as_ref().map_or(0, |g| g.number),
            functions: g.as_ref().map(|g| g.function_names()).unwrap_or_default(),
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
        }
    }
}

impl Host {
    /// A host for `config`, with nothing loaded yet (call [`Host::reload`]).
    /// Its first plugin is `config.library`; add more with [`Host::load`].
    pub fn new(config: Config) -> crate::error::Result<Arc<Host>> {
        let library = config.library.clone();
        let host = Host::without_plugin(config)?;
        host.add(&library)?;
        Ok(host)
    }

    /// A host of caches only (`keepwarm serve`): `config.library` is
    /// ignored and no plugin is loaded (a `call` answers
    /// [`CallError::NotLoaded`]); everything else works. Plugins may still
    /// be added with [`Host::add`] or [`Host::load`].
    ///
    /// ```
    /// let host = keepwarm::Host::without_plugin(keepwarm::Config::default()).unwrap();
    /// host.store().cache("square").put(b"10", b"100").unwrap();
    /// assert_eq!(host.reset("square"), Some(1));
    /// assert!(host.call_json("square", &[]).is_err());
    /// ```
    pub fn without_plugin(config: Config) -> crate::error::Result<Arc<Host>> {
        // A private directory (mode 0700, removed on shutdown) for shadow
        // copies; those of hosts that died are swept first.
        let runtime = crate::paths::runtime_dir()?;
        crate::paths::sweep_dead_shadow_dirs(&runtime);
        let shadow_dir = crate::paths::ShadowDir::create_in(&runtime)?;
        let events = Arc::new(RwLock::new(config.events));
        let store = match (&config.persist, config.journal) {
            (Some(dir), _) => {
                open_durable(dir, config.persist_max_bytes, config.cache_bounds, &events)?
            }
            (None, Some(journal)) => open_journal(journal, config.cache_bounds, &events),
            (None, None) => Store::with_overrides(config.cache_bounds),
        };
        if let Some(shared) = config.shared {
            let warned = Arc::clone(&events);
            let tier = crate::shared::SharedTier::connect(
                shared,
                Arc::new(move |message: &str| {
                    send(
                        &warned,
                        &Event::Shared {
                            message: message.to_owned(),
                        },
                    )
                }),
            )
            .map_err(crate::error::Error::new)?;
            store.set_shared(Arc::new(tier));
        }
        let bad_builds = config
            .supervised
            .as_ref()
            .map(|s| s.bad_builds.clone())
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            store: Arc::new(store),
            events,
            then: config.then,
            shadow_dir,
            loads: std::sync::atomic::AtomicU64::new(0),
            calls: Arc::default(),
            supervised: config.supervised,
            bad_builds: RwLock::new(bad_builds),
        });
        Ok(Arc::new(Host {
            shared,
            plugins: RwLock::new(Vec::new()),
            epochs: std::sync::OnceLock::new(),
        }))
    }

    /// Adds the plugin library at `library` to the host and loads it as the
    /// first load of `keepwarm run` does ([`crate::watcher::load_initial`]:
    /// a file still being written is waited out, a failure is reported as an
    /// event and the plugin stays, waiting for a build that loads); it shares
    /// the host's caches. Watch it with [`crate::watcher::watch_plugin`] (or
    /// `watcher::watch`, which watches every plugin).
    pub fn load(&self, library: impl AsRef<Path>) -> crate::error::Result<Arc<Plugin>> {
        let plugin = self.add(library.as_ref())?;
        crate::watcher::load_initial_plugin(&plugin);
        Ok(plugin)
    }

    /// Adds the plugin library at `library` without loading it: the watcher
    /// ([`crate::watcher::watch`]) and [`crate::watcher::load_initial`] take
    /// it from there, as for the first. Adding a library twice gives the same
    /// plugin.
    pub fn add(&self, library: &Path) -> crate::error::Result<Arc<Plugin>> {
        use crate::error::Context;
        let library =
            std::path::absolute(library).context(|| format!("resolving {}", library.display()))?;
        let mut plugins = self.plugins.write();
        if let Some(existing) = plugins.iter().find(|p| p.library == library) {
            return Ok(Arc::clone(existing));
        }
        let plugin = Arc::new(Plugin::new(
            plugins.len(),
            library,
            Arc::clone(&self.shared),
        ));
        plugins.push(Arc::clone(&plugin));
        Ok(plugin)
    }

    /// The host's plugins, in the order they were added.
    pub fn plugins(&self) -> Vec<Arc<Plugin>> {
        self.plugins.read().clone()
    }

    /// The first plugin (the one [`Config::library`] names). Panics on a
    /// host without plugins ([`Host::without_plugin`]).
    pub fn first(&self) -> Arc<Plugin> {
        Arc::clone(&self.plugins.read()[0])
    }

    /// The first plugin's library path (absolute; empty without plugins).
    pub fn library(&self) -> PathBuf {
        self.plugins
            .read()
            .first()
            .map(|p| p.library.clone())
            .unwrap_or_default()
    }

    /// The first plugin's live generation, if any.
    pub fn current(&self) -> Option<Arc<Generation>> {
        self.plugins.read().first().and_then(|p| p.current())
    }

    /// The first plugin's live generation number (0 before its first load,
    /// and without plugins).
    pub fn generation_number(&self) -> u64 {
        self.current().map_or(0, |g| g.number)
    }

    /// Attaches the epoch page clients map (`keepwarm serve`): from now on
    /// every reset through the store writes the cache's new stamp there.
    /// False if a page was already attached.
    pub fn attach_epoch_page(&self, page: Arc<crate::epochs::EpochPage>) -> bool {
        if self.epochs.set(Arc::clone(&page)).is_err() {
            return false;
        }
        self.shared
            .store
            .on_reset(Arc::new(move |cache: &crate::cache::Cache| {
                page.bump(cache)
            }))
    }

    /// The epoch page, when one is attached.
    pub fn epoch_page(&self) -> Option<&Arc<crate::epochs::EpochPage>> {
        self.epochs.get()
    }

    /// How many loads of any plugin have succeeded: it changes whenever a
    /// new generation of any plugin goes live.
    pub fn loads(&self) -> u64 {
        self.shared.loads.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reloads every plugin whose file changed (all of them, with `force`);
    /// the outcome of the last one that loaded, else of the first.
    pub fn reload(&self, force: bool) -> Result<Reloaded, LoadError> {
        let mut outcome = None;
        for plugin in self.plugins() {
            let result = plugin.reload(force);
            match (&outcome, &result) {
                (None, _) | (Some(Ok(Reloaded::Unchanged)), Ok(Reloaded::Loaded { .. })) => {
                    outcome = Some(result)
                }
                (Some(Ok(_)), Err(_)) => outcome = Some(result),
                _ => {}
            }
        }
        outcome.unwrap_or(Ok(Reloaded::Unchanged))
    }

    /// Makes sure every plugin answers with the build on disk (see
    /// [`Plugin::catch_up`]); the first warning, if any.
    pub fn catch_up(&self, within: Duration) -> Option<String> {
        let mut warning = None;
        for plugin in self.plugins() {
            if let Some(w) = plugin.catch_up(within) {
                warning.get_or_insert(w);
            }
        }
        warning
    }

    /// The directory holding this host's shadow copies.
    pub fn shadow_dir(&self) -> &Path {
        self.shared.shadow_dir.path()
    }

    /// The caches.
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// Shuts the host down: waits up to `grace` for calls in flight to
    /// return, unloads every plugin (on_unload, dlclose) and removes the
    /// shadow directory. Returns false when calls were still running at the
    /// deadline (they keep their generation alive; its files are removed
    /// all the same). Further reloads do nothing.
    pub fn shutdown(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        let mut drained = true;
        for plugin in self.plugins() {
            drained &= plugin.shut_down(deadline);
        }
        // A call still running may yet store: the store stays locked then.
        if let (true, Some(durable)) = (drained, self.shared.store.durable()) {
            durable.tier.close();
        }
        // What the write-behind queue holds is written, for a moment.
        if let Some(tier) = self.shared.store.shared() {
            tier.close(Duration::from_millis(500));
        }
        self.shared.shadow_dir.remove();
        if let Some(page) = self.epochs.get() {
            page.close();
        }
        drained
    }

    /// Sends `event` to the sink, if there is one.
    pub fn emit(&self, event: &Event) {
        self.shared.emit(event)
    }

    /// Sends the host's events to `sink` from now on (`None`: nowhere).
    pub fn set_event_sink(&self, sink: Option<EventSink>) {
        *self.shared.events.write() = sink;
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
    /// result. The function is looked up in every plugin: `FN` when one
    /// plugin exports it, `PLUGIN::FN` to choose when several do. The
    /// generation stays alive for the duration of the call.
    pub fn call_json(
        &self,
        function: &str,
        args: &[serde_json::Value],
    ) -> Result<serde_json::Value, CallError> {
        self.route(function)?
            .call_json(function.rsplit("::").next().unwrap_or(function), args)
    }

    /// The plugin that answers `function` (`FN` or `PLUGIN::FN`).
    fn route(&self, function: &str) -> Result<Arc<Plugin>, CallError> {
        let plugins = self.plugins();
        if let Some((wanted, _)) = function.split_once("::") {
            let plugin = plugins
                .into_iter()
                .find(|p| p.name() == wanted)
                .ok_or_else(|| CallError::UnknownFunction {
                    name: function.to_owned(),
                    available: self.function_names(),
                })?;
            return match plugin.current() {
                Some(_) => Ok(plugin),
                None => Err(CallError::NotLoaded),
            };
        }
        if plugins.len() == 1 {
            return Ok(Arc::clone(&plugins[0]));
        }
        let exporting: Vec<Arc<Plugin>> = plugins
            .iter()
            .filter(|p| {
                p.current()
                    .is_some_and(|g| g.function_names().iter().any(|f| f == function))
            })
            .cloned()
            .collect();
        match exporting.len() {
            1 => Ok(Arc::clone(&exporting[0])),
            0 if plugins.iter().all(|p| p.current().is_none()) => Err(CallError::NotLoaded),
            0 => Err(CallError::UnknownFunction {
                name: function.to_owned(),
                available: self.function_names(),
            }),
            _ => Err(CallError::Ambiguous {
                name: function.to_owned(),
                plugins: exporting.iter().map(|p| p.name()).collect(),
            }),
        }
    }

    /// Every exported function, as a call names it (`PLUGIN::FN` for the
    /// names several plugins export).
    pub fn function_names(&self) -> Vec<String> {
        self.signatures().into_iter().map(|s| s.function).collect()
    }

    /// Every exported function with its signature, named as in
    /// [`Host::function_names`].
    pub fn signatures(&self) -> Vec<crate::signature::Signature> {
        let plugins = self.plugins();
        // Each plugin's name, and its functions with their signature text.
        type Functions = Vec<(String, Option<String>)>;
        let per: Vec<(String, Functions)> = plugins
            .iter()
            .map(|p| {
                (
                    p.name(),
                    p.current()
                        .map(|g| g.function_signatures())
                        .unwrap_or_default(),
                )
            })
            .collect();
        let mut all = Vec::new();
        for (plugin, functions) in &per {
            for (f, text) in functions {
                let shared = per
                    .iter()
                    .filter(|(_, fs)| fs.iter().any(|(g, _)| g == f))
                    .count()
                    > 1;
                let name = if shared {
                    format!("{plugin}::{f}")
                } else {
                    f.clone()
                };
                all.push(crate::signature::Signature::new(name, text.clone()));
            }
        }
        all
    }

    /// Figures of every cache, or of one.
    pub fn stats(&self, cache: Option<&str>) -> Option<Vec<CacheStats>> {
        match cache {
            None => Some(self.shared.store.stats()),
            Some(name) => self
                .shared
                .store
                .get(name)
                .map(|c| vec![c.stats_with_store()]),
        }
    }

    /// Resets one cache; `None` if there is no cache of that name.
    pub fn reset(&self, cache: &str) -> Option<u64> {
        self.shared.store.reset(cache)
    }

    /// Resets every cache; returns the entries dropped.
    pub fn reset_all(&self) -> u64 {
        self.shared.store.reset_all()
    }

    /// Drops, from the shared tier, the entries of the current code of
    /// `caches` (the identities their handles were opened with in the live
    /// generation); returns how many. `Err` when the host has no shared
    /// tier or the server failed.
    pub fn reset_shared(&self, caches: &[Arc<crate::cache::Cache>]) -> Result<u64, String> {
        let Some(tier) = self.shared.store.shared() else {
            return Err(
                "this host has no shared tier (start it with --shared redis://HOST:PORT)".into(),
            );
        };
        let prefixes: Vec<Vec<u8>> = caches.iter().flat_map(|c| c.shared_codes()).collect();
        if prefixes.is_empty() {
            return Ok(0);
        }
        tier.drop_prefixes(prefixes)
    }

    /// What is loaded: the first plugin's figures at the top (as with one
    /// plugin), and every plugin's under `plugins`.
    pub fn status(&self) -> Status {
        let plugins: Vec<PluginStatus> = self.plugins().iter().map(|p| p.status()).collect();
        let first = plugins.first().cloned().unwrap_or_else(|| PluginStatus {
            library: String::new(),
            plugin: None,
            generation: 0,
            functions: Vec::new(),
            last_error: None,
            waiting: None,
            failed_reloads: 0,
            load_ms: None,
            loaded_at: None,
        });
        let signatures = self.signatures();
        let sup = self.shared.supervised.as_ref();
        Status {
            library: first.library,
            plugin: first.plugin,
            generation: first.generation,
            functions: signatures.iter().map(|s| s.function.clone()).collect(),
            signatures,
            caches: self
                .shared
                .store
                .all()
                .iter()
                .map(|c| c.name().to_owned())
                .collect(),
            last_error: first.last_error,
            waiting: first.waiting,
            failed_reloads: plugins.iter().map(|p| p.failed_reloads).sum(),
            load_ms: first.load_ms,
            loaded_at: first.loaded_at,
            pid: sup.map_or_else(std::process::id, |s| s.supervisor_pid),
            worker_pid: std::process::id(),
            plugins,
            calls_in_flight: self.calls_in_flight(),
            restarts: sup.map_or(0, |s| s.restarts),
            last_crash: sup.and_then(|s| s.last_crash.clone()),
            bad_builds: self.shared.bad_builds.read().clone(),
            shared: self.shared.store.shared().map(|t| t.status()),
        }
    }

    /// The calls running now, oldest first.
    pub fn calls_in_flight(&self) -> Vec<crate::in_flight::CallInFlight> {
        self.shared.calls.snapshot()
    }
}
