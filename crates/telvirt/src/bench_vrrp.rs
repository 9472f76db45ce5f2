//! The VRRP baseline of `telvirt bench failover`: keepalived (Debian's package) in two network
//! namespaces joined by a veth pair, `advert_int 1`, the master killed with SIGKILL, timed until
//! the backup holds the virtual address: how long a classic active/standby pair takes to move
//! its traffic. Needs root (namespaces); without it, the report says why it is missing.
//!
//! Owns the namespaces, the keepalived processes and their configuration for the run, and
//! removes them all. It must not touch anything telvirt runs.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::bench_control::ms;
use crate::cluster::ip;

const VIP: &str = "10.99.0.100";
/// How often the backup's address is looked at: the figure's resolution.
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Serialize)]
pub struct VrrpFigures {
    pub keepalived: String,
    pub advert_int_s: u32,
    /// From the master's SIGKILL until the backup holds the virtual address, per kill.
    pub flip_ms: Vec<f64>,
    pub flip_max_ms: f64,
}

/// The two namespaces and keepalived processes; removed on drop.
struct Pair {
    names: [String; 2],
    links: [String; 2],
    keepalived: [Option<std::process::Child>; 2],
}

impl Pair {
    fn holds_vip(&self, i: usize) -> Result<bool> {
        let out = ip(&[
            "-n",
            &self.names[i],
            "-o",
            "addr",
            "show",
            "dev",
            &self.links[i],
        ])?;
        Ok(out.contains(&format!("{VIP}/")))
    }

    /// Starts keepalived in namespace `i` (0: master, priority 150; 1: backup, 100).
    fn start(&mut self, dir: &Path, i: usize) -> Result<()> {
        let (state, priority) = if i == 0 {
            ("MASTER", 150)
        } else {
            ("BACKUP", 100)
        };
        let conf = dir.join(format!("keepalived-{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "global_defs {{ router_id tvbench{i} }}\nvrrp_instance VI_1 {{\n  state {state}\n  interface {}\n  virtual_router_id 51\n  priority {priority}\n  advert_int 1\n  virtual_ipaddress {{ {VIP}/24 }}\n}}\n",
                self.links[i]
            ),
        )?;
        let log = std::fs::File::create(dir.join(format!("keepalived-{i}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.names[i], "keepalived"])
            .args(["--dont-fork", "--log-console", "--vrrp", "-f"])
            .arg(&conf)
            .arg("-p")
            .arg(dir.join(format!("keepalived-{i}.pid")))
            .arg("-r")
            .arg(dir.join(format!("vrrp-{i}.pid")))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("cannot start keepalived (Debian's keepalived package)")?;
        self.keepalived[i] = Some(child);
        Ok(())
    }

    /// SIGKILL to keepalived `i` and its VRRP child (its process group).
    fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.keepalived[i].take() {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-9", "--", &group]).status();
            let _ = child.wait();
        }
        Ok(())
    }

    fn wait_for(&self, i: usize, holds: bool, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        while self.holds_vip(i)? != holds {
            if Instant::now() > deadline {
                bail!(
                    "keepalived in {} did not {} {VIP} within {within:?}",
                    self.names[i],
                    if holds { "take" } else { "give up" }
                );
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for i in 0..2 {
            let _ = self.kill(i);
        }
        for name in &self.names {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Times `rounds` kills of the VRRP master in `dir`; `Err` with why when it cannot run here.
pub fn vrrp_baseline(dir: &Path, rounds: u32) -> Result<VrrpFigures> {
    if !crate::cluster::is_root() {
        bail!("the VRRP baseline needs root (network namespaces)");
    }
    let version = Command::new("keepalived")
        .arg("--version")
        .output()
        .context("keepalived is not installed (scripts/deps.sh installs it)")?;
    let keepalived = String::from_utf8_lossy(&version.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&version.stdout).lines())
        .next()
        .unwrap_or("keepalived")
        .trim()
        .to_owned();
    std::fs::create_dir_all(dir)?;
    let tag = std::process::id() % 100_000;
    let mut pair = Pair {
        names: [format!("tvvrrp{tag}a"), format!("tvvrrp{tag}b")],
        links: [format!("tvv{tag}a"), format!("tvv{tag}b")],
        keepalived: [None, None],
    };
    for name in &pair.names {
        ip(&["netns", "add", name])?;
    }
    let [a, b] = &pair.links;
    ip(&["link", "add", a, "type", "veth", "peer", "name", b])?;
    for (i, address) in ["10.99.0.1/24", "10.99.0.2/24"].into_iter().enumerate() {
        let (ns, link) = (&pair.names[i], &pair.links[i]);
        ip(&["link", "set", link, "netns", ns])?;
        ip(&["-n", ns, "addr", "add", address, "dev", link])?;
        ip(&["-n", ns, "link", "set", link, "up"])?;
    }
    pair.start(dir, 1)?;
    let mut flips = Vec::new();
    for _ in 0..rounds {
        pair.start(dir, 0)?;
        pair.wait_for(0, true, Duration::from_secs(20))?;
        pair.wait_for(1, false, Duration::from_secs(20))?;
        let killed = Instant::now();
        pair.kill(0)?;
        pair.wait_for(1, true, Duration::from_secs(20))?;
        flips.push(ms(killed.elapsed()));
        // A killed keepalived leaves its address behind; the next master starts clean.
        let _ = ip(&[
            "-n",
            &pair.names[0],
            "addr",
            "del",
            &format!("{VIP}/24"),
            "dev",
            &pair.links[0],
        ]);
    }
    Ok(VrrpFigures {
        keepalived,
        advert_int_s: 1,
        flip_max_ms: flips.iter().copied().fold(0.0, f64::max),
        flip_ms: flips,
    })
}
