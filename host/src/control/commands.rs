//! One handler per command. The socket server and the prompt both come here,
//! so a command behaves the same wherever it is typed.

use serde_json::json;

use super::protocol::{ErrorCode, Request, Response};
use crate::events::Event;
use crate::generation::CallError;
use crate::host::{Host, Reloaded};

/// Carries out one request against `host`.
pub fn handle(host: &Host, request: Request) -> Response {
    match request {
        Request::Call { function, args, .. } => call(host, &function, &args),
        Request::Reset { cache, all, .. } => reset(host, cache.as_deref(), all),
        Request::Stats { cache, .. } => stats(host, cache.as_deref()),
        Request::Status { .. } => status(host),
        Request::Reload { .. } => reload(host),
    }
}

/// How long a call waits for a build that landed to finish loading.
pub const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

fn call(host: &Host, function: &str, args: &[serde_json::Value]) -> Response {
    // A call sees the build that was on disk when it was made.
    let warning = host.catch_up(CATCH_UP);
    match host.call(function, args) {
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

fn unknown_cache(host: &Host, name: &str) -> Response {
    let names: Vec<String> = host
        .store()
        .all()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    let known = if names.is_empty() {
        "there are no caches yet".to_owned()
    } else {
        format!("caches: {}", names.join(", "))
    };
    Response::err(
        ErrorCode::UnknownCache,
        format!("no cache named `{name}` ({known})"),
    )
}

fn reset(host: &Host, cache: Option<&str>, all: bool) -> Response {
    match (cache, all) {
        (None, true) => {
            let dropped = host.reset_all();
            host.emit(&Event::Reset {
                cache: None,
                dropped,
            });
            Response::ok(json!({ "dropped": dropped }))
        }
        (Some(name), false) => match host.reset(name) {
            Some(dropped) => {
                host.emit(&Event::Reset {
                    cache: Some(name.to_owned()),
                    dropped,
                });
                Response::ok(json!({ "cache": name, "dropped": dropped }))
            }
            None => unknown_cache(host, name),
        },
        _ => Response::err(
            ErrorCode::BadRequest,
            "reset takes either a cache name or \"all\": true",
        ),
    }
}

fn stats(host: &Host, cache: Option<&str>) -> Response {
    match host.stats(cache) {
        Some(stats) => Response::ok(serde_json::to_value(stats).expect("figures serialize")),
        None => unknown_cache(host, cache.unwrap_or_default()),
    }
}

fn status(host: &Host) -> Response {
    Response::ok(serde_json::to_value(host.status()).expect("status serializes"))
}

fn reload(host: &Host) -> Response {
    match host.reload(true) {
        Ok(Reloaded::Loaded { generation, reset }) => {
            Response::ok(json!({ "generation": generation, "reset": reset }))
        }
        Ok(Reloaded::Unchanged) => Response::ok(json!({ "unchanged": true })),
        Err(e) => {
            let serving = host.current().map_or(0, |g| g.number);
            Response::err(
                ErrorCode::ReloadFailed,
                format!("reload failed: {e} (generation {serving} keeps serving)"),
            )
        }
    }
}
