//! The prompt of `keepwarm run`: the control commands without the
//! `keepwarm` word, with line editing, history and completion of command,
//! function and cache names.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use parking_lot::Mutex;
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, ExternalPrinter, Helper};

use crate::cli::ControlCommand;
use crate::control::protocol::{ErrorCode, Request, Response};
use crate::host::Host;

/// The prompt thread's stack. Calls typed at the prompt do not run on it
/// (they run on a thread with the control socket's stack, in this process
/// or in the supervisor's worker), so it only needs room for line editing.
pub const PROMPT_STACK_BYTES: usize = 8 << 20;

/// Starts the prompt on a thread of its own ([`PROMPT_STACK_BYTES`]) on
/// `backend`; `done` runs when the user leaves it.
pub fn spawn(
    backend: Arc<dyn Backend>,
    done: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    crate::threads::spawn("keepwarm-prompt", Some(PROMPT_STACK_BYTES), move || {
        if let Err(e) = run(backend) {
            crate::output::err(&format!("keepwarm: the prompt failed: {e}"));
        }
        done();
    })
    .map(|_| ())
}

/// What the prompt talks to: the host in this process, or the worker of
/// `keepwarm run`'s supervisor over the control socket.
pub trait Backend: Send + Sync {
    /// Answers one request (a call may run long).
    fn handle(&self, request: Request) -> Response;
    /// The functions `call` can run, with their signatures.
    fn signatures(&self) -> Vec<keepwarm::signature::Signature>;
    /// The names of the caches.
    fn cache_names(&self) -> Vec<String>;
    /// The call in flight with this tag, for the live line.
    fn call_in_flight(&self, tag: &str) -> Option<keepwarm::in_flight::CallInFlight>;
    /// Prints what the host printed before its last answer (its log lines
    /// travel apart from the answers), so that they come first.
    fn sync_output(&self) {}
}

/// The host in this process.
pub struct Local(pub Arc<Host>);

impl Backend for Local {
    fn handle(&self, request: Request) -> Response {
        let host = &self.0;
        if !matches!(request, Request::Call { .. }) {
            return crate::control::handle(host, request);
        }
        // A call runs on a thread of its own that ends with it: the
        // plugin's thread-locals then never pin a generation in memory, and
        // deep recursion gets the control socket's stack.
        let spawning = crate::threads::Spawning::begin();
        let outcome = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("keepwarm-prompt-call".into())
                .stack_size(crate::control::server::CALL_STACK_BYTES)
                .spawn_scoped(s, || {
                    spawning.registered();
                    crate::control::handle(host, request)
                })
                .map(|t| t.join())
        });
        match outcome {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Response::err(
                ErrorCode::PluginPanic,
                "the call failed inside the host (a bug: please report it)".to_owned(),
            ),
            Err(e) => Response::err(ErrorCode::Busy, format!("no thread for the call: {e}")),
        }
    }

    fn signatures(&self) -> Vec<keepwarm::signature::Signature> {
        self.0.signatures()
    }

    fn cache_names(&self) -> Vec<String> {
        self.0
            .store()
            .all()
            .iter()
            .map(|c| c.name().to_owned())
            .collect()
    }

    fn call_in_flight(&self, tag: &str) -> Option<keepwarm::in_flight::CallInFlight> {
        self.0
            .calls_in_flight()
            .into_iter()
            .find(|c| c.tag.as_deref() == Some(tag))
    }
}

/// The commands of the prompt.
#[derive(Debug, Parser)]
#[command(name = "", no_binary_name = true, disable_version_flag = true)]
#[command(help_template = "{subcommands}")]
enum Line {
    #[command(flatten)]
    Control(ControlCommand),
    /// Leave (also Ctrl-D)
    #[command(alias = "exit")]
    Quit,
}

const COMMANDS: &[&str] = &["call", "reset", "stats", "status", "reload", "help", "quit"];

struct Completion {
    backend: Arc<dyn Backend>,
}

impl Completer for Completion {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = &line[..pos];
        let start = before.rfind(char::is_whitespace).map_or(0, |i| i + 1);
        let word = &before[start..];
        let previous: Vec<&str> = before[..start].split_whitespace().collect();
        if previous.as_slice() == ["call"] {
            // Function names, listed with their signatures.
            let pairs = self
                .backend
                .signatures()
                .into_iter()
                .filter(|s| s.function.starts_with(word))
                .map(|s| Pair {
                    replacement: format!("{} ", s.function),
                    display: s.display(),
                })
                .collect();
            return Ok((start, pairs));
        }
        let candidates: Vec<String> = match previous.as_slice() {
            [] => COMMANDS.iter().map(|c| c.to_string()).collect(),
            ["reset"] => {
                let mut names = self.backend.cache_names();
                names.push("--all".into());
                names
            }
            ["stats"] => self.backend.cache_names(),
            ["help"] => COMMANDS.iter().map(|c| c.to_string()).collect(),
            _ => Vec::new(),
        };
        let pairs = candidates
            .into_iter()
            .filter(|c| c.starts_with(word))
            .map(|c| Pair {
                // The trailing space lets the user type the next word at once.
                replacement: format!("{c} "),
                display: c,
            })
            .collect();
        Ok((start, pairs))
    }
}

impl Hinter for Completion {
    type Hint = String;
}
impl Highlighter for Completion {
    fn highlight_prompt<'b, 's: 'b, 'p: 'b>(
        &'s self,
        prompt: &'p str,
        _default: bool,
    ) -> Cow<'b, str> {
        Cow::Borrowed(prompt)
    }
}
impl Validator for Completion {}
impl Helper for Completion {}

fn history_path() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".local/state"))
        })?;
    let dir = base.join("keepwarm");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join("history"))
}

/// Runs one prompt line; returns false when the user asked to leave.
pub fn run_line(backend: &Arc<dyn Backend>, line: &str) -> bool {
    let Some(words) = call_words(line).or_else(|| shlex::split(line)) else {
        crate::output::err(&format!("unbalanced quotes in: {line}"));
        return true;
    };
    if words.is_empty() {
        return true;
    }
    match Line::try_parse_from(&words) {
        Ok(Line::Quit) => return false,
        Ok(Line::Control(command)) => {
            let response = match command {
                ControlCommand::Call { .. } => {
                    let tag = crate::live::new_tag();
                    let mut request = command.to_request();
                    if let Request::Call { tag: t, .. } = &mut request {
                        *t = Some(tag.clone());
                    }
                    let watched = Arc::clone(backend);
                    let _live =
                        crate::live::Live::start(tag, move |tag| watched.call_in_flight(tag));
                    backend.handle(request)
                }
                _ => backend.handle(command.to_request()),
            };
            backend.sync_output();
            let rendered = command.render(&response);
            // A reset or a reload already printed the host's own line
            // ("keepwarm: reset cache square (1 entry dropped)", "keepwarm:
            // generation 2 reloaded in ..."): do not say it twice.
            let loaded = response
                .result
                .as_ref()
                .is_some_and(|r| r.get("generation").is_some());
            let said = response.ok
                && match command {
                    ControlCommand::Reset { .. } => true,
                    ControlCommand::Reload => loaded,
                    _ => false,
                };
            if !rendered.stdout.is_empty() && !said {
                crate::output::out(&rendered.stdout);
            }
            if !rendered.stderr.is_empty() {
                crate::output::err(&rendered.stderr);
            }
        }
        // clap's help and errors already say what to type.
        Err(e) => {
            let _ = e.print();
            if e.kind() == clap::error::ErrorKind::DisplayHelp && words.len() == 1 {
                crate::output::out(&functions_help(backend.as_ref()));
            }
        }
    }
    true
}

/// The `help` lines that list the functions `call` can run, with their
/// signatures.
fn functions_help(backend: &dyn Backend) -> String {
    let signatures = backend.signatures();
    if signatures.is_empty() {
        return "\nNo functions: no plugin is loaded.".to_owned();
    }
    let mut lines = vec!["\nFunctions (call NAME ARG...):".to_owned()];
    lines.extend(signatures.iter().map(|s| format!("  {}", s.display())));
    lines.join("\n")
}

/// Reads commands from the terminal until `quit` or end of input.
pub fn run(backend: Arc<dyn Backend>) -> anyhow::Result<()> {
    // Tab completes what is common; a second Tab lists the candidates, so
    // the functions show with their signatures.
    let config = rustyline::Config::builder()
        .completion_type(rustyline::CompletionType::List)
        .build();
    let mut editor: Editor<Completion, rustyline::history::DefaultHistory> =
        Editor::with_config(config)?;
    editor.set_helper(Some(Completion {
        backend: Arc::clone(&backend),
    }));
    // Host lines (reloads, plugin logs) that arrive while the user types
    // are printed above the input line instead of through it. Lines printed
    // while a command runs (a plugin's log during `call`) go straight out, so
    // they come before the command's result, in order.
    let reading = Arc::new(AtomicBool::new(false));
    if let Ok(printer) = editor.create_external_printer() {
        let printer = Mutex::new(printer);
        let reading = Arc::clone(&reading);
        crate::output::set_printer(Some(Arc::new(move |line: &str| {
            if reading.load(Ordering::SeqCst) {
                let _ = printer.lock().print(format!("{line}\n"));
            } else {
                crate::output::out(line);
            }
        })));
    }
    let history = history_path();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    crate::output::out("type `help` for commands, Tab to complete, Ctrl-D to quit");
    let mut interrupted = false;
    loop {
        reading.store(true, Ordering::SeqCst);
        let line = editor.readline("keepwarm> ");
        reading.store(false, Ordering::SeqCst);
        if line.is_ok() {
            interrupted = false;
        }
        match line {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                if !run_line(&backend, &line) {
                    break;
                }
            }
            // Ctrl-C clears the line; twice in a row leaves (as node's REPL).
            Err(ReadlineError::Interrupted) if interrupted => break,
            Err(ReadlineError::Interrupted) => {
                interrupted = true;
                crate::output::out("(Ctrl-C again, Ctrl-D or `quit` to leave)");
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    crate::output::set_printer(None);
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    Ok(())
}

/// `call FN ARGS` where ARGS is a sequence of JSON values (`call area
/// {"w": 2, "h": 3}`): the words for the parser, one per value, so that JSON
/// with spaces stays one argument. `None` when the rest of the line is not
/// all JSON: it is then split like a shell command.
fn call_words(line: &str) -> Option<Vec<String>> {
    let rest = line.trim_start().strip_prefix("call")?;
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let rest = rest.trim_start();
    let (function, args) = rest.split_once(char::is_whitespace)?;
    if function.starts_with('-') || args.trim().is_empty() {
        return None;
    }
    let values: Vec<serde_json::Value> = serde_json::Deserializer::from_str(args)
        .into_iter::<serde_json::Value>()
        .collect::<Result<_, _>>()
        .ok()?;
    let mut words = vec!["call".to_owned(), function.to_owned(), "--".to_owned()];
    words.extend(values.iter().map(|v| v.to_string()));
    Some(words)
}

#[cfg(test)]
mod call_words_tests {
    use super::call_words;

    #[test]
    fn json_with_spaces_is_one_argument_and_words_fall_back_to_shell_rules() {
        assert_eq!(
            call_words(r#"call area {"w": 2, "h": 3}"#).unwrap(),
            ["call", "area", "--", r#"{"h":3,"w":2}"#]
        );
        assert_eq!(
            call_words(r#"call greet "you" 3"#).unwrap(),
            ["call", "greet", "--", "\"you\"", "3"]
        );
        assert_eq!(call_words("call greet you"), None, "not JSON: shell words");
        assert_eq!(call_words("call version"), None);
        assert_eq!(call_words("caller x 1"), None);
    }
}
