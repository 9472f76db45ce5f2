//! Default guest image: Debian's cloud kernel (fetched with apt into a cache dir), the virtio
//! modules the guest needs, busybox-static and the static telvirt-guest agent packed into an
//! initramfs this module writes itself (cpio newc). Owns downloading, extraction, module
//! dependency resolution and the content-addressed cache; must not start QEMU.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Debian metapackage that depends on the current cloud kernel.
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
/// Modules the default guest loads (with their dependencies), unless built in.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_console",
    "virtio_net",
    "virtio_rng",
    "virtio_blk",
    // ACPI power button as an input device: the agent powers off on `system_powerdown`.
    "button",
    // The default guest forwards between its NICs through a bridge.
    "bridge",
    "evdev",
];
/// Kernel command line of the default guest.
pub const DEFAULT_APPEND: &str = "console=ttyS0 panic=-1 loglevel=4";
/// Bumped whenever the initramfs layout changes, so cached images are rebuilt.
const FORMAT: &str = "telvirt-initramfs-v4";

const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in /lib/modules/*.ko; do
  insmod "$m" || echo "telvirt-init: insmod $m failed"
done
echo "telvirt-init: modules loaded"
# Forward between the NICs: with two or more, every one joins one bridge.
set -- /sys/class/net/eth*
if [ -e "$1" ] && [ $# -ge 2 ]; then
  ip link add tv-br0 type bridge
  for n in "$@"; do
    brctl addif tv-br0 "${n##*/}"
    ip link set "${n##*/}" up
  done
  ip link set tv-br0 up
  echo "telvirt-init: bridged $*"
  # The agent says the guest is ready only once every port forwards (state 3): a port turns
  # forwarding when the kernel sees its carrier, up to a second after the link came up, and
  # the bridge drops what reaches a port before that. At most 10 s: a NIC whose host end is
  # not connected has no carrier.
  waited=0
  while [ "$waited" -lt 200 ]; do
    pending=""
    for n in "$@"; do
      [ "$(cat "$n/brport/state" 2>/dev/null)" = 3 ] || pending="$pending ${n##*/}"
    done
    [ -z "$pending" ] && break
    usleep 50000
    waited=$((waited + 1))
  done
  [ -n "$pending" ] && echo "telvirt-init: not forwarding after 10 s:$pending"
fi
while true; do
  /bin/telvirt-guest
  echo "telvirt-init: agent exited ($?), restarting"
  sleep 1
done
"#;

/// One progress report of [`ImageBuilder::build`].
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProgress {
    pub step: u64,
    pub total: u64,
    pub message: String,
}

/// A built guest image.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_version: String,
    /// sha256 of everything that went into the initramfs.
    pub digest: String,
    /// Modules packed, in load order.
    pub modules: Vec<String>,
    /// True when the initramfs was already in the cache.
    pub cached: bool,
}

/// Builds (or finds in the cache) the default guest image.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    cache_dir: PathBuf,
    guest_binary: PathBuf,
    busybox: PathBuf,
    kernel_package: String,
}

impl ImageBuilder {
    /// `cache_dir` gets an `images/` subdirectory; `guest_binary` must be a static telvirt-guest.
    pub fn new(cache_dir: impl Into<PathBuf>, guest_binary: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            guest_binary: guest_binary.into(),
            busybox: PathBuf::from("/bin/busybox"),
            kernel_package: DEFAULT_KERNEL_PACKAGE.to_string(),
        }
    }

    /// Use another static busybox (default `/bin/busybox` from busybox-static).
    pub fn busybox(mut self, path: impl Into<PathBuf>) -> Self {
        self.busybox = path.into();
        self
    }

    /// Use another Debian kernel package (a metapackage or a concrete `linux-image-<version>`).
    pub fn kernel_package(mut self, name: impl Into<String>) -> Self {
        self.kernel_package = name.into();
        self
    }

    fn images_dir(&self) -> PathBuf {
        self.cache_dir.join("images")
    }

    /// Build the image, or return the cached one when its inputs did not change.
    pub fn build(&self, progress: &mut dyn FnMut(&ImageProgress)) -> Result<GuestImage> {
        const TOTAL: u64 = 6;
        let mut report = |step: u64, message: String| {
            progress(&ImageProgress {
                step,
                total: TOTAL,
                message,
            })
        };
        let images = self.images_dir();
        std::fs::create_dir_all(&images)
            .map_err(Error::io(format!("create {}", images.display())))?;
        let _lock = FileLock::acquire(&images.join(".lock"))?;

        check_static(&self.guest_binary, "guest binary")?;
        check_static(&self.busybox, "busybox")?;

        report(
            1,
            format!("resolving kernel package {}", self.kernel_package),
        );
        let package = resolve_kernel_package(&self.kernel_package)?;

        let kdir = images.join("kernel").join(&package);
        if kdir.join(".complete").exists() {
            report(2, format!("kernel {package} already in cache"));
            report(3, format!("kernel {package} already extracted"));
        } else {
            report(2, format!("downloading {package} with apt-get"));
            let deb = download_deb(&package, &images.join("debs"))?;
            report(3, format!("extracting {}", deb.display()));
            extract_deb(&deb, &kdir)?;
        }
        let (kernel, version) = find_kernel(&kdir)?;

        report(4, format!("resolving modules for kernel {version}"));
        let moddir = kdir.join("lib/modules").join(&version);
        let modules = resolve_modules(&moddir, GUEST_MODULES)?;

        let guest = read(&self.guest_binary, "guest binary")?;
        let busybox = read(&self.busybox, "busybox")?;
        let mut module_bytes = Vec::new();
        let mut hasher = Sha256::new();
        for part in [
            FORMAT.as_bytes(),
            version.as_bytes(),
            INIT_SCRIPT.as_bytes(),
            &guest,
            &busybox,
        ] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        for (name, path) in &modules {
            let bytes = module_contents(path)?;
            hasher.update(name.as_bytes());
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
            module_bytes.push((name.clone(), bytes));
        }
        let digest = telvirt_model::api::hex(&hasher.finalize());
        let initrd = images.join(format!("initrd-{}.cpio", &digest[..16]));
        let names: Vec<String> = modules.iter().map(|(n, _)| n.clone()).collect();
        let cached = initrd.exists();
        if cached {
            report(5, "initramfs already in cache".into());
        } else {
            report(5, format!("writing initramfs ({} modules)", names.len()));
            let mut cpio = Cpio::default();
            for d in [
                "bin",
                "dev",
                "proc",
                "sys",
                "lib",
                "lib/modules",
                "tmp",
                "run",
                "etc",
            ] {
                cpio.dir(d);
            }
            cpio.char_dev("dev/console", 5, 1);
            cpio.file("init", 0o755, INIT_SCRIPT.as_bytes());
            cpio.file("bin/busybox", 0o755, &busybox);
            cpio.file("bin/telvirt-guest", 0o755, &guest);
            for (i, (name, bytes)) in module_bytes.iter().enumerate() {
                cpio.file(&format!("lib/modules/{i:02}-{name}.ko"), 0o644, bytes);
            }
            let tmp = images.join(format!(".initrd-{}.tmp", std::process::id()));
            let mut f = std::fs::File::create(&tmp)
                .map_err(Error::io(format!("create {}", tmp.display())))?;
            f.write_all(&cpio.finish())
                .and_then(|()| f.sync_all())
                .map_err(Error::io(format!("write {}", tmp.display())))?;
            std::fs::rename(&tmp, &initrd)
                .map_err(Error::io(format!("rename to {}", initrd.display())))?;
        }
        report(6, format!("guest image ready: {}", initrd.display()));
        Ok(GuestImage {
            kernel,
            initrd,
            kernel_version: version,
            digest,
            modules: names,
            cached,
        })
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::FileUnreadable {
        field: what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Refuse dynamically linked executables: they would not run inside the initramfs.
pub fn check_static(path: &Path, what: &'static str) -> Result<()> {
    let bytes = read(path, what)?;
    match elf_interpreter(&bytes) {
        None => Err(Error::Image(format!(
            "{what} {} is not an x86-64 ELF executable",
            path.display()
        ))),
        Some(true) => Err(Error::Image(format!(
            "{what} {} is dynamically linked; build it static (see docs/runtime-vm.md)",
            path.display()
        ))),
        Some(false) => Ok(()),
    }
}

/// `Some(has PT_INTERP)` for a 64-bit little-endian ELF, `None` otherwise.
fn elf_interpreter(b: &[u8]) -> Option<bool> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    let phentsize = usize::from(u16_at(54)?);
    let phnum = usize::from(u16_at(56)?);
    let mut interp = false;
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?);
        interp |= p_type == 3;
    }
    Some(interp)
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| Error::Image(format!("{what}: cannot run {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(Error::Image(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_concrete_image(pkg: &str) -> bool {
    pkg.strip_prefix("linux-image-")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// Metapackage → the concrete `linux-image-<version>` it depends on (runs `apt-get update`
/// once when apt does not know the package yet).
fn resolve_kernel_package(pkg: &str) -> Result<String> {
    if is_concrete_image(pkg) {
        return Ok(pkg.to_string());
    }
    let query = || {
        run(
            crate::confine::child_command("apt-cache").args([
                "depends",
                "--no-recommends",
                "--no-suggests",
                pkg,
            ]),
            "apt-cache depends",
        )
        .ok()
        .and_then(|out| {
            out.lines()
                .filter_map(|l| l.trim().strip_prefix("Depends:"))
                .map(|d| d.trim().to_string())
                .find(|d| is_concrete_image(d))
        })
    };
    if let Some(p) = query() {
        return Ok(p);
    }
    run(
        crate::confine::child_command("apt-get").arg("update"),
        "apt-get update",
    )?;
    query().ok_or_else(|| {
        Error::Image(format!(
            "apt knows no kernel image that {pkg} depends on (is it a linux-image package?)"
        ))
    })
}

fn download_deb(pkg: &str, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    let dl = || {
        run(
            crate::confine::child_command("apt-get")
                .args(["download", pkg])
                .current_dir(dir),
            "apt-get download",
        )
    };
    if dl().is_err() {
        run(
            crate::confine::child_command("apt-get").arg("update"),
            "apt-get update",
        )?;
        dl()?;
    }
    find().ok_or_else(|| {
        Error::Image(format!(
            "apt-get download {pkg} left no .deb in {}",
            dir.display()
        ))
    })
}

fn extract_deb(deb: &Path, dest: &Path) -> Result<()> {
    let tmp = dest.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(Error::io(format!("create {}", tmp.display())))?;
    run(
        crate::confine::child_command("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(&tmp),
        "dpkg-deb -x",
    )?;
    std::fs::write(tmp.join(".complete"), b"").map_err(Error::io("mark kernel extracted"))?;
    let _ = std::fs::remove_dir_all(dest);
    std::fs::rename(&tmp, dest).map_err(Error::io(format!("rename to {}", dest.display())))
}

fn find_kernel(kdir: &Path) -> Result<(PathBuf, String)> {
    let boot = kdir.join("boot");
    let entries =
        std::fs::read_dir(&boot).map_err(Error::io(format!("read {}", boot.display())))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(v) = name.strip_prefix("vmlinuz-") {
            return Ok((e.path(), v.to_string()));
        }
    }
    Err(Error::Image(format!("no vmlinuz-* in {}", boot.display())))
}

/// Canonical module name: `virtio-rng` and `virtio_rng` are the same module.
fn canon(name: &str) -> String {
    name.replace('-', "_")
}

fn module_stem(file: &str) -> Option<&str> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
}

/// The wanted modules and their dependencies, in load order, skipping built-in ones.
fn resolve_modules(moddir: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let builtin: HashSet<String> = std::fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next().and_then(module_stem).map(canon))
        .collect();
    let mut index = BTreeMap::new();
    let mut stack = vec![moddir.join("kernel")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(stem) = p.file_name().and_then(|n| n.to_str()).and_then(module_stem)
            {
                index.insert(canon(stem), p.clone());
            }
        }
    }
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &HashSet<String>,
        seen: &mut HashSet<String>,
        order: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> Result<()> {
        let name = canon(name);
        if builtin.contains(&name) || !seen.insert(name.clone()) {
            return Ok(());
        }
        if depth > 32 {
            return Err(Error::Image(format!("module dependency loop at {name}")));
        }
        let path = index.get(&name).ok_or_else(|| {
            Error::Image(format!(
                "kernel module {name} is neither built in nor shipped"
            ))
        })?;
        for dep in module_depends(&module_contents(path)?) {
            visit(&dep, index, builtin, seen, order, depth + 1)?;
        }
        order.push((name, path.clone()));
        Ok(())
    }
    for w in wanted {
        visit(w, &index, &builtin, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

/// The uncompressed bytes of a module file.
fn module_contents(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => read(path, "kernel module"),
        Some(t) => {
            let out = crate::confine::child_command(t)
                .arg("-dc")
                .arg(path)
                .output()
                .map_err(|e| Error::Image(format!("{t} -dc {}: {e}", path.display())))?;
            if !out.status.success() {
                return Err(Error::Image(format!("{t} -dc {} failed", path.display())));
            }
            Ok(out.stdout)
        }
    }
}

/// The `depends=` entry of a module's .modinfo section.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(pos) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[pos + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// An exclusive lock on a file, released on drop (two builders never write the cache at once).
struct FileLock(std::fs::File);

impl FileLock {
    fn acquire(path: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(Error::io(format!("open {}", path.display())))?;
        // SAFETY: flock on a file descriptor we own for the lifetime of `f`.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(Error::io(format!("lock {}", path.display()))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: unlocking the descriptor we own; closing would release it as well.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// A cpio "newc" archive in memory (the initramfs format the kernel unpacks).
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_layout_is_newc() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("init\0"));
        assert!(s.contains("TRAILER!!!"));
        // mode of the file entry: regular 0755
        assert!(s.contains("000081ed"));
    }

    #[test]
    fn modinfo_depends_is_parsed() {
        let blob = b"xx\0license=GPL\0depends=virtio_ring,virtio\0intree=Y\0";
        assert_eq!(module_depends(blob), vec!["virtio_ring", "virtio"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"nothing").is_empty());
    }

    #[test]
    fn elf_checks() {
        assert_eq!(
            elf_interpreter(
                b"not an elf at all, certainly not 64 bytes long......................"
            ),
            None
        );
        // This test binary is dynamically linked (no crt-static in tests).
        let me = std::env::current_exe().unwrap();
        let err = check_static(&me, "guest binary").unwrap_err();
        assert!(err.to_string().contains("dynamically linked"), "{err}");
        let err =
            check_static(Path::new("/nonexistent/telvirt-guest"), "guest binary").unwrap_err();
        assert!(matches!(err, Error::FileUnreadable { .. }), "{err}");
    }

    #[test]
    fn package_names() {
        assert!(is_concrete_image("linux-image-6.1.0-56-cloud-amd64"));
        assert!(!is_concrete_image("linux-image-cloud-amd64"));
        assert_eq!(module_stem("virtio-rng.ko"), Some("virtio-rng"));
        assert_eq!(module_stem("virtio_net.ko.xz"), Some("virtio_net"));
        assert_eq!(canon("virtio-rng"), "virtio_rng");
    }
}
