//! Network namespaces and veth pairs for the benchmarks that send real traffic between two
//! namespaces (`bench ports`, the TCP flows of `bench failover` and `bench migrate`).
//!
//! Owns creating and deleting them (a [`Netns`] is deleted when dropped, with the veth ends in
//! it) and running a tool, inside one or not (`cluster up` runs `ip` through it too). Must not
//! be used by `serve` or the agent: the platform opens interfaces it is given, it never makes
//! them.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::cluster::ip;

/// A named network namespace (`ip netns add`), deleted on drop.
pub(crate) struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates namespace `name` with its loopback up.
    pub fn create(name: &str) -> Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its path, as an AF_PACKET socket opened inside it names it.
    pub fn path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/netns").join(&self.name)
    }

    /// `program args` inside this namespace, stdin closed.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        c.stdin(Stdio::null());
        c
    }
}

impl Drop for Netns {
    /// Deletes its links first (a veth's other end goes with it), then the namespace: a
    /// namespace something still holds outlives its deletion, and so would the outer ends of
    /// its veths, whose names a later namespace of the same name would want again.
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show"])
            .stdin(Stdio::null())
            .output()
        {
            let text = String::from_utf8_lossy(&out.stdout);
            // "2: eth0@if489: <BROADCAST,...> ..."
            for ifname in text
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .filter_map(|n| n.split('@').next())
                .filter(|n| *n != "lo")
            {
                let _ = Command::new("ip")
                    .args(["-n", &self.name, "link", "del", ifname])
                    .stdin(Stdio::null())
                    .output();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output();
    }
}

/// A veth pair: `outer_if` in `outer` (this process's namespace when `None`), `inner_if` in
/// `inner`; both up, offloads off (the data plane handles whole frames with finished
/// checksums), IPv6 off (no router solicitations or address checks among the measured frames)
/// and the outer end never forwarding what it receives (where this namespace forwards IPv4, a
/// host port's frames would also leave by its routes). The pair goes when `inner` is deleted.
pub(crate) fn veth(
    outer: Option<&Netns>,
    outer_if: &str,
    inner: &Netns,
    inner_if: &str,
) -> Result<()> {
    let mut add = vec![];
    if let Some(ns) = outer {
        add.extend(["-n", ns.name.as_str()]);
    }
    add.extend([
        "link", "add", outer_if, "type", "veth", "peer", "name", inner_if, "netns",
    ]);
    add.push(&inner.name);
    ip(&add)?;
    for (ns, dev) in [(outer, outer_if), (Some(inner), inner_if)] {
        offloads(ns, dev, false)?;
        sysctl(ns, &format!("net.ipv6.conf.{dev}.disable_ipv6=1"))?;
        match ns {
            Some(ns) => ip(&["-n", &ns.name, "link", "set", dev, "up"])?,
            None => ip(&["link", "set", dev, "up"])?,
        };
    }
    sysctl(outer, &format!("net.ipv4.conf.{outer_if}.forwarding=0"))?;
    Ok(())
}

/// `sysctl -qw setting` in `ns` (or this process's namespace).
fn sysctl(ns: Option<&Netns>, setting: &str) -> Result<()> {
    let args = ["-qw", setting];
    run(&mut command_in(ns, "sysctl", &args))
}

/// Turns the offloads of `dev` (in `ns`, or this process's namespace) on or off: checksums,
/// TSO, GSO and GRO.
pub(crate) fn offloads(ns: Option<&Netns>, dev: &str, on: bool) -> Result<()> {
    let state = if on { "on" } else { "off" };
    let mut args = vec!["-K", dev];
    for feature in ["tx", "rx", "tso", "gso", "gro"] {
        args.extend([feature, state]);
    }
    run(&mut command_in(ns, "ethtool", &args))
}

/// `program args` in `ns`, or in this process's namespace.
fn command_in(ns: Option<&Netns>, program: &str, args: &[&str]) -> Command {
    match ns {
        Some(ns) => ns.command(program, args),
        None => {
            let mut c = Command::new(program);
            c.args(args).stdin(Stdio::null());
            c
        }
    }
}

/// Runs `cmd`, its output discarded; an error names the command and what it printed.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    output(cmd).map(drop)
}

/// Runs `cmd` (stdin closed); its standard output, or an error naming the command line and
/// what it printed on its error output.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
