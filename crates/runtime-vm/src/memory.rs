//! Host memory checks for guest RAM backends: free huge pages and the hugetlbfs mount. Owns
//! the sysfs and /proc/mounts parsing; must not reserve pages (the operator or Makefile does).

use std::path::PathBuf;

use crate::config::HugePageSize;
use crate::error::{Error, Result};

/// Free and total pages of one size, from sysfs.
pub fn hugepage_counts(size: HugePageSize) -> Result<(u64, u64, String)> {
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{}kB", size.kib());
    let read = |f: &str| -> Result<u64> {
        let p = format!("{dir}/{f}");
        std::fs::read_to_string(&p)
            .map_err(|e| {
                Error::HugePages(format!(
                    "this host has no {} pages ({p}: {e})",
                    size.label()
                ))
            })?
            .trim()
            .parse()
            .map_err(|_| Error::HugePages(format!("cannot parse {p}")))
    };
    Ok((read("free_hugepages")?, read("nr_hugepages")?, dir))
}

/// Refuse (with the numbers) when fewer than the needed pages are free; return the
/// hugetlbfs mount point to back guest RAM with.
pub fn check_hugepages(size: HugePageSize, memory_mib: u64) -> Result<PathBuf> {
    let needed = memory_mib * 1024 / size.kib();
    let (free, total, dir) = hugepage_counts(size)?;
    if free < needed {
        return Err(Error::HugePagesShort {
            size: size.label().into(),
            memory_mib,
            needed,
            free,
            total,
            sysfs: format!("{dir}/nr_hugepages"),
        });
    }
    hugetlbfs_mount(size)
}

fn default_hugepage_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Hugepagesize:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(2048)
}

/// A hugetlbfs mount whose page size is `size`.
pub fn hugetlbfs_mount(size: HugePageSize) -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(Error::io("read /proc/mounts"))?;
    let want = size.kib();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || f[2] != "hugetlbfs" {
            continue;
        }
        let kib = f[3]
            .split(',')
            .find_map(|o| o.strip_prefix("pagesize="))
            .map(|v| match v.trim_end_matches('B').to_ascii_uppercase() {
                s if s.ends_with('G') => {
                    s.trim_end_matches('G').parse::<u64>().unwrap_or(0) * 1024 * 1024
                }
                s if s.ends_with('M') => s.trim_end_matches('M').parse::<u64>().unwrap_or(0) * 1024,
                s => s.trim_end_matches('K').parse::<u64>().unwrap_or(0),
            })
            .unwrap_or_else(default_hugepage_kib);
        if kib == want {
            return Ok(PathBuf::from(f[1]));
        }
    }
    Err(Error::HugePages(format!(
        "no hugetlbfs is mounted for {} pages (mount -t hugetlbfs -o pagesize={} none /dev/hugepages{})",
        size.label(),
        if want == 2048 { "2M" } else { "1G" },
        if want == 2048 { "" } else { "1G" }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_few_pages_is_refused_with_numbers() {
        let (free, _total, _) = hugepage_counts(HugePageSize::Size2M).unwrap();
        // Ask for more 2 MiB pages than are free.
        let memory_mib = (free + 1) * 2;
        match check_hugepages(HugePageSize::Size2M, memory_mib) {
            Err(Error::HugePagesShort {
                needed, free: f, ..
            }) => {
                assert_eq!(needed, free + 1);
                assert_eq!(f, free);
            }
            other => panic!("expected HugePagesShort, got {other:?}"),
        }
        let msg = check_hugepages(HugePageSize::Size2M, memory_mib)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("nr_hugepages"), "{msg}");
        assert!(msg.contains(&format!("{} free", free)), "{msg}");
    }
}
