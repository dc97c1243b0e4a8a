//! `keepwarm`: the hot-reload host as a library. The binary `keepwarm` is a
//! thin shell around it.
//!
//! A [`Host`] loads a plugin library (see `keepwarm-api` for the ABI) into a
//! new *generation*, watches the file, and swaps in a new generation whenever
//! a complete new build lands. Memoized results live in named caches owned by
//! the host ([`cache::Store`]), so they survive every reload.
//!
//! | module | role |
//! | --- | --- |
//! | [`loader`] | readiness check, shadow copy, dlopen, ABI check |
//! | [`generation`] | one loaded version and the calls into it |
//! | [`host`] | the current generation, reloading, status |
//! | [`cache`] | named LRU caches and their figures |
//! | [`host_api`] | the `extern "C"` functions plugins call |
//! | [`watcher`] | file events to reloads |
//! | [`control`] | the control socket, its protocol and commands |
//! | [`repl`] | the prompt of `keepwarm run` |
//! | [`serve`] | what `run` and `dev` share: socket, watcher, prompt |
//! | [`dev`] | `keepwarm dev`: build, serve, rebuild on source changes |
//!
//! Embedding the host (the plugin path is whatever your build produced):
//!
//! ```no_run
//! let host = keepwarm::Host::new(keepwarm::Config::new("target/debug/libexample_plugin.so"))?;
//! host.reload(false)?; // prints "keepwarm: generation 1 loaded in ... ms"
//! let _watch = keepwarm::watcher::watch(host.clone())?;
//! assert_eq!(host.call("square", &[10.into()])?, serde_json::json!(100));
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

pub mod cache;
pub mod cli;
pub mod control;
pub mod dev;
pub mod generation;
pub mod host;
pub mod host_api;
pub mod loader;
pub mod output;
pub mod paths;
pub mod repl;
pub mod serve;
pub mod threads;
pub mod watcher;

pub use generation::CallError;
pub use host::{Config, Host, Reloaded, Status};
pub use loader::LoadError;
