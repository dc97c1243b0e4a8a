//! `call`: runs an exported function, after making sure the build on disk
//! is the one that answers.

use super::super::protocol::{ErrorCode, Response};
use super::CATCH_UP;
use crate::generation::CallError;
use crate::host::Host;

/// Calls `function` with `args`; a plugin's error or panic is the response's error.
pub(super) fn run(host: &Host, function: &str, args: &[serde_json::Value]) -> Response {
    if host.plugins().is_empty() {
        return Response::err(
            ErrorCode::NotLoaded,
            format!("no plugin loaded: this host (keepwarm serve) holds caches only, so `{function}` cannot be called; start `keepwarm run LIB` to call plugin functions"),
        );
    }
    // A call sees the build that was on disk when it was made.
    let warning = host.catch_up(CATCH_UP);
    match host.call_json(function, args) {
        Ok(value) => {
            let mut response = Response::ok(value);
            response.warning = warning;
            response
        }
        Err(e) => {
            let code = match &e {
                CallError::NotLoaded => ErrorCode::NotLoaded,
                CallError::UnknownFunction { .. } | CallError::Ambiguous { .. } => {
                    ErrorCode::UnknownFunction
                }
                CallError::Panicked(_) => ErrorCode::PluginPanic,
                CallError::Failed(_) | CallError::BadResult(_) | CallError::BadArguments(_) => {
                    ErrorCode::PluginError
                }
            };
            let message = match &e {
                CallError::Panicked(_) => format!("{function} {e}"),
                _ => e.to_string(),
            };
            Response::err(code, message)
        }
    }
}
