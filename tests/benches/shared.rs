//! The shared tier (issue 17) on a real `redis-server` on loopback, through
//! the runtime's own cache path (`Cache::compute_missing_shared`, what a
//! `#[memo]` miss runs), in one process:
//!
//! - `shared/hit`: a local miss that Redis answers (one pipelined round
//!   trip, the header checked, the entry stored locally), against
//!   `shared/compute_primes_*`: computing `count_primes(n)` instead, the
//!   example plugin's function, for two sizes.
//! - `shared/miss_local_only` against `shared/miss_write_behind`: a miss
//!   computed (an 8-byte value) and stored, without a shared tier, and with
//!   one whose write-behind queues it (the Redis read is skipped: the
//!   identity has no entry, so this group isolates what queueing adds; the
//!   read's round trip on a cold key is `shared/miss_read_then_compute`).
//!
//! `make bench` runs it; BENCHMARKS.md quotes it. Needs `redis-server`
//! (the Debian package; `.ci/run` installs it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use keepwarm::cache::{Bounds, Cache, SharedLookup, Want};
use keepwarm::shared::{Counters, SharedConfig, SharedTier};
use keepwarm_tests::RedisServer;

/// Entries planted in Redis for the hit benchmark.
const PLANTED: u64 = 50_000;

fn count_primes(n: u64) -> u64 {
    let mut sieve = vec![true; n as usize];
    let mut count = 0;
    for i in 2..n as usize {
        if sieve[i] {
            count += 1;
            let mut j = i * i;
            while j < n as usize {
                sieve[j] = false;
                j += i;
            }
        }
    }
    count
}

fn big_cache(name: &str) -> Cache {
    Cache::new(
        name,
        Bounds {
            max_entries: std::num::NonZeroUsize::new(10_000_000).unwrap(),
            max_bytes: None,
        },
    )
}

fn tier(redis: &RedisServer) -> SharedTier {
    let tier = SharedTier::connect(
        SharedConfig::new(&redis.url()).unwrap(),
        Arc::new(|m: &str| eprintln!("{m}")),
    )
    .unwrap();
    // Connected before measuring.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tier.status().state != "connected" {
        assert!(Instant::now() < deadline, "{:?}", tier.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    tier
}

fn bench(c: &mut Criterion) {
    let redis = RedisServer::start();
    let tier = tier(&redis);
    let id = tier.id("bench", "square", 0x1234_5678_9abc_def1, 0);
    let counters = Arc::new(Counters::default());
    for i in 0..PLANTED {
        tier.put(
            &id,
            &i.to_le_bytes(),
            &(i * i).to_le_bytes(),
            1_000,
            None,
            &counters,
        );
        if i % 2_000 == 1_999 {
            // The queue holds 4,096: let the writer keep up.
            let deadline = Instant::now() + Duration::from_secs(10);
            while counters.snapshot()[5] < i + 1 - 1_000 {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while counters.snapshot()[5] < PLANTED {
        assert!(
            Instant::now() < deadline,
            "planted {:?}",
            counters.snapshot()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let shared = SharedLookup {
        tier: &tier,
        id: &id,
    };

    let mut group = c.benchmark_group("shared");
    group.bench_function("hit", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut cache = big_cache("square");
            let mut next = 0;
            for _ in 0..iters {
                if next == PLANTED {
                    // Every planted key is local now: a fresh local tier.
                    cache = big_cache("square");
                    next = 0;
                }
                let key = next.to_le_bytes();
                next += 1;
                let started = Instant::now();
                let got = cache.compute_missing_shared(
                    &key,
                    0,
                    &Want::ANY,
                    Some(shared),
                    || -> Result<Vec<u8>, ()> { panic!("a planted key was computed") },
                );
                total += started.elapsed();
                assert!(matches!(got, keepwarm::cache::Computed::Value(_)));
            }
            total
        })
    });
    for n in [100_000u64, 1_000_000] {
        group.bench_function(format!("compute_primes_{n}"), |b| {
            b.iter(|| std::hint::black_box(count_primes(std::hint::black_box(n))))
        });
    }
    // The miss path with and without queueing for the writer. The keys
    // are fresh each time; the read is not part of it (no lookup given
    // to the local-only miss; the write-behind miss enqueues directly).
    let value = 42u64.to_le_bytes();
    group.bench_function("miss_local_only", |b| {
        let cache = big_cache("local");
        let mut k = 0u64;
        b.iter(|| {
            k += 1;
            cache.compute_missing_shared(&k.to_le_bytes(), 0, &Want::ANY, None, || {
                Ok::<_, ()>(value.to_vec())
            })
        })
    });
    let writes = tier.id("bench", "writes", 0x0fed_cba9_8765_4321, 0);
    let write_counters = Arc::new(Counters::default());
    group.bench_function("miss_write_behind", |b| {
        let cache = big_cache("writes");
        let mut k = 0u64;
        b.iter(|| {
            k += 1;
            let key = k.to_le_bytes();
            let v = cache
                .compute_missing_shared(&key, 0, &Want::ANY, None, || Ok::<_, ()>(value.to_vec()));
            tier.put(&writes, &key, &value, 1, None, &write_counters);
            v
        })
    });
    let cold = tier.id("bench", "cold", 0x1111_2222_3333_4445, 0);
    let cold_lookup = SharedLookup {
        tier: &tier,
        id: &cold,
    };
    group.bench_function("miss_read_then_compute", |b| {
        let cache = big_cache("cold");
        let mut k = 0u64;
        b.iter(|| {
            k += 1;
            cache.compute_missing_shared(&k.to_le_bytes(), 0, &Want::ANY, Some(cold_lookup), || {
                Ok::<_, ()>(value.to_vec())
            })
        })
    });
    group.finish();
    let [_, _, errors, _, drops, written] = write_counters.snapshot();
    eprintln!(
        "shared bench: write-behind wrote {written}, dropped {drops} from a full queue, {errors} errors"
    );
    tier.close(Duration::from_secs(2));
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3)).sample_size(30);
    targets = bench
}
criterion_main!(benches);
