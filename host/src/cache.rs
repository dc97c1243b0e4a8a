//! Named caches owned by the host: LRU eviction under an entry bound and an
//! optional byte bound, with the per-cache figures `stats` prints.
//!
//! Values are stored as `Arc<[u8]>` so that a hit hands the plugin the bytes
//! without copying and without keeping any lock: the plugin holds a lease (one
//! reference) until it releases the value.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::num::NonZeroUsize;
use std::sync::{Arc, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use lru::LruCache;
use parking_lot::{Condvar, Mutex};

/// Entry bound of a cache that nobody declared or configured.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

/// Byte bound (memory of keys, values and bookkeeping, see
/// [`entry_bytes`]) of a cache that nobody declared or configured: 256 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

/// Bounds of one cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Maximum number of entries.
    pub max_entries: NonZeroUsize,
    /// Maximum bytes of keys plus values; `None` is unbounded.
    pub max_bytes: Option<u64>,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_entries: NonZeroUsize::new(DEFAULT_MAX_ENTRIES).unwrap(),
            max_bytes: Some(DEFAULT_MAX_BYTES),
        }
    }
}

impl std::str::FromStr for Bounds {
    type Err = String;

    /// Parses `ENTRIES[:BYTES]`, as in `--cache square=1000:1048576`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (entries, bytes) = match s.split_once(':') {
            Some((e, b)) => (e, Some(b)),
            None => (s, None),
        };
        let max_entries = entries
            .trim()
            .parse::<NonZeroUsize>()
            .map_err(|_| format!("entry bound {entries:?} is not a positive integer"))?;
        let max_bytes = bytes
            .map(|b| {
                b.trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|&b| b > 0)
                    .ok_or_else(|| format!("byte bound {b:?} is not a positive integer"))
            })
            .transpose()?;
        Ok(Bounds {
            max_entries,
            max_bytes,
        })
    }
}

/// The figures of one cache, as `keepwarm stats --json` prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStats {
    /// The cache's name.
    pub name: String,
    /// Entries now.
    pub entries: u64,
    /// Bytes of keys plus values now.
    pub bytes: u64,
    /// The entry bound.
    pub capacity: u64,
    /// The byte bound; `None` (JSON null) when unbounded.
    pub max_bytes: Option<u64>,
    /// Lookups that found their key.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Values stored (new keys and replacements).
    pub inserts: u64,
    /// Entries dropped to respect the bounds.
    pub evictions: u64,
    /// Times the cache was reset.
    pub resets: u64,
    /// Values refused because the code that computed them is no longer
    /// the code the cache belongs to (an old generation's call finishing
    /// after a reload changed the cache's identity).
    pub stale_puts: u64,
    /// Lookups that found their key with a value of another shape (the
    /// value's type changed between builds): counted as misses too, and
    /// computed again, never served.
    pub shape_mismatch: u64,
    /// Lookups that found their key older than the handle's time to live:
    /// counted as misses too; the entry is dropped.
    pub expired: u64,
    /// Nanoseconds the misses spent computing (the plugin's code, timed by
    /// the host; for memoized recursion, each level's own time).
    pub compute_ns: u64,
    /// Nanoseconds the hits saved: for each hit, the time its entry took
    /// to compute (exact per entry; entries stored with `host_cache_put`
    /// carry no time and save 0).
    pub saved_ns: u64,
    /// Entries in the durable store (`--persist`; 0 without it). Filled by
    /// [`Cache::persisted`], which counts them in the store.
    pub persisted_entries: u64,
    /// Bytes of keys plus values in the durable store.
    pub persisted_bytes: u64,
    /// Reads and writes of the durable store that failed (a full disk, a
    /// damaged page): the call still answered, from memory or by computing.
    pub store_errors: u64,
    /// Local misses the shared tier (`--shared`) answered: also counted in `hits`.
    pub shared_hits: u64,
    /// Local misses the shared tier did not answer (not there, not asked while it is down, or too slow).
    pub shared_misses: u64,
    /// Shared reads or writes that failed or timed out, and shared values refused.
    pub shared_errors: u64,
    /// Shared values that failed their checks (header, identity, length, checksum, shape, size): never served.
    pub shared_refused: u64,
    /// Computed entries not queued for the shared tier because its write queue was full.
    pub shared_queue_drops: u64,
    /// Entries written to the shared tier.
    pub shared_writes: u64,
}

impl CacheStats {
    /// The fields of the JSON object, in order.
    pub const FIELDS: [&'static str; 24] = [
        "name",
        "entries",
        "bytes",
        "capacity",
        "max_bytes",
        "hits",
        "misses",
        "inserts",
        "evictions",
        "resets",
        "stale_puts",
        "shape_mismatch",
        "expired",
        "compute_s",
        "saved_s",
        "persisted_entries",
        "persisted_bytes",
        "store_errors",
        "shared_hits",
        "shared_misses",
        "shared_errors",
        "shared_refused",
        "shared_queue_drops",
        "shared_writes",
    ];

    /// The figures as the JSON object `keepwarm stats --json` prints.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "entries": self.entries,
            "bytes": self.bytes,
            "capacity": self.capacity,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "inserts": self.inserts,
            "evictions": self.evictions,
            "resets": self.resets,
            "stale_puts": self.stale_puts,
            "shape_mismatch": self.shape_mismatch,
            "expired": self.expired,
            "compute_s": seconds(self.compute_ns),
            "saved_s": seconds(self.saved_ns),
            "persisted_entries": self.persisted_entries,
            "persisted_bytes": self.persisted_bytes,
            "store_errors": self.store_errors,
            "shared_hits": self.shared_hits,
            "shared_misses": self.shared_misses,
            "shared_errors": self.shared_errors,
            "shared_refused": self.shared_refused,
            "shared_queue_drops": self.shared_queue_drops,
            "shared_writes": self.shared_writes,
        })
    }

    /// The figures from that JSON object (the newer figures default to 0).
    pub fn from_json(value: &serde_json::Value) -> Result<CacheStats, String> {
        let o = crate::json::Object::new(value, "cache figures", &CacheStats::FIELDS)?;
        Ok(CacheStats {
            name: o.str("name")?,
            entries: o.u64("entries")?,
            bytes: o.u64("bytes")?,
            capacity: o.u64("capacity")?,
            max_bytes: o.opt_u64("max_bytes")?,
            hits: o.u64("hits")?,
            misses: o.u64("misses")?,
            inserts: o.u64("inserts")?,
            evictions: o.u64("evictions")?,
            resets: o.u64("resets")?,
            stale_puts: o.u64_or_0("stale_puts")?,
            shape_mismatch: o.u64_or_0("shape_mismatch")?,
            expired: o.u64_or_0("expired")?,
            compute_ns: nanos(o.opt_f64("compute_s")?.unwrap_or(0.0)),
            saved_ns: nanos(o.opt_f64("saved_s")?.unwrap_or(0.0)),
            persisted_entries: o.u64_or_0("persisted_entries")?,
            persisted_bytes: o.u64_or_0("persisted_bytes")?,
            store_errors: o.u64_or_0("store_errors")?,
            shared_hits: o.u64_or_0("shared_hits")?,
            shared_misses: o.u64_or_0("shared_misses")?,
            shared_errors: o.u64_or_0("shared_errors")?,
            shared_refused: o.u64_or_0("shared_refused")?,
            shared_queue_drops: o.u64_or_0("shared_queue_drops")?,
            shared_writes: o.u64_or_0("shared_writes")?,
        })
    }
}

/// Nanoseconds as seconds, rounded to the microsecond (as `--json` prints
/// them).
fn seconds(ns: u64) -> f64 {
    (ns / 1_000) as f64 / 1e6
}

/// Seconds as nanoseconds (negative or non-finite: 0).
fn nanos(s: f64) -> u64 {
    if s.is_finite() && s > 0.0 {
        (s * 1e9).round() as u64
    } else {
        0
    }
}

crate::json::via_json!(CacheStats);

/// What a lookup through a handle requires of an entry, from the options
/// the handle was opened with (`cache_open_with`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Want {
    /// The value must begin with these 8 bytes (its shape tag).
    pub shape: Option<[u8; 8]>,
    /// The entry must be younger than this.
    pub ttl: Option<Duration>,
}

impl Want {
    /// No requirement: any stored value is a hit.
    pub const ANY: Want = Want {
        shape: None,
        ttl: None,
    };
}

/// Why a stored entry is not served through a handle.
enum Unfit {
    Shape,
    Expired,
}

/// One stored value, with when it was stored.
struct Slot {
    value: Arc<[u8]>,
    /// Nanoseconds since [`clock_origin`] when the value was stored.
    born: u64,
    /// Nanoseconds the value took to compute (0: stored by a put).
    cost: u64,
}

/// The origin of the entries' timestamps.
fn clock_origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Now, in nanoseconds since [`clock_origin`].
fn now_ns() -> u64 {
    clock_origin().elapsed().as_nanos() as u64
}

impl Slot {
    /// Whether this entry may be served to a lookup wanting `want`.
    fn fits(&self, want: &Want) -> Result<(), Unfit> {
        if let Some(tag) = want.shape {
            if self.value.get(..8) != Some(&tag[..]) {
                return Err(Unfit::Shape);
            }
        }
        if let Some(ttl) = want.ttl {
            if now_ns().saturating_sub(self.born) >= ttl.as_nanos() as u64 {
                return Err(Unfit::Expired);
            }
        }
        Ok(())
    }
}

/// Why a put was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutError {
    /// The key and value alone exceed the byte bound.
    TooLarge,
}

struct Inner {
    lru: LruCache<Box<[u8]>, Slot>,
    bounds: Bounds,
    bytes: u64,
    hits: u64,
    misses: u64,
    inserts: u64,
    evictions: u64,
    resets: u64,
    stale_puts: u64,
    shape_mismatch: u64,
    expired: u64,
    compute_ns: u64,
    saved_ns: u64,
    store_errors: u64,
    code_hash: u64,
    /// Bumped by every reset: a computation that started before a reset
    /// must not store its (stale) value after it.
    epoch: u64,
}

impl Inner {
    /// Evicts least recently used entries until the bounds hold, telling
    /// `evicted` each key.
    fn evict_to_bounds(&mut self, mut evicted: impl FnMut(&[u8])) {
        while self.lru.len() > self.bounds.max_entries.get()
            || self.bounds.max_bytes.is_some_and(|max| self.bytes > max)
        {
            let Some((k, v)) = self.lru.pop_lru() else {
                break;
            };
            self.bytes -= entry_bytes(&k, &v.value);
            self.evictions += 1;
            evicted(&k);
        }
    }

    /// Counts why an entry found for a lookup was not served; an expired
    /// one is dropped.
    fn refuse(&mut self, key: &[u8], why: Unfit) {
        self.misses += 1;
        match why {
            Unfit::Shape => self.shape_mismatch += 1,
            Unfit::Expired => {
                self.expired += 1;
                if let Some(slot) = self.lru.pop(key) {
                    self.bytes -= entry_bytes(key, &slot.value);
                }
            }
        }
    }
}

/// The memory one entry costs, as `bytes` in the figures and the byte bound
/// count it: its key and value, and what holding them takes — each
/// allocation as glibc's malloc rounds it (an 8-byte header, 16-byte
/// granules, 32 bytes at least), the value's reference counts, the LRU node,
/// and the node's slot in the hash table (16 bytes at a load of at most 7/8,
/// plus its control byte; 32 on average over the table's doublings).
/// `tests/tests/memory.rs` checks this against the process's real RSS.
pub fn entry_bytes(key: &[u8], value: &[u8]) -> u64 {
    fn chunk(n: usize) -> u64 {
        ((n as u64 + 8).div_ceil(16) * 16).max(32)
    }
    // The LRU node: the key's Box (16), the value's Arc (16), two links.
    const NODE: usize = 48;
    const SLOT: u64 = 32;
    chunk(key.len()) + chunk(16 + value.len()) + chunk(NODE) + SLOT
}

thread_local! {
    /// Nanoseconds spent by the computations nested in this thread's
    /// current one (memoized recursion), so that each level counts only its
    /// own time in `compute_ns`.
    static NESTED_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A computation in progress for one key: the thread computing it, and
/// where the threads waiting for it find the outcome.
struct Flight {
    owner: ThreadId,
    outcome: Mutex<Option<Option<Arc<[u8]>>>>,
    done: Condvar,
}

/// Which thread waits for which: a thread about to wait for a flight whose
/// owner (transitively) waits for it would deadlock; it gets
/// [`Computed::Cycle`] instead.
///
/// Each edge also names the flight it waits on, and the leader of a flight
/// removes every edge to that flight before it wakes the waiters: a woken
/// waiter that has not run yet must not stay in the graph, where it would
/// close false cycles with the next flight its old leader waits for.
#[allow(clippy::type_complexity)]
static WAITS_FOR: Mutex<Option<HashMap<ThreadId, (ThreadId, usize)>>> = Mutex::new(None);

/// The outcome of [`Cache::get_or_compute`].
#[derive(Debug)]
pub enum Computed<E> {
    /// The value: found, computed here, or computed by another thread while
    /// this one waited.
    Value(Arc<[u8]>),
    /// The computation asked (directly or through other threads) for the
    /// very key it is computing.
    Cycle,
    /// This thread's computation failed.
    Failed(E),
}

/// What [`Cache::get_into`] found.
#[derive(Debug)]
pub enum Found {
    /// A hit whose value was copied into the caller's buffer: its length.
    Copied(usize),
    /// A hit too large for the buffer: the value, shared.
    Shared(Arc<[u8]>),
    /// Not in the cache.
    Miss,
}

/// One named cache.
pub struct Cache {
    name: String,
    inner: Mutex<Inner>,
    flights: Mutex<HashMap<Box<[u8]>, Arc<Flight>>>,
    /// The durable tier behind the memory, with `--persist`.
    durable: Option<Arc<Durable>>,
    /// Held while a value is written to the durable tier and while a reset
    /// clears it, so a write that lost the race to a reset is never stored
    /// after it. Hits never take it.
    writing: Mutex<()>,
    /// The shared tier's figures of this cache (`--shared`; all 0 without).
    shared: Arc<crate::shared::Counters>,
    /// The shared identities (code prefixes) this cache's current code was
    /// opened with, and the generation that opened them: what
    /// `reset CACHE --shared` drops.
    shared_codes: Mutex<(u64, Vec<Box<[u8]>>)>,
}

/// What a local miss may ask the shared tier, and under which identity.
#[derive(Clone, Copy)]
pub struct SharedLookup<'a> {
    /// The tier.
    pub tier: &'a crate::shared::SharedTier,
    /// The identity of the entries: plugin, cache, code, shape.
    pub id: &'a crate::shared::SharedId,
}

/// The durable tier the caches of a host share, and how its failures are
/// reported.
pub struct Durable {
    /// The tier.
    pub tier: Arc<dyn crate::persist::Tier>,
    /// Says a failure once per outage (the host's warning line).
    pub warn: Arc<dyn Fn(&str) + Send + Sync>,
    warned: std::sync::atomic::AtomicBool,
    /// Whether a memory miss asks the tier ([`crate::persist::Tier::reads`]).
    reads: bool,
}

impl Durable {
    /// A durable tier whose first failure of each outage is said through
    /// `warn`.
    pub fn new(
        tier: Arc<dyn crate::persist::Tier>,
        warn: Arc<dyn Fn(&str) + Send + Sync>,
    ) -> Durable {
        Durable {
            reads: tier.reads(),
            tier,
            warn,
            warned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn failed(&self, cache: &Cache, what: &str, e: &crate::persist::TierError) {
        cache.inner.lock().store_errors += 1;
        if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
            (self.warn)(&format!(
                "the cache store failed to {what} an entry of `{}` ({e}); calls still answer, the entries stay in memory only (counted in store_errors)",
                cache.name
            ));
        }
    }

    fn worked(&self) {
        if self.warned.load(std::sync::atomic::Ordering::Relaxed) {
            self.warned
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A stored time (Unix milliseconds) as a slot's `born`.
fn born_from_unix_ms(ms: u64) -> u64 {
    let age_ms = crate::persist::now_ms().saturating_sub(ms);
    now_ns().saturating_sub(age_ms.saturating_mul(1_000_000))
}

impl Cache {
    /// An empty cache with these bounds.
    pub fn new(name: impl Into<String>, bounds: Bounds) -> Cache {
        Cache::with_durable(name, bounds, None, 0)
    }

    /// An empty cache backed by `durable` (its entries are read there on a
    /// memory miss and written there on every store), whose code identity
    /// was last declared as `identity`.
    pub fn with_durable(
        name: impl Into<String>,
        bounds: Bounds,
        durable: Option<Arc<Durable>>,
        identity: u64,
    ) -> Cache {
        Cache {
            durable,
            writing: Mutex::new(()),
            shared: Arc::default(),
            shared_codes: Mutex::new((0, Vec::new())),
            name: name.into(),
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bounds,
                bytes: 0,
                hits: 0,
                misses: 0,
                inserts: 0,
                evictions: 0,
                resets: 0,
                stale_puts: 0,
                shape_mismatch: 0,
                expired: 0,
                compute_ns: 0,
                saved_ns: 0,
                store_errors: 0,
                code_hash: identity,
                epoch: 0,
            }),
            flights: Mutex::new(HashMap::new()),
        }
    }

    /// The cache's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Looks `key` up, marking it most recently used on a hit.
    pub fn get(&self, key: &[u8]) -> Option<Arc<[u8]>> {
        {
            let mut inner = self.inner.lock();
            if let Some(slot) = inner.lru.get(key) {
                let v = Arc::clone(&slot.value);
                let cost = slot.cost;
                inner.hits += 1;
                inner.saved_ns += cost;
                return Some(v);
            }
            if !self.durable.as_ref().is_some_and(|d| d.reads) {
                inner.misses += 1;
                return None;
            }
        }
        let found = self.read_through(key, &Want::ANY);
        let mut inner = self.inner.lock();
        match found {
            Some((v, cost)) => {
                inner.hits += 1;
                inner.saved_ns += cost;
                Some(v)
            }
            None => {
                inner.misses += 1;
                None
            }
        }
    }

    /// A memory miss asks the durable tier: an entry of the cache's
    /// identity that fits `want` is brought into memory and returned with
    /// its cost. Nothing is counted here.
    fn read_through(&self, key: &[u8], want: &Want) -> Option<(Arc<[u8]>, u64)> {
        let durable = self.durable.as_ref().filter(|d| d.reads)?;
        let (epoch, identity) = {
            let inner = self.inner.lock();
            (inner.epoch, inner.code_hash)
        };
        let record = match durable.tier.get(&self.name, key) {
            Ok(r) => r?,
            Err(e) => {
                durable.failed(self, "read", &e);
                return None;
            }
        };
        // Computed by other code than the cache's now: never served.
        if record.identity != 0 && identity != 0 && record.identity != identity {
            return None;
        }
        let slot = Slot {
            value: Arc::from(record.value),
            born: born_from_unix_ms(record.born_ms),
            cost: record.cost_ns,
        };
        if slot.fits(want).is_err() {
            return None;
        }
        let mut inner = self.inner.lock();
        // Reset while it was read: the entry is gone.
        if inner.epoch != epoch {
            return None;
        }
        if let Some(there) = inner.lru.get(key) {
            return Some((Arc::clone(&there.value), there.cost));
        }
        let found = (Arc::clone(&slot.value), slot.cost);
        inner.bytes += entry_bytes(key, &slot.value);
        inner.lru.push(Box::from(key), slot);
        inner.evict_to_bounds(|k| durable.tier.evicted(&self.name, k));
        Some(found)
    }

    /// Looks `key` up like [`Cache::get`], but copies a value that fits in
    /// `buf` there (under the lock, so no reference count is touched) and
    /// shares only the larger ones.
    pub fn get_into(&self, key: &[u8], buf: &mut [MaybeUninit<u8>]) -> Found {
        self.get_into_as(key, buf, &Want::ANY)
    }

    /// [`Cache::get_into`] through a handle that wants `want`: an entry of
    /// another shape, or too old, is a miss (counted in `shape_mismatch` or
    /// `expired` as well as in `misses`).
    pub fn get_into_as(&self, key: &[u8], buf: &mut [MaybeUninit<u8>], want: &Want) -> Found {
        let mut inner = self.inner.lock();
        let slot = match inner.lru.get(key) {
            Some(slot) => match slot.fits(want) {
                Ok(()) => Some((&slot.value, slot.cost)),
                Err(why) => {
                    inner.refuse(key, why);
                    return Found::Miss;
                }
            },
            None => None,
        };
        let cost = slot.map_or(0, |(_, c)| c);
        let found = match slot.map(|(v, _)| v) {
            Some(v) if v.len() <= buf.len() => {
                // SAFETY: `v` holds v.len() readable bytes, `buf` has room for
                // at least that many, and the two cannot overlap (`buf` is
                // the caller's, `v` the cache's own allocation).
                unsafe {
                    std::ptr::copy_nonoverlapping(v.as_ptr(), buf.as_mut_ptr().cast(), v.len())
                };
                Found::Copied(v.len())
            }
            Some(v) => Found::Shared(Arc::clone(v)),
            None if self.durable.as_ref().is_some_and(|d| d.reads) => {
                drop(inner);
                return self.get_into_durable(key, buf, want);
            }
            None => Found::Miss,
        };
        match found {
            Found::Miss => inner.misses += 1,
            _ => {
                inner.hits += 1;
                inner.saved_ns += cost;
            }
        }
        found
    }

    /// The miss half of [`Cache::get_into_as`] with a durable tier.
    #[cold]
    fn get_into_durable(&self, key: &[u8], buf: &mut [MaybeUninit<u8>], want: &Want) -> Found {
        let found = match self.read_through(key, want) {
            Some((v, cost)) if v.len() <= buf.len() => {
                // SAFETY: as in get_into_as: `v` holds v.len() bytes, `buf`
                // has room for them, and they cannot overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(v.as_ptr(), buf.as_mut_ptr().cast(), v.len())
                };
                (Found::Copied(v.len()), cost)
            }
            Some((v, cost)) => (Found::Shared(v), cost),
            None => (Found::Miss, 0),
        };
        let mut inner = self.inner.lock();
        match found {
            (Found::Miss, _) => inner.misses += 1,
            (_, cost) => {
                inner.hits += 1;
                inner.saved_ns += cost;
            }
        }
        found.0
    }

    /// Stores `value` under `key`, evicting least recently used entries until
    /// the bounds hold again.
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), PutError> {
        // Copy outside the lock: the critical section stays short.
        self.store(key, Arc::from(value), None, 0, 0)
    }

    /// Stores `value` as computed by code of identity `identity` (the code
    /// hash its generation declared for this cache; 0: unknown, always
    /// stored). A value whose identity is not the cache's current one is
    /// dropped and counted in `stale_puts`; `Ok` is returned either way.
    pub fn put_as(&self, key: &[u8], value: &[u8], identity: u64) -> Result<(), PutError> {
        self.store(key, Arc::from(value), None, identity, 0)
    }

    /// Stores `value` unless the cache was reset since `epoch` (then the
    /// value is dropped and `Ok` returned: a reset wins over a computation
    /// that started before it). `cost`: the nanoseconds it took to compute
    /// (0 when unknown), counted in `compute_ns` and saved by each hit.
    fn store(
        &self,
        key: &[u8],
        value: Arc<[u8]>,
        epoch: Option<u64>,
        identity: u64,
        cost: u64,
    ) -> Result<(), PutError> {
        self.store_at(key, value, epoch, identity, cost, None)
            .map(|_| ())
    }

    /// [`Cache::store`], for an entry born at `born_ms` (Unix milliseconds;
    /// `None`: now). Returns whether it was stored (not stale, not reset).
    fn store_at(
        &self,
        key: &[u8],
        value: Arc<[u8]>,
        epoch: Option<u64>,
        identity: u64,
        cost: u64,
        born_ms: Option<u64>,
    ) -> Result<bool, PutError> {
        let size = entry_bytes(key, &value);
        let mut inner = self.inner.lock();
        if identity != 0 && inner.code_hash != 0 && identity != inner.code_hash {
            inner.stale_puts += 1;
            return Ok(false);
        }
        if epoch.is_some_and(|e| e != inner.epoch) {
            return Ok(false);
        }
        if inner.bounds.max_bytes.is_some_and(|max| size > max) {
            return Err(PutError::TooLarge);
        }
        let kept = self.durable.as_ref().map(|_| Arc::clone(&value));
        let slot = Slot {
            value,
            born: born_ms.map_or_else(now_ns, born_from_unix_ms),
            cost,
        };
        if let Some(old) = inner.lru.get_mut(key) {
            let old_size = entry_bytes(key, &old.value);
            *old = slot;
            inner.bytes = inner.bytes - old_size + size;
        } else {
            inner.lru.push(Box::from(key), slot);
            inner.bytes += size;
        }
        inner.inserts += 1;
        inner.evict_to_bounds(|k| self.evicted(k));
        let epoch = inner.epoch;
        drop(inner);
        if let (Some(durable), Some(value)) = (&self.durable, kept) {
            // Durable before the caller's call answers: an acknowledged
            // entry survives the death of the process.
            let _writing = self.writing.lock();
            if self.inner.lock().epoch == epoch {
                let born_ms = born_ms.unwrap_or_else(crate::persist::now_ms);
                match durable
                    .tier
                    .put_value(&self.name, key, &value, identity, born_ms, cost)
                {
                    Ok(()) => durable.worked(),
                    Err(e) => durable.failed(self, "store", &e),
                }
            }
        }
        Ok(true)
    }

    /// Tells the durable tier that the memory evicted `key`.
    fn evicted(&self, key: &[u8]) {
        if let Some(durable) = &self.durable {
            durable.tier.evicted(&self.name, key);
        }
    }

    /// Puts an entry found in the crash journal back in memory, as it was
    /// (its age, its cost), without writing it anywhere and without
    /// evicting. An entry computed
    /// by other code than the cache's now is left out, as a read from a
    /// durable store would be; so is a key already in memory.
    pub fn restore(&self, key: &[u8], record: crate::persist::Record) {
        let mut inner = self.inner.lock();
        let identity = inner.code_hash;
        if record.identity != 0 && identity != 0 && record.identity != identity {
            return;
        }
        if inner.lru.contains(key) {
            return;
        }
        let slot = Slot {
            value: Arc::from(record.value),
            born: born_from_unix_ms(record.born_ms),
            cost: record.cost_ns,
        };
        inner.bytes += entry_bytes(key, &slot.value);
        inner.lru.push(Box::from(key), slot);
        // No eviction here: the journal holds what fitted the bounds of the
        // worker that wrote it, and the bounds a plugin declares are not
        // known until it loads (its declaration evicts if they are tighter).
    }

    /// Drops every entry; returns how many there were.
    pub fn reset(&self) -> u64 {
        let _writing = self.durable.as_ref().map(|_| self.writing.lock());
        let n = {
            let mut inner = self.inner.lock();
            let n = inner.lru.len() as u64;
            inner.lru.clear();
            inner.bytes = 0;
            inner.resets += 1;
            inner.epoch += 1;
            n
        };
        match &self.durable {
            Some(durable) => match durable.tier.reset(&self.name) {
                // Entries evicted from memory were still in the store.
                Ok(stored) => n.max(stored),
                Err(e) => {
                    durable.failed(self, "reset", &e);
                    n
                }
            },
            None => n,
        }
    }

    /// [`Cache::stats`] with `persisted_entries` and `persisted_bytes`
    /// counted in the durable store (a scan of the cache's keys there).
    pub fn stats_with_store(&self) -> CacheStats {
        let (entries, bytes) = self.persisted();
        let mut s = self.stats();
        s.persisted_entries = entries;
        s.persisted_bytes = bytes;
        s
    }

    /// Entries and bytes of this cache in the durable store (0, 0 without
    /// one); counted in the store, so it costs a scan of the cache's keys.
    pub fn persisted(&self) -> (u64, u64) {
        match &self.durable {
            Some(durable) => durable.tier.figures(&self.name).unwrap_or_else(|e| {
                durable.failed(self, "count", &e);
                (0, 0)
            }),
            None => (0, 0),
        }
    }

    /// Looks `key` up; on a miss runs `compute` — in this thread, with no
    /// lock held — unless another thread is already computing the same key,
    /// in which case this one waits for that value (single flight).
    ///
    /// The computed value is stored unless the cache was reset while it was
    /// computed (the caller still gets it). A computation that asks for its
    /// own key, directly or through threads that wait for each other, gets
    /// [`Computed::Cycle`] instead of a deadlock. When the computing thread
    /// fails, one of the waiters computes in its place.
    pub fn get_or_compute<E>(
        &self,
        key: &[u8],
        compute: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Computed<E> {
        match self.get(key) {
            Some(v) => Computed::Value(v),
            None => self.compute_missing(key, compute),
        }
    }

    /// The miss half of [`Cache::get_or_compute`], for a caller whose own
    /// lookup (already counted in the figures) missed.
    pub fn compute_missing<E>(
        &self,
        key: &[u8],
        compute: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Computed<E> {
        self.compute_missing_as(key, 0, &Want::ANY, compute)
    }

    /// [`Cache::compute_missing`] for code of identity `identity` (see
    /// [`Cache::put_as`]): a value computed by code that is no longer the
    /// cache's is returned to its caller but not stored. A stored value that
    /// does not fit `want` (another shape, too old) is not served: it is
    /// computed again and replaced, and a waiter handed a value that does
    /// not fit computes its own.
    pub fn compute_missing_as<E>(
        &self,
        key: &[u8],
        identity: u64,
        want: &Want,
        compute: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Computed<E> {
        self.compute_missing_shared(key, identity, want, None, compute)
    }

    /// [`Cache::compute_missing_as`] with a shared tier behind the local
    /// ones: the thread that would compute first asks `shared` (for at most
    /// its timeout) and, when it has the entry, stores it locally and hands
    /// it out instead; a value it computes is queued for the shared tier
    /// (write-behind) once stored here.
    pub fn compute_missing_shared<E>(
        &self,
        key: &[u8],
        identity: u64,
        want: &Want,
        shared: Option<SharedLookup<'_>>,
        compute: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Computed<E> {
        let me = std::thread::current().id();
        let mut compute = Some(compute);
        loop {
            let (flight, leader) = {
                let mut flights = self.flights.lock();
                // Re-check under the flights lock: a flight that just
                // finished stored its value before leaving the table.
                let mut inner = self.inner.lock();
                if let Some(slot) = inner.lru.peek(key).filter(|s| s.fits(want).is_ok()) {
                    // Stored since this caller's lookup missed: a hit.
                    let v = Arc::clone(&slot.value);
                    let cost = slot.cost;
                    inner.misses = inner.misses.saturating_sub(1);
                    inner.hits += 1;
                    inner.saved_ns += cost;
                    return Computed::Value(v);
                }
                drop(inner);
                match flights.get(key) {
                    Some(f) => (Arc::clone(f), false),
                    None => {
                        let f = Arc::new(Flight {
                            owner: me,
                            outcome: Mutex::new(None),
                            done: Condvar::new(),
                        });
                        flights.insert(Box::from(key), Arc::clone(&f));
                        (f, true)
                    }
                }
            };
            if leader {
                let epoch = self.inner.lock().epoch;
                if let Some(v) =
                    shared.and_then(|sh| self.shared_read(sh, key, want, epoch, identity))
                {
                    *flight.outcome.lock() = Some(Some(Arc::clone(&v)));
                    self.flights.lock().remove(key);
                    flight_landed(Arc::as_ptr(&flight) as usize);
                    flight.done.notify_all();
                    return Computed::Value(v);
                }
                let compute = compute
                    .take()
                    .expect("a thread leads a flight at most once");
                // The entry's cost is the whole time it took (what a hit
                // saves); the cache's compute time counts only this level,
                // so memoized recursion is not counted once per depth.
                let outer = NESTED_NS.replace(0);
                let started = Instant::now();
                let result = compute();
                let cost = (started.elapsed().as_nanos() as u64).max(1);
                let nested = NESTED_NS.replace(outer + cost);
                self.inner.lock().compute_ns += cost.saturating_sub(nested);
                let value = match &result {
                    Ok(bytes) => {
                        let v: Arc<[u8]> = Arc::from(bytes.as_slice());
                        // Too large for the cache: the caller still gets it.
                        let stored =
                            self.store_at(key, Arc::clone(&v), Some(epoch), identity, cost, None);
                        if let (Ok(true), Some(sh)) = (stored, shared) {
                            sh.tier.put(sh.id, key, &v, cost, want.ttl, &self.shared);
                        }
                        Some(v)
                    }
                    Err(_) => None,
                };
                *flight.outcome.lock() = Some(value.clone());
                self.flights.lock().remove(key);
                flight_landed(Arc::as_ptr(&flight) as usize);
                flight.done.notify_all();
                return match (result, value) {
                    (Ok(_), Some(v)) => Computed::Value(v),
                    (Err(e), _) => Computed::Failed(e),
                    (Ok(_), None) => unreachable!("a value exists for every success"),
                };
            }
            if !wait_for(me, &flight) {
                return Computed::Cycle;
            }
            let mut outcome = flight.outcome.lock();
            while outcome.is_none() {
                flight.done.wait(&mut outcome);
            }
            let value = outcome.clone().flatten();
            drop(outcome);
            done_waiting(me);
            // A leader of another shape (an older generation still running)
            // delivered bytes this caller cannot use: it computes its own.
            let value = value.filter(|v| want.shape.is_none_or(|tag| v.get(..8) == Some(&tag[..])));
            if let Some(v) = value {
                // Another thread computed it: for this caller it was a hit.
                self.miss_was_hit();
                return Computed::Value(v);
            }
            // The leader failed; if this thread still can, it tries itself.
            if compute.is_none() {
                return Computed::Cycle;
            }
        }
    }

    /// Asks the shared tier for `key` after a local miss: a valid entry that
    /// fits `want` is stored locally (unless the cache was reset since
    /// `epoch`, or its code changed) and returned; the caller's miss is
    /// counted as a hit.
    #[cold]
    fn shared_read(
        &self,
        shared: SharedLookup<'_>,
        key: &[u8],
        want: &Want,
        epoch: u64,
        identity: u64,
    ) -> Option<Arc<[u8]>> {
        let found = shared.tier.get(shared.id, key, &self.shared)?;
        let shape_ok = want
            .shape
            .is_none_or(|tag| found.value.get(..8) == Some(&tag[..]));
        // The key names the shape: a value of another under it was written
        // by something else than keepwarm (refused); an entry older than the
        // handle's time to live is a miss.
        let expired = want.ttl.is_some_and(|ttl| {
            let age = crate::persist::now_ms().saturating_sub(found.born_ms);
            u128::from(age) >= ttl.as_millis()
        });
        if !shape_ok || expired {
            use std::sync::atomic::Ordering::Relaxed;
            self.shared.hits.fetch_sub(1, Relaxed);
            self.shared.misses.fetch_add(1, Relaxed);
            if !shape_ok {
                self.shared.refused.fetch_add(1, Relaxed);
                self.shared.errors.fetch_add(1, Relaxed);
            }
            return None;
        }
        let v: Arc<[u8]> = Arc::from(found.value);
        let _ = self.store_at(
            key,
            Arc::clone(&v),
            Some(epoch),
            identity,
            found.cost_ns,
            Some(found.born_ms),
        );
        let mut inner = self.inner.lock();
        inner.misses = inner.misses.saturating_sub(1);
        inner.hits += 1;
        inner.saved_ns += found.cost_ns;
        Some(v)
    }

    /// After a local miss of a caller that computes on its own (a protocol
    /// client): the entry from the shared tier, stored locally and counted
    /// as a hit; `None` when the tier does not have it.
    pub fn shared_fetch(&self, shared: SharedLookup<'_>, key: &[u8]) -> Option<Arc<[u8]>> {
        let epoch = self.epoch();
        self.shared_read(shared, key, &Want::ANY, epoch, 0)
    }

    /// Records that the current code of this cache (opened in
    /// `generation`) shares its entries under `id`; an older generation's
    /// identities are forgotten.
    pub fn register_shared(&self, generation: u64, id: &crate::shared::SharedId) {
        let mut codes = self.shared_codes.lock();
        if generation > codes.0 {
            *codes = (generation, Vec::new());
        }
        if !codes.1.iter().any(|c| **c == *id.code_prefix()) {
            codes.1.push(Box::from(id.code_prefix()));
        }
    }

    /// The shared identities (code prefixes) of the cache's current code.
    pub fn shared_codes(&self) -> Vec<Vec<u8>> {
        self.shared_codes
            .lock()
            .1
            .iter()
            .map(|c| c.to_vec())
            .collect()
    }

    /// The shared tier's figures of this cache.
    pub fn shared_counters(&self) -> &Arc<crate::shared::Counters> {
        &self.shared
    }

    /// Turns the miss this caller's lookup counted into a hit: it got the
    /// value without computing it (another thread's flight delivered it).
    fn miss_was_hit(&self) {
        let mut inner = self.inner.lock();
        inner.misses = inner.misses.saturating_sub(1);
        inner.hits += 1;
    }

    /// Changes the bounds, evicting at once if the new ones are tighter.
    pub fn set_bounds(&self, bounds: Bounds) {
        let mut inner = self.inner.lock();
        inner.bounds = bounds;
        inner.evict_to_bounds(|k| self.evicted(k));
    }

    /// The current bounds.
    pub fn bounds(&self) -> Bounds {
        self.inner.lock().bounds
    }

    /// Records the code hash of the code that fills the cache. Returns true
    /// when a different non-zero hash was recorded before: the caller resets.
    pub fn swap_code_hash(&self, hash: u64) -> bool {
        let (changed, recorded) = {
            let mut inner = self.inner.lock();
            let changed = inner.code_hash != 0 && hash != 0 && inner.code_hash != hash;
            let recorded = hash != 0 && inner.code_hash != hash;
            if hash != 0 {
                inner.code_hash = hash;
            }
            (changed, recorded)
        };
        if let (true, Some(durable)) = (recorded, &self.durable) {
            // The next start compares its build's identity with this one.
            if let Err(e) = durable.tier.set_identity(&self.name, hash) {
                durable.failed(self, "record the identity of", &e);
            }
        }
        changed
    }

    /// A snapshot of the figures.
    pub fn stats(&self) -> CacheStats {
        let [shared_hits, shared_misses, shared_errors, shared_refused, shared_queue_drops, shared_writes] =
            self.shared.snapshot();
        let inner = self.inner.lock();
        CacheStats {
            name: self.name.clone(),
            entries: inner.lru.len() as u64,
            bytes: inner.bytes,
            capacity: inner.bounds.max_entries.get() as u64,
            max_bytes: inner.bounds.max_bytes,
            hits: inner.hits,
            misses: inner.misses,
            inserts: inner.inserts,
            evictions: inner.evictions,
            resets: inner.resets,
            stale_puts: inner.stale_puts,
            shape_mismatch: inner.shape_mismatch,
            expired: inner.expired,
            compute_ns: inner.compute_ns,
            saved_ns: inner.saved_ns,
            // Counted in the store by `stats_with_store`, not here: this
            // snapshot is taken at every reload.
            persisted_entries: 0,
            persisted_bytes: 0,
            store_errors: inner.store_errors,
            shared_hits,
            shared_misses,
            shared_errors,
            shared_refused,
            shared_queue_drops,
            shared_writes,
        }
    }
}

/// Records that `me` waits for `flight`'s leader; false if that closes a
/// cycle.
fn wait_for(me: ThreadId, flight: &Flight) -> bool {
    let mut waits = WAITS_FOR.lock();
    // Landed already (its leader's removal of edges ran before we could
    // add ours): nothing to wait for, and no edge to leave behind. The
    // leader stores the outcome before it takes this lock, so checking it
    // under the lock leaves no window.
    if flight.outcome.lock().is_some() {
        return true;
    }
    let owner = flight.owner;
    let flight = flight as *const Flight as usize;
    let waits = waits.get_or_insert_with(HashMap::new);
    let mut cur = owner;
    loop {
        if cur == me {
            return false;
        }
        match waits.get(&cur) {
            Some(&(next, _)) => cur = next,
            None => break,
        }
    }
    waits.insert(me, (owner, flight));
    true
}

/// Removes every edge to `flight`: its outcome is known, nobody waits on
/// it any more.
fn flight_landed(flight: usize) {
    if let Some(waits) = WAITS_FOR.lock().as_mut() {
        waits.retain(|_, (_, f)| *f != flight);
    }
}

fn done_waiting(me: ThreadId) {
    if let Some(waits) = WAITS_FOR.lock().as_mut() {
        waits.remove(&me);
    }
}

/// What the control socket's entry commands (`get`, `put`, `get_or_wait`,
/// for clients such as the Python package) need of a cache beyond what
/// plugins use: its reset epoch, a put that loses to a reset, and figures a
/// client counted on its own.
impl Cache {
    /// The cache's reset epoch: advanced by every reset (see
    /// [`Cache::put_in_epoch`]).
    pub fn epoch(&self) -> u64 {
        self.inner.lock().epoch
    }

    /// Stores `value` unless the cache was reset since `epoch` (read with
    /// [`Cache::epoch`] before the value was looked up and computed): a
    /// reset wins over a computation that started before it. Returns
    /// whether it was stored.
    pub fn put_in_epoch(&self, key: &[u8], value: &[u8], epoch: u64) -> Result<bool, PutError> {
        if self.epoch() != epoch {
            return Ok(false);
        }
        self.store(key, Arc::from(value), Some(epoch), 0, 0)?;
        Ok(self.inner.lock().lru.contains(key))
    }

    /// The value stored under `key` in memory, without counting a hit or a
    /// miss and without touching its recency.
    pub fn peek(&self, key: &[u8]) -> Option<Arc<[u8]>> {
        self.inner
            .lock()
            .lru
            .peek(key)
            .map(|s| Arc::clone(&s.value))
    }

    /// Counts `n` hits that a client served from its own copy of the
    /// entries (it reports them so that `stats` tells the whole story).
    pub fn count_hits(&self, n: u64) {
        if n > 0 {
            self.inner.lock().hits += n;
        }
    }

    /// Turns the miss a lookup counted into a hit: the caller got the value
    /// without computing it (another client computed it while it waited).
    pub fn count_miss_as_hit(&self) {
        self.miss_was_hit();
    }
}

type CacheMap = HashMap<Box<[u8]>, Arc<Cache>, foldhash::fast::RandomState>;

/// All the caches of one host, by name. Caches are created on first use and
/// never removed (a reset empties them), so a reload never loses one.
#[derive(Default)]
pub struct Store {
    // foldhash, not SipHash: every host_cache_get hashes the cache's name,
    // and names come from plugins the user trusts (no HashDoS concern).
    // Read on every host_cache_get, written only when a cache is created:
    // an ArcSwap snapshot lets readers on several cores look names up
    // without writing to a shared cache line (a RwLock's reader count
    // bounced between the two cores and cost 2x on two threads).
    // Keyed by the name's bytes: the hot path looks names up without
    // validating UTF-8 (the check happens once, when a cache is created).
    caches: ArcSwap<CacheMap>,
    /// Caches created since the snapshot was last rebuilt. Creating a cache
    /// inserts here, in O(1); once it holds as many caches as the snapshot
    /// (16 at least), both are merged into a new snapshot. Each rebuild
    /// copies n names after n/2 creations: O(1) amortized per creation, where
    /// copying the whole snapshot at every creation was O(n).
    recent: Mutex<CacheMap>,
    /// Bounds set by the user (`--cache`); they win over a plugin's declaration.
    overrides: HashMap<String, Bounds>,
    /// The durable tier of every cache, with `--persist`.
    durable: Option<Arc<Durable>>,
    /// Told of every reset made through the store, after the entries are
    /// gone (the epoch page of `keepwarm serve`).
    on_reset: OnceLock<ResetHook>,
    /// The shared tier behind the local ones, with `--shared`.
    shared: OnceLock<Arc<crate::shared::SharedTier>>,
}

/// A function told of each reset made through a [`Store`].
pub type ResetHook = Arc<dyn Fn(&Cache) + Send + Sync>;

impl Store {
    /// A store whose caches named in `overrides` get those bounds.
    pub fn with_overrides(overrides: HashMap<String, Bounds>) -> Store {
        Store {
            caches: ArcSwap::default(),
            recent: Mutex::new(CacheMap::default()),
            overrides,
            durable: None,
            on_reset: OnceLock::new(),
            shared: OnceLock::new(),
        }
    }

    /// Tells `hook` of every reset made through this store from now on
    /// ([`Store::reset`], [`Store::reset_all`], a code change in
    /// [`Store::declare`]), after the entries are gone. Set once: false if a
    /// hook was already set.
    pub fn on_reset(&self, hook: ResetHook) -> bool {
        self.on_reset.set(hook).is_ok()
    }

    fn reset_cache(&self, cache: &Cache) -> u64 {
        let dropped = cache.reset();
        if let Some(hook) = self.on_reset.get() {
            hook(cache);
        }
        dropped
    }

    /// A store whose caches live in `durable` too: every cache the tier
    /// knows exists at once, with the identity it was last declared with
    /// (its entries are read from the tier on demand, not loaded).
    pub fn with_durable(
        overrides: HashMap<String, Bounds>,
        durable: Arc<Durable>,
    ) -> Result<Store, crate::persist::TierError> {
        let known = durable.tier.caches()?;
        let mut store = Store::with_overrides(overrides);
        let mut map = CacheMap::default();
        for (name, identity) in known {
            let bounds = store.overrides.get(&name).copied().unwrap_or_default();
            let cache =
                Cache::with_durable(name.clone(), bounds, Some(Arc::clone(&durable)), identity);
            map.insert(Box::from(name.as_bytes()), Arc::new(cache));
        }
        store.caches = ArcSwap::from_pointee(map);
        store.durable = Some(durable);
        Ok(store)
    }

    /// Puts `tier` behind the local tiers of every cache (`--shared`). Set
    /// once: false if a shared tier was already set.
    pub fn set_shared(&self, tier: Arc<crate::shared::SharedTier>) -> bool {
        self.shared.set(tier).is_ok()
    }

    /// The shared tier, with `--shared`.
    pub fn shared(&self) -> Option<&Arc<crate::shared::SharedTier>> {
        self.shared.get()
    }

    /// The durable tier, with `--persist`.
    pub fn durable(&self) -> Option<&Arc<Durable>> {
        self.durable.as_ref()
    }

    /// The cache named `name`, if it exists.
    pub fn get(&self, name: &str) -> Option<Arc<Cache>> {
        if let Some(c) = self.caches.load().get(name.as_bytes()) {
            return Some(Arc::clone(c));
        }
        self.recent.lock().get(name.as_bytes()).cloned()
    }

    /// The cache named `name`, created with the default (or overridden)
    /// bounds if it does not exist yet.
    pub fn cache(&self, name: &str) -> Arc<Cache> {
        if let Some(c) = self.caches.load().get(name.as_bytes()) {
            return Arc::clone(c);
        }
        let mut recent = self.recent.lock();
        // Looked up again under the lock: created meanwhile, or merged.
        if let Some(c) = recent.get(name.as_bytes()) {
            return Arc::clone(c);
        }
        let snapshot = self.caches.load_full();
        if let Some(c) = snapshot.get(name.as_bytes()) {
            return Arc::clone(c);
        }
        let bounds = self.overrides.get(name).copied().unwrap_or_default();
        let cache = Arc::new(Cache::with_durable(name, bounds, self.durable.clone(), 0));
        recent.insert(Box::from(name.as_bytes()), Arc::clone(&cache));
        if recent.len() >= snapshot.len().max(16) {
            let mut next = CacheMap::clone(&snapshot);
            next.extend(recent.drain());
            self.caches.store(Arc::new(next));
        }
        cache
    }

    /// Runs `f` on the cache whose name is the bytes `name` (created on first
    /// use) without cloning the `Arc`: the hot path of `cache_get` and
    /// `cache_put`. `None` when the cache does not exist and `name` is not
    /// UTF-8.
    pub fn with_cache<R>(&self, name: &[u8], f: impl FnOnce(&Cache) -> R) -> Option<R> {
        {
            let caches = self.caches.load();
            if let Some(c) = caches.get(name) {
                return Some(f(c));
            }
        }
        let name = std::str::from_utf8(name).ok()?;
        Some(f(&self.cache(name)))
    }

    /// Applies a plugin's declaration: bounds (unless the user overrode
    /// them) and code hash. Returns true when the code hash changed and the
    /// cache was reset.
    pub fn declare(&self, name: &str, declared: Option<Bounds>, code_hash: u64) -> bool {
        let cache = self.cache(name);
        if !self.overrides.contains_key(name) {
            if let Some(b) = declared {
                if cache.bounds() != b {
                    cache.set_bounds(b);
                }
            }
        }
        if cache.swap_code_hash(code_hash) {
            self.reset_cache(&cache);
            true
        } else {
            false
        }
    }

    /// Resets one cache; `None` when no cache has that name.
    pub fn reset(&self, name: &str) -> Option<u64> {
        self.get(name).map(|c| self.reset_cache(&c))
    }

    /// Resets every cache; returns the number of entries dropped.
    pub fn reset_all(&self) -> u64 {
        self.all().iter().map(|c| self.reset_cache(c)).sum()
    }

    /// Brings back what a crashed worker's journal held: each cache with its
    /// code identity, then each entry, oldest first ([`Cache::restore`]).
    /// Returns how many entries came back.
    pub fn restore(&self, replayed: crate::journal::Replayed) -> u64 {
        for (name, identity) in &replayed.caches {
            let cache = self.cache(name);
            let mut inner = cache.inner.lock();
            if *identity != 0 {
                inner.code_hash = *identity;
            }
        }
        let mut n = 0;
        for (name, key, record) in replayed.entries {
            self.cache(&name).restore(&key, record);
            n += 1;
        }
        n
    }

    /// Every cache, sorted by name.
    pub fn all(&self) -> Vec<Arc<Cache>> {
        let recent = self.recent.lock();
        let mut v: Vec<_> = self.caches.load().values().cloned().collect();
        v.extend(recent.values().cloned());
        drop(recent);
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The figures of every cache, sorted by name, with what the durable
    /// store holds of each ([`Cache::stats_with_store`]).
    pub fn stats(&self) -> Vec<CacheStats> {
        self.all().iter().map(|c| c.stats_with_store()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(entries: usize, bytes: Option<u64>) -> Bounds {
        Bounds {
            max_entries: NonZeroUsize::new(entries).unwrap(),
            max_bytes: bytes,
        }
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let c = Cache::new("t", bounds(2, None));
        c.put(b"a", b"1").unwrap();
        c.put(b"b", b"2").unwrap();
        assert!(c.get(b"a").is_some()); // a is now most recent
        c.put(b"c", b"3").unwrap(); // evicts b
        assert!(c.get(b"b").is_none());
        assert_eq!(&*c.get(b"a").unwrap(), b"1");
        assert_eq!(&*c.get(b"c").unwrap(), b"3");
        let s = c.stats();
        assert_eq!((s.entries, s.evictions, s.inserts), (2, 1, 3));
    }

    #[test]
    fn byte_bound_evicts_until_it_holds() {
        let one = entry_bytes(b"a", b"1234");
        let c = Cache::new("t", bounds(100, Some(2 * one)));
        c.put(b"a", b"1234").unwrap();
        c.put(b"b", b"1234").unwrap(); // exactly the bound
        c.put(b"c", b"12").unwrap(); // over it: evicts a
        let s = c.stats();
        assert_eq!(
            (s.entries, s.bytes, s.evictions),
            (2, one + entry_bytes(b"c", b"12"), 1)
        );
        assert!(c.get(b"a").is_none());
        assert_eq!(c.put(b"big", &[0; 1000]), Err(PutError::TooLarge));
        assert_eq!(c.stats().entries, 2, "a refused put evicts nothing");
    }

    #[test]
    fn get_into_copies_what_fits_and_shares_the_rest() {
        let c = Cache::new("t", bounds(10, None));
        c.put(b"small", b"1234").unwrap();
        c.put(b"large", &[7u8; 100]).unwrap();
        let mut buf = [MaybeUninit::new(0u8); 8];
        match c.get_into(b"small", &mut buf) {
            // SAFETY: get_into initialized the first 4 bytes.
            Found::Copied(4) => assert_eq!(unsafe { buf[3].assume_init() }, b'4'),
            other => panic!("expected a copy of 4 bytes, got {other:?}"),
        }
        match c.get_into(b"large", &mut buf) {
            Found::Shared(v) => assert_eq!(&*v, &[7u8; 100][..]),
            other => panic!("expected a shared value, got {other:?}"),
        }
        assert!(matches!(c.get_into(b"absent", &mut buf), Found::Miss));
        assert!(matches!(c.get_into(b"small", &mut []), Found::Shared(_)));
        let s = c.stats();
        assert_eq!((s.hits, s.misses), (3, 1), "each lookup counted once");
    }

    #[test]
    fn replacing_a_value_keeps_bytes_exact() {
        let c = Cache::new("t", bounds(10, None));
        c.put(b"k", b"12345").unwrap();
        c.put(b"k", &[1; 100]).unwrap();
        let s = c.stats();
        assert_eq!(
            (s.entries, s.bytes, s.inserts),
            (1, entry_bytes(b"k", &[1; 100]), 2)
        );
    }

    #[test]
    fn creating_many_caches_keeps_every_one() {
        let store = Store::default();
        for i in 0..1000 {
            store.cache(&format!("c{i}")).put(b"k", b"v").unwrap();
        }
        assert_eq!(store.all().len(), 1000);
        for i in [0, 15, 16, 17, 500, 999] {
            assert_eq!(store.get(&format!("c{i}")).unwrap().stats().entries, 1);
        }
    }

    #[test]
    fn figures_count_hits_misses_and_resets() {
        let c = Cache::new("t", bounds(10, None));
        assert!(c.get(b"k").is_none());
        c.put(b"k", b"v").unwrap();
        assert!(c.get(b"k").is_some());
        assert!(c.get(b"k").is_some());
        assert_eq!(c.reset(), 1);
        assert!(c.get(b"k").is_none());
        let s = c.stats();
        assert_eq!(
            (s.hits, s.misses, s.inserts, s.resets, s.entries, s.bytes),
            (2, 2, 1, 1, 0, 0)
        );
    }

    #[test]
    fn a_leased_value_survives_eviction_and_reset() {
        let c = Cache::new("t", bounds(1, None));
        c.put(b"a", b"alpha").unwrap();
        let leased = c.get(b"a").unwrap();
        c.put(b"b", b"beta").unwrap(); // evicts a
        c.reset();
        assert_eq!(&*leased, b"alpha");
    }

    #[test]
    fn tighter_bounds_evict_at_once() {
        let c = Cache::new("t", bounds(10, None));
        for i in 0..10u8 {
            c.put(&[i], b"v").unwrap();
        }
        c.set_bounds(bounds(3, None));
        let s = c.stats();
        assert_eq!((s.entries, s.evictions, s.capacity), (3, 7, 3));
        assert!(c.get(&[9]).is_some() && c.get(&[0]).is_none());
    }

    #[test]
    fn store_creates_on_first_use_and_overrides_win() {
        let mut o = HashMap::new();
        o.insert("square".to_owned(), bounds(5, Some(100)));
        let store = Store::with_overrides(o);
        store.declare("square", Some(bounds(1000, None)), 0);
        store.declare("fib", Some(bounds(7, None)), 0);
        assert_eq!(store.cache("square").bounds(), bounds(5, Some(100)));
        assert_eq!(store.cache("fib").bounds(), bounds(7, None));
        assert_eq!(store.cache("new").bounds(), Bounds::default());
        let names: Vec<_> = store.stats().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["fib", "new", "square"]);
    }

    #[test]
    fn a_value_from_obsolete_code_is_not_stored() {
        let store = Store::default();
        store.declare("f", None, 1);
        let c = store.cache("f");
        c.put_as(b"k", b"old code", 1).unwrap();
        assert!(store.declare("f", None, 2), "new code: reset");
        c.put_as(b"k", b"old code again", 1).unwrap();
        assert!(c.get(b"k").is_none(), "the old generation cannot refill it");
        c.put_as(b"k", b"new code", 2).unwrap();
        assert_eq!(&*c.get(b"k").unwrap(), b"new code");
        let r = c.compute_missing_as(b"j", 1, &Want::ANY, || Ok::<_, ()>(b"old".to_vec()));
        assert!(
            matches!(r, Computed::Value(v) if &*v == b"old"),
            "the caller still gets it"
        );
        assert!(c.get(b"j").is_none());
        assert_eq!(c.stats().stale_puts, 2);
    }

    #[test]
    fn changed_code_hash_resets_only_that_cache() {
        let store = Store::default();
        assert!(!store.declare("a", None, 1));
        assert!(!store.declare("b", None, 7));
        store.cache("a").put(b"k", b"v").unwrap();
        store.cache("b").put(b"k", b"v").unwrap();
        assert!(!store.declare("b", None, 7));
        assert!(store.declare("a", None, 2));
        assert_eq!(store.cache("a").stats().entries, 0);
        assert_eq!(store.cache("b").stats().entries, 1);
    }

    #[test]
    fn single_flight_computes_once_for_many_threads() {
        let c = Cache::new("t", bounds(10, None));
        let computed = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let r = c.get_or_compute(b"k", || {
                        computed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        Ok::<_, ()>(b"v".to_vec())
                    });
                    assert!(matches!(r, Computed::Value(v) if &*v == b"v"));
                });
            }
        });
        assert_eq!(computed.into_inner(), 1);
        let s = c.stats();
        assert_eq!(s.inserts, 1);
        assert_eq!((s.misses, s.hits), (1, 7), "waiters count as hits: {s:?}");
    }

    #[test]
    fn a_reset_during_a_computation_keeps_its_value_out() {
        let c = Cache::new("t", bounds(10, None));
        let r = c.get_or_compute(b"k", || {
            c.reset(); // the user resets while this computes
            Ok::<_, ()>(b"stale".to_vec())
        });
        assert!(
            matches!(r, Computed::Value(v) if &*v == b"stale"),
            "the caller still gets its value"
        );
        assert!(c.get(b"k").is_none(), "but it is not stored");
        assert_eq!(c.stats().entries, 0);
    }

    #[test]
    fn a_computation_asking_for_its_own_key_is_a_cycle() {
        let c = Cache::new("t", bounds(10, None));
        let r = c.get_or_compute(b"k", || {
            match c.get_or_compute(b"k", || Ok::<_, ()>(b"x".to_vec())) {
                Computed::Cycle => Err("cycle"),
                _ => Ok(b"no cycle seen".to_vec()),
            }
        });
        assert!(matches!(r, Computed::Failed("cycle")));
        // A failed computation stores nothing and leaves no flight behind.
        assert!(
            matches!(c.get_or_compute(b"k", || Ok::<_, ()>(b"y".to_vec())), Computed::Value(v) if &*v == b"y")
        );
    }

    #[test]
    fn a_failed_leader_hands_over_to_a_waiter() {
        let c = Cache::new("t", bounds(10, None));
        std::thread::scope(|s| {
            let leader = s.spawn(|| {
                c.get_or_compute(b"k", || {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    Err::<Vec<u8>, _>("failed")
                })
            });
            std::thread::sleep(std::time::Duration::from_millis(20));
            let waiter = c.get_or_compute(b"k", || Ok::<_, &str>(b"second try".to_vec()));
            assert!(matches!(waiter, Computed::Value(v) if &*v == b"second try"));
            assert!(matches!(leader.join().unwrap(), Computed::Failed("failed")));
        });
    }

    #[test]
    fn a_value_of_another_shape_is_a_counted_miss_and_is_replaced() {
        let c = Cache::new("shape", bounds(10, None));
        let old = Want {
            shape: Some(*b"OLDSHAPE"),
            ttl: None,
        };
        let new = Want {
            shape: Some(*b"NEWSHAPE"),
            ttl: None,
        };
        c.put(b"k", b"OLDSHAPE-value").unwrap();
        let mut buf = [MaybeUninit::uninit(); 64];
        assert!(matches!(
            c.get_into_as(b"k", &mut buf, &old),
            Found::Copied(14)
        ));
        assert!(matches!(c.get_into_as(b"k", &mut buf, &new), Found::Miss));
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.shape_mismatch), (1, 1, 1));
        // The flight (after the miss above) does not take the old value for
        // a hit: it computes.
        let mut computed = false;
        let r = c.compute_missing_as(b"k", 0, &new, || {
            computed = true;
            Ok::<_, ()>(b"NEWSHAPE-value".to_vec())
        });
        assert!(computed);
        assert!(matches!(r, Computed::Value(v) if &*v == b"NEWSHAPE-value"));
        assert!(matches!(
            c.get_into_as(b"k", &mut buf, &new),
            Found::Copied(14)
        ));
        // Without a shape requirement any value is a hit (raw byte caches).
        assert!(matches!(c.get_into(b"k", &mut buf), Found::Copied(14)));
        let s = c.stats();
        assert_eq!(
            (s.hits, s.misses, s.shape_mismatch, s.entries),
            (3, 1, 1, 1)
        );
    }

    #[test]
    fn an_entry_older_than_the_ttl_is_an_expired_miss_and_is_dropped() {
        let c = Cache::new("ttl", bounds(10, None));
        let ttl = Want {
            shape: None,
            ttl: Some(std::time::Duration::from_millis(30)),
        };
        c.put(b"k", b"v").unwrap();
        let mut buf = [MaybeUninit::uninit(); 8];
        assert!(matches!(
            c.get_into_as(b"k", &mut buf, &ttl),
            Found::Copied(1)
        ));
        // Time is what this test is about: let the entry age past its ttl.
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert!(matches!(c.get_into_as(b"k", &mut buf, &ttl), Found::Miss));
        let s = c.stats();
        assert_eq!(
            (s.hits, s.misses, s.expired, s.entries, s.bytes),
            (1, 1, 1, 0, 0)
        );
    }

    #[test]
    fn bounds_parse_like_the_cli() {
        assert_eq!("10".parse::<Bounds>().unwrap(), bounds(10, None));
        assert_eq!("10:4096".parse::<Bounds>().unwrap(), bounds(10, Some(4096)));
        assert!("0".parse::<Bounds>().is_err());
        assert!("x:1".parse::<Bounds>().is_err());
        assert!("1:0".parse::<Bounds>().is_err());
    }
}
