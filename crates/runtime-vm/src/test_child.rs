//! For unit tests that must run in a process of their own (they confine the process they run
//! in, or mark it): runs one test of this test binary again, alone, with a variable set that
//! tells it it is the child. Tests only; nothing of the runtime uses it.

/// Runs test `test` (its full path) of this binary alone, with `var` set to `value`; what it
/// printed and how it ended.
pub(crate) fn rerun_alone(test: &str, var: &str, value: &str) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(var, value)
        .output()
        .unwrap()
}
