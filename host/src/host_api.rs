//! The host functions a plugin calls (`host_cache_get`, `host_cache_put`,
//! `host_cache_reset`, `log`): thin `extern "C"` shells around safe Rust.
//!
//! Each shell checks its pointers, turns raw parts into Rust values, calls
//! the safe logic in [`crate::cache`] and returns a status code; each body runs
//! inside `boundary!` (`boundary.rs`), so a host bug can never unwind into
//! plugin code.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use keepwarm_abi::{
    self as abi, KwCacheHandle, KwCompute, KwHostApi, KwOpenOptions, KwSlice, KwStatus, KwValue,
};
use parking_lot::Mutex;

use crate::cache::{Cache, Computed, Found, PutError, Store, Want};

use crate::boundary::boundary;
use crate::events::{Event, EventSink};

/// What the host table's `ctx` points to: one per generation, so log lines
/// carry the generation that wrote them.
pub struct HostContext {
    generation: u64,
    store: Arc<Store>,
    events: EventSink,
    /// The caches this generation opened handles on. The store never drops
    /// a cache, but holding them here makes a handle's validity this
    /// context's own guarantee rather than the store's policy.
    // Boxed: a handle is the address of its Opened, which must not move
    // when the Vec grows.
    #[allow(clippy::vec_box)]
    opened: Mutex<Vec<Box<Opened>>>,
    /// The code hash this generation declared for each cache (non-zero
    /// only): the identity its values are stored under.
    declared: HashMap<Box<[u8]>, u64>,
    /// Set once the generation's `on_unload` returned (or its `on_load`
    /// refused): every later call through this table answers
    /// [`abi::KW_RETIRED`] and touches nothing.
    retired: AtomicBool,
    /// The plugin's name (its descriptor's): part of a shared identity.
    plugin: String,
}

/// What a cache handle points to: the cache, the identity this
/// generation's values for it carry, and what the handle's options require
/// of an entry (its shape, its age). Boxed in the context's `opened` list,
/// which is never shrunk, so the address stays valid.
pub struct Opened {
    cache: Arc<Cache>,
    identity: u64,
    want: Want,
    /// The identity the handle's entries are shared under (`--shared`, and
    /// a code identity known).
    shared: Option<(Arc<crate::shared::SharedTier>, crate::shared::SharedId)>,
}

/// A generation's host table with the context it points to.
///
/// Both are leaked on purpose (a few hundred bytes per generation): a thread
/// that a plugin left running, or a plugin that kept the table pointer past
/// `on_unload`, can then never reach freed memory; it gets `KW_RETIRED`.
pub struct HostTable {
    table: &'static KwHostApi,
    context: &'static HostContext,
}

// SAFETY: the table holds a pointer to the leaked HostContext, whose fields
// are Send + Sync; nothing but the atomic flag changes after construction.
unsafe impl Send for HostTable {}
// SAFETY: as above.
unsafe impl Sync for HostTable {}

impl HostTable {
    /// A table for `generation`, backed by `store`.
    pub fn new(
        generation: u64,
        store: Arc<Store>,
        events: EventSink,
        declared: HashMap<Box<[u8]>, u64>,
        plugin: &str,
    ) -> HostTable {
        let context: &'static HostContext = Box::leak(Box::new(HostContext {
            generation,
            store,
            events,
            opened: Mutex::new(Vec::new()),
            declared,
            plugin: plugin.to_owned(),
            retired: AtomicBool::new(false),
        }));
        let table = Box::leak(Box::new(KwHostApi {
            abi_version: abi::KW_ABI_VERSION,
            size: std::mem::size_of::<KwHostApi>() as u32,
            ctx: context as *const HostContext as *mut c_void,
            generation,
            cache_get,
            value_release,
            cache_put,
            cache_reset,
            log: log_line,
            cache_get_or_compute,
            cache_open,
            cache_get_into,
            cache_put_handle,
            cache_get_or_compute_into,
            cache_open_with,
            progress,
        }));
        HostTable { table, context }
    }

    /// The pointer handed to the plugin; valid for the life of the process.
    pub fn as_ptr(&self) -> *const KwHostApi {
        self.table
    }

    /// Reports `event` where this table's generation reports.
    pub fn emit(&self, event: &Event) {
        (self.context.events)(event);
    }

    /// From now on every call through this table answers `KW_RETIRED`.
    pub fn retire(&self) {
        self.context.retired.store(true, Ordering::Release);
    }
}

/// Turns the raw parts of a call into Rust values: `None` for NULL and for
/// the context of a retired generation.
///
/// # Safety
/// `ctx` must be NULL or the context of a [`HostTable`] (they are never freed).
unsafe fn context<'a>(ctx: *mut c_void) -> Option<&'a HostContext> {
    // SAFETY: per the contract, NULL or a HostContext, which is never freed.
    unsafe { (ctx as *const HostContext).as_ref() }
}

/// Whether `ctx` is the context of a retired generation.
///
/// # Safety
/// As for [`context`].
unsafe fn retired(ctx: *mut c_void) -> bool {
    // SAFETY: per the contract.
    unsafe { context(ctx) }.is_some_and(|c| c.retired.load(Ordering::Acquire))
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
    boundary!(abi::KW_PANIC, {
        // SAFETY: the plugin passes the ctx of its table (ABI contract).
        if unsafe { retired(ctx) } {
            return abi::KW_RETIRED;
        }
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

/// # Safety
/// `handle` must be NULL or a handle from `cache_open` of a live context
/// (the ABI contract: handles are only passed back to the table that made them).
unsafe fn handle<'a>(handle: KwCacheHandle) -> Option<&'a Opened> {
    // SAFETY: per the contract, NULL or the address of an Opened that the
    // context's `opened` list keeps alive (contexts are never freed).
    unsafe { (handle as *const Opened).as_ref() }
}

impl HostContext {
    /// The identity this generation's values for `cache` carry (0: none
    /// declared, always stored).
    fn identity(&self, cache: &[u8]) -> u64 {
        self.declared.get(cache).copied().unwrap_or(0)
    }

    /// The identity `cache`'s entries are shared under, with a shared tier:
    /// the code identity a handle was opened with, else the cache's
    /// declared code hash; `None` when neither is known (never shared).
    /// Recorded on the cache for `reset --shared`.
    fn shared_id(
        &self,
        cache: &Cache,
        code: u64,
        shape: u64,
    ) -> Option<(Arc<crate::shared::SharedTier>, crate::shared::SharedId)> {
        let tier = self.store.shared()?;
        let code = match code {
            0 => self.identity(cache.name().as_bytes()),
            c => c,
        };
        if code == 0 {
            return None;
        }
        let id = tier.id(&self.plugin, cache.name(), code, shape);
        cache.register_shared(self.generation, &id);
        Some((Arc::clone(tier), id))
    }
}

/// The shared lookup of a compute call, when there is one.
fn lookup(
    shared: &Option<(Arc<crate::shared::SharedTier>, crate::shared::SharedId)>,
) -> Option<crate::cache::SharedLookup<'_>> {
    shared
        .as_ref()
        .map(|(tier, id)| crate::cache::SharedLookup { tier, id })
}

/// The plugin's copy-out buffer; an empty one when `cap` is 0.
///
/// # Safety
/// When `cap` is not 0, `buf` must be valid for writes of `cap` bytes for the
/// current call (it may be uninitialized).
unsafe fn out_buffer<'a>(buf: *mut u8, cap: usize) -> Option<&'a mut [MaybeUninit<u8>]> {
    if cap == 0 {
        return Some(&mut []);
    }
    if buf.is_null() {
        return None;
    }
    // SAFETY: per the contract; MaybeUninit makes no claim about the contents.
    Some(unsafe { std::slice::from_raw_parts_mut(buf.cast(), cap) })
}

unsafe extern "C" fn cache_open(
    ctx: *mut c_void,
    name: KwSlice,
    out: *mut KwCacheHandle,
) -> KwStatus {
    // SAFETY: the same contract; NULL options are no options.
    unsafe { cache_open_with(ctx, name, std::ptr::null(), out) }
}

/// The options a plugin passed, as a [`Want`]; `None` when unusable (a
/// `size` too small for the fields it must hold, or reserved flags set).
///
/// # Safety
/// `opts` must be NULL or point to a `KwOpenOptions` of at least `size`
/// readable bytes (its first field), valid for the current call.
unsafe fn options(opts: *const KwOpenOptions) -> Option<(Want, u64)> {
    if opts.is_null() {
        return Some((Want::ANY, 0));
    }
    // The first 4 bytes say how much of the struct the plugin knows.
    // SAFETY: per the contract, `opts` points to at least the `size` field.
    let size = unsafe { std::ptr::addr_of!((*opts).size).read_unaligned() } as usize;
    if size < std::mem::offset_of!(KwOpenOptions, shape) {
        return None;
    }
    let mut copy = KwOpenOptions::default();
    let n = size.min(std::mem::size_of::<KwOpenOptions>());
    // SAFETY: the plugin's struct has `size` readable bytes, of which we
    // copy at most our own layout's; the rest of `copy` stays zero.
    unsafe {
        std::ptr::copy_nonoverlapping(
            opts.cast::<u8>(),
            (&mut copy as *mut KwOpenOptions).cast::<u8>(),
            n,
        )
    };
    if copy.flags != 0 {
        return None;
    }
    Some((
        Want {
            shape: (copy.shape != 0).then(|| copy.shape.to_le_bytes()),
            ttl: (copy.ttl_ms != 0).then(|| std::time::Duration::from_millis(copy.ttl_ms)),
        },
        copy.code,
    ))
}

unsafe extern "C" fn cache_open_with(
    ctx: *mut c_void,
    name: KwSlice,
    opts: *const KwOpenOptions,
    out: *mut KwCacheHandle,
) -> KwStatus {
    boundary!(abi::KW_PANIC, {
        // SAFETY: the plugin passes the ctx of its table (ABI contract).
        if unsafe { retired(ctx) } {
            return abi::KW_RETIRED;
        }
        // SAFETY: as in cache_get; the options are NULL or the plugin's,
        // valid for this call.
        let (Some(ctx), Some(name), Some((want, code))) = (
            unsafe { context(ctx) },
            unsafe { self::name(name) },
            unsafe { options(opts) },
        ) else {
            return abi::KW_INVALID_ARGUMENT;
        };
        if out.is_null() {
            return abi::KW_INVALID_ARGUMENT;
        }
        let cache = ctx.store.cache(name);
        let shape = want.shape.map_or(0, u64::from_le_bytes);
        let shared = ctx.shared_id(&cache, code, shape);
        let mut opened = ctx.opened.lock();
        let ptr = match opened.iter().find(|o| {
            Arc::ptr_eq(&o.cache, &cache)
                && o.want == want
                && o.shared.as_ref().map(|s| &s.1) == shared.as_ref().map(|s| &s.1)
        }) {
            Some(o) => &**o as *const Opened,
            None => {
                let o = Box::new(Opened {
                    identity: ctx.identity(name.as_bytes()),
                    cache,
                    want,
                    shared,
                });
                let ptr = &*o as *const Opened;
                opened.push(o);
                ptr
            }
        };
        // SAFETY: `out` is non-NULL and points to the plugin's handle.
        unsafe { out.write(ptr as KwCacheHandle) };
        abi::KW_OK
    })
}

/// The cache, the key and the copy-out buffer of a copy-out lookup.
type IntoArgs<'a> = (&'a Opened, &'a [u8], &'a mut [MaybeUninit<u8>]);

/// The arguments of a copy-out lookup as Rust values; `None` when one is
/// unusable (a NULL pointer).
///
/// # Safety
/// As for [`handle`], [`out_buffer`] and [`KwSlice::as_bytes`], for the
/// current call.
unsafe fn into_args<'a>(
    ctx: *mut c_void,
    cache: KwCacheHandle,
    key: KwSlice,
    buf: *mut u8,
    cap: usize,
    out: *mut KwValue,
) -> Option<IntoArgs<'a>> {
    if out.is_null() || ctx.is_null() {
        return None;
    }
    // SAFETY: per this function's contract.
    unsafe { Some((handle(cache)?, key.as_bytes()?, out_buffer(buf, cap)?)) }
}

unsafe extern "C" fn cache_get_into(
    ctx: *mut c_void,
    cache: KwCacheHandle,
    key: KwSlice,
    buf: *mut u8,
    cap: usize,
    out: *mut KwValue,
) -> KwStatus {
    boundary!(abi::KW_PANIC, {
        // SAFETY: the plugin passes the ctx of its table (ABI contract).
        if unsafe { retired(ctx) } {
            return abi::KW_RETIRED;
        }
        // SAFETY: the plugin passes its ctx, a handle of this table, a key
        // valid for this call, a buffer of `cap` writable bytes and a valid
        // `out` (ABI contract); NULLs are caught.
        let Some((cache, key, buf)) = (unsafe { into_args(ctx, cache, key, buf, cap, out) }) else {
            return abi::KW_INVALID_ARGUMENT;
        };
        let found = cache.cache.get_into_as(key, buf, &cache.want);
        // SAFETY: `out` is non-NULL and points to the plugin's KwValue.
        unsafe { hand_out(found, buf, out) }
    })
}

/// Writes what a copy-out lookup found to `*out`; the status to return.
///
/// # Safety
/// `out` must be non-NULL and valid for a write.
unsafe fn hand_out(found: Found, buf: &mut [MaybeUninit<u8>], out: *mut KwValue) -> KwStatus {
    match found {
        Found::Copied(len) => {
            // SAFETY: per the contract.
            unsafe {
                out.write(KwValue {
                    ptr: buf.as_ptr().cast(),
                    len,
                    lease: std::ptr::null(),
                })
            };
            abi::KW_OK
        }
        Found::Shared(value) => {
            // SAFETY: per the contract.
            unsafe { lend(value, out) };
            abi::KW_OK
        }
        Found::Miss => abi::KW_MISS,
    }
}

unsafe extern "C" fn cache_put_handle(
    ctx: *mut c_void,
    cache: KwCacheHandle,
    key: KwSlice,
    value: KwSlice,
) -> KwStatus {
    boundary!(abi::KW_PANIC, {
        // SAFETY: the plugin passes the ctx of its table (ABI contract).
        if unsafe { retired(ctx) } {
            return abi::KW_RETIRED;
        }
        // SAFETY: as in cache_get_into.
        let (Some(cache), Some(key), Some(value)) = (
            unsafe { handle(cache) },
            unsafe { key.as_bytes() },
            unsafe { value.as_bytes() },
        ) else {
            return abi::KW_INVALID_ARGUMENT;
        };
        if ctx.is_null() {
            return abi::KW_INVALID_ARGUMENT;
        }
        // A shaped handle stores only values that carry its tag.
        if cache
            .want
            .shape
            .is_some_and(|tag| value.get(..8) != Some(&tag[..]))
        {
            return abi::KW_INVALID_ARGUMENT;
        }
        put_status(cache.cache.put_as(key, value, cache.identity))
    })
}

/// The status a put reports to the plugin.
fn put_status(result: Result<(), PutError>) -> KwStatus {
    match result {
        Ok(()) => abi::KW_OK,
        Err(PutError::TooLarge) => abi::KW_TOO_LARGE,
    }
}

/// Runs a plugin's [`KwCompute`] into a byte vector.
fn run_compute(compute: KwCompute) -> Result<Vec<u8>, (KwStatus, Vec<u8>)> {
    let mut bytes = Vec::new();
    let mut sink = crate::loader::output_to(&mut bytes);
    // SAFETY: the plugin's computation, called once on this thread with its
    // own `user` pointer (ABI contract); `sink` outlives it.
    let Some(call) = compute.call else {
        return Err((
            abi::KW_INVALID_ARGUMENT,
            b"the plugin passed a NULL compute function".to_vec(),
        ));
    };
    let status = unsafe { call(compute.user, &mut sink) };
    if status == abi::KW_OK {
        Ok(bytes)
    } else {
        Err((status, bytes))
    }
}

/// Lends the outcome of a computation (the value, or the failure's message).
///
/// # Safety
/// `out` must be non-NULL and valid for a write.
unsafe fn lend_computed(computed: Computed<(KwStatus, Vec<u8>)>, out: *mut KwValue) -> KwStatus {
    let (status, value) = match computed {
        Computed::Value(v) => (abi::KW_OK, v),
        Computed::Cycle => return abi::KW_CYCLE,
        Computed::Failed((status, message)) => (status, Arc::from(message)),
    };
    // SAFETY: per the contract.
    unsafe { lend(value, out) };
    status
}

unsafe extern "C" fn cache_get_or_compute_into(
    ctx: *mut c_void,
    cache: KwCacheHandle,
    key: KwSlice,
    compute: KwCompute,
    buf: *mut u8,
    cap: usize,
    out: *mut KwValue,
) -> KwStatus {
    boundary!(abi::KW_PANIC, {
        // SAFETY: the plugin passes the ctx of its table (ABI contract).
        if unsafe { retired(ctx) } {
            return abi::KW_RETIRED;
        }
        // SAFETY: as in cache_get_into.
        let Some((cache, key, buf)) = (unsafe { into_args(ctx, cache, key, buf, cap, out) }) else {
            return abi::KW_INVALID_ARGUMENT;
        };
        let Opened {
            cache,
            identity,
            want,
            shared,
        } = cache;
        match cache.get_into_as(key, buf, want) {
            // SAFETY: `out` is non-NULL and points to the plugin's KwValue.
            Found::Miss => unsafe {
                lend_computed(
                    cache.compute_missing_shared(key, *identity, want, lookup(shared), || {
                        run_compute(compute).and_then(|bytes| match want.shape {
                            // A computation must produce a value of the
                            // handle's shape; anything else is not stored.
                            Some(tag) if bytes.get(..8) != Some(&tag[..]) => Err((
                                abi::KW_ERROR,
                                b"the computed value does not carry the handle's shape tag"
                                    .to_vec(),
                            )),
                            _ => Ok(bytes),
                        })
                    }),
                    out,
                )
            },
            // SAFETY: as above.
            found => unsafe { hand_out(found, buf, out) },
        }
    })
}

unsafe extern "C" fn cache_get_or_compute(
    ctx: *mut c_void,
    cache: KwSlice,
    key: KwSlice,
    compute: KwCompute,
    out: *mut KwValue,
) -> KwStatus {
    boundary!(abi::KW_PANIC, {
        // SAFETY: the plugin passes the ctx of its table (ABI contract).
        if unsafe { retired(ctx) } {
            return abi::KW_RETIRED;
        }
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
        // No store lock is held while computing: the cache is looked up (or
        // created) first, then computed into with no lock.
        let identity = ctx.identity(cache.as_bytes());
        let cache = ctx.store.cache(cache);
        let computed = match cache.get(key) {
            Some(v) => Computed::Value(v),
            None => {
                let shared = ctx.shared_id(&cache, 0, 0);
                cache.compute_missing_shared(key, identity, &Want::ANY, lookup(&shared), || {
                    run_compute(compute)
                })
            }
        };
        // SAFETY: `out` is non-NULL and points to the plugin's KwValue.
        unsafe { lend_computed(computed, out) }
    })
}

unsafe extern "C" fn value_release(_ctx: *mut c_void, value: *mut KwValue) {
    // A lease is given back even after retirement: it is the plugin's.
    boundary!((), {
        // SAFETY: the plugin passes a value it got from cache_get, once.
        let Some(value) = (unsafe { value.as_mut() }) else {
            return;
        };
        if value.lease.is_null() {
            return;
        }
        let raw = std::ptr::slice_from_raw_parts(value.lease as *const u8, value.len);
        // SAFETY: `lease` and `len` are the parts of an Arc<[u8]> that
        // cache_get turned into a raw pointer; this gives that count back.
        drop(unsafe { Arc::from_raw(raw) });
        *value = KwValue::empty();
    })
}

unsafe extern "C" fn cache_put(
    ctx: *mut c_void,
    cache: KwSlice,
    key: KwSlice,
    value: KwSlice,
) -> KwStatus {
    boundary!(abi::KW_PANIC, {
        // SAFETY: the plugin passes the ctx of its table (ABI contract).
        if unsafe { retired(ctx) } {
            return abi::KW_RETIRED;
        }
        // SAFETY: as in cache_get.
        let (Some(ctx), Some(cache), Some(key), Some(value)) = (
            unsafe { context(ctx) },
            unsafe { cache.as_bytes() },
            unsafe { key.as_bytes() },
            unsafe { value.as_bytes() },
        ) else {
            return abi::KW_INVALID_ARGUMENT;
        };
        ctx.store
            .with_cache(cache, |c| {
                put_status(c.put_as(key, value, ctx.identity(cache)))
            })
            .unwrap_or(abi::KW_INVALID_ARGUMENT)
    })
}

unsafe extern "C" fn cache_reset(ctx: *mut c_void, cache: KwSlice) -> KwStatus {
    boundary!(abi::KW_PANIC, {
        // SAFETY: the plugin passes the ctx of its table (ABI contract).
        if unsafe { retired(ctx) } {
            return abi::KW_RETIRED;
        }
        // SAFETY: as in cache_get.
        let (Some(ctx), Some(cache)) = (unsafe { context(ctx) }, unsafe { name(cache) }) else {
            return abi::KW_INVALID_ARGUMENT;
        };
        ctx.store.cache(cache).reset();
        abi::KW_OK
    })
}

/// `progress`: records `done` of `total` for the call on this thread.
unsafe extern "C" fn progress(ctx: *mut c_void, done: u64, total: u64) {
    boundary!((), {
        // SAFETY: the plugin passes the ctx of its table (ABI contract).
        if unsafe { retired(ctx) } {
            return;
        }
        crate::in_flight::progress(done, total);
    })
}

unsafe extern "C" fn log_line(ctx: *mut c_void, level: u32, message: KwSlice) {
    boundary!((), {
        // SAFETY: the plugin passes the ctx of its table (ABI contract).
        if unsafe { retired(ctx) } {
            return;
        }
        // SAFETY: as in cache_get.
        let (Some(ctx), Some(bytes)) = (unsafe { context(ctx) }, unsafe { message.as_bytes() })
        else {
            return;
        };
        (ctx.events)(&Event::Log {
            generation: ctx.generation,
            level,
            message: String::from_utf8_lossy(bytes).into_owned(),
        });
    })
}
