//! The control protocol: one JSON request per line, one JSON response per
//! line. Documented for other clients in `docs/PROTOCOL.md`.

use serde::{Deserialize, Serialize};

/// The protocol version; requests may carry `"v": 1`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line accepted, in bytes (newline included).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// A request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Call an exported function.
    Call {
        /// Protocol version, if the client sends one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        v: Option<u32>,
        /// The function's name.
        function: String,
        /// Its arguments.
        #[serde(default)]
        args: Vec<serde_json::Value>,
    },
    /// Drop the entries of one cache, or of all.
    Reset {
        /// Protocol version.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        v: Option<u32>,
        /// The cache; absent with `all`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cache: Option<String>,
        /// Reset every cache.
        #[serde(default)]
        all: bool,
    },
    /// Per-cache figures.
    Stats {
        /// Protocol version.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        v: Option<u32>,
        /// One cache, or all when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cache: Option<String>,
    },
    /// What is loaded.
    Status {
        /// Protocol version.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        v: Option<u32>,
    },
    /// Reload the library now.
    Reload {
        /// Protocol version.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        v: Option<u32>,
    },
}

impl Request {
    /// The version the request claims, if any.
    pub fn version(&self) -> Option<u32> {
        match self {
            Request::Call { v, .. }
            | Request::Reset { v, .. }
            | Request::Stats { v, .. }
            | Request::Status { v }
            | Request::Reload { v } => *v,
        }
    }
}

/// Machine-readable error codes. The CLI maps them to exit statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
}

/// An error response's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What kind of failure.
    pub code: ErrorCode,
    /// A message for people.
    pub message: String,
}

/// A response: `{"v":1,"ok":true,"result":...}` or
/// `{"v":1,"ok":false,"error":{"code":...,"message":...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version.
    pub v: u32,
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// Something the user should know about a success (a `call` answered
    /// by the previous generation because the new build was refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

impl Response {
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
    let request: Request = serde_json::from_str(text).map_err(|e| {
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
                args: vec![10.into()]
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
                    prop::collection::vec(json_value(), 0..4)
                )
                    .prop_map(|(v, function, args)| Request::Call {
                        v,
                        function,
                        args
                    }),
                (v.clone(), prop::option::of(".{0,16}"), any::<bool>())
                    .prop_map(|(v, cache, all)| Request::Reset { v, cache, all }),
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
