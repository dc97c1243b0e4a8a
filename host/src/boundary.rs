//! The one panic boundary of every `extern "C"` function the host exposes
//! (the host table's functions, the output sinks it hands plugins).
//!
//! A Rust panic must never unwind out of an `extern "C"` function (since Rust
//! 1.81 it aborts the process). Each shell is a few lines that check raw
//! pointers and call safe code; [`boundary!`] wraps that body in
//! `catch_unwind` and returns the given value when it panics: a status for
//! the functions that return one, `()` for those that return nothing (no
//! made-up status).

/// Runs `$body` (a block) and returns its value, or `$on_panic` if it
/// panicked.
macro_rules! boundary {
    ($on_panic:expr, $body:block) => {
        match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| $body)) {
            Ok(value) => value,
            Err(_) => $on_panic,
        }
    };
}

pub(crate) use boundary;

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_becomes_the_fallback_value() {
        let status: i32 = boundary!(3, { panic!("host bug") });
        assert_eq!(status, 3);
        let unit: () = boundary!((), {});
        assert_eq!(unit, ());
        assert_eq!(boundary!(0, { 7 }), 7);
    }
}
