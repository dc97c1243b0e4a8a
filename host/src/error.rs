//! The runtime's error for what it could not set up: a directory, the
//! control socket, a thread. (A refused build is a [`LoadError`], a failed
//! call a [`CallError`].)
//!
//! [`LoadError`]: crate::LoadError
//! [`CallError`]: crate::CallError

use std::fmt;
use std::io;

/// What could not be set up, and the system error behind it, if any.
///
/// `Display` says what failed ("binding /run/user/1000/keepwarm/x.sock");
/// [`std::error::Error::source`] gives the cause, as the API guidelines
/// recommend (`anyhow`'s `{:#}` prints both: "binding …: Address in use").
///
/// ```
/// let e = keepwarm::Error::io("creating /nope", std::io::Error::from(std::io::ErrorKind::PermissionDenied));
/// assert_eq!(e.to_string(), "creating /nope");
/// assert_eq!(e.io_kind(), Some(std::io::ErrorKind::PermissionDenied));
/// ```
#[derive(Debug)]
pub struct Error {
    what: String,
    source: Option<io::Error>,
}

impl Error {
    /// An error with a message and no system cause.
    pub fn new(what: impl Into<String>) -> Error {
        Error {
            what: what.into(),
            source: None,
        }
    }

    /// What failed, caused by `source`.
    pub fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error {
            what: what.into(),
            source: Some(source),
        }
    }

    /// The kind of the system error behind it, if there is one.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        self.source.as_ref().map(io::Error::kind)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// A result with the runtime's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Adds what was being done to an `io::Result`.
pub(crate) trait Context<T> {
    /// On error, says it happened while doing `what()`.
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
