//! README.md's Quickstart, run as written: the lines of its shell block, in order, by bash with
//! `set -euo pipefail`, in a directory laid out as a checkout and with a home of its own (the
//! node's default data dir). The one line not run is `cargo build --release`: the binary cargo
//! built for this test stands for `target/release/telvirt`. The node listens on the Quickstart's
//! default address, 127.0.0.1:7070, which must be free.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, lay_out_examples, repo, shared_image_cache};

/// How long the whole Quickstart may take (a debug build on 2 CPUs takes well under a minute).
const DEADLINE: Duration = Duration::from_secs(300);

/// The Quickstart's commands as a bash script.
fn quickstart_script() -> String {
    let readme = std::fs::read_to_string(repo("README.md")).expect("README.md");
    let section = readme
        .find("## Quickstart")
        .expect("README.md has a Quickstart");
    let start = readme[section..]
        .find("```sh\n")
        .map(|i| section + i + "```sh\n".len())
        .expect("the Quickstart has a sh block");
    let end = readme[start..]
        .find("```")
        .map(|i| start + i)
        .expect("the sh block ends");
    let mut script = String::from("set -euo pipefail\n");
    for line in readme[start..end].lines() {
        if line.trim_start().starts_with("cargo build") {
            continue;
        }
        script.push_str(&line.replace("target/release/telvirt", BIN));
        script.push('\n');
    }
    script
}

#[test]
fn the_readme_quickstart_runs_as_written() {
    let script = quickstart_script();
    assert!(
        script.contains(" serve ") && script.contains("vnf create"),
        "not the Quickstart: {script}"
    );
    let dir = tempfile::Builder::new()
        .prefix("tvq")
        .tempdir_in("/tmp")
        .unwrap();
    lay_out_examples(dir.path());
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let file = dir.path().join("quickstart.sh");
    std::fs::write(&file, &script).unwrap();
    let log = dir.path().join("quickstart.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut bash = Command::new("bash");
    bash.arg(&file)
        .current_dir(dir.path())
        .env("HOME", &home)
        .env("TELVIRT_IMAGE_CACHE", shared_image_cache())
        .env_remove("XDG_DATA_HOME")
        .env_remove("TELVIRT_SERVER")
        .env_remove("TELVIRT_TOKEN")
        .env_remove("TELVIRT_CONFIG")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        // Its own process group: the node it starts in the background goes with it.
        .process_group(0);
    let mut child = bash.spawn().unwrap();
    let group = child.id();
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Whatever happened, nothing the Quickstart started outlives the test.
    let _ = Command::new("kill")
        .args(["-9", "--", &format!("-{group}")])
        .status();
    let _ = child.wait();
    let printed = std::fs::read_to_string(&log).unwrap_or_default();
    let status = status
        .unwrap_or_else(|| panic!("the Quickstart did not end within {DEADLINE:?}:\n{printed}"));
    assert!(
        status.success(),
        "the Quickstart failed ({status}):\n{printed}"
    );
    for expected in [
        "vnf/fw1 created (Running)",
        "vnf/nat1 created (Running)",
        "network/chain created",
        "100 frames of chain fw1.out captured to fw1.pcapng",
        "vnf/nat1 deleted",
    ] {
        assert!(
            printed.contains(expected),
            "the Quickstart did not print {expected:?}:\n{printed}"
        );
    }
    let capture = std::fs::metadata(dir.path().join("fw1.pcapng")).unwrap();
    assert!(
        capture.len() > 100 * 64,
        "fw1.pcapng holds {} bytes",
        capture.len()
    );
}
