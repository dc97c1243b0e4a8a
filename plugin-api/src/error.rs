//! The error type of plugin functions.

use core::fmt;

use crate::abi::{self, KwStatus};

/// An error a plugin function returns to its caller; the host prints its
/// message and `keepwarm call` exits with status 1.
///
/// ```
/// let e = keepwarm_api::Error::new("n must be positive");
/// assert_eq!(e.to_string(), "n must be positive");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Error {
        Error {
            message: message.into(),
        }
    }

    /// The message.
    ///
    /// ```
    /// assert_eq!(keepwarm_api::Error::from("bad input").message(), "bad input");
    /// ```
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn no_host() -> Error {
        Error::new("this plugin is not loaded by a keepwarm host (no host table)")
    }

    pub(crate) fn check(status: KwStatus, what: impl FnOnce() -> String) -> Result<(), Error> {
        let why = match status {
            abi::KW_OK => return Ok(()),
            abi::KW_TOO_LARGE => "the value is larger than the cache's byte bound",
            abi::KW_INVALID_ARGUMENT => "invalid argument (NULL pointer or non-UTF-8 name)",
            abi::KW_PANIC => "the host caught a panic",
            abi::KW_RETIRED => "this generation was unloaded (a thread outlived on_unload)",
            _ => "unexpected status",
        };
        Err(Error::new(format!(
            "{} failed: {why} (status {status})",
            what()
        )))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<&str> for Error {
    fn from(message: &str) -> Error {
        Error::new(message)
    }
}

impl From<String> for Error {
    fn from(message: String) -> Error {
        Error::new(message)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Error {
        Error::new(e.to_string())
    }
}
