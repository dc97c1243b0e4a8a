//! Host bytes per cached entry beyond the payload, measured with a counting
//! global allocator around real `Cache::put`s (run with `--nocapture` to see
//! the figure; BENCHMARKS.md quotes it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicIsize, Ordering};

use keepwarm::cache::{Bounds, Cache};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn bytes_per_entry_beyond_the_payload() {
    for (key_len, value_len) in [(8usize, 8usize), (64, 1024)] {
        const N: usize = 100_000;
        let cache = Cache::new(
            "m",
            Bounds {
                max_entries: NonZeroUsize::new(N).unwrap(),
                max_bytes: None,
            },
        );
        let value = vec![1u8; value_len];
        let keys: Vec<Vec<u8>> = (0..N as u64)
            .map(|i| {
                let mut k = i.to_le_bytes().to_vec();
                k.resize(key_len, 0);
                k
            })
            .collect();
        let before = LIVE.load(Ordering::Relaxed);
        for k in &keys {
            cache.put(k, &value).unwrap();
        }
        let used = (LIVE.load(Ordering::Relaxed) - before) as f64 / N as f64;
        let overhead = used - (key_len + value_len) as f64;
        eprintln!(
            "memory: {key_len}-byte keys, {value_len}-byte values: {used:.1} bytes allocated per entry, {overhead:.1} beyond the payload (requested sizes; malloc adds its own rounding)"
        );
        assert_eq!(cache.stats().entries, N as u64);
        assert!(overhead > 0.0 && overhead < 256.0, "{overhead}");
    }
}
