//! The embedded store on a real, small filesystem that runs full: it refuses cleanly while the
//! disk is full, reports itself failing, and reopens itself once space is back, with every
//! acknowledged write intact. Needs root (it mounts a tmpfs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use telvirt_store::{RedbStore, Store, StoreError, StoreHealth, WatchEvent};

mod common;

use common::{put, txn_leased};

/// A tmpfs of `size` mounted on a temp directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs on {}", dir.path().display());
        SmallDisk { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `path` until the filesystem is full; returns how many bytes went in.
    fn fill(path: &Path) -> u64 {
        let mut file = std::fs::File::create(path).unwrap();
        let chunk = vec![0xa5u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        written
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_refuses_on_a_full_disk_and_recovers_when_space_is_back() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let disk = SmallDisk::mount("4m");
    let store = RedbStore::open(&disk.path("store.redb")).unwrap();
    let mut acknowledged = Vec::new();
    for i in 0..8 {
        let key = format!("/before/{i}");
        let value = vec![i as u8; 1000];
        store.put(&key, value.clone()).await.unwrap();
        acknowledged.push((key, value));
    }
    assert_eq!(store.health(), StoreHealth::Ok);
    // A watch and a lease from before the fault must work after the reopen.
    let mut watch = store.watch("/after").await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(600)).await.unwrap();

    let filler = disk.path("filler");
    assert!(SmallDisk::fill(&filler) > 0, "the filler wrote nothing");

    // redb reuses pages its file already holds, so a few writes may still fit: write until one
    // fails, within a bound that a full 4 MiB disk cannot take.
    let mut refused = None;
    for i in 0..512u32 {
        let key = format!("/during/{i}");
        let value = vec![(i % 251) as u8; 16 * 1024];
        match store.put(&key, value.clone()).await {
            Ok(_) => acknowledged.push((key, value)),
            Err(e) => {
                refused = Some((key, e));
                break;
            }
        }
    }
    let (refused_key, error) = refused.expect("no write failed on a full disk");
    assert!(
        matches!(&error, StoreError::Unavailable(why) if why.contains("No space left")),
        "{error}"
    );
    match store.health() {
        StoreHealth::Failing { error, .. } => {
            assert!(error.contains("No space left"), "{error}")
        }
        StoreHealth::Ok => panic!("the store reports Ok after a write failed on a full disk"),
    }
    // Every call is refused cleanly while the disk is full, deletes and reads included, with
    // the cause rather than redb's "Previous I/O error".
    for result in [
        store.put("/after", b"x".to_vec()).await.map(drop),
        store.delete("/before/0").await.map(drop),
        store.get("/before/0").await.map(drop),
    ] {
        let e = result.expect_err("a call succeeded on a failed store with the disk still full");
        assert!(e.is_unavailable(), "{e}");
        assert!(!e.to_string().contains("Previous I/O"), "{e}");
    }

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match store.put("/after", b"space is back".to_vec()).await {
            Ok(_) => break,
            Err(e) => {
                assert!(e.is_unavailable(), "{e}");
                assert!(
                    Instant::now() < deadline,
                    "the store did not recover once space was back: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_eq!(store.health(), StoreHealth::Ok);
    for (key, value) in &acknowledged {
        let got = store.get(key).await.unwrap();
        assert_eq!(
            got.map(|v| v.value).as_ref(),
            Some(value),
            "acknowledged {key} was lost"
        );
    }
    assert!(
        store.get(&refused_key).await.unwrap().is_none(),
        "the refused write {refused_key} was applied"
    );
    assert_eq!(
        store.get("/after").await.unwrap().unwrap().value,
        b"space is back"
    );
    // Deletes work again too.
    store.delete("/before/0").await.unwrap();
    assert!(store.get("/before/0").await.unwrap().is_none());

    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("the watch from before the fault saw nothing")
            .unwrap()
    };
    // A commit that failed may have reached the file all the same: the reopen tells its
    // watchers to read again.
    let event = next().await;
    assert!(matches!(event, WatchEvent::Resync), "{event:?}");
    let event = next().await;
    assert!(
        matches!(&event, WatchEvent::Put { key, value, .. } if key == "/after" && value == b"space is back"),
        "{event:?}"
    );
    store.keep_alive(lease).await.unwrap();
    // The background task still expires leases after the reopen.
    txn_leased(&*store, Duration::from_millis(50), |short| {
        vec![put("/leased", b"1", Some(short))]
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.get("/leased").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the lease did not expire after the reopen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
