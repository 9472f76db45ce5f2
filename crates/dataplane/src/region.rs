//! Shared-memory regions: an anonymous memfd mapped `MAP_SHARED`, so the same pages can later
//! be handed (by fd) to another process such as a QEMU vhost-user backend or another agent.
//! Owns the mapping's lifetime only; must not interpret the bytes (rings and pools do).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::error::{Error, Result};

/// A zero-filled, page-aligned, memfd-backed shared mapping.
#[derive(Debug)]
pub struct Region {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain shared memory; `Region` hands out only raw pointers and the
// types built on it (ring, pool) define which thread may touch which bytes.
unsafe impl Send for Region {}
// SAFETY: as above; `&Region` only exposes the base pointer and length.
unsafe impl Sync for Region {}

impl Region {
    /// Create a region of at least `len` bytes (rounded up to the page size), named `name` in
    /// `/proc/<pid>/fd` listings.
    pub fn new(name: &str, len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::config("region.len", "must be > 0 bytes"));
        }
        let page = page_size();
        let len = len
            .checked_next_multiple_of(page)
            .ok_or_else(|| Error::config("region.len", format!("{len} bytes overflows")))?;
        let cname = CString::new(format!("telvirt-{name}"))
            .map_err(|_| Error::config("region.name", "must not contain NUL bytes"))?;
        // SAFETY: `cname` is a valid NUL-terminated string; flags are valid constants.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::last_os(format!("memfd_create({name})")));
        }
        // SAFETY: `raw` is a fresh fd we own exclusively.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len)
            .map_err(|_| Error::config("region.len", format!("{len} bytes too large")))?;
        // SAFETY: `fd` is a valid memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(Error::last_os(format!("ftruncate({name}, {len})")));
        }
        let ptr = map_shared(&fd, len, &format!("mmap({name}, {len})"))?;
        Ok(Region { fd, ptr, len })
    }

    /// Base address of the mapping (page aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes (a multiple of the page size).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: regions are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl AsFd for Region {
    /// The memfd, to pass to another process (SCM_RIGHTS, vhost-user `SET_MEM_TABLE`).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned and nothing borrows the mapping
        // any more (every user holds the Region alive through an Arc).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The system page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf with a valid name has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096).max(4096)
}

/// Map `len` bytes of `fd` shared and read-write (a memfd, a kernel packet ring); `what`
/// names the mapping in the error.
fn map_shared(fd: &OwnedFd, len: usize, what: &str) -> Result<NonNull<u8>> {
    map_shared_at(fd, len, 0, what)
}

/// [`map_shared`] from byte `offset` of `fd` (rings a socket maps at fixed offsets).
fn map_shared_at(fd: &OwnedFd, len: usize, offset: libc::off_t, what: &str) -> Result<NonNull<u8>> {
    mmap(len, libc::MAP_SHARED, fd.as_raw_fd(), offset, what)
}

/// A read-write mapping of `len` bytes with `flags`, of `fd` from `offset` (`-1`, 0 for an
/// anonymous one).
fn mmap(
    len: usize,
    flags: libc::c_int,
    fd: libc::c_int,
    offset: libc::off_t,
    what: &str,
) -> Result<NonNull<u8>> {
    // SAFETY: mapping `len` bytes of a valid fd (or anonymous memory) with a NULL hint; the
    // result is checked against MAP_FAILED below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            offset,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(Error::last_os(what));
    }
    NonNull::new(ptr.cast::<u8>())
        .ok_or_else(|| Error::io("mmap returned NULL", std::io::Error::other("null mapping")))
}

/// A mapping unmapped when dropped: a ring a socket shares with the kernel, an AF_XDP UMEM.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory; the types holding a `Mapping` decide which thread touches which bytes.
unsafe impl Send for Mapping {}

impl Mapping {
    /// `len` bytes of `fd` from byte `offset`, shared with whoever else maps them (the kernel).
    pub(crate) fn shared_at(
        fd: &OwnedFd,
        len: usize,
        offset: libc::off_t,
        what: &str,
    ) -> Result<Mapping> {
        let ptr = map_shared_at(fd, len, offset, what)?;
        Ok(Mapping { ptr, len })
    }

    /// `len` bytes of private anonymous memory, populated at once.
    pub(crate) fn anonymous(len: usize, what: &str) -> Result<Mapping> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
        let ptr = mmap(len, flags, -1, 0, what)?;
        Ok(Mapping { ptr, len })
    }

    /// The first byte.
    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made by a constructor, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_is_zeroed_page_rounded_and_writable() {
        let r = Region::new("test", 100).unwrap();
        assert_eq!(r.len() % page_size(), 0);
        assert!(r.len() >= 100);
        // SAFETY: test owns the whole region.
        let s = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len()) };
        assert!(s.iter().all(|b| *b == 0));
        s[99] = 7;
        assert_eq!(s[99], 7);
    }

    #[test]
    fn region_is_visible_through_its_fd() {
        let r = Region::new("fdview", 4096).unwrap();
        // SAFETY: test owns the whole region.
        unsafe { *r.as_ptr().add(10) = 42 };
        let path = format!("/proc/self/fd/{}", r.as_fd().as_raw_fd());
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(bytes[10], 42);
    }

    #[test]
    fn zero_length_is_rejected() {
        let e = Region::new("zero", 0).unwrap_err();
        assert!(e.to_string().contains("region.len"), "{e}");
    }
}
