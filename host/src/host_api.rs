//! The host functions a plugin calls (`host_cache_get`, `host_cache_put`,
//! `host_cache_reset`, `log`): thin `extern "C"` shells around safe Rust.
//!
//! Each shell checks its pointers, turns raw parts into Rust values, calls
//! the safe logic in [`crate::cache`] and returns a status code; each body runs
//! inside [`keepwarm_api::ffi_boundary`], so a host bug can never unwind into
//! plugin code.

use std::ffi::c_void;
use std::sync::Arc;

use keepwarm_api::abi::{self, KwHostApi, KwSlice, KwStatus, KwValue};

use crate::cache::{PutError, Store};

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
        match ctx.store.with_cache(cache, |c| c.get(key)) {
            Some(value) => {
                let len = value.len();
                // The lease is one strong count of the Arc, given up in
                // value_release; the cache itself may drop its own meanwhile.
                let ptr = Arc::into_raw(value) as *const u8;
                // SAFETY: `out` is non-NULL and points to the plugin's KwValue.
                unsafe {
                    out.write(KwValue {
                        ptr,
                        len,
                        lease: ptr as *const c_void,
                    })
                };
                abi::KW_OK
            }
            None => abi::KW_MISS,
        }
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
            unsafe { name(cache) },
            unsafe { key.as_bytes() },
            unsafe { value.as_bytes() },
        ) else {
            return abi::KW_INVALID_ARGUMENT;
        };
        match ctx.store.with_cache(cache, |c| c.put(key, value)) {
            Ok(()) => abi::KW_OK,
            Err(PutError::TooLarge) => abi::KW_TOO_LARGE,
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
