//! The long-running part shared by `keepwarm run` and `keepwarm dev`: bind
//! the control socket, load and watch the library, serve, and read the
//! prompt (or wait) until the user leaves.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::control::server::Server;
use crate::{paths, watcher, Config, Host};

/// How a host is served.
pub struct Serve {
    /// The host's configuration (library, cache bounds, printer).
    pub config: Config,
    /// The control socket; the library's default socket when `None`.
    pub socket: Option<PathBuf>,
    /// Never read commands from the terminal.
    pub no_repl: bool,
}

impl Serve {
    /// Serves until `quit`, end of input, SIGINT or SIGTERM (or forever
    /// without a terminal). `started` runs once the host is up, with it.
    pub fn run(self, started: impl FnOnce(&Arc<Host>) -> anyhow::Result<()>) -> anyhow::Result<()> {
        let socket = match self.socket {
            Some(s) => s,
            None => paths::default_socket(&self.config.library)?,
        };
        // Bind first: a second host on the same socket stops here, before
        // loading anything.
        let server = Server::bind(&socket)?;
        let host = Host::new(self.config)?;
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
        started(&host)?;
        if !self.no_repl && std::io::stdin().is_terminal() {
            crate::repl::run(Arc::clone(&host))?;
            drop(guard.lock().take());
            Ok(())
        } else {
            loop {
                std::thread::park();
            }
        }
    }
}
