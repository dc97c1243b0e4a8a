//! `keepwarm`: the hot-reload runtime as a library. It loads a plugin
//! library, watches the file, swaps in each complete new build, and keeps
//! memoized results in host-owned caches across reloads. It never prints and
//! never exits the process: it returns values and sends typed [`Event`]s to
//! the sink its [`Config`] names. The `keepwarm` binary (crate
//! `keepwarm-cli`) is one user of it; an application can embed it the same
//! way.
//!
//! A [`Host`] loads a plugin (see `keepwarm-abi` for the C ABI and
//! `keepwarm-api` for the Rust SDK) into a new *generation*; the
//! [`watcher`] reloads it when a new build lands; [`control`] serves the
//! control socket (`keepwarm call …`). Memoized results live in named caches
//! ([`cache::Store`]), so they survive every reload.
//!
//! | module | role |
//! | --- | --- |
//! | [`loader`] | readiness check, shadow copy, dlopen, ABI check |
//! | [`generation`] | one loaded version and the calls into it |
//! | [`host`] | the current generation, reloading, status, typed calls |
//! | [`events`] | what the host reports: loads, refusals, plugin logs |
//! | [`cache`] | named LRU caches and their figures |
//! | [`host_api`] | the `extern "C"` functions plugins call |
//! | [`watcher`] | file events to reloads |
//! | [`control`] | the control socket, its protocol and one handler per command |
//! | [`paths`] | the runtime directory, shadow directories, default socket |
//! | [`epochs`] | the epoch page `keepwarm serve`'s clients map to check their copies |
//! | [`threads`] | the host's threads, told apart from those a plugin starts |
//! | [`journal`] | the crash journal: cache changes in memory that outlives a crashed worker |
//! | [`supervision`] | what `keepwarm run`'s supervisor learns from a worker that crashed |
//! | [`shared`] | the shared tier on Redis (`--shared`): read-through, write-behind, checked values |
//!
//! Embedding the host (the plugin path is whatever your build produced; see
//! `host/examples/embed.rs` for a whole program):
//!
//! ```no_run
//! use keepwarm::{Config, Event, Host};
//!
//! let config = Config::new("target/debug/libexample_plugin.so").on_event(|event: &Event| {
//!     if let Event::Loaded { generation, .. } = event {
//!         eprintln!("generation {generation} is live");
//!     }
//! });
//! let host = Host::new(config)?;
//! host.reload(false)?;
//! let _watch = keepwarm::watcher::watch(host.clone())?; // reloads on rebuilds
//! let square: u64 = host.call("square", &10u64)?;
//! assert_eq!(square, 100);
//! host.shutdown(std::time::Duration::from_secs(5));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The cache store needs no plugin:
//!
//! ```
//! use keepwarm::cache::Store;
//! let store = Store::default();
//! store.cache("square").put(b"10", b"100").unwrap();
//! assert_eq!(&*store.cache("square").get(b"10").unwrap(), b"100");
//! assert_eq!(store.reset("square"), Some(1));
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

mod boundary;
pub mod cache;
pub mod control;
pub mod epochs;
pub mod error;
pub mod events;
pub mod generation;
pub mod host;
pub mod host_api;
pub mod in_flight;
pub mod journal;
mod json;
pub mod loader;
pub mod paths;
pub mod persist;
pub mod shared;
pub mod signature;
pub mod supervision;
pub mod threads;
pub mod watcher;

pub use error::Error;
pub use events::{Event, EventSink};
pub use generation::CallError;
pub use host::{Config, Host, Plugin, PluginStatus, Reloaded, Status};
pub use loader::LoadError;
