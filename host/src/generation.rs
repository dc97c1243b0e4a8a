//! A generation: one loaded version of the plugin, and the calls into it.
//!
//! The host holds the current generation as an `Arc`; each call clones the
//! `Arc` for its duration. Swapping in a new generation therefore never waits
//! for calls, and the old one retires (on_unload, dlclose, shadow removed)
//! when its last in-flight call returns and drops the last reference.

use std::time::{Duration, SystemTime};

use keepwarm_abi::{self as abi, KwSlice};

use crate::host_api::HostTable;
use crate::loader::{output_to, Library};

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// No generation is loaded.
    NotLoaded,
    /// The plugin exports no function of that name.
    UnknownFunction {
        /// The name asked for.
        name: String,
        /// The names it does export.
        available: Vec<String>,
    },
    /// The function returned an error.
    Failed(String),
    /// The function panicked (the panic was caught inside the plugin).
    Panicked(String),
    /// The function returned something that is not JSON, or an unknown
    /// status, or (typed calls) not the type asked for.
    BadResult(String),
    /// Typed calls: the arguments do not serialize to JSON.
    BadArguments(String),
    /// Several plugins export a function of that name.
    Ambiguous {
        /// The name asked for.
        name: String,
        /// The plugins that export it.
        plugins: Vec<String>,
    },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NotLoaded => write!(
                f,
                "no plugin is loaded (see `keepwarm status` for the last error)"
            ),
            CallError::UnknownFunction { name, available } => write!(
                f,
                "the plugin exports no function `{name}`; it exports: {}",
                available.join(", ")
            ),
            CallError::Failed(m) => write!(f, "{m}"),
            CallError::Panicked(m) => write!(f, "{m}"),
            CallError::BadResult(m) | CallError::BadArguments(m) => write!(f, "{m}"),
            CallError::Ambiguous { name, plugins } => {
                let choices: Vec<String> = plugins.iter().map(|p| format!("{p}::{name}")).collect();
                write!(
                    f,
                    "{} plugins export `{name}` ({}); call one of: {}",
                    plugins.len(),
                    plugins.join(", "),
                    choices.join(", ")
                )
            }
        }
    }
}

impl std::error::Error for CallError {}

/// One loaded version of the plugin.
pub struct Generation {
    /// 1 for the first load, then one more per successful reload.
    pub number: u64,
    /// crc32 of the library's bytes, to skip reloading identical content.
    pub content_hash: u32,
    /// The identity of the file it was read from.
    pub file: crate::loader::FileId,
    /// When it went live.
    pub loaded_at: SystemTime,
    /// How long loading it took.
    pub load_time: Duration,
    library: Library,
    table: HostTable,
}

impl Drop for Generation {
    fn drop(&mut self) {
        // on_unload may still use the table; after it returns, every call
        // through the table answers KW_RETIRED (a thread the plugin left
        // running gets that instead of a crash).
        let left = self.library.unload();
        self.table.retire();
        if !left.is_empty() {
            self.table.emit(&crate::Event::ThreadsLeft {
                generation: self.number,
                threads: left.iter().map(|&t| t as u64).collect(),
            });
        }
    }
}

impl Generation {
    /// A generation made of a loaded library and the table it was given.
    pub fn new(
        number: u64,
        content_hash: u32,
        file: crate::loader::FileId,
        load_time: Duration,
        library: Library,
        table: HostTable,
    ) -> Generation {
        Generation {
            number,
            content_hash,
            file,
            loaded_at: SystemTime::now(),
            load_time,
            library,
            table,
        }
    }

    /// The plugin's name.
    pub fn plugin_name(&self) -> &str {
        &self.library.name
    }

    /// The names of the exported functions, in declaration order.
    pub fn function_names(&self) -> Vec<String> {
        self.library
            .functions
            .iter()
            .map(|f| f.name.clone())
            .collect()
    }

    /// The exported functions with the signature text each declares.
    pub fn function_signatures(&self) -> Vec<(String, Option<String>)> {
        self.library
            .functions
            .iter()
            .map(|f| (f.name.clone(), f.signature.clone()))
            .collect()
    }

    /// The library's declared caches.
    pub fn library(&self) -> &Library {
        &self.library
    }

    /// Calls `function` with `args` (a JSON array) and returns the JSON the
    /// plugin wrote.
    pub fn call(&self, function: &str, args: &[u8]) -> Result<Vec<u8>, CallError> {
        let f = self
            .library
            .functions
            .iter()
            .find(|f| f.name == function)
            .ok_or_else(|| CallError::UnknownFunction {
                name: function.to_owned(),
                available: self.function_names(),
            })?;
        let mut buf = Vec::new();
        let mut out = output_to(&mut buf);
        // SAFETY: `call` is an exported shell of this generation's library,
        // which stays loaded while `self` lives; `args` and `out` are valid
        // for the call. The shell catches panics inside the plugin.
        let status = unsafe { (f.call)(KwSlice::from_bytes(args), &mut out) };
        let text = || String::from_utf8_lossy(&buf).into_owned();
        match status {
            abi::KW_OK => Ok(buf),
            abi::KW_ERROR => Err(CallError::Failed(text())),
            abi::KW_PANIC => Err(CallError::Panicked(text())),
            other => Err(CallError::BadResult(format!(
                "the plugin function `{function}` returned unknown status {other}: {}",
                text()
            ))),
        }
    }
}
