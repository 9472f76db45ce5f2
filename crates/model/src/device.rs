//! Peripheral grants: devices an owner gives a running VNF (`vnf attach` / `vnf detach`).
//!
//! Owns the wire shape of one grant and its rules (id, kind, per-kind fields). It must not know
//! how a runtime plugs a device: the agent maps a grant onto its runtime's own type.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;
use crate::name::Name;

/// Most grants one VNF may hold.
pub const MAX_DEVICES: usize = 32;

/// One device granted to a VNF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "RawGrant")]
pub struct DeviceGrant {
    /// Unique per VNF: 1-32 characters, starting with a letter; `tv-` is reserved.
    pub id: Name,
    #[serde(flatten)]
    pub device: Device,
}

/// What is granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Device {
    /// A virtio random number generator.
    Rng,
    /// A virtio NIC on an existing host TAP device.
    Net { tap: String },
    /// A virtio-serial port with this name in the guest.
    Serial { name: String },
    /// A virtio disk backed by a host file (raw, or qcow2 when the name ends in `.qcow2`).
    Blk {
        path: String,
        #[serde(default)]
        read_only: bool,
    },
}

/// The flat wire form, read strictly (serde cannot deny unknown fields through `flatten`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    id: Name,
    kind: RawKind,
    #[serde(default)]
    tap: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    read_only: Option<bool>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    Rng,
    Net,
    Serial,
    Blk,
}

impl TryFrom<RawGrant> for DeviceGrant {
    type Error = String;

    fn try_from(raw: RawGrant) -> Result<Self, String> {
        let kind = match raw.kind {
            RawKind::Rng => "rng",
            RawKind::Net => "net",
            RawKind::Serial => "serial",
            RawKind::Blk => "blk",
        };
        let fields = [
            ("tap", raw.tap.is_some(), RawKind::Net),
            ("name", raw.name.is_some(), RawKind::Serial),
            ("path", raw.path.is_some(), RawKind::Blk),
            ("read_only", raw.read_only.is_some(), RawKind::Blk),
        ];
        for (field, present, owner) in fields {
            if present && owner != raw.kind {
                return Err(format!("field `{field}` does not apply to kind {kind}"));
            }
        }
        let need = |v: Option<String>, field: &str| {
            v.ok_or_else(|| format!("kind {kind} needs the field `{field}`"))
        };
        let device = match raw.kind {
            RawKind::Rng => Device::Rng,
            RawKind::Net => Device::Net {
                tap: need(raw.tap, "tap")?,
            },
            RawKind::Serial => Device::Serial {
                name: need(raw.name, "name")?,
            },
            RawKind::Blk => Device::Blk {
                path: need(raw.path, "path")?,
                read_only: raw.read_only.unwrap_or(false),
            },
        };
        Ok(DeviceGrant { id: raw.id, device })
    }
}

impl Device {
    pub fn kind(&self) -> &'static str {
        match self {
            Device::Rng => "rng",
            Device::Net { .. } => "net",
            Device::Serial { .. } => "serial",
            Device::Blk { .. } => "blk",
        }
    }
}

/// Why `id` may not name a device, or `None` when it may: telvirt's own QEMU devices take
/// the prefix `tv-`, and a serial device's socket, `<id>.sock` beside the VM's own sockets
/// (`qmp.sock`, `agent.sock`, `nic-<port>.sock`), must not take the place of one of them.
pub fn reserved_device_id(id: &str) -> Option<String> {
    if id.starts_with("tv-") {
        return Some(format!(
            "'{id}': the prefix tv- is reserved for telvirt's own devices"
        ));
    }
    if matches!(id, "qmp" | "agent") || id.starts_with("nic-") {
        return Some(format!(
            "'{id}': qmp, agent and the prefix nic- are reserved for the sockets of the VM's QMP, guest agent and NICs"
        ));
    }
    None
}

/// Longest name of a serial device's port in the guest.
pub const MAX_SERIAL_NAME: usize = 64;

impl DeviceGrant {
    /// Every rule the types alone cannot express, each with its field path.
    pub fn violations(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        let id = self.id.as_str();
        if id.len() > 32 {
            out.push(FieldError::new(
                "id",
                format!("'{id}' is longer than 32 characters"),
            ));
        }
        if !id.starts_with(|c: char| c.is_ascii_lowercase()) {
            out.push(FieldError::new(
                "id",
                format!("'{id}' must start with a letter"),
            ));
        }
        if let Some(why) = reserved_device_id(id) {
            out.push(FieldError::new("id", why));
        }
        let plain = |path: &str, value: &str, out: &mut Vec<FieldError>| {
            if value.trim().is_empty() {
                out.push(FieldError::new(path, "must not be empty"));
            } else if value.contains(['\0', ',']) {
                out.push(FieldError::new(
                    path,
                    format!("'{value}' must not contain ',' or NUL"),
                ));
            }
        };
        match &self.device {
            Device::Rng => {}
            Device::Net { tap } => {
                plain("tap", tap, &mut out);
                if tap.len() > 15 {
                    out.push(FieldError::new(
                        "tap",
                        format!(
                            "'{tap}' is longer than the 15 characters of a Linux interface name"
                        ),
                    ));
                }
            }
            Device::Serial { name } => {
                plain("name", name, &mut out);
                if name.len() > MAX_SERIAL_NAME {
                    out.push(FieldError::new(
                        "name",
                        format!(
                            "{} characters are more than the {MAX_SERIAL_NAME} of a serial port's name",
                            name.len()
                        ),
                    ));
                }
            }
            Device::Blk { path, .. } => {
                plain("path", path, &mut out);
                if !path.starts_with('/') {
                    out.push(FieldError::new(
                        "path",
                        format!("'{path}' must be an absolute path on the node"),
                    ));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(json: &str) -> DeviceGrant {
        serde_json::from_str(json).expect("test grant parses")
    }

    #[test]
    fn kinds_parse_from_flat_json() {
        let g = grant(r#"{"id":"rng0","kind":"rng"}"#);
        assert_eq!(g.device, Device::Rng);
        assert!(g.violations().is_empty());
        let g = grant(r#"{"id":"n0","kind":"net","tap":"tap0"}"#);
        assert_eq!(g.device.kind(), "net");
        let g = grant(r#"{"id":"b0","kind":"blk","path":"/var/d.img"}"#);
        assert_eq!(
            g.device,
            Device::Blk {
                path: "/var/d.img".into(),
                read_only: false
            }
        );
    }

    #[test]
    fn unknown_kind_and_fields_are_refused() {
        assert!(serde_json::from_str::<DeviceGrant>(r#"{"id":"x","kind":"gpu"}"#).is_err());
        assert!(serde_json::from_str::<DeviceGrant>(r#"{"id":"x","kind":"net"}"#).is_err());
        assert!(serde_json::from_str::<DeviceGrant>(r#"{"id":"Bad","kind":"rng"}"#).is_err());
        let e = serde_json::from_str::<DeviceGrant>(r#"{"id":"x","kind":"rng","tap":"t"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("`tap` does not apply"), "{e}");
        let e = serde_json::from_str::<DeviceGrant>(r#"{"id":"x","kind":"rng","turbo":1}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `turbo`"), "{e}");
        let e = serde_json::from_str::<DeviceGrant>(r#"{"id":"x","kind":"blk"}"#).unwrap_err();
        assert!(e.to_string().contains("needs the field `path`"), "{e}");
        // What is written reads back the same.
        let g = grant(r#"{"id":"s0","kind":"serial","name":"org.x"}"#);
        let back: DeviceGrant = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(back, g);
    }

    #[test]
    fn rules_name_the_field() {
        let paths = |json: &str| -> Vec<String> {
            grant(json)
                .violations()
                .into_iter()
                .map(|f| f.path)
                .collect()
        };
        assert_eq!(paths(r#"{"id":"0rng","kind":"rng"}"#), ["id"]);
        assert_eq!(paths(r#"{"id":"tv-rng","kind":"rng"}"#), ["id"]);
        // A serial device's socket must not take the place of the VM's own sockets.
        for taken in ["qmp", "agent", "nic-in"] {
            let json = format!(r#"{{"id":"{taken}","kind":"serial","name":"x"}}"#);
            let why = grant(&json).violations();
            assert_eq!(why.len(), 1, "{taken}: {why:?}");
            assert!(
                why[0].path == "id" && why[0].reason.contains("reserved"),
                "{why:?}"
            );
        }
        assert!(
            grant(r#"{"id":"qmpx","kind":"serial","name":"x"}"#)
                .violations()
                .is_empty()
        );
        let long = format!(
            r#"{{"id":"s","kind":"serial","name":"{}"}}"#,
            "n".repeat(65)
        );
        assert_eq!(paths(&long), ["name"]);
        let longest = format!(
            r#"{{"id":"s","kind":"serial","name":"{}"}}"#,
            "n".repeat(64)
        );
        assert!(paths(&longest).is_empty());
        assert_eq!(
            paths(r#"{"id":"abcdefghijabcdefghijabcdefghijabc","kind":"rng"}"#),
            ["id"]
        );
        assert_eq!(paths(r#"{"id":"n","kind":"net","tap":""}"#), ["tap"]);
        assert_eq!(
            paths(r#"{"id":"n","kind":"net","tap":"a-very-long-tap-name"}"#),
            ["tap"]
        );
        assert_eq!(
            paths(r#"{"id":"s","kind":"serial","name":"a,b"}"#),
            ["name"]
        );
        assert_eq!(
            paths(r#"{"id":"b","kind":"blk","path":"rel.img"}"#),
            ["path"]
        );
    }
}
