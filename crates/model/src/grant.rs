//! Host resources the admin grants an authority: host paths, host interfaces and TAP devices.
//!
//! Owns the grant's wire shape, its rules and the matching of one requested resource against it
//! (lexical: a path is normalised text, never resolved on a disk). It must not look at files or
//! interfaces: whether `/srv/images/a.img` exists is the node's business, whether the authority
//! may name it is this module's.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;

/// Most entries of one kind one authority may hold.
pub const MAX_GRANT_ENTRIES: usize = 256;
/// Longest host path accepted anywhere (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

/// What an authority may use of the host besides cores and memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostGrants {
    /// Host paths (vm kernel, initrd, disk, `blk` devices, wasm module files). An entry ending
    /// in `/` grants every path below that directory; any other entry grants that one file.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub paths: BTreeSet<String>,
    /// Host interfaces a network may link (`host:IF`): an exact name, or a prefix ending in `*`.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub interfaces: BTreeSet<String>,
    /// Existing TAP devices a `kind: net` device may use: an exact name, or a prefix ending in `*`.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub taps: BTreeSet<String>,
}

/// The kind of a host resource, as the grant and the errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    Path,
    Interface,
    Tap,
}

impl ResourceKind {
    /// The CLI flag that grants it (`telvirt authority grant NAME --path ...`).
    pub fn flag(self) -> &'static str {
        match self {
            ResourceKind::Path => "--path",
            ResourceKind::Interface => "--interface",
            ResourceKind::Tap => "--tap",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            ResourceKind::Path => "host path",
            ResourceKind::Interface => "host interface",
            ResourceKind::Tap => "TAP device",
        }
    }
}

impl HostGrants {
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.interfaces.is_empty() && self.taps.is_empty()
    }

    fn entries(&self, kind: ResourceKind) -> &BTreeSet<String> {
        match kind {
            ResourceKind::Path => &self.paths,
            ResourceKind::Interface => &self.interfaces,
            ResourceKind::Tap => &self.taps,
        }
    }

    fn entries_mut(&mut self, kind: ResourceKind) -> &mut BTreeSet<String> {
        match kind {
            ResourceKind::Path => &mut self.paths,
            ResourceKind::Interface => &mut self.interfaces,
            ResourceKind::Tap => &mut self.taps,
        }
    }

    /// Every rule an entry must follow, each with its field path (`paths[2]`).
    pub fn violations(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        for (field, kind) in [
            ("paths", ResourceKind::Path),
            ("interfaces", ResourceKind::Interface),
            ("taps", ResourceKind::Tap),
        ] {
            let entries = self.entries(kind);
            if entries.len() > MAX_GRANT_ENTRIES {
                out.push(FieldError::new(
                    field,
                    format!(
                        "{} entries are more than the {MAX_GRANT_ENTRIES} one authority may hold",
                        entries.len()
                    ),
                ));
            }
            for (i, entry) in entries.iter().enumerate() {
                let path = format!("{field}[{i}]");
                let problem = match kind {
                    ResourceKind::Path => {
                        path_problem(entry).map(|why| format!("`{}` {why}", printable(entry)))
                    }
                    ResourceKind::Interface | ResourceKind::Tap => {
                        let name = entry.strip_suffix('*').unwrap_or(entry);
                        if name.is_empty() {
                            Some(format!(
                                "`{entry}` would grant every {}; name one, or a prefix before `*`",
                                kind.noun()
                            ))
                        } else {
                            ifname_problem(name).map(|why| format!("`{}` {why}", printable(entry)))
                        }
                    }
                };
                if let Some(reason) = problem {
                    out.push(FieldError::new(path, reason));
                }
            }
        }
        out
    }

    /// Whether the grant covers `resource` of `kind`.
    pub fn covers(&self, kind: ResourceKind, resource: &str) -> bool {
        self.entries(kind)
            .iter()
            .any(|entry| entry_covers(kind, entry, resource))
    }

    /// Adds every entry of `more`.
    pub fn add(&mut self, more: &HostGrants) {
        for kind in [
            ResourceKind::Path,
            ResourceKind::Interface,
            ResourceKind::Tap,
        ] {
            self.entries_mut(kind)
                .extend(more.entries(kind).iter().cloned());
        }
    }

    /// Removes every entry of `less`; returns the entries `less` names that were not granted.
    pub fn remove(&mut self, less: &HostGrants) -> Vec<(ResourceKind, String)> {
        let mut missing = Vec::new();
        for kind in [
            ResourceKind::Path,
            ResourceKind::Interface,
            ResourceKind::Tap,
        ] {
            for entry in less.entries(kind) {
                if !self.entries_mut(kind).remove(entry) {
                    missing.push((kind, entry.clone()));
                }
            }
        }
        missing
    }
}

fn entry_covers(kind: ResourceKind, entry: &str, resource: &str) -> bool {
    match kind {
        ResourceKind::Path => match entry.strip_suffix('/') {
            // A directory grant: strictly below it (`/srv/` covers `/srv/a`, not `/srv`).
            Some(_) => resource.len() > entry.len() && resource.starts_with(entry),
            None => resource == entry,
        },
        ResourceKind::Interface | ResourceKind::Tap => match entry.strip_suffix('*') {
            Some(prefix) => resource.starts_with(prefix),
            None => resource == entry,
        },
    }
}

/// Why `path` is not a usable host path: absolute, normalised (no `.`, `..` or empty
/// components), no NUL, at most `MAX_PATH_LEN` bytes. A trailing `/` is allowed (a directory).
pub fn path_problem(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("is empty");
    }
    if path.len() > MAX_PATH_LEN {
        return Some("is longer than the 4096 bytes of a Linux path");
    }
    if path.contains('\0') {
        return Some("contains a NUL byte");
    }
    if !path.starts_with('/') {
        return Some("is not an absolute path");
    }
    let body = path.strip_suffix('/').unwrap_or(path);
    if body.is_empty() {
        return None;
    }
    for part in body[1..].split('/') {
        match part {
            "" => return Some("has an empty component (`//`)"),
            "." | ".." => return Some("has a `.` or `..` component; give the normalised path"),
            _ => {}
        }
    }
    None
}

/// Why `name` is not a Linux interface name (1-15 bytes, no `/`, whitespace, `:` or NUL).
pub fn ifname_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 15 {
        return Some("is not 1 to 15 characters long, as a Linux interface name is");
    }
    if name == "." || name == ".." {
        return Some("is not an interface name");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '*' || c.is_whitespace() || c.is_control())
    {
        return Some("must not contain '/', ':', '*', whitespace or control characters");
    }
    None
}

/// `text` safe to quote in an error: control characters (NUL included) escaped.
fn printable(text: &str) -> String {
    text.escape_debug().to_string()
}

/// Whether an authority holding `grants` may use host resource `resource` of `kind`, as the
/// field at `path` asks; the refusal names the field, the resource and the missing grant.
/// `admin` is not subject to grants: callers skip this check for it.
pub fn require(
    grants: &HostGrants,
    kind: ResourceKind,
    path: &str,
    resource: &str,
) -> Result<(), FieldError> {
    if kind == ResourceKind::Path
        && let Some(why) = path_problem(resource)
    {
        return Err(FieldError::new(
            path,
            format!("`{}` {why}", printable(resource)),
        ));
    }
    if kind != ResourceKind::Path
        && let Some(why) = ifname_problem(resource)
    {
        return Err(FieldError::new(
            path,
            format!("`{}` {why}", printable(resource)),
        ));
    }
    if grants.covers(kind, resource) {
        return Ok(());
    }
    Err(FieldError::new(
        path,
        format!(
            "{} `{resource}` is not granted to this authority; the admin grants it with \
             `telvirt authority grant NAME {} {resource}`",
            kind.noun(),
            kind.flag(),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(paths: &[&str], interfaces: &[&str], taps: &[&str]) -> HostGrants {
        let set = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        HostGrants {
            paths: set(paths),
            interfaces: set(interfaces),
            taps: set(taps),
        }
    }

    #[test]
    fn directory_grants_cover_below_and_file_grants_only_themselves() {
        let g = grants(
            &["/srv/images/", "/opt/k/vmlinuz"],
            &["eth1", "veth*"],
            &["tv-*"],
        );
        assert!(g.covers(ResourceKind::Path, "/srv/images/a.img"));
        assert!(g.covers(ResourceKind::Path, "/srv/images/sub/a.img"));
        assert!(!g.covers(ResourceKind::Path, "/srv/images"));
        assert!(!g.covers(ResourceKind::Path, "/srv/imagesX/a.img"));
        assert!(g.covers(ResourceKind::Path, "/opt/k/vmlinuz"));
        assert!(!g.covers(ResourceKind::Path, "/opt/k/vmlinuz2"));
        assert!(g.covers(ResourceKind::Interface, "eth1"));
        assert!(!g.covers(ResourceKind::Interface, "eth10"));
        assert!(g.covers(ResourceKind::Interface, "veth-a"));
        assert!(!g.covers(ResourceKind::Interface, "lo"));
        assert!(g.covers(ResourceKind::Tap, "tv-0"));
        assert!(!g.covers(ResourceKind::Tap, "tap0"));
    }

    #[test]
    fn traversal_and_relative_paths_are_refused_even_below_a_grant() {
        let g = grants(&["/srv/images/"], &[], &[]);
        for bad in [
            "/srv/images/../../etc/shadow",
            "/srv/images/./a",
            "/srv/images//a",
            "srv/images/a",
            "/srv/images/a\0b",
        ] {
            let e = require(&g, ResourceKind::Path, "spec.vm.disk", bad).unwrap_err();
            assert_eq!(e.path, "spec.vm.disk");
            assert!(!e.reason.contains('\0'), "{e}");
        }
        let e = require(&g, ResourceKind::Path, "spec.vm.disk", "/etc/shadow").unwrap_err();
        assert!(e.reason.contains("not granted"), "{e}");
        assert!(e.reason.contains("--path /etc/shadow"), "{e}");
        require(&g, ResourceKind::Path, "spec.vm.disk", "/srv/images/a.img").unwrap();
    }

    #[test]
    fn entries_are_checked_with_their_index() {
        let g = grants(
            &["relative/", "/ok/"],
            &["*", "a/b"],
            &["way-too-long-tap-name"],
        );
        let paths: Vec<String> = g.violations().into_iter().map(|f| f.path).collect();
        assert_eq!(
            paths,
            ["paths[1]", "interfaces[0]", "interfaces[1]", "taps[0]"]
        );
        assert!(grants(&["/"], &["eth*"], &["tap0"]).violations().is_empty());
    }

    #[test]
    fn add_and_remove_report_what_was_not_there() {
        let mut g = grants(&["/a/"], &[], &[]);
        g.add(&grants(&["/b/"], &["eth1"], &[]));
        assert_eq!(g.paths.len(), 2);
        let missing = g.remove(&grants(&["/a/", "/c/"], &["eth1"], &[]));
        assert_eq!(missing, vec![(ResourceKind::Path, "/c/".to_owned())]);
        assert_eq!(g, grants(&["/b/"], &[], &[]));
    }
}
