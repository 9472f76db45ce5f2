//! Discovers the local host from `/sys` and `/proc`: CPUs with their cores, sockets, SMT siblings
//! and NUMA nodes; memory; huge pages; NICs with their NUMA node.
//!
//! Owns reading those files into the scheduler's `HostSpec`. It must not decide placement, and it
//! takes the filesystem roots as parameters so it can be tested on a synthetic tree.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use telvirt_model::api::HugePageView;
use telvirt_sched::{CpuList, HostSpec, NicSpec, NumaNodeSpec, SocketSpec};

use crate::AgentError;

/// What discovery found: the scheduler's view plus memory facts the API shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    pub spec: HostSpec,
    pub memory_bytes: u64,
    pub hugepages: Vec<HugePageView>,
    /// Its CPU as KVM's `-cpu host` shows it to a guest ([`cpu_identity`]); `None` when
    /// `cpuinfo` cannot be read.
    pub cpu: Option<String>,
}

/// Where to read from; `/` on a real host.
#[derive(Debug, Clone)]
pub struct SysRoots {
    pub sys: PathBuf,
    pub proc: PathBuf,
}

impl Default for SysRoots {
    fn default() -> Self {
        Self {
            sys: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
        }
    }
}

fn read(path: &Path) -> Result<String, AgentError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| AgentError::Discovery(format!("cannot read {}: {e}", path.display())))
}

fn read_u32(path: &Path) -> Result<u32, AgentError> {
    let text = read(path)?;
    text.parse().map_err(|_| {
        AgentError::Discovery(format!("{} holds '{text}', not a number", path.display()))
    })
}

fn cpu_list(path: &Path) -> Result<CpuList, AgentError> {
    let text = read(path)?;
    text.parse()
        .map_err(|e| AgentError::Discovery(format!("{}: {e}", path.display())))
}

/// The memory kept for the host OS, telvirt and the page cache when the operator names none:
/// a tenth of physical memory, at least 1 GiB (never more than there is).
pub fn default_memory_reserve(physical: u64) -> u64 {
    (physical / 10).max(1 << 30).min(physical)
}

/// Makes the memory of `spec`'s NUMA nodes what VNFs may be given: the node's physical memory
/// (as /sys or the inventory states it; `physical` spread evenly over the nodes where it is not
/// stated) minus `reserve`, spread over the nodes the same way.
pub fn budget_memory(spec: &mut HostSpec, physical: u64, reserve: u64) {
    if let Some(topo) = spec.topology.as_mut() {
        let nodes = (u64::from(topo.sockets) * u64::from(topo.numa_nodes_per_socket)).max(1);
        let stated = topo.memory_per_node.unwrap_or(physical / nodes);
        topo.memory_per_node = Some(stated.saturating_sub(reserve / nodes));
        return;
    }
    let nodes: Vec<&mut NumaNodeSpec> = spec
        .sockets
        .iter_mut()
        .flat_map(|s| s.numa_nodes.iter_mut())
        .collect();
    let count = u64::try_from(nodes.len()).unwrap_or(1).max(1);
    for node in nodes {
        let stated = node.memory.unwrap_or(physical / count);
        node.memory = Some(stated.saturating_sub(reserve / count));
    }
}

/// Reads the local host. CPU 0 is put in the shared set (host OS, agent, emulator threads) when
/// the host has more than one CPU; an inventory file overrides this.
pub fn discover(name: &str, roots: &SysRoots) -> Result<HostFacts, AgentError> {
    let cpu_dir = roots.sys.join("devices/system/cpu");
    let online = cpu_list(&cpu_dir.join("online"))?;

    // NUMA node of every CPU; one node 0 when the kernel has no NUMA information.
    let node_dir = roots.sys.join("devices/system/node");
    let mut node_of: BTreeMap<u32, u32> = BTreeMap::new();
    let mut node_memory: BTreeMap<u32, u64> = BTreeMap::new();
    if let Ok(entries) = fs::read_dir(&node_dir) {
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some(id) = file
                .to_str()
                .and_then(|n| n.strip_prefix("node"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            for cpu in cpu_list(&entry.path().join("cpulist"))?.cpus() {
                node_of.insert(*cpu, id);
            }
            if let Ok(meminfo) = read(&entry.path().join("meminfo"))
                && let Some(kb) = meminfo_value(&meminfo, "MemTotal:")
            {
                node_memory.insert(id, kb * 1024);
            }
        }
    }

    // socket → node → physical core id → its threads.
    let mut layout: BTreeMap<u32, BTreeMap<u32, BTreeMap<u32, Vec<u32>>>> = BTreeMap::new();
    for &cpu in online.cpus() {
        let topo = cpu_dir.join(format!("cpu{cpu}/topology"));
        let socket = read_u32(&topo.join("physical_package_id")).unwrap_or(0);
        let core = read_u32(&topo.join("core_id")).unwrap_or(cpu);
        let node = node_of.get(&cpu).copied().unwrap_or(0);
        layout
            .entry(socket)
            .or_default()
            .entry(node)
            .or_default()
            .entry(core)
            .or_default()
            .push(cpu);
    }
    let sockets = layout
        .into_iter()
        .map(|(id, nodes)| SocketSpec {
            id,
            numa_nodes: nodes
                .into_iter()
                .map(|(node, cores)| NumaNodeSpec {
                    id: node,
                    memory: node_memory.get(&node).copied(),
                    cores: cores.into_values().map(CpuList::from_cpus).collect(),
                })
                .collect(),
        })
        .collect();

    let meminfo = read(&roots.proc.join("meminfo"))?;
    let memory_bytes = meminfo_value(&meminfo, "MemTotal:").unwrap_or(0) * 1024;

    let shared = match online.cpus() {
        [first, _, ..] => CpuList::from_cpus([*first]),
        _ => CpuList::new(),
    };
    Ok(HostFacts {
        spec: HostSpec {
            name: name.to_owned(),
            sockets,
            nics: nics(&roots.sys.join("class/net")),
            shared,
            ..HostSpec::default()
        },
        memory_bytes,
        hugepages: hugepages(&roots.sys.join("kernel/mm/hugepages")),
        cpu: host_cpu(&roots.proc),
    })
}

/// The CPU of the host whose proc filesystem is `proc` ([`cpu_identity`] of its `cpuinfo`).
fn host_cpu(proc: &Path) -> Option<String> {
    cpu_identity(&fs::read_to_string(proc.join("cpuinfo")).ok()?)
}

/// The first processor of a `/proc/cpuinfo` text as `VENDOR FAMILY/MODEL/STEPPING (MODEL
/// NAME)`: the CPU model a `-cpu host` guest sees. Its feature flags are left out: the kernel
/// adds its own to them (mitigations, `pti`, VMX flags before 5.8) and boot parameters remove
/// some, so the same CPU under two kernels (a rolling kernel upgrade) would differ; features
/// a BIOS or kernel masks are therefore not compared. `None` without a vendor, family or model.
fn cpu_identity(cpuinfo: &str) -> Option<String> {
    let first = cpuinfo.split("\n\n").next()?;
    let field = |name: &str| {
        first.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    };
    Some(format!(
        "{} {}/{}/{} ({})",
        field("vendor_id")?,
        field("cpu family")?,
        field("model")?,
        field("stepping").unwrap_or_else(|| "?".to_owned()),
        field("model name").unwrap_or_else(|| "?".to_owned()),
    ))
}

fn meminfo_value(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = &line[line.find(field)? + field.len()..];
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Interfaces backed by a device, with its NUMA node (node 0 where the kernel says -1).
fn nics(net: &Path) -> Vec<NicSpec> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(net) else {
        return out;
    };
    for entry in entries.flatten() {
        let numa = entry.path().join("device/numa_node");
        if let Ok(text) = read(&numa) {
            let node = text.parse::<i64>().ok().and_then(|n| u32::try_from(n).ok());
            out.push(NicSpec {
                name: entry.file_name().to_string_lossy().into_owned(),
                numa_node: node.unwrap_or(0),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn hugepages(dir: &Path) -> Vec<HugePageView> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(kb) = name
            .strip_prefix("hugepages-")
            .and_then(|s| s.strip_suffix("kB"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let count = |file: &str| read(&entry.path().join(file)).ok()?.parse::<u64>().ok();
        out.push(HugePageView {
            size: kb * 1024,
            total: count("nr_hugepages").unwrap_or(0),
            free: count("free_hugepages").unwrap_or(0),
        });
    }
    out.sort_by_key(|h| h.size);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// Two sockets, one node each, two cores with two threads each (Linux numbering).
    fn synthetic_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "sys/devices/system/cpu/online", "0-7\n");
        for cpu in 0..8u32 {
            let socket = (cpu / 2) % 2;
            let core = cpu % 2;
            let base = format!("sys/devices/system/cpu/cpu{cpu}/topology");
            write(
                root,
                &format!("{base}/physical_package_id"),
                &socket.to_string(),
            );
            write(root, &format!("{base}/core_id"), &core.to_string());
        }
        write(root, "sys/devices/system/node/node0/cpulist", "0-1,4-5");
        write(root, "sys/devices/system/node/node1/cpulist", "2-3,6-7");
        write(
            root,
            "sys/devices/system/node/node1/meminfo",
            "Node 1 MemTotal:       1048576 kB\n",
        );
        write(
            root,
            "proc/meminfo",
            "MemTotal:       2097152 kB\nMemFree: 1 kB\n",
        );
        write(root, "sys/class/net/eth1/device/numa_node", "1");
        write(root, "sys/class/net/eth0/device/numa_node", "-1");
        write(
            root,
            "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
            "64",
        );
        write(
            root,
            "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages",
            "60",
        );
        dir
    }

    #[test]
    fn discovers_sockets_nodes_siblings_memory_nics_and_hugepages() {
        let dir = synthetic_tree();
        let roots = SysRoots {
            sys: dir.path().join("sys"),
            proc: dir.path().join("proc"),
        };
        let facts = discover("h1", &roots).unwrap();
        let spec = &facts.spec;
        assert_eq!(spec.sockets.len(), 2);
        let node1 = &spec.sockets[1].numa_nodes[0];
        assert_eq!(node1.id, 1);
        assert_eq!(node1.memory, Some(1 << 30));
        let siblings: Vec<Vec<u32>> = node1.cores.iter().map(|c| c.cpus().to_vec()).collect();
        assert_eq!(siblings, vec![vec![2, 6], vec![3, 7]]);
        assert_eq!(facts.memory_bytes, 2 << 30);
        assert_eq!(spec.shared.cpus(), &[0]);
        let nic_nodes: Vec<(&str, u32)> = spec
            .nics
            .iter()
            .map(|n| (n.name.as_str(), n.numa_node))
            .collect();
        assert_eq!(nic_nodes, vec![("eth0", 0), ("eth1", 1)]);
        assert_eq!(
            facts.hugepages,
            vec![HugePageView {
                size: 2 << 20,
                total: 64,
                free: 60
            }]
        );
        // The scheduler accepts what discovery produced.
        assert!(spec.expanded_sockets().is_ok());
    }

    #[test]
    fn a_cpu_is_its_vendor_family_model_and_stepping_whatever_its_kernels_flags() {
        let info = |flags: &str, model: &str| {
            format!(
                "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: {model}\nmodel name\t: Xeon\nstepping\t: 7\nflags\t\t: {flags}\n\nprocessor\t: 1\nvendor_id\t: Other\n"
            )
        };
        let a = cpu_identity(&info("fpu vme avx2 pti", "85")).unwrap();
        assert_eq!(a, "GenuineIntel 6/85/7 (Xeon)");
        // The kernel's own flags (another kernel's mitigations) do not make another CPU.
        assert_eq!(cpu_identity(&info("fpu vme avx2", "85")).as_ref(), Some(&a));
        assert_ne!(
            cpu_identity(&info("fpu vme avx2", "106")).as_ref(),
            Some(&a)
        );
        assert_eq!(cpu_identity("processor\t: 0\n"), None);
        // This host's, read as the agent reports it (x86: the platform's hosts).
        if cfg!(target_arch = "x86_64") {
            assert!(host_cpu(&SysRoots::default().proc).is_some());
        }
    }

    #[test]
    fn missing_cpu_list_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let roots = SysRoots {
            sys: dir.path().to_path_buf(),
            proc: dir.path().to_path_buf(),
        };
        let err = discover("h1", &roots).unwrap_err();
        assert!(
            err.to_string().contains("devices/system/cpu/online"),
            "{err}"
        );
    }

    #[test]
    fn this_machine_is_discoverable() {
        let facts = discover("local", &SysRoots::default()).unwrap();
        let cpus: usize = facts
            .spec
            .sockets
            .iter()
            .flat_map(|s| &s.numa_nodes)
            .flat_map(|n| &n.cores)
            .map(|c| c.cpus().len())
            .sum();
        // /proc/cpuinfo is an independent count of the same CPUs.
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap();
        let processors = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        assert_eq!(cpus, processors);
        assert!(facts.memory_bytes > 0);
    }

    #[test]
    fn memory_budget_is_physical_minus_the_reserve_on_every_node() {
        let dir = synthetic_tree();
        let roots = SysRoots {
            sys: dir.path().join("sys"),
            proc: dir.path().join("proc"),
        };
        let mut spec = discover("h1", &roots).unwrap().spec;
        // Two nodes of 1 GiB (from /sys), 512 MiB reserved: 256 MiB off each.
        budget_memory(&mut spec, 2 << 30, 512 << 20);
        let mem: Vec<Option<u64>> = spec
            .sockets
            .iter()
            .flat_map(|s| s.numa_nodes.iter().map(|n| n.memory))
            .collect();
        assert_eq!(mem, [Some(768 << 20), Some(768 << 20)]);
        // A topology without memory gets physical spread over its nodes.
        let mut spec = HostSpec {
            name: "t".into(),
            topology: Some(telvirt_sched::TopologySpec {
                sockets: 1,
                cores_per_socket: 2,
                threads_per_core: 1,
                numa_nodes_per_socket: 1,
                memory_per_node: None,
            }),
            ..HostSpec::default()
        };
        budget_memory(&mut spec, 24 << 30, default_memory_reserve(24 << 30));
        let left = spec.topology.and_then(|t| t.memory_per_node);
        assert_eq!(left, Some((24 << 30) - (24 << 30) / 10));
        assert_eq!(default_memory_reserve(4 << 30), 1 << 30);
        assert_eq!(default_memory_reserve(512 << 20), 512 << 20);
    }
}
