//! `keepwarm-abi`: the C ABI of keepwarm, version 1 — every type and
//! constant that crosses the boundary between the host and a plugin.
//!
//! This crate is the one source of truth for the ABI and depends on nothing.
//! The host runtime (`keepwarm`) and the plugin SDK (`keepwarm-api`, which
//! re-exports it as `keepwarm_api::abi`) both read it, and
//! `plugin-api/include/keepwarm.h` is generated from it by cbindgen (a test
//! fails when the checked-in header drifts). Only `#[repr(C)]` data,
//! function pointers and integers appear here: no Rust type crosses.
//!
//! Versioning: the plugin descriptor ([`KwPlugin`]) and the host table
//! ([`KwHostApi`]) both start with `abi_version` and `size`. A later minor
//! revision may append fields; a reader checks `size` before touching a field
//! past the version-1 layout. A different `abi_version` is refused outright.
//!
//! Ownership: every type below says who owns the memory its pointers point
//! to and how long it stays valid. In short: what is passed *into* a call
//! ([`KwSlice`], [`KwOutput`]) is borrowed for that call only; what the host
//! *lends* ([`KwValue`] with a `lease`) stays valid until it is released;
//! what lives for a generation ([`KwHostApi`], [`KwCacheHandle`]) is valid
//! from `on_load` until `on_unload` returns; and the descriptor
//! ([`KwPlugin`], [`KwFunction`], [`KwCacheDecl`]) is static data of the
//! library, valid while it is loaded. Nothing is ever freed by the side that
//! did not allocate it.
//!
//! ```
//! use keepwarm_abi::{KwSlice, KW_ABI_VERSION, KW_ENTRY_SYMBOL};
//! assert_eq!(KW_ABI_VERSION, 1);
//! assert_eq!(KW_ENTRY_SYMBOL, "keepwarm_plugin");
//! let name = KwSlice::from_str("square");
//! // SAFETY: the slice views a live &'static str.
//! assert_eq!(unsafe { name.as_bytes() }, Some(&b"square"[..]));
//! ```
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

use core::ffi::c_void;

/// The name of the symbol every plugin exports; it returns the plugin's
/// [`KwPlugin`] descriptor.
pub const KW_ENTRY_SYMBOL: &str = "keepwarm_plugin";

/// The ABI version this crate speaks. A plugin built against another version
/// is refused by the host with a message naming both versions.
pub const KW_ABI_VERSION: u32 = 1;

/// Status code returned by every function of the ABI, in both directions.
///
/// An `i32` rather than a Rust enum: a value produced by foreign code that is
/// not one of the constants below must not be undefined behaviour.
pub type KwStatus = i32;

/// Success.
pub const KW_OK: KwStatus = 0;
/// `cache_get`: the key is not in the cache (nothing was written to `out`).
pub const KW_MISS: KwStatus = 1;
/// A plugin function returned an error; its message was written to the output.
pub const KW_ERROR: KwStatus = 2;
/// A plugin function (or a host function) panicked; the panic message was
/// written to the output when there was one.
pub const KW_PANIC: KwStatus = 3;
/// A pointer was NULL, a name was not UTF-8, or an argument was otherwise
/// unusable.
pub const KW_INVALID_ARGUMENT: KwStatus = 4;
/// `cache_put`: the value alone is larger than the cache's byte bound, so it
/// was not stored. Nothing was evicted.
pub const KW_TOO_LARGE: KwStatus = 5;

/// `cache_get_or_compute`: the computation asked, directly or through other
/// threads waiting for each other, for the very key it is computing.
pub const KW_CYCLE: KwStatus = 6;

/// Any host function called through the table of a generation that has been
/// unloaded (its `on_unload` returned): nothing was read or stored. A thread a
/// plugin left running gets this instead of a crash; it should stop.
pub const KW_RETIRED: KwStatus = 7;

/// An opaque handle on one host cache, from [`KwHostApi::cache_open`].
///
/// Ownership: the host owns what it points to; the plugin never frees it and
/// never reads through it. A handle is valid, like the table that produced
/// it, from the `cache_open` call that wrote it until the generation's
/// `on_unload` returns; pass it only to the `*_handle`/`*_into` functions of
/// that same table (a handle is not carried over to the next generation:
/// open it again in the new `on_load`). It survives resets of the cache (a
/// reset empties a cache, it never replaces it).
pub type KwCacheHandle = *const c_void;

/// Log levels for [`KwHostApi::log`].
pub const KW_LOG_ERROR: u32 = 1;
/// Warning level.
pub const KW_LOG_WARN: u32 = 2;
/// Informational level (what `keepwarm_api::log!` uses).
pub const KW_LOG_INFO: u32 = 3;
/// Debug level.
pub const KW_LOG_DEBUG: u32 = 4;

/// A borrowed view of bytes (or of UTF-8 text, where a name is expected).
///
/// Ownership: the side that passes a `KwSlice` keeps owning the memory, and
/// the receiver never frees it. The memory exposed is available for the
/// duration of the call the slice was passed to (a function's `args`, a
/// cache name, key or value given to a host function, a log message): the
/// receiver must copy what it wants to keep, and the host does (a stored key
/// or value is the host's own copy). `ptr` may be NULL only when `len` is 0.
/// In a [`KwPlugin`], [`KwFunction`] or [`KwCacheDecl`] the memory is static
/// data of the plugin and stays valid while the library is loaded.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KwSlice {
    /// First byte, or NULL when `len` is 0.
    pub ptr: *const u8,
    /// Number of bytes.
    pub len: usize,
}

// SAFETY: a KwSlice is a read-only view. Those stored in statics (descriptor
// names) point at immutable static data of the plugin, which any thread may read.
unsafe impl Sync for KwSlice {}
// SAFETY: as above; the view carries no thread affinity.
unsafe impl Send for KwSlice {}

impl KwSlice {
    /// The empty slice.
    pub const EMPTY: KwSlice = KwSlice {
        ptr: core::ptr::null(),
        len: 0,
    };

    /// A view of `bytes`, usable in `const` and `static` initializers.
    pub const fn from_bytes(bytes: &[u8]) -> KwSlice {
        KwSlice {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// A view of the UTF-8 bytes of `s`.
    ///
    /// ```
    /// let name = keepwarm_abi::KwSlice::from_str("square");
    /// // SAFETY: the slice views a live &'static str.
    /// assert_eq!(unsafe { name.as_bytes() }, Some(&b"square"[..]));
    /// ```
    pub const fn from_str(s: &str) -> KwSlice {
        KwSlice::from_bytes(s.as_bytes())
    }

    /// Turns the raw parts back into a Rust slice; `None` when `ptr` is NULL
    /// and `len` is not 0.
    ///
    /// # Safety
    /// When `ptr` is not NULL it must point to `len` readable bytes that stay
    /// valid and unmodified for the lifetime `'a` chosen by the caller.
    pub unsafe fn as_bytes<'a>(&self) -> Option<&'a [u8]> {
        if self.len == 0 {
            return Some(&[]);
        }
        if self.ptr.is_null() {
            return None;
        }
        // SAFETY: non-NULL and, by this function's contract, valid for `len`
        // bytes during 'a.
        Some(unsafe { core::slice::from_raw_parts(self.ptr, self.len) })
    }
}

/// A cached value handed to the plugin by [`KwHostApi::cache_get`] (and the
/// other lookups that write a `KwValue`).
///
/// Ownership depends on `lease`:
/// - `lease` not NULL: the value is *lent* by the host, which owns the bytes.
///   They stay valid and unchanged, even if the entry is evicted or the cache
///   reset meanwhile, until the plugin passes the value to
///   [`KwHostApi::value_release`], which it must do exactly once (then `ptr`
///   must not be read again). No host lock is held while the plugin holds a
///   value.
/// - `lease` NULL: the value is a *copy in the plugin's own buffer* (the
///   `buf` given to [`KwHostApi::cache_get_into`] or
///   [`KwHostApi::cache_get_or_compute_into`]), so `ptr` is `buf`; the plugin
///   owns those bytes, they live as long as its buffer, and there is nothing
///   to release (do not pass such a value to `value_release`).
///
/// The plugin allocates the `KwValue` itself (on its stack, typically); the
/// host only writes its fields.
#[repr(C)]
#[derive(Debug)]
pub struct KwValue {
    /// First byte of the value (may be dangling-but-non-NULL when `len` is 0).
    pub ptr: *const u8,
    /// Length of the value in bytes.
    pub len: usize,
    /// Opaque to the plugin: what the host needs to release the value.
    pub lease: *const c_void,
}

impl KwValue {
    /// A value that holds nothing, to be filled by `cache_get`.
    pub const fn empty() -> KwValue {
        KwValue {
            ptr: core::ptr::null(),
            len: 0,
            lease: core::ptr::null(),
        }
    }
}

/// A sink for bytes that the *receiver* of a call owns: the callee writes its
/// result (or its error message) through `write`, possibly in several pieces,
/// and the bytes are copied into the owner's buffer at once.
///
/// Ownership: the output and its `ctx` belong to the side that passed it (the
/// host, for a function call or `on_load`; the host again, for a
/// [`KwCompute`]) and are valid only until the call it was passed to returns.
/// The callee must not keep either pointer, nor call `write` from another
/// thread after returning. `write` copies the `len` bytes at `ptr` before it
/// returns, so the writer keeps owning (and may free) its bytes right after.
#[repr(C)]
#[derive(Debug)]
pub struct KwOutput {
    /// The owner's buffer, opaque to the writer.
    pub ctx: *mut c_void,
    /// Appends `len` bytes at `ptr` to the buffer.
    pub write: unsafe extern "C" fn(ctx: *mut c_void, ptr: *const u8, len: usize),
}

/// A computation the host runs on a cache miss in
/// [`KwHostApi::cache_get_or_compute`].
///
/// Ownership: `user` belongs to the plugin, which keeps it valid for the
/// `cache_get_or_compute` call it passes the `KwCompute` to; the host never
/// reads or frees it, only passes it back to `call` during that same call.
/// The `out` given to `call` is the host's (see [`KwOutput`]): valid until
/// `call` returns.
#[repr(C)]
#[derive(Debug)]
pub struct KwCompute {
    /// The plugin's state for the computation.
    pub user: *mut c_void,
    /// Computes the value and writes its bytes to `out`; returns [`KW_OK`]
    /// on success, or another status (with a message written to `out`) on
    /// failure. Called at most once, on the thread that called
    /// `cache_get_or_compute`, with no host lock held. NULL is refused with
    /// [`KW_INVALID_ARGUMENT`] (nothing is computed or stored, and the key
    /// stays free for the next caller).
    pub call: Option<unsafe extern "C" fn(user: *mut c_void, out: *mut KwOutput) -> KwStatus>,
}

/// The table of host functions that the host hands a plugin in `on_load`.
///
/// Ownership: the host owns the table, its `ctx` and everything they point
/// to; the plugin never writes or frees them. The plugin may keep the
/// pointer and call through it from the start of its `on_load` until its
/// `on_unload` returns: that is the generation's lifetime. After that, a
/// call through the table (from a thread the plugin left running) answers
/// [`KW_RETIRED`] and touches nothing; the next generation gets a table of
/// its own. Every function is safe to call from any thread and from inside a
/// cache computation (the host holds no lock while plugin code runs).
#[repr(C)]
#[derive(Debug)]
pub struct KwHostApi {
    /// The ABI version of the host ([`KW_ABI_VERSION`]).
    pub abi_version: u32,
    /// `size_of::<KwHostApi>()` as the host built it; fields past a plugin's
    /// own layout exist only when `size` covers them.
    pub size: u32,
    /// Opaque host context, passed back as the first argument of each call.
    pub ctx: *mut c_void,
    /// The generation number of the plugin this table was given to.
    pub generation: u64,
    /// Looks `key` up in the named cache. On a hit writes the value to `*out`
    /// and returns [`KW_OK`]; the value must then be released with
    /// `value_release`. Returns [`KW_MISS`] when absent (the cache is created
    /// on first use).
    pub cache_get: unsafe extern "C" fn(
        ctx: *mut c_void,
        cache: KwSlice,
        key: KwSlice,
        out: *mut KwValue,
    ) -> KwStatus,
    /// Releases a value obtained from `cache_get`. Passing a value twice, or
    /// one not produced by this host, is undefined behaviour.
    pub value_release: unsafe extern "C" fn(ctx: *mut c_void, value: *mut KwValue),
    /// Stores a copy of `value` under `key` in the named cache, evicting the
    /// least recently used entries as the cache's bounds require.
    pub cache_put: unsafe extern "C" fn(
        ctx: *mut c_void,
        cache: KwSlice,
        key: KwSlice,
        value: KwSlice,
    ) -> KwStatus,
    /// Drops every entry of the named cache.
    pub cache_reset: unsafe extern "C" fn(ctx: *mut c_void, cache: KwSlice) -> KwStatus,
    /// Writes one line to the host's output, tagged with the plugin's
    /// generation. `level` is one of the `KW_LOG_*` constants.
    pub log: unsafe extern "C" fn(ctx: *mut c_void, level: u32, message: KwSlice),
    /// Memoization with a single flight: looks `key` up and, on a miss, runs
    /// `compute` unless another thread is computing the same key, in which
    /// case it waits for that thread's value. On [`KW_OK`], `*out` holds the
    /// value (release it with `value_release`). The computed value is stored
    /// unless the cache was reset while it was being computed. Returns
    /// [`KW_CYCLE`] when the computation needs its own key, or the status of a
    /// failed `compute` (then `*out` holds its message, to release likewise).
    pub cache_get_or_compute: unsafe extern "C" fn(
        ctx: *mut c_void,
        cache: KwSlice,
        key: KwSlice,
        compute: KwCompute,
        out: *mut KwValue,
    ) -> KwStatus,
    /// Resolves the cache named `name` (created on first use) to a handle,
    /// written to `*out`. Resolve once (per generation) and pass the handle:
    /// the calls below then skip finding the cache by name every time.
    pub cache_open:
        unsafe extern "C" fn(ctx: *mut c_void, name: KwSlice, out: *mut KwCacheHandle) -> KwStatus,
    /// `cache_get` on a handle, copying small values out: on a hit whose
    /// value fits in the `cap` bytes at `buf`, the value is copied there and
    /// `*out` becomes `{ptr: buf, len, lease: NULL}`: nothing to release. A
    /// larger value is lent as by `cache_get` (`lease` is not NULL; release it
    /// with `value_release`). `buf` may be NULL when `cap` is 0.
    pub cache_get_into: unsafe extern "C" fn(
        ctx: *mut c_void,
        cache: KwCacheHandle,
        key: KwSlice,
        buf: *mut u8,
        cap: usize,
        out: *mut KwValue,
    ) -> KwStatus,
    /// `cache_put` on a handle.
    pub cache_put_handle: unsafe extern "C" fn(
        ctx: *mut c_void,
        cache: KwCacheHandle,
        key: KwSlice,
        value: KwSlice,
    ) -> KwStatus,
    /// `cache_get_or_compute` on a handle, with the copy-out of
    /// `cache_get_into` for the value (a failure's message is always lent).
    pub cache_get_or_compute_into: unsafe extern "C" fn(
        ctx: *mut c_void,
        cache: KwCacheHandle,
        key: KwSlice,
        compute: KwCompute,
        buf: *mut u8,
        cap: usize,
        out: *mut KwValue,
    ) -> KwStatus,
    /// `cache_open` with options (`opts` may be NULL: then it is
    /// `cache_open`). The handle applies the options to every lookup and put
    /// made through it (see [`KwOpenOptions`]); two opens of one cache with
    /// other options give two handles on the same entries.
    pub cache_open_with: unsafe extern "C" fn(
        ctx: *mut c_void,
        name: KwSlice,
        opts: *const KwOpenOptions,
        out: *mut KwCacheHandle,
    ) -> KwStatus,
    /// Reports the progress of the call running on the calling thread:
    /// `done` units of `total` (`total` 0: unknown). `keepwarm status`
    /// lists it with the call, and `keepwarm call` draws a progress bar from
    /// it on a terminal. Two relaxed stores: cheap enough for every step of a
    /// loop. Ignored on a thread that is not running a call (a thread the
    /// plugin started) and after the generation retired.
    pub progress: unsafe extern "C" fn(ctx: *mut c_void, done: u64, total: u64),
}

/// The options of a handle opened with [`KwHostApi::cache_open_with`].
///
/// Ownership: the plugin's; the host copies the fields during the call.
/// Zero in a field means "not used"; fields past `size` are taken as zero,
/// so a plugin built against an older, shorter layout keeps working.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KwOpenOptions {
    /// `size_of::<KwOpenOptions>()` as the plugin built it.
    pub size: u32,
    /// Reserved; must be 0.
    pub flags: u32,
    /// The shape tag of this handle's values: a fingerprint of what the
    /// value bytes mean (the type's full structure), stored as the first 8
    /// bytes of each value, little-endian. When not 0, a put through the
    /// handle of a value that does not begin with the tag is refused with
    /// [`KW_INVALID_ARGUMENT`], and a lookup through it treats a stored value
    /// that does not begin with the tag as a miss (counted in the cache's
    /// `shape_mismatch` figure), never a hit: `cache_get_or_compute_into`
    /// computes it again and replaces it.
    pub shape: u64,
    /// Entries older than this many milliseconds are misses through this
    /// handle (counted in `expired`) and are dropped; 0: no expiry.
    pub ttl_ms: u64,
    /// The identity of the code that computes this handle's values (for
    /// `#[memo]`: a hash of the function's body, its `version` and its
    /// module path), or 0. Entries are shared with other hosts (`keepwarm
    /// run --shared`) only under this identity and the shape tag, so a
    /// build whose code changed never sees another's entries. When 0, the
    /// cache's declared [`KwCacheDecl::code_hash`] is used; when both are 0
    /// the entries are never shared. Added after `ttl_ms`: a host that
    /// does not know it ignores it, a plugin built before it passes none.
    pub code: u64,
}

/// One function the plugin exports, callable by name (`keepwarm call NAME`).
///
/// Ownership: static data of the plugin (part of its [`KwPlugin`]
/// descriptor), valid and unchanged while the library is loaded; the host
/// reads it and never frees it. The `args` and `out` of a call are the
/// host's, valid until the call returns.
#[repr(C)]
#[derive(Debug)]
pub struct KwFunction {
    /// The function's name (UTF-8, static data of the plugin).
    pub name: KwSlice,
    /// Calls the function. `args` is a JSON array of the arguments (borrowed
    /// for the call). On [`KW_OK`] the function wrote its result as JSON to
    /// `out`; on [`KW_ERROR`] or [`KW_PANIC`] it wrote a UTF-8 message.
    pub call: unsafe extern "C" fn(args: KwSlice, out: *mut KwOutput) -> KwStatus,
}

// SAFETY: descriptors are immutable static data of the plugin; the function
// pointers may be called from any thread (the plugin promises this by
// exporting them).
unsafe impl Sync for KwFunction {}

/// A cache the plugin declares, so the host creates it with bounds before the
/// first call.
///
/// Ownership: static data of the plugin, like the descriptor that points to
/// it; the host copies the name when it creates the cache (the cache and its
/// entries belong to the host and outlive the generation).
#[repr(C)]
#[derive(Debug)]
pub struct KwCacheDecl {
    /// The cache's name (UTF-8).
    pub name: KwSlice,
    /// Maximum number of entries; 0 means the host's default.
    pub max_entries: u64,
    /// Maximum bytes of keys plus values; 0 means unbounded.
    pub max_bytes: u64,
    /// A hash of the code that fills the cache, or 0. When a reload declares
    /// the same cache with a different non-zero hash, the host resets it.
    pub code_hash: u64,
}

// SAFETY: immutable static data, as for KwFunction.
unsafe impl Sync for KwCacheDecl {}

impl KwCacheDecl {
    /// A declaration of the cache `name` with the host's default bounds and
    /// no code hash, usable in `const` and `static` initializers.
    ///
    /// ```
    /// const SQUARE: keepwarm_abi::KwCacheDecl =
    ///     keepwarm_abi::KwCacheDecl::new("square").max_entries(10_000).max_bytes(1 << 20);
    /// assert_eq!((SQUARE.max_entries, SQUARE.max_bytes, SQUARE.code_hash), (10_000, 1 << 20, 0));
    /// ```
    pub const fn new(name: &'static str) -> KwCacheDecl {
        KwCacheDecl {
            name: KwSlice::from_str(name),
            max_entries: 0,
            max_bytes: 0,
            code_hash: 0,
        }
    }

    /// Sets the entry bound.
    pub const fn max_entries(mut self, n: u64) -> KwCacheDecl {
        self.max_entries = n;
        self
    }
    /// Sets the byte bound (keys plus values).
    pub const fn max_bytes(mut self, n: u64) -> KwCacheDecl {
        self.max_bytes = n;
        self
    }
    /// Sets the code hash: a reload that declares another hash resets the cache.
    pub const fn code_hash(mut self, hash: u64) -> KwCacheDecl {
        self.code_hash = hash;
        self
    }
}

/// The plugin's descriptor, returned by its entry symbol
/// (`keepwarm_plugin`, see [`KW_ENTRY_SYMBOL`]).
///
/// Ownership: the descriptor is static data of the library. The plugin owns
/// it and everything it points to (name, functions, caches); it must stay
/// valid and unchanged from the entry symbol's return until the library is
/// unloaded. The host reads it and never writes or frees it.
#[repr(C)]
#[derive(Debug)]
pub struct KwPlugin {
    /// The ABI version the plugin was built for.
    pub abi_version: u32,
    /// `size_of::<KwPlugin>()` as the plugin built it.
    pub size: u32,
    /// The plugin's name (UTF-8).
    pub name: KwSlice,
    /// The exported functions: `function_count` entries.
    pub functions: *const KwFunction,
    /// Number of entries at `functions`.
    pub function_count: usize,
    /// The declared caches: `cache_count` entries.
    pub caches: *const KwCacheDecl,
    /// Number of entries at `caches`.
    pub cache_count: usize,
    /// Called once after the ABI check and before the generation goes live.
    /// Receives the host table (valid from now until `on_unload` returns; see
    /// [`KwHostApi`]) and an output for an error message (valid during this
    /// call only). A status other than [`KW_OK`] refuses the load; a message
    /// may be written to `err`.
    pub on_load:
        Option<unsafe extern "C" fn(host: *const KwHostApi, err: *mut KwOutput) -> KwStatus>,
    /// Called once when the generation retires, after its last call returned;
    /// the host table stops answering when it returns. The plugin must stop
    /// any thread it started before returning.
    pub on_unload: Option<unsafe extern "C" fn()>,
    /// NULL, or `function_count` signatures, one per entry of `functions`
    /// in the same order: UTF-8 text such as `square(x: u64) -> u64` (an
    /// empty slice for a function without one). `keepwarm status --json`
    /// and the prompt's `help` and Tab completion show them. A descriptor
    /// whose `size` ends before this field has none.
    pub signatures: *const KwSlice,
}

/// The smallest descriptor of ABI 1 a host accepts: fields appended since
/// (`signatures`) are read only when the plugin's `size` covers them.
pub const KW_PLUGIN_MIN_SIZE: usize = core::mem::offset_of!(KwPlugin, signatures);

// SAFETY: immutable static data of the plugin (see the type's docs).
unsafe impl Sync for KwPlugin {}
// SAFETY: as above; a descriptor may be built once on any thread and read
// from all.
unsafe impl Send for KwPlugin {}

/// The signature of the entry symbol. It returns a pointer to the plugin's
/// static descriptor (see [`KwPlugin`] for how long it stays valid), which
/// the host never frees.
pub type KwEntryFn = unsafe extern "C" fn() -> *const KwPlugin;
