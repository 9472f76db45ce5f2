//! What applying a new descriptor to an existing VNF changes: the fields that differ, each with
//! its old and new value, and how a running VNF takes each one, or why it cannot without being
//! created again. It must not decide placement or reach a runtime: the controller acts on what
//! this says.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::FieldError;
use crate::vnf::{CpuPolicy, RuntimeKind, VnfDescriptor};

/// One field an apply changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FieldChange {
    /// Dotted path, as errors name fields: `spec.cpu.cores`, `metadata.labels.tier`.
    pub path: String,
    /// Its value before; absent when it was not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Value>,
    /// Its value after; absent when it is no longer set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Value>,
}

/// `path: old → new`, strings bare, other values as JSON, `(unset)` for an absent one.
impl std::fmt::Display for FieldChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |v: &Option<Value>| match v {
            None => "(unset)".to_owned(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        };
        write!(
            f,
            "{}: {} → {}",
            self.path,
            shown(&self.old),
            shown(&self.new)
        )
    }
}

/// How a running VNF takes a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Taking {
    /// Only the record changes (labels).
    Record,
    /// Its vCPU threads move to other cores: the scheduler holds the new cores beside the old
    /// ones until the agent has moved them.
    Repin,
    /// Its wasm instance starts again from the same module with the new configuration, between
    /// batches, its maps carried over.
    Reconfigure,
}

/// What an apply does to a VNF: its changes, how each is taken, and the ones refused.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ApplyPlan {
    pub changes: Vec<FieldChange>,
    /// How the VNF takes the accepted changes (each kind once, in order).
    pub takings: Vec<Taking>,
    /// The fields that need the VNF created again, and why.
    pub refused: Vec<FieldError>,
}

impl ApplyPlan {
    pub fn takes(&self, taking: Taking) -> bool {
        self.takings.contains(&taking)
    }
}

/// The fields that differ between `old` and `new`: objects by key (sorted), lists by index.
pub fn changes(old: &VnfDescriptor, new: &VnfDescriptor) -> Vec<FieldChange> {
    let mut out = Vec::new();
    let (a, b) = (
        serde_json::to_value(old).ok(),
        serde_json::to_value(new).ok(),
    );
    walk(String::new(), a.as_ref(), b.as_ref(), &mut out);
    out
}

fn walk(path: String, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<FieldChange>) {
    let at = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                walk(at(k), x.get(k.as_str()), y.get(k.as_str()), out);
            }
        }
        (Some(Value::Array(x)), Some(Value::Array(y)))
            if x.iter().chain(y).all(Value::is_object) =>
        {
            for i in 0..x.len().max(y.len()) {
                walk(format!("{path}[{i}]"), x.get(i), y.get(i), out);
            }
        }
        (a, b) if a != b => out.push(FieldChange {
            path,
            old: a.cloned(),
            new: b.cloned(),
        }),
        _ => {}
    }
}

/// How VNF `old` takes the change of `path` to what `new` says while it runs, or why it must be
/// created again.
pub fn taking(old: &VnfDescriptor, new: &VnfDescriptor, path: &str) -> Result<Taking, String> {
    let under = |prefix: &str| {
        path == prefix
            || path.starts_with(&format!("{prefix}."))
            || path.starts_with(&format!("{prefix}["))
    };
    let runtime = old.spec.runtime;
    if under("metadata.labels") {
        return Ok(Taking::Record);
    }
    if under("spec.cpu.cores") {
        let (was, is) = (&old.spec.cpu, &new.spec.cpu);
        if was.policy != CpuPolicy::Pinned || is.policy != CpuPolicy::Pinned {
            return Err(
                "cores are given with policy pinned only, and a VNF keeps its policy".into(),
            );
        }
        if runtime != RuntimeKind::Vm {
            return Err("a wasm VNF runs on the data-plane worker of its core and keeps it; create it again to move it".into());
        }
        let count = |c: &Option<Vec<u32>>| c.as_ref().map_or(0, Vec::len);
        if count(&was.cores) != count(&is.cores) {
            return Err(format!(
                "a running QEMU keeps its {} vCPUs: give as many cores, or create it again",
                count(&was.cores)
            ));
        }
        return Ok(Taking::Repin);
    }
    if under("spec.cpu.count") {
        return Err(match runtime {
            RuntimeKind::Vm => "a running QEMU keeps its vCPU count; create it again".into(),
            RuntimeKind::Wasm => {
                "a wasm VNF runs on one data-plane worker whatever its count; create it again"
                    .into()
            }
        });
    }
    if under("spec.wasm.config") || under("spec.wasm.limits.fuel_per_batch") {
        return Ok(Taking::Reconfigure);
    }
    if under("spec.wasm.module") {
        return Err("a new module is an upgrade: `telvirt vnf upgrade NAME --module FILE` swaps it between batches and keeps the maps".into());
    }
    if under("spec.wasm.maps") {
        return Err("the maps hold the VNF's state and keep their shape and capacity while it runs; create it again (its state starts empty) to change them".into());
    }
    if under("spec.wasm.limits.memory") || under("spec.vm.memory") {
        return Err(
            "placement counted the VNF's memory with the old value; create it again".into(),
        );
    }
    Err("taken only when the VNF is created; delete it and create it again".into())
}

/// The plan of applying `new` to a VNF described by `old`.
pub fn plan(old: &VnfDescriptor, new: &VnfDescriptor) -> ApplyPlan {
    let changes = changes(old, new);
    let mut takings = Vec::new();
    let mut refused = Vec::new();
    for c in &changes {
        match taking(old, new, &c.path) {
            Ok(t) => takings.push(t),
            Err(why) => refused.push(FieldError::new(c.path.clone(), why)),
        }
    }
    takings.sort();
    takings.dedup();
    ApplyPlan {
        changes,
        takings,
        refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{Format, parse_vnf};

    fn vnf(text: &str) -> VnfDescriptor {
        parse_vnf(text.as_bytes(), Format::Yaml).unwrap()
    }

    const VM: &str = "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: v1, labels: { tier: a } }\nspec:\n  runtime: vm\n  cpu: { policy: pinned, cores: [1, 2] }\n  vm: { memory: 256MiB }\n";

    const WASM: &str = "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: w1 }\nspec:\n  runtime: wasm\n  cpu: { policy: dedicated, count: 1 }\n  ports: [in, out]\n  wasm:\n    module: fw.wasm\n    config: { mode: strict }\n    maps: [ { name: rules, kind: hash, key_size: 16, value_size: 4, max_entries: 1024 } ]\n";

    #[test]
    fn the_same_descriptor_changes_nothing() {
        assert!(plan(&vnf(VM), &vnf(VM)).changes.is_empty());
        assert!(plan(&vnf(WASM), &vnf(WASM)).changes.is_empty());
    }

    #[test]
    fn labels_and_cores_of_a_vm_are_taken_in_place() {
        let new = vnf(&VM
            .replace("tier: a", "tier: b, site: x")
            .replace("[1, 2]", "[1, 3]"));
        let p = plan(&vnf(VM), &new);
        let paths: Vec<&str> = p.changes.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "metadata.labels.site",
                "metadata.labels.tier",
                "spec.cpu.cores"
            ]
        );
        assert_eq!(p.changes[0].old, None);
        assert_eq!(p.changes[1].new, Some(Value::from("b")));
        assert_eq!(
            p.changes[0].to_string(),
            "metadata.labels.site: (unset) → x"
        );
        assert_eq!(p.changes[2].to_string(), "spec.cpu.cores: [1,2] → [1,3]");
        assert_eq!(p.takings, [Taking::Record, Taking::Repin]);
        assert!(p.refused.is_empty(), "{:?}", p.refused);
    }

    #[test]
    fn a_vcpu_count_memory_or_runtime_change_is_refused_naming_each_field() {
        let new = vnf(&VM
            .replace("[1, 2]", "[1, 2, 3]")
            .replace("256MiB", "512MiB"));
        let p = plan(&vnf(VM), &new);
        let refused: Vec<&str> = p.refused.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(refused, ["spec.cpu.cores", "spec.vm.memory"]);
        assert!(p.refused[0].reason.contains("keeps its 2 vCPUs"), "{p:?}");
        let pinned_to_dedicated = vnf(&VM.replace(
            "policy: pinned, cores: [1, 2]",
            "policy: dedicated, count: 2",
        ));
        let p = plan(&vnf(VM), &pinned_to_dedicated);
        let refused: Vec<&str> = p.refused.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            refused,
            ["spec.cpu.cores", "spec.cpu.count", "spec.cpu.policy"]
        );
    }

    #[test]
    fn a_wasm_vnf_takes_config_and_fuel_and_refuses_maps_and_module() {
        let new = vnf(&WASM.replace("mode: strict", "mode: open").replace(
            "    maps:",
            "    limits: { fuel_per_batch: 5000 }\n    maps:",
        ));
        let p = plan(&vnf(WASM), &new);
        assert_eq!(p.takings, [Taking::Reconfigure]);
        assert!(p.refused.is_empty(), "{:?}", p.refused);
        let new = vnf(&WASM
            .replace("max_entries: 1024", "max_entries: 2048")
            .replace("fw.wasm", "fw2.wasm"));
        let p = plan(&vnf(WASM), &new);
        let refused: Vec<&str> = p.refused.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            refused,
            ["spec.wasm.maps[0].max_entries", "spec.wasm.module"]
        );
        assert!(p.refused[1].reason.contains("vnf upgrade"), "{p:?}");
    }
}
