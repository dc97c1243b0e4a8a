//! The daily loop (issue 16, rows 2–5): JSON with spaces at the prompt is
//! one argument (`prompt.rs`), options after the function name are options,
//! `reset` without a cache names `--all`, and a misspelt library or a crate
//! directory gets a "did you mean".

use std::process::Command;

use keepwarm_tests::{built_library, keepwarm_bin, root, target_dir, HostProcess};

fn keepwarm(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(keepwarm_bin())
        .args(args)
        .env("XDG_RUNTIME_DIR", tempfile::tempdir().unwrap().path())
        // Where this run's builds are, as a user's environment would say.
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn options_after_the_function_name_are_options_not_arguments() {
    let host = HostProcess::start(&built_library("example-plugin"), &[]);
    host.wait_for("generation 1 loaded");
    let socket = host.socket().to_str().unwrap().to_owned();
    // --socket after the arguments is honoured.
    let (status, stdout, stderr) = keepwarm(&["call", "square", "3", "--socket", &socket]);
    assert_eq!((status, stdout.trim()), (Some(0), "9"), "{stderr}");
    // An unknown option is a usage error, not an argument.
    let (status, _, stderr) = keepwarm(&["call", "square", "3", "--bogus", "--socket", &socket]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("--bogus"), "{stderr}");
    // After `--` a dash-word is an argument (square then refuses it).
    let (status, _, stderr) = keepwarm(&["--socket", &socket, "call", "square", "--", "--x"]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("argument 1 (\"--x\")"), "{stderr}");
    // Negative numbers are arguments.
    let (status, _, stderr) = keepwarm(&["--socket", &socket, "call", "square", "-3"]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("argument 1 (-3)"), "{stderr}");
}

#[test]
fn reset_without_a_cache_names_all() {
    let (status, _, stderr) = keepwarm(&["reset"]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("keepwarm reset --all"), "{stderr}");
}

#[test]
fn a_misspelt_library_or_a_crate_directory_gets_a_suggestion() {
    let built = built_library("example-plugin");
    let misspelt = built.with_file_name("libexample-plugin.so");
    let (status, _, stderr) = keepwarm(&["run", misspelt.to_str().unwrap(), "--no-repl"]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(
        stderr.contains("no such file")
            && stderr.contains(&format!("did you mean {}", built.display())),
        "{stderr}"
    );
    let crate_dir = root().join("example-plugin");
    let (status, _, stderr) = keepwarm(&["run", crate_dir.to_str().unwrap(), "--no-repl"]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(
        stderr.contains("is a directory")
            && stderr.contains(&format!("did you mean {}", built.display())),
        "{stderr}"
    );
}

/// `keepwarm dev` at the root of a workspace with several `cdylib` packages
/// refuses at once and lists them, instead of building one of its own
/// choosing (issue 16, row 1).
#[test]
fn dev_at_a_workspace_root_with_several_cdylibs_asks_for_one() {
    let out = Command::new(keepwarm_bin())
        .args(["dev", "--no-repl"])
        .current_dir(root())
        .env("XDG_RUNTIME_DIR", tempfile::tempdir().unwrap().path())
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("several cdylib packages: ")
            && stderr.contains("example-plugin")
            && stderr.contains("swap_a")
            && stderr.contains("pass -p NAME"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("building"), "nothing was built: {stdout}");
}

/// Rows 6, 8 and 9: `status --json` gives each function its signature and
/// lists the calls running, with the progress the plugin reports; rows 7:
/// `stats` shows the time hits saved.
#[test]
fn status_shows_signatures_and_calls_in_flight_and_stats_the_time_saved() {
    let host = HostProcess::start(&built_library("example-plugin"), &[]);
    host.wait_for("generation 1 loaded");

    let status = host.status();
    let square = status["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["function"] == "square")
        .unwrap_or_else(|| panic!("no signature for square: {status}"))
        .clone();
    assert_eq!(square["signature"], "square(x: u64) -> u64");
    assert_eq!(
        square["args"],
        serde_json::json!([{"name": "x", "type": "u64"}])
    );
    assert_eq!(square["returns"], "u64");
    assert_eq!(status["calls_in_flight"], serde_json::json!([]));

    // A long call, piped (no terminal): it prints its result and nothing else.
    let socket = host.socket().to_owned();
    let runtime = host.runtime_dir().to_owned();
    let long = std::thread::spawn(move || {
        Command::new(keepwarm_bin())
            .args([
                "--socket",
                socket.to_str().unwrap(),
                "call",
                "count_primes",
                "30000000",
            ])
            .env("XDG_RUNTIME_DIR", runtime)
            .output()
            .unwrap()
    });
    let mut seen = serde_json::Value::Null;
    keepwarm_tests::eventually("the call is listed with its progress", || {
        let status = host.status();
        match status["calls_in_flight"].as_array().and_then(|c| c.first()) {
            Some(call) if !call["progress"].is_null() => {
                seen = call.clone();
                true
            }
            _ => false,
        }
    });
    assert_eq!(seen["function"], "count_primes", "{seen}");
    assert_eq!(seen["args"], "30000000", "{seen}");
    assert_eq!(seen["generation"], 1, "{seen}");
    assert_eq!(seen["progress"]["total"], 30000000, "{seen}");
    assert!(seen["seconds"].as_f64().unwrap() >= 0.0, "{seen}");
    assert!(seen["tag"].is_string(), "the CLI tags its call: {seen}");
    let out = long.join().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1857859");
    assert!(
        out.stderr.is_empty(),
        "nothing drawn when piped: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host.status()["calls_in_flight"], serde_json::json!([]));

    // Time saved: a hit saves what its entry took to compute.
    host.call("count_primes", &["30000000"]);
    let stats = host.stats();
    let primes = &stats["count_primes"];
    let (compute, saved) = (
        primes["compute_s"].as_f64().unwrap(),
        primes["saved_s"].as_f64().unwrap(),
    );
    assert!(compute > 0.0 && saved > 0.0, "{primes}");
    assert!(
        (saved - compute).abs() <= compute * 0.01 + 1e-6,
        "one hit saves the one miss's time: {primes}"
    );
    let table = host.cli(&["stats"]);
    assert!(
        table.stdout.lines().next().unwrap().ends_with("saved"),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("in total"), "{}", table.stdout);
}

/// Row 9: on a terminal, `keepwarm call` draws a progress bar while a long
/// call reports progress.
#[test]
fn a_long_call_on_a_terminal_shows_a_progress_bar() {
    let host = HostProcess::start(&built_library("example-plugin"), &[]);
    host.wait_for("generation 1 loaded");
    const DRIVER: &str = r#"
import os, pty, select, sys
argv = sys.argv[1:]
pid, fd = pty.fork()
if pid == 0:
    os.execv(argv[0], argv)
out = b""
while True:
    r, _, _ = select.select([fd], [], [], 0.5)
    if r:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;
    let out = Command::new("python3")
        .args(["-c", DRIVER])
        .arg(keepwarm_bin())
        .args([
            "--socket",
            host.socket().to_str().unwrap(),
            "call",
            "count_primes",
            "40000000",
        ])
        .env("XDG_RUNTIME_DIR", host.runtime_dir())
        .env("TERM", "xterm")
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains("count_primes(40000000) — running"),
        "{screen}"
    );
    assert!(
        screen.contains("/40000000 ("),
        "a bar with done/total: {screen}"
    );
    assert!(screen.contains("2433654"), "{screen}");
}
