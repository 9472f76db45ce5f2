//! Host ports: an AF_PACKET raw socket bound to one host interface (veth, TAP, a real NIC),
//! optionally inside a named network namespace. As a [`Node`] it has one port: frames received
//! on the interface leave through it, frames arriving on it are transmitted on the interface.
//!
//! Owns the socket; must not create interfaces or namespaces (callers and tests do). Frames
//! this socket itself transmits are not received back (`PACKET_IGNORE_OUTGOING`). Offloads
//! (TSO/GSO/GRO, checksum offload) must be off on the interface, or the kernel hands over
//! frames larger than a pool buffer or with unfinished checksums (see docs/dataplane.md).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::node::{BATCH, Node, NodeIo};
use crate::pool::Packet;

/// `PACKET_IGNORE_OUTGOING` socket option (Linux 4.20+), not in every libc version.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// Counters of a host port.
#[derive(Debug, Default)]
pub struct HostPortStats {
    /// Frames received from the interface and sent into the graph.
    pub rx: AtomicU64,
    /// Frames transmitted on the interface.
    pub tx: AtomicU64,
    /// Received frames larger than a pool buffer (dropped).
    pub rx_truncated: AtomicU64,
    /// Frames the kernel refused to transmit (dropped).
    pub tx_errors: AtomicU64,
}

/// An AF_PACKET socket on one interface.
pub struct HostPort {
    fd: OwnedFd,
    ifname: String,
    stats: Arc<HostPortStats>,
    batch: usize,
    buf: Vec<Packet>,
}

impl HostPort {
    /// Open `ifname` in the caller's network namespace.
    pub fn open(ifname: &str) -> Result<Self> {
        Self::open_in(ifname, None)
    }

    /// Open `ifname` inside the network namespace at `netns` (e.g. `/run/netns/blue`); the
    /// socket stays in that namespace while the calling thread's namespace is untouched (a
    /// short-lived helper thread enters the namespace).
    pub fn open_in(ifname: &str, netns: Option<&Path>) -> Result<Self> {
        if ifname.is_empty() || ifname.len() > 15 {
            return Err(Error::config(
                "host_port.ifname",
                format!("{ifname:?} must be 1-15 bytes"),
            ));
        }
        let fd = match netns {
            None => open_socket(ifname)?,
            Some(ns) => {
                let ns = ns.to_path_buf();
                let name = ifname.to_string();
                std::thread::Builder::new()
                    .name("tv-netns".into())
                    .spawn(move || -> Result<OwnedFd> {
                        enter_netns(&ns)?;
                        open_socket(&name)
                    })
                    .map_err(|e| Error::io("spawn netns helper thread", e))?
                    .join()
                    .map_err(|_| Error::config("host_port", "netns helper thread panicked"))??
            }
        };
        Ok(HostPort {
            fd,
            ifname: ifname.to_string(),
            stats: Arc::new(HostPortStats::default()),
            batch: BATCH,
            buf: Vec::with_capacity(BATCH),
        })
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<HostPortStats> {
        Arc::clone(&self.stats)
    }

    /// The interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }
}

fn enter_netns(ns: &Path) -> Result<()> {
    let f = std::fs::File::open(ns)
        .map_err(|e| Error::io(format!("open network namespace {}", ns.display()), e))?;
    // SAFETY: `f` is an open namespace file; setns only changes this (helper) thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(Error::last_os(format!("setns({})", ns.display())));
    }
    Ok(())
}

fn open_socket(ifname: &str) -> Result<OwnedFd> {
    let cname = CString::new(ifname)
        .map_err(|_| Error::config("host_port.ifname", "must not contain NUL"))?;
    // SAFETY: `cname` is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(Error::last_os(format!("interface {ifname}")));
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call with constant arguments.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::c_int::from(proto),
        )
    };
    if raw < 0 {
        return Err(Error::last_os(format!(
            "socket(AF_PACKET) for {ifname} (needs CAP_NET_RAW)"
        )));
    }
    // SAFETY: `raw` is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    // SAFETY: valid fd, option value is a c_int of the size passed. Failure (old kernel) is
    // tolerated: we then also filter PACKET_OUTGOING frames on receive.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    // SAFETY: an all-zero sockaddr_ll is valid; we fill the fields bind needs.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll and we pass its exact size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Error::last_os(format!("bind AF_PACKET to {ifname}")));
    }
    // SAFETY: an all-zero packet_mreq is valid; promiscuous mode so a real NIC hands over
    // frames for other MAC addresses too.
    let mut mr: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mr.mr_ifindex = ifindex as i32;
    mr.mr_type = libc::PACKET_MR_PROMISC as u16;
    // SAFETY: valid fd and option struct of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            (&mr as *const libc::packet_mreq).cast(),
            std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Error::last_os(format!(
            "PACKET_ADD_MEMBERSHIP promisc on {ifname}"
        )));
    }
    Ok(fd)
}

impl Node for HostPort {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        let pool = io.pool();
        let fd = self.fd.as_raw_fd();
        let mut work = 0;
        // Transmit what the graph sends to this port.
        self.buf.clear();
        let n = io.recv(0, &mut self.buf, self.batch);
        for p in self.buf.drain(..) {
            let data = pool.data(&p);
            // SAFETY: `data` is a valid slice for the duration of the call.
            let rc =
                unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT) };
            if rc < 0 {
                self.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats.tx.fetch_add(1, Ordering::Relaxed);
            }
            io.free(p);
        }
        work += n;
        // Receive from the interface, only as much as the outgoing link can take (the kernel
        // socket buffer absorbs bursts; beyond it the kernel drops and counts).
        let room = if io.is_linked(0) {
            io.tx_space(0).min(self.batch)
        } else {
            self.batch
        };
        for _ in 0..room {
            let Some(mut p) = io.alloc() else { break };
            let mut got: isize = 0;
            let mut outgoing = false;
            pool.fill(&mut p, |buf| {
                // SAFETY: an all-zero sockaddr_ll is valid; recvfrom fills it.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut flen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: `buf` is writable for its length; `from`/`flen` are valid.
                got = unsafe {
                    libc::recvfrom(
                        fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut flen,
                    )
                };
                outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
                usize::try_from(got).unwrap_or(0)
            });
            if got <= 0 {
                io.free(p);
                break;
            }
            if outgoing {
                io.free(p);
                continue;
            }
            if got as usize > pool.buf_size() {
                self.stats.rx_truncated.fetch_add(1, Ordering::Relaxed);
                io.free(p);
                continue;
            }
            self.buf.push(p);
        }
        let r = self.buf.len();
        if r > 0 {
            self.stats.rx.fetch_add(r as u64, Ordering::Relaxed);
            io.send(0, &mut self.buf);
        }
        work + r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_interface_and_bad_names_are_errors() {
        let e = HostPort::open("tvnosuchif0").err().unwrap().to_string();
        assert!(e.contains("tvnosuchif0"), "{e}");
        let e = HostPort::open("").err().unwrap().to_string();
        assert!(e.contains("host_port.ifname"), "{e}");
        let e = HostPort::open("a-name-that-is-too-long")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("1-15 bytes"), "{e}");
        let e = HostPort::open_in("lo", Some(Path::new("/run/netns/tv-none-such")))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/run/netns/tv-none-such"), "{e}");
    }
}
