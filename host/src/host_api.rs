//! The host functions a plugin calls (`host_cache_get`, `host_cache_put`,
//! `host_cache_reset`, `log`): thin `extern "C"` shells around safe Rust.
//!
//! Each shell checks its pointers, turns raw parts into Rust values, calls
//! the safe logic in [`crate::cache`] and returns a status code; each body runs
//! inside [`keepwarm_api::ffi_boundary`], so a host bug can never unwind into
//! plugin code.

use std::ffi::c_void;
use std::sync::Arc;

use keepwarm_api::abi::{self, KwCompute, KwHostApi, KwSlice, KwStatus, KwValue};

use crate::cache::{Computed, PutError, Store};

/// Receives the lines plugins log: (generation, level, message).
pub type LogSink = Arc<dyn Fn(u64, u32, &str) + Send + Sync>;

/// What the host table's `ctx` points to: one per generation, so log lines
/// carry the generation that wrote them.
pub struct HostContext {
    generation: u64,
    store: Arc<Store>,
    log: LogSink,
}

/// A generation's host table with the context it points to. Both are boxed
/// so their addresses stay fixed while the plugin holds them.
pub struct HostTable {
    table: Box<KwHostApi>,
    _context: Box<HostContext>,
}

// SAFETY: the table holds a pointer to the boxed HostContext it owns, whose
// fields are Send + Sync; nothing is mutated after construction.
unsafe impl Send for HostTable {}
// SAFETY: as above.
unsafe impl Sync for HostTable {}

impl HostTable {
    /// A table for `generation`, backed by `store`.
    pub fn new(generation: u64, store: Arc<Store>, log: LogSink) -> HostTable {
        let mut context = Box::new(HostContext {
            generation,
            store,
            log,
        });
        let table = Box::new(KwHostApi {
            abi_version: abi::KW_ABI_VERSION,
            size: std::mem::size_of::<KwHostApi>() as u32,
            ctx: &mut *context as *mut HostContext as *mut c_void,
            generation,
            cache_get,
            value_release,
            cache_put,
            cache_reset,
            log: log_line,
            cache_get_or_compute,
        });
        HostTable {
            table,
            _context: context,
        }
    }

    /// The pointer handed to the plugin; valid while `self` lives.
    pub fn as_ptr(&self) -> *const KwHostApi {
        &*self.table
    }
}

/// Turns the raw parts of a call into Rust values.
///
/// # Safety
/// `ctx` must be NULL or the context of a live [`HostTable`].
unsafe fn context<'a>(ctx: *mut c_void) -> Option<&'a HostContext> {
    // SAFETY: per the contract, NULL or a live HostContext.
    unsafe { (ctx as *const HostContext).as_ref() }
}

/// # Safety
/// `s` must describe bytes valid for the current call.
unsafe fn name<'a>(s: KwSlice) -> Option<&'a str> {
    // SAFETY: per the contract.
    std::str::from_utf8(unsafe { s.as_bytes() }?).ok()
}

unsafe extern "C" fn cache_get(
    ctx: *mut c_void,
    cache: KwSlice,
    key: KwSlice,
    out: *mut KwValue,
) -> KwStatus {
    keepwarm_api::ffi_boundary(None, || {
        // SAFETY: the plugin passes the ctx of its table, and slices valid
        // for this call (ABI contract); NULLs are caught here.
        let (Some(ctx), Some(cache), Some(key)) = (
            unsafe { context(ctx) },
            unsafe { cache.as_bytes() },
            unsafe { key.as_bytes() },
        ) else {
            return abi::KW_INVALID_ARGUMENT;
        };
        if out.is_null() {
            return abi::KW_INVALID_ARGUMENT;
        }
        match ctx.store.with_cache(cache, |c| c.get(key)) {
            Some(Some(value)) => {
                // SAFETY: `out` is non-NULL and points to the plugin's KwValue.
                unsafe { lend(value, out) };
                abi::KW_OK
            }
            Some(None) => abi::KW_MISS,
            None => abi::KW_INVALID_ARGUMENT,
        }
    })
}

/// Lends `value` to the plugin through `out`: the lease is one strong count
/// of the Arc, given back in value_release; the cache may drop its own count
/// meanwhile.
///
/// # Safety
/// `out` must be non-NULL and valid for a write.
unsafe fn lend(value: Arc<[u8]>, out: *mut KwValue) {
    let len = value.len();
    let ptr = Arc::into_raw(value) as *const u8;
    // SAFETY: per the contract.
    unsafe {
        out.write(KwValue {
            ptr,
            len,
            lease: ptr as *const c_void,
        })
    };
}

unsafe extern "C" fn cache_get_or_compute(
    ctx: *mut c_void,
    cache: KwSlice,
    key: KwSlice,
    compute: KwCompute,
    out: *mut KwValue,
) -> KwStatus {
    keepwarm_api::ffi_boundary(None, || {
        // SAFETY: as in cache_get.
        let (Some(ctx), Some(cache), Some(key)) =
            (unsafe { context(ctx) }, unsafe { name(cache) }, unsafe {
                key.as_bytes()
            })
        else {
            return abi::KW_INVALID_ARGUMENT;
        };
        if out.is_null() {
            return abi::KW_INVALID_ARGUMENT;
        }
        let run = || {
            let mut bytes = Vec::new();
            let mut sink = crate::loader::output_to(&mut bytes);
            // SAFETY: the plugin's computation, called once on this thread
            // with its own `user` pointer (ABI contract); `sink` outlives it.
            let status = unsafe { (compute.call)(compute.user, &mut sink) };
            if status == abi::KW_OK {
                Ok(bytes)
            } else {
                Err((status, bytes))
            }
        };
        // The store's read lock is not held while computing: the cache is
        // looked up (or created) first, then computed into with no lock.
        let cache = ctx.store.cache(cache);
        let (status, value) = match cache.get_or_compute(key, run) {
            Computed::Value(v) => (abi::KW_OK, v),
            Computed::Cycle => return abi::KW_CYCLE,
            Computed::Failed((status, message)) => (status, Arc::from(message)),
        };
        // SAFETY: `out` is non-NULL and points to the plugin's KwValue.
        unsafe { lend(value, out) };
        status
    })
}

unsafe extern "C" fn value_release(_ctx: *mut c_void, value: *mut KwValue) {
    keepwarm_api::ffi_boundary(None, || {
        // SAFETY: the plugin passes a value it got from cache_get, once.
        let Some(value) = (unsafe { value.as_mut() }) else {
            return abi::KW_INVALID_ARGUMENT;
        };
        if value.lease.is_null() {
            return abi::KW_INVALID_ARGUMENT;
        }
        let raw = std::ptr::slice_from_raw_parts(value.lease as *const u8, value.len);
        // SAFETY: `lease` and `len` are the parts of an Arc<[u8]> that
        // cache_get turned into a raw pointer; this gives that count back.
        drop(unsafe { Arc::from_raw(raw) });
        *value = KwValue::empty();
        abi::KW_OK
    });
}

unsafe extern "C" fn cache_put(
    ctx: *mut c_void,
    cache: KwSlice,
    key: KwSlice,
    value: KwSlice,
) -> KwStatus {
    keepwarm_api::ffi_boundary(None, || {
        // SAFETY: as in cache_get.
        let (Some(ctx), Some(cache), Some(key), Some(value)) = (
            unsafe { context(ctx) },
            unsafe { cache.as_bytes() },
            unsafe { key.as_bytes() },
            unsafe { value.as_bytes() },
        ) else {
            return abi::KW_INVALID_ARGUMENT;
        };
        match ctx.store.with_cache(cache, |c| c.put(key, value)) {
            Some(Ok(())) => abi::KW_OK,
            Some(Err(PutError::TooLarge)) => abi::KW_TOO_LARGE,
            None => abi::KW_INVALID_ARGUMENT,
        }
    })
}

unsafe extern "C" fn cache_reset(ctx: *mut c_void, cache: KwSlice) -> KwStatus {
    keepwarm_api::ffi_boundary(None, || {
        // SAFETY: as in cache_get.
        let (Some(ctx), Some(cache)) = (unsafe { context(ctx) }, unsafe { name(cache) }) else {
            return abi::KW_INVALID_ARGUMENT;
        };
        ctx.store.cache(cache).reset();
        abi::KW_OK
    })
}

unsafe extern "C" fn log_line(ctx: *mut c_void, level: u32, message: KwSlice) {
    keepwarm_api::ffi_boundary(None, || {
        // SAFETY: as in cache_get.
        let (Some(ctx), Some(bytes)) = (unsafe { context(ctx) }, unsafe { message.as_bytes() })
        else {
            return abi::KW_INVALID_ARGUMENT;
        };
        (ctx.log)(ctx.generation, level, &String::from_utf8_lossy(bytes));
        abi::KW_OK
    });
}
