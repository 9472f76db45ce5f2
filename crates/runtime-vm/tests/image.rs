//! Guest image builder against the real apt kernel, busybox-static and the static agent.

#![allow(clippy::unwrap_used)]

mod common;

use telvirt_runtime_vm::image::ImageBuilder;

#[test]
fn builds_reports_progress_and_caches_by_content() {
    let img = common::image();
    assert!(img.kernel.is_file(), "{}", img.kernel.display());
    assert!(img.initrd.is_file(), "{}", img.initrd.display());
    for m in [
        "virtio_pci",
        "virtio_console",
        "virtio_net",
        "virtio_rng",
        "virtio_blk",
    ] {
        assert!(
            img.modules.iter().any(|x| x == m),
            "{m} missing from {:?}",
            img.modules
        );
    }
    // Dependencies load before the modules needing them.
    let pos = |m: &str| img.modules.iter().position(|x| x == m);
    if let (Some(ring), Some(pci)) = (pos("virtio_ring"), pos("virtio_pci")) {
        assert!(ring < pci, "{:?}", img.modules);
    }
    // Second build: same inputs, same file, from the cache, with progress reported.
    let mut steps = Vec::new();
    let again = ImageBuilder::new(common::cache_dir(), common::guest_binary())
        .build(&mut |p| steps.push((p.step, p.total, p.message.clone())))
        .unwrap();
    assert!(again.cached);
    assert_eq!(again.initrd, img.initrd);
    assert_eq!(again.digest, img.digest);
    assert!(steps.len() >= 4, "{steps:?}");
    assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0), "{steps:?}");
    assert_eq!(steps.last().map(|s| s.0), steps.last().map(|s| s.1));
}

#[test]
fn dynamic_guest_binary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    let err = ImageBuilder::new(dir.path(), &me)
        .build(&mut |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("dynamically linked"), "{err}");
    let err = ImageBuilder::new(dir.path(), dir.path().join("missing"))
        .build(&mut |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}
