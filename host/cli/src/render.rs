//! The words of the `keepwarm` binary: each runtime [`Event`] as the line a
//! user reads.

use keepwarm::events::{CacheCount, Event};
use keepwarm_abi::{KW_LOG_DEBUG, KW_LOG_ERROR, KW_LOG_WARN};

/// Most cache names a reload line lists; the rest are counted.
pub const LINE_NAMES: usize = 8;

/// `a, b, c` for a few names; `a, …, h and 92 more (keepwarm stats)` for many.
pub fn capped(names: &[String]) -> String {
    if names.len() <= LINE_NAMES {
        return names.join(", ");
    }
    format!(
        "{} and {} more (keepwarm stats)",
        names[..LINE_NAMES].join(", "),
        names.len() - LINE_NAMES
    )
}

/// "1 entry", "3 entries".
pub fn entries(n: u64) -> String {
    if n == 1 {
        "1 entry".to_owned()
    } else {
        format!("{n} entries")
    }
}

fn serving(generation: Option<u64>) -> String {
    match generation {
        Some(n) => format!("generation {n} keeps serving"),
        None => "nothing is loaded yet".to_owned(),
    }
}

/// The line for `event`.
pub fn line(event: &Event) -> String {
    match event {
        Event::Loaded {
            generation,
            first,
            file,
            load_ms,
            functions,
            kept,
            reset,
        } => {
            let verb = if *first { "loaded" } else { "reloaded" };
            let mut line = format!(
                "keepwarm: generation {generation} {verb} in {load_ms:.1} ms: {file} ({functions} functions)"
            );
            if !*first {
                let kept: Vec<String> = kept
                    .iter()
                    .map(|CacheCount { name, entries }| format!("{name} ({entries})"))
                    .collect();
                if kept.is_empty() {
                    line.push_str("; no caches to keep");
                } else {
                    line.push_str(&format!("; caches kept: {}", capped(&kept)));
                }
            }
            if !reset.is_empty() {
                line.push_str(&format!(
                    "; reset because their code changed: {}",
                    capped(reset)
                ));
            }
            line
        }
        Event::Refused {
            file,
            error,
            serving: s,
        } => format!("keepwarm: refused {file}: {error} ({})", serving(*s)),
        Event::Waiting {
            library,
            serving: s,
        } => format!(
            "keepwarm: waiting for {} to reappear (deleted, or not built yet: cargo build); it loads as soon as it is back ({})",
            library.display(),
            serving(*s)
        ),
        Event::Then {
            function,
            outcome: Ok(value),
        } => format!("keepwarm: {function}() = {value}"),
        Event::Then {
            function,
            outcome: Err(e),
        } => format!("keepwarm: {function}() failed: {e} (the host keeps serving)"),
        Event::Store { message } | Event::Shared { message } => format!("keepwarm: {message}"),
        Event::Log {
            generation,
            level,
            message,
        } => {
            let tag = match *level {
                KW_LOG_ERROR => " error",
                KW_LOG_WARN => " warn",
                KW_LOG_DEBUG => " debug",
                _ => "",
            };
            format!("[gen {generation}{tag}] {message}")
        }
        Event::ThreadsLeft {
            generation,
            threads,
        } => format!(
            "[gen {generation} warn] generation {generation} left {} thread(s) running after on_unload (ids {threads:?}); its code stays mapped so they cannot crash the host — stop your threads in on_unload",
            threads.len()
        ),
        Event::Reset {
            cache: Some(name),
            dropped,
        } => format!("keepwarm: reset cache {name} ({} dropped)", entries(*dropped)),
        Event::Reset {
            cache: None,
            dropped,
        } => format!("keepwarm: reset all caches ({} dropped)", entries(*dropped)),
        other => format!("keepwarm: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_line_names_what_it_kept_and_reset() {
        let event = Event::Loaded {
            generation: 2,
            first: false,
            file: "libplugin.so".into(),
            load_ms: 1.25,
            functions: 4,
            kept: vec![CacheCount {
                name: "fib".into(),
                entries: 91,
            }],
            reset: vec!["square".into()],
        };
        assert_eq!(
            line(&event),
            "keepwarm: generation 2 reloaded in 1.2 ms: libplugin.so (4 functions); caches kept: fib (91); reset because their code changed: square"
        );
        let many: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        assert_eq!(
            capped(&many),
            "c0, c1, c2, c3, c4, c5, c6, c7 and 2 more (keepwarm stats)"
        );
        assert_eq!(entries(1), "1 entry");
    }
}
