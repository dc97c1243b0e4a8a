//! The `keepwarm` binary: argument parsing and wiring; the behaviour lives in
//! the `keepwarm` library.

use keepwarm::cli::{Cli, Command, ControlCommand, DevArgs, RunArgs, EXIT_NO_HOST, EXIT_USAGE};
use keepwarm::control::client::{self, ClientError};
use keepwarm::dev::{self, BuildSpec};
use keepwarm::serve::Serve;
use keepwarm::Config;

use clap::Parser;

fn main() {
    let cli = Cli::parse();
    let status = match cli.command {
        Command::Run(args) => exit_status(run(args, cli.socket)),
        Command::Dev(args) => exit_status(dev(args, cli.socket)),
        Command::Control(command) => control(&command, cli.socket, cli.timeout),
    };
    std::process::exit(status);
}

fn exit_status(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            keepwarm::output::err(&format!("keepwarm: {e:#}"));
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
        keepwarm::output::err(&format!(
            "keepwarm: --timeout {timeout}: expected a number of seconds, 0 for no limit"
        ));
        return EXIT_USAGE;
    };

    let socket = match socket.map_or_else(client::discover, Ok) {
        Ok(s) => s,
        Err(e) => return client_error(&e),
    };
    match client::request_within(&socket, &command.to_request(), timeout) {
        Ok(response) => {
            let rendered = command.render(&response);
            if !rendered.stdout.is_empty() {
                keepwarm::output::out(&rendered.stdout);
            }
            if !rendered.stderr.is_empty() {
                keepwarm::output::err(&rendered.stderr);
            }
            rendered.status
        }
        Err(e) => client_error(&e),
    }
}

fn client_error(e: &ClientError) -> i32 {
    keepwarm::output::err(&format!("keepwarm: {e}"));
    match e {
        ClientError::Ambiguous(_) => EXIT_USAGE,
        ClientError::NoHost(_) | ClientError::Protocol(_) => EXIT_NO_HOST,
    }
}

fn run(args: RunArgs, socket: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let mut config = Config::new(&args.library);
    config.cache_bounds = args.caches.into_iter().collect();
    config.then = args.then;
    Serve {
        config,
        socket,
        no_repl: args.no_repl,
    }
    .run(|_| Ok(()))
}

fn dev(args: DevArgs, socket: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let spec = BuildSpec {
        package: args.package,
        release: args.release,
        dir: std::env::current_dir()?,
    };
    keepwarm::output::out("keepwarm dev: building…");
    let built = dev::build(&spec, &|line| keepwarm::output::err(line))?;
    let mut config = Config::new(&built.library);
    config.cache_bounds = args.caches.into_iter().collect();
    Serve {
        config,
        socket,
        no_repl: args.no_repl,
    }
    .run(|host| {
        let watcher = dev::watch_and_rebuild(spec, &built, std::sync::Arc::clone(host))?;
        host.print(&format!(
            "keepwarm dev: watching {} for changes",
            built.package_dir.display()
        ));
        // The watch lives as long as the process.
        std::mem::forget(watcher);
        Ok(())
    })
}
