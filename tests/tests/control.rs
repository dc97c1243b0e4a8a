//! Control from another terminal: the socket, the protocol, the CLI, and
//! hostile input on the real socket of a real host.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use keepwarm_tests::{built_library, keepwarm_bin, HostProcess};
use serde_json::{json, Value};

/// Sends raw bytes as one request line and reads one response line.
fn raw_request(socket: &Path, bytes: &[u8]) -> Value {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).unwrap();
    s.write_all(b"\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON response ({e}): {line:?}"))
}

fn error_code(v: &Value) -> &str {
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["v"], 1, "{v}");
    v["error"]["code"].as_str().unwrap()
}

#[test]
fn hostile_requests_get_clear_errors_and_the_host_keeps_serving() {
    let host = HostProcess::start(&built_library("example-plugin"), &[]);
    let s = host.socket();
    let bad = raw_request(s, b"this is not json");
    assert_eq!(error_code(&bad), "bad_request");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid request"),
        "{bad}"
    );
    let bad = raw_request(s, b"{\"cmd\":\"status\",\xff\xfe}");
    assert_eq!(error_code(&bad), "bad_request");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not UTF-8"),
        "{bad}"
    );
    let bad = raw_request(s, br#"{"cmd":"explode"}"#);
    assert_eq!(error_code(&bad), "bad_request");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown variant `explode`"),
        "{bad}"
    );
    let bad = raw_request(s, br#"{"cmd":"call","function":"square","args":"10"}"#);
    assert_eq!(error_code(&bad), "bad_request", "args must be an array");
    let bad = raw_request(s, br#"{"cmd":"call","function":42}"#);
    assert_eq!(error_code(&bad), "bad_request");
    let bad = raw_request(s, br#"{"cmd":"call","function":"square","args":[{"x":1}]}"#);
    assert_eq!(error_code(&bad), "plugin_error");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expected u64"),
        "{bad}"
    );
    let bad = raw_request(s, br#"{"v":2,"cmd":"status"}"#);
    assert_eq!(error_code(&bad), "unsupported_version");
    let bad = raw_request(s, br#"{"cmd":"reset","cache":"square","all":true}"#);
    assert_eq!(error_code(&bad), "bad_request");

    // A 10 MiB line: rejected after the first MiB, connection closed.
    let mut big = UnixStream::connect(s).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let line = vec![b'x'; 10 << 20];
    let _ = big.write_all(&line); // the host stops reading: a broken pipe is fine
    let mut answer = String::new();
    BufReader::new(&big).read_line(&mut answer).unwrap();
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(error_code(&answer), "bad_request");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("longer than 1048576 bytes"),
        "{answer}"
    );

    // Still serving, figures intact.
    let ok = raw_request(
        s,
        br#"{"v":1,"cmd":"call","function":"square","args":[12]}"#,
    );
    assert_eq!(ok, json!({"v": 1, "ok": true, "result": 144}));
    assert_eq!(host.status()["generation"], 1);
}

#[test]
fn silent_and_vanishing_clients_do_not_block_others() {
    let host = HostProcess::start(&built_library("example-plugin"), &[]);
    // Connects and never writes.
    let _silent = UnixStream::connect(host.socket()).unwrap();
    // Writes half a request and hangs.
    let mut half = UnixStream::connect(host.socket()).unwrap();
    half.write_all(br#"{"cmd":"sta"#).unwrap();
    // Asks for a large answer and disconnects before reading it.
    for _ in 0..20 {
        let mut gone = UnixStream::connect(host.socket()).unwrap();
        gone.write_all(b"{\"cmd\":\"status\"}\n{\"cmd\":\"stats\"}\n")
            .unwrap();
        drop(gone);
    }
    assert_eq!(host.call("square", &["9"]), 81);
    assert_eq!(host.cli(&["status"]).status, Some(0));
}

#[test]
fn two_hundred_concurrent_clients_are_all_answered() {
    let host = HostProcess::start(&built_library("example-plugin"), &[]);
    let socket = host.socket().to_owned();
    let answers: Vec<Value> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..200u64)
            .map(|i| {
                let socket = socket.clone();
                s.spawn(move || {
                    let req = format!(r#"{{"cmd":"call","function":"square","args":[{i}]}}"#);
                    raw_request(&socket, req.as_bytes())["result"].clone()
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a, &json!(i * i), "client {i}");
    }
    assert_eq!(host.stats()["square"]["entries"], 200);
}

#[test]
fn a_python_client_drives_the_host_without_our_cli() {
    let host = HostProcess::start(&built_library("example-plugin"), &[]);
    // The example of docs/PROTOCOL.md.
    let script = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
f = s.makefile("rw")
for request in ({"v": 1, "cmd": "call", "function": "square", "args": [7]},
                {"v": 1, "cmd": "reset", "cache": "square"}):
    f.write(json.dumps(request) + "\n"); f.flush()
    print(json.loads(f.readline())["result"])
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(host.socket())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "49\n{'cache': 'square', 'dropped': 1}\n"
    );
}

#[test]
fn socket_is_private_and_a_second_host_never_clobbers_it() {
    let host = HostProcess::start(&built_library("example-plugin"), &[]);
    let mode = std::fs::metadata(host.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let second = Command::new(keepwarm_bin())
        .args(["run", "--no-repl", "--socket"])
        .arg(host.socket())
        .arg(built_library("example-plugin"))
        .env("XDG_RUNTIME_DIR", host.runtime_dir())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another keepwarm host is already serving"),
        "{err}"
    );
    assert_eq!(
        host.call("square", &["3"]),
        9,
        "the first host still serves"
    );
}

#[test]
fn a_stale_socket_is_replaced_and_sigterm_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap()); // a dead host's socket
    assert!(socket.exists());
    let mut child = Command::new(keepwarm_bin())
        .args(["run", "--no-repl", "--socket"])
        .arg(&socket)
        .arg(built_library("example-plugin"))
        .env("XDG_RUNTIME_DIR", dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("generation 1 loaded") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the host exited");
    }
    let status = Command::new(keepwarm_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(0));
    // SIGTERM: the host removes its socket on the way out.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc_kill(child.id() as i32, 15) };
    child.wait().unwrap();
    let mut rest = String::new();
    let _ = out.read_to_string(&mut rest);
    assert!(!socket.exists(), "the socket file is removed on SIGTERM");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn default_socket_discovery_and_overrides() {
    let runtime = tempfile::tempdir().unwrap();
    let libs = tempfile::tempdir().unwrap();
    let (a, b) = (
        libs.path().join("a/libexample_plugin.so"),
        libs.path().join("b/libexample_plugin.so"),
    );
    for p in [&a, &b] {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::copy(built_library("example-plugin"), p).unwrap();
    }
    let kw = |args: &[&str], socket_env: Option<&Path>| {
        let mut c = Command::new(keepwarm_bin());
        c.args(args)
            .env("XDG_RUNTIME_DIR", runtime.path())
            .env_remove("KEEPWARM_SOCKET");
        if let Some(s) = socket_env {
            c.env("KEEPWARM_SOCKET", s);
        }
        c.output().unwrap()
    };
    let start = |lib: &Path| {
        Command::new(keepwarm_bin())
            .args(["run", "--no-repl"])
            .arg(lib)
            .env("XDG_RUNTIME_DIR", runtime.path())
            .env_remove("KEEPWARM_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Killed)
            .unwrap()
    };
    let dir = runtime.path().join("keepwarm");
    let live = |n: usize| {
        for _ in 0..3000 {
            let socks = std::fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.path().extension().is_some_and(|x| x == "sock"))
                        .count()
                })
                .unwrap_or(0);
            if socks == n && kw(&["status"], None).status.code() != Some(3) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{n} hosts never came up");
    };
    // No host: exit 3.
    assert_eq!(kw(&["status"], None).status.code(), Some(3));
    let _first = start(&a);
    live(1);
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let one = kw(&["call", "square", "4"], None);
    assert_eq!(
        String::from_utf8_lossy(&one.stdout).trim(),
        "16",
        "discovered the one live host"
    );
    let _second = start(&b);
    live(2);
    let sockets: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    assert_eq!(
        sockets.len(),
        2,
        "two libraries, two default sockets: {sockets:?}"
    );
    let ambiguous = kw(&["status"], None);
    assert_eq!(ambiguous.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&ambiguous.stderr).contains("2 keepwarm hosts are running"));
    for s in &sockets {
        assert_eq!(
            kw(&["status"], Some(s)).status.code(),
            Some(0),
            "KEEPWARM_SOCKET picks one"
        );
        let mut args = vec!["--socket", s.to_str().unwrap(), "status"];
        assert_eq!(kw(&args, None).status.code(), Some(0), "--socket picks one");
        args.push("--json");
        let status: Value = serde_json::from_slice(&kw(&args, None).stdout).unwrap();
        assert!(status["library"]
            .as_str()
            .unwrap()
            .ends_with("libexample_plugin.so"));
    }
}

/// Kills the host when the test ends, passing or failing.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_subcommand_has_help_with_an_example() {
    for sub in ["run", "call", "reset", "stats", "status", "reload"] {
        let out = Command::new(keepwarm_bin())
            .args([sub, "--help"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Example:") && text.contains(&format!("keepwarm {sub}")),
            "{sub}: {text}"
        );
    }
    let usage = Command::new(keepwarm_bin())
        .args(["stats", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

#[test]
fn stats_print_an_aligned_table_and_json() {
    let host = HostProcess::start(&built_library("example-plugin"), &[]);
    host.call("square", &["3"]);
    let table = host.cli(&["stats"]).stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("cache") && lines[0].contains("evictions"),
        "{table}"
    );
    // The rows are aligned; the last line sums up the time saved.
    let (total, rows) = lines.split_last().unwrap();
    assert!(
        total.starts_with("saved ") && total.contains("in total"),
        "{table}"
    );
    let width = rows[0].chars().count();
    assert!(
        rows.iter().all(|l| l.chars().count() == width),
        "aligned columns:\n{table}"
    );
    let one = host.cli(&["stats", "square", "--json"]).json();
    assert_eq!(one.as_array().unwrap().len(), 1);
    // A cache with no byte bound of its own gets the default one.
    assert_eq!(
        one[0]["max_bytes"].as_u64(),
        Some(keepwarm::cache::DEFAULT_MAX_BYTES)
    );
    assert_eq!(host.cli(&["stats", "nope"]).status, Some(1));
}
