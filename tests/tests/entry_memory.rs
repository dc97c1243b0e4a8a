//! `bytes` in the cache figures is the memory entries really cost: a
//! million small entries, measured as the process's resident memory, agree
//! with what `stats` reports (issue 10, row 19). Alone in its test binary so
//! that no other test's allocations move the figure.

use keepwarm::cache::{Bounds, Cache};

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_million_small_entries_cost_what_stats_reports() {
    const N: u64 = 1_000_000;
    let cache = Cache::new(
        "m",
        Bounds {
            max_entries: std::num::NonZeroUsize::new(N as usize).unwrap(),
            max_bytes: None,
        },
    );
    let before = vm_rss_kib();
    for i in 0..N {
        cache.put(&i.to_le_bytes(), &i.to_be_bytes()).unwrap();
    }
    let rss = (vm_rss_kib() - before) * 1024;
    let reported = cache.stats().bytes;
    let ratio = reported as f64 / rss as f64;
    eprintln!(
        "entry memory: {N} entries of 8+8 bytes: RSS +{} MiB, stats bytes {} MiB ({ratio:.2} of RSS; payload alone would be {} MiB)",
        rss >> 20,
        reported >> 20,
        (N * 16) >> 20
    );
    assert!(
        (0.75..=1.33).contains(&ratio),
        "stats bytes / RSS = {ratio:.2}"
    );
}
