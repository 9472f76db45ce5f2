//! Snapshot and update-log encoding of a VNF's maps: versioned, CRC-32 checksummed,
//! architecture-neutral (every integer little-endian, no padding). Format in ADR 031 and
//! `docs/vnf-abi.md`. Owns the byte format only; the maps themselves live in `maps`.

use crate::abi::update_flags;
use crate::error::{Error, Result};
use crate::maps::{LOG_DELETE, LOG_UPDATE, Map, MapDef, MapKind, MapSet, MapsCopy};

/// Snapshot magic.
pub const SNAPSHOT_MAGIC: [u8; 4] = *b"TVMS";
/// Update-log magic.
pub const LOG_MAGIC: [u8; 4] = *b"TVML";
/// Format version of both.
pub const FORMAT_VERSION: u16 = 1;

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.b.len() - self.pos < n {
            return Err(Error::Snapshot(format!(
                "truncated at byte {} reading {what} ({n} bytes needed)",
                self.pos
            )));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        let s = self.take(2, what)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
}

/// Splits off and checks the trailing CRC-32 and the magic/version header.
fn checked_body<'a>(bytes: &'a [u8], magic: [u8; 4], what: &str) -> Result<(&'a [u8], u32)> {
    if bytes.len() < 12 {
        return Err(Error::Snapshot(format!(
            "{what} is {} bytes, too short for a header",
            bytes.len()
        )));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    let want = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let got = crc32fast::hash(body);
    if want != got {
        return Err(Error::Snapshot(format!(
            "{what} checksum mismatch (stored {want:08x}, computed {got:08x}): corrupted or truncated"
        )));
    }
    if body[..4] != magic {
        return Err(Error::Snapshot(format!(
            "{what}: bad magic {:02x?}, expected {:?}",
            &body[..4],
            std::str::from_utf8(&magic).unwrap_or("?")
        )));
    }
    let ver = u16::from_le_bytes([body[4], body[5]]);
    if ver != FORMAT_VERSION {
        return Err(Error::Snapshot(format!(
            "{what}: format version {ver} is not supported (this runtime reads {FORMAT_VERSION})"
        )));
    }
    Ok((body, want))
}

fn write_def(out: &mut Vec<u8>, d: &MapDef) {
    out.extend_from_slice(&(d.name.len() as u16).to_le_bytes());
    out.extend_from_slice(d.name.as_bytes());
    out.push(d.kind.to_u8());
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&d.key_size.to_le_bytes());
    out.extend_from_slice(&d.value_size.to_le_bytes());
    out.extend_from_slice(&d.max_entries.to_le_bytes());
}

fn read_def(r: &mut Reader<'_>, i: usize) -> Result<MapDef> {
    let nl = r.u16("map name length")? as usize;
    let name = std::str::from_utf8(r.take(nl, "map name")?)
        .map_err(|_| Error::Snapshot(format!("map {i}: name is not UTF-8")))?
        .to_string();
    let kind_b = r.u8("map kind")?;
    let kind = MapKind::from_u8(kind_b)
        .ok_or_else(|| Error::Snapshot(format!("map `{name}`: unknown kind {kind_b}")))?;
    r.take(3, "reserved")?;
    Ok(MapDef {
        name,
        kind,
        key_size: r.u32("key_size")?,
        value_size: r.u32("value_size")?,
        max_entries: r.u32("max_entries")?,
    })
}

/// Header flag of a snapshot taken in slices: an entry may appear twice (the later copy
/// wins) and the snapshot is exact only with the update log that follows it.
pub const FLAG_FOLLOWED_BY_LOG: u16 = 1;

/// A snapshot being taken in slices ([`MapSet::begin_sliced_snapshot`]).
pub struct SlicedSnapshot {
    out: Vec<u8>,
    log_id: u64,
    defs: Vec<MapDef>,
    /// The map being copied and its next slot (or array index).
    map: usize,
    slot: usize,
    /// Where the current map's entry count goes once known.
    count_at: Option<usize>,
    count: u64,
    done: bool,
}

impl SlicedSnapshot {
    /// The snapshot's bytes once [`MapSet::snapshot_slice`] said it is complete.
    pub fn into_bytes(self) -> Option<Vec<u8>> {
        self.done.then_some(self.out)
    }

    /// Bytes copied so far.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    /// Whether nothing but its header was copied yet.
    pub fn is_empty(&self) -> bool {
        self.out.len() <= 12
    }
}

impl MapsCopy {
    /// The snapshot of the copied maps: the bytes [`MapSet::encode`] would have given when
    /// the copy was taken.
    pub fn encode(&self) -> Vec<u8> {
        encode_maps(&self.maps)
    }
}

/// Bytes a snapshot of `maps` takes as they are now (at most).
fn encoded_size(maps: &[Map]) -> usize {
    16 + maps
        .iter()
        .map(|m| {
            let d = m.def();
            64 + d.name.len() + m.len() * (d.key_size + d.value_size) as usize
        })
        .sum::<usize>()
}

fn encode_maps(maps: &[Map]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_size(maps));
    header(&mut out, SNAPSHOT_MAGIC, maps.len());
    for m in maps {
        write_def(&mut out, m.def());
        out.extend_from_slice(&(m.len() as u64).to_le_bytes());
        if m.def().kind == MapKind::Array {
            out.extend_from_slice(m.array_values());
        } else {
            m.for_each(|k, v| {
                out.extend_from_slice(k);
                out.extend_from_slice(v);
            });
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn header(out: &mut Vec<u8>, magic: [u8; 4], count: usize) {
    out.extend_from_slice(&magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(count as u32).to_le_bytes());
}

impl MapSet {
    /// Encodes every map into a snapshot and (re)starts the update log from this point.
    pub fn snapshot(&mut self) -> Vec<u8> {
        let out = self.encode();
        let crc = u32::from_le_bytes(
            out[out.len() - 4..]
                .try_into()
                .expect("a snapshot ends with its 4-byte checksum"),
        );
        self.base = crc;
        self.restart_log();
        out
    }

    /// Starts a snapshot taken in slices ([`MapSet::snapshot_slice`], each between two
    /// batches, so a large state never holds the instance for long) and restarts the update
    /// log here. The maps change between slices, so an entry may be copied as it was at any
    /// time after this point, or twice (moved to a later slot): the snapshot says so (header
    /// flag [`FLAG_FOLLOWED_BY_LOG`]) and is exact only with the update log taken after it,
    /// which holds every change since this point. Chain that log with
    /// [`MapSet::snapshot_sent`] once the snapshot is complete.
    pub fn begin_sliced_snapshot(&mut self) -> SlicedSnapshot {
        let log_id = self.restart_log();
        // Reserved whole (with room for growth meanwhile) so no slice copies what the ones
        // before it wrote into a larger buffer; its pages are touched slice by slice.
        let size = encoded_size(&self.maps);
        let mut out = Vec::with_capacity(size.saturating_add(size / 8));
        header(&mut out, SNAPSHOT_MAGIC, self.maps.len());
        out[6..8].copy_from_slice(&FLAG_FOLLOWED_BY_LOG.to_le_bytes());
        SlicedSnapshot {
            out,
            log_id,
            defs: self.defs(),
            map: 0,
            slot: 0,
            count_at: None,
            count: 0,
            done: false,
        }
    }

    /// Copies about `max_bytes` more of a sliced snapshot; `Ok(true)` once it is complete
    /// (checksummed: [`SlicedSnapshot::into_bytes`]). An LRU map is copied in one slice (its
    /// recency order cannot be followed across slices). Errors when the update log was
    /// restarted or the maps replaced since it began: start again.
    pub fn snapshot_slice(&self, s: &mut SlicedSnapshot, max_bytes: usize) -> Result<bool> {
        if s.done {
            return Ok(true);
        }
        if s.log_id != self.log_id || self.log.is_none() || s.defs.len() != self.maps.len() {
            return Err(Error::Snapshot(
                "the maps were snapshotted again or replaced while a sliced snapshot was taken: start it again".into(),
            ));
        }
        let end = s.out.len().saturating_add(max_bytes.max(1));
        while s.map < self.maps.len() {
            let m = &self.maps[s.map];
            if !m.def().layout_eq(&s.defs[s.map]) || m.def().name != s.defs[s.map].name {
                return Err(Error::Snapshot(format!(
                    "map {} changed its layout while a sliced snapshot was taken: start it again",
                    s.map
                )));
            }
            let count_at = match s.count_at {
                Some(at) => at,
                None => {
                    write_def(&mut s.out, m.def());
                    let at = s.out.len();
                    s.out.extend_from_slice(&0u64.to_le_bytes());
                    s.count_at = Some(at);
                    s.count = 0;
                    s.slot = 0;
                    at
                }
            };
            let complete = match m.def().kind {
                MapKind::Array => {
                    let vs = m.def().value_size as usize;
                    let n = m.def().max_entries as usize;
                    let take = ((end.saturating_sub(s.out.len())) / vs.max(1))
                        .max(1)
                        .min(n - s.slot);
                    s.out
                        .extend_from_slice(&m.array_values()[s.slot * vs..(s.slot + take) * vs]);
                    s.slot += take;
                    s.count += take as u64;
                    s.slot >= n
                }
                MapKind::Hash => {
                    let slots = m.slots();
                    while s.slot < slots && s.out.len() < end {
                        if let Some((k, v)) = m.slot_entry(s.slot) {
                            s.out.extend_from_slice(k);
                            s.out.extend_from_slice(v);
                            s.count += 1;
                        }
                        s.slot += 1;
                    }
                    s.slot >= slots
                }
                MapKind::LruHash => {
                    m.for_each(|k, v| {
                        s.out.extend_from_slice(k);
                        s.out.extend_from_slice(v);
                        s.count += 1;
                    });
                    true
                }
            };
            if !complete {
                return Ok(false);
            }
            s.out[count_at..count_at + 8].copy_from_slice(&s.count.to_le_bytes());
            s.count_at = None;
            s.map += 1;
            if s.out.len() >= end {
                break;
            }
        }
        if s.map < self.maps.len() {
            return Ok(false);
        }
        let crc = crc32fast::hash(&s.out);
        s.out.extend_from_slice(&crc.to_le_bytes());
        s.done = true;
        Ok(true)
    }

    /// Encodes every map into a snapshot, leaving the update log and its chain as they are
    /// (a copy kept on disk must not break a standby's stream of logs).
    pub fn encode(&self) -> Vec<u8> {
        encode_maps(&self.maps)
    }

    /// Decodes a snapshot into maps of the given definitions (same names and layouts; a larger
    /// capacity is allowed). Nothing changes on error.
    pub fn restore(defs: &[MapDef], bytes: &[u8]) -> Result<MapSet> {
        let (body, crc) = checked_body(bytes, SNAPSHOT_MAGIC, "snapshot")?;
        let flags = u16::from_le_bytes([body[6], body[7]]);
        if flags & !FLAG_FOLLOWED_BY_LOG != 0 {
            return Err(Error::Snapshot(format!(
                "snapshot flags {flags:#06x}: this runtime knows only {FLAG_FOLLOWED_BY_LOG:#06x}"
            )));
        }
        // A sliced snapshot may hold a key twice: the later copy is the newer.
        let insert = if flags & FLAG_FOLLOWED_BY_LOG != 0 {
            update_flags::ANY
        } else {
            update_flags::NOEXIST
        };
        let mut r = Reader { b: body, pos: 8 };
        let n = r.u32("map count")? as usize;
        let mut set = MapSet::new(defs)?;
        if n != defs.len() {
            return Err(Error::Snapshot(format!(
                "snapshot holds {n} maps, the VNF declares {}",
                defs.len()
            )));
        }
        for (i, want) in defs.iter().enumerate() {
            let got = read_def(&mut r, i)?;
            if !got.layout_eq(want) {
                return Err(Error::Snapshot(format!(
                    "map {i}: snapshot has `{}` {:?} key {} value {}, the VNF declares `{}` {:?} key {} value {}",
                    got.name,
                    got.kind,
                    got.key_size,
                    got.value_size,
                    want.name,
                    want.kind,
                    want.key_size,
                    want.value_size
                )));
            }
            let count = r.u64("entry count")?;
            if count > u64::from(want.max_entries) {
                return Err(Error::Snapshot(format!(
                    "map `{}`: {count} entries exceed max_entries {}",
                    want.name, want.max_entries
                )));
            }
            let (ks, vs) = (want.key_size as usize, want.value_size as usize);
            let map: &mut Map = &mut set.maps[i];
            if want.kind == MapKind::Array {
                let src = r.take(count as usize * vs, "array values")?;
                map.array_values_mut()[..src.len()].copy_from_slice(src);
            } else {
                let all = r.take(count as usize * (ks + vs), "entries")?;
                for e in all.chunks_exact(ks + vs) {
                    let (rc, _) = map.update(&e[..ks], &e[ks..], insert);
                    if rc != crate::abi::code::OK {
                        return Err(Error::Snapshot(format!(
                            "map `{}`: duplicate or invalid entry (code {rc})",
                            want.name
                        )));
                    }
                }
            }
        }
        if r.pos != body.len() {
            return Err(Error::Snapshot(format!(
                "{} trailing bytes after the last map",
                body.len() - r.pos
            )));
        }
        set.base = crc;
        Ok(set)
    }

    /// Takes the updates logged since the last snapshot or taken log, encoded; the log restarts
    /// empty. Errors when no snapshot started logging or the log overflowed its cap (then only
    /// a new snapshot carries the state on).
    pub fn take_log(&mut self) -> Result<Vec<u8>> {
        let Some(log) = self.log.as_mut() else {
            return Err(Error::Snapshot(
                "no update log: take a snapshot first to start logging".into(),
            ));
        };
        if log.overflowed {
            return Err(Error::Snapshot(format!(
                "update log overflowed its cap of {} bytes ({} updates since the last snapshot or log): take a new snapshot",
                self.log_cap, log.count
            )));
        }
        let mut out = Vec::with_capacity(32 + log.buf.len());
        header(&mut out, LOG_MAGIC, self.maps.len());
        out.extend_from_slice(&self.base.to_le_bytes());
        out.extend_from_slice(&log.count.to_le_bytes());
        out.extend_from_slice(&log.buf);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        log.buf.clear();
        log.count = 0;
        self.base = crc;
        Ok(out)
    }

    /// Applies an update log taken right after the snapshot or log this set was restored from
    /// (checked through the chained checksums). Validates everything before changing anything.
    pub fn apply_log(&mut self, bytes: &[u8]) -> Result<u64> {
        let (body, crc) = checked_body(bytes, LOG_MAGIC, "update log")?;
        let mut r = Reader { b: body, pos: 8 };
        let n = r.u32("map count")? as usize;
        if n != self.maps.len() {
            return Err(Error::Snapshot(format!(
                "update log is for {n} maps, this VNF has {}",
                self.maps.len()
            )));
        }
        let base = r.u32("base checksum")?;
        if base != self.base {
            return Err(Error::Snapshot(format!(
                "update log follows state {base:08x}, these maps are at {:08x}: a log is missing or out of order",
                self.base
            )));
        }
        let count = r.u64("entry count")?;
        let start = r.pos;
        // First pass: validate framing.
        for i in 0..count {
            let (op, id) = (r.u8("op")?, r.u16("map id")? as usize);
            let d =
                self.maps.get(id).map(Map::def).ok_or_else(|| {
                    Error::Snapshot(format!("log entry {i}: unknown map id {id}"))
                })?;
            let (ks, vs) = (d.key_size as usize, d.value_size as usize);
            match op {
                LOG_UPDATE => r.take(ks + vs, "update entry")?,
                LOG_DELETE => r.take(ks, "delete entry")?,
                _ => return Err(Error::Snapshot(format!("log entry {i}: unknown op {op}"))),
            };
        }
        if r.pos != body.len() {
            return Err(Error::Snapshot(
                "trailing bytes after the last log entry".into(),
            ));
        }
        r.pos = start;
        for _ in 0..count {
            let (op, id) = (r.u8("op")?, r.u16("map id")? as usize);
            let d = self.maps[id].def();
            let (ks, vs) = (d.key_size as usize, d.value_size as usize);
            if op == LOG_UPDATE {
                let e = r.take(ks + vs, "update entry")?;
                let (rc, _) = self.maps[id].update(&e[..ks], &e[ks..], update_flags::ANY);
                if rc != crate::abi::code::OK {
                    return Err(Error::Snapshot(format!(
                        "map `{}`: replaying an update failed with code {rc}",
                        self.maps[id].def().name
                    )));
                }
            } else {
                let k = r.take(ks, "delete entry")?;
                self.maps[id].delete(k);
            }
        }
        self.base = crc;
        Ok(count)
    }
}
