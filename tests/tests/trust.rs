//! Issue 11: a cached answer is never stale; a call after a build sees
//! that build.

use keepwarm_tests::{built_library, replace_atomically, HostProcess};

/// `cargo build && keepwarm call version` answers the new build, every
/// time, without waiting for the watcher.
#[test]
fn a_call_right_after_a_build_answers_that_build() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libplugin.so");
    std::fs::copy(built_library("swap_a"), &lib).unwrap();
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    for round in 0..10 {
        let (package, version) = if round % 2 == 0 {
            ("swap_b", "b")
        } else {
            ("swap_a", "a")
        };
        replace_atomically(&built_library(package), &lib);
        let out = host.cli(&["call", "version"]);
        assert_eq!(out.status, Some(0), "{out:?}");
        assert_eq!(out.stdout.trim(), format!("\"{version}\""), "round {round}");
        assert!(out.stderr.is_empty(), "{out:?}");
    }
    // A build that is refused: the old generation answers, and says so.
    let tmp = dir.path().join("broken.tmp");
    std::fs::write(&tmp, b"this is not a library\n").unwrap();
    std::fs::rename(&tmp, &lib).unwrap();
    let out = host.cli(&["call", "version"]);
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        "\"a\"",
        "the last good build (round 9: a)"
    );
    assert!(
        out.stderr.contains("the build on disk was not loaded")
            && out.stderr.contains("not a shared library"),
        "{out:?}"
    );
}
