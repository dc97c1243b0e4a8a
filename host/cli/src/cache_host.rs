//! `keepwarm serve`: a host of caches with no plugin, for clients that
//! compute their own values (the Python package). It binds the control
//! socket (by default `serve.sock` in the runtime directory), writes the
//! epoch page its clients map, and serves until `quit`, SIGINT, SIGTERM or
//! SIGHUP — then removes the socket and the page and exits 0, as `run`
//! does. No plugin code runs in it, so it needs no supervisor.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::Context;

use crate::cli::ServeArgs;
use crate::control::server::Server;
use crate::serve::{owns_terminal, Exit, TerminalState, SHUTDOWN_GRACE};
use crate::{paths, Config, Host};

/// Serves caches until the user leaves.
pub fn serve(args: ServeArgs, socket: Option<PathBuf>) -> anyhow::Result<()> {
    crate::threads::register_current();
    let socket = match socket {
        Some(s) => s,
        None => paths::serve_socket()?,
    };
    let (exit_tx, exit_rx) = mpsc::channel::<Exit>();
    let signal_handle = {
        let exit_tx = exit_tx.clone();
        crate::serve::exit_signals(move |e| {
            let _ = exit_tx.send(e);
        })?
    };
    // Bind first: a second host on the same socket stops here, before it
    // touches the first one's epoch page.
    let server = Server::bind(&socket)?;
    let config = Config {
        cache_bounds: args.caches.into_iter().collect(),
        persist: args.persist,
        persist_max_bytes: args.persist_max_bytes,
        shared: args.shared.config(),
        events: Some(crate::output::event_sink()),
        ..Config::default()
    };
    let host = Host::without_plugin(config)?;
    let page_path = keepwarm::epochs::page_path(&paths::runtime_dir()?, server.path())?;
    let page = Arc::new(keepwarm::epochs::EpochPage::create(&page_path)?);
    host.attach_epoch_page(Arc::clone(&page));
    crate::output::say(&format!(
        "keepwarm: serving caches (no plugin) · control socket {}",
        server.path().display()
    ));
    let guard = server.spawn(Arc::clone(&host))?;
    let terminal = TerminalState::save();
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        if owns_terminal() {
            let backend: Arc<dyn crate::repl::Backend> =
                Arc::new(crate::repl::Local(Arc::clone(&host)));
            let exit_tx = exit_tx.clone();
            crate::repl::spawn(backend, move || {
                let _ = exit_tx.send(Exit::Quit);
            })
            .context("spawning the prompt")?;
        } else {
            crate::output::say(
                "keepwarm: running in the background, so no prompt; use `keepwarm stats` or `keepwarm reset CACHE` from any terminal; stop it with `kill %1`",
            );
        }
    }
    drop(exit_tx);
    let reason = exit_rx.recv().unwrap_or(Exit::Quit);
    terminal.restore();
    drop(guard);
    host.shutdown(SHUTDOWN_GRACE);
    page.close();
    signal_handle.close();
    if let Exit::Signal(_) = reason {
        crate::output::say("keepwarm: stopped by a signal; shut down cleanly");
    }
    Ok(())
}
