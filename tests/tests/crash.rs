//! Issue 14: crash containment. Plugin code that segfaults, aborts or
//! overflows its stack costs one call, never the host or a cached entry
//! (docs/RELIABILITY.md, "Crash containment"). Every test drives the real
//! binary on the `crashes` fixture, whose crashes are real signals.

use std::path::{Path, PathBuf};

use keepwarm_tests::{built_library, eventually, replace_atomically, HostProcess};

/// Entries filled before each crash, checked after it.
const FILLED: u64 = 2_000;

/// The `crashes` library with its mode text (`KEEPWARM-CRASH-MODE:normal`)
/// set to `mode`: another build, of the same length, that behaves as the
/// mode says (`normal-b`, `onload-segv`, `thread-segv`).
fn variant(dir: &Path, mode: &str) -> PathBuf {
    const PREFIX: &[u8] = b"KEEPWARM-CRASH-MODE:";
    const MODE_BYTES: usize = 32 - PREFIX.len();
    assert!(mode.len() <= MODE_BYTES);
    let mut bytes = std::fs::read(built_library("crashes")).unwrap();
    let at = bytes
        .windows(PREFIX.len())
        .position(|w| w == PREFIX)
        .expect("the mode text is in the library")
        + PREFIX.len();
    let padded = format!("{mode:.<MODE_BYTES$}");
    bytes[at..at + MODE_BYTES].copy_from_slice(padded.as_bytes());
    let path = dir.join(format!("variant-{mode}.so"));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A host on a copy of the normal build at `dir/libplugin.so`.
fn host_on_copy(dir: &Path) -> (HostProcess, PathBuf) {
    let lib = dir.join("libplugin.so");
    std::fs::copy(variant(dir, "normal"), &lib).unwrap();
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    (host, lib)
}

fn sq_figures(host: &HostProcess) -> (u64, u64) {
    let stats = host.stats();
    let sq = &stats["sq"];
    (sq["hits"].as_u64().unwrap(), sq["misses"].as_u64().unwrap())
}

/// Every entry filled before a crash is a hit after it: `fill` again adds
/// FILLED hits and no miss.
fn assert_all_still_cached(host: &HostProcess, why: &str) {
    let (hits, misses) = sq_figures(host);
    assert_eq!(host.call("fill", &[&FILLED.to_string()]), FILLED);
    let (hits_after, misses_after) = sq_figures(host);
    assert_eq!(
        (hits_after - hits, misses_after - misses),
        (FILLED, 0),
        "{why}: every entry filled before the crash is still a hit; host said:\n{}",
        host.lines().join("\n")
    );
}

#[test]
fn every_crash_in_a_call_costs_that_call_only() {
    let dir = tempfile::tempdir().unwrap();
    let (mut host, _lib) = host_on_copy(dir.path());
    let supervisor = host.pid();
    assert_eq!(host.call("fill", &[&FILLED.to_string()]), FILLED);
    let cases = [
        ("segv", "SIGSEGV"),
        ("bus", "SIGBUS"),
        ("abort", "SIGABRT"),
        // Rust's stack guard turns the overflow into an abort.
        ("overflow", "SIG"),
    ];
    for (n, (function, signal)) in cases.iter().enumerate() {
        let workers_before = host.worker_pid();
        let args: &[&str] = if *function == "overflow" { &["0"] } else { &[] };
        let mut all = vec!["call", function];
        all.extend_from_slice(args);
        let out = host.cli(&all);
        assert_eq!(out.status, Some(1), "{function}: {out:?}");
        assert!(
            out.stderr.contains(&format!("plugin crashed: {signal}"))
                && out
                    .stderr
                    .contains(&format!("in {function}() (generation 1)"))
                && out.stderr.contains("the host restarted on generation 1"),
            "{function}: {out:?}"
        );
        let line = host.wait_for_nth("keepwarm: plugin crashed:", n + 1);
        assert!(
            line.contains(&format!("in {function}() (generation 1)"))
                && line.contains("restarted on generation 1 in ")
                && line.ends_with(" ms"),
            "{line}"
        );
        assert!(host.is_running(), "the supervisor outlives the crash");
        assert_eq!(host.status()["pid"], supervisor, "same supervisor");
        assert_ne!(host.worker_pid(), workers_before, "a new worker");
        assert_all_still_cached(&host, function);
    }
    let status = host.status();
    assert_eq!(status["restarts"], cases.len());
    assert_eq!(status["last_crash"]["function"], "overflow");
    assert_eq!(
        status["bad_builds"],
        serde_json::json!([]),
        "a crash in a call is the call's fault"
    );
    assert_eq!(status["generation"], 1);
    // Nothing left behind: one worker, its shadow directory and the
    // supervisor's kept builds while running; nothing after SIGTERM.
    let worker = host.worker_pid();
    let runtime = host.runtime_dir().to_owned();
    let shadows = std::fs::read_dir(runtime.join("keepwarm"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("shadow-"))
        .count();
    assert_eq!(shadows, 1, "the dead workers' shadow directories are swept");
    let exit = host.stop(libc::SIGTERM);
    assert!(exit.success(), "{exit:?}");
    assert!(
        !Path::new(&format!("/proc/{worker}")).exists(),
        "the worker is gone and reaped"
    );
    let left: Vec<_> = std::fs::read_dir(runtime.join("keepwarm"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn calls_running_when_the_worker_crashed_fail_with_the_crash_and_the_host_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (host, _lib) = host_on_copy(dir.path());
    let socket = host.socket().to_owned();
    let runtime = host.runtime_dir().to_owned();
    let slow = std::thread::spawn(move || {
        std::process::Command::new(keepwarm_tests::keepwarm_bin())
            .arg("--socket")
            .arg(&socket)
            .args(["call", "sleep_ms", "20000"])
            .env("XDG_RUNTIME_DIR", &runtime)
            .output()
            .unwrap()
    });
    eventually("the slow call is running", || {
        host.status()["calls_in_flight"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    });
    let out = host.cli(&["call", "segv"]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("plugin crashed: SIGSEGV in "),
        "{out:?}"
    );
    let slow = slow.join().unwrap();
    let stderr = String::from_utf8_lossy(&slow.stderr);
    assert_eq!(slow.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("plugin crashed: SIGSEGV"), "{stderr}");
    assert_eq!(host.call("sq", &["7"]), 49);
}

#[test]
fn a_build_that_crashes_in_on_load_is_refused_until_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (host, lib) = host_on_copy(dir.path());
    assert_eq!(host.call("fill", &[&FILLED.to_string()]), FILLED);
    replace_atomically(&variant(dir.path(), "onload-segv"), &lib);
    let line = host.wait_for("keepwarm: plugin crashed:");
    assert!(
        line.contains("SIGSEGV in on_load (generation 2)")
            && line.contains("is not loaded again until the file changes")
            && line.contains("restarted on generation 1"),
        "{line}"
    );
    // The worker that restarted looked at the file, found the bad build and
    // said so once.
    host.wait_for("this build crashed the host (SIGSEGV in on_load");
    assert_eq!(host.call("version", &[]), "normal");
    let status = host.status();
    assert_eq!(status["generation"], 1);
    assert_eq!(status["bad_builds"][0]["generation"], 2);
    let human = host.cli(&["status"]).stdout;
    assert!(
        human.contains("restarts:       1 (last: SIGSEGV in on_load (generation 2)")
            && human.contains("bad build:")
            && human.contains("(generation 2: SIGSEGV in on_load) is not loaded again"),
        "{human}"
    );
    assert_eq!(status["last_crash"]["in_load"], true);
    assert_all_still_cached(&host, "after a crash in on_load");
    // A touch is not a change: the bad build is not tried again.
    let file = std::fs::File::options().append(true).open(&lib).unwrap();
    file.set_modified(std::time::SystemTime::now()).unwrap();
    drop(file);
    assert_eq!(host.call("version", &[]), "normal");
    assert_eq!(
        host.count("keepwarm: plugin crashed:"),
        1,
        "one crash, one line"
    );
    // An explicit reload tries the bad build once more: it crashes again,
    // the reload exits 1 saying so (it is not sent again), and generation 1
    // still serves.
    let out = host.cli(&["reload"]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("plugin crashed: SIGSEGV in on_load")
            && out.stderr.contains("the host restarted on generation 1"),
        "{out:?}"
    );
    host.wait_for_nth("keepwarm: plugin crashed:", 2);
    assert_eq!(host.call("version", &[]), "normal");
    // A new build loads (its number follows the bad ones').
    replace_atomically(&variant(dir.path(), "normal-b"), &lib);
    let line = host.wait_for(" reloaded in ");
    assert!(line.contains("caches kept"), "{line}");
    assert_eq!(host.call("version", &[]), "normal-b");
    assert_eq!(
        host.count("keepwarm: plugin crashed:"),
        2,
        "two crashes, two lines"
    );
    assert_all_still_cached(&host, "after the next build");
}

#[test]
fn a_build_that_crashes_on_its_own_right_after_loading_is_marked_bad_without_a_restart_loop() {
    let dir = tempfile::tempdir().unwrap();
    let (host, lib) = host_on_copy(dir.path());
    assert_eq!(host.call("fill", &[&FILLED.to_string()]), FILLED);
    replace_atomically(&variant(dir.path(), "thread-segv"), &lib);
    host.wait_for("generation 2 reloaded");
    let line = host.wait_for("keepwarm: plugin crashed:");
    assert!(
        line.contains("SIGSEGV with no call running (generation 2)")
            && line.contains("is not loaded again")
            && line.contains("restarted on generation 1"),
        "{line}"
    );
    assert_eq!(host.call("version", &[]), "normal");
    assert_all_still_cached(&host, "after a crash on a plugin thread");
    // The next build loads; the bad one never ran again meanwhile.
    replace_atomically(&variant(dir.path(), "normal-c"), &lib);
    host.wait_for("generation 3 reloaded");
    assert_eq!(host.call("version", &[]), "normal-c");
    assert_eq!(
        host.count("keepwarm: plugin crashed:"),
        1,
        "no restart loop"
    );
    assert_eq!(host.status()["restarts"], 1);
}

#[test]
fn a_build_that_crashes_before_any_build_worked_leaves_the_host_up_and_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libplugin.so");
    std::fs::copy(variant(dir.path(), "onload-segv"), &lib).unwrap();
    let mut host = HostProcess::start(&lib, &[]);
    let line = host.wait_for("keepwarm: plugin crashed:");
    assert!(
        line.contains("SIGSEGV in on_load (generation 1)")
            && line.contains("with no build loaded: waiting for the next build"),
        "{line}"
    );
    assert!(host.is_running());
    let out = host.cli(&["call", "version"]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert_eq!(host.status()["generation"], 0);
    replace_atomically(&variant(dir.path(), "normal"), &lib);
    host.wait_for("generation 2 loaded");
    assert_eq!(host.call("version", &[]), "normal");
}

#[test]
fn memoized_recursion_a_million_deep_answers_from_the_cli() {
    let mut host = HostProcess::start(&built_library("crashes"), &[]);
    assert_eq!(host.call("deep", &["1000000"]), 1_000_000);
    assert!(host.is_running());
}

/// The prompt lives in the supervisor and talks to the worker: memoized
/// recursion a million deep answers there, and a crash at the prompt costs
/// that call only — the prompt stays, and so do the entries.
#[test]
fn at_the_prompt_deep_recursion_answers_and_a_crash_costs_one_call() {
    const DRIVER: &str = r#"
binary, lib, sock = sys.argv[1:4]
pid, fd = pty.fork()
if pid == 0:
    os.execv(binary, [binary, "run", lib, "--socket", sock])
def command(keys, marker):
    # Done when the answer shows and the next prompt after it.
    global out
    at = len(out)
    os.write(fd, keys)
    end = time.time() + 240
    while True:
        tail = out[at:]
        seen = tail.find(marker)
        if seen >= 0 and b"keepwarm> " in tail[seen:]:
            return
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            out += os.read(fd, 65536)
        if time.time() > end:
            sys.stdout.write(out.decode(errors="replace"))
            raise SystemExit("timeout waiting for %r" % marker)
read_until(b"keepwarm> ")
command(b"call deep 1000000\r", b"K1000000\r\n")
command(b"call fill 50\r", b"\n50\r\n")
command(b"call segv\r", b"restarted on generation 1 in ")
command(b"call deep 1000000\r", b"\n1000000\r\n")
command(b"stats deep\r", b"evictions")
os.write(fd, b"quit\r")
try:
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
except OSError:
    pass
os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
"#;
    let dir = tempfile::tempdir().unwrap();
    let screen = keepwarm_tests::prompt_session(DRIVER, &built_library("crashes"), dir.path());
    assert!(
        screen.contains("plugin crashed: SIGSEGV in segv() (generation 1)"),
        "{screen}"
    );
    // After the crash, deep(1000000) is one hit: the entry survived.
    let after = &screen[screen.find("plugin crashed").unwrap()..];
    let stats = &after[after.find("stats deep").unwrap()..];
    let row = stats
        .lines()
        .find(|l| l.starts_with("deep "))
        .unwrap_or_else(|| panic!("a row for deep in:\n{stats}"));
    let figures: Vec<&str> = row.split_whitespace().collect();
    // cache entries bytes capacity max_bytes hits misses ...
    assert_eq!(figures[1], "1000001", "every level is still cached: {row}");
    assert_eq!(figures[5], "1", "the second call is one hit: {row}");
    assert!(
        !dir.path().join("prompt.sock").exists(),
        "quit removes the socket"
    );
}

/// A worker killed from outside (`kill -9`, the OOM killer) right after
/// its build loaded is not the build's fault: the host restarts on the same
/// build, which is not marked bad, with every entry.
#[test]
fn a_worker_killed_from_outside_restarts_on_the_same_build() {
    let dir = tempfile::tempdir().unwrap();
    let (host, _lib) = host_on_copy(dir.path());
    assert_eq!(host.call("fill", &[&FILLED.to_string()]), FILLED);
    let worker = host.worker_pid();
    // SAFETY: kill(2) on the host's worker; no memory involved.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    let line = host.wait_for("keepwarm: plugin crashed:");
    assert!(
        line.contains("SIGKILL with no call running (generation 1)")
            && line.contains("restarted on generation 1")
            && !line.contains("not loaded again"),
        "{line}"
    );
    let status = host.status();
    assert_eq!(status["bad_builds"], serde_json::json!([]));
    assert_ne!(status["worker_pid"], worker);
    assert_all_still_cached(&host, "after kill -9 of the worker");
}

/// `--then FN` runs after each new build; when FN crashes the worker, the
/// restart on that build does not run it again: no restart loop.
#[test]
fn a_then_function_that_crashes_is_not_run_again_by_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libplugin.so");
    std::fs::copy(variant(dir.path(), "normal"), &lib).unwrap();
    let host = HostProcess::start(&lib, &["--then", "segv"]);
    let line = host.wait_for("keepwarm: plugin crashed:");
    assert!(line.contains("SIGSEGV in segv() (generation 1)"), "{line}");
    assert_eq!(host.call("version", &[]), "normal");
    assert_eq!(host.status()["restarts"], 1, "one crash, no loop");
    assert_eq!(host.count("keepwarm: plugin crashed:"), 1);
}

/// A build that crashes on its own later than its probation is restarted
/// on, twice; its third such crash within 30 s makes it bad, and the last
/// good build serves: no restart loop however late the crash comes.
#[test]
fn a_build_that_keeps_crashing_on_its_own_is_marked_bad_at_the_third_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (host, lib) = host_on_copy(dir.path());
    assert_eq!(host.call("fill", &[&FILLED.to_string()]), FILLED);
    replace_atomically(&variant(dir.path(), "late-segv"), &lib);
    host.wait_for("generation 2 reloaded");
    for n in 1..=2 {
        let line = host.wait_for_nth("keepwarm: plugin crashed:", n);
        assert!(
            line.contains("SIGSEGV with no call running (generation 2)")
                && line.contains("restarted on generation 2")
                && !line.contains("not loaded again"),
            "crash {n}: {line}"
        );
    }
    let line = host.wait_for_nth("keepwarm: plugin crashed:", 3);
    assert!(
        line.contains("is not loaded again until the file changes")
            && line.contains("restarted on generation 1"),
        "{line}"
    );
    assert_eq!(host.call("version", &[]), "normal");
    let status = host.status();
    assert!(
        status["bad_builds"][0]["why"]
            .as_str()
            .is_some_and(|w| w.contains("3 times in 30 s")),
        "{status}"
    );
    assert_all_still_cached(&host, "after three crashes");
}

/// With `--persist DIR` the store, not the journal, keeps the entries: a
/// crash in a call costs that call, and every entry is still a hit (read
/// back from the store by the new worker).
#[test]
fn with_persist_a_crash_keeps_every_entry_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let lib = dir.path().join("libplugin.so");
    std::fs::copy(variant(dir.path(), "normal"), &lib).unwrap();
    let host = HostProcess::start(&lib, &["--persist", store.to_str().unwrap()]);
    host.wait_for("generation 1 loaded");
    assert_eq!(host.call("fill", &[&FILLED.to_string()]), FILLED);
    let out = host.cli(&["call", "abort"]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("plugin crashed: SIGABRT in abort()"),
        "{out:?}"
    );
    assert_all_still_cached(&host, "with --persist");
    assert_eq!(host.stats()["sq"]["persisted_entries"], FILLED);
}
