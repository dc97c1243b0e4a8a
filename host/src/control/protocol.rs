//! The control protocol: one JSON request per line, one JSON response per
//! line. Documented for other clients in `docs/PROTOCOL.md`.

use serde_json::{json, Value};

use crate::json::{via_json, Object};

/// The protocol version; requests may carry `"v": 1`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line accepted, in bytes (newline included).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// A request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Call an exported function.
    Call {
        /// Protocol version, if the client sends one.
        v: Option<u32>,
        /// The function's name.
        function: String,
        /// Its arguments.
        args: Vec<serde_json::Value>,
        /// A tag the client chose, shown with the call in `status`'s
        /// `calls_in_flight` (so a client can find its own call's progress).
        tag: Option<String>,
    },
    /// Drop the entries of one cache, or of all.
    Reset {
        /// Protocol version.
        v: Option<u32>,
        /// The cache; absent with `all`.
        cache: Option<String>,
        /// Reset every cache.
        all: bool,
        /// Drop the shared tier's entries of the current code too.
        shared: bool,
    },
    /// Per-cache figures.
    Stats {
        /// Protocol version.
        v: Option<u32>,
        /// One cache, or all when absent.
        cache: Option<String>,
    },
    /// What is loaded.
    Status {
        /// Protocol version.
        v: Option<u32>,
    },
    /// Reload the library now.
    Reload {
        /// Protocol version.
        v: Option<u32>,
    },
    /// An entry command on raw byte keys and values (`open`, `get`,
    /// `get_or_wait`, `put`, `release`, `cache_info`; see
    /// [`super::entries`]).
    Entry {
        /// Protocol version.
        v: Option<u32>,
        /// The command.
        op: super::entries::EntryOp,
    },
}

/// The commands, as `cmd` names them.
const COMMANDS: [&str; 5] = ["call", "reset", "stats", "status", "reload"];

impl Request {
    /// The request as its JSON object.
    pub fn to_json(&self) -> Value {
        let (cmd, v, mut body) = match self {
            Request::Call {
                v,
                function,
                args,
                tag,
            } => {
                let mut body = json!({ "function": function, "args": args });
                if let Some(tag) = tag {
                    body["tag"] = json!(tag);
                }
                ("call", v, body)
            }
            Request::Reset {
                v,
                cache,
                all,
                shared,
            } => {
                let mut body = json!({ "all": all });
                if let Some(cache) = cache {
                    body["cache"] = json!(cache);
                }
                if *shared {
                    body["shared"] = json!(true);
                }
                ("reset", v, body)
            }
            Request::Stats { v, cache } => {
                let mut body = json!({});
                if let Some(cache) = cache {
                    body["cache"] = json!(cache);
                }
                ("stats", v, body)
            }
            Request::Status { v } => ("status", v, json!({})),
            Request::Reload { v } => ("reload", v, json!({})),
            Request::Entry { v, op } => {
                let (cmd, body) = op.to_json();
                (cmd, v, body)
            }
        };
        body["cmd"] = json!(cmd);
        if let Some(v) = v {
            body["v"] = json!(v);
        }
        body
    }

    /// The request from its JSON object; a message like serde's on failure.
    pub fn from_json(value: &Value) -> Result<Request, String> {
        let cmd = match value.get("cmd") {
            Some(Value::String(c)) => c.as_str(),
            Some(_) => return Err("invalid type for `cmd`: expected a string".into()),
            None if value.is_object() => return Err("missing field `cmd`".into()),
            None => return Err("invalid type: expected a JSON object".into()),
        };
        let fields: &[&str] = match cmd {
            "call" => &["cmd", "v", "function", "args", "tag"],
            "reset" => &["cmd", "v", "cache", "all", "shared"],
            "stats" => &["cmd", "v", "cache"],
            "status" | "reload" => &["cmd", "v"],
            other if super::entries::fields(other).is_some() => {
                super::entries::fields(other).unwrap_or_default()
            }
            other => {
                let known: Vec<String> = COMMANDS
                    .iter()
                    .chain(super::entries::COMMANDS.iter())
                    .map(|c| format!("`{c}`"))
                    .collect();
                return Err(format!(
                    "unknown variant `{other}`, expected one of {}",
                    known.join(", ")
                ));
            }
        };
        let o = Object::new(value, "a request", fields)?;
        let v = match o.opt_u64("v")? {
            None => None,
            Some(v) => Some(u32::try_from(v).map_err(|_| format!("version {v} is out of range"))?),
        };
        Ok(match cmd {
            "call" => Request::Call {
                v,
                function: o.str("function")?,
                args: o.array_or_empty("args")?,
                tag: o.opt_str("tag")?,
            },
            "reset" => Request::Reset {
                v,
                cache: o.opt_str("cache")?,
                all: o.bool_or_false("all")?,
                shared: o.bool_or_false("shared")?,
            },
            "stats" => Request::Stats {
                v,
                cache: o.opt_str("cache")?,
            },
            "status" => Request::Status { v },
            "reload" => Request::Reload { v },
            entry => Request::Entry {
                v,
                op: super::entries::EntryOp::from_object(entry, &o)?,
            },
        })
    }

    /// The version the request claims, if any.
    pub fn version(&self) -> Option<u32> {
        match self {
            Request::Call { v, .. }
            | Request::Reset { v, .. }
            | Request::Stats { v, .. }
            | Request::Status { v }
            | Request::Reload { v }
            | Request::Entry { v, .. } => *v,
        }
    }
}

/// Machine-readable error codes. The CLI maps them to exit statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request line is not a valid request (JSON, UTF-8, fields, size).
    BadRequest,
    /// The request names a protocol version this host does not speak.
    UnsupportedVersion,
    /// No function of that name.
    UnknownFunction,
    /// No cache of that name.
    UnknownCache,
    /// The plugin function returned an error.
    PluginError,
    /// The plugin function panicked.
    PluginPanic,
    /// No plugin is loaded.
    NotLoaded,
    /// The reload failed; the previous generation keeps serving.
    ReloadFailed,
    /// Too many connections at once; retry.
    Busy,
    /// The process running the call died (a segfault, an abort, a stack
    /// overflow in plugin code) and the supervisor restarted it. Never sent
    /// by a host: the client says it when the connection dropped and the
    /// restarted host's `last_crash` explains why (see `docs/PROTOCOL.md`).
    PluginCrashed,
}

const ERROR_CODES: [(ErrorCode, &str); 10] = [
    (ErrorCode::BadRequest, "bad_request"),
    (ErrorCode::UnsupportedVersion, "unsupported_version"),
    (ErrorCode::UnknownFunction, "unknown_function"),
    (ErrorCode::UnknownCache, "unknown_cache"),
    (ErrorCode::PluginError, "plugin_error"),
    (ErrorCode::PluginPanic, "plugin_panic"),
    (ErrorCode::NotLoaded, "not_loaded"),
    (ErrorCode::ReloadFailed, "reload_failed"),
    (ErrorCode::Busy, "busy"),
    (ErrorCode::PluginCrashed, "plugin_crashed"),
];

impl ErrorCode {
    /// The code's name on the wire (`bad_request`, …).
    pub fn as_str(self) -> &'static str {
        ERROR_CODES
            .iter()
            .find(|(c, _)| *c == self)
            .map_or("bad_request", |(_, n)| n)
    }

    /// The code named `name` on the wire.
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ERROR_CODES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(c, _)| *c)
    }

    fn to_json(self) -> Value {
        json!(self.as_str())
    }

    fn from_json(value: &Value) -> Result<ErrorCode, String> {
        value
            .as_str()
            .and_then(ErrorCode::from_name)
            .ok_or_else(|| format!("unknown error code {value}"))
    }
}

via_json!(ErrorCode);

/// An error response's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    /// What kind of failure.
    pub code: ErrorCode,
    /// A message for people.
    pub message: String,
}

impl ErrorBody {
    fn to_json(&self) -> Value {
        json!({ "code": self.code.as_str(), "message": self.message })
    }

    fn from_json(value: &Value) -> Result<ErrorBody, String> {
        let o = Object::new(value, "an error", &["code", "message"])?;
        Ok(ErrorBody {
            code: ErrorCode::from_json(&o.value("code").unwrap_or(Value::Null))?,
            message: o.str("message")?,
        })
    }
}

via_json!(ErrorBody);

/// A response: `{"v":1,"ok":true,"result":...}` or
/// `{"v":1,"ok":false,"error":{"code":...,"message":...}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Protocol version.
    pub v: u32,
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, on success.
    pub result: Option<serde_json::Value>,
    /// The error, on failure.
    pub error: Option<ErrorBody>,
    /// Something the user should know about a success (a `call` answered
    /// by the previous generation because the new build was refused).
    pub warning: Option<String>,
}

impl Response {
    /// The response as its JSON object (absent fields are left out).
    pub fn to_json(&self) -> Value {
        let mut out = json!({ "v": self.v, "ok": self.ok });
        if let Some(result) = &self.result {
            out["result"] = result.clone();
        }
        if let Some(error) = &self.error {
            out["error"] = error.to_json();
        }
        if let Some(warning) = &self.warning {
            out["warning"] = json!(warning);
        }
        out
    }

    /// The response from its JSON object.
    pub fn from_json(value: &Value) -> Result<Response, String> {
        let o = Object::new(
            value,
            "a response",
            &["v", "ok", "result", "error", "warning"],
        )?;
        let v = o.u64("v")?;
        let ok = match o.value("ok") {
            Some(Value::Bool(b)) => b,
            _ => return Err("missing or invalid field `ok`".into()),
        };
        let error = match o.value("error") {
            None | Some(Value::Null) => None,
            Some(e) => Some(ErrorBody::from_json(&e)?),
        };
        Ok(Response {
            v: u32::try_from(v).map_err(|_| format!("version {v} is out of range"))?,
            ok,
            result: o.value("result"),
            error,
            warning: o.opt_str("warning")?,
        })
    }

    /// A success.
    pub fn ok(result: serde_json::Value) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            ok: true,
            result: Some(result),
            error: None,
            warning: None,
        }
    }

    /// A failure.
    pub fn err(code: ErrorCode, message: impl Into<String>) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            ok: false,
            result: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
            warning: None,
        }
    }
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, Response> {
    let text = std::str::from_utf8(line).map_err(|e| {
        Response::err(
            ErrorCode::BadRequest,
            format!(
                "the request is not UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    let request = serde_json::from_str::<Value>(text).map_err(|e| e.to_string()).and_then(|v| Request::from_json(&v)).map_err(|e| {
        Response::err(
            ErrorCode::BadRequest,
            format!(
                "invalid request: {e}; expected one JSON object per line such as {{\"cmd\":\"call\",\"function\":\"square\",\"args\":[10]}}"
            ),
        )
    })?;
    match request.version() {
        Some(v) if v != PROTOCOL_VERSION => Err(Response::err(
            ErrorCode::UnsupportedVersion,
            format!("protocol version {v} is not supported; this host speaks version {PROTOCOL_VERSION}"),
        )),
        _ => Ok(request),
    }
}

via_json!(Request);
via_json!(Response);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_command() {
        let r = parse_request(br#"{"cmd":"call","function":"square","args":[10]}"#).unwrap();
        assert_eq!(
            r,
            Request::Call {
                v: None,
                function: "square".into(),
                args: vec![10.into()],
                tag: None,
            }
        );
        assert!(matches!(
            parse_request(br#"{"v":1,"cmd":"reset","all":true}"#).unwrap(),
            Request::Reset {
                all: true,
                cache: None,
                ..
            }
        ));
        assert!(parse_request(br#"{"cmd":"status"}"#).is_ok());
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        for bad in [
            &b"not json"[..],
            b"{\"cmd\":\"explode\"}",
            b"\xff\xfe",
            b"{\"cmd\":\"call\"}",
            b"[]",
        ] {
            let e = parse_request(bad).unwrap_err();
            assert_eq!(e.error.unwrap().code, ErrorCode::BadRequest);
        }
        let e = parse_request(br#"{"v":9,"cmd":"status"}"#).unwrap_err();
        assert_eq!(e.error.unwrap().code, ErrorCode::UnsupportedVersion);
    }

    mod properties {
        //! Property tests over the request parser: whatever a client sends,
        //! the parser answers (never panics), an error is a one-line JSON
        //! response that says what is wrong, and every well-formed request
        //! survives a round trip.

        use super::super::*;
        use proptest::prelude::*;

        /// Asserts what every refusal must be: a bad_request or
        /// unsupported_version response with a message, one line of JSON.
        fn assert_clear_refusal(response: &Response) {
            let error = response.error.as_ref().expect("a refusal carries an error");
            assert!(!response.ok && response.result.is_none());
            assert!(matches!(
                error.code,
                ErrorCode::BadRequest | ErrorCode::UnsupportedVersion
            ));
            assert!(!error.message.is_empty());
            let line = serde_json::to_string(response).unwrap();
            assert!(!line.contains('\n'), "one response per line: {line}");
        }

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                ".{0,12}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                    prop::collection::btree_map(".{0,6}", inner, 0..4)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn request() -> impl Strategy<Value = Request> {
            let v = prop::option::of(Just(PROTOCOL_VERSION));
            prop_oneof![
                (
                    v.clone(),
                    ".{0,16}",
                    prop::collection::vec(json_value(), 0..4),
                    prop::option::of(".{0,8}")
                )
                    .prop_map(|(v, function, args, tag)| Request::Call {
                        v,
                        function,
                        args,
                        tag
                    }),
                (
                    v.clone(),
                    prop::option::of(".{0,16}"),
                    any::<bool>(),
                    any::<bool>()
                )
                    .prop_map(|(v, cache, all, shared)| Request::Reset {
                        v,
                        cache,
                        all,
                        shared
                    }),
                (v.clone(), prop::option::of(".{0,16}"))
                    .prop_map(|(v, cache)| Request::Stats { v, cache }),
                v.clone().prop_map(|v| Request::Status { v }),
                v.prop_map(|v| Request::Reload { v }),
            ]
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_get_an_answer(line in prop::collection::vec(any::<u8>(), 0..256)) {
                if let Err(response) = parse_request(&line) {
                    assert_clear_refusal(&response);
                }
            }

            #[test]
            fn well_formed_requests_round_trip(request in request()) {
                let line = serde_json::to_vec(&request).unwrap();
                prop_assert_eq!(parse_request(&line).unwrap(), request);
            }

            #[test]
            fn damaged_requests_are_refused_clearly(
                request in request(),
                cut in any::<prop::sample::Index>(),
                flip in any::<prop::sample::Index>(),
                byte in any::<u8>(),
            ) {
                let mut line = serde_json::to_vec(&request).unwrap();
                let at = flip.index(line.len());
                line[at] = byte;
                line.truncate(cut.index(line.len() + 1));
                // A damaged line may still parse (a changed letter inside a
                // string); when it does not, the refusal must be clear.
                if let Err(response) = parse_request(&line) {
                    assert_clear_refusal(&response);
                }
            }

            #[test]
            fn other_versions_are_named_in_the_refusal(v in 2u32.., request in request()) {
                let mut value = serde_json::to_value(&request).unwrap();
                value["v"] = v.into();
                let response = parse_request(&serde_json::to_vec(&value).unwrap()).unwrap_err();
                let error = response.error.unwrap();
                prop_assert_eq!(error.code, ErrorCode::UnsupportedVersion);
                prop_assert!(error.message.contains(&v.to_string()));
            }
        }
    }
}
