//! Loading one plugin library: readiness check, shadow copy, `dlopen`, entry
//! symbol, ABI check and descriptor parsing.
//!
//! The loader works on the bytes it read once: it checks those bytes, writes
//! exactly those bytes to a unique shadow file in the host's private
//! directory and `dlopen`s the shadow. Two reasons:
//! - glibc's `dlopen` hands back the already-loaded handle for a path it
//!   knows, so a reload must use a new path each time;
//! - `dlopen` of a truncated file can map pages past its end, and the first
//!   touch of such a page kills the host with SIGBUS. Checking that every
//!   loadable segment and the section table lie inside the bytes we copy
//!   rules that out, and tells a file still being written apart from a file
//!   that is not a library at all.

use std::ffi::c_void;
use std::fmt;
use std::path::{Path, PathBuf};

use keepwarm_abi::{self as abi, KwCacheDecl, KwFunction, KwHostApi, KwOutput, KwPlugin, KwStatus};
use object::read::elf::{FileHeader, ProgramHeader};
use object::{elf, Endianness};

use crate::cache::Bounds;

/// Why a library was not loaded.
#[derive(Debug)]
pub enum LoadError {
    /// There is no file at the path (yet).
    Missing(PathBuf),
    /// The file looks like a shared library still being written: empty, or
    /// shorter than its own headers say. Retry shortly.
    Incomplete(String),
    /// The file is not a shared library for this machine.
    NotALibrary(String),
    /// `dlopen` refused the file.
    Dlopen(String),
    /// The library does not export `keepwarm_plugin`.
    NoEntrySymbol,
    /// The plugin was built for another ABI version.
    AbiMismatch {
        /// The version in the plugin's descriptor.
        plugin: u32,
    },
    /// The descriptor is malformed.
    BadDescriptor(String),
    /// The plugin's on_load hook refused the load (or panicked).
    OnLoad {
        /// The status it returned.
        status: KwStatus,
        /// The message it wrote.
        message: String,
    },
    /// The path is not a regular file (a FIFO, a device, a directory, a socket).
    NotRegular(String),
    /// The file is larger than any plugin library this host will read.
    TooLarge(u64),
    /// The runtime directory has no room for the shadow copy. Retried when
    /// space returns.
    NoSpace {
        /// The directory that is full.
        dir: PathBuf,
        /// Bytes free there.
        free: u64,
        /// Bytes the shadow copy needs.
        needed: u64,
    },
    /// Reading the file or writing the shadow copy failed.
    Io(String),
    /// This build crashed the process that loaded it before (in `on_load`,
    /// or on a thread of its own right after loading): it is not loaded
    /// again until the file changes, or a forced reload. The text says how
    /// it crashed.
    Crashed(String),
}

impl LoadError {
    /// Whether the file may still be being written, so a retry may succeed.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, LoadError::Incomplete(_))
    }

    /// Whether the failure is about the machine, not the file (no space, no
    /// file descriptors, an I/O error): the same bytes may load later, so
    /// they are not remembered as broken.
    pub fn is_transient(&self) -> bool {
        matches!(self, LoadError::NoSpace { .. } | LoadError::Io(_))
    }
}

/// The largest library the host reads, so that a path pointing at an
/// endless source can never exhaust memory. Debug builds of big plugins are
/// tens of MiB; 1 GiB leaves room for any real library.
pub const MAX_LIBRARY_BYTES: u64 = 1 << 30;

/// Identity of the file at the library path: when it differs from the
/// loaded generation's, a new build has landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

impl FileId {
    /// The identity of `meta`.
    pub fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }

    /// The identity of the file at `path` (symlinks followed), if any.
    pub fn at(path: &Path) -> Option<FileId> {
        std::fs::metadata(path).ok().map(|m| FileId::of(&m))
    }
}

/// What a regular file is not: the words for the message.
fn describe_file_type(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Whether another process has `file` open for writing, asked the kernel
/// through a read lease: `F_SETLEASE F_RDLCK` fails with `EAGAIN` exactly
/// when some file description has the file open for writing. `None` when
/// the file system does not support leases (then the watcher's quiet period
/// is the only guard).
fn open_for_writing(file: &std::fs::File) -> Option<bool> {
    use std::os::fd::AsRawFd;
    // Linux's F_SETSIG (fcntl.h), which the libc crate does not export.
    const F_SETSIG: libc::c_int = 10;
    let fd = file.as_raw_fd();
    // A writer that opens the file while we hold the lease makes the kernel
    // signal us; SIGURG is ignored by default, unlike the default SIGIO,
    // which would end the process. The lease is released at once anyway.
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    unsafe {
        if libc::fcntl(fd, F_SETSIG, libc::SIGURG) != 0 {
            return None;
        }
        if libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) == 0 {
            libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK);
            return Some(false);
        }
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Some(true),
        _ => None,
    }
}

/// Reads the library at `path` if it is a regular file that nobody is
/// writing and that did not change while it was read; returns its bytes and
/// identity. Special files are refused without being opened for long (a
/// FIFO is opened non-blocking, a device is never read).
pub fn read_library(path: &Path) -> Result<(Vec<u8>, FileId), LoadError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LoadError::Missing(path.to_owned()))
        }
        Err(e) => return Err(LoadError::Io(format!("inspecting {}: {e}", path.display()))),
    };
    if !meta.is_file() {
        return Err(LoadError::NotRegular(describe_file_type(&meta).into()));
    }
    if meta.len() > MAX_LIBRARY_BYTES {
        return Err(LoadError::TooLarge(meta.len()));
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LoadError::Missing(path.to_owned()),
            _ => LoadError::Io(format!("opening {}: {e}", path.display())),
        })?;
    let before = file
        .metadata()
        .map_err(|e| LoadError::Io(format!("inspecting {}: {e}", path.display())))?;
    // Swapped between the check and the open: check what was opened.
    if !before.is_file() {
        return Err(LoadError::NotRegular(describe_file_type(&before).into()));
    }
    if open_for_writing(&file) == Some(true) {
        return Err(LoadError::Incomplete(
            "another process has it open for writing".into(),
        ));
    }
    let mut bytes = Vec::with_capacity(before.len() as usize);
    (&mut file)
        .take(MAX_LIBRARY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| LoadError::Io(format!("reading {}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_LIBRARY_BYTES {
        return Err(LoadError::TooLarge(bytes.len() as u64));
    }
    let after = file
        .metadata()
        .map_err(|e| LoadError::Io(format!("inspecting {}: {e}", path.display())))?;
    let id = FileId::of(&before);
    if FileId::of(&after) != id || bytes.len() as u64 != id.size {
        return Err(LoadError::Incomplete("it changed while it was read".into()));
    }
    if open_for_writing(&file) == Some(true) {
        return Err(LoadError::Incomplete(
            "another process opened it for writing while it was read".into(),
        ));
    }
    Ok((bytes, id))
}

/// Free bytes for an unprivileged writer in `dir`, if the file system says.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` a buffer statvfs fills.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::useless_conversion)] // c_ulong is not u64 everywhere
    Some(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Missing(p) => write!(
                f,
                "no file at {} — build the plugin (cargo build) or check the path",
                p.display()
            ),
            LoadError::Incomplete(why) => write!(
                f,
                "the file is incomplete ({why}) — it is still being written, or the build was interrupted; rebuild it"
            ),
            LoadError::NotALibrary(why) => write!(
                f,
                "not a shared library: {why} — point keepwarm at the plugin's .so (a cdylib)"
            ),
            LoadError::Dlopen(why) => write!(f, "dlopen failed: {why}"),
            LoadError::NoEntrySymbol => write!(
                f,
                "the library has no `{}` symbol, so it is not a keepwarm plugin — declare one with keepwarm_api::plugin! (Rust), or export `const KwPlugin *keepwarm_plugin(void)` (C, see keepwarm.h)",
                keepwarm_abi::KW_ENTRY_SYMBOL
            ),
            LoadError::AbiMismatch { plugin } => write!(
                f,
                "built for keepwarm ABI {plugin}, this host speaks ABI {} — rebuild the plugin against keepwarm-api {}",
                abi::KW_ABI_VERSION,
                env!("CARGO_PKG_VERSION")
            ),
            LoadError::BadDescriptor(why) => write!(f, "malformed plugin descriptor: {why}"),
            LoadError::OnLoad { status, message } => {
                let what = if *status == abi::KW_PANIC { "panicked" } else { "failed" };
                write!(f, "the plugin's on_load {what} (status {status}): {message}")
            }
            LoadError::NotRegular(what) => write!(
                f,
                "the path is {what}, not a regular file — point keepwarm at the plugin's .so"
            ),
            LoadError::TooLarge(size) => write!(
                f,
                "the file is {} MiB, more than the {} MiB a plugin library may be — check the path",
                size >> 20,
                MAX_LIBRARY_BYTES >> 20
            ),
            LoadError::NoSpace { dir, free, needed } => write!(
                f,
                "no space in {} ({} MiB free, the library is {} MiB) — free some space there; the build loads as soon as it fits",
                dir.display(),
                free >> 20,
                needed.div_ceil(1 << 20)
            ),
            LoadError::Io(why) => write!(f, "{why}"),
            LoadError::Crashed(how) => write!(
                f,
                "this build crashed the host ({how}); it is not loaded again until the file changes — fix it and rebuild, or `keepwarm reload` to try it once more"
            ),
        }
    }
}

impl std::error::Error for LoadError {}

/// The machine this host runs on, as an ELF `e_machine`.
fn host_machine() -> Option<elf::Machine> {
    if cfg!(target_arch = "x86_64") {
        Some(elf::EM_X86_64)
    } else if cfg!(target_arch = "aarch64") {
        Some(elf::EM_AARCH64)
    } else {
        None
    }
}

fn describe_non_elf(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(512)];
    if std::str::from_utf8(head).is_ok() {
        format!("a text file of {} bytes, not an ELF file", bytes.len())
    } else {
        let shown: Vec<String> = head.iter().take(4).map(|b| format!("{b:02x}")).collect();
        format!(
            "{} bytes that are not an ELF file (they start with {})",
            bytes.len(),
            shown.join(" ")
        )
    }
}

/// Checks that `bytes` are a complete 64-bit ELF shared object for this
/// machine: every loadable segment and the section header table lie inside
/// the file.
pub fn check_complete_shared_object(bytes: &[u8]) -> Result<(), LoadError> {
    const MAGIC: &[u8] = b"\x7fELF";
    if bytes.is_empty() {
        return Err(LoadError::Incomplete("empty file".into()));
    }
    if bytes.len() < MAGIC.len() {
        return if MAGIC.starts_with(bytes) {
            Err(LoadError::Incomplete(format!("{} bytes", bytes.len())))
        } else {
            Err(LoadError::NotALibrary(describe_non_elf(bytes)))
        };
    }
    if &bytes[..4] != MAGIC {
        return Err(LoadError::NotALibrary(describe_non_elf(bytes)));
    }
    if bytes.len() < std::mem::size_of::<elf::FileHeader64<Endianness>>() {
        return Err(LoadError::Incomplete(format!(
            "{} bytes, shorter than an ELF header",
            bytes.len()
        )));
    }
    if bytes[4] != 2
    /* EI_CLASS: ELFCLASS64 */
    {
        return Err(LoadError::NotALibrary(
            "a 32-bit ELF file; this host loads 64-bit libraries".into(),
        ));
    }
    let header = elf::FileHeader64::<Endianness>::parse(bytes)
        .map_err(|e| LoadError::NotALibrary(format!("unreadable ELF header: {e}")))?;
    let endian = header
        .endian()
        .map_err(|e| LoadError::NotALibrary(format!("unreadable ELF header: {e}")))?;
    match header.e_type(endian) {
        elf::ET_DYN => {}
        elf::ET_EXEC => {
            return Err(LoadError::NotALibrary(
                "an ELF executable, not a shared library".into(),
            ))
        }
        elf::ET_REL => {
            return Err(LoadError::NotALibrary(
                "an ELF object file (.o), not a shared library".into(),
            ))
        }
        other => {
            return Err(LoadError::NotALibrary(format!(
                "an ELF file of type {other}, not a shared library"
            )))
        }
    }
    let machine = header.e_machine(endian);
    if host_machine().is_some_and(|m| m != machine) {
        return Err(LoadError::NotALibrary(format!(
            "a shared library for another machine (ELF machine {machine})"
        )));
    }
    let segments = header.program_headers(endian, bytes).map_err(|_| {
        LoadError::Incomplete(format!(
            "{} bytes, the program headers run past the end",
            bytes.len()
        ))
    })?;
    let len = bytes.len() as u64;
    let mut loadable = 0;
    for segment in segments {
        if segment.p_type(endian) != elf::PT_LOAD {
            continue;
        }
        loadable += 1;
        let end = segment
            .p_offset(endian)
            .saturating_add(segment.p_filesz(endian));
        if end > len {
            return Err(LoadError::Incomplete(format!(
                "{len} bytes, but a loadable segment ends at byte {end}"
            )));
        }
    }
    if loadable == 0 {
        return Err(LoadError::NotALibrary(
            "an ELF file with no loadable segment".into(),
        ));
    }
    let shoff = header.e_shoff(endian);
    let shend = shoff
        .saturating_add(u64::from(header.e_shnum(endian)) * u64::from(header.e_shentsize(endian)));
    if shoff != 0 && shend > len {
        return Err(LoadError::Incomplete(format!(
            "{len} bytes, but the section table ends at byte {shend}"
        )));
    }
    // Linkers write the section table last, so a complete library ends
    // exactly where it does. A longer file is a new, shorter build written
    // over an old one in place (rsync --inplace, dd conv=notrunc) that has
    // not been truncated yet: its tail is the old build's bytes.
    if shoff != 0 && shend < len {
        return Err(LoadError::Incomplete(format!(
            "{len} bytes, but its section table ends at byte {shend}: old bytes after the new ones, a rewrite in place that is not finished"
        )));
    }
    Ok(())
}

/// An exported function of a loaded plugin.
#[derive(Debug, Clone)]
pub struct Function {
    /// Its name.
    pub name: String,
    /// Its shell.
    pub call: unsafe extern "C" fn(abi::KwSlice, *mut KwOutput) -> KwStatus,
    /// Its signature as the plugin describes it (`square(x: u64) -> u64`).
    pub signature: Option<String>,
}

/// A cache a plugin declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheDecl {
    /// The cache's name.
    pub name: String,
    /// Its bounds, when the plugin set any.
    pub bounds: Option<Bounds>,
    /// Its code hash, or 0.
    pub code_hash: u64,
}

/// A plugin library that is mapped and checked, but not live yet.
pub struct Library {
    /// The plugin's name from its descriptor.
    pub name: String,
    /// Its exported functions.
    pub functions: Vec<Function>,
    /// Its declared caches.
    pub caches: Vec<CacheDecl>,
    on_load: Option<unsafe extern "C" fn(*const KwHostApi, *mut KwOutput) -> KwStatus>,
    on_unload: Option<unsafe extern "C" fn()>,
    /// Whether on_load refused: then on_unload is not called (an
    /// initialization that failed has nothing to tear down).
    refused: bool,
    /// The process's threads before the library was opened: any other
    /// thread not the host's may be one it started.
    threads_before: std::collections::BTreeSet<i32>,
    shadow: PathBuf,
    // Declared last: dropped (dlclose) after everything above that points
    // into the library.
    handle: Option<libloading::os::unix::Library>,
}

impl fmt::Debug for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Library")
            .field("name", &self.name)
            .field("functions", &self.functions.len())
            .field("shadow", &self.shadow)
            .finish()
    }
}

/// Reads a string from the descriptor.
///
/// # Safety
/// `s` must point to `len` bytes valid while the library is loaded.
unsafe fn descriptor_str(s: abi::KwSlice, what: &str) -> Result<String, LoadError> {
    // SAFETY: per this function's contract.
    let bytes = unsafe { s.as_bytes() }
        .ok_or_else(|| LoadError::BadDescriptor(format!("{what} is a NULL pointer")))?;
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| LoadError::BadDescriptor(format!("{what} is not UTF-8")))
}

/// Reads an array from the descriptor.
///
/// # Safety
/// `ptr` must be NULL with `count` 0, or point to `count` valid `T`.
unsafe fn descriptor_array<'a, T>(
    ptr: *const T,
    count: usize,
    what: &str,
) -> Result<&'a [T], LoadError> {
    if count == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(LoadError::BadDescriptor(format!(
            "{what} is NULL with {count} entries"
        )));
    }
    // SAFETY: non-NULL and, per the contract, `count` valid elements.
    Ok(unsafe { std::slice::from_raw_parts(ptr, count) })
}

impl Library {
    /// Checks `bytes` (read from `source`), writes them to `shadow` and loads
    /// the shadow copy. Does not run on_load.
    pub fn open(bytes: &[u8], shadow: PathBuf) -> Result<Library, LoadError> {
        check_complete_shared_object(bytes)?;
        if let Err(e) = std::fs::write(&shadow, bytes) {
            // Never leave a partial copy behind: it would fill the
            // directory further and could be mistaken for a library.
            let _ = std::fs::remove_file(&shadow);
            let dir = shadow.parent().unwrap_or(Path::new("/")).to_owned();
            return Err(match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => LoadError::NoSpace {
                    free: free_bytes(&dir).unwrap_or(0),
                    needed: bytes.len() as u64,
                    dir,
                },
                _ => LoadError::Io(format!("writing the shadow copy {}: {e}", shadow.display())),
            });
        }
        let result = Self::open_shadow(&shadow);
        if result.is_err() {
            let _ = std::fs::remove_file(&shadow);
        }
        result
    }

    fn open_shadow(shadow: &Path) -> Result<Library, LoadError> {
        use libloading::os::unix::{Library as Raw, RTLD_LOCAL, RTLD_NOW};
        // Before dlopen: constructors may start threads too.
        let threads_before = crate::threads::alive();
        // SAFETY: dlopen runs the library's initializers. The file passed the
        // completeness check above, so no mapping runs past its end; running
        // its constructors is the trust a plugin host places in the plugin.
        // RTLD_LOCAL keeps its symbols out of the global namespace so two
        // generations never bind to each other's symbols.
        let handle = unsafe { Raw::open(Some(shadow), RTLD_NOW | RTLD_LOCAL) }
            .map_err(|e| LoadError::Dlopen(e.to_string()))?;
        // SAFETY: the symbol, when present, is the entry function of the ABI,
        // with the signature KwEntryFn (the ABI's contract).
        let entry: abi::KwEntryFn =
            match unsafe { handle.get::<abi::KwEntryFn>(b"keepwarm_plugin\0") } {
                Ok(sym) => *sym,
                Err(_) => {
                    close_or_keep(handle, &threads_before);
                    return Err(LoadError::NoEntrySymbol);
                }
            };
        // SAFETY: calling the entry symbol of the ABI; it takes no arguments
        // and returns a pointer to static data.
        let descriptor = unsafe { entry() };
        if descriptor.is_null() {
            return Err(LoadError::BadDescriptor(
                "the entry symbol returned NULL".into(),
            ));
        }
        // The first two fields (abi_version, size) are the same in every ABI
        // version; read them before trusting the rest of the layout.
        // SAFETY: non-NULL, and every ABI version starts with two u32 fields.
        let (version, size) = unsafe {
            let head = descriptor as *const u32;
            (head.read_unaligned(), head.add(1).read_unaligned())
        };
        if version != abi::KW_ABI_VERSION {
            return Err(LoadError::AbiMismatch { plugin: version });
        }
        if (size as usize) < abi::KW_PLUGIN_MIN_SIZE {
            return Err(LoadError::BadDescriptor(format!(
                "descriptor of {size} bytes, ABI 1 needs at least {}",
                abi::KW_PLUGIN_MIN_SIZE
            )));
        }
        // SAFETY: ABI 1 and at least the fields every ABI 1 descriptor has;
        // static in the library, valid while `handle` stays open. The
        // fields appended since are read only below, when `size` covers
        // them (read_unaligned through a raw pointer, never through `d`).
        let d: &KwPlugin = unsafe { &*descriptor };
        let signatures: *const abi::KwSlice = if size as usize
            >= std::mem::offset_of!(KwPlugin, signatures)
                + std::mem::size_of::<*const abi::KwSlice>()
        {
            // SAFETY: `size` says the plugin's descriptor has this field.
            unsafe { std::ptr::addr_of!((*descriptor).signatures).read_unaligned() }
        } else {
            std::ptr::null()
        };
        // SAFETY: the descriptor's slices and arrays are static data of the
        // library (ABI contract), valid while `handle` stays open.
        let (name, functions, caches) = unsafe {
            let name = descriptor_str(d.name, "the plugin name")?;
            let fns: &[KwFunction] = descriptor_array(d.functions, d.function_count, "functions")?;
            let signatures: &[abi::KwSlice] = if signatures.is_null() {
                &[]
            } else {
                descriptor_array(signatures, d.function_count, "signatures")?
            };
            let decls: &[KwCacheDecl] = descriptor_array(d.caches, d.cache_count, "caches")?;
            let mut functions = Vec::with_capacity(fns.len());
            for (i, f) in fns.iter().enumerate() {
                let name = descriptor_str(f.name, &format!("the name of function {i}"))?;
                if functions.iter().any(|g: &Function| g.name == name) {
                    return Err(LoadError::BadDescriptor(format!(
                        "function {name:?} is exported twice"
                    )));
                }
                let signature = match signatures.get(i) {
                    Some(s) if s.len > 0 => Some(descriptor_str(
                        *s,
                        &format!("the signature of function {name}"),
                    )?),
                    _ => None,
                };
                functions.push(Function {
                    name,
                    call: f.call,
                    signature,
                });
            }
            let mut caches = Vec::with_capacity(decls.len());
            for (i, c) in decls.iter().enumerate() {
                let name = descriptor_str(c.name, &format!("the name of cache {i}"))?;
                let bounds = (c.max_entries != 0 || c.max_bytes != 0).then(|| Bounds {
                    max_entries: usize::try_from(c.max_entries)
                        .ok()
                        .and_then(std::num::NonZeroUsize::new)
                        .unwrap_or(Bounds::default().max_entries),
                    // Undeclared: the default bound, as for any cache.
                    max_bytes: Some(if c.max_bytes == 0 {
                        crate::cache::DEFAULT_MAX_BYTES
                    } else {
                        c.max_bytes
                    }),
                });
                if let Some(seen) = caches.iter_mut().find(|d: &&mut CacheDecl| d.name == name) {
                    // Declared twice: fine when one of the two carries no
                    // identity (plugin!'s `caches:` bounding a #[memo]
                    // cache); two identities are two functions that would
                    // read each other's entries.
                    if seen.code_hash != 0 && c.code_hash != 0 && seen.code_hash != c.code_hash {
                        return Err(LoadError::BadDescriptor(format!(
                            "the cache `{name}` is declared by two different #[memo] functions (two functions named `{name}` in different modules?); they would serve each other's values — give each its own #[memo(name = \"...\")]"
                        )));
                    }
                    if seen.code_hash == 0 {
                        seen.code_hash = c.code_hash;
                    }
                    if seen.bounds.is_none() {
                        seen.bounds = bounds;
                    }
                    continue;
                }
                caches.push(CacheDecl {
                    name,
                    bounds,
                    code_hash: c.code_hash,
                });
            }
            (name, functions, caches)
        };
        Ok(Library {
            name,
            functions,
            caches,
            on_load: d.on_load,
            on_unload: d.on_unload,
            refused: false,
            threads_before,
            shadow: shadow.to_owned(),
            handle: Some(handle),
        })
    }

    /// Runs the plugin's on_load hook with its host table.
    ///
    /// # Safety
    /// `table` must stay valid for as long as this library stays loaded.
    pub unsafe fn run_on_load(&mut self, table: *const KwHostApi) -> Result<(), LoadError> {
        let Some(on_load) = self.on_load else {
            return Ok(());
        };
        let mut message = Vec::new();
        let mut out = output_to(&mut message);
        // SAFETY: on_load is the plugin's hook (ABI contract); `table` is
        // valid per this function's contract; `out` lives through the call.
        let status = unsafe { on_load(table, &mut out) };
        if status == abi::KW_OK {
            Ok(())
        } else {
            self.refused = true;
            Err(LoadError::OnLoad {
                status,
                message: String::from_utf8_lossy(&message).into_owned(),
            })
        }
    }

    /// The path of the shadow copy.
    pub fn shadow(&self) -> &Path {
        &self.shadow
    }
}

impl Library {
    /// Runs on_unload (unless on_load refused), then closes the library,
    /// unless a thread it may have started is still alive: then its code
    /// stays mapped for the life of the process. Returns the ids of those
    /// threads (empty when the library was closed). Idempotent.
    pub fn unload(&mut self) -> Vec<i32> {
        let Some(handle) = self.handle.take() else {
            return Vec::new();
        };
        if let (Some(on_unload), false) = (self.on_unload, self.refused) {
            // SAFETY: the plugin's unload hook (ABI contract), called once,
            // after the last call into this generation returned. Its shell
            // catches panics.
            unsafe { on_unload() };
        }
        let left = close_or_keep(handle, &self.threads_before);
        let _ = std::fs::remove_file(&self.shadow);
        left
    }
}

/// dlcloses `handle` unless a thread started since `before` that is not the
/// host's is alive (it may be running the library's code); then the mapping
/// is kept forever. Returns those threads.
fn close_or_keep(
    handle: libloading::os::unix::Library,
    before: &std::collections::BTreeSet<i32>,
) -> Vec<i32> {
    let foreign = crate::threads::foreign_since(before);
    if foreign.is_empty() {
        // glibc keeps a library mapped while it has thread-local destructors
        // registered (most Rust cdylibs); closing is still correct, it only
        // may not unmap at once.
        drop(handle);
    } else {
        std::mem::forget(handle);
    }
    foreign
}

impl Drop for Library {
    fn drop(&mut self) {
        self.unload();
    }
}

/// Appends written bytes to the Vec behind `ctx`.
///
/// # Safety
/// `ctx` must be the `&mut Vec<u8>` passed to [`output_to`], alive for the
/// call, and `ptr` valid for `len` bytes.
unsafe extern "C" fn write_to_vec(ctx: *mut c_void, ptr: *const u8, len: usize) {
    crate::boundary::boundary!((), {
        // SAFETY: per this function's contract.
        let (buf, bytes) = unsafe {
            (
                &mut *(ctx as *mut Vec<u8>),
                abi::KwSlice { ptr, len }.as_bytes(),
            )
        };
        if let Some(bytes) = bytes {
            buf.extend_from_slice(bytes);
        }
    })
}

/// A [`KwOutput`] that appends to `buf`; valid while `buf` is borrowed.
pub fn output_to(buf: &mut Vec<u8>) -> KwOutput {
    KwOutput {
        ctx: buf as *mut Vec<u8> as *mut c_void,
        write: write_to_vec,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_what_is_not_a_library() {
        let text = check_complete_shared_object(b"hello, I am a text file\n").unwrap_err();
        assert!(text.to_string().contains("text file"), "{text}");
        let random =
            check_complete_shared_object(&[0x13, 0x99, 0xfe, 0x00, 0xff, 0x80]).unwrap_err();
        assert!(matches!(random, LoadError::NotALibrary(_)), "{random}");
        assert!(check_complete_shared_object(b"")
            .unwrap_err()
            .is_incomplete());
        assert!(check_complete_shared_object(b"\x7fEL")
            .unwrap_err()
            .is_incomplete());
    }

    #[test]
    fn a_truncated_real_library_is_incomplete_and_the_whole_one_passes() {
        // The test binary's own libc is a real shared library of this machine.
        let libc = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/aarch64-linux-gnu/libc.so.6",
            "/usr/lib64/libc.so.6",
        ]
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .expect("a libc to read");
        check_complete_shared_object(&libc).unwrap();
        for cut in [10, 100, libc.len() / 3, libc.len() / 2, libc.len() - 1] {
            let err = check_complete_shared_object(&libc[..cut]).unwrap_err();
            assert!(err.is_incomplete(), "cut at {cut}: {err}");
        }
    }
}
