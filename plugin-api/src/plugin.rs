//! The plugin's side of the boundary: the `extern "C"` shells that
//! [`plugin!`](crate::plugin!) generates call into these safe helpers,
//! and the memoization of `#[memo]` and [`cached`] over [`crate::host`].
//!
//! Every shell body runs inside [`ffi_boundary`], the one place that catches
//! a panic before it could unwind into the host.

use std::any::Any;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::abi::{self, KwCacheDecl, KwHostApi, KwOutput, KwSlice, KwStatus};
use crate::{panic_hook, Error};

/// The arguments of one call, as the JSON values `keepwarm call` sent.
///
/// ```
/// # use keepwarm_api::Args;
/// let args = Args::from_json("square", b"[10]").unwrap();
/// assert_eq!(args.len(), 1);
/// assert_eq!(args.get::<u64>(0).unwrap(), 10);
/// assert!(args.get::<String>(0).unwrap_err().to_string().contains("argument 1"));
/// ```
///
/// Each argument is kept as the JSON text the host sent and decoded only by
/// [`Args::get`], straight into the type the function asks for: integers
/// beyond 64 bits (`u128`, `i128`) arrive exactly, never through a float.
///
/// ```
/// # use keepwarm_api::Args;
/// let args = Args::from_json("f", b"[340282366920938463463374607431768211455]").unwrap();
/// assert_eq!(args.get::<u128>(0).unwrap(), u128::MAX);
/// ```
#[derive(Debug)]
pub struct Args {
    function: &'static str,
    values: Vec<Box<serde_json::value::RawValue>>,
}

impl Args {
    /// Parses a JSON array of arguments for `function`.
    pub fn from_json(function: &'static str, json: &[u8]) -> Result<Args, Error> {
        let values: Vec<Box<serde_json::value::RawValue>> = serde_json::from_slice(json)
            .map_err(|e| Error::new(format!("{function}: arguments must be a JSON array: {e}")))?;
        Ok(Args { function, values })
    }

    /// Number of arguments.
    ///
    /// ```
    /// let args = keepwarm_api::Args::from_json("f", b"[1, 2]").unwrap();
    /// assert_eq!(args.len(), 2);
    /// assert!(!args.is_empty());
    /// assert!(args.expect_len(1).unwrap_err().to_string().contains("f takes 1 argument, got 2"));
    /// ```
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there are no arguments.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Fails unless there are exactly `n` arguments.
    pub fn expect_len(&self, n: usize) -> Result<(), Error> {
        if self.values.len() == n {
            Ok(())
        } else {
            Err(Error::new(format!(
                "{} takes {n} argument{}, got {}",
                self.function,
                if n == 1 { "" } else { "s" },
                self.values.len()
            )))
        }
    }

    /// Argument `i` (0-based) decoded as `T`, with an error that names the
    /// function, the argument and the expected type.
    pub fn get<T: DeserializeOwned>(&self, i: usize) -> Result<T, Error> {
        let value = self.values.get(i).ok_or_else(|| {
            Error::new(format!(
                "{}: missing argument {} (got {})",
                self.function,
                i + 1,
                self.values.len()
            ))
        })?;
        serde_json::from_str::<T>(value.get()).map_err(|e| {
            Error::new(format!(
                "{}: argument {} ({}): expected {}: {e}",
                self.function,
                i + 1,
                value.get(),
                std::any::type_name::<T>()
            ))
        })
    }
}

/// A cache declaration for [`plugin!`](crate::plugin!), built in `const`
/// context.
///
/// ```
/// const SQUARE: keepwarm_api::abi::KwCacheDecl =
///     keepwarm_api::cache("square").max_entries(10_000).max_bytes(1 << 20);
/// assert_eq!(SQUARE.max_entries, 10_000);
/// ```
pub const fn cache(name: &'static str) -> KwCacheDecl {
    KwCacheDecl::new(name)
}

/// Memoizes `compute` in the host cache `cache` under `key`.
///
/// On a miss, `compute` runs in this thread; when several threads miss the
/// same key at once, one computes and the others wait for its value (the
/// host's single flight), and a value computed while the cache was reset is
/// returned but not stored. Keys and values are encoded with postcard, values
/// behind an 8-byte shape tag: a fingerprint of `V`'s full structure (field
/// names, order and types, enum variants; see `docs/TRUST.md`) and of `K`'s
/// type name. A stored value of another shape (the type changed between
/// reloads), or one that does not decode, is a miss, counted by the host as
/// `shape_mismatch`, and is overwritten. A
/// computation that needs its own key panics with a message naming the cache
/// (the call fails with that error) instead of deadlocking. Outside a host,
/// `compute` simply runs.
///
/// ```
/// let v = keepwarm_api::cached("square", &12u64, || 12u64 * 12);
/// assert_eq!(v, 144);
/// ```
pub fn cached<K, V, F>(cache: &str, key: &K, compute: F) -> V
where
    K: Serialize + ?Sized,
    V: Serialize + DeserializeOwned,
    F: FnOnce() -> V,
{
    cached_key(
        crate::host::Target::Name(cache, tag_for::<K, V>()),
        encode_key(key),
        compute,
    )
}

impl crate::HostCache {
    /// [`cached`](crate::cached) on this cache: memoizes `compute` under
    /// `key` (postcard-encoded), with the host's single flight, through the
    /// handle. What `#[memo]` expands to.
    ///
    /// ```
    /// use keepwarm_api::HostCache;
    /// static SQUARES: HostCache = HostCache::new("square");
    ///
    /// let x = 12u64;
    /// assert_eq!(SQUARES.cached(&x, || x * x), 144); // computed: no host here
    /// ```
    pub fn cached<K, V, F>(&'static self, key: &K, compute: F) -> V
    where
        K: serde::Serialize + ?Sized,
        V: serde::Serialize + serde::de::DeserializeOwned,
        F: FnOnce() -> V,
    {
        cached(self.name(), key, compute)
    }
}

/// The shape tag of values of type `V` under keys of type `K` (by name:
/// `K` need not be `Deserialize`), computed once per pair of types.
fn tag_for<K: ?Sized, V: DeserializeOwned>() -> u64 {
    use std::collections::HashMap;
    use std::sync::Mutex;
    #[allow(clippy::type_complexity)]
    static TAGS: Mutex<Option<HashMap<(&'static str, &'static str), u64>>> = Mutex::new(None);
    let types = (std::any::type_name::<K>(), std::any::type_name::<V>());
    if let Some(&tag) = TAGS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .get(&types)
    {
        return tag;
    }
    // Traced outside the lock: a type's Deserialize may call `cached`.
    let tag = crate::shape::tag(crate::shape::of::<V>(), &[crate::shape::by_name::<K>()]);
    TAGS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(types, tag);
    tag
}

/// Encodes a memo key (postcard); `None` for a key serde refuses.
#[doc(hidden)]
pub fn encode_key<K: Serialize + ?Sized>(key: &K) -> Option<Vec<u8>> {
    postcard::to_stdvec(key).ok()
}

/// `#[memo]`'s compile-time check that an argument can be a key.
#[doc(hidden)]
pub fn assert_key<K: Serialize + ?Sized>() {}

/// `#[memo]`'s compile-time check that a result can be cached.
#[doc(hidden)]
pub fn assert_value<V: Serialize + DeserializeOwned>() {}

/// [`cached`] with the key already encoded (what `#[memo]` expands to).
#[doc(hidden)]
pub fn cached_key<V, F>(cache: crate::host::Target<'_>, key: Option<Vec<u8>>, compute: F) -> V
where
    V: Serialize + DeserializeOwned,
    F: FnOnce() -> V,
{
    cached_key_if(cache, key, compute, |_| true)
}

/// A memoized call that finds less stack than this left moves to a new
/// segment of [`MEMO_STACK_SEGMENT`] bytes (one level of memoized recursion
/// takes a few KiB in a debug build, the host's frames included).
pub const MEMO_RED_ZONE: usize = 256 << 10;
/// The size of each stack segment a memoized call grows into.
pub const MEMO_STACK_SEGMENT: usize = 16 << 20;

/// [`cached_key`] that stores a computed value only when `keep` says so:
/// what `#[memo]` expands to for a function returning `Result` (only `Ok`
/// is kept) or, with `#[memo(option)]`, `Option` (only `Some`). A value not
/// kept is returned to its caller and never shared: a waiter computes its
/// own.
#[doc(hidden)]
pub fn cached_key_if<V, F>(
    cache: crate::host::Target<'_>,
    key: Option<Vec<u8>>,
    compute: F,
    keep: fn(&V) -> bool,
) -> V
where
    V: Serialize + DeserializeOwned,
    F: FnOnce() -> V,
{
    let Some(key_bytes) = key else {
        return compute();
    };
    let tag = cache.tag();
    let mut state = Flight::<F, V> {
        compute: Some(compute),
        value: None,
        panic: None,
        keep,
        tag,
    };
    // Memoized recursion nests one computation per level, each with the
    // host's frames between: grow the stack on demand instead of
    // overflowing it, so recursion is as deep as memory allows.
    let status = stacker::maybe_grow(MEMO_RED_ZONE, MEMO_STACK_SEGMENT, || {
        crate::host::get_or_compute(
            cache,
            &key_bytes,
            &mut state as *mut Flight<F, V> as *mut c_void,
            flight_call::<F, V>,
        )
    });
    if let Some(payload) = state.panic.take() {
        std::panic::resume_unwind(payload);
    }
    if let Some(value) = state.value.take() {
        return value; // computed right here
    }
    match status {
        crate::host::Flown::Value(stored) => {
            if let Some(value) = decode::<V>(&stored, tag) {
                return value;
            }
        }
        crate::host::Flown::Cycle => {
            panic!(
                "memoization cycle in cache `{}`: computing a key needs the same key",
                cache.name()
            )
        }
        crate::host::Flown::NoHost | crate::host::Flown::Failed => {}
    }
    // No host, or a stored value of another type: compute and overwrite.
    let compute = state.compute.take().expect("not computed yet");
    let value = compute();
    if !keep(&value) {
        return value;
    }
    if let Some(bytes) = encode(&value, tag) {
        if let Err(e) = cache.put(&key_bytes, &bytes) {
            crate::log_line(abi::KW_LOG_DEBUG, &format!("not cached: {e}"));
        }
    }
    value
}

/// The state of one [`cached`] call, reached by [`flight_call`] through the
/// host's `user` pointer.
struct Flight<F, V> {
    compute: Option<F>,
    value: Option<V>,
    panic: Option<Box<dyn Any + Send>>,
    /// Whether a computed value may be stored (an `Err` may not).
    keep: fn(&V) -> bool,
    /// The shape tag its bytes begin with.
    tag: u64,
}

/// The computation the host runs on a miss.
///
/// # Safety
/// `user` must be the `Flight<F, V>` of the `cached` call that passed it, and
/// `out` a valid output for this call.
unsafe extern "C" fn flight_call<F, V>(user: *mut c_void, out: *mut KwOutput) -> KwStatus
where
    F: FnOnce() -> V,
    V: Serialize,
{
    // SAFETY: per the contract: `cached` passes its own live Flight, and the
    // host calls this at most once, on the same thread, during that call.
    let (flight, out) = unsafe { (&mut *(user as *mut Flight<F, V>), out.as_ref()) };
    let Some(compute) = flight.compute.take() else {
        return abi::KW_INVALID_ARGUMENT;
    };
    // The panic is carried back to `cached`, which resumes it in the plugin:
    // it never crosses the host's frames.
    match catch_unwind(AssertUnwindSafe(compute)) {
        Ok(value) => {
            let status = match encode(&value, flight.tag) {
                // Not to be cached: a failure status stores nothing and frees
                // the key; `cached_key_if` returns the value it kept here.
                _ if !(flight.keep)(&value) => abi::KW_ERROR,
                Some(bytes) => {
                    write(out, &bytes);
                    abi::KW_OK
                }
                None => abi::KW_ERROR,
            };
            flight.value = Some(value);
            status
        }
        Err(payload) => {
            flight.panic = Some(payload);
            abi::KW_PANIC
        }
    }
}

/// A value as stored: its 8-byte shape tag (little-endian), then postcard.
fn encode<V: Serialize>(value: &V, tag: u64) -> Option<Vec<u8>> {
    let mut bytes = tag.to_le_bytes().to_vec();
    postcard::to_io(value, &mut bytes).ok()?;
    Some(bytes)
}

/// The value stored as `bytes`, if it has the shape tag `tag` and decodes
/// completely.
fn decode<V: DeserializeOwned>(bytes: &[u8], tag: u64) -> Option<V> {
    let body = bytes.strip_prefix(&tag.to_le_bytes())?;
    match postcard::take_from_bytes::<V>(body) {
        Ok((value, [])) => Some(value),
        _ => None,
    }
}

/// The panic message of a caught panic payload.
///
/// ```
/// let payload = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
/// assert_eq!(keepwarm_api::panic_message(&*payload), "boom 1");
/// ```
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

/// Writes `bytes` to `out`, if there is one.
fn write(out: Option<&KwOutput>, bytes: &[u8]) {
    if let Some(out) = out {
        // SAFETY: `out` is the live output the host passed to this call; the
        // host's write copies the bytes before returning.
        unsafe { (out.write)(out.ctx, bytes.as_ptr(), bytes.len()) }
    }
}

/// Runs `body` so that no panic escapes: a panic becomes [`abi::KW_PANIC`]
/// with its message written to `out`. Every shell uses this.
///
/// In a loaded plugin, whose panic hook the SDK replaced at `on_load`, the
/// message ends with where the panic happened (`panicked: boom (at
/// src/lib.rs:12:5)`) and nothing is printed: the message is the report.
///
/// ```
/// use keepwarm_api::{abi, ffi_boundary};
/// assert_eq!(ffi_boundary(None, || abi::KW_OK), abi::KW_OK);
/// assert_eq!(ffi_boundary(None, || panic!("never crosses the ABI")), abi::KW_PANIC);
/// ```
pub fn ffi_boundary(out: Option<&KwOutput>, body: impl FnOnce() -> KwStatus) -> KwStatus {
    // Entered before catch_unwind so that the hook, which runs before the
    // unwinding, sees this thread inside a call.
    let _in_call = panic_hook::InCall::enter();
    panic_hook::clear();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(status) => status,
        Err(payload) => {
            let message = format!(
                "panicked: {}{}",
                panic_message(&*payload),
                panic_hook::take_location()
            );
            // Writing the message must not panic either (a panicking host write
            // would be a host bug); guard it the same way.
            let _ = catch_unwind(AssertUnwindSafe(|| write(out, message.as_bytes())));
            abi::KW_PANIC
        }
    }
}

/// The body of a generated function shell: decode the JSON arguments, call the
/// plugin function, encode its result.
///
/// # Safety
/// `args` must be a valid slice for the call, and `out` NULL or a valid output.
#[doc(hidden)]
pub unsafe fn call_json<R, F>(
    function: &'static str,
    args: KwSlice,
    out: *mut KwOutput,
    f: F,
) -> KwStatus
where
    R: Serialize,
    F: FnOnce(&Args) -> Result<R, Error>,
{
    // SAFETY: the host passes a valid output or NULL.
    let out = unsafe { out.as_ref() };
    let Some(out) = out else {
        return abi::KW_INVALID_ARGUMENT;
    };
    ffi_boundary(Some(out), || {
        // SAFETY: the host keeps `args` valid for the duration of the call.
        let Some(json) = (unsafe { args.as_bytes() }) else {
            return abi::KW_INVALID_ARGUMENT;
        };
        let result = Args::from_json(function, json)
            .and_then(|args| f(&args))
            .and_then(|r| serde_json::to_vec(&r).map_err(Error::from));
        match result {
            Ok(bytes) => {
                write(Some(out), &bytes);
                abi::KW_OK
            }
            Err(e) => {
                write(Some(out), e.message().as_bytes());
                abi::KW_ERROR
            }
        }
    })
}

/// The body of the generated `on_load` shell: check and record the host
/// table, then run the plugin's own hook.
///
/// # Safety
/// `host` must be NULL or a table valid while the library is loaded; `err`
/// NULL or a valid output.
#[doc(hidden)]
pub unsafe fn on_load(
    host: *const KwHostApi,
    err: *mut KwOutput,
    hook: Option<fn() -> Result<(), Error>>,
) -> KwStatus {
    // SAFETY: the host passes a valid output or NULL.
    let err = unsafe { err.as_ref() };
    ffi_boundary(err, || {
        // First, so that a panic anywhere in this generation, the plugin's
        // own on_load included, reaches the host as an error and nothing
        // else (see panic_hook: no backtrace is captured, nothing leaks).
        panic_hook::install();
        // SAFETY: the host passes a table valid while we are loaded, or NULL.
        let Some(table) = (unsafe { host.as_ref() }) else {
            write(err, b"on_load: the host passed no function table");
            return abi::KW_INVALID_ARGUMENT;
        };
        if table.abi_version != abi::KW_ABI_VERSION
            // Functions added since (cache_open_with) are used only when
            // the table's size covers them.
            || (table.size as usize) < core::mem::offset_of!(KwHostApi, cache_open_with)
        {
            let msg = format!(
                "on_load: host speaks keepwarm ABI {} (table of {} bytes), this plugin needs ABI {}",
                table.abi_version,
                table.size,
                abi::KW_ABI_VERSION
            );
            write(err, msg.as_bytes());
            return abi::KW_INVALID_ARGUMENT;
        }
        // SAFETY: checked non-NULL and of our version; valid while loaded.
        unsafe { crate::host::install(host) };
        // Tell the host the code identity of each #[memo] cache now (a
        // handle with no shape), not at its first call.
        for &(name, code) in crate::__private::MEMO_CODES.iter() {
            let _ = crate::host::open(table, name, 0, 0, code);
        }
        match hook.map(|h| h()) {
            None | Some(Ok(())) => abi::KW_OK,
            Some(Err(e)) => {
                write(err, e.message().as_bytes());
                abi::KW_ERROR
            }
        }
    })
}

/// The body of the generated `on_unload` shell.
#[doc(hidden)]
pub fn on_unload(hook: Option<fn()>) {
    ffi_boundary(None, || {
        if let Some(h) = hook {
            h();
        }
        abi::KW_OK
    });
    // Leave std as on_load found it: the default hook.
    panic_hook::uninstall();
    // SAFETY: NULL is always allowed.
    unsafe { crate::host::install(core::ptr::null()) };
}
