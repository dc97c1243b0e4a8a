//! Crash containment for `keepwarm run`: the process the user started is a
//! supervisor, and the code that loads plugins runs in a worker it starts.
//!
//! - The supervisor binds the control socket and keeps its listening
//!   descriptor; each worker inherits it and accepts clients on it itself
//!   (no relay hop: a call costs one round trip, as without a supervisor).
//!   Clients that connect while a worker restarts wait in the socket's
//!   backlog.
//! - The supervisor owns the memory that outlives a worker: the black box
//!   ([`keepwarm::supervision::BlackBox`]: what the worker is loading and
//!   calling) and, without `--persist`, the crash journal of the caches
//!   ([`keepwarm::journal`]), both memfds the worker inherits.
//! - The prompt lives here, with the terminal, and talks to the worker over
//!   the socket like any client ([`Remote`]). The worker's output comes
//!   through pipes and is printed here ([`Relay`]), so that the prompt can
//!   keep it above the input line.
//! - When the worker dies of a signal, the supervisor reads the black box,
//!   prints one line that says what crashed, and starts a new worker on the
//!   last build that did not crash (builds that worked are kept as hard
//!   links in `RUNTIME/builds-PID-…`).
//!
//! A worker is this same binary, started again with the same arguments and
//! [`WORKER_ENV`] set to a JSON description of what it inherits.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;
use parking_lot::Mutex;
use serde_json::json;

use crate::cli::RunArgs;
use crate::control::protocol::{ErrorCode, Request, Response};
use crate::control::server::Server;
use crate::serve::{Exit, TerminalState};
use keepwarm::supervision::{self, BadBuild, BlackBox, Crash, Snapshot, Supervised};

/// The environment variable that makes `keepwarm run` a worker.
pub const WORKER_ENV: &str = "KEEPWARM_WORKER";

/// A build that crashes with no call running within this long of loading
/// is bad (it crashed on its own: a thread it started, a static's
/// initializer run late).
pub const PROBATION: Duration = Duration::from_secs(5);
/// A build that crashes with no call running this many times within
/// [`CRASH_WINDOW`] is bad too, however long after it loaded.
pub const CRASHES_BEFORE_BAD: usize = 3;
/// See [`CRASHES_BEFORE_BAD`].
pub const CRASH_WINDOW: Duration = Duration::from_secs(30);
/// More than this many unexplained restarts (no call running, no bad build)
/// within [`LOOP_WINDOW`] pause each further restart by [`LOOP_PAUSE`].
pub const LOOP_RESTARTS: usize = 5;
/// See [`LOOP_RESTARTS`].
pub const LOOP_WINDOW: Duration = Duration::from_secs(10);
/// See [`LOOP_RESTARTS`].
pub const LOOP_PAUSE: Duration = Duration::from_secs(1);
/// How long a stopping worker gets before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What a worker inherited, as its [`crate::serve::Serve`] uses it.
pub struct WorkerSide {
    listener: Option<UnixListener>,
    ready: Mutex<Option<File>>,
}

impl WorkerSide {
    /// The control socket's listening descriptor (once).
    pub fn take_listener(&mut self) -> UnixListener {
        self.listener.take().expect("the listener is taken once")
    }

    /// Tells the supervisor that the worker serves.
    pub fn ready(&self) {
        if let Some(mut pipe) = self.ready.lock().take() {
            let _ = pipe.write_all(b"ready\n");
        }
    }
}

/// What a worker starts with: what it inherited, the supervision for its
/// [`keepwarm::Config`], the socket's path, and the crash journal (without
/// `--persist`).
pub struct Worker0 {
    /// The inherited descriptors.
    pub side: WorkerSide,
    /// For [`keepwarm::Config::supervised`].
    pub supervised: Supervised,
    /// The control socket's path.
    pub socket: PathBuf,
    /// For [`keepwarm::Config::journal`].
    pub journal: Option<Arc<keepwarm::journal::Journal>>,
}

/// Takes ownership of descriptor `fd`, inherited from the supervisor, and
/// marks it close-on-exec again (a process the plugin starts must not hold
/// the socket or the journal).
fn inherited(fd: i64) -> anyhow::Result<OwnedFd> {
    let fd = RawFd::try_from(fd).context("a descriptor number out of range")?;
    // SAFETY: F_GETFD on a number is harmless; it fails for a closed one.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        anyhow::bail!("descriptor {fd} named in {WORKER_ENV} is not open");
    }
    // SAFETY: the supervisor handed this descriptor to this process only,
    // and nothing else here took it: it is ours to own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_SETFD on a descriptor we own changes only its flags.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(owned)
}

/// When this process is a supervisor's worker: what it inherited, the
/// supervision for its [`keepwarm::Config`], and the socket's path.
pub fn worker_from_env() -> anyhow::Result<Option<Worker0>> {
    let Some(spec) = std::env::var_os(WORKER_ENV) else {
        return Ok(None);
    };
    let spec: serde_json::Value = serde_json::from_str(&spec.to_string_lossy())
        .with_context(|| format!("{WORKER_ENV} is not the JSON a keepwarm supervisor writes"))?;
    let fd = |name: &str| -> anyhow::Result<OwnedFd> {
        inherited(
            spec[name]
                .as_i64()
                .with_context(|| format!("{WORKER_ENV} has no {name}"))?,
        )
    };
    let listener = UnixListener::from(fd("listen")?);
    let ready = File::from(fd("ready")?);
    let black_box = fd("black_box")?;
    // SAFETY: the descriptor is ours (see `inherited`) and the supervisor
    // made it with BlackBox::create.
    let black_box =
        unsafe { BlackBox::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(black_box)) }
            .context("mapping the supervisor's black box")?;
    supervision::install(black_box);
    let journal = match spec["journal"].as_i64() {
        Some(fd) => Some(Arc::new(
            keepwarm::journal::Journal::from_fd(inherited(fd)?)
                .context("mapping the supervisor's crash journal")?,
        )),
        None => None,
    };
    let supervised = Supervised {
        start_from: spec["start_from"]
            .as_array()
            .and_then(|a| Some((PathBuf::from(a.first()?.as_str()?), a.get(1)?.as_u64()?))),
        next_generation: spec["next_generation"].as_u64().unwrap_or(1),
        bad_builds: spec["bad_builds"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| BadBuild::from_json(b).ok())
                    .collect()
            })
            .unwrap_or_default(),
        keep_builds: spec["keep_builds"].as_str().map(PathBuf::from),
        supervisor_pid: spec["supervisor_pid"].as_u64().unwrap_or(0) as u32,
        restarts: spec["restarts"].as_u64().unwrap_or(0),
        last_crash: match &spec["last_crash"] {
            serde_json::Value::Null => None,
            c => Crash::from_json(c).ok(),
        },
    };
    let socket = PathBuf::from(spec["socket"].as_str().context("no socket path")?);
    // Nothing the plugin starts should think it is a worker.
    // SAFETY: called before this process starts any thread of its own
    // (main → run → here); nothing reads the environment concurrently.
    unsafe { std::env::remove_var(WORKER_ENV) };
    Ok(Some(Worker0 {
        side: WorkerSide {
            listener: Some(listener),
            ready: Mutex::new(Some(ready)),
        },
        supervised,
        socket,
        journal,
    }))
}

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors into `fds` when it returns 0.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Prints what a worker writes on one of its output streams, line by line,
/// through this process's output (above the prompt's input line).
pub struct Relay {
    fd: OwnedFd,
    stderr: bool,
    pending: Mutex<(Vec<u8>, bool)>,
}

impl Relay {
    fn new(fd: OwnedFd, stderr: bool) -> Arc<Relay> {
        // SAFETY: fcntl on our own descriptor: make reads non-blocking.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        Arc::new(Relay {
            fd,
            stderr,
            pending: Mutex::new((Vec::new(), false)),
        })
    }

    /// Reads what is there now and prints the complete lines; true at the
    /// end of the stream.
    pub fn drain(&self) -> bool {
        let mut pending = self.pending.lock();
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: reads into a stack buffer of the length given.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                0 => {
                    pending.1 = true;
                    break;
                }
                n if n > 0 => pending.0.extend_from_slice(&buf[..n as usize]),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        pending.1 = true;
                    }
                    break;
                }
            }
        }
        let (bytes, ended) = &mut *pending;
        while let Some(at) = bytes.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = bytes.drain(..=at).collect();
            self.print(&line[..line.len() - 1]);
        }
        if *ended && !bytes.is_empty() {
            let rest = std::mem::take(bytes);
            self.print(&rest);
        }
        *ended
    }

    fn print(&self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        if self.stderr {
            crate::output::err(&line);
        } else {
            crate::output::say(&line);
        }
    }

    /// Relays until the stream ends (the worker exited).
    fn pump(self: Arc<Relay>) {
        loop {
            let mut poll = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one descriptor we own, without a timeout.
            unsafe { libc::poll(&mut poll, 1, -1) };
            if self.drain() {
                return;
            }
        }
    }
}

/// The prompt's view of the worker: a client of the control socket.
pub struct Remote {
    socket: PathBuf,
    relays: Arc<Mutex<Vec<Arc<Relay>>>>,
}

impl Remote {
    fn ask(&self, request: Request, timeout: Option<Duration>) -> Option<serde_json::Value> {
        crate::client::request_within(&self.socket, &request, timeout)
            .ok()?
            .result
    }
}

impl crate::repl::Backend for Remote {
    fn handle(&self, request: Request) -> Response {
        match crate::client::request_surviving(&self.socket, &request, None) {
            Ok(r) => r,
            Err(e) => Response::err(ErrorCode::NotLoaded, e.to_string()),
        }
    }

    fn signatures(&self) -> Vec<keepwarm::signature::Signature> {
        self.ask(Request::Status { v: Some(1) }, Some(Duration::from_secs(2)))
            .and_then(|s| keepwarm::Status::from_json(&s).ok())
            .map(|s| s.signatures)
            .unwrap_or_default()
    }

    fn cache_names(&self) -> Vec<String> {
        self.ask(Request::Status { v: Some(1) }, Some(Duration::from_secs(2)))
            .and_then(|s| keepwarm::Status::from_json(&s).ok())
            .map(|s| s.caches)
            .unwrap_or_default()
    }

    fn call_in_flight(&self, tag: &str) -> Option<keepwarm::in_flight::CallInFlight> {
        let status = self.ask(Request::Status { v: Some(1) }, Some(Duration::from_secs(1)))?;
        keepwarm::Status::from_json(&status)
            .ok()?
            .calls_in_flight
            .into_iter()
            .find(|c| c.tag.as_deref() == Some(tag))
    }

    fn sync_output(&self) {
        for relay in self.relays.lock().iter() {
            relay.drain();
        }
    }
}

/// What happens, as the supervisor's loop sees it.
enum Ev {
    /// The user or a signal asked to leave.
    Exit(Exit),
    /// Worker `pid` serves.
    Ready(u32),
    /// Worker `pid` ended.
    Died(u32, ExitStatus),
}

/// The name of a signal (`SIGSEGV`).
pub fn signal_name(signal: i32) -> String {
    let known = [
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGILL, "SIGILL"),
        (libc::SIGFPE, "SIGFPE"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGTRAP, "SIGTRAP"),
        (libc::SIGSYS, "SIGSYS"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGXCPU, "SIGXCPU"),
        (libc::SIGXFSZ, "SIGXFSZ"),
    ];
    known.iter().find(|(n, _)| *n == signal).map_or_else(
        || format!("signal {signal}"),
        |(_, name)| (*name).to_owned(),
    )
}

/// Whether the worker was stopped from outside (`kill`, the OOM killer)
/// rather than by a fault of the code it ran: such a death with no call
/// running never makes a build bad.
fn external(status: ExitStatus) -> bool {
    matches!(
        status.signal(),
        Some(libc::SIGKILL | libc::SIGTERM | libc::SIGINT | libc::SIGHUP | libc::SIGQUIT)
    )
}

/// How a worker ended, as the crash line says it.
fn how_it_ended(status: ExitStatus) -> String {
    match (status.signal(), status.code()) {
        (Some(s), _) => signal_name(s),
        (None, Some(c)) => format!("exit status {c}"),
        _ => "an unknown end".to_owned(),
    }
}

/// The supervisor's memory of crashes and builds.
struct History {
    restarts: u64,
    last_crash: Option<Crash>,
    bad: Vec<BadBuild>,
    /// Crashes with no call running: (build hash, when).
    lone_crashes: VecDeque<(u32, Instant)>,
    /// Restarts in the last seconds, to slow a crash loop down.
    recent_restarts: VecDeque<Instant>,
    next_generation: u64,
}

/// What to start the next worker on, and what to say about the crash.
struct Verdict {
    crash: Crash,
    bad: Option<BadBuild>,
    start_from: Option<(PathBuf, u64)>,
}

impl History {
    /// Judges a crash from what the black box held.
    fn judge(&mut self, status: ExitStatus, seen: &Snapshot, builds: &Path) -> Verdict {
        let signal = how_it_ended(status);
        let now = Instant::now();
        let in_load = seen.loading.is_some();
        let generation = seen
            .loading
            .map(|l| l.0)
            .or(seen.live.map(|l| l.0))
            .or(seen.calls.first().map(|c| c.1))
            .unwrap_or(0);
        let loaded_ago = seen
            .live
            .map(|l| Duration::from_millis(keepwarm::persist::now_ms().saturating_sub(l.2)));
        let calls = seen.calls.len() as u64 + seen.unnamed;
        let bad = if let Some((g, hash)) = seen.loading {
            Some(BadBuild {
                hash,
                generation: g,
                why: format!("{signal} in on_load"),
            })
        } else if let (Some((g, hash, _)), 0, false) = (seen.live, calls, external(status)) {
            self.lone_crashes.push_back((hash, now));
            while self
                .lone_crashes
                .front()
                .is_some_and(|(_, t)| now.duration_since(*t) > CRASH_WINDOW)
            {
                self.lone_crashes.pop_front();
            }
            let repeated = self.lone_crashes.iter().filter(|(h, _)| *h == hash).count();
            let young = loaded_ago.is_some_and(|a| a < PROBATION);
            (young || repeated >= CRASHES_BEFORE_BAD).then(|| BadBuild {
                hash,
                generation: g,
                why: if young {
                    format!(
                        "{signal} with no call running, {:.1} s after it loaded",
                        loaded_ago.unwrap_or_default().as_secs_f64()
                    )
                } else {
                    format!(
                        "{signal} {repeated} times in {} s with no call running",
                        CRASH_WINDOW.as_secs()
                    )
                },
            })
        } else {
            None
        };
        if let Some(b) = &bad {
            if !self.bad.iter().any(|x| x.hash == b.hash) {
                self.bad.push(b.clone());
            }
        }
        // The build to start on: the live one (a crash in a call is the
        // call's fault, not the build's), else the newest kept build that
        // is not bad.
        let kept = supervision::kept_builds(builds);
        let usable = |h: u32| !self.bad.iter().any(|b| b.hash == h);
        let start_from = seen
            .live
            .and_then(|(g, h, _)| kept.iter().find(|k| k.0 == g && k.1 == h && usable(h)))
            .or_else(|| kept.iter().find(|k| usable(k.1)))
            .map(|(g, _, path)| (path.clone(), *g));
        self.next_generation = self
            .next_generation
            .max(seen.max_generation + 1)
            .max(generation + 1);
        let first = seen.calls.first();
        let crash = Crash {
            signal,
            function: if in_load {
                None
            } else {
                first.map(|c| c.0.clone())
            },
            others: calls.saturating_sub(1),
            generation,
            time: keepwarm::persist::now_ms() as f64 / 1000.0,
            in_load,
            restarted_on: start_from.as_ref().map(|s| s.1),
        };
        Verdict {
            crash,
            bad,
            start_from,
        }
    }
}

/// A running worker.
struct Worker {
    pid: u32,
    /// When it started, for the crash line's restart time.
    started: Instant,
}

/// Everything a worker is started with.
struct Launch<'a> {
    server: &'a Server,
    socket: &'a Path,
    black_box: &'a BlackBox,
    journal: Option<&'a keepwarm::journal::Journal>,
    builds: &'a Path,
    events: &'a mpsc::Sender<Ev>,
    relays: &'a Arc<Mutex<Vec<Arc<Relay>>>>,
    /// The worker's arguments (after the program name): a `run` command.
    worker_args: &'a [std::ffi::OsString],
}

impl Launch<'_> {
    fn spawn(
        &self,
        history: &History,
        start_from: Option<(PathBuf, u64)>,
    ) -> anyhow::Result<Worker> {
        let (ready_read, ready_write) = pipe().context("creating a pipe")?;
        let (out_read, out_write) = pipe().context("creating a pipe")?;
        let (err_read, err_write) = pipe().context("creating a pipe")?;
        let listen = self.server.listener().as_raw_fd();
        supervision::make_inheritable(listen)?;
        supervision::make_inheritable(ready_write.as_raw_fd())?;
        self.black_box.inheritable()?;
        let journal = match self.journal {
            Some(j) => {
                j.inheritable()?;
                Some(j.raw_fd())
            }
            None => None,
        };
        let spec = json!({
            "listen": listen,
            "socket": self.socket,
            "ready": ready_write.as_raw_fd(),
            "black_box": self.black_box.raw_fd(),
            "journal": journal,
            "start_from": start_from.as_ref().map(|(p, g)| json!([p, g])),
            "next_generation": history.next_generation,
            "bad_builds": history.bad.iter().map(BadBuild::to_json).collect::<Vec<_>>(),
            "keep_builds": self.builds,
            "supervisor_pid": std::process::id(),
            "restarts": history.restarts,
            "last_crash": history.last_crash.as_ref().map(Crash::to_json),
        });
        let parent = std::process::id() as libc::pid_t;
        let mut command = Command::new("/proc/self/exe");
        command
            .args(self.worker_args)
            .arg0(
                std::env::args_os()
                    .next()
                    .unwrap_or_else(|| "keepwarm".into()),
            )
            .env(WORKER_ENV, spec.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_write))
            .stderr(Stdio::from(err_write));
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only async-signal-safe functions (setpgid, prctl, getppid,
        // _exit) on no shared memory.
        unsafe {
            command.pre_exec(move || {
                // Its own process group: the terminal's Ctrl-C goes to the
                // supervisor, which decides.
                libc::setpgid(0, 0);
                // The worker stops when the supervisor dies, however it dies.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = command.spawn().context("starting the worker process")?;
        // The worker has its copies; keep none of ours open (the ready pipe
        // must end when the worker does).
        drop(ready_write);
        let pid = child.id();
        let relays = [Relay::new(out_read, false), Relay::new(err_read, true)];
        {
            let mut all = self.relays.lock();
            all.retain(|r| !r.pending.lock().1);
            all.extend(relays.iter().cloned());
        }
        for relay in relays {
            crate::threads::spawn("keepwarm-relay", None, move || relay.pump())?;
        }
        let events = self.events.clone();
        crate::threads::spawn("keepwarm-ready", None, move || {
            let mut ready = File::from(ready_read);
            let mut byte = [0u8; 1];
            if matches!(ready.read(&mut byte), Ok(1)) {
                let _ = events.send(Ev::Ready(pid));
            }
        })?;
        let events = self.events.clone();
        crate::threads::spawn("keepwarm-reaper", None, move || {
            if let Ok(status) = child.wait() {
                let _ = events.send(Ev::Died(pid, status));
            }
        })?;
        Ok(Worker {
            pid,
            started: Instant::now(),
        })
    }
}

/// Runs `keepwarm run` as a supervisor until the user leaves. Each worker
/// is this program started with `worker_args` (a `run` command line: for
/// `keepwarm run`, its own arguments; for `keepwarm dev`, `run` on the built
/// library) and [`WORKER_ENV`].
pub fn supervise(
    args: &RunArgs,
    socket: Option<PathBuf>,
    worker_args: Vec<std::ffi::OsString>,
) -> anyhow::Result<()> {
    crate::threads::register_current();
    let library = args.libraries[0].clone();
    let socket = match socket {
        Some(s) => s,
        None => crate::paths::default_socket(&library)?,
    };
    let (events, rx) = mpsc::channel::<Ev>();
    let signal_handle = {
        let events = events.clone();
        crate::serve::exit_signals(move |e| {
            let _ = events.send(Ev::Exit(e));
        })?
    };
    let server = Server::bind(&socket)?;
    let runtime = crate::paths::runtime_dir()?;
    crate::paths::sweep_dead_shadow_dirs(&runtime);
    let builds = crate::paths::ShadowDir::create_for_builds(&runtime)?;
    let black_box = BlackBox::create().context("creating the black box (memfd)")?;
    // Without --persist the caches live in the worker's memory: record
    // them in memory of ours, so a new worker starts with every entry.
    let journal = match args.persist {
        Some(_) => None,
        None => Some(
            keepwarm::journal::Journal::create().context("creating the crash journal (memfd)")?,
        ),
    };
    let relays = Arc::new(Mutex::new(Vec::new()));
    let launch = Launch {
        server: &server,
        socket: &socket,
        black_box: &black_box,
        journal: journal.as_ref(),
        builds: builds.path(),
        events: &events,
        relays: &relays,
        worker_args: &worker_args,
    };
    let mut history = History {
        restarts: 0,
        last_crash: None,
        bad: Vec::new(),
        lone_crashes: VecDeque::new(),
        recent_restarts: VecDeque::new(),
        next_generation: 1,
    };
    let terminal = TerminalState::save();
    let mut worker = launch.spawn(&history, None)?;
    let mut ever_ready = false;
    // The crash being recovered from: what to say once the new worker serves.
    let mut recovering: Option<(Verdict, Instant)> = None;
    let mut prompt_started = false;
    {
        // Said at once, not when the worker serves: a client may be
        // answered before the supervisor hears that the worker is ready.
        use std::io::IsTerminal;
        if !args.no_repl && std::io::stdin().is_terminal() && !crate::serve::owns_terminal() {
            crate::output::say(BACKGROUND);
            prompt_started = true;
        }
    }
    let reason = loop {
        let Ok(event) = rx.recv() else {
            break Exit::Quit;
        };
        match event {
            Ev::Exit(reason) => break reason,
            Ev::Ready(pid) if pid == worker.pid => {
                if let Some((verdict, since)) = recovering.take() {
                    say_restarted(&verdict, since.elapsed(), &black_box);
                }
                ever_ready = true;
                if !prompt_started {
                    prompt_started = true;
                    start_prompt(args, &socket, &relays, &events)?;
                }
            }
            Ev::Died(pid, status) if pid == worker.pid => {
                let seen = black_box.snapshot();
                if !ever_ready && status.signal().is_none() {
                    // The worker could not start (a locked --persist DIR, a
                    // bad argument): it said why; leave as it did.
                    drain_all(&relays);
                    cleanup(&socket, &builds);
                    terminal.restore();
                    signal_handle.close();
                    std::process::exit(status.code().unwrap_or(1));
                }
                let died = Instant::now();
                let verdict = history.judge(status, &seen, builds.path());
                drain_all(&relays);
                history.restarts += 1;
                history.last_crash = Some(verdict.crash.clone());
                // A crash in a call is that call's fault, and the user sees
                // it: restart at once. Crashes with no call running that no
                // bad build explains (a machine problem, a build that
                // crashes later than its probation) are a loop: slow it down.
                if verdict.crash.function.is_none() && verdict.bad.is_none() {
                    let now = Instant::now();
                    history.recent_restarts.push_back(now);
                    while history
                        .recent_restarts
                        .front()
                        .is_some_and(|t| now.duration_since(*t) > LOOP_WINDOW)
                    {
                        history.recent_restarts.pop_front();
                    }
                    if history.recent_restarts.len() > LOOP_RESTARTS {
                        std::thread::sleep(LOOP_PAUSE);
                    }
                }
                black_box.clear();
                let _ = worker.started;
                worker = launch.spawn(&history, verdict.start_from.clone())?;
                recovering = Some((verdict, died));
            }
            _ => {}
        }
    };
    // One path out: stop the worker (it lets calls finish, unloads, removes
    // its shadow directory), print what it printed, remove our files.
    stop_worker(worker.pid, &rx);
    drain_all(&relays);
    terminal.restore();
    cleanup(&socket, &builds);
    drop(server);
    signal_handle.close();
    if let Exit::Signal(_) = reason {
        crate::output::say("keepwarm: stopped by a signal; shut down cleanly");
    }
    Ok(())
}

fn say_restarted(verdict: &Verdict, took: Duration, black_box: &BlackBox) {
    let mut line = format!("keepwarm: plugin crashed: {}", verdict.crash.what());
    if let Some(bad) = &verdict.bad {
        line.push_str(&format!(
            "; build {:08x} is not loaded again until the file changes",
            bad.hash
        ));
    }
    let serving = black_box.snapshot().live.map(|l| l.0);
    match serving {
        Some(g) => line.push_str(&format!(
            "; restarted on generation {g} in {} ms",
            took.as_millis()
        )),
        None => line.push_str(&format!(
            "; restarted in {} ms with no build loaded: waiting for the next build",
            took.as_millis()
        )),
    }
    crate::output::say(&line);
}

/// What a host started in the background says instead of a prompt.
const BACKGROUND: &str = "keepwarm: running in the background, so no prompt (as with --no-repl); use `keepwarm call …` from any terminal; stop it with `kill %1`";

fn start_prompt(
    args: &RunArgs,
    socket: &Path,
    relays: &Arc<Mutex<Vec<Arc<Relay>>>>,
    events: &mpsc::Sender<Ev>,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if args.no_repl || !std::io::stdin().is_terminal() {
        return Ok(());
    }
    if !crate::serve::owns_terminal() {
        crate::output::say(BACKGROUND);
        return Ok(());
    }
    let backend: Arc<dyn crate::repl::Backend> = Arc::new(Remote {
        socket: socket.to_owned(),
        relays: Arc::clone(relays),
    });
    let events = events.clone();
    crate::repl::spawn(backend, move || {
        let _ = events.send(Ev::Exit(Exit::Quit));
    })?;
    Ok(())
}

fn drain_all(relays: &Arc<Mutex<Vec<Arc<Relay>>>>) {
    for relay in relays.lock().iter() {
        relay.drain();
    }
}

/// Asks worker `pid` to stop and waits for it (killing it after
/// [`STOP_GRACE`]).
fn stop_worker(pid: u32, rx: &mpsc::Receiver<Ev>) {
    // SAFETY: kill sends a signal to our own child; no memory involved.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ev::Died(p, _)) if p == pid => return,
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // SAFETY: as above.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                let _ = rx.recv_timeout(Duration::from_secs(2));
                return;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn cleanup(socket: &Path, builds: &crate::paths::ShadowDir) {
    let _ = std::fs::remove_file(socket);
    builds.remove();
}
