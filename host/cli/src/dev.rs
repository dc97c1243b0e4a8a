//! `keepwarm dev`: the whole edit loop in one command. Build the plugin crate
//! with cargo, serve its artifact, watch the crate's sources, and rebuild on
//! every change; the host's own watcher then reloads the new library.
//!
//! The artifact is found through cargo's JSON messages (the
//! `compiler-artifact` whose target kinds include `cdylib`), never by
//! guessing paths. Source changes are debounced ([`DEBOUNCE`]); changes that
//! arrive during a build cause exactly one more build after it. A build that
//! fails prints the compiler's errors and changes nothing: the live
//! generation keeps serving.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use notify::{RecursiveMode, Watcher as _};

/// Quiet time after the last source change before a build starts: an
/// editor's save is often several writes.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// `-p PACKAGE`, or the package of the current directory.
    pub package: Option<String>,
    /// `--release`.
    pub release: bool,
    /// Where to run cargo.
    pub dir: PathBuf,
}

/// The result of one build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// The plugin library cargo produced.
    pub library: PathBuf,
    /// The directory of the package's manifest (what to watch).
    pub package_dir: PathBuf,
}

/// Picks the cdylib artifact from cargo's JSON message lines (parsed by
/// `cargo_metadata`).
pub fn find_artifact<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<Built> {
    use cargo_metadata::{CrateType, Message};
    let mut found = None;
    for line in lines {
        let Ok(Message::CompilerArtifact(artifact)) = serde_json::from_str::<Message>(line) else {
            continue;
        };
        if !artifact.target.crate_types.contains(&CrateType::CDyLib) {
            continue;
        }
        let library = artifact
            .filenames
            .into_iter()
            .find(|f| f.extension() == Some("so"));
        if let Some(library) = library {
            found = Some(Built {
                library: library.into_std_path_buf(),
                package_dir: artifact
                    .manifest_path
                    .parent()
                    .map_or_else(|| PathBuf::from("."), |d| d.as_std_path().to_owned()),
            });
        }
    }
    found
}

/// The package `keepwarm dev` builds when no `-p` is given, from `cargo
/// metadata`: the package whose directory holds `dir` (the crate you are
/// in), else the one workspace default member with a `cdylib`, else the one
/// `cdylib` package of the workspace. Several candidates are an error that
/// lists them, so the choice is never cargo's or ours.
pub fn pick_package(dir: &Path) -> anyhow::Result<Option<String>> {
    use cargo_metadata::{CrateType, MetadataCommand};
    let metadata = MetadataCommand::new()
        .current_dir(dir)
        .no_deps()
        .exec()
        .context("running cargo metadata")?;
    let is_cdylib = |p: &cargo_metadata::Package| {
        p.targets
            .iter()
            .any(|t| t.crate_types.contains(&CrateType::CDyLib))
    };
    let members: Vec<&cargo_metadata::Package> = metadata.workspace_packages();
    let dir = std::path::absolute(dir)?;
    // The innermost package directory containing `dir`.
    if let Some(here) = members
        .iter()
        .filter(|p| {
            p.manifest_path
                .parent()
                .is_some_and(|d| dir.starts_with(d.as_std_path()))
        })
        .max_by_key(|p| p.manifest_path.as_str().len())
    {
        if here.manifest_path.parent().map(|d| d.as_std_path())
            != Some(metadata.workspace_root.as_std_path())
            || is_cdylib(here)
        {
            return Ok(Some(here.name.to_string()));
        }
    }
    let defaults: Vec<&&cargo_metadata::Package> = members
        .iter()
        .filter(|p| metadata.workspace_default_members.contains(&p.id) && is_cdylib(p))
        .collect();
    let all: Vec<&&cargo_metadata::Package> = members.iter().filter(|p| is_cdylib(p)).collect();
    let only_default = metadata.workspace_default_members.len() < members.len();
    match (only_default, defaults.as_slice(), all.as_slice()) {
        (true, [one], _) | (_, _, [one]) => Ok(Some(one.name.to_string())),
        (_, _, []) => bail!(
            "no cdylib package in the workspace at {}; add `crate-type = [\"cdylib\"]` under [lib]",
            metadata.workspace_root
        ),
        (_, _, several) => {
            let names: Vec<String> = several.iter().map(|p| p.name.to_string()).collect();
            bail!(
                "several cdylib packages: {}; pass -p NAME (or run keepwarm dev in the crate's directory)",
                names.join(", ")
            )
        }
    }
}

/// Runs `cargo build --message-format=json-render-diagnostics`, sending the
/// compiler's rendered output to `print`; returns the artifact, or an error
/// when the build failed or produced no cdylib.
pub fn build(spec: &BuildSpec, print: &(dyn Fn(&str) + Sync)) -> anyhow::Result<Built> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(&spec.dir)
        .args(["build", "--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(p) = &spec.package {
        cmd.args(["-p", p]);
    }
    if spec.release {
        cmd.arg("--release");
    }
    let mut child = cmd.spawn().context("running cargo build")?;
    let stderr = child.stderr.take().expect("piped");
    let relay = std::thread::scope(|s| {
        // The compiler's rendered diagnostics come on stderr; relay them as
        // they come so errors show while the build runs.
        s.spawn(|| {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let t = line.trim_start();
                if t.starts_with("Compiling")
                    || t.starts_with("Finished")
                    || t.starts_with("Blocking")
                {
                    continue;
                }
                print(&line);
            }
        });
        let stdout = child.stdout.take().expect("piped");
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let status = child.wait().context("waiting for cargo build")?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    find_artifact(relay.iter().map(String::as_str)).with_context(|| {
        format!(
            "cargo built no cdylib{}; set `crate-type = [\"cdylib\"]` under [lib], or choose the plugin with -p",
            spec.package.as_deref().map(|p| format!(" for package {p}")).unwrap_or_default()
        )
    })
}

/// Tells which generation serves now (asked of the host when a build
/// fails, to say that it keeps serving).
pub type Serving = Box<dyn Fn() -> Option<u64> + Send>;

/// Watches `built.package_dir` (minus `target/` and hidden directories) and
/// rebuilds on changes, on a background thread; a failed build is said with
/// the generation that keeps serving (`serving`).
pub fn watch_and_rebuild(
    spec: BuildSpec,
    built: &Built,
    serving: Option<Serving>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let dir = built.package_dir.clone();
    let (tx, rx) = mpsc::channel::<()>();
    let root = dir.clone();
    let ignored = move |p: &Path| {
        p.strip_prefix(&root)
            .ok()
            .and_then(|rel| rel.components().next())
            .is_some_and(|c| {
                let c = c.as_os_str().to_string_lossy();
                c == "target" || c.starts_with('.')
            })
    };
    let dir_for_events = dir.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| p.starts_with(&dir_for_events) && !ignored(p))
        {
            let _ = tx.send(());
        }
    })?;
    watcher
        .watch(&dir, RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    std::thread::Builder::new()
        .name("keepwarm-dev".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Debounce: wait until the sources are quiet.
                while rx.recv_timeout(DEBOUNCE).is_ok() {}
                loop {
                    let started = Instant::now();
                    crate::output::say("keepwarm dev: sources changed, building…");
                    let print = |line: &str| crate::output::say(line);
                    match build(&spec, &print) {
                        Ok(_) => crate::output::say(&format!(
                            "keepwarm dev: built in {:.1} s",
                            started.elapsed().as_secs_f64()
                        )),
                        Err(e) => match serving.as_ref().and_then(|s| s()) {
                            Some(generation) if generation > 0 => crate::output::say(&format!(
                                "keepwarm dev: {e:#}; generation {generation} keeps serving"
                            )),
                            _ => crate::output::say(&format!(
                                "keepwarm dev: {e:#}; the last good build stays in place"
                            )),
                        },
                    }
                    // Changes made during the build: one more build, not one per change.
                    let mut again = false;
                    while rx.try_recv().is_ok() {
                        again = true;
                    }
                    if !again {
                        break;
                    }
                    while rx.recv_timeout(DEBOUNCE).is_ok() {}
                }
            }
        })?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cdylib_among_cargo_messages() {
        // Real lines of `cargo build --message-format=json` (paths shortened).
        let lines = [
            r#"{"reason":"compiler-artifact","package_id":"registry+https://github.com/rust-lang/crates.io-index#serde@1.0.229","manifest_path":"/r/serde/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"serde","src_path":"/r/serde/src/lib.rs","edition":"2021","doc":true,"doctest":true,"test":true},"profile":{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":false},"features":["std"],"filenames":["/t/debug/deps/libserde.rlib"],"executable":null,"fresh":true}"#,
            r#"{"reason":"compiler-message","message":{}}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/p#0.1.0","manifest_path":"/w/p/Cargo.toml","target":{"kind":["cdylib","rlib"],"crate_types":["cdylib","rlib"],"name":"p","src_path":"/w/p/src/lib.rs","edition":"2021","doc":true,"doctest":true,"test":true},"profile":{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":false},"features":[],"filenames":["/t/debug/libp.so","/t/debug/libp.rlib"],"executable":null,"fresh":false}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ];
        let built = find_artifact(lines).unwrap();
        assert_eq!(built.library, PathBuf::from("/t/debug/libp.so"));
        assert_eq!(built.package_dir, PathBuf::from("/w/p"));
        assert!(find_artifact([lines[0]]).is_none());
    }
}

#[cfg(test)]
mod picking {
    use super::pick_package;

    /// A workspace of two cdylib crates at `root` (no dependencies, so
    /// `cargo metadata` needs no network), `default` its default members.
    fn workspace(root: &std::path::Path, default: &[&str]) {
        let members = ["alpha", "beta"];
        let list = |names: &[&str]| {
            names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut manifest = format!("[workspace]\nmembers = [{}]\n", list(&members));
        if !default.is_empty() {
            manifest.push_str(&format!("default-members = [{}]\n", list(default)));
        }
        std::fs::write(root.join("Cargo.toml"), manifest).unwrap();
        for name in members {
            let dir = root.join(name);
            std::fs::create_dir_all(dir.join("src")).unwrap();
            std::fs::write(
                dir.join("Cargo.toml"),
                format!("[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n"),
            )
            .unwrap();
            std::fs::write(dir.join("src/lib.rs"), "").unwrap();
        }
    }

    #[test]
    fn exactly_one_default_member_is_the_choice_and_several_cdylibs_are_refused() {
        let one = tempfile::tempdir().unwrap();
        workspace(one.path(), &["beta"]);
        assert_eq!(pick_package(one.path()).unwrap().as_deref(), Some("beta"));

        let none = tempfile::tempdir().unwrap();
        workspace(none.path(), &[]);
        let e = pick_package(none.path()).unwrap_err().to_string();
        assert!(
            e.contains("several cdylib packages: alpha, beta; pass -p NAME"),
            "{e}"
        );

        // In a member's directory, that member.
        assert_eq!(
            pick_package(&none.path().join("alpha/src"))
                .unwrap()
                .as_deref(),
            Some("alpha")
        );
    }
}
