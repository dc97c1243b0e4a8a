//! The plugin's panic hook: quiet, and without a backtrace.
//!
//! Every `cdylib` links its own copy of std, with its own panic hook. The
//! default one prints the panic to stderr and, when `RUST_BACKTRACE` is set
//! (as it is in many developers' shells), captures and symbolizes a
//! backtrace. Symbolizing parses the debug info of the host binary and of
//! every library on the stack and keeps it in caches of *this* std, which are
//! never freed: when the generation is unloaded they stay behind, tens of MiB
//! per generation whose code panicked once.
//!
//! So the SDK's `on_load` installs [`quiet_hook`] in the plugin's std (it
//! affects no other library and not the host) and `on_unload` puts the
//! default back. A panic inside an ABI call (the body of
//! [`ffi_boundary`](crate::ffi_boundary)) prints nothing: the hook only notes
//! where it happened, and the boundary sends the message with that location
//! to the host as the call's error, which the user sees once, where they
//! made the call. A panic outside any ABI call (a thread the plugin started)
//! prints one line to stderr, still without a backtrace.
//!
//! The state is two thread-locals of types without destructors: a
//! thread-local destructor would make glibc keep the library mapped for ever.

use std::cell::Cell;
use std::fmt;
use std::io::Write;
use std::panic::PanicHookInfo;

/// Longest file name kept for a location; longer ones keep their end.
const FILE_CAP: usize = 240;

/// Where a panic happened, in a fixed buffer (no allocation, no destructor).
#[derive(Clone, Copy)]
struct Location {
    file: [u8; FILE_CAP],
    file_len: usize,
    line: u32,
    column: u32,
}

impl Location {
    fn of(location: &std::panic::Location<'_>) -> Location {
        let file = location.file();
        let mut start = file.len().saturating_sub(FILE_CAP);
        while !file.is_char_boundary(start) {
            start += 1;
        }
        let tail = &file.as_bytes()[start..];
        let mut buf = [0; FILE_CAP];
        buf[..tail.len()].copy_from_slice(tail);
        Location {
            file: buf,
            file_len: tail.len(),
            line: location.line(),
            column: location.column(),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Cut on a char boundary in `of`, so this is valid UTF-8.
        let file = std::str::from_utf8(&self.file[..self.file_len]).unwrap_or("?");
        write!(f, "{file}:{}:{}", self.line, self.column)
    }
}

thread_local! {
    /// How many ABI calls this thread is inside (they nest: a memoized
    /// computation runs inside the call that missed).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Where the last panic inside an ABI call happened on this thread, until
    /// the boundary takes it.
    static LAST: Cell<Option<Location>> = const { Cell::new(None) };
}

/// Installs [`quiet_hook`] as this library's panic hook. Called by the
/// generated `on_load`; harmless to call again.
pub(crate) fn install() {
    // set_hook panics when called while panicking; on_load never is, but a
    // panic here must not stop the load.
    if !std::thread::panicking() {
        std::panic::set_hook(Box::new(quiet_hook));
    }
}

/// Puts std's default hook back (called by the generated `on_unload`).
pub(crate) fn uninstall() {
    if !std::thread::panicking() {
        drop(std::panic::take_hook());
    }
}

/// The hook: notes the location of a panic inside an ABI call and prints
/// nothing; prints one line, without a backtrace, for any other panic.
pub(crate) fn quiet_hook(info: &PanicHookInfo<'_>) {
    let location = info.location().map(Location::of);
    if DEPTH.get() > 0 {
        LAST.set(location);
        return;
    }
    let message = info.payload_as_str().unwrap_or("a non-string payload");
    let at = location.map(|l| format!(" at {l}")).unwrap_or_default();
    let _ = writeln!(
        std::io::stderr(),
        "keepwarm plugin: a thread outside any call panicked{at}: {message}"
    );
}

/// Marks this thread as inside an ABI call while it lives.
pub(crate) struct InCall(());

impl InCall {
    pub(crate) fn enter() -> InCall {
        DEPTH.set(DEPTH.get() + 1);
        InCall(())
    }
}

impl Drop for InCall {
    fn drop(&mut self) {
        DEPTH.set(DEPTH.get().saturating_sub(1));
    }
}

/// Forgets any location noted earlier on this thread (a panic the plugin
/// caught itself leaves one behind).
pub(crate) fn clear() {
    LAST.set(None);
}

/// The location of the panic being caught on this thread, as ` (at
/// FILE:LINE:COLUMN)`, or "" when the hook did not see it (not installed,
/// or a payload resumed from another thread).
pub(crate) fn take_location() -> String {
    LAST.take()
        .map(|l| format!(" (at {l})"))
        .unwrap_or_default()
}
