//! A uid of its own for each VM's QEMU (ADR 068): QEMUs that shared one user could signal,
//! trace and read the files of each other (another authority's guest stream key, say), so a
//! guest that broke out into its QEMU reached every other VM of the host.
//!
//! Owns choosing a free uid of [`OWN_UIDS`] and holding it: an exclusive lock on the uid's
//! file in the host-wide lease directory, which QEMU inherits and so holds until it exits (two
//! telvirt processes on one host never give one uid out twice, whatever becomes of the one that
//! started it); a uid some process runs with, a user or group of the host has, or
//! `/etc/subuid`/`/etc/subgid` hands out is passed over. It must not start QEMU nor decide
//! whether a QEMU gets an own uid (`confine::plan` does).

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// The uids each VM's own QEMU user is drawn from: above the ranges systemd hands to
/// containers (up to 0x6FFFFFFF) and below 2^31 (tools that read a uid as signed).
pub const OWN_UIDS: std::ops::Range<u32> = 1_900_000_000..1_900_065_536;

/// The host-wide directory of the uid leases: one file per uid taken, locked by its holder.
pub const LEASE_DIR: &str = "/run/telvirt/qemu-uids";

/// One uid held for one VM's QEMU: the lock goes when every copy of its descriptor is closed
/// (this one, and QEMU's once it inherited it: [`UidLease::fd`]).
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    lock: File,
}

impl UidLease {
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The lock's descriptor, for QEMU to inherit (clear its close-on-exec in the child): the
    /// uid is then held as long as QEMU runs.
    pub fn fd(&self) -> RawFd {
        self.lock.as_raw_fd()
    }

    /// A free uid of `range` (see the module), trying first the place `hint` hashes to, so a
    /// VM started again tends to get the uid it had.
    pub fn take(dir: &Path, range: std::ops::Range<u32>, hint: &str) -> Result<Self> {
        let busy = uids_in_use()?;
        let handed = sub_ranges();
        Self::take_in(dir, range, hint, |uid| {
            !busy.contains(&uid)
                && !handed.iter().any(|r| r.contains(&u64::from(uid)))
                && !known_id(uid)
        })
    }

    /// [`UidLease::take`] with `free` saying which uids nothing else of the host has.
    fn take_in(
        dir: &Path,
        range: std::ops::Range<u32>,
        hint: &str,
        free: impl Fn(u32) -> bool,
    ) -> Result<Self> {
        let len = range.end.saturating_sub(range.start);
        if len == 0 {
            return Err(Error::InvalidConfig {
                field: "qemu uids",
                reason: format!("the range {range:?} holds no uid"),
            });
        }
        make_dir(dir)?;
        let start = fnv1a(hint.as_bytes()) % u64::from(len);
        for i in 0..u64::from(len) {
            let uid = range.start + ((start + i) % u64::from(len)) as u32;
            if !free(uid) {
                continue;
            }
            if let Some(lock) = try_lock(dir, uid)? {
                return Ok(Self { uid, lock });
            }
        }
        Err(Error::InvalidConfig {
            field: "qemu uids",
            reason: format!(
                "every uid of {}..{} is held by a lease, runs a process or belongs to the host",
                range.start, range.end
            ),
        })
    }

    /// Whether `uid`'s lease is held now (by a telvirt process or the QEMU that inherited it).
    pub fn held(dir: &Path, uid: u32) -> Result<bool> {
        make_dir(dir)?;
        Ok(try_lock(dir, uid)?.is_none())
    }
}

/// Makes `dir` (owned by this process's user, mode 0700) or checks that it is so: a directory
/// another user could write to could put a link in a lease's place.
fn make_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(format!("create {}", dir.display())))?;
    let meta =
        std::fs::symlink_metadata(dir).map_err(Error::io(format!("stat {}", dir.display())))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o077 != 0 {
        return Err(Error::InvalidConfig {
            field: "qemu uids",
            reason: format!(
                "{} must be a directory of uid {euid} that no one else may enter (mode 0700); it is uid {}, mode {:o}",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ),
        });
    }
    Ok(())
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
        .custom_flags(libc::O_NOFOLLOW)
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
    let pids = telvirt_files::proc::pids();
    // This process is one: none listed means /proc could not be read.
    if pids.is_empty() {
        return Err(Error::io("read /proc")(std::io::Error::other(
            "no process listed",
        )));
    }
    Ok(pids
        .into_iter()
        .filter_map(telvirt_files::proc::uids)
        .flatten()
        .collect())
}

/// The id ranges `/etc/subuid` and `/etc/subgid` hand to users (their containers' ids).
fn sub_ranges() -> Vec<std::ops::Range<u64>> {
    ["/etc/subuid", "/etc/subgid"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| text.lines().filter_map(sub_range).collect::<Vec<_>>())
        .collect()
}

/// The range of one `NAME:FIRST:COUNT` line.
fn sub_range(line: &str) -> Option<std::ops::Range<u64>> {
    let mut parts = line.trim().split(':');
    let (_, first, count) = (parts.next()?, parts.next()?, parts.next()?);
    let first: u64 = first.parse().ok()?;
    Some(first..first + count.parse::<u64>().ok()?)
}

/// Whether the host knows `uid` as a user or as a group (the own gid is the uid).
fn known_id(uid: u32) -> bool {
    let mut buf = vec![0u8; 16384];
    // SAFETY: plain data, all-zero is a valid empty record.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut pout: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; nothing of the record is read.
    let user =
        unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut pout) };
    if user != 0 || !pout.is_null() {
        return true;
    }
    // SAFETY: as above.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut gout: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as above.
    let group =
        unsafe { libc::getgrgid_r(uid, &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut gout) };
    group != 0 || !gout.is_null()
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

    const RANGE: std::ops::Range<u32> = 5000..5003;

    /// A lease directory of its own (made by the first take, mode 0700), in a temporary one.
    fn leases() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let leases = dir.path().join("leases");
        (dir, leases)
    }

    #[test]
    fn a_held_uid_is_not_given_again_until_its_lease_is_dropped() {
        let (_tmp, dir) = leases();
        let two = RANGE.start..RANGE.start + 2;
        let a = UidLease::take_in(&dir, two.clone(), "vm-a", |_| true).unwrap();
        let b = UidLease::take_in(&dir, two.clone(), "vm-a", |_| true).unwrap();
        assert_ne!(a.uid(), b.uid());
        assert!(two.contains(&a.uid()) && two.contains(&b.uid()));
        let e = UidLease::take_in(&dir, two.clone(), "vm-c", |_| true).unwrap_err();
        assert!(e.to_string().contains("every uid of"), "{e}");
        assert!(UidLease::held(&dir, a.uid()).unwrap());
        let uid = a.uid();
        drop(a);
        assert!(!UidLease::held(&dir, uid).unwrap());
        // The same name tends to the same uid.
        drop(b);
        let again = UidLease::take_in(&dir, two, "vm-a", |_| true).unwrap();
        assert_eq!(again.uid(), uid);
    }

    #[test]
    fn a_uid_the_host_has_is_passed_over() {
        let (_tmp, dir) = leases();
        let taken = [5000, 5001];
        let lease = UidLease::take_in(&dir, RANGE, "x", |uid| !taken.contains(&uid)).unwrap();
        assert_eq!(lease.uid(), 5002);
        assert!(UidLease::take_in(&dir, RANGE, "x", |uid| !taken.contains(&uid)).is_err());
        assert!(UidLease::take_in(&dir, 7..7, "x", |_| true).is_err());
        // What the host has: root is a user and a group; the own range is neither.
        assert!(known_id(0));
        assert!(!known_id(OWN_UIDS.start));
    }

    #[test]
    fn a_lease_directory_others_may_enter_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let leases = dir.path().join("leases");
        std::fs::create_dir(&leases).unwrap();
        std::fs::set_permissions(&leases, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = UidLease::take_in(&leases, RANGE, "x", |_| true).unwrap_err();
        assert!(
            e.to_string().contains("mode 0700") && e.to_string().contains("755"),
            "{e}"
        );
        // A link in a lease's place is not followed.
        std::fs::set_permissions(&leases, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), leases.join("5000")).unwrap();
        assert!(UidLease::take_in(&leases, 5000..5001, "x", |_| true).is_err());
        assert!(!dir.path().join("elsewhere").exists());
    }

    #[test]
    fn the_sub_id_lines_and_the_uids_in_use_are_read() {
        assert_eq!(sub_range("alice:100000:65536"), Some(100_000..165_536));
        assert_eq!(sub_range("broken"), None);
        // The processes of this host are found (this one among them).
        // SAFETY: getuid has no preconditions.
        assert!(uids_in_use().unwrap().contains(&unsafe { libc::getuid() }));
    }
}
