//! Single flight across processes, for `get_or_wait`: the first connection
//! that misses a key gets a *lease* on it (it computes the value and puts
//! it); the others that miss the same key wait for that put, up to the time
//! they asked for. A lease ends with the put, with `release`, or with the
//! connection: when the client that holds it dies, a waiter is told to
//! compute instead, so nobody waits for a value that will never come.
//!
//! Plugins have the same guarantee inside one process from
//! [`crate::cache::Cache::compute_missing`]; that one runs the computation
//! in the caller's thread, which a client on the other side of a socket
//! cannot do, hence this table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::cache::Cache;

/// One connection's identity as a leaseholder; dropping it (the connection
/// closed) ends its leases.
#[derive(Debug)]
pub struct Session {
    id: u64,
    /// The shared identity of each cache this connection opened with a
    /// code (`open`'s `code`), with a shared tier.
    shared: parking_lot::Mutex<std::collections::HashMap<String, crate::shared::SharedId>>,
}

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

impl Session {
    /// A new session.
    pub fn new() -> Session {
        Session {
            id: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
            shared: Default::default(),
        }
    }

    /// Records that this connection's entries of `cache` are shared under
    /// `id`.
    pub fn share(&self, cache: &str, id: crate::shared::SharedId) {
        self.shared.lock().insert(cache.to_owned(), id);
    }

    /// The identity this connection's entries of `cache` are shared under.
    pub fn shared_id(&self, cache: &str) -> Option<crate::shared::SharedId> {
        self.shared.lock().get(cache).cloned()
    }
}

impl Default for Session {
    fn default() -> Session {
        Session::new()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut table = TABLE.lock();
        let table = table.get_or_insert_with(Table::default);
        let mine: Vec<Key> = table
            .leases
            .iter()
            .filter(|(_, l)| l.owner == self.id)
            .map(|(k, _)| k.clone())
            .collect();
        for key in mine {
            if let Some(lease) = table.leases.remove(&key) {
                *lease.outcome.lock() = Some(None);
            }
        }
        table.waits.remove(&self.id);
        CHANGED.notify_all();
    }
}

/// A cache (by address: caches are never freed while their host lives)
/// and a key.
type Key = (usize, Box<[u8]>);

struct Lease {
    owner: u64,
    /// `Some(Some(value))`: a put landed; `Some(None)`: the lease ended
    /// without a value.
    outcome: Mutex<Option<Option<Arc<[u8]>>>>,
}

#[derive(Default)]
struct Table {
    leases: HashMap<Key, Arc<Lease>>,
    /// Which session waits for which: a wait that would close a cycle (A
    /// computes x and waits for y, which B computes while waiting for x)
    /// computes instead.
    waits: HashMap<u64, u64>,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);
static CHANGED: Condvar = Condvar::new();

/// What a `get_or_wait` found.
#[derive(Debug)]
pub enum Lookup {
    /// The value (stored, or put by the leaseholder while this one waited).
    Found(Arc<[u8]>),
    /// A miss, and the key is leased to this session: compute, then put.
    Leased,
    /// A miss; another session holds the lease and did not put in time (or
    /// waits for this one): compute without a lease, and put.
    Compute,
}

fn key_of(cache: &Arc<Cache>, key: &[u8]) -> Key {
    (Arc::as_ptr(cache) as usize, Box::from(key))
}

/// Looks `key` up in `cache` (counted as any lookup); on a miss leases it
/// to `session`, or waits up to `wait` for the session that holds it.
pub fn get_or_wait(cache: &Arc<Cache>, key: &[u8], session: &Session, wait: Duration) -> Lookup {
    let k = key_of(cache, key);
    let deadline = Instant::now() + wait;
    let mut guard = TABLE.lock();
    // Under the table's lock: a put stores its value before it takes the
    // lock to end the lease, so a miss here means the lease, if any, is
    // still there to wait on.
    if let Some(v) = cache.get(key) {
        return Lookup::Found(v);
    }
    loop {
        let table = guard.get_or_insert_with(Table::default);
        let lease = match table.leases.get(&k) {
            None => {
                table.leases.insert(
                    k,
                    Arc::new(Lease {
                        owner: session.id,
                        outcome: Mutex::new(None),
                    }),
                );
                return Lookup::Leased;
            }
            Some(l) if l.owner == session.id => return Lookup::Leased,
            Some(l) => Arc::clone(l),
        };
        let mut cur = lease.owner;
        while let Some(&next) = table.waits.get(&cur) {
            if next == session.id {
                return Lookup::Compute;
            }
            cur = next;
        }
        table.waits.insert(session.id, lease.owner);
        let outcome = loop {
            if let Some(outcome) = lease.outcome.lock().clone() {
                break Some(outcome);
            }
            if CHANGED.wait_until(&mut guard, deadline).timed_out() {
                break lease.outcome.lock().clone();
            }
        };
        if let Some(table) = guard.as_mut() {
            table.waits.remove(&session.id);
        }
        match outcome {
            Some(Some(v)) => {
                // Another client computed it: for this one it was a hit.
                cache.count_miss_as_hit();
                return Lookup::Found(v);
            }
            // Ended without a value: stored meanwhile by someone else, or
            // this session takes the lease (or waits for the next holder).
            Some(None) => {
                if let Some(v) = cache.peek(key) {
                    cache.count_miss_as_hit();
                    return Lookup::Found(v);
                }
            }
            None => return Lookup::Compute,
        }
    }
}

/// A value for `key` landed in `cache` (stored or not): the lease on it,
/// whoever holds it, ends and its waiters get `value`.
pub fn landed(cache: &Arc<Cache>, key: &[u8], value: Arc<[u8]>) {
    let mut guard = TABLE.lock();
    if let Some(lease) = guard
        .as_mut()
        .and_then(|t| t.leases.remove(&key_of(cache, key)))
    {
        *lease.outcome.lock() = Some(Some(value));
        CHANGED.notify_all();
    }
}

/// Ends `session`'s lease on `key` without a value; false when it held
/// none. A waiter then computes.
pub fn release(cache: &Arc<Cache>, key: &[u8], session: &Session) -> bool {
    let mut guard = TABLE.lock();
    let Some(table) = guard.as_mut() else {
        return false;
    };
    let k = key_of(cache, key);
    if table.leases.get(&k).is_none_or(|l| l.owner != session.id) {
        return false;
    }
    if let Some(lease) = table.leases.remove(&k) {
        *lease.outcome.lock() = Some(None);
    }
    CHANGED.notify_all();
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Bounds;

    #[test]
    fn a_waiter_gets_the_leaseholders_value() {
        let cache = Arc::new(Cache::new("t", Bounds::default()));
        let a = Session::new();
        assert!(matches!(
            get_or_wait(&cache, b"k", &a, Duration::ZERO),
            Lookup::Leased
        ));
        let waiter = {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                let b = Session::new();
                get_or_wait(&cache, b"k", &b, Duration::from_secs(30))
            })
        };
        // The waiter is waiting once it is in the table's waits.
        // Its miss is counted under the table's lock, which it holds until
        // it waits: what follows takes the lock after that.
        while cache.stats().misses < 2 {
            std::thread::yield_now();
        }
        cache.put(b"k", b"v").unwrap();
        landed(&cache, b"k", Arc::from(&b"v"[..]));
        match waiter.join().unwrap() {
            Lookup::Found(v) => assert_eq!(&*v, b"v"),
            other => panic!("{other:?}"),
        }
        let s = cache.stats();
        assert_eq!((s.hits, s.misses), (1, 1));
    }

    #[test]
    fn a_leaseholder_that_goes_away_hands_the_lease_on() {
        let cache = Arc::new(Cache::new("t", Bounds::default()));
        let a = Session::new();
        assert!(matches!(
            get_or_wait(&cache, b"k", &a, Duration::ZERO),
            Lookup::Leased
        ));
        let waiter = {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                let b = Session::new();
                let got = get_or_wait(&cache, b"k", &b, Duration::from_secs(30));
                (got, b)
            })
        };
        // Its miss is counted under the table's lock, which it holds until
        // it waits: what follows takes the lock after that.
        while cache.stats().misses < 2 {
            std::thread::yield_now();
        }
        drop(a);
        let (got, _b) = waiter.join().unwrap();
        assert!(matches!(got, Lookup::Leased), "{got:?}");
    }

    #[test]
    fn a_wait_runs_out_and_a_cycle_does_not_wait() {
        let cache = Arc::new(Cache::new("t", Bounds::default()));
        let (a, b) = (Session::new(), Session::new());
        assert!(matches!(
            get_or_wait(&cache, b"x", &a, Duration::ZERO),
            Lookup::Leased
        ));
        let started = Instant::now();
        assert!(matches!(
            get_or_wait(&cache, b"x", &b, Duration::from_millis(50)),
            Lookup::Compute
        ));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(release(&cache, b"x", &a));
        assert!(!release(&cache, b"x", &a));
    }
}
