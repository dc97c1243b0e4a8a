//! Where the host keeps its private files: the runtime directory, shadow
//! copies and the default control socket.
//!
//! The runtime directory is `$XDG_RUNTIME_DIR/keepwarm` when that variable is
//! set, else `/tmp/keepwarm-$UID`. It is created with mode 0700 and must be
//! owned by the current user: nobody else may place a socket or a library
//! where the host would trust it.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};

/// The current user's id.
pub fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// The runtime directory, created (mode 0700) if needed.
pub fn runtime_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("keepwarm"),
        _ => std::env::temp_dir().join(format!("keepwarm-{}", uid())),
    };
    ensure_private_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` with mode 0700 if missing, and checks that it is a directory
/// owned by this user that nobody else can enter.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => return Err(e).context(|| format!("creating {}", dir.display())),
    }
    let meta =
        std::fs::symlink_metadata(dir).context(|| format!("inspecting {}", dir.display()))?;
    if !meta.is_dir() {
        return Err(Error::new(format!(
            "{} is not a directory; remove it and retry",
            dir.display()
        )));
    }
    if meta.uid() != uid() {
        return Err(Error::new(format!(
            "{} belongs to uid {}, not to you (uid {}); set XDG_RUNTIME_DIR to a directory of yours",
            dir.display(),
            meta.uid(),
            uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .context(|| format!("making {} private (chmod 700)", dir.display()))?;
    }
    Ok(())
}

/// Prefix of the shadow directories in the runtime directory.
const SHADOW_PREFIX: &str = "shadow-";
/// Prefix of a supervisor's directory of kept builds.
const BUILDS_PREFIX: &str = "builds-";

/// A host's private directory of shadow copies, `RUNTIME_DIR/shadow-PID-XXXXXX`,
/// with a lock file that the host holds (`flock`) for as long as it lives.
/// Removed by [`ShadowDir::remove`] or on drop; the directories of hosts
/// that died without removing theirs are swept by the next host that starts
/// ([`sweep_dead_shadow_dirs`]): their lock is free, since the kernel drops
/// a dead process's locks. A live host's lock is held, so its directory is
/// never touched.
pub struct ShadowDir {
    path: PathBuf,
    _lock: std::fs::File,
}

impl ShadowDir {
    /// Creates a new shadow directory in `runtime` and locks it.
    pub fn create_in(runtime: &Path) -> Result<ShadowDir> {
        ShadowDir::create_named(runtime, SHADOW_PREFIX)
    }

    /// Creates `runtime/builds-PID-XXXXXX`, locked and swept like a shadow
    /// directory: where `keepwarm run`'s supervisor keeps the builds that
    /// worked, to restart on after a crash.
    pub fn create_for_builds(runtime: &Path) -> Result<ShadowDir> {
        ShadowDir::create_named(runtime, BUILDS_PREFIX)
    }

    fn create_named(runtime: &Path, prefix: &str) -> Result<ShadowDir> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}{}-", std::process::id()))
            .tempdir_in(runtime)
            .context(|| format!("creating a shadow directory in {}", runtime.display()))?
            .keep();
        let lock = std::fs::File::create(dir.join("lock"))
            .context(|| format!("creating {}/lock", dir.display()))?;
        if !try_lock(&lock) {
            return Err(Error::new(format!("cannot lock {}/lock", dir.display())));
        }
        Ok(ShadowDir {
            path: dir,
            _lock: lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directory and everything in it.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

impl Drop for ShadowDir {
    fn drop(&mut self) {
        self.remove();
    }
}

/// An exclusive, non-blocking `flock` on `file`.
fn try_lock(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Removes the shadow directories in `runtime` whose host is gone (their
/// lock is free). Returns how many were removed.
pub fn sweep_dead_shadow_dirs(runtime: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(runtime) else {
        return 0;
    };
    let mut swept = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_shadow = name
            .to_str()
            .is_some_and(|n| n.starts_with(SHADOW_PREFIX) || n.starts_with(BUILDS_PREFIX));
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if !is_shadow || !kind.is_dir() {
            continue;
        }
        // Only directories with a lock file are ours to judge.
        let Ok(lock) = std::fs::File::open(entry.path().join("lock")) else {
            continue;
        };
        if try_lock(&lock) && std::fs::remove_dir_all(entry.path()).is_ok() {
            swept += 1;
        }
    }
    swept
}

/// The default control socket of a host serving `library`:
/// `RUNTIME_DIR/<file stem>-<8 hex digits of the absolute path's crc32>.sock`,
/// so two hosts on two libraries never share one.
pub fn default_socket(library: &Path) -> Result<PathBuf> {
    let absolute =
        std::path::absolute(library).context(|| format!("resolving {}", library.display()))?;
    let stem = absolute
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    let hash = crc32fast::hash(absolute.as_os_str().as_encoded_bytes());
    Ok(runtime_dir()?.join(format!("{stem}-{hash:08x}.sock")))
}

/// The default control socket of `keepwarm serve`: `RUNTIME_DIR/serve.sock`.
pub fn serve_socket() -> Result<PathBuf> {
    Ok(runtime_dir()?.join("serve.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_libraries_get_two_sockets() {
        let a = default_socket(Path::new("/x/a/libp.so")).unwrap();
        let b = default_socket(Path::new("/x/b/libp.so")).unwrap();
        assert_ne!(a, b);
        assert!(a
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("libp-"));
        let mode = std::fs::metadata(a.parent().unwrap()).unwrap().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
