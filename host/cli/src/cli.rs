//! The command line: argument definitions shared by the binary and the
//! prompt, the exit statuses, and how answers are shown.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::cache::{Bounds, CacheStats};
use crate::control::protocol::{ErrorCode, Request, Response};
use crate::host::Status;
use crate::render::entries;

/// Exit status: success.
pub const EXIT_OK: i32 = 0;
/// Exit status: the operation failed (plugin error or panic, unknown cache or function).
pub const EXIT_FAILED: i32 = 1;
/// Exit status: usage error.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: no host reachable at the socket.
pub const EXIT_NO_HOST: i32 = 3;

/// keepwarm: a hot-reload host for dynamic libraries whose caches survive every reload.
#[derive(Debug, Parser)]
#[command(name = "keepwarm", version, propagate_version = true)]
#[command(
    after_help = "Start a host:   keepwarm run target/debug/libexample_plugin.so\n\
From another terminal:  keepwarm call square 10 · keepwarm reset square · keepwarm stats"
)]
pub struct Cli {
    /// The control socket of the host to talk to [default: the one running host's socket]
    #[arg(long, global = true, env = "KEEPWARM_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Seconds a command waits for the host's answer (0: no limit)
    #[arg(
        long,
        global = true,
        env = "KEEPWARM_TIMEOUT",
        value_name = "SECS",
        default_value_t = 60.0
    )]
    pub timeout: f64,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load LIB, reload it whenever it changes, and serve the control socket
    #[command(
        after_help = "Example:\n  keepwarm run target/debug/libexample_plugin.so --cache square=1000:1048576"
    )]
    Run(RunArgs),
    /// Build the plugin crate, serve it, and rebuild it on every source change
    #[command(
        after_help = "Example (in the plugin crate's directory, or a workspace with -p):\n  keepwarm dev -p example-plugin"
    )]
    Dev(DevArgs),
    /// Serve caches with no plugin, for clients such as the Python package (`call` answers "no plugin loaded")
    #[command(
        after_help = "Example:\n  keepwarm serve &          # socket: serve.sock in the runtime directory\n  keepwarm serve --persist ~/.cache/keepwarm --cache square=1000"
    )]
    Serve(ServeArgs),
    /// Commands for a running host.
    #[command(flatten)]
    Control(ControlCommand),
}

/// Arguments of `keepwarm dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// The plugin package to build (default: the package in this directory)
    #[arg(short = 'p', long = "package", value_name = "PACKAGE")]
    pub package: Option<String>,
    /// Build with --release
    #[arg(long)]
    pub release: bool,
    /// Do not read commands from the terminal
    #[arg(long)]
    pub no_repl: bool,
    /// Only rebuild on source changes; serve nothing (a `keepwarm run` on the
    /// built library reloads each build)
    #[arg(long, conflicts_with = "no_repl")]
    pub build_only: bool,
    /// Bound a cache, as for `run`
    #[arg(long = "cache", value_name = "NAME=ENTRIES[:BYTES]", value_parser = parse_cache_bound)]
    pub caches: Vec<(String, Bounds)>,
    /// Keep the caches in an embedded store in DIR (as `run --persist`)
    #[arg(
        long,
        value_name = "DIR",
        env = "KEEPWARM_PERSIST",
        conflicts_with = "build_only"
    )]
    pub persist: Option<PathBuf>,
    #[command(flatten)]
    pub shared: SharedArgs,
}

/// The shared tier's arguments, the same on `run`, `serve` and `dev`.
#[derive(Debug, Args, Clone, Default)]
pub struct SharedArgs {
    /// Share entries with other hosts through a Redis or Valkey server, behind the local caches: hosts running the same code share, other builds never see them; with the server down every call still answers
    #[arg(long, value_name = "URL", env = "KEEPWARM_SHARED", value_parser = parse_shared_url)]
    pub shared: Option<String>,
    /// The namespace of the shared keys (hosts share only within one)
    #[arg(
        long,
        value_name = "NAME",
        env = "KEEPWARM_SHARED_PREFIX",
        default_value = keepwarm::shared::DEFAULT_PREFIX,
        value_parser = parse_prefix
    )]
    pub shared_prefix: String,
    /// Milliseconds a shared read may take; past it the call computes
    #[arg(
        long,
        value_name = "MS",
        env = "KEEPWARM_SHARED_TIMEOUT_MS",
        default_value_t = 50,
        value_parser = clap::value_parser!(u64).range(1..=60_000)
    )]
    pub shared_timeout: u64,
}

impl SharedArgs {
    /// The runtime's configuration, with `--shared`.
    pub fn config(&self) -> Option<keepwarm::shared::SharedConfig> {
        let url = self.shared.as_ref()?;
        Some(keepwarm::shared::SharedConfig {
            url: url.clone(),
            prefix: self.shared_prefix.clone(),
            timeout: std::time::Duration::from_millis(self.shared_timeout),
        })
    }

    /// The same arguments for a worker's command line.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        match &self.shared {
            None => Vec::new(),
            Some(url) => vec![
                "--shared".into(),
                url.into(),
                "--shared-prefix".into(),
                self.shared_prefix.clone().into(),
                "--shared-timeout".into(),
                self.shared_timeout.to_string().into(),
            ],
        }
    }
}

/// `--shared URL`: a URL the Redis client understands.
fn parse_shared_url(s: &str) -> Result<String, String> {
    keepwarm::shared::SharedConfig::new(s).map(|c| c.url)
}

/// `--shared-prefix NAME`: not empty.
fn parse_prefix(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err(
            "the shared namespace is empty; give a name such as `keepwarm` or `team-a`".into(),
        );
    }
    Ok(s.to_owned())
}

/// Arguments of `keepwarm serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Bound a cache, as for `run`
    #[arg(long = "cache", value_name = "NAME=ENTRIES[:BYTES]", value_parser = parse_cache_bound)]
    pub caches: Vec<(String, Bounds)>,
    /// Keep the caches in an embedded store in DIR (as `run --persist`)
    #[arg(long, value_name = "DIR", env = "KEEPWARM_PERSIST")]
    pub persist: Option<PathBuf>,
    /// Bound the store of --persist to BYTES (as for `run`)
    #[arg(long, value_name = "BYTES", requires = "persist", value_parser = parse_bytes)]
    pub persist_max_bytes: Option<u64>,
    #[command(flatten)]
    pub shared: SharedArgs,
}

/// Arguments of `keepwarm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The plugin libraries (.so) to load and watch; they share the caches
    #[arg(value_name = "LIB", required = true, num_args = 1..)]
    pub libraries: Vec<PathBuf>,
    /// Do not read commands from the terminal
    #[arg(long)]
    pub no_repl: bool,
    /// Bound a cache: at most ENTRIES entries and, optionally, BYTES bytes of keys plus values
    #[arg(long = "cache", value_name = "NAME=ENTRIES[:BYTES]", value_parser = parse_cache_bound)]
    pub caches: Vec<(String, Bounds)>,
    /// Call FN (no arguments) after every successful load and print its result
    #[arg(long, value_name = "FN")]
    pub then: Option<String>,
    /// Keep the caches in an embedded store in DIR: a host started again on DIR is warm at once
    #[arg(long, value_name = "DIR", env = "KEEPWARM_PERSIST")]
    pub persist: Option<PathBuf>,
    /// Bound the store of --persist to BYTES of keys plus values; the oldest entries go first [default: a quarter of the free space of DIR's file system]
    #[arg(long, value_name = "BYTES", requires = "persist", value_parser = parse_bytes)]
    pub persist_max_bytes: Option<u64>,
    #[command(flatten)]
    pub shared: SharedArgs,
}

/// A byte count: `1048576`, `512K`, `64M`, `2G` (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.trim().char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.trim().split_at(i),
        None => (s.trim(), ""),
    };
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "{s:?} is not a byte count (like 1048576, 512K, 64M, 2G)"
            ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (like 1048576, 512K, 64M, 2G)"))?;
    n.checked_mul(1 << shift)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("{s:?} is out of range"))
}

fn parse_cache_bound(s: &str) -> Result<(String, Bounds), String> {
    let (name, bounds) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=ENTRIES[:BYTES], got {s:?}"))?;
    if name.is_empty() {
        return Err("the cache name is empty".into());
    }
    Ok((name.to_owned(), bounds.parse()?))
}

/// Commands that talk to a running host (also typed at the prompt of `run`).
#[derive(Debug, Subcommand)]
pub enum ControlCommand {
    /// Call an exported plugin function and print its result as JSON
    #[command(
        after_help = "Each ARG that parses as JSON is that value, otherwise a string. Options \
(--socket, --timeout) may come anywhere; after `--` every word is an argument, even one that \
starts with a dash.\n\
Example:\n  keepwarm call square 10      # prints 100\n  keepwarm call version        # prints \"v1\"\n  keepwarm call greet -- --loud"
    )]
    Call {
        /// The function's name
        function: String,
        /// Its arguments (negative numbers are arguments; put `--` before others that start with `-`)
        #[arg(allow_negative_numbers = true)]
        args: Vec<String>,
    },
    /// Drop the entries of one named cache, or of all
    #[command(
        after_help = "Example:\n  keepwarm reset square\n  keepwarm reset --all\n  keepwarm reset square --shared   # the shared tier's entries of this build too",
        override_usage = "keepwarm reset <CACHE> [--shared]\n       keepwarm reset --all [--shared]"
    )]
    Reset {
        /// The cache (or --all for every cache)
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        cache: Option<String>,
        /// Reset every cache
        #[arg(long)]
        all: bool,
        /// Drop the shared tier's entries of the current build too (without it, a reset is local)
        #[arg(long)]
        shared: bool,
    },
    /// Per-cache figures
    #[command(after_help = "Example:\n  keepwarm stats\n  keepwarm stats square --json")]
    Stats {
        /// Only this cache
        cache: Option<String>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// What is loaded
    #[command(after_help = "Example:\n  keepwarm status --json")]
    Status {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Reload the library now, without waiting for a file change
    #[command(after_help = "Example:\n  keepwarm reload")]
    Reload,
}

/// `call` arguments: JSON when it parses as JSON, else a string.
pub fn parse_call_arg(arg: &str) -> serde_json::Value {
    serde_json::from_str(arg).unwrap_or_else(|_| serde_json::Value::String(arg.to_owned()))
}

impl ControlCommand {
    /// The protocol request for this command.
    pub fn to_request(&self) -> Request {
        match self {
            ControlCommand::Call { function, args } => Request::Call {
                v: Some(crate::control::protocol::PROTOCOL_VERSION),
                function: function.clone(),
                args: args.iter().map(|a| parse_call_arg(a)).collect(),
                tag: None,
            },
            ControlCommand::Reset { cache, all, shared } => Request::Reset {
                v: Some(1),
                cache: cache.clone(),
                all: *all,
                shared: *shared,
            },
            ControlCommand::Stats { cache, .. } => Request::Stats {
                v: Some(1),
                cache: cache.clone(),
            },
            ControlCommand::Status { .. } => Request::Status { v: Some(1) },
            ControlCommand::Reload => Request::Reload { v: Some(1) },
        }
    }

    /// Renders `response`: what to print on stdout, on stderr, and the exit status.
    pub fn render(&self, response: &Response) -> Rendered {
        if let Some(error) = &response.error {
            let status = match error.code {
                ErrorCode::BadRequest | ErrorCode::UnsupportedVersion => EXIT_USAGE,
                _ => EXIT_FAILED,
            };
            let mut stderr = format!("keepwarm: {}", error.message);
            if error.code == ErrorCode::Busy && !error.message.contains("try again") {
                stderr.push_str(" (busy: try again)");
            }
            return Rendered {
                stdout: String::new(),
                stderr,
                status,
            };
        }
        let result = response.result.clone().unwrap_or(serde_json::Value::Null);
        let stdout = match self {
            ControlCommand::Call { .. } => result.to_string(),
            ControlCommand::Stats { json: true, .. } | ControlCommand::Status { json: true } => {
                serde_json::to_string_pretty(&result).unwrap_or_default()
            }
            ControlCommand::Stats { json: false, .. } => {
                match serde_json::from_value::<Vec<CacheStats>>(result.clone()) {
                    Ok(stats) => stats_table(&stats),
                    Err(_) => result.to_string(),
                }
            }
            ControlCommand::Status { json: false } => {
                match serde_json::from_value::<Status>(result.clone()) {
                    Ok(status) => status_text(&status),
                    Err(_) => result.to_string(),
                }
            }
            ControlCommand::Reset { .. } => {
                let dropped = result.get("dropped").and_then(|d| d.as_u64()).unwrap_or(0);
                let mut line = match result.get("cache").and_then(|c| c.as_str()) {
                    Some(name) => format!("reset {name}: {} dropped", entries(dropped)),
                    None => format!("reset all caches: {} dropped", entries(dropped)),
                };
                if let Some(n) = result.get("shared_dropped").and_then(|d| d.as_u64()) {
                    line.push_str(&format!(
                        ", and {} of this build from the shared tier",
                        entries(n)
                    ));
                } else if result.get("shared_kept").is_some() {
                    line.push_str(" (local only: the shared tier keeps this build's entries, and a local miss finds them again; add --shared to drop them too)");
                }
                if let Some(e) = result.get("shared_error").and_then(|e| e.as_str()) {
                    return Rendered {
                        stdout: line,
                        stderr: format!("keepwarm: the shared entries were not dropped: {e}"),
                        status: EXIT_FAILED,
                    };
                }
                line
            }
            ControlCommand::Reload => match result.get("generation") {
                Some(g) => format!("generation {g} loaded"),
                None => "unchanged".to_owned(),
            },
        };
        Rendered {
            stdout,
            stderr: response
                .warning
                .as_ref()
                .map(|w| format!("keepwarm: {w}"))
                .unwrap_or_default(),
            status: EXIT_OK,
        }
    }
}

/// A command's output and exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// For standard output.
    pub stdout: String,
    /// For standard error.
    pub stderr: String,
    /// The exit status.
    pub status: i32,
}

/// An aligned table of cache figures.
pub fn stats_table(stats: &[CacheStats]) -> String {
    let header = [
        "cache",
        "entries",
        "bytes",
        "capacity",
        "max_bytes",
        "hits",
        "misses",
        "inserts",
        "evictions",
        "resets",
        "saved",
    ];
    let rows: Vec<[String; 11]> = stats
        .iter()
        .map(|s| {
            [
                s.name.clone(),
                s.entries.to_string(),
                s.bytes.to_string(),
                s.capacity.to_string(),
                s.max_bytes.map_or("-".to_owned(), |b| b.to_string()),
                s.hits.to_string(),
                s.misses.to_string(),
                s.inserts.to_string(),
                s.evictions.to_string(),
                s.resets.to_string(),
                human_duration(s.saved_ns),
            ]
        })
        .collect();
    // Widths in characters, as `format!` pads ("µs" is two bytes).
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = vec![line(header.to_vec())];
    for row in &rows {
        out.push(line(row.iter().map(String::as_str).collect()));
    }
    // The shared tier's figures, for the caches that used it.
    for s in stats.iter().filter(|s| {
        s.shared_hits + s.shared_misses + s.shared_errors + s.shared_writes + s.shared_queue_drops
            > 0
    }) {
        out.push(format!(
            "{}: shared tier {} hits, {} misses, {} written, {} errors ({} refused), {} dropped from a full queue",
            s.name, s.shared_hits, s.shared_misses, s.shared_writes, s.shared_errors, s.shared_refused, s.shared_queue_drops
        ));
    }
    if rows.is_empty() {
        out.push("(no caches yet)".to_owned());
    } else if rows.len() > 1 {
        // The sum of the column; one cache's row already says it.
        let saved: u64 = stats.iter().map(|s| s.saved_ns).sum();
        let compute: u64 = stats.iter().map(|s| s.compute_ns).sum();
        out.push(format!(
            "saved {} in total (each hit: the time its entry took to compute); misses computed for {}",
            human_duration(saved),
            human_duration(compute)
        ));
    }
    out.join("\n")
}

/// A duration in the unit a person reads at a glance: `0 s`, `840 µs`,
/// `12.3 ms`, `4.2 s`, `3 min 20 s`, `2 h 5 min`.
pub fn human_duration(ns: u64) -> String {
    let s = ns as f64 / 1e9;
    match ns {
        0 => "0 s".to_owned(),
        1..=999 => format!("{ns} ns"),
        1_000..=999_999 => format!("{:.0} µs", ns as f64 / 1e3),
        1_000_000..=9_999_999 => format!("{:.1} ms", ns as f64 / 1e6),
        10_000_000..=999_999_999 => format!("{:.0} ms", ns as f64 / 1e6),
        1_000_000_000..=59_999_999_999 => format!("{s:.1} s"),
        60_000_000_000..=3_599_999_999_999 => {
            format!("{} min {} s", (s / 60.0) as u64, (s % 60.0) as u64)
        }
        _ => format!(
            "{} h {} min",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        ),
    }
}

/// The human form of `status`.
pub fn status_text(s: &Status) -> String {
    // One plugin's lines: its library, what is loaded.
    let plugin = |lines: &mut Vec<String>,
                  library: &str,
                  name: &Option<String>,
                  generation: u64,
                  ms: Option<f64>| {
        lines.push(format!("library:        {library}"));
        lines.push(match name {
            Some(name) => format!(
                "plugin:         {name}, generation {generation} (loaded in {:.1} ms)",
                ms.unwrap_or(0.0)
            ),
            None => "plugin:         nothing loaded".to_owned(),
        });
    };
    let mut lines = Vec::new();
    if s.plugins.is_empty() {
        lines.push("library:        none (keepwarm serve: caches only)".to_owned());
    } else {
        plugin(&mut lines, &s.library, &s.plugin, s.generation, s.load_ms);
    }
    for p in s.plugins.iter().skip(1) {
        plugin(&mut lines, &p.library, &p.plugin, p.generation, p.load_ms);
        if let Some(w) = &p.waiting {
            lines.push(format!("watching:       {w}"));
        }
    }
    lines.push(format!("functions:      {}", s.functions.join(", ")));
    lines.push(format!("caches:         {}", s.caches.join(", ")));
    if let Some(w) = &s.waiting {
        lines.push(format!("watching:       {w}"));
    }
    lines.push(format!("failed reloads: {}", s.failed_reloads));
    lines.push(format!(
        "last error:     {}",
        s.last_error.as_deref().unwrap_or("-")
    ));
    if s.worker_pid != s.pid {
        lines.push(format!(
            "pid:            {} (supervisor; plugin code runs in worker {})",
            s.pid, s.worker_pid
        ));
    } else {
        lines.push(format!("pid:            {}", s.pid));
    }
    if let Some(crash) = &s.last_crash {
        let ago = keepwarm::persist::now_ms() as f64 / 1000.0 - crash.time;
        lines.push(format!(
            "restarts:       {} (last: {}, {} ago)",
            s.restarts,
            crash.what(),
            human_duration((ago.max(0.0) * 1e9) as u64)
        ));
    }
    for bad in &s.bad_builds {
        lines.push(format!(
            "bad build:      {:08x} (generation {}: {}) is not loaded again until the file changes",
            bad.hash, bad.generation, bad.why
        ));
    }
    if let Some(shared) = &s.shared {
        lines.push(format!(
            "shared tier:    {} ({}, namespace {}){}",
            shared.url,
            shared.state,
            shared.prefix,
            shared
                .last_error
                .as_ref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        ));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_args_are_json_or_strings() {
        assert_eq!(parse_call_arg("10"), serde_json::json!(10));
        assert_eq!(parse_call_arg("[1,2]"), serde_json::json!([1, 2]));
        assert_eq!(parse_call_arg("hello"), serde_json::json!("hello"));
        assert_eq!(parse_call_arg("\"10\""), serde_json::json!("10"));
    }

    #[test]
    fn byte_counts_parse_with_units() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("512K"), Ok(512 << 10));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        for bad in ["", "0", "12X", "-1", "M"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_read_at_a_glance() {
        let cases = [
            (0, "0 s"),
            (750, "750 ns"),
            (840_000, "840 µs"),
            (1_234_000, "1.2 ms"),
            (12_300_000, "12 ms"),
            (4_200_000_000, "4.2 s"),
            (200_000_000_000, "3 min 20 s"),
            (7_500_000_000_000, "2 h 5 min"),
        ];
        for (ns, text) in cases {
            assert_eq!(human_duration(ns), text, "{ns} ns");
        }
    }

    #[test]
    fn cache_bounds_parse() {
        let (name, b) = parse_cache_bound("square=10:100").unwrap();
        assert_eq!(
            (name.as_str(), b.max_entries.get(), b.max_bytes),
            ("square", 10, Some(100))
        );
        assert!(parse_cache_bound("square").is_err());
        assert!(parse_cache_bound("=1").is_err());
    }

    #[test]
    fn the_cli_parses_the_contract() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["keepwarm", "call", "square", "10"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Control(ControlCommand::Call { .. })
        ));
        assert!(Cli::try_parse_from(["keepwarm", "reset"]).is_err());
        assert!(Cli::try_parse_from(["keepwarm", "reset", "--all"]).is_ok());
        assert!(Cli::try_parse_from(["keepwarm", "reset", "x", "--all"]).is_err());
        let cli = Cli::try_parse_from(["keepwarm", "serve", "--cache", "square=10"]).unwrap();
        assert!(
            matches!(cli.command, Command::Serve(ServeArgs { ref caches, .. }) if caches.len() == 1)
        );
    }
}
