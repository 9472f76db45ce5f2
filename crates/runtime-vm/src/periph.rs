//! Peripherals granted to a VM: checks before anything changes, hot-plug through QMP
//! (backend first, then the device, rolled back on failure), and backend removal after the
//! guest released the device. Owns the QMP argument shapes and the descriptors QEMU gets instead
//! of paths (ADR 044): telvirt opens the block image, the TAP queue and the serial socket itself
//! and passes them over QMP, so an unprivileged, sandboxed QEMU needs no access to any of them.
//! Must not track grants (the handle does).

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde_json::{Map, json};

use crate::config::{Grant, Peripheral, check_readable};
use crate::error::{Error, Result};
use crate::qmp::QmpClient;

/// The virtio-serial controller every telvirt VM has; extra serial ports go on its bus.
pub const SERIAL_BUS: &str = "tv-vser0.0";

fn refused(id: &str, reason: String) -> Error {
    Error::PeripheralRefused {
        id: id.to_string(),
        reason,
    }
}

fn valid_pci_address(a: &str) -> bool {
    let b = a.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && a[..4]
            .chars()
            .chain(a[5..7].chars())
            .chain(a[8..10].chars())
            .all(|c| c.is_ascii_hexdigit())
        && (b'0'..=b'7').contains(&b[11])
}

/// Socket path of a virtio-serial peripheral.
pub fn serial_socket(dir: &Path, id: &str) -> std::path::PathBuf {
    dir.join(format!("{id}.sock"))
}

/// Everything that can be checked on the host before touching QEMU.
pub fn precheck(g: &Grant) -> Result<()> {
    match &g.peripheral {
        Peripheral::VirtioNet { tap, mac } => {
            if tap.is_empty() || tap.len() > 15 || tap.contains('/') {
                return Err(refused(
                    &g.id,
                    format!("`{tap}` is not a valid interface name"),
                ));
            }
            if !Path::new("/sys/class/net")
                .join(tap)
                .join("tun_flags")
                .exists()
            {
                return Err(refused(
                    &g.id,
                    format!(
                        "TAP device `{tap}` does not exist (create it: ip tuntap add dev {tap} mode tap)"
                    ),
                ));
            }
            if let Some(m) = mac
                && !crate::config::is_mac(m)
            {
                return Err(refused(
                    &g.id,
                    format!("mac `{m}` is not like 52:54:00:12:34:56"),
                ));
            }
            Ok(())
        }
        Peripheral::VirtioRng => Ok(()),
        Peripheral::VirtioSerial { name } => {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
            if !ok || name == telvirt_guest::proto::AGENT_PORT_NAME {
                return Err(refused(
                    &g.id,
                    format!(
                        "port name `{name}`: 1-64 letters, digits, '.', '-', '_' and not the agent's port"
                    ),
                ));
            }
            Ok(())
        }
        Peripheral::VirtioBlk { path, .. } => check_readable("peripheral image", path),
        Peripheral::Vfio { host } => {
            if !valid_pci_address(host) {
                return Err(refused(
                    &g.id,
                    format!("`{host}` is not a PCI address like 0000:03:00.0"),
                ));
            }
            let groups = std::fs::read_dir("/sys/kernel/iommu_groups")
                .map(|d| d.flatten().count())
                .unwrap_or(0);
            if groups == 0 {
                return Err(refused(
                    &g.id,
                    "VFIO passthrough needs an IOMMU and this host has none enabled (/sys/kernel/iommu_groups is empty; boot with intel_iommu=on or amd_iommu=on)".into(),
                ));
            }
            let dev = Path::new("/sys/bus/pci/devices").join(host);
            if !dev.exists() {
                return Err(refused(&g.id, format!("no PCI device {host} on this host")));
            }
            let driver = std::fs::read_link(dev.join("driver"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
            if driver.as_deref() != Some("vfio-pci") {
                return Err(refused(
                    &g.id,
                    format!(
                        "PCI device {host} is bound to {} instead of vfio-pci",
                        driver.unwrap_or_else(|| "no driver".into())
                    ),
                ));
            }
            Ok(())
        }
    }
}

fn backend_id(g: &Grant) -> String {
    format!("{}-be", g.id)
}

/// The `opaque` tag of a block peripheral's fd set (found again at detach, also after adoption).
pub fn fdset_tag(id: &str) -> String {
    format!("tv-blk:{id}")
}

/// Open a block image the way QEMU's file driver will use it (read-only or read-write).
pub fn open_image(id: &str, path: &Path, read_only: bool) -> Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| refused(id, format!("cannot open {}: {e}", path.display())))?;
    Ok(f.into())
}

/// Attach to an existing TAP device as one queue (`/dev/net/tun`, `TUNSETIFF` with
/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, as QEMU's own tap backend does).
pub fn open_tap(id: &str, tap: &str) -> Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| refused(id, format!("cannot open /dev/net/tun: {e}")))?;
    let name = tap.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(refused(
            id,
            format!("`{tap}` is not a valid interface name"),
        ));
    }
    // SAFETY: ifreq is plain data; all-zero is a valid empty request.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &b) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = b as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `ifr` is; the fd is open.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(refused(
            id,
            format!("cannot attach to TAP device `{tap}`: {e}"),
        ));
    }
    Ok(f.into())
}

/// Create the listening unix socket of a virtio-serial peripheral (QEMU gets the descriptor).
fn listen_serial(id: &str, path: &Path) -> Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| refused(id, format!("cannot listen on {}: {e}", path.display())))?;
    Ok(l.into())
}

/// Add the backend and the device; on failure remove what was added.
pub async fn plug(qmp: &QmpClient, dir: &Path, g: &Grant) -> Result<()> {
    let be = backend_id(g);
    let mut props = Map::new();
    let driver = match &g.peripheral {
        Peripheral::VirtioNet { tap, mac } => {
            let fd = open_tap(&g.id, tap)?;
            let fdname = format!("{be}-fd");
            qmp.getfd(&fdname, fd.as_fd()).await?;
            drop(fd);
            if let Err(e) = qmp
                .netdev_add(json!({"type": "tap", "id": be, "fd": fdname}))
                .await
            {
                // netdev_add takes the named fd only when it succeeds.
                let _ = qmp.closefd(&fdname).await;
                return Err(e);
            }
            props.insert("netdev".into(), be.clone().into());
            if let Some(m) = mac {
                props.insert("mac".into(), m.clone().into());
            }
            "virtio-net-pci"
        }
        Peripheral::VirtioRng => "virtio-rng-pci",
        Peripheral::VirtioSerial { name } => {
            let path = serial_socket(dir, &g.id);
            let fd = listen_serial(&g.id, &path)?;
            let fdname = format!("{be}-fd");
            let added = async {
                qmp.getfd(&fdname, fd.as_fd()).await?;
                let r = qmp
                    .chardev_add(
                        &be,
                        json!({"type": "socket", "data": {
                            "addr": {"type": "fd", "data": {"str": fdname}},
                            "server": true, "wait": false}}),
                    )
                    .await;
                if r.is_err() {
                    let _ = qmp.closefd(&fdname).await;
                }
                r
            }
            .await;
            drop(fd);
            if let Err(e) = added {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
            props.insert("bus".into(), SERIAL_BUS.into());
            props.insert("chardev".into(), be.clone().into());
            props.insert("name".into(), name.clone().into());
            "virtserialport"
        }
        Peripheral::VirtioBlk {
            path,
            format,
            read_only,
        } => {
            let fd = open_image(&g.id, path, *read_only)?;
            let set = qmp
                .add_fd(fd.as_fd(), None, Some(&fdset_tag(&g.id)))
                .await?;
            drop(fd);
            if let Err(e) = qmp
                .blockdev_add(json!({
                "driver": format.as_str(), "node-name": be, "read-only": read_only,
                "file": {"driver": "file", "filename": format!("/dev/fdset/{}", set.fdset_id),
                         "read-only": read_only}}))
                .await
            {
                let _ = qmp.remove_fd(set.fdset_id, None).await;
                return Err(e);
            }
            props.insert("drive".into(), be.clone().into());
            "virtio-blk-pci"
        }
        Peripheral::Vfio { host } => {
            props.insert("host".into(), host.clone().into());
            "vfio-pci"
        }
    };
    if let Err(e) = qmp.device_add(driver, &g.id, props).await {
        remove_backend(qmp, dir, g).await;
        return Err(e);
    }
    Ok(())
}

/// Remove the backend of a device the guest has released (best effort: logs failures).
pub async fn remove_backend(qmp: &QmpClient, dir: &Path, g: &Grant) {
    let be = backend_id(g);
    let r = match &g.peripheral {
        Peripheral::VirtioNet { .. } => qmp.netdev_del(&be).await,
        Peripheral::VirtioSerial { .. } => {
            let r = qmp.chardev_remove(&be).await;
            let _ = std::fs::remove_file(serial_socket(dir, &g.id));
            r
        }
        Peripheral::VirtioBlk { .. } => {
            let r = qmp.blockdev_del(&be).await;
            remove_fdsets(qmp, &g.id).await;
            r
        }
        Peripheral::VirtioRng | Peripheral::Vfio { .. } => Ok(()),
    };
    if let Err(e) = r {
        tracing::debug!("removing backend of {}: {e}", g.id);
    }
}

/// Remove the fd sets tagged for block peripheral `id` (QEMU closes the descriptors).
async fn remove_fdsets(qmp: &QmpClient, id: &str) {
    let tag = fdset_tag(id);
    match qmp.query_fdsets().await {
        Ok(sets) => {
            for s in sets
                .iter()
                .filter(|s| s.fds.iter().any(|f| f.opaque.as_deref() == Some(&tag)))
            {
                if let Err(e) = qmp.remove_fd(s.fdset_id, None).await {
                    tracing::debug!("removing fd set {} of {id}: {e}", s.fdset_id);
                }
            }
        }
        Err(e) => tracing::debug!("listing fd sets for {id}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(p: Peripheral) -> Grant {
        Grant {
            id: "p0".into(),
            peripheral: p,
        }
    }

    #[test]
    fn prechecks_refuse_precisely() {
        let e = precheck(&grant(Peripheral::VirtioNet {
            tap: "tvnosuchtap0".into(),
            mac: None,
        }))
        .unwrap_err()
        .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = precheck(&grant(Peripheral::VirtioBlk {
            path: "/nonexistent.img".into(),
            format: crate::config::DiskFormat::Raw,
            read_only: false,
        }))
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent.img"), "{e}");
        let e = precheck(&grant(Peripheral::Vfio {
            host: "03:00.0".into(),
        }))
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a PCI address"), "{e}");
        let e = precheck(&grant(Peripheral::VirtioSerial {
            name: "bad name".into(),
        }))
        .unwrap_err()
        .to_string();
        assert!(e.contains("port name"), "{e}");
        precheck(&grant(Peripheral::VirtioRng)).unwrap();
        precheck(&grant(Peripheral::VirtioSerial {
            name: "org.example.data".into(),
        }))
        .unwrap();
    }

    #[test]
    fn vfio_without_iommu_names_the_reason() {
        let has_iommu = std::fs::read_dir("/sys/kernel/iommu_groups")
            .map(|d| d.count() > 0)
            .unwrap_or(false);
        let e = precheck(&grant(Peripheral::Vfio {
            host: "0000:03:00.0".into(),
        }))
        .unwrap_err()
        .to_string();
        if has_iommu {
            assert!(e.contains("0000:03:00.0"), "{e}");
        } else {
            assert!(e.contains("IOMMU"), "{e}");
        }
    }

    #[test]
    fn pci_addresses() {
        assert!(valid_pci_address("0000:03:00.0"));
        assert!(valid_pci_address("0000:af:1f.7"));
        assert!(!valid_pci_address("0000:03:00.8"));
        assert!(!valid_pci_address("0000-03:00.0"));
    }
}
