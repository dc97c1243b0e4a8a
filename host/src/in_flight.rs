//! The calls running now, for `status` (`calls_in_flight`), the prompt's
//! live line and `keepwarm call`'s progress bar.
//!
//! Each call through [`crate::Host`] registers itself for its duration; the
//! thread running it carries it in a thread-local, so the plugin's
//! `progress(done, total)` (the host table's `progress`) reaches the right
//! call without a lookup.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde_json::json;

/// Arguments are shown cut to this many characters.
pub const ARGS_SHOWN: usize = 80;

/// One running call as `status --json` lists it in `calls_in_flight`.
#[derive(Debug, Clone, PartialEq)]
pub struct CallInFlight {
    /// The function, as the call named it.
    pub function: String,
    /// Its JSON arguments, cut to [`ARGS_SHOWN`] characters (an ellipsis
    /// marks a cut).
    pub args: String,
    /// Seconds since the call started.
    pub seconds: f64,
    /// The generation answering it.
    pub generation: u64,
    /// The last `progress(done, total)` the plugin reported, if any
    /// (`total` 0: unknown).
    pub progress: Option<(u64, u64)>,
    /// The tag its client gave the call (see `docs/PROTOCOL.md`).
    pub tag: Option<String>,
}

impl CallInFlight {
    /// As a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "function": self.function,
            "args": self.args,
            "seconds": self.seconds,
            "generation": self.generation,
            "progress": self.progress.map(|(done, total)| json!({"done": done, "total": total})),
            "tag": self.tag,
        })
    }

    /// From that JSON object.
    pub fn from_json(value: &serde_json::Value) -> Result<CallInFlight, String> {
        let o = crate::json::Object::new(
            value,
            "a call in flight",
            &[
                "function",
                "args",
                "seconds",
                "generation",
                "progress",
                "tag",
            ],
        )?;
        let progress = match value.get("progress") {
            None | Some(serde_json::Value::Null) => None,
            Some(p) => {
                let p = crate::json::Object::new(p, "progress", &["done", "total"])?;
                Some((p.u64("done")?, p.u64("total")?))
            }
        };
        Ok(CallInFlight {
            function: o.str("function")?,
            args: o.str("args")?,
            seconds: o.opt_f64("seconds")?.unwrap_or(0.0),
            generation: o.u64("generation")?,
            progress,
            tag: o.opt_str("tag")?,
        })
    }
}

/// A registered call.
struct Running {
    function: String,
    args: String,
    started: Instant,
    generation: u64,
    tag: Option<String>,
    /// `done + 1` once reported (0: never), and `total`.
    done: AtomicU64,
    total: AtomicU64,
}

/// The calls running in one host.
#[derive(Default)]
pub struct Calls {
    running: Mutex<Vec<Arc<Running>>>,
}

thread_local! {
    /// The call this thread is running, innermost last (a plugin function
    /// may call another through the host).
    static CURRENT: RefCell<Vec<Arc<Running>>> = const { RefCell::new(Vec::new()) };
    /// The tag the next call on this thread carries.
    static NEXT_TAG: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `f` with `tag` as the tag of the calls it makes on this thread.
pub fn with_tag<R>(tag: Option<String>, f: impl FnOnce() -> R) -> R {
    let before = NEXT_TAG.with(|t| t.replace(tag));
    let result = f();
    NEXT_TAG.with(|t| *t.borrow_mut() = before);
    result
}

/// `args` (JSON) cut to [`ARGS_SHOWN`] characters.
fn shown(args: &[u8]) -> String {
    let text = String::from_utf8_lossy(args);
    let text = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(&text);
    match text.char_indices().nth(ARGS_SHOWN) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

impl Calls {
    /// Registers a call until the guard drops, and makes it this thread's
    /// current call.
    pub fn start(self: &Arc<Calls>, function: &str, args: &[u8], generation: u64) -> Guard {
        let running = Arc::new(Running {
            function: function.to_owned(),
            args: shown(args),
            started: Instant::now(),
            generation,
            tag: NEXT_TAG.with(|t| t.borrow().clone()),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
        });
        self.running.lock().push(Arc::clone(&running));
        CURRENT.with(|c| c.borrow_mut().push(Arc::clone(&running)));
        Guard {
            calls: Arc::clone(self),
            running,
        }
    }

    /// The calls running now, oldest first.
    pub fn snapshot(&self) -> Vec<CallInFlight> {
        self.running
            .lock()
            .iter()
            .map(|r| {
                let done = r.done.load(Ordering::Relaxed);
                CallInFlight {
                    function: r.function.clone(),
                    args: r.args.clone(),
                    seconds: r.started.elapsed().as_secs_f64(),
                    generation: r.generation,
                    progress: (done > 0).then(|| (done - 1, r.total.load(Ordering::Relaxed))),
                    tag: r.tag.clone(),
                }
            })
            .collect()
    }
}

/// Records `done` of `total` for the call running on this thread; nothing
/// when the thread is not running one.
pub fn progress(done: u64, total: u64) {
    CURRENT.with(|c| {
        if let Some(r) = c.borrow().last() {
            r.total.store(total, Ordering::Relaxed);
            r.done.store(done.saturating_add(1), Ordering::Relaxed);
        }
    });
}

/// Unregisters its call when dropped (also on a panic).
pub struct Guard {
    calls: Arc<Calls>,
    running: Arc<Running>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.calls
            .running
            .lock()
            .retain(|r| !Arc::ptr_eq(r, &self.running));
        CURRENT.with(|c| {
            let mut c = c.borrow_mut();
            if let Some(i) = c.iter().rposition(|r| Arc::ptr_eq(r, &self.running)) {
                c.remove(i);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_listed_with_its_progress_until_it_returns() {
        let calls = Arc::new(Calls::default());
        let long = format!("[{}]", "7,".repeat(100));
        let guard = with_tag(Some("t1".into()), || calls.start("sum", long.as_bytes(), 3));
        progress(40, 100);
        let now = calls.snapshot();
        assert_eq!(now.len(), 1);
        assert_eq!(
            (now[0].function.as_str(), now[0].generation, now[0].progress),
            ("sum", 3, Some((40, 100)))
        );
        assert_eq!(now[0].tag.as_deref(), Some("t1"));
        assert_eq!(
            now[0].args.chars().count(),
            ARGS_SHOWN + 1,
            "{}",
            now[0].args
        );
        assert!(now[0].args.ends_with('…'));
        let back = CallInFlight::from_json(&now[0].to_json()).unwrap();
        assert_eq!(back.progress, Some((40, 100)));
        drop(guard);
        assert!(calls.snapshot().is_empty());
        progress(1, 2); // no call running: ignored
    }

    #[test]
    fn progress_reported_as_zero_is_shown() {
        let calls = Arc::new(Calls::default());
        let _g = calls.start("f", b"[1]", 1);
        assert_eq!(calls.snapshot()[0].progress, None);
        progress(0, 0);
        assert_eq!(calls.snapshot()[0].progress, Some((0, 0)));
        assert_eq!(calls.snapshot()[0].args, "1");
    }
}
