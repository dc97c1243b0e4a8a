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
