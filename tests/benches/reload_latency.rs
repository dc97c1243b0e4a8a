//! Reload latency: from the moment a new library is complete at the watched
//! path (an atomic rename, as cargo's hard link) to the first call answered
//! by the new code. p50 and p99 over 60 reloads, for debug and release builds
//! of the same two-version fixture. `make bench` runs it; BENCHMARKS.md
//! quotes it. A custom harness: criterion has no percentiles.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keepwarm::{watcher, Config, Host};
use keepwarm_tests::{built_library, built_release_library};

const RELOADS: usize = 60;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn measure(label: &str, a: &Path, b: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libswap.so");
    std::fs::copy(a, &path).unwrap();
    let config = Config::new(&path).on_event(|event| {
        if let keepwarm::Event::Refused { .. } = event {
            eprintln!("{event:?}");
        }
    });
    let host = Host::new(config).unwrap();
    host.reload(false).unwrap();
    let _watch = watcher::watch(Arc::clone(&host)).unwrap();
    let mut latencies = Vec::with_capacity(RELOADS);
    let mut load_times = Vec::with_capacity(RELOADS);
    for n in 0..RELOADS {
        let (from, want) = if n % 2 == 0 { (b, "b") } else { (a, "a") };
        let staged = dir.path().join("staged.so");
        std::fs::copy(from, &staged).unwrap();
        std::thread::sleep(Duration::from_millis(20)); // let the staging events pass
                                                       // The clock starts before the rename: on ext4, rename(2) over an
                                                       // existing file flushes the new file's data and can take several ms,
                                                       // while the new name is already visible (and loading) inside it. An
                                                       // upper bound, then.
        let complete = Instant::now();
        std::fs::rename(&staged, &path).unwrap();
        loop {
            if host.call_json("version", &[]).is_ok_and(|v| v == want) {
                break;
            }
            assert!(
                complete.elapsed() < Duration::from_secs(30),
                "reload {n} never answered"
            );
            std::hint::spin_loop();
        }
        latencies.push(complete.elapsed());
        load_times.push(host.current().unwrap().load_time);
    }
    latencies.sort();
    load_times.sort();
    let size = std::fs::metadata(a).unwrap().len() as f64 / (1 << 20) as f64;
    println!(
        "| {label} | {size:.1} MiB | {:.2} | {:.2} | {:.2} | {:.2} |",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap()),
        ms(percentile(&load_times, 0.5)),
    );
}

fn main() {
    // `cargo bench` passes filter arguments; this harness runs everything.
    println!("reload latency over {RELOADS} reloads (ms):");
    println!("| plugin build | library size | p50 | p99 | max | p50 of the host's load time |");
    println!("| --- | --- | --- | --- | --- | --- |");
    measure("debug", &built_library("swap_a"), &built_library("swap_b"));
    measure(
        "release",
        &built_release_library("swap_a"),
        &built_release_library("swap_b"),
    );
}
