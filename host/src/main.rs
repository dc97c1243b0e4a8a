//! The `keepwarm` binary: argument parsing and wiring; the behaviour lives in
//! the `keepwarm` library.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use keepwarm::cli::{Cli, Command, ControlCommand, RunArgs, EXIT_NO_HOST, EXIT_USAGE};
use keepwarm::control::client::{self, ClientError};
use keepwarm::control::server::Server;
use keepwarm::{paths, watcher, Config, Host};

fn main() {
    let cli = Cli::parse();
    let status = match cli.command {
        Command::Run(args) => match run(args, cli.socket) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("keepwarm: {e:#}");
                1
            }
        },
        Command::Control(command) => control(&command, cli.socket),
    };
    std::process::exit(status);
}

fn control(command: &ControlCommand, socket: Option<std::path::PathBuf>) -> i32 {
    let socket = match socket.map_or_else(client::discover, Ok) {
        Ok(s) => s,
        Err(e) => return client_error(&e),
    };
    match client::request(&socket, &command.to_request()) {
        Ok(response) => {
            let rendered = command.render(&response);
            if !rendered.stdout.is_empty() {
                println!("{}", rendered.stdout);
            }
            if !rendered.stderr.is_empty() {
                eprintln!("{}", rendered.stderr);
            }
            rendered.status
        }
        Err(e) => client_error(&e),
    }
}

fn client_error(e: &ClientError) -> i32 {
    eprintln!("keepwarm: {e}");
    match e {
        ClientError::Ambiguous(_) => EXIT_USAGE,
        ClientError::NoHost(_) | ClientError::Protocol(_) => EXIT_NO_HOST,
    }
}

fn run(args: RunArgs, socket: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let mut config = Config::new(&args.library);
    config.cache_bounds = args.caches.into_iter().collect();
    let socket = match socket {
        Some(s) => s,
        None => paths::default_socket(&args.library)?,
    };
    // Bind first: a second host on the same socket stops here, before loading.
    let server = Server::bind(&socket)?;
    let host = Host::new(config)?;
    host.print(&format!(
        "keepwarm: serving {} · control socket {}",
        host.library().display(),
        server.path().display()
    ));
    watcher::load_initial(&host);
    let _watch = watcher::watch(Arc::clone(&host)).context("watching the library")?;
    let guard = server.spawn(Arc::clone(&host))?;
    let guard = Arc::new(parking_lot::Mutex::new(Some(guard)));
    {
        let guard = Arc::clone(&guard);
        ctrlc::set_handler(move || {
            // Remove the socket file, then leave.
            drop(guard.lock().take());
            std::process::exit(130);
        })
        .context("installing the Ctrl-C handler")?;
    }
    if !args.no_repl && std::io::stdin().is_terminal() {
        keepwarm::repl::run(Arc::clone(&host))?;
        drop(guard.lock().take());
        Ok(())
    } else {
        loop {
            std::thread::park();
        }
    }
}
