//! `keepwarm-api`: what a plugin links against to be hot-reloaded by the
//! keepwarm host while its memoized results live on in host-owned caches.
//!
//! - [`abi`] holds the C ABI (version 1): the `#[repr(C)]` types and status
//!   codes, defined once. The host depends on this module, and
//!   `include/keepwarm.h` is generated from it for C plugins.
//! - [`host_cache_get`], [`host_cache_put`], [`host_cache_reset`] and
//!   [`log!`] are safe wrappers around the table of host functions the plugin
//!   receives at load; a [`HostCache`] static reaches one cache through a
//!   handle resolved once per generation (the fast path, which `#[memo]` uses).
//! - [`memo`] and [`export`] turn ordinary functions into memoized and
//!   callable ones; [`cached`] memoizes any computation in a named host cache.
//! - [`plugin!`] declares the plugin (its functions, caches and hooks) and
//!   generates the entry symbol `keepwarm_plugin`.
//!
//! A whole plugin (build it as a `cdylib`), with the attributes:
//!
//! ```
//! use keepwarm_api::{export, log, memo};
//!
//! #[export]
//! #[memo]
//! fn square(x: u64) -> u64 {
//!     log!("Squaring {x}");
//!     x * x
//! }
//!
//! keepwarm_api::plugin!(name: "doc-example");
//! # assert_eq!(square(10), 100);
//! ```
//!
//! The same without attributes, against [`Args`] and [`cached`]:
//!
//! ```
//! use keepwarm_api::{cached, log, Args, Error};
//!
//! fn square(args: &Args) -> Result<u64, Error> {
//!     args.expect_len(1)?;
//!     let x: u64 = args.get(0)?;
//!     Ok(cached("square", &x, || {
//!         log!("Squaring {x}");
//!         x * x
//!     }))
//! }
//!
//! keepwarm_api::plugin! {
//!     name: "doc-example",
//!     functions: [square],
//!     caches: [keepwarm_api::cache("square").max_entries(10_000)],
//! }
//!
//! // Outside a host nothing is cached, but the function still works:
//! assert_eq!(square(&Args::from_json("square", b"[10]").unwrap()).unwrap(), 100);
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

/// The C ABI (the `keepwarm-abi` crate): `#[repr(C)]` types, status codes.
pub use keepwarm_abi as abi;
mod error;
mod host;
mod panic_hook;
mod plugin;
mod shape;

pub use error::Error;
pub use host::{
    generation, host_cache_get, host_cache_put, host_cache_reset, log_line, progress, HostCache,
    Value,
};
pub use plugin::{cache, cached, ffi_boundary, panic_message, Args};

/// The name of the symbol every plugin exports; it returns the plugin's
/// [`abi::KwPlugin`] descriptor.
///
/// ```
/// assert_eq!(keepwarm_api::KW_ENTRY_SYMBOL, "keepwarm_plugin");
/// ```
pub use keepwarm_abi::KW_ENTRY_SYMBOL;

/// Memoizes a function in a host cache that survives every reload: the
/// `@lru_cache` of keepwarm.
///
/// The cache is named after the function unless `name = "..."` says
/// otherwise. Keys are the arguments and values the result, encoded with
/// postcard (any serde types); misses compute in the calling thread, and
/// concurrent misses on one key compute once (the others wait). Each value
/// carries a fingerprint of the full structure of the return type and of
/// the argument types (field names, order and types, enum variants): a
/// stored value of another shape — two fields swapped, `u32` became `i64` —
/// is a miss (the host counts it as `shape_mismatch`) and is recomputed.
///
/// Options: `name = "..."`, `max_entries = N`, `max_bytes = N` (keys plus
/// values), `version = N` (a reload that brings another N resets the cache),
/// `reset_on_change` (a reload that brings a change to the function's own
/// tokens resets the cache; the reload line names it), `option` (a function
/// returning `Option` caches only `Some`), `ttl = SECONDS` (an entry older
/// than that is a miss, counted as `expired`, and is recomputed), `key =
/// EXPR` (the key is EXPR, an expression of the arguments, instead of all of
/// them: `key = x / 10` caches by tens; the `cached` crate's `key = "Type",
/// convert = "EXPR"` works too). Other caches stay warm. A function
/// returning `Result` caches only `Ok`: an `Err` is computed again next time.
///
/// ```
/// #[keepwarm_api::memo(key = x / 10, ttl = 60)]
/// fn decade(x: u64) -> u64 {
///     x / 10 * 10
/// }
/// assert_eq!(decade(17), 10);
/// ```
///
/// ```
/// #[keepwarm_api::memo(max_entries = 1000, reset_on_change)]
/// fn fib(n: u64) -> u64 {
///     if n < 2 { n } else { fib(n - 1) + fib(n - 2) }
/// }
/// assert_eq!(fib(20), 6765); // outside a host nothing is cached
/// ```
///
/// It works on free functions with plain argument names; `self`, patterns,
/// generics and `async` are compile errors that say so.
#[doc(inline)]
pub use keepwarm_macros::memo;

/// Makes a function callable by `keepwarm call NAME ARG...`: the arguments
/// are decoded from JSON into the parameter types (serde), the result
/// encoded to JSON. A wrong argument count or type is an error that names
/// the function, the argument and the expected type. A function returning
/// `Result<T, E>` with `E: Display` reports its `Err` as the call's error.
/// `name = "..."` exports it under another name. Borrowed parameters (`&str`,
/// `&[T]`, `&T`) are decoded as their owned forms.
///
/// ```
/// #[keepwarm_api::export]
/// fn greet(name: &str, times: u32) -> Result<String, String> {
///     if times == 0 {
///         return Err("times must be at least 1".into());
///     }
///     Ok(format!("hello {name}").repeat(times as usize))
/// }
/// keepwarm_api::plugin!(name: "greeter");
/// assert_eq!(greet("you", 1).unwrap(), "hello you");
/// ```
#[doc(inline)]
pub use keepwarm_macros::export;

#[doc(hidden)]
pub mod __private {
    //! What the `#[memo]`, `#[export]` and `plugin!` expansions call: not
    //! an API (its items may change in any release).
    pub use crate::host::{install, installed, memo_cache, Target};
    pub use crate::plugin::{
        assert_key, assert_value, cached_key, cached_key_if, call_json, encode_key, on_load,
        on_unload,
    };
    /// Shape fingerprints of keys and values.
    pub mod shape {
        pub use crate::shape::{by_name, of, of_expression, tag, traced, Probe, ViaName, ViaTrace};
    }
    pub use linkme;

    /// One function `#[export]` registers, with its signature.
    pub struct Export {
        /// The function as the descriptor lists it.
        pub function: crate::abi::KwFunction,
        /// `square(x: u64) -> u64`.
        pub signature: crate::abi::KwSlice,
    }

    // SAFETY: immutable static data, as for KwFunction.
    unsafe impl Sync for Export {}

    /// The functions `#[export]` registers, one link section per library.
    #[linkme::distributed_slice]
    #[linkme(crate = linkme)]
    pub static EXPORTS: [Export];

    /// The registered functions and their signatures as the descriptor's
    /// two parallel arrays, built once (leaked: they live as long as the
    /// library, which is what the descriptor requires).
    pub fn exports() -> (
        &'static [crate::abi::KwFunction],
        &'static [crate::abi::KwSlice],
    ) {
        static BUILT: std::sync::OnceLock<(
            &'static [crate::abi::KwFunction],
            &'static [crate::abi::KwSlice],
        )> = std::sync::OnceLock::new();
        *BUILT.get_or_init(|| {
            let functions: Vec<crate::abi::KwFunction> = EXPORTS
                .iter()
                .map(|e| crate::abi::KwFunction {
                    name: e.function.name,
                    call: e.function.call,
                })
                .collect();
            let signatures: Vec<crate::abi::KwSlice> =
                EXPORTS.iter().map(|e| e.signature).collect();
            (functions.leak(), signatures.leak())
        })
    }

    /// The caches `#[memo]` declares.
    #[linkme::distributed_slice]
    #[linkme(crate = linkme)]
    pub static MEMO_CACHES: [crate::abi::KwCacheDecl];

    /// FNV-1a of `text`, continuing from `hash`: how `#[memo]` folds its
    /// module path into its identities, at compile time.
    pub const fn fnv_str(mut hash: u64, text: &str) -> u64 {
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            hash = (hash ^ bytes[i] as u64).wrapping_mul(0x0100_0000_01b3);
            i += 1;
        }
        hash
    }

    /// Each `#[memo]` cache with the identity of its function's code
    /// (body, `version`, module path): opened at load, so that the host
    /// knows the identity under which the cache's entries are shared
    /// before the first call (`keepwarm reset CACHE --shared`).
    #[linkme::distributed_slice]
    #[linkme(crate = linkme)]
    pub static MEMO_CODES: [(&'static str, u64)];
}

/// Logs one line through the host, tagged there with this plugin's
/// generation: `log!("Squaring {x}")`. Takes `format!` arguments.
///
/// ```
/// let x = 3;
/// keepwarm_api::log!("Squaring {x}"); // outside a host: printed to stderr
/// ```
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log_line($crate::abi::KW_LOG_INFO, &::std::format!($($arg)*))
    };
}

/// Declares the plugin and generates its entry symbol, `keepwarm_plugin`.
///
/// Two forms:
/// - `plugin!(name: "example")` (optionally with `on_load:`/`on_unload:`):
///   the plugin exports every `#[export]` function and declares every
///   `#[memo]` cache of the library;
/// - the explicit form below, for functions written against [`Args`]
///   without the attributes.
///
/// - `name`: the plugin's name;
/// - `functions`: functions `fn(&Args) -> Result<T, Error>` with `T:
///   Serialize`, exported under their own names;
/// - `caches` (optional): [`cache`] declarations with bounds;
/// - `on_load` (optional): `fn() -> Result<(), Error>`, run before the new
///   generation goes live; an error refuses the load and the previous
///   generation keeps serving;
/// - `on_unload` (optional): `fn()`, run when the generation retires.
///
/// Panics: every function, hook and memoized computation runs inside
/// [`ffi_boundary`], so a panic is the call's error (`keepwarm call` exits 1
/// with its message and location) and never unwinds into the host. The
/// generated `on_load` also replaces the panic hook of this library's own
/// std (not the host's, nor another plugin's) with one that captures no
/// backtrace and prints nothing for a panic inside a call: with
/// `RUST_BACKTRACE=1`, std's default hook would symbolize a backtrace and
/// keep its debug-info caches after the library is unloaded, tens of MiB per
/// generation. `on_unload` puts the default hook back. A plugin's own
/// `on_load` hook runs after that and may set a hook of its own.
///
/// Use it once per library. See the crate docs for an example.
#[macro_export]
macro_rules! plugin {
    (
        name: $name:literal
        $(, on_load: $on_load:path)?
        $(, on_unload: $on_unload:path)?
        $(,)?
    ) => {
        const _: () = {
            use $crate::abi as __kw;

            unsafe extern "C" fn on_load(
                host: *const __kw::KwHostApi,
                err: *mut __kw::KwOutput,
            ) -> __kw::KwStatus {
                #[allow(unused_mut, unused_assignments)]
                let mut hook: Option<fn() -> Result<(), $crate::Error>> = None;
                $( hook = Some($on_load); )?
                // SAFETY: the host passes a table valid while this library is
                // loaded, and an output valid for this call.
                unsafe { $crate::__private::on_load(host, err, hook) }
            }

            unsafe extern "C" fn on_unload() {
                #[allow(unused_mut, unused_assignments)]
                let mut hook: Option<fn()> = None;
                $( hook = Some($on_unload); )?
                $crate::__private::on_unload(hook)
            }

            // Built on first use: the registered lists are only known at
            // link time, so they cannot appear in a constant.
            static DESCRIPTOR: ::std::sync::OnceLock<__kw::KwPlugin> = ::std::sync::OnceLock::new();

            #[unsafe(no_mangle)]
            pub extern "C" fn keepwarm_plugin() -> *const __kw::KwPlugin {
                DESCRIPTOR.get_or_init(|| {
                    let (functions, signatures) = $crate::__private::exports();
                    let caches = &$crate::__private::MEMO_CACHES;
                    __kw::KwPlugin {
                        abi_version: __kw::KW_ABI_VERSION,
                        size: ::core::mem::size_of::<__kw::KwPlugin>() as u32,
                        name: __kw::KwSlice::from_str($name),
                        functions: functions.as_ptr(),
                        function_count: functions.len(),
                        caches: caches.as_ptr(),
                        cache_count: caches.len(),
                        on_load: Some(on_load),
                        on_unload: Some(on_unload),
                        signatures: signatures.as_ptr(),
                    }
                })
            }
        };
    };
    (
        name: $name:literal,
        functions: [ $($func:ident),* $(,)? ]
        $(, caches: [ $($cache:expr),* $(,)? ])?
        $(, on_load: $on_load:path)?
        $(, on_unload: $on_unload:path)?
        $(,)?
    ) => {
        const _: () = {
            use $crate::abi as __kw;

            static FUNCTIONS: &[__kw::KwFunction] = &[ $( {
                unsafe extern "C" fn shell(
                    args: __kw::KwSlice,
                    out: *mut __kw::KwOutput,
                ) -> __kw::KwStatus {
                    // SAFETY: the host passes arguments and an output that are
                    // valid for the duration of this call.
                    unsafe { $crate::__private::call_json(stringify!($func), args, out, $func) }
                }
                __kw::KwFunction { name: __kw::KwSlice::from_str(stringify!($func)), call: shell }
            } ),* ];

            static CACHES: &[__kw::KwCacheDecl] = &[ $($($cache),*)? ];

            unsafe extern "C" fn on_load(
                host: *const __kw::KwHostApi,
                err: *mut __kw::KwOutput,
            ) -> __kw::KwStatus {
                #[allow(unused_mut, unused_assignments)]
                let mut hook: Option<fn() -> Result<(), $crate::Error>> = None;
                $( hook = Some($on_load); )?
                // SAFETY: the host passes a table valid while this library is
                // loaded, and an output valid for this call.
                unsafe { $crate::__private::on_load(host, err, hook) }
            }

            unsafe extern "C" fn on_unload() {
                #[allow(unused_mut, unused_assignments)]
                let mut hook: Option<fn()> = None;
                $( hook = Some($on_unload); )?
                $crate::__private::on_unload(hook)
            }

            static DESCRIPTOR: __kw::KwPlugin = __kw::KwPlugin {
                abi_version: __kw::KW_ABI_VERSION,
                size: ::core::mem::size_of::<__kw::KwPlugin>() as u32,
                name: __kw::KwSlice::from_str($name),
                functions: FUNCTIONS.as_ptr(),
                function_count: FUNCTIONS.len(),
                caches: CACHES.as_ptr(),
                cache_count: CACHES.len(),
                on_load: Some(on_load),
                on_unload: Some(on_unload),
                signatures: ::core::ptr::null(),
            };

            #[unsafe(no_mangle)]
            pub extern "C" fn keepwarm_plugin() -> *const __kw::KwPlugin {
                &DESCRIPTOR
            }
        };
    };
}
