//! The one path every line the host prints takes. Output failures never
//! stop the host: a closed pipe (`keepwarm run LIB | head`, a log viewer
//! that quit) or a full disk behind a redirection makes `println!` panic,
//! which would kill the watcher or a connection thread. These write what
//! they can, ignore what they cannot, and keep serving.

use std::io::Write;

/// Writes `line` and a newline to standard output; errors are ignored.
pub fn out(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Writes `line` and a newline to standard error; errors are ignored.
pub fn err(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Where the lines of the running host go: standard output, or the prompt,
/// which prints them above its input line.
pub type Printer = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

static PRINTER: parking_lot::RwLock<Option<Printer>> = parking_lot::RwLock::new(None);

/// Prints one line of the running host (through the prompt when it runs).
pub fn say(line: &str) {
    let printer = PRINTER.read().clone();
    match printer {
        Some(p) => p(line),
        None => out(line),
    }
}

/// Routes [`say`] through `printer` from now on (`None`: standard output).
pub fn set_printer(printer: Option<Printer>) {
    *PRINTER.write() = printer;
}

/// The event sink of the binary's hosts: each event as its line.
pub fn event_sink() -> keepwarm::EventSink {
    std::sync::Arc::new(|event| say(&crate::render::line(event)))
}
