//! Configuration of one VM as the runtime sees it (the agent maps descriptors onto it):
//! resources, boot source, CPU placement, accelerator choice, peripherals. Owns validation with
//! precise errors; must not touch QEMU or the host beyond checking that named files are readable.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A set of host CPU numbers, written like Linux cpu lists: `0-2,5`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CpuSet(pub BTreeSet<usize>);

impl CpuSet {
    pub fn single(cpu: usize) -> Self {
        Self(BTreeSet::from([cpu]))
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().copied()
    }
}

impl FromStr for CpuSet {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| Error::InvalidConfig {
            field: "cpu set",
            reason: format!("`{s}`: {why} (expected a list like 0-2,5)"),
        };
        let mut set = BTreeSet::new();
        for part in s.trim().split(',').filter(|p| !p.trim().is_empty()) {
            let part = part.trim();
            let num = |v: &str| {
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| bad(format!("`{v}` is not a cpu number")))
            };
            if let Some((a, b)) = part.split_once('-') {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(bad(format!("range {a}-{b} is reversed")));
                }
                if b - a > 4096 {
                    return Err(bad(format!("range {a}-{b} is too large")));
                }
                set.extend(a..=b);
            } else {
                set.insert(num(part)?);
            }
        }
        Ok(Self(set))
    }
}

impl TryFrom<String> for CpuSet {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<CpuSet> for String {
    fn from(c: CpuSet) -> String {
        c.to_string()
    }
}

impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v: Vec<usize> = self.iter().collect();
        let mut parts = Vec::new();
        let mut i = 0;
        while i < v.len() {
            let mut j = i;
            while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
                j += 1;
            }
            parts.push(if i == j {
                format!("{}", v[i])
            } else {
                format!("{}-{}", v[i], v[j])
            });
            i = j + 1;
        }
        f.write_str(&parts.join(","))
    }
}

/// Which accelerator to use. `Auto` probes once whether KVM really runs a guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(Error::InvalidConfig {
                field: "accel",
                reason: format!("`{other}` is not one of auto, kvm, tcg"),
            }),
        }
    }
}

impl AccelChoice {
    /// The accelerator this choice runs guests with, `auto` being what the host `decided`.
    pub fn or_decided(self, decided: Accel) -> Accel {
        match self {
            AccelChoice::Auto => decided,
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
        }
    }
}

/// The accelerator a VM actually runs on (the descriptor's `spec.vm.accel` names the same).
pub use telvirt_model::vnf::Accelerator as Accel;

/// Huge page size backing guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePageSize {
    #[serde(rename = "2MiB")]
    Size2M,
    #[serde(rename = "1GiB")]
    Size1G,
}

impl HugePageSize {
    pub fn kib(self) -> u64 {
        match self {
            Self::Size2M => 2048,
            Self::Size1G => 1024 * 1024,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Self::Size2M => "2 MiB",
            Self::Size1G => "1 GiB",
        }
    }
}

/// Disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// A disk image the VM boots from (or just sees as its first disk).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskImage {
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// Where the VM's threads may run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuPlacement {
    /// Empty: no pinning. One set: every vCPU on that set. Otherwise one set per vCPU.
    #[serde(default)]
    pub vcpu_cpus: Vec<CpuSet>,
    /// Emulator and I/O threads (the shared set or their isolated core); `None`: not pinned.
    #[serde(default)]
    pub emulator_cpus: Option<CpuSet>,
    /// SCHED_FIFO priority (1-99) for vCPU threads, where the host permits it.
    #[serde(default)]
    pub realtime_priority: Option<u8>,
}

/// A device granted to the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Peripheral {
    /// virtio-net on an existing TAP device.
    VirtioNet {
        tap: String,
        #[serde(default)]
        mac: Option<String>,
    },
    VirtioRng,
    /// A virtio-serial port named `name` in the guest, a unix socket `<id>.sock` on the host.
    VirtioSerial {
        name: String,
    },
    VirtioBlk {
        path: PathBuf,
        format: DiskFormat,
        #[serde(default)]
        read_only: bool,
    },
    /// PCI passthrough of a host device (`0000:03:00.0`); needs an IOMMU.
    Vfio {
        host: String,
    },
}

impl Peripheral {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::VirtioNet { .. } => "virtio_net",
            Self::VirtioRng => "virtio_rng",
            Self::VirtioSerial { .. } => "virtio_serial",
            Self::VirtioBlk { .. } => "virtio_blk",
            Self::Vfio { .. } => "vfio",
        }
    }
}

/// A peripheral with the id it is known by (unique per VM; the QEMU device id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    #[serde(flatten)]
    pub peripheral: Peripheral,
}

/// A virtio-net NIC whose backend is another process (the node's data plane) that connects to
/// the vhost-user socket QEMU serves (QEMU waits for it while it starts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserNic {
    /// Names the NIC's QEMU objects (`tv-nic-<id>`): 1-32 letters, digits, '-', '_'.
    pub id: String,
    /// The listening socket.
    pub socket: PathBuf,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
}

/// Everything needed to run one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    /// VNF name: `-name guest=<name>`, the process name and the state directory.
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub hugepages: Option<HugePageSize>,
    /// Back guest RAM with a shared memfd (needed for vhost-user links).
    #[serde(default)]
    pub shared_memory: bool,
    /// Lock guest and QEMU memory (`-overcommit mem-lock=on`).
    #[serde(default)]
    pub lock_memory: bool,
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; default [`crate::image::DEFAULT_APPEND`].
    #[serde(default)]
    pub append: Option<String>,
    #[serde(default)]
    pub disk: Option<DiskImage>,
    #[serde(default)]
    pub cpu: CpuPlacement,
    #[serde(default)]
    pub accel: AccelChoice,
    #[serde(default)]
    pub peripherals: Vec<Grant>,
    /// NICs on vhost-user sockets, in guest order (`eth0`, `eth1`, ...); they need
    /// `shared_memory` or huge pages.
    #[serde(default)]
    pub vhost_user_nics: Vec<VhostUserNic>,
    /// Running only after the telvirt guest agent says ready (off for images without it).
    pub wait_for_agent: bool,
    /// Directory of this VM's pid file, sockets, console log and grants (survives restarts);
    /// default `<manager root>/<name>`. Keep it short: unix socket paths are limited.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    pub ready_timeout: Duration,
    pub stop_timeout: Duration,
    /// The QEMU machine type: `pc` (the QEMU's newest i440FX type) or a versioned one such as
    /// `pc-i440fx-7.2`, which a newer QEMU still has, so a guest moved there keeps its hardware
    /// (`None`: `pc`). A started VM's config holds the versioned type its QEMU resolved.
    #[serde(default)]
    pub machine: Option<String>,
    /// The guest's CPU model, a QEMU model name (`Haswell-v4`): the same CPU on every host.
    /// `None`: the host's CPU under KVM (`-cpu host`), `max` under TCG. Under KVM QEMU is
    /// asked to enforce it (it refuses to start where the host's CPU lacks a feature of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
}

impl VmConfig {
    /// 1 vCPU, 256 MiB, the given kernel and initrd, accel auto, waiting for the guest agent.
    pub fn new(
        name: impl Into<String>,
        kernel: impl Into<PathBuf>,
        initrd: impl Into<PathBuf>,
    ) -> Self {
        Self {
            name: name.into(),
            vcpus: 1,
            memory_mib: 256,
            hugepages: None,
            shared_memory: false,
            lock_memory: false,
            kernel: Some(kernel.into()),
            initrd: Some(initrd.into()),
            append: None,
            disk: None,
            cpu: CpuPlacement::default(),
            accel: AccelChoice::Auto,
            peripherals: Vec::new(),
            vhost_user_nics: Vec::new(),
            wait_for_agent: true,
            state_dir: None,
            ready_timeout: Duration::from_secs(120),
            stop_timeout: Duration::from_secs(30),
            machine: None,
            cpu_model: None,
        }
    }

    /// Check every field; `online_cpus` is the host's set of usable CPUs.
    pub fn validate(&self, online_cpus: &CpuSet) -> Result<()> {
        let invalid =
            |field: &'static str, reason: String| Err(Error::InvalidConfig { field, reason });
        validate_name(&self.name)?;
        if self.vcpus == 0 || self.vcpus > 255 {
            return invalid("vcpus", format!("{} is outside 1..=255", self.vcpus));
        }
        if self.memory_mib < 32 {
            return invalid(
                "memory",
                format!("{} MiB is below the 32 MiB minimum", self.memory_mib),
            );
        }
        if let Some(hp) = self.hugepages
            && !(self.memory_mib * 1024).is_multiple_of(hp.kib())
        {
            return invalid(
                "memory",
                format!(
                    "{} MiB is not a multiple of the {} huge page size",
                    self.memory_mib,
                    hp.label()
                ),
            );
        }
        if self.kernel.is_none() && self.disk.is_none() {
            return invalid(
                "kernel",
                "neither a kernel nor a disk image to boot from".into(),
            );
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            return invalid("initrd", "an initrd needs a kernel".into());
        }
        if let Some(m) = &self.machine {
            check_machine_type(m).map_err(|reason| Error::InvalidConfig {
                field: "machine",
                reason,
            })?;
        }
        if let Some(m) = &self.cpu_model {
            telvirt_model::vnf::check_cpu_model(m).map_err(|reason| Error::InvalidConfig {
                field: "cpu_model",
                reason,
            })?;
        }
        if let Some(k) = &self.kernel {
            check_readable("kernel", k)?;
        }
        if let Some(i) = &self.initrd {
            check_readable("initrd", i)?;
        }
        if let Some(d) = &self.disk {
            check_readable("disk", &d.path)?;
        }
        let n = self.cpu.vcpu_cpus.len();
        if n > 1 && n != self.vcpus as usize {
            return invalid(
                "cpu.vcpu_cpus",
                format!(
                    "{n} sets for {} vCPUs: give none, one shared set, or one per vCPU",
                    self.vcpus
                ),
            );
        }
        for set in self
            .cpu
            .vcpu_cpus
            .iter()
            .chain(self.cpu.emulator_cpus.iter())
        {
            if set.is_empty() {
                return invalid("cpu", "an empty cpu set".into());
            }
            if let Some(c) = set.iter().find(|c| !online_cpus.0.contains(c)) {
                return invalid(
                    "cpu",
                    format!("cpu {c} is not online on this host (online: {online_cpus})"),
                );
            }
        }
        if let Some(p) = self.cpu.realtime_priority
            && !(1..=99).contains(&p)
        {
            return invalid("cpu.realtime_priority", format!("{p} is outside 1..=99"));
        }
        if self.ready_timeout.is_zero() || self.stop_timeout.is_zero() {
            return invalid(
                "timeouts",
                "ready and stop timeouts must be positive".into(),
            );
        }
        let mut ids = HashSet::new();
        for g in &self.peripherals {
            validate_peripheral_id(&g.id)?;
            if !ids.insert(g.id.as_str()) {
                return invalid("peripherals", format!("id `{}` appears twice", g.id));
            }
        }
        if !self.vhost_user_nics.is_empty() && !self.shared_memory && self.hugepages.is_none() {
            return invalid(
                "vhost_user_nics",
                "a vhost-user NIC's backend maps the guest's RAM: set shared_memory (or huge \
                 pages)"
                    .into(),
            );
        }
        let mut nic_ids = HashSet::new();
        for n in &self.vhost_user_nics {
            let id_ok = !n.id.is_empty()
                && n.id.len() <= 32
                && n.id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
            if !id_ok {
                return invalid(
                    "vhost_user_nics.id",
                    format!("`{}`: 1-32 letters, digits, '-', '_'", n.id),
                );
            }
            if !nic_ids.insert(n.id.as_str()) {
                return invalid("vhost_user_nics.id", format!("`{}` appears twice", n.id));
            }
            if !is_mac(&n.mac) {
                return invalid(
                    "vhost_user_nics.mac",
                    format!("`{}` is not a MAC address like 52:54:00:12:34:56", n.mac),
                );
            }
            if n.socket.to_str().is_none_or(|s| s.contains(',')) {
                return invalid(
                    "vhost_user_nics.socket",
                    format!(
                        "{} must be UTF-8 without ',' (QEMU's option syntax)",
                        n.socket.display()
                    ),
                );
            }
        }
        Ok(())
    }
}

/// VM names become directory names, QEMU's `-name` and the process name.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            field: "name",
            reason: format!(
                "`{name}`: 1-48 characters of letters, digits, '-', '_', '.', starting with a letter or digit"
            ),
        })
    }
}

/// Whether `s` is a MAC address written as QEMU takes it: six pairs of hex digits joined by
/// ':'.
pub(crate) fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

pub use telvirt_model::vnf::{MACHINE_ALIAS, check_machine_type, machine_version};

/// The i440FX machine types a QEMU has, from its `-machine help`: the versioned ones, newest
/// first, and the one its `pc` alias stands for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineTypes {
    /// What `pc` resolves to (`None`: the text names no alias for it).
    pub pc: Option<String>,
    /// Every `pc-i440fx-X.Y`, newest first.
    pub versioned: Vec<String>,
}

impl MachineTypes {
    /// Reads `qemu -machine help`.
    pub fn parse(help: &str) -> Self {
        let mut out = Self::default();
        for line in help.lines() {
            let mut words = line.split_whitespace();
            let Some(name) = words.next() else { continue };
            if name == MACHINE_ALIAS {
                out.pc = line
                    .split("(alias of ")
                    .nth(1)
                    .and_then(|rest| rest.split(')').next())
                    .filter(|m| machine_version(m).is_some())
                    .map(str::to_owned);
            } else if machine_version(name).is_some() {
                out.versioned.push(name.to_owned());
            }
        }
        out.versioned
            .sort_by_key(|m| std::cmp::Reverse(machine_version(m)));
        out
    }

    /// The versioned type a VM asking for `wanted` (`None`: `pc`) runs on with this QEMU, or
    /// why it cannot. A QEMU whose list could not be read takes what is asked as it is.
    pub fn resolve(&self, wanted: Option<&str>) -> std::result::Result<String, String> {
        let wanted = wanted.unwrap_or(MACHINE_ALIAS);
        if self.versioned.is_empty() {
            return Ok(wanted.to_owned());
        }
        if wanted == MACHINE_ALIAS {
            return Ok(self.pc.clone().unwrap_or_else(|| self.versioned[0].clone()));
        }
        if self.versioned.iter().any(|m| m == wanted) {
            return Ok(wanted.to_owned());
        }
        Err(format!(
            "this QEMU has no machine type {wanted}: it has {}",
            self.span()
        ))
    }

    /// `pc-i440fx-OLDEST … NEWEST` (or the one), for messages.
    pub fn span(&self) -> String {
        telvirt_model::vnf::machine_span(&self.versioned)
    }
}

/// `(major, minor)` of a QEMU from its `--version` or `-help` text (`QEMU emulator version
/// 7.2.22 (Debian ...)`).
pub fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("QEMU emulator version ").nth(1)?;
    let mut parts = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The `virtio-net-pci` options of a vhost-user NIC under `accel`: `vectors=0` under TCG, where
/// QEMU 7.2 segfaults (`vhost_net_start` → `msix_set_vector_notifiers`, a NULL dereference) as
/// soon as the guest enables MSI-X on such a device; with INTx QEMU reads the backend's call
/// eventfds and raises the interrupt itself, whatever kernel or image the guest runs. KVM keeps
/// MSI-X (irqfd). QEMU 10.0 under TCG runs with the same setting (`telvirt --test vm
/// a_vm_on_the_newer_qemu`); whether it would take MSI-X there was not tried.
pub fn vhost_user_nic_options(accel: Accel) -> &'static str {
    match accel {
        Accel::Tcg => ",vectors=0",
        Accel::Kvm => "",
    }
}

/// Peripheral ids become QEMU device ids and a serial device's socket name; the names
/// [`telvirt_model::reserved_device_id`] refuses are telvirt's own.
pub fn validate_peripheral_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 32
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if !ok {
        return Err(Error::InvalidConfig {
            field: "peripheral id",
            reason: format!("`{id}`: 1-32 letters, digits, '-', '_', starting with a letter"),
        });
    }
    match telvirt_model::reserved_device_id(id) {
        Some(reason) => Err(Error::InvalidConfig {
            field: "peripheral id",
            reason,
        }),
        None => Ok(()),
    }
}

/// A named file must exist, be a regular file and be readable.
pub fn check_readable(field: &'static str, path: &Path) -> Result<()> {
    let err = |reason: String| Error::FileUnreadable {
        field,
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> (tempfile::TempDir, VmConfig) {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinuz");
        let i = dir.path().join("initrd");
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        let c = VmConfig::new("fw1", k, i);
        (dir, c)
    }

    fn online() -> CpuSet {
        "0-1".parse().unwrap()
    }

    fn field_of(r: Result<()>) -> String {
        match r {
            Err(Error::InvalidConfig { field, .. }) => field.to_string(),
            Err(Error::FileUnreadable { field, .. }) => field.to_string(),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn cpuset_parse_and_display() {
        let s: CpuSet = "0-2, 5,7-8".parse().unwrap();
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 1, 2, 5, 7, 8]);
        assert_eq!(s.to_string(), "0-2,5,7-8");
        assert!("3-1".parse::<CpuSet>().is_err());
        assert!("a".parse::<CpuSet>().is_err());
        assert!("".parse::<CpuSet>().unwrap().is_empty());
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, "\"0-2,5,7-8\"");
        assert_eq!(serde_json::from_str::<CpuSet>(&j).unwrap(), s);
    }

    #[test]
    fn accel_choice_parses() {
        assert_eq!("auto".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
        assert_eq!("kvm".parse::<AccelChoice>().unwrap(), AccelChoice::Kvm);
        assert_eq!("tcg".parse::<AccelChoice>().unwrap(), AccelChoice::Tcg);
        let e = "xen".parse::<AccelChoice>().unwrap_err().to_string();
        assert!(e.contains("auto, kvm, tcg"), "{e}");
    }

    #[test]
    fn valid_config_passes() {
        let (_d, c) = cfg();
        c.validate(&online()).unwrap();
    }

    const MACHINE_HELP: &str = "Supported machines are:\n\
        microvm              microvm (i386)\n\
        pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n\
        pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n\
        pc-i440fx-7.1        Standard PC (i440FX + PIIX, 1996)\n\
        pc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996)\n\
        pc-i440fx-1.4        Standard PC (i440FX + PIIX, 1996)\n\
        q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n\
        pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)\n";

    #[test]
    fn machine_types_are_read_newest_first_and_resolved() {
        let m = MachineTypes::parse(MACHINE_HELP);
        assert_eq!(m.pc.as_deref(), Some("pc-i440fx-7.2"));
        assert_eq!(
            m.versioned,
            [
                "pc-i440fx-10.0",
                "pc-i440fx-7.2",
                "pc-i440fx-7.1",
                "pc-i440fx-1.4"
            ]
        );
        assert_eq!(m.resolve(None).unwrap(), "pc-i440fx-7.2");
        assert_eq!(m.resolve(Some("pc")).unwrap(), "pc-i440fx-7.2");
        assert_eq!(m.resolve(Some("pc-i440fx-7.1")).unwrap(), "pc-i440fx-7.1");
        let e = m.resolve(Some("pc-i440fx-8.0")).unwrap_err();
        assert!(
            e.contains("no machine type pc-i440fx-8.0")
                && e.contains("pc-i440fx-1.4 … pc-i440fx-10.0"),
            "{e}"
        );
        // A QEMU whose list is unknown takes what is asked.
        assert_eq!(MachineTypes::default().resolve(None).unwrap(), "pc");
    }

    #[test]
    fn only_i440fx_machine_types_are_accepted() {
        assert!(check_machine_type("pc").is_ok());
        assert!(check_machine_type("pc-i440fx-7.2").is_ok());
        assert_eq!(machine_version("pc-i440fx-10.1"), Some((10, 1)));
        for bad in [
            "q35",
            "pc-q35-7.2",
            "pc-i440fx-7",
            "pc-i440fx-7.x",
            "pc-i440fx-.2",
            "",
        ] {
            let e = check_machine_type(bad).unwrap_err();
            assert!(e.contains("not an i440FX PC machine type"), "{bad}: {e}");
        }
        let (_d, mut c) = cfg();
        c.machine = Some("pc-i440fx-7.2".into());
        c.validate(&online()).unwrap();
        c.machine = Some("pc-q35-7.2".into());
        assert_eq!(field_of(c.validate(&online())), "machine");
    }

    #[test]
    fn qemu_versions_parse_and_vhost_user_nics_under_tcg_have_no_msi_vectors() {
        let v = parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)\n");
        assert_eq!(v, Some((7, 2)));
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2"),
            Some((10, 0))
        );
        assert_eq!(parse_qemu_version("qemu-img version 10.0.2"), None);
        assert_eq!(vhost_user_nic_options(Accel::Tcg), ",vectors=0");
        assert_eq!(vhost_user_nic_options(Accel::Kvm), "");
    }

    #[test]
    fn vhost_user_nics_need_shared_memory_and_sane_ids_macs_and_sockets() {
        let (_d, mut base) = cfg();
        let nic = |id: &str, mac: &str, socket: &str| VhostUserNic {
            id: id.into(),
            socket: socket.into(),
            mac: mac.into(),
        };
        base.vhost_user_nics = vec![nic("in", "52:54:00:00:00:01", "/s/in.sock")];
        assert_eq!(field_of(base.validate(&online())), "vhost_user_nics");
        base.shared_memory = true;
        base.validate(&online()).unwrap();
        let bad = [
            (nic("a b", "52:54:00:00:00:01", "/s"), "vhost_user_nics.id"),
            (nic("in1", "52:54:00:00:00", "/s"), "vhost_user_nics.mac"),
            (nic("in2", "52:54:00:00:00:0g", "/s"), "vhost_user_nics.mac"),
            (
                nic("in2", "52:54:00:00:00:02", "/s,x"),
                "vhost_user_nics.socket",
            ),
            (nic("in", "52:54:00:00:00:02", "/t"), "vhost_user_nics.id"),
        ];
        for (n, field) in bad {
            let mut c = base.clone();
            c.vhost_user_nics.push(n);
            assert_eq!(field_of(c.validate(&online())), field);
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let (_d, base) = cfg();
        let mut c = base.clone();
        c.name = "bad name".into();
        assert_eq!(field_of(c.validate(&online())), "name");
        let mut c = base.clone();
        c.vcpus = 0;
        assert_eq!(field_of(c.validate(&online())), "vcpus");
        let mut c = base.clone();
        c.memory_mib = 8;
        assert_eq!(field_of(c.validate(&online())), "memory");
        let mut c = base.clone();
        c.memory_mib = 257;
        c.hugepages = Some(HugePageSize::Size2M);
        assert_eq!(field_of(c.validate(&online())), "memory");
        let mut c = base.clone();
        c.kernel = Some("/nonexistent/vmlinuz".into());
        assert_eq!(field_of(c.validate(&online())), "kernel");
        let mut c = base.clone();
        c.initrd = Some("/".into());
        assert_eq!(field_of(c.validate(&online())), "initrd");
        let mut c = base.clone();
        c.disk = Some(DiskImage {
            path: "/nonexistent/disk.qcow2".into(),
            format: DiskFormat::Qcow2,
        });
        assert_eq!(field_of(c.validate(&online())), "disk");
        let mut c = base.clone();
        c.cpu.vcpu_cpus = vec![CpuSet::single(7)];
        let e = c.validate(&online()).unwrap_err().to_string();
        assert!(e.contains("cpu 7 is not online"), "{e}");
        let mut c = base.clone();
        c.vcpus = 3;
        c.cpu.vcpu_cpus = vec![CpuSet::single(0), CpuSet::single(1)];
        assert_eq!(field_of(c.validate(&online())), "cpu.vcpu_cpus");
        let mut c = base.clone();
        c.cpu.realtime_priority = Some(0);
        assert_eq!(field_of(c.validate(&online())), "cpu.realtime_priority");
        let mut c = base.clone();
        c.peripherals = vec![
            Grant {
                id: "rng".into(),
                peripheral: Peripheral::VirtioRng,
            },
            Grant {
                id: "rng".into(),
                peripheral: Peripheral::VirtioRng,
            },
        ];
        assert_eq!(field_of(c.validate(&online())), "peripherals");
        let mut c = base.clone();
        c.peripherals = vec![Grant {
            id: "tv-agent".into(),
            peripheral: Peripheral::VirtioRng,
        }];
        assert_eq!(field_of(c.validate(&online())), "peripheral id");
        let mut c = base;
        c.kernel = None;
        c.initrd = None;
        assert_eq!(field_of(c.validate(&online())), "kernel");
    }

    #[test]
    fn grant_json_shape() {
        let g = Grant {
            id: "net0".into(),
            peripheral: Peripheral::VirtioNet {
                tap: "tap0".into(),
                mac: None,
            },
        };
        let v = serde_json::to_value(&g).unwrap();
        assert_eq!(v["kind"], "virtio_net");
        assert_eq!(v["id"], "net0");
        assert_eq!(serde_json::from_value::<Grant>(v).unwrap(), g);
    }
}
