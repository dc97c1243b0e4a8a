//! What the runtime tells its embedder: typed events, never printed lines.
//!
//! A [`Host`](crate::Host) sends each [`Event`] to the sink its
//! [`Config`](crate::Config) names (none by default: an embedded host is
//! silent). The `keepwarm` binary turns them into the lines its users read;
//! an embedding application may log, count or ignore them.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use keepwarm::{Config, Event};
//!
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let sink = Arc::clone(&seen);
//! let config = Config::new("target/debug/libexample_plugin.so")
//!     .on_event(move |event: &Event| sink.lock().unwrap().push(event.clone()));
//! # let _ = config;
//! ```

use std::path::PathBuf;
use std::sync::Arc;

/// Where a host sends its events.
pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

/// One cache and how many entries it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheCount {
    /// The cache's name.
    pub name: String,
    /// Its entries.
    pub entries: u64,
}

/// Something that happened in a host.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A generation went live.
    Loaded {
        /// Its number (1 for the first load).
        generation: u64,
        /// Whether no generation of this plugin served before it (the
        /// first load, or the first after builds that were refused).
        first: bool,
        /// The library's file name.
        file: String,
        /// How long loading took, in milliseconds.
        load_ms: f64,
        /// How many functions it exports.
        functions: usize,
        /// The caches that kept their entries, with their sizes.
        kept: Vec<CacheCount>,
        /// The caches reset because their code changed.
        reset: Vec<String>,
    },
    /// A build was refused; `serving` is the generation that still answers.
    Refused {
        /// The library's file name.
        file: String,
        /// Why, for people.
        error: String,
        /// The live generation, if one is loaded.
        serving: Option<u64>,
    },
    /// The library path is missing (deleted, not built yet); it loads when
    /// it is back.
    Waiting {
        /// The watched path.
        library: PathBuf,
        /// The live generation, if one is loaded.
        serving: Option<u64>,
    },
    /// The function named by [`Config::then`](crate::Config) answered
    /// after a load.
    Then {
        /// Its name.
        function: String,
        /// Its JSON result, or its error.
        outcome: Result<serde_json::Value, String>,
    },
    /// A line a plugin logged.
    Log {
        /// The generation that logged it.
        generation: u64,
        /// Its `KW_LOG_*` level.
        level: u32,
        /// The line.
        message: String,
    },
    /// A retired generation left threads running after its `on_unload`:
    /// its code stays mapped, so they cannot crash the host.
    ThreadsLeft {
        /// The generation.
        generation: u64,
        /// The kernel ids of the threads.
        threads: Vec<u64>,
    },
    /// Something the durable cache store (`--persist`) must say: where it
    /// is, a damaged file moved aside, a failing disk.
    Store {
        /// The sentence.
        message: String,
    },
    /// Something the shared tier (`--shared`) must say: the server is
    /// unreachable (once per outage), or back.
    Shared {
        /// The sentence.
        message: String,
    },
    /// Caches were reset through the control socket: one, or all.
    Reset {
        /// The cache, or `None` for all.
        cache: Option<String>,
        /// How many entries were dropped.
        dropped: u64,
    },
}
