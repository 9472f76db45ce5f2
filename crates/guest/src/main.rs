//! telvirt-guest binary: runs as a child of the initramfs /init, opens the agent's
//! virtio-serial port, announces readiness and serves requests. `--stdio` serves on
//! stdin/stdout instead (for tests on the host). Must stay statically linkable: std,
//! serde and serde_json only.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use telvirt_guest::agent::{Agent, INPUT_EVENT_SIZE, is_power_button_press};
use telvirt_guest::drops::{DropTrace, TRACEFS};
use telvirt_guest::proto::{AGENT_PORT_NAME, Body, Message, RequestEnvelope, encode_line};

fn find_port() -> Option<PathBuf> {
    let by_name = Path::new("/dev/virtio-ports").join(AGENT_PORT_NAME);
    if by_name.exists() {
        return Some(by_name);
    }
    for entry in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == AGENT_PORT_NAME {
            let dev = Path::new("/dev").join(entry.file_name());
            if dev.exists() {
                return Some(dev);
            }
        }
    }
    None
}

fn send(out: &mut dyn Write, msg: &Message) -> std::io::Result<()> {
    let line = encode_line(msg).map_err(std::io::Error::other)?;
    out.write_all(line.as_bytes())?;
    out.flush()
}

/// Serve requests until `input` ends. Returns true when the host asked for a shutdown.
fn serve(agent: &mut Agent, input: &mut dyn BufRead, out: &mut dyn Write) -> std::io::Result<bool> {
    let mut line = String::new();
    loop {
        line.clear();
        if input.read_line(&mut line)? == 0 {
            return Ok(false);
        }
        if line.trim().is_empty() {
            continue;
        }
        let (id, body) = match serde_json::from_str::<RequestEnvelope>(&line) {
            Ok(req) => (Some(req.id), agent.handle(req.request)),
            Err(e) => (
                serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("id")?.as_u64()),
                Body::Error {
                    message: format!("bad request: {e}"),
                },
            ),
        };
        let shutting_down = body == Body::ShuttingDown;
        send(out, &Message { id, body })?;
        if shutting_down {
            return Ok(true);
        }
    }
}

fn power_off() {
    // busybox in the initramfs; `-f` powers off at once (there is nothing to unmount).
    let _ = std::process::Command::new("/bin/poweroff")
        .arg("-f")
        .status();
}

/// Power off when the ACPI power button is pressed (`system_powerdown` from the host): watch
/// every input event device, including ones that appear later.
fn watch_power_button() {
    std::thread::spawn(|| {
        let mut watched = HashSet::new();
        loop {
            for entry in std::fs::read_dir("/dev/input")
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = entry.path();
                let is_event = entry.file_name().to_string_lossy().starts_with("event");
                if is_event && watched.insert(path.clone()) {
                    std::thread::spawn(move || {
                        let Ok(mut f) = File::open(&path) else { return };
                        let mut ev = [0u8; INPUT_EVENT_SIZE];
                        while f.read_exact(&mut ev).is_ok() {
                            if is_power_button_press(&ev) {
                                eprintln!("telvirt-guest: power button pressed, powering off");
                                power_off();
                            }
                        }
                    });
                }
            }
            // The ACPI button's device appears when its driver binds, possibly after we start.
            std::thread::sleep(Duration::from_millis(250));
        }
    });
}

fn main() {
    let mut agent = Agent::new();
    if std::env::args().any(|a| a == "--stdio") {
        // On the host (tests): its tracing is not the agent's to change.
        let stdin = std::io::stdin();
        let mut input = stdin.lock();
        let mut out = std::io::stdout();
        let ready = Message {
            id: None,
            body: agent.ready(),
        };
        if send(&mut out, &ready).is_err() {
            std::process::exit(1);
        }
        match serve(&mut agent, &mut input, &mut out) {
            Ok(_) => return,
            Err(e) => {
                eprintln!("telvirt-guest: {e}");
                std::process::exit(1);
            }
        }
    }
    let trace = DropTrace::install(Path::new(TRACEFS));
    if let Err(why) = &trace {
        eprintln!("telvirt-guest: the kernel's drops are not traced: {why}");
    }
    agent = agent.with_drop_trace(trace);
    watch_power_button();
    let port = loop {
        if let Some(p) = find_port() {
            break p;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("telvirt-guest: serving on {}", port.display());
    loop {
        let opened = OpenOptions::new().read(true).write(true).open(&port);
        let mut file: File = match opened {
            Ok(f) => f,
            Err(e) => {
                eprintln!("telvirt-guest: open {}: {e}", port.display());
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        let ready = Message {
            id: None,
            body: agent.ready(),
        };
        let _ = send(&mut file, &ready);
        let mut input = match file.try_clone() {
            Ok(f) => BufReader::new(f),
            Err(_) => continue,
        };
        match serve(&mut agent, &mut input, &mut file) {
            Ok(true) => {
                power_off();
                return;
            }
            // End of input: the host is not connected; wait for it to come back.
            Ok(false) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => {
                eprintln!("telvirt-guest: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}
