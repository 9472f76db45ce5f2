//! A bare QEMU boot of the default guest without the manager: the accelerator probe and the
//! benchmark baseline use it. Owns the bare command line and the time-to-ready measurement;
//! must not pin, plug peripherals or keep the VM (it is always killed before returning).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use telvirt_guest::proto::AGENT_PORT_NAME;

use crate::agent::AgentClient;
use crate::config::Accel;
use crate::error::{Error, Result};
use crate::image::DEFAULT_APPEND;

/// What a bare boot needs.
#[derive(Debug, Clone)]
pub struct BareBoot {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub accel: Accel,
    pub memory_mib: u64,
    /// Scratch directory for the agent socket and console log.
    pub dir: PathBuf,
}

/// Kills the process on drop and reaps it.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl BareBoot {
    /// The plain command line: same kernel, initrd and agent port, nothing else.
    pub fn args(&self) -> Vec<String> {
        let sock = self.dir.join("agent.sock");
        let con = self.dir.join("console.log");
        vec![
            "-machine".into(),
            format!("pc,accel={}", self.accel.as_str()),
            "-cpu".into(),
            if self.accel == Accel::Kvm {
                "host"
            } else {
                "max"
            }
            .into(),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            self.kernel.to_string_lossy().into_owned(),
            "-initrd".into(),
            self.initrd.to_string_lossy().into_owned(),
            "-append".into(),
            DEFAULT_APPEND.into(),
            "-serial".into(),
            format!("file:{}", con.display()),
            "-device".into(),
            "virtio-serial-pci".into(),
            "-chardev".into(),
            format!("socket,id=agent,path={},server=on,wait=off", sock.display()),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
        ]
    }

    /// Boot, wait until the guest agent is ready (at most `deadline`), kill QEMU; returns the
    /// time from spawn to ready.
    pub async fn boot_to_ready(&self, deadline: Duration) -> Result<Duration> {
        std::fs::create_dir_all(&self.dir)
            .map_err(Error::io(format!("create {}", self.dir.display())))?;
        let sock = self.dir.join("agent.sock");
        let _ = std::fs::remove_file(&sock);
        let log_path = self.dir.join("qemu.log");
        let log = std::fs::File::create(&log_path)
            .map_err(Error::io(format!("create {}", log_path.display())))?;
        let start = Instant::now();
        let child = crate::confine::child_command(&self.qemu)
            .args(self.args())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(Error::io(format!("spawn {}", self.qemu.display())))?;
        let mut reaper = Reaper(child);
        let result = tokio::time::timeout(deadline, async {
            let agent = loop {
                if let Ok(Some(st)) = reaper.0.try_wait() {
                    return Err(Error::QemuExited {
                        status: st.to_string(),
                        output: crate::manager::console_tail(&log_path, 5).join("\n"),
                    });
                }
                if let Ok(a) = AgentClient::connect(&sock).await {
                    break a;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            agent.wait_ready(deadline).await?;
            Ok(start.elapsed())
        })
        .await
        .map_err(|_| Error::Timeout {
            what: format!(
                "a bare {} boot of the guest to reach ready",
                self.accel.as_str()
            ),
            after: deadline,
        })?;
        drop(reaper);
        result
    }
}

/// Path helper for scratch directories.
pub fn scratch(dir: &Path, what: &str) -> PathBuf {
    dir.join(format!("{what}-{}", std::process::id()))
}
