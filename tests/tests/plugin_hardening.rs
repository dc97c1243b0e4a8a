//! Hardening of the plugin SDK (issue 10), rows 15 and 16 of
//! docs/RELIABILITY.md: the C header survives being included twice, and a
//! plugin that panics in every generation does not grow the host by a
//! symbolized backtrace per generation when `RUST_BACKTRACE=1` is set.

use std::path::{Path, PathBuf};
use std::process::Command;

use keepwarm_tests::{built_library, replace_atomically, root, HostProcess};

/// A C plugin whose one source file includes keepwarm.h twice (once as a
/// local include, once through the include path), as a plugin made of
/// several headers that each include keepwarm.h does. It uses the
/// hand-written helpers of the header's trailer, which must not be defined
/// twice either.
const INCLUDES_TWICE: &str = r#"
#include "keepwarm.h"
#include <keepwarm.h>

KEEPWARM_DEFINE_HOST

static KwStatus twice(KwSlice args, KwOutput *out) {
  KwValue value;
  (void)args;
  if (host_cache_put("twice", "k", 1, "2", 1) != KW_OK ||
      host_cache_get("twice", "k", 1, &value) != KW_OK) {
    out->write(out->ctx, (const uint8_t *)"cache failed", 12);
    return KW_ERROR;
  }
  out->write(out->ctx, value.ptr, value.len);
  host_value_release(&value);
  return KW_OK;
}

static KwStatus on_load(const KwHostApi *host, KwOutput *err) {
  (void)err;
  keepwarm_host = host;
  host_log("included twice, loaded once");
  return KW_OK;
}

static const KwFunction functions[] = { { KW_LIT("twice"), twice } };

static const KwPlugin descriptor = {
  KW_ABI_VERSION, sizeof(KwPlugin), KW_LIT("includes_twice"),
  functions, sizeof functions / sizeof functions[0], NULL, 0, on_load, NULL, NULL,
};

__attribute__((visibility("default"))) const KwPlugin *keepwarm_plugin(void) {
  return &descriptor;
}
"#;

/// Compiles `source` (written to `dir`) as a shared library against
/// `plugin-api/include/keepwarm.h`, with the warnings of the C fixture as
/// errors; returns the library, or the compiler's output.
fn compile_c_plugin(dir: &Path, source: &str) -> Result<PathBuf, String> {
    let c_file = dir.join("plugin.c");
    std::fs::write(&c_file, source).unwrap();
    // keepwarm.h beside the source too, so `#include "keepwarm.h"` finds the
    // same file by another path: the guard, not the path, must stop it.
    std::fs::copy(
        root().join("plugin-api/include/keepwarm.h"),
        dir.join("keepwarm.h"),
    )
    .unwrap();
    let out = dir.join("libincludes_twice.so");
    let output = Command::new(std::env::var_os("CC").unwrap_or_else(|| "cc".into()))
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            "-I",
        ])
        .arg(root().join("plugin-api/include"))
        .arg(&c_file)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("running cc");
    if output.status.success() {
        Ok(out)
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn header_included_twice_compiles_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let library = compile_c_plugin(dir.path(), INCLUDES_TWICE)
        .unwrap_or_else(|cc| panic!("keepwarm.h included twice does not compile:\n{cc}"));
    let host = HostProcess::start(&library, &[]);
    host.wait_for("generation 1 loaded");
    host.wait_for("included twice, loaded once");
    assert_eq!(host.call("twice", &[]), 2);
}

/// The resident set of process `pid`, in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[test]
fn panicking_generations_with_rust_backtrace_do_not_grow_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libplugin.so");
    let (a, b) = (
        built_library("panics_often_a"),
        built_library("panics_often_b"),
    );
    std::fs::copy(&a, &path).unwrap();
    // Most Rust developers' shells export RUST_BACKTRACE=1; the plugin's own
    // std reads it.
    let host = HostProcess::spawn(
        &["run".into(), path.as_os_str().into(), "--no-repl".into()],
        None,
        &[("RUST_BACKTRACE", Path::new("1"))],
    );
    host.wait_for("generation 1 loaded");

    const GENERATIONS: u64 = 50;
    const WARM: u64 = 5;
    let mut rss_warm = 0;
    let mut last_error = String::new();
    for n in 1..=GENERATIONS {
        let version = if n % 2 == 1 { "a" } else { "b" };
        if n > 1 {
            replace_atomically(if n % 2 == 1 { &a } else { &b }, &path);
            host.wait_for(&format!("generation {n} reloaded"));
        }
        assert_eq!(host.call("version", &[]), version);
        let out = host.cli(&["call", "boom"]);
        assert_eq!(out.status, Some(1), "{out:?}");
        assert!(
            out.stderr.contains(&format!(
                "boom panicked: boom: version {version} panics on every call"
            )),
            "{out:?}"
        );
        last_error = out.stderr;
        if n == WARM {
            rss_warm = vm_rss_kib(host.worker_pid());
        }
    }
    let rss_end = vm_rss_kib(host.worker_pid());
    let growth = rss_end.saturating_sub(rss_warm);
    eprintln!(
        "panicking generations with RUST_BACKTRACE=1: RSS {rss_warm} KiB after generation {WARM}, {rss_end} KiB after {GENERATIONS}: +{growth} KiB ({:.1} KiB per generation)",
        growth as f64 / (GENERATIONS - WARM) as f64
    );
    assert!(
        growth < 64 * 1024,
        "the host grew by {growth} KiB over {} panicking generations",
        GENERATIONS - WARM
    );
    // The default hook printed where it panicked; the message says it now.
    assert!(
        last_error.contains("panics_often_common.rs:"),
        "the error names the panic's location: {last_error}"
    );
    // A panic inside a memoized computation crosses the host's
    // get-or-compute inside the plugin; it reports the same way.
    let out = host.cli(&["call", "boom_in_memo", "3"]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("boom_in_memo: version b panics computing 3")
            && out.stderr.contains("panics_often_common.rs:"),
        "{out:?}"
    );

    // Nothing of the default panic hook reached the host's terminal: the
    // panic is the call's error, once, on the caller's side.
    let noise: Vec<String> = host
        .lines()
        .into_iter()
        .filter(|l| l.contains("stack backtrace") || l.contains("panicked at"))
        .collect();
    assert!(
        noise.is_empty(),
        "the plugin printed a panic report: {noise:?}"
    );
}
