//! The plugin's side of the host table: safe wrappers around the functions
//! the host hands the plugin at load.

use core::sync::atomic::{AtomicPtr, Ordering};

use crate::abi::{self, KwCompute, KwHostApi, KwOutput, KwSlice, KwStatus, KwValue};
use crate::Error;

/// The host table of the generation this copy of the library belongs to.
///
/// Each loaded generation is a distinct mapping of the library, with its own
/// copy of this static, so a reload never sees the previous generation's table.
static HOST: AtomicPtr<KwHostApi> = AtomicPtr::new(core::ptr::null_mut());

/// Records the host table. Called by the `on_load` shell that
/// [`plugin!`](crate::plugin) generates.
///
/// # Safety
/// `host` must be NULL or point to a table that stays valid while this library
/// is loaded (the host guarantees this for the table it passes to `on_load`).
#[doc(hidden)]
pub unsafe fn install(host: *const KwHostApi) {
    HOST.store(host as *mut KwHostApi, Ordering::Release);
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
/// ```
/// // Outside a host there is no cache: every lookup is a miss.
/// assert!(keepwarm_api::host_cache_get("square", b"k").is_none());
/// ```
pub struct Value {
    raw: KwValue,
    host: &'static KwHostApi,
}

impl core::ops::Deref for Value {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        if self.raw.len == 0 {
            return &[];
        }
        // SAFETY: the host wrote a pointer to `len` bytes that stay valid and
        // unchanged until the value is released, which happens only in Drop.
        unsafe { core::slice::from_raw_parts(self.raw.ptr, self.raw.len) }
    }
}

impl Drop for Value {
    fn drop(&mut self) {
        // SAFETY: the value came from this host's cache_get and is released
        // exactly once, here.
        unsafe { (self.host.value_release)(self.host.ctx, &mut self.raw) }
    }
}

impl core::fmt::Debug for Value {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("Value").field(&&**self).finish()
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
    cache: &str,
    key: &[u8],
    user: *mut core::ffi::c_void,
    call: unsafe extern "C" fn(*mut core::ffi::c_void, *mut KwOutput) -> KwStatus,
) -> Flown {
    let Some(host) = host() else {
        return Flown::NoHost;
    };
    let has_it = host.size as usize
        >= core::mem::offset_of!(KwHostApi, cache_get_or_compute) + core::mem::size_of::<usize>();
    if !has_it {
        return host_cache_get(cache, key).map_or(Flown::Failed, Flown::Value);
    }
    let mut raw = KwValue::empty();
    // SAFETY: the table is valid and large enough (checked above); the
    // slices borrow live data for the call; `user` and `call` are the
    // caller's matching state and computation.
    let status = unsafe {
        (host.cache_get_or_compute)(
            host.ctx,
            KwSlice::from_str(cache),
            KwSlice::from_bytes(key),
            KwCompute { user, call },
            &mut raw,
        )
    };
    match status {
        abi::KW_OK => Flown::Value(Value { raw, host }),
        abi::KW_CYCLE => Flown::Cycle,
        abi::KW_INVALID_ARGUMENT => Flown::Failed,
        // A failure still lends the message: give it back.
        _ => {
            drop(Value { raw, host });
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
    (status == abi::KW_OK).then_some(Value { raw, host })
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
