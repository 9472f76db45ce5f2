//! A uid of its own for each VM's QEMU (ADR 068): QEMUs that shared one user could signal,
//! trace and read the files of each other (another authority's guest stream key, say), so a
//! guest that broke out into its QEMU reached every other VM of the host.
//!
//! Owns choosing a free uid of [`OWN_UIDS`] and holding it: an exclusive lock on the uid's
//! file in the host-wide lease directory while the lease lives (two telvirt processes on one
//! host never give one uid out twice), and no process ran with the uid when it was taken (a
//! QEMU whose agent went away keeps its uid). It must not start QEMU nor decide whether a QEMU
//! gets an own uid (`confine::plan` does).

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// The uids each VM's own QEMU user is drawn from: above the ranges systemd hands to
/// containers (up to 0x6FFFFFFF) and below 2^31 (tools that read a uid as signed).
pub const OWN_UIDS: std::ops::Range<u32> = 1_900_000_000..1_900_065_536;

/// The host-wide directory of the uid leases: one file per uid taken, locked by its holder.
pub const LEASE_DIR: &str = "/run/telvirt/qemu-uids";

/// One uid held for one VM's QEMU until dropped.
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    /// Holds the uid's exclusive lock (released when closed).
    _lock: File,
}

impl UidLease {
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// A free uid of `range` (no other lease holds it, no process runs with it), trying first
    /// the place `hint` hashes to, so a VM started again tends to get the uid it had.
    pub fn take(dir: &Path, range: std::ops::Range<u32>, hint: &str) -> Result<Self> {
        let len = range.end.saturating_sub(range.start);
        if len == 0 {
            return Err(Error::InvalidConfig {
                field: "qemu uids",
                reason: format!("the range {range:?} holds no uid"),
            });
        }
        make_dir(dir)?;
        let busy = uids_in_use()?;
        let start = fnv1a(hint.as_bytes()) % u64::from(len);
        for i in 0..u64::from(len) {
            let uid = range.start + ((start + i) % u64::from(len)) as u32;
            if busy.contains(&uid) {
                continue;
            }
            if let Some(lock) = try_lock(dir, uid)? {
                return Ok(Self { uid, _lock: lock });
            }
        }
        Err(Error::InvalidConfig {
            field: "qemu uids",
            reason: format!(
                "every uid of {}..{} is held by a lease or runs a process",
                range.start, range.end
            ),
        })
    }

    /// Holds `uid` again for a QEMU that runs with it already (a VM adopted by a new
    /// process); `None` when another lease holds it.
    pub fn retake(dir: &Path, uid: u32) -> Result<Option<Self>> {
        make_dir(dir)?;
        Ok(try_lock(dir, uid)?.map(|lock| Self { uid, _lock: lock }))
    }
}

fn make_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(format!("create {}", dir.display())))
}

/// The lock of `uid`'s file in `dir`, unless another open file holds it.
fn try_lock(dir: &Path, uid: u32) -> Result<Option<File>> {
    let path = dir.join(uid.to_string());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(Error::io(format!("open {}", path.display())))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(Error::io(format!("lock {}", path.display()))(e))
    }
}

/// Every uid a process of this host runs with (real, effective, saved or filesystem).
fn uids_in_use() -> Result<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    let entries = std::fs::read_dir("/proc").map_err(Error::io("read /proc"))?;
    for e in entries.flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        // A process that exited meanwhile has no status: nothing to count.
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        out.extend(status_uids(&status));
    }
    Ok(out)
}

/// The uids of a `/proc/PID/status` text's `Uid:` line.
fn status_uids(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|ids| {
            ids.split_whitespace()
                .filter_map(|u| u.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// FNV-1a: a stable spread of a VM's name over the range.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_uid_is_not_given_again_until_its_lease_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let range = OWN_UIDS.start..OWN_UIDS.start + 2;
        let a = UidLease::take(dir.path(), range.clone(), "vm-a").unwrap();
        let b = UidLease::take(dir.path(), range.clone(), "vm-a").unwrap();
        assert_ne!(a.uid(), b.uid());
        assert!(range.contains(&a.uid()) && range.contains(&b.uid()));
        let e = UidLease::take(dir.path(), range.clone(), "vm-c").unwrap_err();
        assert!(e.to_string().contains("every uid of"), "{e}");
        assert!(UidLease::retake(dir.path(), a.uid()).unwrap().is_none());
        let uid = a.uid();
        drop(a);
        assert_eq!(
            UidLease::retake(dir.path(), uid).unwrap().map(|l| l.uid()),
            Some(uid)
        );
        // The same name tends to the same uid.
        drop(b);
        let again = UidLease::take(dir.path(), range, "vm-a").unwrap();
        assert_eq!(again.uid(), uid);
    }

    #[test]
    fn a_uid_some_process_runs_with_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: getuid has no preconditions.
        let mine = unsafe { libc::getuid() };
        let lease = UidLease::take(dir.path(), mine..mine + 2, "x").unwrap();
        assert_eq!(lease.uid(), mine + 1);
        assert!(UidLease::take(dir.path(), mine..mine + 1, "x").is_err());
    }

    #[test]
    fn the_uid_line_of_a_status_is_read() {
        assert_eq!(
            status_uids(
                "Name:\tqemu\nUid:\t1900000001\t1900000001\t1900000001\t1900000001\nGid:\t0\n"
            ),
            vec![1_900_000_001; 4]
        );
        assert!(status_uids("Name:\tx\n").is_empty());
    }
}
