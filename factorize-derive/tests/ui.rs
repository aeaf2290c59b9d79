//! Misuse of the derive is a compile error at the right span, with a pinned message.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
