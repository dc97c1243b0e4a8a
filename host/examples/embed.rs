//! Embedding keepwarm in an application: load a plugin, call it with typed
//! arguments and results in a loop, print each event the host reports (a
//! rebuild of the plugin shows up as a reload), and shut down clean.
//!
//! ```text
//! cargo build -p example-plugin
//! cargo run -p keepwarm --example embed -- target/debug/libexample_plugin.so
//! # in another shell: edit example-plugin/src/lib.rs, cargo build -p example-plugin
//! ```
//!
//! With a second argument N the program ends after N reloads (CI runs it so).

use std::sync::{mpsc, Arc};
use std::time::Duration;

use keepwarm::{Config, Event, Host};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let library = args
        .next()
        .unwrap_or_else(|| "target/debug/libexample_plugin.so".to_owned());
    let reloads: Option<u64> = args.next().map(|n| n.parse()).transpose()?;

    // The host reports through this sink; the loop below prints what came.
    let (events_tx, events) = mpsc::channel::<Event>();
    let config = Config::new(&library).on_event(move |event| {
        let _ = events_tx.send(event.clone());
    });
    let host = Host::new(config)?;
    // Watch first, then load: no build that lands in between is missed.
    let watch = keepwarm::watcher::watch(Arc::clone(&host))?;
    host.reload(false)?;

    let mut seen = 0;
    for i in 0u64.. {
        for event in events.try_iter() {
            println!("event: {event:?}");
            if matches!(event, Event::Loaded { generation, .. } if generation > 1) {
                seen += 1;
            }
        }
        if reloads.is_some_and(|n| seen >= n) {
            break;
        }
        // Typed calls: arguments and result through serde.
        let version: String = host.call("version", &())?;
        if host.status().functions.iter().any(|f| f == "square") {
            let square: u64 = host.call("square", &i)?;
            println!("version() = {version}, square({i}) = {square}");
        } else {
            println!("version() = {version}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // A clean end: stop watching, let calls drain, unload, remove files.
    drop(watch);
    host.shutdown(Duration::from_secs(5));
    println!("shut down");
    Ok(())
}
