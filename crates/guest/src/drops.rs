//! The guest kernel's own record of the frames it dropped: a histogram trigger on the
//! `skb:kfree_skb` tracepoint, keyed by the function that dropped each buffer and the kernel's
//! drop reason, installed once and read back on each health request (the kernel aggregates;
//! nothing streams). Owns tracefs setup and the parsing of its files; must not enable any
//! other event or change tracing state beyond its one trigger.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::proto::{GuestDrop, KernelDrops, MAX_DROP_SITES};

/// Where tracefs is mounted in the guest.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// The tracepoint the kernel fires for every buffer freed as dropped (not consumed).
const EVENT: &str = "events/skb/kfree_skb";
/// Counts per (dropping function, reason).
const TRIGGER: &str = "hist:keys=location.sym,reason";

/// The installed trigger and the names of the kernel's drop reasons.
#[derive(Debug)]
pub struct DropTrace {
    event: PathBuf,
    reasons: BTreeMap<u64, String>,
}

impl DropTrace {
    /// Mounts tracefs at `root` when it is not there yet and installs the trigger (one left
    /// by an earlier run of the agent is kept). The error says why drops cannot be traced.
    pub fn install(root: &Path) -> Result<Self, String> {
        let event = root.join(EVENT);
        if !event.exists() {
            mount_tracefs(root)?;
        }
        let format = std::fs::read_to_string(event.join("format"))
            .map_err(|e| format!("cannot read {}/format: {e}", event.display()))?;
        let trigger = event.join("trigger");
        let installed = std::fs::read_to_string(&trigger)
            .map_err(|e| format!("cannot read {}: {e}", trigger.display()))?;
        if !installed.lines().any(|l| l.starts_with(TRIGGER)) {
            // Appended: opening the file truncated would remove the event's other triggers.
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(&trigger)
                .and_then(|mut f| f.write_all(TRIGGER.as_bytes()))
                .map_err(|e| {
                    format!(
                        "cannot install `{TRIGGER}` in {}: {e} (a kernel without CONFIG_HIST_TRIGGERS refuses it)",
                        trigger.display()
                    )
                })?;
        }
        Ok(Self {
            event,
            reasons: drop_reasons(&format),
        })
    }

    /// What the kernel dropped since the trigger was installed.
    pub fn read(&self) -> KernelDrops {
        let hist = self.event.join("hist");
        match std::fs::read_to_string(&hist) {
            Ok(text) => drops(&text, &self.reasons),
            Err(e) => KernelDrops {
                untraced: Some(format!("cannot read {}: {e}", hist.display())),
                ..KernelDrops::default()
            },
        }
    }
}

fn mount_tracefs(root: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let mut target = root.as_os_str().as_bytes().to_vec();
    target.push(0);
    // SAFETY: every pointer is to a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr().cast(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot mount tracefs at {}: {}",
            root.display(),
            std::io::Error::last_os_error()
        ));
    }
    if !root.join(EVENT).exists() {
        return Err(format!(
            "tracefs at {} has no {EVENT} (a kernel without the skb tracepoints)",
            root.display()
        ));
    }
    Ok(())
}

/// The names of the drop reasons from the event's `format`, whose print format maps each
/// number: `__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, ...)`.
pub fn drop_reasons(format: &str) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    let mut rest = format;
    while let Some(open) = rest.find('{') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find('}') else { break };
        let pair = &rest[..close];
        if let Some((number, name)) = pair.split_once(',')
            && let Ok(number) = number.trim().parse::<u64>()
            && let Some(name) = name
                .trim()
                .strip_prefix('"')
                .and_then(|n| n.strip_suffix('"'))
        {
            out.insert(number, name.to_owned());
        }
    }
    out
}

/// The histogram's entries (`{ location: [ffffffff81234567] br_flood, reason: 2 } hitcount:
/// 5`), most first: at most [`MAX_DROP_SITES`], the rest summed in `elsewhere` with the drops
/// the kernel could not file because its table was full (`Dropped:` under the totals).
pub fn drops(hist: &str, reasons: &BTreeMap<u64, String>) -> KernelDrops {
    let unfiled = hist
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("Dropped:")?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .sum::<u64>();
    let mut sites: Vec<GuestDrop> = hist.lines().filter_map(|l| entry(l, reasons)).collect();
    sites.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.function.cmp(&b.function))
    });
    let elsewhere = sites
        .iter()
        .skip(MAX_DROP_SITES)
        .map(|s| s.count)
        .sum::<u64>()
        + unfiled;
    sites.truncate(MAX_DROP_SITES);
    KernelDrops {
        untraced: None,
        sites,
        elsewhere,
    }
}

fn entry(line: &str, reasons: &BTreeMap<u64, String>) -> Option<GuestDrop> {
    let key = line.trim().strip_prefix('{')?;
    let (key, values) = key.split_once('}')?;
    let (location, reason) = key.split_once(", reason:")?;
    let location = location.trim().strip_prefix("location:")?.trim();
    // `[address] symbol`: the address says nothing once the symbol is known.
    let function = match location.split_once(']') {
        Some((_, symbol)) if !symbol.trim().is_empty() => symbol.trim(),
        _ => location,
    };
    let reason = reason.trim();
    let reason = reason
        .parse::<u64>()
        .ok()
        .and_then(|n| reasons.get(&n).cloned())
        .unwrap_or_else(|| reason.to_owned());
    let count = values
        .trim()
        .strip_prefix("hitcount:")?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?;
    Some(GuestDrop {
        function: function.to_owned(),
        reason,
        count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = r#"name: kfree_skb
ID: 1459
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:void * skbaddr;	offset:8;	size:8;	signed:0;
	field:enum skb_drop_reason reason;	offset:28;	size:4;	signed:0;

print fmt: "skbaddr=%p protocol=%u location=%p reason: %s", REC->skbaddr, REC->protocol, REC->location, __print_symbolic(REC->reason, { 1, "NOT_DROPPED_YET" }, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 68, "MAX" })
"#;

    #[test]
    fn reason_names_come_from_the_events_print_format() {
        let reasons = drop_reasons(FORMAT);
        assert_eq!(reasons.get(&2).map(String::as_str), Some("NOT_SPECIFIED"));
        assert_eq!(reasons.get(&3).map(String::as_str), Some("NO_SOCKET"));
        assert_eq!(reasons.len(), 4);
    }

    #[test]
    fn entries_are_named_sorted_and_bounded() {
        let reasons = drop_reasons(FORMAT);
        let mut hist = String::from(
            "# event histogram\n#\n# trigger info: hist:keys=location.sym,reason:vals=hitcount:sort=hitcount:size=2048 [active]\n#\n\n",
        );
        // As the kernel prints it: the symbol padded to 45 columns, the reason to 10.
        hist.push_str("{ location: [ffffffffc04a1b20] br_handle_frame_finish [bridge]              , reason:          2 } hitcount:        700\n");
        hist.push_str(
            "{ location: [ffffffff81a0c3d0] __udp4_lib_rcv, reason: 3 } hitcount:          5\n",
        );
        hist.push_str(
            "{ location: [ffffffff81a0c3d0] sk_filter_trim_cap, reason: 99 } hitcount:    9\n",
        );
        for i in 0..MAX_DROP_SITES {
            hist.push_str(&format!(
                "{{ location: [ffffffff8100{i:04x}] site{i}, reason: 2 }} hitcount:          1\n"
            ));
        }
        hist.push_str("\nTotals:\n    Hits: 730\n    Entries: 19\n    Dropped: 4\n");
        let d = drops(&hist, &reasons);
        assert_eq!(d.untraced, None);
        assert_eq!(d.sites.len(), MAX_DROP_SITES);
        assert_eq!(
            d.sites[0],
            GuestDrop {
                function: "br_handle_frame_finish [bridge]".into(),
                reason: "NOT_SPECIFIED".into(),
                count: 700
            }
        );
        // An unknown number stays a number.
        assert_eq!(d.sites[1].reason, "99");
        assert_eq!(d.sites[2].reason, "NO_SOCKET");
        let shown: u64 = d.sites.iter().map(|s| s.count).sum();
        assert_eq!(shown + d.elsewhere, 700 + 5 + 9 + MAX_DROP_SITES as u64 + 4);
        // Three sites beyond those listed, and four drops the full table could not file.
        assert_eq!(d.elsewhere, 3 + 4);
    }

    #[test]
    fn a_missing_event_says_why_drops_are_untraced() {
        let dir = tempfile::tempdir().unwrap();
        // No such directory: nothing can be mounted there, and the error names the path.
        let root = dir.path().join("not-tracing");
        let err = DropTrace::install(&root).unwrap_err();
        assert!(err.contains("not-tracing"), "{err}");
    }
}
