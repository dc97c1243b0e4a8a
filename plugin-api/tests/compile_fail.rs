//! Misuse of `#[memo]` and `#[export]` fails to compile with a message that
//! says what to do (trybuild compares the compiler's output with
//! `tests/ui/*.stderr`; regenerate with `TRYBUILD=overwrite`).

#[test]
fn misuse_is_a_readable_compile_error() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
