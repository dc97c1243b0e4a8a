//! The cost of a host-owned cache against the in-process floor (issue 7),
//! and memoized fib(90) cold and warm (issue 5). `make bench` runs it; the
//! figures in BENCHMARKS.md come from it.
//!
//! Every measurement of the host goes through a real plugin (`bench_plugin`
//! or the example plugin) loaded by the real loader: the plugin loops over
//! `host_cache_get`/`host_cache_put` itself, and one JSON call covers many
//! iterations (criterion's `iter_custom`), so the per-iteration figure is the
//! ABI call, not the JSON around it.
//!
//! The floor does the same work in-process: lock a
//! `parking_lot::Mutex<lru::LruCache<Box<[u8]>, Arc<[u8]>>>`, look the key
//! up (moving it to the front), clone the value's `Arc`, unlock, read the
//! value, drop the `Arc` — what a host hit does, minus the ABI and the lookup
//! of the cache by name.

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use keepwarm::cache::Bounds;
use keepwarm::{Config, Host};
use keepwarm_tests::built_release_library;
use lru::LruCache;
use parking_lot::Mutex;
use serde_json::{json, Value};

const SIZES: [(&str, usize, usize); 2] = [("k8_v8", 8, 8), ("k64_v1024", 64, 1024)];
const EVICT_CAPACITY: usize = 1_000;

fn start_host(library: &str) -> Arc<Host> {
    let mut config = Config::new(built_release_library(library));
    for (name, _, _) in SIZES {
        config.cache_bounds.insert(
            format!("evict_{name}"),
            Bounds {
                max_entries: NonZeroUsize::new(EVICT_CAPACITY).unwrap(),
                max_bytes: None,
            },
        );
    }
    let host = Host::new(config).unwrap();
    host.reload(false).unwrap();
    host
}

fn call(host: &Host, f: &str, args: Value) -> Value {
    host.call_json(f, args.as_array().unwrap()).unwrap()
}

fn key(len: usize, i: u64) -> Vec<u8> {
    let mut k = vec![0x5a; len.max(8)];
    k[..8].copy_from_slice(&i.to_le_bytes());
    k.truncate(len);
    k
}

/// The in-process floor: what a plugin would keep if it cached in its own memory.
type Floor = Mutex<LruCache<Box<[u8]>, Arc<[u8]>>>;

fn floor(len: usize, value: usize, capacity: Option<usize>) -> Floor {
    let mut lru = match capacity {
        Some(c) => LruCache::new(NonZeroUsize::new(c).unwrap()),
        None => LruCache::unbounded(),
    };
    lru.put(key(len, 0).into(), Arc::from(vec![7u8; value]));
    Mutex::new(lru)
}

/// Runs `f(iters)` on `threads` threads at once; returns the wall time.
fn on_threads(threads: usize, iters: u64, f: impl Fn(usize, u64) + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move || f(t, iters));
        }
    });
    start.elapsed()
}

fn hits(c: &mut Criterion) {
    let host = start_host("bench_plugin");
    // The same plugin on a host with --persist: a hit never reads the store.
    let persist_dir = tempfile::tempdir().unwrap();
    let persisted = {
        let mut config = Config::new(built_release_library("bench_plugin"));
        config.persist = Some(persist_dir.path().to_owned());
        let host = Host::new(config).unwrap();
        host.reload(false).unwrap();
        host
    };
    // And on a host recording its caches in the crash journal (a
    // supervised worker without --persist): a hit never touches it.
    let journaled = {
        let mut config = Config::new(built_release_library("bench_plugin"));
        config.journal = Some(Arc::new(keepwarm::journal::Journal::create().unwrap()));
        let host = Host::new(config).unwrap();
        host.reload(false).unwrap();
        host
    };
    let mut g = c.benchmark_group("hit");
    for (name, klen, vlen) in SIZES {
        let cache = format!("hit_{name}");
        assert_eq!(call(&host, "prepare", json!([cache, klen, vlen])), true);
        let floor = floor(klen, vlen, None);
        let k = key(klen, 0);
        g.bench_with_input(BenchmarkId::new("a_floor_mutex_lru", name), &k, |b, k| {
            b.iter(|| {
                let v = floor.lock().get(black_box(&k[..])).cloned().unwrap();
                black_box(v.len() as u64 + u64::from(v[0]))
            })
        });
        for (row, by_handle) in [
            ("b_host_cache_get_by_name", false),
            ("b_host_cache_handle", true),
        ] {
            g.bench_function(BenchmarkId::new(row, name), |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    call(&host, "get_loop", json!([cache, klen, iters, by_handle]));
                    start.elapsed()
                })
            });
        }
        assert_eq!(
            call(&persisted, "prepare", json!([cache, klen, vlen])),
            true
        );
        g.bench_function(BenchmarkId::new("f_host_cache_handle_persist", name), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                call(&persisted, "get_loop", json!([cache, klen, iters, true]));
                start.elapsed()
            })
        });
        assert_eq!(
            call(&journaled, "prepare", json!([cache, klen, vlen])),
            true
        );
        g.bench_function(BenchmarkId::new("g_host_cache_handle_journal", name), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                call(&journaled, "get_loop", json!([cache, klen, iters, true]));
                start.elapsed()
            })
        });
        for threads in [1usize, 2] {
            g.bench_function(
                BenchmarkId::new(format!("e_{threads}_threads_one_cache"), name),
                |b| {
                    b.iter_custom(|iters| {
                        on_threads(threads, iters, |_, n| {
                            call(&host, "get_loop", json!([cache, klen, n, true]));
                        })
                    })
                },
            );
        }
        let other = format!("hit2_{name}");
        assert_eq!(call(&host, "prepare", json!([other, klen, vlen])), true);
        g.bench_function(BenchmarkId::new("e_2_threads_two_caches", name), |b| {
            b.iter_custom(|iters| {
                on_threads(2, iters, |t, n| {
                    let c = if t == 0 { &cache } else { &other };
                    call(&host, "get_loop", json!([c, klen, n, true]));
                })
            })
        });
        g.bench_function(BenchmarkId::new("e_2_threads_floor_one_lock", name), |b| {
            b.iter_custom(|iters| {
                on_threads(2, iters, |_, n| {
                    for _ in 0..n {
                        let v = floor.lock().get(black_box(&k[..])).cloned().unwrap();
                        black_box(v.len() as u64 + u64::from(v[0]));
                    }
                })
            })
        });
    }
    g.finish();
}

fn memo(c: &mut Criterion) {
    let host = start_host("bench_plugin");
    let mut g = c.benchmark_group("memo");
    call(&host, "memo_square", json!([12]));
    g.bench_function("c_warm_memo_call_inside_plugin", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            call(&host, "memo_loop", json!([iters]));
            start.elapsed()
        })
    });
    g.bench_function("c_warm_memo_call_json_from_host", |b| {
        let args = [json!(12)];
        b.iter(|| host.call_json("memo_square", black_box(&args)).unwrap())
    });
    g.finish();

    let example = start_host("example-plugin");
    let mut g = c.benchmark_group("fib90");
    g.bench_function("cold", |b| {
        let args = [json!(90)];
        b.iter(|| {
            example.reset("fib");
            example.call_json("fib", black_box(&args)).unwrap()
        })
    });
    g.bench_function("warm", |b| {
        let args = [json!(90)];
        example.call_json("fib", &args).unwrap();
        b.iter(|| example.call_json("fib", black_box(&args)).unwrap())
    });
    g.finish();
}

fn evicting_puts(c: &mut Criterion) {
    let host = start_host("bench_plugin");
    let mut g = c.benchmark_group("put_evicting");
    for (name, klen, vlen) in SIZES {
        let cache = format!("evict_{name}");
        call(
            &host,
            "put_loop",
            json!([cache, klen, vlen, 0, EVICT_CAPACITY, true]),
        );
        let mut next = EVICT_CAPACITY as u64;
        for (row, by_handle) in [
            ("d_host_cache_put_by_name", false),
            ("d_host_cache_handle_put", true),
        ] {
            g.bench_function(BenchmarkId::new(row, name), |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    call(
                        &host,
                        "put_loop",
                        json!([cache, klen, vlen, next, iters, by_handle]),
                    );
                    next += iters;
                    start.elapsed()
                })
            });
        }
        let floor = floor(klen, vlen, Some(EVICT_CAPACITY));
        for i in 1..EVICT_CAPACITY as u64 {
            floor
                .lock()
                .put(key(klen, i).into(), Arc::from(vec![9u8; vlen]));
        }
        let mut i = EVICT_CAPACITY as u64;
        let value = vec![9u8; vlen];
        g.bench_function(BenchmarkId::new("d_floor_put", name), |b| {
            b.iter(|| {
                // Same copies as the host: the key into a Box, the value into an Arc.
                let evicted = floor
                    .lock()
                    .push(key(klen, i).into(), Arc::from(&value[..]));
                i += 1;
                black_box(evicted)
            })
        });
    }
    g.finish();
}

/// A durable put (`--persist`: SQLite, one transaction per put, before the
/// call answers) against an in-memory put, on the host's own cache type.
fn durable_puts(c: &mut Criterion) {
    use keepwarm::cache::{Cache, Durable};
    use keepwarm::persist::SqliteTier;
    let mut g = c.benchmark_group("put_durable");
    let dir = tempfile::tempdir().unwrap();
    let tier = Arc::new(SqliteTier::open(dir.path(), Some(1 << 40)).unwrap());
    let durable = Arc::new(Durable::new(
        tier,
        Arc::new(|m: &str| panic!("store failed: {m}")),
    ));
    for (name, klen, vlen) in SIZES {
        let value = vec![7u8; vlen];
        let memory = Cache::new(format!("mem_{name}"), Bounds::default());
        let stored = Cache::with_durable(
            format!("dur_{name}"),
            Bounds::default(),
            Some(Arc::clone(&durable)),
            0,
        );
        let keys: Vec<Vec<u8>> = (0..10_000).map(|i| key(klen, i)).collect();
        for (row, cache) in [("a_memory_put", &memory), ("b_durable_put", &stored)] {
            let mut i = 0usize;
            g.bench_function(BenchmarkId::new(row, name), |b| {
                b.iter(|| {
                    i = (i + 1) % keys.len();
                    cache.put(black_box(&keys[i]), black_box(&value)).unwrap();
                })
            });
        }
    }
    g.finish();
}

/// Restart → first answer with 1,000,000 entries on disk: open the store,
/// learn its caches, answer one key (read from disk on the memory miss).
fn restart(c: &mut Criterion) {
    use keepwarm::cache::{Durable, Store};
    use keepwarm::persist::{Record, SqliteTier};
    const ENTRIES: u64 = 1_000_000;
    // Built once per machine (about 10 s), kept in the target directory.
    let dir = keepwarm_tests::target_dir().join("bench-restart-1m");
    let ready = dir.join("ready");
    if !ready.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let tier = SqliteTier::open(&dir, Some(1 << 40)).unwrap();
        for chunk in 0..ENTRIES / 100_000 {
            let rows = (chunk * 100_000..(chunk + 1) * 100_000).map(|i| {
                (
                    key(64, i),
                    Record {
                        value: vec![9u8; 100],
                        identity: 0,
                        born_ms: keepwarm::persist::now_ms(),
                        cost_ns: 1_000,
                    },
                )
            });
            tier.put_batch(&format!("cache{}", chunk % 10), rows)
                .unwrap();
        }
        drop(tier);
        std::fs::write(&ready, "").unwrap();
    }
    let mut g = c.benchmark_group("restart");
    g.sample_size(20);
    let probe = key(64, ENTRIES / 2 + 7);
    let cache = format!("cache{}", (ENTRIES / 2 + 7) / 100_000 % 10);
    g.bench_function("a_open_and_first_hit_1m_entries", |b| {
        b.iter(|| {
            let tier = SqliteTier::open(&dir, None).unwrap();
            let durable = Arc::new(Durable::new(Arc::new(tier), Arc::new(|_: &str| {})));
            let store = Store::with_durable(Default::default(), durable).unwrap();
            let v = store
                .cache(&cache)
                .get(&probe)
                .expect("the entry is on disk");
            black_box(v.len())
        })
    });
    g.finish();
}

/// Crash protection on the cold path (issue 14): `cold_memo(N)`, N cold
/// memoized calls each making one small put, on a host whose caches are in
/// memory only (what `keepwarm run` had before), recorded in the crash
/// journal (what a supervised worker does without `--persist`), and in the
/// SQLite store (what a private `--persist` would cost; fewer calls, it is
/// two orders of magnitude slower). The cache is reset before each run.
fn crash_protection(c: &mut Criterion) {
    use keepwarm::journal::Journal;
    let mut g = c.benchmark_group("crash_protection");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    let library = built_release_library("bench_plugin");
    let store_dir = tempfile::tempdir().unwrap();
    let hosts = [
        ("a_memory_only_1m", Config::new(&library), 1_000_000u64),
        (
            "b_crash_journal_1m",
            Config {
                journal: Some(Arc::new(Journal::create().unwrap())),
                ..Config::new(&library)
            },
            1_000_000,
        ),
        (
            "c_sqlite_store_100k",
            Config::new(&library).persist(store_dir.path()),
            100_000,
        ),
    ];
    for (row, config, n) in hosts {
        let host = Host::new(config).unwrap();
        host.reload(false).unwrap();
        g.bench_function(row, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    host.reset("cold");
                    let start = Instant::now();
                    black_box(call(&host, "cold_memo", json!([n])));
                    total += start.elapsed();
                }
                total
            })
        });
        host.shutdown(Duration::from_secs(5));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(30);
    targets = hits, memo, evicting_puts, durable_puts, restart, crash_protection
}
criterion_main!(benches);
