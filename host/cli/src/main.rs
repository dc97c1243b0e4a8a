//! `keepwarm-cli`: the `keepwarm` binary — argument parsing, the prompt,
//! `keepwarm dev`, signal handling, and every word the user reads. The
//! behaviour lives in the `keepwarm` runtime library, which prints nothing:
//! this crate renders its events ([`render`]).
//!
//! ```text
//! cargo install --path host/cli
//! keepwarm run target/debug/libexample_plugin.so
//! ```

mod cache_host;
mod cli;
mod client;
mod dev;
mod live;
mod output;
mod render;
mod repl;
mod serve;
mod supervisor;

// The runtime's modules, reachable as `crate::…` from the modules above.
use keepwarm::{cache, control, host, paths, threads, watcher, Config, Host};

use crate::cli::{Cli, Command, ControlCommand, DevArgs, RunArgs, EXIT_NO_HOST, EXIT_USAGE};
use crate::client::ClientError;
use crate::control::protocol::Request;
use crate::dev::BuildSpec;
use crate::serve::Serve;

use clap::Parser;

fn main() {
    let cli = Cli::parse();
    let status = match cli.command {
        Command::Run(args) => exit_status(run(args, cli.socket)),
        Command::Dev(args) => exit_status(dev(args, cli.socket)),
        Command::Serve(args) => exit_status(crate::cache_host::serve(args, cli.socket)),
        Command::Control(command) => control(&command, cli.socket, cli.timeout),
    };
    std::process::exit(status);
}

fn exit_status(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            crate::output::err(&format!("keepwarm: {e:#}"));
            1
        }
    }
}

fn control(command: &ControlCommand, socket: Option<std::path::PathBuf>, timeout: f64) -> i32 {
    let timeout = if timeout == 0.0 {
        None
    } else if timeout.is_finite() && timeout > 0.0 {
        Some(std::time::Duration::from_secs_f64(timeout))
    } else {
        crate::output::err(&format!(
            "keepwarm: --timeout {timeout}: expected a number of seconds, 0 for no limit"
        ));
        return EXIT_USAGE;
    };

    let socket = match socket.map_or_else(crate::client::discover, Ok) {
        Ok(s) => s,
        Err(e) => return client_error(&e),
    };
    let mut request = command.to_request();
    // A long call gets a live line (and a progress bar) on a terminal.
    let live = match &mut request {
        Request::Call { tag, .. } => {
            let mine = crate::live::new_tag();
            *tag = Some(mine.clone());
            let socket = socket.clone();
            Some(crate::live::Live::start(mine, move |mine| {
                let status = Request::Status { v: Some(1) };
                let response = crate::client::request_within(
                    &socket,
                    &status,
                    Some(std::time::Duration::from_secs(1)),
                )
                .ok()?;
                let status = keepwarm::Status::from_json(response.result.as_ref()?).ok()?;
                status
                    .calls_in_flight
                    .into_iter()
                    .find(|c| c.tag.as_deref() == Some(mine))
            }))
        }
        _ => None,
    };
    let answer = crate::client::request_surviving(&socket, &request, timeout);
    drop(live);
    match answer {
        Ok(response) => {
            let rendered = command.render(&response);
            if !rendered.stdout.is_empty() {
                crate::output::out(&rendered.stdout);
            }
            if !rendered.stderr.is_empty() {
                crate::output::err(&rendered.stderr);
            }
            rendered.status
        }
        Err(e) => client_error(&e),
    }
}

fn client_error(e: &ClientError) -> i32 {
    crate::output::err(&format!("keepwarm: {e}"));
    match e {
        ClientError::Ambiguous(_) => EXIT_USAGE,
        ClientError::NoHost(_) | ClientError::Protocol(_) | ClientError::Dropped(_) => EXIT_NO_HOST,
    }
}

fn run(args: RunArgs, socket: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    for library in &args.libraries {
        if let Some(problem) = misspelt(library) {
            anyhow::bail!(problem);
        }
    }
    // The process the user started supervises; the plugins run in a
    // worker, this same program started again (see supervisor.rs).
    let Some(worker) = crate::supervisor::worker_from_env()? else {
        let worker_args = std::env::args_os().skip(1).collect();
        return crate::supervisor::supervise(&args, socket, worker_args);
    };
    let mut libraries = args.libraries.into_iter();
    let first = libraries.next().expect("clap requires one LIB");
    let mut config = Config::new(&first);
    config.cache_bounds = args.caches.into_iter().collect();
    config.then = args.then;
    config.persist = args.persist;
    config.persist_max_bytes = args.persist_max_bytes;
    config.shared = args.shared.config();
    config.events = Some(match &worker.supervised.start_from {
        // A restart: the supervisor's crash line says which generation
        // serves again; its load is not said a second time.
        Some((_, generation)) => {
            let generation = *generation;
            let said = std::sync::atomic::AtomicBool::new(false);
            std::sync::Arc::new(move |event: &keepwarm::Event| {
                if let keepwarm::Event::Loaded { generation: g, .. } = event {
                    if *g == generation && !said.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                }
                crate::output::say(&crate::render::line(event))
            })
        }
        None => crate::output::event_sink(),
    });
    config.supervised = Some(worker.supervised);
    config.journal = worker.journal;
    Serve {
        config,
        more: libraries.collect(),
        socket: worker.socket,
        worker: worker.side,
    }
    .run()
}

fn dev(args: DevArgs, socket: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let dir = std::env::current_dir()?;
    let package = match args.package {
        Some(p) => Some(p),
        None => crate::dev::pick_package(&dir)?,
    };
    let spec = BuildSpec {
        package,
        release: args.release,
        dir,
    };
    crate::output::out("keepwarm dev: building…");
    let built = crate::dev::build(&spec, &|line| crate::output::err(line))?;
    if args.build_only {
        // Rebuild only: the host that serves the library (`keepwarm run`,
        // `make run`) reloads each build; nothing here to shut down.
        let _watcher = crate::dev::watch_and_rebuild(spec, &built, None)?;
        crate::output::out(&format!(
            "keepwarm dev: built {}; watching {} for changes (rebuilding only)",
            built.library.display(),
            built.package_dir.display()
        ));
        loop {
            std::thread::park();
        }
    }
    // The host runs as `keepwarm run` does: a supervisor (this process,
    // which also rebuilds) and a worker that runs the plugin, started as
    // `keepwarm run LIBRARY` with the same caches and store.
    let run_args = RunArgs {
        libraries: vec![built.library.clone()],
        no_repl: args.no_repl,
        caches: args.caches,
        then: None,
        persist: args.persist,
        persist_max_bytes: None,
        shared: args.shared,
    };
    let mut worker_args: Vec<std::ffi::OsString> = vec!["run".into(), built.library.clone().into()];
    for (name, bounds) in &run_args.caches {
        let bytes = bounds
            .max_bytes
            .map(|b| format!(":{b}"))
            .unwrap_or_default();
        worker_args.push("--cache".into());
        worker_args.push(format!("{name}={}{bytes}", bounds.max_entries).into());
    }
    if let Some(dir) = &run_args.persist {
        worker_args.push("--persist".into());
        worker_args.push(dir.clone().into());
    }
    worker_args.extend(run_args.shared.to_args());
    let socket = match socket {
        Some(s) => s,
        None => crate::paths::default_socket(&built.library)?,
    };
    let asked = socket.clone();
    let serving = move || {
        let status = crate::client::request_within(
            &asked,
            &Request::Status { v: Some(1) },
            Some(std::time::Duration::from_secs(1)),
        )
        .ok()?
        .result?;
        keepwarm::Status::from_json(&status)
            .ok()
            .map(|s| s.generation)
    };
    let watcher = crate::dev::watch_and_rebuild(spec, &built, Some(Box::new(serving)))?;
    crate::output::say(&format!(
        "keepwarm dev: watching {} for changes",
        built.package_dir.display()
    ));
    let result = crate::supervisor::supervise(&run_args, Some(socket), worker_args);
    drop(watcher);
    result
}

/// What is wrong with a library path that does not name a file, when a
/// likely intended one exists: `libexample-plugin.so` where cargo wrote
/// `libexample_plugin.so`, or a crate directory instead of its built
/// library. `None` otherwise (a missing file is waited for: `cargo clean`,
/// or a first build still to come).
fn misspelt(library: &std::path::Path) -> Option<String> {
    if library.is_dir() {
        let manifest = std::fs::read_to_string(library.join("Cargo.toml")).ok();
        let name = manifest.as_deref().and_then(|m| {
            m.lines()
                .find_map(|l| l.trim().strip_prefix("name = "))
                .map(|n| n.trim().trim_matches('"').replace('-', "_"))
        });
        let built = name.and_then(|name| {
            let file = format!("lib{name}.so");
            // $CARGO_TARGET_DIR, else the crate's own target directory or
            // a workspace's above it.
            let dir = std::path::absolute(library).ok()?;
            let configured = std::env::var_os("CARGO_TARGET_DIR")
                .and_then(|t| std::path::absolute(std::path::PathBuf::from(t)).ok());
            configured
                .into_iter()
                .chain(dir.ancestors().map(|d| d.join("target")))
                .map(|t| t.join("debug").join(&file))
                .find(|p| p.is_file())
        });
        return Some(match built {
            Some(built) => format!(
                "{} is a directory, not a library; did you mean {}?",
                library.display(),
                built.display()
            ),
            None => format!(
                "{} is a directory, not a library; pass the built library (target/debug/libNAME.so after cargo build)",
                library.display()
            ),
        });
    }
    if library.exists() {
        return None;
    }
    let name = library.file_name()?.to_str()?;
    let fixed = name.replace('-', "_");
    if fixed == name {
        return None;
    }
    let candidate = library.with_file_name(fixed);
    candidate.is_file().then(|| {
        format!(
            "no such file {}; did you mean {}? (cargo turns - into _ in library names)",
            library.display(),
            candidate.display()
        )
    })
}
