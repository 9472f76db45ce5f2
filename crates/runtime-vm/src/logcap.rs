//! The bound on what a VM's QEMU writes into its state directory: the guest's serial console
//! (`console.log`, QEMU's `-chardev file,append=on`) and QEMU's own stderr (`qemu.log`), both
//! written by QEMU through descriptors opened for appending. A guest printing without end would
//! otherwise fill the host's disk. Each file past its cap keeps its last half in `<file>.1`
//! and is emptied in place: QEMU's next write lands at the new end (appending), so the file
//! starts again from nothing, not after a hole. Owns that rotation and the task that checks
//! the files while the VM's QEMU lives; must not touch any other file of the directory, nor
//! QEMU.
//!
//! The bound holds between two checks: a file may pass its cap by what QEMU writes in one
//! [`CHECK_INTERVAL`]; bytes QEMU writes between the read of the tail (to the file's end) and
//! the emptying are lost (microseconds once per cap's worth of output: the older half is
//! written to disk after the emptying, from memory).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

use crate::manager::ExitInfo;

/// The most bytes `console.log` or `qemu.log` holds before its last half goes to `<file>.1`.
pub const DEFAULT_LOG_CAP: u64 = 8 << 20;
/// How often a running VM's logs are measured.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// The guest's serial console in a VM's state directory.
pub const CONSOLE_LOG: &str = "console.log";
/// QEMU's stderr in a VM's state directory.
pub const QEMU_LOG: &str = "qemu.log";
/// Both logs QEMU writes.
pub const BOTH_LOGS: &[&str] = &[CONSOLE_LOG, QEMU_LOG];

/// Whether process `pid` writes its stderr by appending (`O_APPEND` in `/proc/<pid>/fdinfo/2`):
/// only then may its `qemu.log` be emptied under it (a QEMU started before logs were capped
/// writes at its own offset, and would leave a hole the size of what it wrote).
pub fn appends_stderr(pid: i32) -> bool {
    telvirt_files::proc::fd_flags(pid, 2).is_some_and(|flags| flags & libc::O_APPEND as u32 != 0)
}

/// The file a log's older half goes to: `console.log` -> `console.log.1`.
pub fn older(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Rotates `path` when it holds more than `cap` bytes: its bytes from `cap / 2` before its end
/// as measured (from a line's start where one begins in them) to its end when read replace
/// `<path>.1`, and `path` is emptied right after that read. Returns whether it rotated. A
/// missing file is left missing.
pub fn rotate_if_over(path: &Path, cap: u64) -> std::io::Result<bool> {
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len <= cap {
        return Ok(false);
    }
    let keep = cap / 2;
    file.seek(SeekFrom::Start(len - keep))?;
    let mut tail = Vec::new();
    // To the end, what QEMU appended since the length was read included, then emptied at once.
    file.read_to_end(&mut tail)?;
    file.set_len(0)?;
    // Whole lines where there is a line break to start from.
    let from = tail
        .iter()
        .position(|b| *b == b'\n')
        .map_or(0, |at| at + 1)
        .min(tail.len());
    telvirt_files::write_atomic(&older(path), &tail[from..])?;
    Ok(true)
}

/// Rotates each of the logs `names` of `dir` that is past `cap` (every one, whatever another
/// does); the first that could not be rotated, with why.
fn rotate_all(dir: &Path, names: &[&str], cap: u64) -> Option<(PathBuf, std::io::Error)> {
    let mut first = None;
    for name in names {
        let path = dir.join(name);
        if let Err(e) = rotate_if_over(&path, cap) {
            first.get_or_insert((path, e));
        }
    }
    first
}

/// Measures the logs `names` of `dir` every [`CHECK_INTERVAL`] (on a blocking thread) until
/// `exit` says the VM's QEMU ended (its last output stays as it is). A file that cannot be
/// rotated is said once.
pub fn spawn(
    dir: PathBuf,
    names: &'static [&'static str],
    cap: u64,
    mut exit: watch::Receiver<Option<ExitInfo>>,
) {
    tokio::spawn(async move {
        let mut told = false;
        loop {
            let at = dir.clone();
            let rotated = tokio::task::spawn_blocking(move || rotate_all(&at, names, cap)).await;
            if let Ok(Some((path, e))) = rotated
                && !told
            {
                told = true;
                tracing::warn!(log = %path.display(), "the log cannot be kept within {cap} bytes: {e}");
            }
            if exit.borrow().is_some() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(CHECK_INTERVAL) => {}
                changed = exit.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A log past its cap keeps its last half's whole lines in `.1` and starts again empty; a
    /// writer that appends (as QEMU does) writes on from the new start, leaving no hole.
    #[test]
    fn a_log_past_its_cap_keeps_its_tail_and_starts_again() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        let mut qemu = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        for i in 0..100 {
            writeln!(qemu, "line {i:03}").unwrap();
        }
        // 100 lines of 9 bytes.
        assert!(!rotate_if_over(&path, 900).unwrap(), "at its cap: kept");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 900);
        assert!(rotate_if_over(&path, 899).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        let kept = std::fs::read_to_string(older(&path)).unwrap();
        // The last 449 bytes begin inside line 050; whole lines from 051 on.
        assert!(kept.starts_with("line 051\n"), "{kept}");
        assert!(kept.ends_with("line 099\n"), "{kept}");
        assert_eq!(kept.lines().count(), 49);
        writeln!(qemu, "after").unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"after\n",
            "no hole before it"
        );
        // Again: `.1` is replaced, not grown.
        for _ in 0..200 {
            writeln!(qemu, "again").unwrap();
        }
        assert!(rotate_if_over(&path, 100).unwrap());
        assert_eq!(
            std::fs::read_to_string(older(&path)).unwrap(),
            "again\n".repeat(8)
        );
        assert!(!rotate_if_over(&d.path().join("none.log"), 1).unwrap());
        assert!(!d.path().join("none.log").exists());
    }

    /// A log that cannot be rotated does not keep the other from its cap.
    #[test]
    fn a_log_that_cannot_be_rotated_leaves_the_other_rotated() {
        let d = tempfile::tempdir().unwrap();
        for name in BOTH_LOGS {
            std::fs::write(d.path().join(name), "x\n".repeat(100)).unwrap();
        }
        // Its older half has nowhere to go.
        let console = d.path().join(CONSOLE_LOG);
        std::fs::create_dir(older(&console)).unwrap();
        let (failed, _) = rotate_all(d.path(), BOTH_LOGS, 100).expect("console.log failed");
        assert_eq!(failed, console);
        assert_eq!(std::fs::metadata(d.path().join(QEMU_LOG)).unwrap().len(), 0);
        assert!(older(&d.path().join(QEMU_LOG)).is_file());
    }

    /// A child whose stderr appends is told from one whose stderr does not.
    #[test]
    fn a_process_appending_to_its_stderr_is_told_apart() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("qemu.log");
        for append in [true, false] {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .open(&path)
                .unwrap();
            let mut child = std::process::Command::new("sleep")
                .arg("30")
                .stderr(log)
                .spawn()
                .unwrap();
            let pid = i32::try_from(child.id()).unwrap();
            assert_eq!(appends_stderr(pid), append);
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}
