//! `keepwarm serve`: a host of caches with no plugin, the entry commands
//! on raw bytes (base64 in the JSON line), single flight across
//! connections, the epoch page, and hostile input on the real socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keepwarm_tests::{eventually, HostProcess};
use serde_json::{json, Value};

/// Starts `keepwarm serve` and waits for its line: the socket answers as
/// soon as it is bound, the epoch page is written just after.
fn serve(extra: &[&str]) -> HostProcess {
    let mut args: Vec<std::ffi::OsString> = vec!["serve".into()];
    args.extend(extra.iter().map(Into::into));
    let host = HostProcess::spawn(&args, None, &[]);
    host.wait_for("serving caches (no plugin)");
    host
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text.as_str().expect("a base64 string"))
        .unwrap()
}

fn ok(response: Option<Value>) -> Value {
    let response = response.expect("the host answered");
    assert_eq!(response["ok"], true, "{response}");
    response["result"].clone()
}

fn error(response: Option<Value>) -> (String, String) {
    let response = response.expect("the host answered");
    assert_eq!(response["ok"], false, "{response}");
    (
        response["error"]["code"].as_str().unwrap().to_owned(),
        response["error"]["message"].as_str().unwrap().to_owned(),
    )
}

/// The epoch page's file in the host's runtime directory.
fn page_of(host: &HostProcess) -> PathBuf {
    let dir = host.runtime_dir().join("keepwarm");
    std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "epochs"))
        .unwrap_or_else(|| panic!("no epoch page in {}", dir.display()))
}

fn word(page: &Path, index: usize) -> u64 {
    let bytes = std::fs::read(page).unwrap();
    u64::from_ne_bytes(bytes[index * 8..index * 8 + 8].try_into().unwrap())
}

#[test]
fn serve_answers_everything_but_call() {
    let host = serve(&["--cache", "square=10"]);
    host.wait_for("serving caches (no plugin)");
    let mut c = host.connect();
    let opened = ok(c.request(&json!({"v": 1, "cmd": "open", "cache": "square"})));
    assert_eq!(opened["capacity"], 10, "--cache bounds it: {opened}");
    let status = host.status();
    assert_eq!(status["generation"], 0);
    assert_eq!(status["caches"], json!(["square"]));
    assert_eq!(status["plugins"], json!([]));
    assert_eq!(host.stats()["square"]["entries"], 0);
    let out = host.cli(&["reset", "square"]);
    assert_eq!(out.status, Some(0), "{out:?}");
    let out = host.cli(&["reload"]);
    assert_eq!(out.status, Some(0), "{out:?}");
    let out = host.cli(&["call", "square", "10"]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(out.stderr.contains("no plugin loaded"), "{out:?}");
}

#[test]
fn serve_leaves_no_file_behind_on_each_signal() {
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let mut host = serve(&[]);
        let page = page_of(&host);
        let mode = std::fs::metadata(&page).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let status = host.stop(signal);
        assert_eq!(
            status.code(),
            Some(0),
            "signal {signal}: {:?}",
            host.lines()
        );
        assert!(!host.socket().exists(), "the socket is removed");
        let left: Vec<_> = std::fs::read_dir(host.runtime_dir().join("keepwarm"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "signal {signal} left {left:?}");
    }
}

#[test]
fn a_second_serve_on_the_same_socket_is_refused() {
    let host = serve(&[]);
    let out = std::process::Command::new(keepwarm_tests::keepwarm_bin())
        .args(["serve", "--socket"])
        .arg(host.socket())
        .env("XDG_RUNTIME_DIR", host.runtime_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    assert!(host.socket().exists());
    page_of(&host);
}

#[test]
fn bytes_cross_the_socket_exactly() {
    let host = serve(&[]);
    let mut c = host.connect();
    let key: Vec<u8> = (0..=255u8).rev().collect();
    let value: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let got = ok(c.request(&json!({"cmd": "get", "cache": "blobs", "key": b64(&key)})));
    assert_eq!(got["found"], false);
    let put = ok(c.request(&json!({
        "cmd": "put", "cache": "blobs", "key": b64(&key), "value": b64(&value)
    })));
    assert_eq!(put["stored"], true);
    let got = ok(c.request(&json!({"cmd": "get", "cache": "blobs", "key": b64(&key), "hits": 5})));
    assert_eq!(got["found"], true);
    assert_eq!(unb64(&got["value"]), value);
    let info = ok(c.request(&json!({"cmd": "cache_info", "cache": "blobs", "hits": 2})));
    assert_eq!(
        (info["hits"].clone(), info["misses"].clone()),
        (json!(8), json!(1))
    );
    assert_eq!(
        host.stats()["blobs"]["hits"],
        8,
        "client hits count in stats"
    );
}

#[test]
fn the_epoch_page_changes_at_every_reset_and_a_stale_put_is_dropped() {
    let mut host = serve(&[]);
    let page = page_of(&host);
    assert_eq!(&std::fs::read(&page).unwrap()[..8], b"KWEPOCH1");
    let mut c = host.connect();
    let opened = ok(c.request(&json!({"cmd": "open", "cache": "square"})));
    let slot = opened["slot"].as_u64().unwrap() as usize;
    let instance = opened["instance"].as_u64().unwrap();
    assert_eq!(word(&page, 2), instance);
    let stamp = opened["stamp"].as_u64().unwrap();
    assert_eq!(word(&page, 8 + slot), stamp);

    let lookup =
        ok(c.request(&json!({"cmd": "get_or_wait", "cache": "square", "key": b64(b"10")})));
    assert_eq!(lookup["lease"], true);
    assert_eq!(lookup["stamp"], stamp);
    // Reset while "computing": the put of the old epoch is not stored.
    assert_eq!(host.cli(&["reset", "square"]).status, Some(0));
    let after = word(&page, 8 + slot);
    assert_ne!(
        after, stamp,
        "the reset is on the page before `keepwarm reset` returns"
    );
    let put = ok(c.request(&json!({
        "cmd": "put", "cache": "square", "key": b64(b"10"), "value": b64(b"100"), "stamp": stamp
    })));
    assert_eq!(put["stored"], false);
    assert_eq!(host.stats()["square"]["entries"], 0);
    let put = ok(c.request(&json!({
        "cmd": "put", "cache": "square", "key": b64(b"10"), "value": b64(b"100"), "stamp": after
    })));
    assert_eq!(put["stored"], true);
    assert_eq!(host.cli(&["reset", "--all"]).status, Some(0));
    assert_ne!(word(&page, 8 + slot), after);

    // A client still mapping the page after the host left reads zeros.
    let mapped = std::fs::File::open(&page).unwrap();
    assert_eq!(host.stop(libc::SIGTERM).code(), Some(0));
    assert!(!page.exists());
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut &mapped, &mut bytes).unwrap();
    assert!(bytes[16..].iter().all(|&b| b == 0));
}

#[test]
fn a_waiter_gets_the_leaseholders_value_or_the_lease_when_it_leaves() {
    let host = serve(&[]);
    let mut a = host.connect();
    let lookup = json!({"cmd": "get_or_wait", "cache": "slow", "key": b64(b"k")});
    assert_eq!(ok(a.request(&lookup))["lease"], true);
    // Asked twice by the holder: still its lease, no waiting on itself.
    assert_eq!(ok(a.request(&lookup))["lease"], true);
    let socket = host.socket().to_owned();
    let waiter = {
        let lookup = lookup.clone();
        std::thread::spawn(move || keepwarm_tests::Connection::to(&socket).request(&lookup))
    };
    // The holder's two lookups and the waiter's each count a miss.
    eventually("the waiter's miss is counted", || {
        host.stats()["slow"]["misses"].as_u64() == Some(3)
    });
    ok(a.request(&json!({"cmd": "put", "cache": "slow", "key": b64(b"k"), "value": b64(b"v")})));
    let got = ok(waiter.join().unwrap());
    assert_eq!(
        (got["found"].clone(), unb64(&got["value"])),
        (json!(true), b"v".to_vec())
    );
    let figures = &host.stats()["slow"];
    // The waiter got the value without computing it: a hit.
    assert_eq!(
        (figures["hits"].as_u64(), figures["misses"].as_u64()),
        (Some(1), Some(2))
    );

    // The holder goes away without a put: the waiter gets the lease.
    let lookup = json!({"cmd": "get_or_wait", "cache": "slow", "key": b64(b"other")});
    let mut holder = host.connect();
    assert_eq!(ok(holder.request(&lookup))["lease"], true);
    let socket = host.socket().to_owned();
    let waiter = {
        let lookup = lookup.clone();
        std::thread::spawn(move || keepwarm_tests::Connection::to(&socket).request(&lookup))
    };
    eventually("the second waiter's miss is counted", || {
        host.stats()["slow"]["misses"].as_u64() == Some(4)
    });
    drop(holder);
    let got = ok(waiter.join().unwrap());
    assert_eq!(
        (got["found"].clone(), got["lease"].clone()),
        (json!(false), json!(true))
    );

    // A released lease, and a wait that runs out, say "compute".
    let lookup =
        json!({"cmd": "get_or_wait", "cache": "slow", "key": b64(b"third"), "wait_s": 0.05});
    assert_eq!(ok(a.request(&lookup))["lease"], true);
    let mut b = host.connect();
    let got = ok(b.request(&lookup));
    assert_eq!(
        (got["found"].clone(), got["lease"].clone()),
        (json!(false), json!(false))
    );
    let released = ok(a.request(&json!({"cmd": "release", "cache": "slow", "key": b64(b"third")})));
    assert_eq!(released["released"], true);
    assert_eq!(ok(b.request(&lookup))["lease"], true);
}

/// Sends raw bytes as one request line and reads one response line.
fn raw(socket: &Path, bytes: &[u8]) -> (String, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.write_all(b"\n");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    error(serde_json::from_str(&line).ok())
}

#[test]
fn hostile_entry_requests_get_clear_errors_and_the_host_keeps_serving() {
    let host = serve(&[]);
    let s = host.socket();
    for (line, says) in [
        (
            &br#"{"cmd":"get","cache":"c","key":"not base64!"}"#[..],
            "`key` is not base64",
        ),
        (
            br#"{"cmd":"put","cache":"c","key":"","value":"@@@="}"#,
            "`value` is not base64",
        ),
        (br#"{"cmd":"get","cache":"c"}"#, "missing field `key`"),
        (br#"{"cmd":"get","cache":"","key":""}"#, "`cache` is empty"),
        (
            br#"{"cmd":"get","cache":7,"key":""}"#,
            "invalid type for `cache`",
        ),
        (
            br#"{"cmd":"get","cache":"c","key":"","extra":1}"#,
            "unknown field `extra`",
        ),
        (
            br#"{"cmd":"put","cache":"c","key":"","value":"","stamp":-1}"#,
            "`stamp`",
        ),
        (
            br#"{"cmd":"get_or_wait","cache":"c","key":"","wait_s":"long"}"#,
            "`wait_s`",
        ),
        (
            br#"{"cmd":"get_or_wait","cache":"c","key":"","wait_s":99999}"#,
            "out of range",
        ),
        (
            br#"{"cmd":"open","cache":"c","max_entries":0}"#,
            "at least 1",
        ),
        (
            br#"{"cmd":"cache_info","cache":"nope"}"#,
            "no cache named `nope`",
        ),
    ] {
        let (code, message) = raw(s, line);
        let expected = if says.starts_with("no cache") {
            "unknown_cache"
        } else {
            "bad_request"
        };
        assert_eq!(
            code,
            expected,
            "{}: {message}",
            String::from_utf8_lossy(line)
        );
        assert!(message.contains(says), "{says:?} not in {message:?}");
    }
    let (code, _) = raw(s, br#"{"v":2,"cmd":"get","cache":"c","key":""}"#);
    assert_eq!(code, "unsupported_version");

    // A value beyond the 1 MiB line: refused, the connection closed.
    let mut big = Vec::from(&br#"{"cmd":"put","cache":"c","key":"","value":""#[..]);
    big.extend(std::iter::repeat_n(b'A', 2 << 20));
    big.extend(br#""}"#);
    let (code, message) = raw(s, &big);
    assert_eq!(code, "bad_request");
    assert!(message.contains("longer than 1048576 bytes"), "{message}");

    // Still serving; nothing was stored by the refused requests.
    let mut c = host.connect();
    let got = ok(c.request(&json!({"cmd": "get", "cache": "c", "key": ""})));
    assert_eq!(got["found"], false);
    assert_eq!(host.stats()["c"]["inserts"], 0);
}

const PROMPT: &str = r#"
binary, sock = sys.argv[1:3]
pid, fd = pty.fork()
if pid == 0:
    os.execv(binary, [binary, "serve", "--socket", sock])
read_until(b"keepwarm> ")
os.write(fd, b"stats\r")
read_until(b"(no caches yet)")
os.write(fd, b"call square 10\r")
read_until(b"no plugin loaded")
os.write(fd, b"quit\r")
_, status = os.waitpid(pid, 0)
print("EXIT", os.waitstatus_to_exitcode(status))
"#;

#[test]
fn serve_on_a_terminal_has_the_prompt_and_quit_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap(); // the prompt's history stays there
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(keepwarm_tests::pty_python(PROMPT))
        .arg(keepwarm_tests::keepwarm_bin())
        .arg(dir.path().join("serve.sock"))
        .env("XDG_RUNTIME_DIR", dir.path())
        .env("XDG_STATE_HOME", state.path())
        .env("TERM", "xterm")
        .output()
        .expect("python3");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.contains("EXIT 0"), "{screen}");
    assert!(!dir.path().join("serve.sock").exists());
    let left: Vec<_> = std::fs::read_dir(dir.path().join("keepwarm"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left {left:?}");
}

#[test]
fn serve_with_persist_is_warm_after_a_restart() {
    let store = tempfile::tempdir().unwrap();
    let persist = store.path().to_str().unwrap().to_owned();
    let mut first = serve(&["--persist", &persist]);
    let mut c = first.connect();
    let opened = ok(c.request(&json!({"cmd": "open", "cache": "square"})));
    ok(c.request(&json!({
        "cmd": "put", "cache": "square", "key": b64(b"10"), "value": b64(b"100"),
        "stamp": opened["stamp"]
    })));
    drop(c);
    assert_eq!(first.stop(libc::SIGTERM).code(), Some(0));
    let second = serve(&["--persist", &persist]);
    let mut c = second.connect();
    let reopened = ok(c.request(&json!({"cmd": "open", "cache": "square"})));
    assert_ne!(reopened["instance"], opened["instance"], "a new instance");
    let got = ok(c.request(&json!({"cmd": "get", "cache": "square", "key": b64(b"10")})));
    assert_eq!(unb64(&got["value"]), b"100");
}

#[test]
fn a_run_host_answers_entry_commands_without_a_page() {
    let host = HostProcess::start(&keepwarm_tests::built_library("example-plugin"), &[]);
    let mut c = host.connect();
    let opened = ok(c.request(&json!({"cmd": "open", "cache": "square"})));
    assert_eq!(
        (opened["page"].clone(), opened["slot"].clone()),
        (Value::Null, Value::Null)
    );
    let lookup = ok(c.request(&json!({"cmd": "get_or_wait", "cache": "square", "key": b64(b"x")})));
    assert_eq!(lookup["lease"], true);
    let put = ok(c.request(&json!({
        "cmd": "put", "cache": "square", "key": b64(b"x"), "value": b64(b"y"), "stamp": lookup["stamp"]
    })));
    assert_eq!(put["stored"], true);
    assert_eq!(
        host.call("square", &["10"]),
        json!(100),
        "plugin calls still work"
    );
}
