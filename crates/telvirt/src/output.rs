//! Printing answers as tables, JSON or YAML.
//!
//! Owns column choices and formatting. It must not fetch anything.

use anyhow::Result;
use serde::Serialize;
use telvirt_model::api::{Authority, CpuUse, HostView, VnfWatchEvent, VnfWatchKind};
use telvirt_model::{Event, Vnf};

use crate::cli::Output;

/// Prints `value` as JSON or YAML; returns false when the format is `table` (caller prints).
pub fn structured<T: Serialize>(format: Output, value: &T) -> Result<bool> {
    structured_to(format, value, &mut std::io::stdout().lock())
}

/// [`structured`] onto `out` (standard error when standard output carries data).
pub fn structured_to<T: Serialize>(
    format: Output,
    value: &T,
    out: &mut dyn std::io::Write,
) -> Result<bool> {
    match format {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(value)?)?,
        Output::Yaml => write!(out, "{}", yaml_serde::to_string(value)?)?,
        Output::Table | Output::Wide => return Ok(false),
    }
    Ok(true)
}

/// Prints a report for machines: one JSON object on one line with `-o json` (what scripts
/// expect), YAML with `-o yaml`; returns false for `table` (the caller prints).
pub fn report<T: Serialize>(format: Output, value: &T) -> Result<bool> {
    if format == Output::Json {
        println!("{}", serde_json::to_string(value)?);
        return Ok(true);
    }
    structured(format, value)
}

/// Left-aligned columns, two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.clone()));
    }
    out
}

fn cpus_of(vnf: &Vnf) -> String {
    vnf.placements
        .iter()
        .map(|p| {
            p.cpus()
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

fn hosts_of(vnf: &Vnf) -> String {
    let hosts: Vec<&str> = vnf.placements.iter().map(|p| p.host.as_str()).collect();
    if hosts.is_empty() {
        "-".into()
    } else {
        hosts.join(" / ")
    }
}

const VNF_COLUMNS: [&str; 7] = [
    "NAME",
    "OWNER",
    "RUNTIME",
    "PHASE",
    "HOST",
    "CPUS",
    "LOCKED-BY",
];

/// The columns `-o wide` adds to [`VNF_COLUMNS`].
const VNF_WIDE_COLUMNS: [&str; 4] = ["STANDBY", "MEMORY", "LABELS", "REASON"];

fn vnf_columns(wide: bool) -> Vec<&'static str> {
    let mut columns = VNF_COLUMNS.to_vec();
    if wide {
        columns.extend(VNF_WIDE_COLUMNS);
    }
    columns
}

fn vnf_row(v: &Vnf, wide: bool) -> Vec<String> {
    let mut row = vec![
        v.name.to_string(),
        v.owner.to_string(),
        v.descriptor.spec.runtime.as_str().into(),
        v.phase.to_string(),
        hosts_of(v),
        cpus_of(v),
        v.lock.as_ref().map_or("-".into(), |l| l.by.to_string()),
    ];
    if wide {
        let standby = v
            .placements
            .iter()
            .find(|p| p.role == telvirt_model::Role::Standby)
            .map_or("-".into(), |p| p.host.clone());
        row.extend([
            standby,
            mib_or_dash(v.memory_bytes),
            labels_of(&v.descriptor.metadata.labels),
            v.reason.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    row
}

/// `k=v,k2=v2`, or `-` without labels.
fn labels_of(labels: &std::collections::BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whole MiB, or `-` for 0 (not counted).
fn mib_or_dash(bytes: u64) -> String {
    if bytes == 0 {
        "-".into()
    } else {
        format!("{}MiB", bytes >> 20)
    }
}

/// The VNFs as a table; `wide` adds [`VNF_WIDE_COLUMNS`].
pub fn vnf_table(vnfs: &[Vnf], wide: bool) -> String {
    let rows: Vec<Vec<String>> = vnfs.iter().map(|v| vnf_row(v, wide)).collect();
    table(&vnf_columns(wide), &rows)
}

/// One change of a VNF watch as a row of [`vnf_table`]'s columns (a gone VNF: its name and
/// `Deleted`).
pub fn vnf_change_line(change: &VnfWatchEvent, wide: bool) -> Option<String> {
    let columns = vnf_columns(wide);
    let row = match (&change.vnf, &change.name) {
        (Some(v), _) => vnf_row(v, wide),
        (None, Some(name)) if change.kind == VnfWatchKind::Deleted => {
            let mut row = vec!["-".to_owned(); columns.len()];
            row[0] = name.to_string();
            row[3] = "Deleted".to_owned();
            row
        }
        _ => return None,
    };
    table(&columns, &[row]).lines().nth(1).map(str::to_owned)
}

/// A VNF's placements, a `Placement:` line per instance (`none yet` when unplaced).
pub fn placement_lines(v: &Vnf) -> String {
    let mut out = String::new();
    if v.placements.is_empty() {
        out.push_str("Placement:   none yet\n");
    }
    for p in &v.placements {
        let vcpus: Vec<String> = p
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, cpus)| {
                let list: Vec<String> = cpus.iter().map(u32::to_string).collect();
                format!("vcpu{i}→{}", list.join(","))
            })
            .collect();
        out.push_str(&format!(
            "Placement:   {:?} on {} numa {:?}: {}{}{}\n",
            p.role,
            p.host,
            p.numa_nodes,
            vcpus.join(" "),
            if p.emulator_cpus.is_empty() {
                String::new()
            } else {
                format!(", emulator {:?}", p.emulator_cpus)
            },
            p.group
                .as_ref()
                .map_or(String::new(), |g| format!(", group {g}")),
        ));
    }
    out
}

pub fn vnf_detail(v: &Vnf) -> String {
    let spec = &v.descriptor.spec;
    let mut out = format!(
        "Name:        {}\nOwner:       {}\nRuntime:     {}\nPhase:       {}\nReason:      {}\nDesired:     {:?}\nLocked:      {}\nGeneration:  {}\nCreated:     {}\nCPU policy:  {:?} x{}\nPorts:       {}\n",
        v.name,
        v.owner,
        spec.runtime.as_str(),
        v.phase,
        v.reason.as_deref().unwrap_or("-"),
        v.desired,
        v.lock
            .as_ref()
            .map_or("no".into(), |l| format!("by {} since {}", l.by, l.at)),
        v.generation,
        v.created_at,
        spec.cpu.policy,
        spec.cpu.effective_count(),
        spec.ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    );
    out.push_str(&placement_lines(v));
    if let Some(machine) = &v.machine {
        let pinned = spec.vm.as_ref().and_then(|vm| vm.machine.as_deref());
        out.push_str(&format!(
            "Machine:     {machine} ({})\n",
            match pinned {
                Some(p) if p == machine => "as spec.vm.machine names it".to_owned(),
                Some(telvirt_model::vnf::MACHINE_ALIAS) => {
                    "spec.vm.machine pc: the newest of its host's QEMU, at each start".to_owned()
                }
                Some(p) => format!("spec.vm.machine {p}: its next start takes it"),
                None => "kept across its restarts and moves".to_owned(),
            }
        ));
    }
    if let Some(accel) = v.accel {
        let named = spec.vm.as_ref().and_then(|vm| vm.accel);
        out.push_str(&format!(
            "Accel:       {accel} ({})\n",
            // A named accelerator is the one the guest started with (it is set at creation).
            if named.is_some() {
                "as spec.vm.accel names it"
            } else {
                "its host's; kept across its moves"
            }
        ));
    }
    if let Some(m) = &v.migration {
        out.push_str(&format!(
            "Migration:   from {} to {} since {} (by {}){}\n",
            m.from,
            m.to,
            m.started_at,
            m.by,
            m.engine
                .map_or(String::new(), |e| format!(", onto engine {}", e.as_str())),
        ));
    }
    if let Some(s) = &v.standby {
        out.push_str(&format!(
            "Standby:     {} on {}: {}{}\n",
            s.phase,
            s.host,
            s.reason,
            s.active_lost.as_ref().map_or(String::new(), |l| format!(
                "; it lost its active: {}",
                l.why
            )),
        ));
    }
    if v.epoch > 0 {
        out.push_str(&format!(
            "Epoch:       {} (the active moved to another host {} time{})\n",
            v.epoch,
            v.epoch,
            if v.epoch == 1 { "" } else { "s" }
        ));
    }
    if let Some(r) = &v.replication {
        out.push_str(&format!(
            "Replication: {} to {}, lag {:.1} ms, {} updates, {} snapshots, {} bytes{}\n",
            r.state,
            r.standby_host,
            r.lag_us as f64 / 1000.0,
            r.updates,
            r.snapshots,
            r.bytes,
            r.error
                .as_ref()
                .map_or(String::new(), |e| format!(" ({e})")),
        ));
    }
    for d in &v.devices {
        let detail = match &d.device {
            telvirt_model::Device::Rng => String::new(),
            telvirt_model::Device::Net { tap } => format!(" tap {tap}"),
            telvirt_model::Device::Serial { name } => format!(" port {name}"),
            telvirt_model::Device::Blk { path, read_only } => {
                format!(" {path}{}", if *read_only { " (read-only)" } else { "" })
            }
        };
        out.push_str(&format!(
            "Device:      {} {}{detail}\n",
            d.id,
            d.device.kind()
        ));
    }
    out
}

pub fn event_table(events: &[Event]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                e.at.clone(),
                e.from.map_or("-".into(), |p| p.to_string()),
                e.to.to_string(),
                e.actor.clone(),
                e.reason.replace('\n', " |"),
            ]
        })
        .collect();
    table(&["SEQ", "TIME", "FROM", "TO", "ACTOR", "REASON"], &rows)
}

/// `Ready`, `NotReady`, with `,SchedulingDisabled` when cordoned.
pub fn host_status(h: &HostView) -> String {
    if h.schedulable {
        h.status.as_str().to_owned()
    } else {
        format!("{},SchedulingDisabled", h.status.as_str())
    }
}

/// The node's health: its status line, then each component.
pub fn health_table(health: &telvirt_model::api::Health) -> String {
    let rows: Vec<Vec<String>> = health
        .components
        .iter()
        .map(|(name, c)| {
            vec![
                name.clone(),
                c.status.clone(),
                c.restarts.to_string(),
                c.reason.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    format!(
        "node {} (telvirt {})\n{}",
        health.status,
        health.version,
        table(&["COMPONENT", "STATUS", "RESTARTS", "REASON"], &rows)
    )
}

/// The hosts as a table; `wide` adds their labels, the CPUs VNFs hold and the tunnel address.
pub fn host_table(hosts: &[HostView], wide: bool) -> String {
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            let free = h.cpus.iter().filter(|c| c.usage == CpuUse::Free).count();
            let mut row = vec![
                h.name.clone(),
                host_status(h),
                h.heartbeat_age_ms.map_or_else(
                    || "never".to_owned(),
                    |ms| format!("{}.{}s ago", ms / 1000, (ms % 1000) / 100),
                ),
                h.cpus.len().to_string(),
                free.to_string(),
                h.numa_nodes.to_string(),
                mib_or_dash(h.memory_bytes),
                if h.runtimes.is_empty() {
                    "-".into()
                } else {
                    h.runtimes.join(",")
                },
            ];
            if wide {
                let held = h
                    .cpus
                    .iter()
                    .filter(|c| {
                        matches!(
                            c.usage,
                            CpuUse::Vnf { .. } | CpuUse::Group { .. } | CpuUse::InUse
                        )
                    })
                    .count();
                row.extend([
                    labels_of(&h.labels),
                    held.to_string(),
                    h.tunnel.clone().unwrap_or_else(|| "-".into()),
                    h.qemu.clone().unwrap_or_else(|| "-".into()),
                    h.accel.map_or_else(|| "-".into(), |a| a.to_string()),
                ]);
            }
            row
        })
        .collect();
    let mut columns = vec![
        "NAME",
        "STATUS",
        "HEARTBEAT",
        "CPUS",
        "FREE",
        "NUMA",
        "MEMORY",
        "RUNTIMES",
    ];
    if wide {
        columns.extend(["LABELS", "HELD", "TUNNEL", "QEMU", "ACCEL"]);
    }
    table(&columns, &rows)
}

pub fn authority_table(authorities: &[Authority]) -> String {
    let rows: Vec<Vec<String>> = authorities
        .iter()
        .map(|a| vec![a.name.to_string(), a.domain.clone(), a.created_at.clone()])
        .collect();
    table(&["NAME", "DOMAIN", "CREATED"], &rows)
}

/// An authority's host grants, one row per entry (`(none)` when it holds none).
pub fn grants_table(grants: &telvirt_model::HostGrants) -> String {
    let rows: Vec<Vec<String>> = [
        ("path", &grants.paths),
        ("interface", &grants.interfaces),
        ("tap", &grants.taps),
    ]
    .iter()
    .flat_map(|(kind, entries)| entries.iter().map(|e| vec![(*kind).to_owned(), e.clone()]))
    .collect();
    if rows.is_empty() {
        return "(no host resources granted)\n".to_owned();
    }
    format!("{}\n", table(&["KIND", "GRANTED"], &rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xxxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A     LONGER\nxxxx  1\ny     22");
    }
}
