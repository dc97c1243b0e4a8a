//! The prompt of `keepwarm run`, driven through a real pseudo-terminal
//! (python3's `pty` module): commands, Tab completion of commands and
//! function names, help, and quit.

use std::process::Command;

use keepwarm_tests::{built_library, keepwarm_bin};

const DRIVER: &str = r#"
binary, lib, sock = sys.argv[1:4]
pid, fd = pty.fork()
if pid == 0:
    os.execv(binary, [binary, "run", lib, "--socket", sock])
def command(keys, marker):
    global out
    out_before = len(out)
    os.write(fd, keys)
    read_until(marker)
read_until(b"keepwarm> ")
command(b"call square 10\r", b"Squaring 10")
read_until(b"100")
command(b"call fi\t", b"call fib")          # completes the function name
command(b"20\r", b"6765")
command(b"rel\t\r", b"generation 2")           # completes the command: reload
command(b"help\r", b"square(x: u64) -> u64")         # help lists the signatures
command(b"call \t\t", b"fib(n: u64) -> u64")           # Tab twice: the functions, with them
command(b"\x15", b"")                                # Ctrl-U: clear the line
command(b"call count_primes 40000000\r", b"count_primes(40000000)")   # the live line of a long call
read_until(b"2433654")
command(b'call square {"x": 1}\r', b"argument 1 ({")   # JSON with spaces: one argument
command(b"stats\r", b"evictions")
command(b"reset square\r", b"entry dropped")
command(b"call square 10\r", b"[gen 2] Squaring 10")
read_until(b"[gen 2] Squaring 10\r\n100")
command(b"quit\r", b"")
os.waitpid(pid, 0)
try:
    while True:
        r, _, _ = select.select([fd], [], [], 0.2)
        if not r:
            break
        out += os.read(fd, 65536)
except OSError:
    pass
sys.stdout.write(out.decode(errors="replace"))
"#;

#[test]
fn the_prompt_runs_commands_completes_names_and_quits() {
    let dir = tempfile::tempdir().unwrap();
    let screen =
        keepwarm_tests::prompt_session(DRIVER, &built_library("example-plugin"), dir.path());
    for expected in [
        "generation 1 loaded",
        "[gen 1] Squaring 10",
        "keepwarm> call fib ",
        "6765",
        "keepwarm> reload ",
        "generation 2 reloaded",
        "Call an exported plugin function",
        "square",
        "count_primes(n: u64) -> u64",
        "count_primes(40000000) — running",
    ] {
        assert!(
            screen.contains(expected),
            "missing {expected:?} in:\n{screen}"
        );
    }
    // A plugin's log line comes before the call's result, not after it or
    // on the next prompt line.
    let first = screen.find("[gen 1] Squaring 10").unwrap();
    assert!(
        screen[first..]
            .trim_start_matches("[gen 1] Squaring 10")
            .trim_start()
            .starts_with("100"),
        "the log line precedes the result:\n{screen}"
    );
    // A reset or a reload at the prompt is said once, by the host's own line.
    assert_eq!(
        screen.matches("entry dropped").count(),
        1,
        "one line per reset:\n{screen}"
    );
    assert!(
        !screen.contains("generation 2 loaded"),
        "one line per reload:\n{screen}"
    );
    assert!(
        !dir.path().join("prompt.sock").exists(),
        "quit removes the socket"
    );
    assert!(
        dir.path().join("keepwarm/history").exists(),
        "history is saved"
    );
}

const LEAVE: &str = r#"
binary, lib, sock, way = sys.argv[1:5]
pid, fd = pty.fork()
if pid == 0:
    os.execv(binary, [binary, "run", lib, "--socket", sock])
read_until(b"keepwarm> ")
if way == "quit":
    os.write(fd, b"quit\r")
elif way == "ctrl-d":
    os.write(fd, b"\x04")
elif way == "ctrl-c":
    os.write(fd, b"\x03")
    read_until(b"Ctrl-C again")
    os.write(fd, b"\x03")
elif way == "sigterm":
    os.kill(pid, signal.SIGTERM)
_, status = os.waitpid(pid, 0)
print("EXIT", os.waitstatus_to_exitcode(status))
"#;

/// Every way out of the prompt is the same clean shutdown: exit status 0,
/// the socket and the shadow directory removed.
#[test]
fn every_way_out_of_the_prompt_leaves_nothing_behind() {
    for way in ["quit", "ctrl-d", "ctrl-c", "sigterm"] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("python3")
            .arg("-c")
            .arg(keepwarm_tests::pty_python(LEAVE))
            .arg(keepwarm_bin())
            .arg(built_library("example-plugin"))
            .arg(dir.path().join("prompt.sock"))
            .arg(way)
            .env("XDG_RUNTIME_DIR", dir.path())
            .env("XDG_STATE_HOME", dir.path())
            .env("TERM", "xterm")
            .output()
            .expect("python3");
        let screen = String::from_utf8_lossy(&out.stdout);
        assert!(screen.contains("EXIT 0"), "{way}: {screen}");
        assert!(!dir.path().join("prompt.sock").exists(), "{way}: socket");
        let left: Vec<_> = std::fs::read_dir(dir.path().join("keepwarm"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with("shadow-"))
            .collect();
        assert!(left.is_empty(), "{way}: left {left:?}");
    }
}
