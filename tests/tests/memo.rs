//! Memoization through the host: single flight, resets during a
//! computation, cycles — with the real host and a real plugin (`faults`).

use keepwarm_tests::{built_library, HostProcess};

#[test]
fn concurrent_misses_compute_once() {
    let host = HostProcess::start(&built_library("faults"), &[]);
    let answers: Vec<_> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..4)
            .map(|_| s.spawn(|| host.call("slow_square", &["3"])))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert_eq!(answers, vec![serde_json::json!(9); 4]);
    assert_eq!(
        host.count("computing slow_square 3"),
        1,
        "{:?}",
        host.lines()
    );
    let slow = &host.stats()["slow"];
    assert_eq!(
        (slow["inserts"].as_u64(), slow["entries"].as_u64()),
        (Some(1), Some(1)),
        "{slow}"
    );
}

#[test]
fn reset_during_a_computation_does_not_store_the_stale_value() {
    let host = HostProcess::start(&built_library("faults"), &[]);
    std::thread::scope(|s| {
        let call = s.spawn(|| host.call("slow_square", &["5"]));
        host.wait_for("computing slow_square 5");
        let out = host.cli(&["reset", "slow"]);
        assert_eq!(out.status, Some(0), "{out:?}");
        // The caller still gets its answer...
        assert_eq!(call.join().unwrap(), 25);
    });
    // ...but the value computed before the reset was not put back.
    let slow = &host.stats()["slow"];
    assert_eq!(
        (slow["entries"].as_u64(), slow["resets"].as_u64()),
        (Some(0), Some(1)),
        "{slow}"
    );
    assert_eq!(host.call("slow_square", &["5"]), 25);
    assert_eq!(
        host.count("computing slow_square 5"),
        2,
        "the next call computes again"
    );
    assert_eq!(host.stats()["slow"]["entries"], 1);
}

#[test]
fn a_memoization_cycle_is_an_error_not_a_deadlock() {
    let host = HostProcess::start(&built_library("faults"), &[]);
    let out = host.cli(&["call", "cycle", "1"]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("memoization cycle in cache `cycle`"),
        "{out:?}"
    );
    // The host is fine and the key is not stuck.
    assert_eq!(host.call("ok", &["7"]), 7);
    assert_eq!(host.cli(&["call", "cycle", "1"]).status, Some(1));
}
