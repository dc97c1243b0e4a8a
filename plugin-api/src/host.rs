//! The plugin's side of the host table: safe wrappers around the functions
//! the host hands the plugin at load.

use core::ffi::c_void;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::collections::HashMap;
use std::sync::Mutex;

use crate::abi::{
    self, KwCacheHandle, KwCompute, KwHostApi, KwOpenOptions, KwOutput, KwSlice, KwStatus, KwValue,
};
use crate::Error;

/// The host table of the generation this copy of the library belongs to.
///
/// Each loaded generation is a distinct mapping of the library, with its own
/// copy of this static, so a reload never sees the previous generation's table.
static HOST: AtomicPtr<KwHostApi> = AtomicPtr::new(core::ptr::null_mut());

/// Records the host table. Called by the `on_load` shell that
/// [`plugin!`](crate::plugin!) generates.
///
/// # Safety
/// `host` must be NULL or point to a table that stays valid while this library
/// is loaded (the host guarantees this for the table it passes to `on_load`).
#[doc(hidden)]
pub unsafe fn install(host: *const KwHostApi) {
    HOST.store(host as *mut KwHostApi, Ordering::Release);
}

/// The installed host table, or NULL: for tests that stand in for another
/// host (a fixture installs a shortened copy to play an older host).
#[doc(hidden)]
pub fn installed() -> *const KwHostApi {
    HOST.load(Ordering::Acquire)
}

fn host() -> Option<&'static KwHostApi> {
    let ptr = HOST.load(Ordering::Acquire);
    // SAFETY: `install` only stores tables that stay valid while this library
    // is loaded, and this code runs only while it is loaded.
    unsafe { ptr.as_ref() }
}

/// The generation number of the running plugin (1 for the first load), or
/// `None` when not loaded by a host (for example in the plugin's unit tests).
///
/// ```
/// assert_eq!(keepwarm_api::generation(), None); // a doc test has no host
/// ```
pub fn generation() -> Option<u64> {
    host().map(|h| h.generation)
}

/// A value borrowed from a host cache. Derefs to its bytes; the host keeps
/// them alive until this is dropped, whatever happens to the cache meanwhile.
///
/// Small values (up to 64 bytes) looked up through a [`HostCache`] are copied
/// into the `Value` itself; larger ones are lent by the host and given back
/// on drop.
///
/// ```
/// // Outside a host there is no cache: every lookup is a miss.
/// assert!(keepwarm_api::host_cache_get("square", b"k").is_none());
/// ```
pub struct Value {
    repr: Repr,
}

/// Values up to this size are copied out of the cache instead of lent.
const INLINE: usize = 64;

enum Repr {
    /// Lent by the host: released on drop.
    Lent {
        raw: KwValue,
        host: &'static KwHostApi,
    },
    /// Copied by the host into `buf`: `len` initialized bytes.
    Inline {
        len: usize,
        buf: [MaybeUninit<u8>; INLINE],
    },
}

impl Value {
    /// Wraps what a copy-out call wrote: `raw` points into `buf` when its
    /// lease is NULL, and is lent otherwise.
    fn from_into(raw: KwValue, buf: [MaybeUninit<u8>; INLINE], host: &'static KwHostApi) -> Value {
        let repr = if raw.lease.is_null() {
            Repr::Inline {
                len: raw.len.min(INLINE),
                buf,
            }
        } else {
            Repr::Lent { raw, host }
        };
        Value { repr }
    }

    fn lent(raw: KwValue, host: &'static KwHostApi) -> Value {
        Value {
            repr: Repr::Lent { raw, host },
        }
    }
}

impl core::ops::Deref for Value {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.repr {
            Repr::Lent { raw, .. } if raw.len == 0 => &[],
            // SAFETY: the host wrote a pointer to `len` bytes that stay valid
            // and unchanged until the value is released, which happens only
            // in Drop.
            Repr::Lent { raw, .. } => unsafe { core::slice::from_raw_parts(raw.ptr, raw.len) },
            // SAFETY: the host copied `len` (<= INLINE) bytes into `buf`.
            Repr::Inline { len, buf } => unsafe {
                core::slice::from_raw_parts(buf.as_ptr().cast(), *len)
            },
        }
    }
}

impl Drop for Value {
    fn drop(&mut self) {
        if let Repr::Lent { raw, host } = &mut self.repr {
            if !raw.lease.is_null() {
                // SAFETY: the value came from this host and is released
                // exactly once, here.
                unsafe { (host.value_release)(host.ctx, raw) }
            }
        }
    }
}

impl core::fmt::Debug for Value {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("Value").field(&&**self).finish()
    }
}

/// Whether the host's table has the function at `offset` (tables of older
/// hosts end earlier; `size` says where).
fn has(host: &KwHostApi, offset: usize) -> bool {
    host.size as usize >= offset + core::mem::size_of::<usize>()
}

/// `#[memo]`'s cache: its values carry the tag `shape` computes (on first
/// use), which the host checks on every lookup; entries older than `ttl_ms`
/// (when not 0) are misses; `code` is the identity of the function's code
/// (its body, `version` and module path), under which a host with a shared
/// tier shares the entries.
pub const fn memo_cache(
    name: &'static str,
    shape: fn() -> u64,
    ttl_ms: u64,
    code: u64,
) -> HostCache {
    HostCache {
        name,
        handle: AtomicPtr::new(core::ptr::null_mut()),
        shape: Some(shape),
        tag: AtomicU64::new(0),
        ttl_ms,
        code,
    }
}

/// A host cache reached through a handle resolved once per generation: the
/// fast way to use a cache from a `static`.
///
/// [`host_cache_get`] and friends find the cache by name on every call; a
/// `HostCache` resolves the name on first use and keeps the handle (each
/// generation is a fresh copy of the library, so of the static too), and
/// copies values of up to 64 bytes out instead of lending them. `#[memo]`
/// uses one per function. Outside a host it behaves like the by-name
/// functions: every lookup misses and a put fails.
///
/// ```
/// use keepwarm_api::HostCache;
/// static SQUARES: HostCache = HostCache::new("square");
///
/// let key = 12u64.to_le_bytes();
/// if SQUARES.get(&key).is_none() {
///     let _ = SQUARES.put(&key, &144u64.to_le_bytes()); // Err outside a host
/// }
/// assert_eq!(SQUARES.name(), "square");
/// ```
pub struct HostCache {
    name: &'static str,
    handle: AtomicPtr<c_void>,
    /// `#[memo]`'s: computes the shape tag of the function's values.
    shape: Option<fn() -> u64>,
    /// The shape tag, once computed (0: not yet, or none).
    tag: AtomicU64,
    /// `#[memo(ttl = ...)]`, in milliseconds; 0: none.
    ttl_ms: u64,
    /// `#[memo]`'s code identity; 0: none.
    code: u64,
}

impl HostCache {
    /// The cache named `name`; nothing is resolved until first use.
    pub const fn new(name: &'static str) -> HostCache {
        HostCache {
            name,
            handle: AtomicPtr::new(core::ptr::null_mut()),
            shape: None,
            tag: AtomicU64::new(0),
            ttl_ms: 0,
            code: 0,
        }
    }

    /// The shape tag of this cache's values (`#[memo]`'s), computed once per
    /// generation; 0 for a cache of raw bytes.
    pub(crate) fn tag(&self) -> u64 {
        let tag = self.tag.load(Ordering::Relaxed);
        if tag != 0 {
            return tag;
        }
        let Some(shape) = self.shape else {
            return 0;
        };
        // Two threads may both compute it: the result is the same.
        let tag = shape() | 1;
        self.tag.store(tag, Ordering::Relaxed);
        tag
    }

    /// The cache's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The handle, resolved on first use; `None` on a host without handles
    /// (the callers then go by name).
    fn handle(&self, host: &'static KwHostApi) -> Option<KwCacheHandle> {
        let h = self.handle.load(Ordering::Acquire);
        if !h.is_null() {
            return Some(h);
        }
        if !has(
            host,
            core::mem::offset_of!(KwHostApi, cache_get_or_compute_into),
        ) {
            return None;
        }
        let out = if self.shape.is_some() || self.ttl_ms != 0 || self.code != 0 {
            open(host, self.name, self.tag(), self.ttl_ms, self.code)?
        } else {
            open(host, self.name, 0, 0, 0)?
        };
        // Two threads may both resolve: the host gives both the same handle.
        self.handle.store(out as *mut c_void, Ordering::Release);
        Some(out)
    }

    /// Looks `key` up; `None` on a miss, or when not running inside a host.
    pub fn get(&self, key: &[u8]) -> Option<Value> {
        let host = host()?;
        let Some(handle) = self.handle(host) else {
            return host_cache_get(self.name, key);
        };
        let mut buf = [MaybeUninit::<u8>::uninit(); INLINE];
        let raw = get_into(host, handle, key, &mut buf)?;
        Some(Value::from_into(raw, buf, host))
    }

    /// Looks `key` up and runs `f` on the value's bytes; `None` on a miss,
    /// or when not running inside a host.
    ///
    /// The fastest way to read a hit: a value of up to 2 KiB is copied into a
    /// buffer on this stack frame (one call into the host, no reference count
    /// touched), a larger one is lent for the duration of `f`. No host lock
    /// is held while `f` runs.
    ///
    /// ```
    /// use keepwarm_api::HostCache;
    /// static SQUARES: HostCache = HostCache::new("square");
    /// let len = SQUARES.get_with(&12u64.to_le_bytes(), |bytes| bytes.len());
    /// assert_eq!(len, None); // no host in a doc test
    /// ```
    pub fn get_with<R>(&self, key: &[u8], f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        const CAP: usize = 2048;
        let host = host()?;
        let Some(handle) = self.handle(host) else {
            return host_cache_get(self.name, key).map(|v| f(&v));
        };
        let mut buf = [MaybeUninit::<u8>::uninit(); CAP];
        let raw = get_into(host, handle, key, &mut buf)?;
        if raw.lease.is_null() {
            // SAFETY: the host copied `raw.len` (<= CAP) bytes into `buf`.
            let bytes =
                unsafe { core::slice::from_raw_parts(buf.as_ptr().cast(), raw.len.min(CAP)) };
            return Some(f(bytes));
        }
        let value = Value::lent(raw, host); // released when this returns
        Some(f(&value))
    }

    /// Stores a copy of `value` under `key`.
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        let host = host().ok_or_else(Error::no_host)?;
        let Some(handle) = self.handle(host) else {
            return host_cache_put(self.name, key, value);
        };
        put_handle(host, handle, self.name, key, value)
    }

    /// Drops every entry of the cache.
    pub fn reset(&self) -> Result<(), Error> {
        host_cache_reset(self.name)
    }
}

/// Opens a handle on the cache `name` whose values carry the shape tag
/// `tag`, live `ttl_ms` (0: unchecked, forever) and are computed by code of
/// identity `code` (0: none); `None` on failure.
///
/// A host without `cache_open_with` (older than the shape check) gives a
/// plain handle: the SDK still checks the tag of every value it decodes.
pub(crate) fn open(
    host: &KwHostApi,
    name: &str,
    tag: u64,
    ttl_ms: u64,
    code: u64,
) -> Option<KwCacheHandle> {
    let mut out: KwCacheHandle = core::ptr::null();
    let name = KwSlice::from_str(name);
    let status = if (tag != 0 || ttl_ms != 0 || code != 0)
        && has(host, core::mem::offset_of!(KwHostApi, cache_open_with))
    {
        let opts = KwOpenOptions {
            size: core::mem::size_of::<KwOpenOptions>() as u32,
            flags: 0,
            shape: tag,
            ttl_ms,
            code,
        };
        // SAFETY: the table has the function (checked); the name and the
        // options borrow live data for the call; `out` is a valid out-pointer.
        unsafe { (host.cache_open_with)(host.ctx, name, &opts, &mut out) }
    } else {
        // SAFETY: the table has cache_open (every table the SDK accepts
        // does); as above.
        unsafe { (host.cache_open)(host.ctx, name, &mut out) }
    };
    (status == abi::KW_OK && !out.is_null()).then_some(out)
}

/// The handles `cached` opened by name, per shape tag (this generation's:
/// each generation is a fresh copy of the library, and of this static).
static NAMED: Mutex<Option<HashMap<u64, HashMap<String, usize>>>> = Mutex::new(None);

/// A handle on the cache `name` for values of shape `tag`, opened once per
/// generation; `None` on a host without handles.
fn named_handle(host: &'static KwHostApi, name: &str, tag: u64) -> Option<KwCacheHandle> {
    if !has(
        host,
        core::mem::offset_of!(KwHostApi, cache_get_or_compute_into),
    ) {
        return None;
    }
    let mut named = NAMED.lock().unwrap_or_else(|e| e.into_inner());
    let by_name = named
        .get_or_insert_with(HashMap::new)
        .entry(tag)
        .or_default();
    if let Some(&h) = by_name.get(name) {
        return Some(h as KwCacheHandle);
    }
    let h = open(host, name, tag, 0, 0)?;
    by_name.insert(name.to_owned(), h as usize);
    Some(h)
}

/// `cache_put_handle`: stores a copy of `value` under `key` through a
/// handle of `host`'s table on the cache `name` (named in the error).
fn put_handle(
    host: &'static KwHostApi,
    handle: KwCacheHandle,
    name: &str,
    key: &[u8],
    value: &[u8],
) -> Result<(), Error> {
    // SAFETY: the handle was opened through this same table (the callers
    // resolve it from `host`); the slices borrow live data for the call.
    let status = unsafe {
        (host.cache_put_handle)(
            host.ctx,
            handle,
            KwSlice::from_bytes(key),
            KwSlice::from_bytes(value),
        )
    };
    Error::check(status, || format!("host_cache_put({name:?})"))
}

/// `cache_get_into` with `buf` as the copy-out buffer; the value on a hit.
/// `handle` must come from [`HostCache::handle`] on this `host`.
#[inline]
fn get_into(
    host: &'static KwHostApi,
    handle: KwCacheHandle,
    key: &[u8],
    buf: &mut [MaybeUninit<u8>],
) -> Option<KwValue> {
    let mut raw = KwValue::empty();
    // SAFETY: the table has the function (`HostCache::handle` checked its
    // size) and the handle is this table's; `buf` has buf.len() writable
    // bytes; `raw` is a valid out-pointer; the key borrows live data.
    let status = unsafe {
        (host.cache_get_into)(
            host.ctx,
            handle,
            KwSlice::from_bytes(key),
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut raw,
        )
    };
    (status == abi::KW_OK).then_some(raw)
}

impl core::fmt::Debug for HostCache {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HostCache")
            .field("name", &self.name)
            .finish()
    }
}

/// Which cache a memoized call uses.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// Found by name (`cached`), for values of the shape tag given.
    Name(&'a str, u64),
    /// Through a handle (`#[memo]`'s per-function static).
    Static(&'static HostCache),
}

impl Target<'_> {
    /// The cache's name.
    pub fn name(&self) -> &str {
        match self {
            Target::Name(n, _) => n,
            Target::Static(c) => c.name,
        }
    }

    /// The shape tag of the values (the first 8 bytes of each).
    pub fn tag(&self) -> u64 {
        match self {
            Target::Name(_, tag) => *tag,
            Target::Static(c) => c.tag(),
        }
    }

    /// Stores `value` (already tagged) under `key`.
    pub(crate) fn put(&self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        match self {
            Target::Static(c) => c.put(key, value),
            Target::Name(name, tag) => {
                let host = host().ok_or_else(Error::no_host)?;
                let Some(handle) = named_handle(host, name, *tag) else {
                    return host_cache_put(name, key, value);
                };
                put_handle(host, handle, name, key, value)
            }
        }
    }
}

/// What [`get_or_compute`] got from the host.
#[doc(hidden)]
pub enum Flown {
    /// A value: stored, or computed (here or by another thread).
    Value(Value),
    /// The computation needs its own key.
    Cycle,
    /// The computation failed (its panic or error is with the caller).
    Failed,
    /// Not loaded by a host.
    NoHost,
}

/// Runs the host's single-flight memoization; falls back to a plain lookup
/// (the caller then computes) on a host table without it.
#[doc(hidden)]
pub fn get_or_compute(
    cache: Target<'_>,
    key: &[u8],
    user: *mut core::ffi::c_void,
    call: unsafe extern "C" fn(*mut core::ffi::c_void, *mut KwOutput) -> KwStatus,
) -> Flown {
    let Some(host) = host() else {
        return Flown::NoHost;
    };
    let handle = match cache {
        Target::Static(c) => c.handle(host),
        Target::Name(name, tag) => named_handle(host, name, tag),
    };
    let compute = KwCompute {
        user,
        call: Some(call),
    };
    let mut raw = KwValue::empty();
    let mut buf = [MaybeUninit::<u8>::uninit(); INLINE];
    let status = if let Some(handle) = handle {
        // SAFETY: the table has the function (`handle` checked); the handle
        // is this table's; `buf` has INLINE writable bytes; the key borrows
        // live data; `user` and `call` are the caller's matching state and
        // computation.
        unsafe {
            (host.cache_get_or_compute_into)(
                host.ctx,
                handle,
                KwSlice::from_bytes(key),
                compute,
                buf.as_mut_ptr().cast(),
                INLINE,
                &mut raw,
            )
        }
    } else if has(host, core::mem::offset_of!(KwHostApi, cache_get_or_compute)) {
        // SAFETY: as above, by name.
        unsafe {
            (host.cache_get_or_compute)(
                host.ctx,
                KwSlice::from_str(cache.name()),
                KwSlice::from_bytes(key),
                compute,
                &mut raw,
            )
        }
    } else {
        return host_cache_get(cache.name(), key).map_or(Flown::Failed, Flown::Value);
    };
    match status {
        abi::KW_OK => Flown::Value(Value::from_into(raw, buf, host)),
        abi::KW_CYCLE => Flown::Cycle,
        abi::KW_INVALID_ARGUMENT => Flown::Failed,
        // A failure still lends the message: give it back.
        _ => {
            drop(Value::from_into(raw, buf, host));
            Flown::Failed
        }
    }
}

/// Looks `key` up in the host cache named `cache`; `None` on a miss, or when
/// the plugin is not running inside a host.
///
/// ```
/// let hit = keepwarm_api::host_cache_get("square", &10u64.to_le_bytes());
/// assert!(hit.is_none()); // no host in a doc test
/// ```
pub fn host_cache_get(cache: &str, key: &[u8]) -> Option<Value> {
    let host = host()?;
    let mut raw = KwValue::empty();
    // SAFETY: the table is valid (see `host`); the slices borrow live Rust
    // data for the duration of the call; `raw` is a valid out-pointer.
    let status = unsafe {
        (host.cache_get)(
            host.ctx,
            KwSlice::from_str(cache),
            KwSlice::from_bytes(key),
            &mut raw,
        )
    };
    (status == abi::KW_OK).then(|| Value::lent(raw, host))
}

/// Stores a copy of `value` under `key` in the host cache named `cache`.
///
/// ```
/// // Outside a host the put fails with a clear error instead of panicking.
/// let err = keepwarm_api::host_cache_put("square", b"k", b"v").unwrap_err();
/// assert!(err.to_string().contains("not loaded by a keepwarm host"));
/// ```
pub fn host_cache_put(cache: &str, key: &[u8], value: &[u8]) -> Result<(), Error> {
    let host = host().ok_or_else(Error::no_host)?;
    // SAFETY: as in host_cache_get.
    let status = unsafe {
        (host.cache_put)(
            host.ctx,
            KwSlice::from_str(cache),
            KwSlice::from_bytes(key),
            KwSlice::from_bytes(value),
        )
    };
    Error::check(status, || format!("host_cache_put({cache:?})"))
}

/// Drops every entry of the host cache named `cache`.
///
/// ```
/// assert!(keepwarm_api::host_cache_reset("square").is_err()); // no host here
/// ```
pub fn host_cache_reset(cache: &str) -> Result<(), Error> {
    let host = host().ok_or_else(Error::no_host)?;
    // SAFETY: as in host_cache_get.
    let status = unsafe { (host.cache_reset)(host.ctx, KwSlice::from_str(cache)) };
    Error::check(status, || format!("host_cache_reset({cache:?})"))
}

/// Writes one line to the host's output at `level` (a `KW_LOG_*` constant).
/// Outside a host the line goes to standard error. Prefer [`log!`](crate::log).
///
/// ```
/// keepwarm_api::log_line(keepwarm_api::abi::KW_LOG_WARN, "cache bound reached");
/// ```
pub fn log_line(level: u32, message: &str) {
    match host() {
        // SAFETY: as in host_cache_get.
        Some(host) => unsafe { (host.log)(host.ctx, level, KwSlice::from_str(message)) },
        None => eprintln!("{message}"),
    }
}

/// Reports the progress of the call this thread is running: `done` units
/// of `total` (`total` 0 when unknown). `keepwarm status` shows it with the
/// call and `keepwarm call` draws a progress bar from it on a terminal. It
/// costs two relaxed stores in the host, so reporting every step of a loop
/// is fine. Outside a call (a thread the plugin started), outside a host,
/// or on a host too old to know it, it does nothing.
///
/// ```
/// fn count_to(n: u64) -> u64 {
///     for i in 0..n {
///         keepwarm_api::progress(i, n);
///     }
///     n
/// }
/// assert_eq!(count_to(3), 3);
/// ```
pub fn progress(done: u64, total: u64) {
    if let Some(host) = host() {
        if has(host, core::mem::offset_of!(KwHostApi, progress)) {
            // SAFETY: the table is the live host's (see `host()`) and its
            // `size` covers `progress`.
            unsafe { (host.progress)(host.ctx, done, total) }
        }
    }
}
