//! Snapshot and update-log encoding of a VNF's maps: versioned, CRC-32 checksummed,
//! architecture-neutral (every integer little-endian, no padding). Format in ADR 031 and
//! `docs/vnf-abi.md`. Owns the byte format only; the maps themselves live in `maps`.

use crate::abi::update_flags;
use crate::error::{Error, Result};
use crate::maps::{LOG_DELETE, LOG_UPDATE, Map, MapDef, MapKind, MapSet, NIL};

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

/// A snapshot being taken in slices: the standby's ([`MapSet::begin_sliced_snapshot`]) or a
/// copy for disk ([`MapSet::begin_sliced_copy`]).
pub(crate) struct Slicing {
    out: Vec<u8>,
    maps: Vec<SlicedMap>,
    /// The map being copied, whether its definition was written, and the entries written of
    /// it so far.
    map: usize,
    started: bool,
    written: u64,
}

/// One map under a sliced copy: the walk over its places (an array's index, a slot) in the
/// order its snapshot keeps, the places whose entry is still to be copied from the map
/// (cleared when it is copied, or saved before a change), and the entries saved as they were
/// (each `size` bytes; `saved_at` holds a saved place's entry number plus one). Both are made
/// at the first save, at their largest (the buffer reserved, `saved_at` zeroed: pages the
/// kernel maps on first write), so a change, which runs between packets, never rehashes, grows
/// or fills anything large; and a copy that saves nothing allocates neither.
struct SlicedMap {
    walk: Walk,
    pending: Vec<bool>,
    saved_at: Vec<u32>,
    saved: Vec<u8>,
    size: usize,
    len: u64,
}

/// The order a [`SlicedMap`] goes through its map.
enum Walk {
    /// An array's indices from `next` up to `end`.
    Indices { next: u32, end: u32 },
    /// A hash map's slots from `next` up to `end` (its order is its own): a slot empty when
    /// the copy began is passed over.
    Slots { next: u32, end: u32 },
    /// An LRU map's slots from `at` ([`NIL`]: done) toward the most recently used, along the
    /// links as they were when the copy began (copied then: a lookup relinks the map's own);
    /// at most `left` more (a list that loops ends the walk, and the count check fails it).
    Chain {
        at: u32,
        links: Vec<u32>,
        left: usize,
    },
}

impl Walk {
    /// The next place, if any.
    fn next(&mut self) -> Option<usize> {
        match self {
            Walk::Indices { next, end } | Walk::Slots { next, end } => (*next < *end).then(|| {
                *next += 1;
                (*next - 1) as usize
            }),
            Walk::Chain { at, links, left } => {
                if *at == NIL || *left == 0 {
                    *at = NIL;
                    return None;
                }
                *left -= 1;
                let s = *at;
                *at = links.get(s as usize).copied().unwrap_or(NIL);
                Some(s as usize)
            }
        }
    }

    /// Whether every place was walked.
    fn done(&self) -> bool {
        match self {
            Walk::Indices { next, end } | Walk::Slots { next, end } => next >= end,
            Walk::Chain { at, .. } => *at == NIL,
        }
    }

    /// Appends the entry at `place` of `map` as a snapshot holds it (an array's value; a
    /// slot's key and value), `size` bytes; whether one is there.
    fn entry_into(&self, out: &mut Vec<u8>, map: &Map, place: usize, size: usize) -> bool {
        if let Walk::Indices { .. } = self {
            match map.array_values().get(place * size..(place + 1) * size) {
                Some(v) => out.extend_from_slice(v),
                None => return false,
            }
        } else {
            match map.slot_entry(place) {
                Some((k, v)) => {
                    out.extend_from_slice(k);
                    out.extend_from_slice(v);
                }
                None => return false,
            }
        }
        true
    }
}

impl SlicedMap {
    /// A copy of `map` as it is now.
    fn new(map: &Map) -> Self {
        let d = map.def();
        let (walk, pending) = match d.kind {
            MapKind::Array => {
                let end = d.max_entries;
                (Walk::Indices { next: 0, end }, vec![true; end as usize])
            }
            MapKind::Hash => {
                let live = map.live_slots();
                let end = u32::try_from(live.len()).unwrap_or(u32::MAX);
                (Walk::Slots { next: 0, end }, live.to_vec())
            }
            MapKind::LruHash => {
                let (tail, links) = map.lru_links();
                let live = map.live_slots();
                let walk = Walk::Chain {
                    at: tail,
                    links: links.to_vec(),
                    left: live.len(),
                };
                (walk, live.to_vec())
            }
        };
        SlicedMap {
            walk,
            pending,
            saved_at: Vec::new(),
            saved: Vec::new(),
            size: if d.kind == MapKind::Array {
                d.value_size as usize
            } else {
                (d.key_size + d.value_size) as usize
            },
            len: map.len() as u64,
        }
    }

    /// The place in `map` a change at `key` touches: an array's index; a slot of `key`, or
    /// for an LRU map, of the entry an insert of `key` evicts.
    fn place_of(&self, map: &Map, key: &[u8]) -> Option<usize> {
        match self.walk {
            Walk::Indices { .. } => map.array_index(key),
            Walk::Slots { .. } => map.slot_of(key),
            Walk::Chain { .. } => map.slot_of(key).or_else(|| map.lru_victim_slot(key)),
        }
    }

    /// Before the entry at `key` of `map` changes: saved as it is (as it was when the copy
    /// began) if it was not copied yet.
    fn before_change(&mut self, map: &Map, key: &[u8]) {
        let Some(place) = self.place_of(map, key) else {
            return;
        };
        if !self.pending.get(place).copied().unwrap_or(false) {
            return;
        }
        if self.saved_at.is_empty() {
            // Made at the first save, both at their largest: untouched pages cost nothing.
            self.saved_at = vec![0; self.pending.len()];
            self.saved = Vec::with_capacity(self.len as usize * self.size);
        }
        let n = self.saved.len() / self.size.max(1);
        if self.walk.entry_into(&mut self.saved, map, place, self.size) {
            self.saved_at[place] = u32::try_from(n + 1).unwrap_or(0);
        }
        self.pending[place] = false;
    }

    /// Appends the next entries of `map` to `out` until it reaches `end` bytes or the map's
    /// last; how many. An entry neither in the map nor saved is an error (a hash map's slot
    /// that was empty is passed over): start again.
    fn step(&mut self, map: &Map, out: &mut Vec<u8>, end: usize) -> Result<u64> {
        let mut written = 0;
        while out.len() < end
            && let Some(place) = self.walk.next()
        {
            let copied = if self.pending.get(place).copied().unwrap_or(false) {
                self.pending[place] = false;
                self.walk.entry_into(out, map, place, self.size)
            } else {
                // Not pending on the walk: saved before a change (each place is walked once),
                // or a hash map's slot empty when the copy began.
                let entry = match self.saved_at.get(place).copied() {
                    Some(n) if n > 0 => {
                        let at = (n as usize - 1) * self.size;
                        self.saved.get(at..at + self.size)
                    }
                    _ => None,
                };
                match entry {
                    Some(entry) => {
                        out.extend_from_slice(entry);
                        true
                    }
                    None if matches!(self.walk, Walk::Slots { .. }) => continue,
                    None => false,
                }
            };
            if !copied {
                return Err(Error::Snapshot(format!(
                    "map `{}`: a sliced snapshot lost track of the entry at {place}: start it again",
                    map.def().name
                )));
            }
            written += 1;
        }
        Ok(written)
    }
}

impl Slicing {
    /// Before map `id` changes at `key`: an entry the snapshot holds but has not copied yet
    /// is saved as it is now (as it was when the snapshot began).
    pub(crate) fn before_change(&mut self, id: usize, map: &Map, key: &[u8]) {
        if id < self.map {
            return;
        }
        if let Some(copy) = self.maps.get_mut(id) {
            copy.before_change(map, key);
        }
    }

    /// A snapshot of `maps` as they are now, to be copied slice by slice.
    fn new(maps: &[Map]) -> Slicing {
        let size = encoded_size(maps);
        // Reserved whole, so no slice copies what the ones before it wrote into a larger
        // buffer; its pages are touched slice by slice.
        let mut out = Vec::with_capacity(size);
        header(&mut out, SNAPSHOT_MAGIC, maps.len());
        Slicing {
            out,
            maps: maps.iter().map(SlicedMap::new).collect(),
            map: 0,
            started: false,
            written: 0,
        }
    }

    /// Copies about `max_bytes` more of `maps` (the maps it began on); whether every map is
    /// copied. An error (a map whose entries do not add up) ends it: start again.
    fn step(&mut self, maps: &[Map], max_bytes: usize) -> Result<bool> {
        let end = self.out.len().saturating_add(max_bytes.max(1));
        while self.map < maps.len() && self.out.len() < end {
            let m = &maps[self.map];
            let copy = &mut self.maps[self.map];
            if !self.started {
                write_def(&mut self.out, m.def());
                self.out.extend_from_slice(&copy.len.to_le_bytes());
                self.started = true;
            }
            self.written += copy.step(m, &mut self.out, end)?;
            if !copy.walk.done() {
                break;
            }
            if self.written != copy.len {
                return Err(miscounted(m, self.written, copy.len));
            }
            self.map += 1;
            self.started = false;
            self.written = 0;
        }
        Ok(self.map >= maps.len())
    }

    /// Copies about `max_bytes` more of the sliced snapshot in `under_way` (`missing` when
    /// none is): once complete, its bytes with their checksum appended, and the checksum,
    /// and none is under way any more; an error ends it too.
    fn next(
        under_way: &mut Option<Slicing>,
        maps: &[Map],
        max_bytes: usize,
        missing: &str,
    ) -> Result<Option<(Vec<u8>, u32)>> {
        let Some(sl) = under_way.as_mut() else {
            return Err(Error::Snapshot(missing.into()));
        };
        match sl.step(maps, max_bytes) {
            Ok(false) => Ok(None),
            Ok(true) => Ok(under_way.take().map(|mut done| {
                let crc = seal(&mut done.out);
                (done.out, crc)
            })),
            Err(e) => {
                *under_way = None;
                Err(e)
            }
        }
    }
}

/// A sliced snapshot that copied `written` entries of map `m`, which held `len` when it began.
fn miscounted(m: &Map, written: u64, len: u64) -> Error {
    Error::Snapshot(format!(
        "map `{}`: a sliced snapshot copied {written} entries of the {len} it held: start it again",
        m.def().name
    ))
}

/// Bytes a snapshot of `maps` takes as they are now (at most).
fn encoded_size(maps: &[Map]) -> usize {
    16 + maps.iter().map(map_size).sum::<usize>()
}

/// Bytes one map's section of a snapshot takes as it is now (at most).
fn map_size(m: &Map) -> usize {
    let d = m.def();
    64 + d.name.len() + m.len() * (d.key_size + d.value_size) as usize
}

fn encode_maps(maps: &[Map]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_size(maps));
    header(&mut out, SNAPSHOT_MAGIC, maps.len());
    for m in maps {
        encode_map_into(&mut out, m);
    }
    seal(&mut out);
    out
}

/// Appends the checksum of `out` (CRC-32, little-endian) to it; returns the checksum.
fn seal(out: &mut Vec<u8>) -> u32 {
    let crc = crc32fast::hash(out);
    out.extend_from_slice(&crc.to_le_bytes());
    crc
}

/// One map's section of a snapshot: its definition, its entry count, its entries.
fn encode_map_into(out: &mut Vec<u8>, m: &Map) {
    write_def(out, m.def());
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

    /// Starts a snapshot of the maps as they are now, taken in slices
    /// ([`MapSet::snapshot_slice`], each between two batches, so a large state never holds
    /// the instance for long), and restarts the update log here. Copy on write keeps it
    /// exact: a change to an entry that no slice copied yet first saves the entry as it was.
    /// Arrays go in index order, hash maps in slot order (an entry saved before a change
    /// where its slot comes) and LRU maps in the recency order they have now (their links are
    /// copied now, four bytes a slot: a lookup relinks the map, not the copy). Another
    /// snapshot, or a taken log, ends it.
    pub fn begin_sliced_snapshot(&mut self) {
        self.restart_log();
        self.slicing = Some(Slicing::new(&self.maps));
    }

    /// Copies about `max_bytes` more of the sliced snapshot under way; its bytes once it is
    /// complete (the next update log follows them). Errors when none is under way (another
    /// snapshot or a taken log ended it) or the update log overflowed meanwhile (too many
    /// changes for one snapshot's time): start again.
    pub fn snapshot_slice(&mut self, max_bytes: usize) -> Result<Option<Vec<u8>>> {
        if self.log.as_ref().is_some_and(|l| l.overflowed) {
            self.slicing = None;
            return Err(Error::Snapshot(format!(
                "the update log overflowed its cap of {} bytes while a snapshot was taken in slices: start it again",
                self.log_cap
            )));
        }
        let done = Slicing::next(
            &mut self.slicing,
            &self.maps,
            max_bytes,
            "no snapshot is being taken in slices (another snapshot or a taken log ended it): start it again",
        )?;
        Ok(done.map(|(out, crc)| {
            self.base = crc;
            out
        }))
    }

    /// Starts a copy of the maps as they are now for disk, taken in slices
    /// ([`MapSet::copy_slice`]) exactly as [`MapSet::begin_sliced_snapshot`] takes a
    /// snapshot, but leaving the update log, its chain and a snapshot under way alone (a copy
    /// kept on disk must not break a standby's stream). Another copy ends it.
    pub fn begin_sliced_copy(&mut self) {
        self.copying = Some(Slicing::new(&self.maps));
    }

    /// Copies about `max_bytes` more of the copy for disk under way; its bytes (a snapshot, as
    /// [`MapSet::encode`] gave when the copy began) once it is complete. Errors when none is
    /// under way (the maps were replaced meanwhile): start again.
    pub fn copy_slice(&mut self, max_bytes: usize) -> Result<Option<Vec<u8>>> {
        let done = Slicing::next(
            &mut self.copying,
            &self.maps,
            max_bytes,
            "no copy of the maps is being taken in slices (the maps were replaced): start it again",
        )?;
        Ok(done.map(|(out, _)| out))
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
                    let (rc, _) = map.update(&e[..ks], &e[ks..], update_flags::NOEXIST);
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
        if self.slicing.is_some() {
            return Err(Error::Snapshot(
                "a snapshot is being taken in slices: the log follows it once it is complete"
                    .into(),
            ));
        }
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
        let crc = seal(&mut out);
        log.buf.clear();
        log.count = 0;
        self.base = crc;
        Ok(out)
    }

    /// Applies an update log taken right after the snapshot or log this set was restored from
    /// (checked through the chained checksums). Validates the log's framing and map ids
    /// before changing anything; an update that fails in the replay (a map here smaller than
    /// the sender's, full) leaves the maps at a prefix of the log, a past state of the
    /// sender's, and the set at its old checksum, so no later log applies until a snapshot
    /// sets it right (the error says to resync).
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
                self.note_change(id, &e[..ks]);
                let (rc, _) = self.maps[id].update(&e[..ks], &e[ks..], update_flags::ANY);
                if rc != crate::abi::code::OK {
                    return Err(Error::Snapshot(format!(
                        "map `{}`: replaying an update failed with code {rc}",
                        self.maps[id].def().name
                    )));
                }
            } else {
                let k = r.take(ks, "delete entry")?;
                self.note_change(id, k);
                self.maps[id].delete(k);
            }
        }
        self.base = crc;
        Ok(count)
    }
}
