//! Crash → serving again (issue 14): a real `keepwarm run` (release build)
//! on the `crashes` fixture (release), with 2,000 entries cached; `segv()`
//! kills its worker 20 times. For each crash, the clock starts when the
//! crashing call's connection drops (the worker is dead) and stops when a
//! call on a new connection answers (the new worker has replayed the crash
//! journal, loaded the kept build and accepted from the socket's backlog).
//! Prints p50, p99 and max, and the restart times the supervisor printed.
//! `make bench` runs it; BENCHMARKS.md quotes it. A custom harness:
//! criterion has no percentiles.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keepwarm_tests::{built_release_library, cargo, root, target_dir};

const CRASHES: usize = 20;

fn request(socket: &Path, line: &str) -> Option<serde_json::Value> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(line.as_bytes()).ok()?;
    s.write_all(b"\n").ok()?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).ok()?;
    serde_json::from_str(&answer).ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let status = cargo()
        .current_dir(root())
        .args(["build", "--release", "--quiet", "-p", "keepwarm-cli"])
        .status()
        .unwrap();
    assert!(status.success());
    let binary = target_dir().join("release/keepwarm");
    let library = built_release_library("crashes");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bench.sock");
    let mut host = Command::new(&binary)
        .args(["run", "--no-repl", "--socket"])
        .arg(&socket)
        .arg(&library)
        .env("XDG_RUNTIME_DIR", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let call = |f: &str, args: &str| {
        request(
            &socket,
            &format!(r#"{{"v":1,"cmd":"call","function":"{f}","args":[{args}]}}"#),
        )
    };
    let start = Instant::now();
    while call("sq", "3").is_none_or(|r| r["ok"] != true) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the host never served"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(call("fill", "2000").unwrap()["result"], 2000);
    let mut times = Vec::with_capacity(CRASHES);
    for _ in 0..CRASHES {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(b"{\"v\":1,\"cmd\":\"call\",\"function\":\"segv\",\"args\":[]}\n")
            .unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest); // ends when the worker dies
        let died = Instant::now();
        let answer = call("sq", "3").expect("the host serves again");
        times.push(died.elapsed());
        assert_eq!(answer["result"], 9, "{answer}");
    }
    // The entries survived every crash: 2,000 hits, no miss.
    let before = request(&socket, r#"{"v":1,"cmd":"stats","cache":"sq"}"#).unwrap();
    call("fill", "2000").unwrap();
    let after = request(&socket, r#"{"v":1,"cmd":"stats","cache":"sq"}"#).unwrap();
    let figure = |v: &serde_json::Value, k: &str| v["result"][0][k].as_u64().unwrap();
    assert_eq!(figure(&after, "misses"), figure(&before, "misses"));
    // SAFETY: kill sends SIGTERM to our own child.
    unsafe { libc::kill(host.id() as i32, libc::SIGTERM) };
    let mut printed = String::new();
    host.stdout
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();
    host.wait().unwrap();
    let mut said: Vec<f64> = printed
        .lines()
        .filter_map(|l| l.split(" in ").last()?.strip_suffix(" ms")?.parse().ok())
        .filter(|_| true)
        .collect();
    said.sort_by(f64::total_cmp);
    times.sort();
    let p = |q: f64| ms(times[((times.len() - 1) as f64 * q).round() as usize]);
    println!("crash -> serving again over {CRASHES} crashes of segv(), 2,000 entries cached (ms):");
    println!("| p50 | p99 | max | p50 of the supervisor's `restarted … in N ms` |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| {:.1} | {:.1} | {:.1} | {} |",
        p(0.5),
        p(0.99),
        ms(*times.last().unwrap()),
        said.get(said.len() / 2)
            .map_or("—".into(), |v| format!("{v:.0}"))
    );
}
