//! The live line of a long call: after a second, a line on the terminal
//! that says what is running and for how long, with a progress bar once the
//! plugin reports progress (`keepwarm_api::progress`, `host_progress`).
//! Drawn on standard error only when it is a terminal; nothing when piped.

use std::io::IsTerminal;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keepwarm::in_flight::CallInFlight;

/// A call running longer than this gets a live line.
pub const AFTER: Duration = Duration::from_secs(1);
/// How often the line is refreshed.
const EVERY: Duration = Duration::from_millis(200);

/// A tag unique to this call of this process, to find it among the calls
/// in flight.
pub fn new_tag() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The live line; it disappears when dropped (the call returned).
pub struct Live {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Live {
    /// Starts watching the call tagged `tag`, through `find` (a lookup in
    /// the calls in flight), if standard error is a terminal.
    pub fn start(
        tag: String,
        find: impl Fn(&str) -> Option<CallInFlight> + Send + 'static,
    ) -> Live {
        if !std::io::stderr().is_terminal() {
            return Live {
                stop: None,
                thread: None,
            };
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("keepwarm-live".into())
            .spawn(move || {
                let mut wait = AFTER;
                let mut bar: Option<ProgressBar> = None;
                // Until the call returns (a message, or the sender dropped).
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(wait) {
                    wait = EVERY;
                    let Some(call) = find(&tag) else { continue };
                    let bar = bar.get_or_insert_with(|| {
                        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                        bar.set_style(style(false));
                        bar
                    });
                    draw(bar, &call);
                }
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
            })
            .ok();
        Live {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn style(with_bar: bool) -> ProgressStyle {
    let template = if with_bar {
        "{spinner} {msg} [{bar:30}] {pos}/{len} ({percent}%)"
    } else {
        "{spinner} {msg}"
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .progress_chars("=> ")
}

/// The line for `call`: `fib(90) — running 3 s, generation 2`, and the bar.
fn draw(bar: &ProgressBar, call: &CallInFlight) {
    let mut message = format!(
        "{}({}) — running {:.0} s, generation {}",
        call.function, call.args, call.seconds, call.generation
    );
    match call.progress {
        Some((done, total)) if total > 0 => {
            if bar.length() != Some(total) {
                bar.set_style(style(true));
                bar.set_length(total);
            }
            bar.set_position(done.min(total));
        }
        Some((done, _)) => message.push_str(&format!(", {done} done")),
        None => {}
    }
    bar.set_message(message);
    bar.tick();
}
