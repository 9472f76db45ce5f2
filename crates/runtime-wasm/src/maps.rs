//! Runtime-owned VNF state: hash, array and LRU-hash maps with fixed key and value sizes and a
//! fixed capacity, plus the log of updates since the last snapshot. Storage is flat and
//! reserved up front, so map operations on the packet path do not allocate (except the update
//! log, which grows amortised while enabled, up to a cap proportional to the maps' budget).
//! Owns the memory accounting of maps ([`MapDef::budget_bytes`], [`Map::heap_bytes`]): a map
//! never holds more heap than its budget. Encoding lives in `snapshot`.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use serde::{Deserialize, Serialize};

use crate::abi::{code, update_flags};
use crate::error::{Error, Result};

/// Largest key or value size in bytes.
pub const MAX_KV_SIZE: u32 = 1024;
/// Largest `max_entries` of one map.
pub const MAX_ENTRIES: u32 = 1 << 24;

/// Heap bytes per entry a map may use besides its key and value; see [`MapDef::budget_bytes`].
///
/// Covers the bookkeeping of [`Map`] at its worst: the hashbrown table of `u32` slot indices
/// (4 bytes and one control byte per bucket, buckets a power of two at most 7/8 full, so up to
/// 16/7 buckets per entry, and one doubling when deletions leave tombstones: 22.9 bytes), the
/// live flag (1), the free-slot list (4) and the LRU links (8): 36 bytes per entry for large
/// maps. Small tables pay hashbrown's minimum of 4 buckets plus 16 control bytes, the worst
/// being a one-entry LRU map at 49 bytes besides its key and value. 64 covers both with room.
/// Per-map fixed costs (the `Map` struct itself, allocator headers) are not per entry and
/// belong to the fixed overhead of an instance. The control plane admits VNFs with the same
/// formula and the same value.
pub const MAP_ENTRY_OVERHEAD_BYTES: u64 = 64;

/// Smallest cap of the update log, for VNFs whose maps are tiny.
pub const MIN_LOG_CAP: usize = 64 << 10;

/// Kind of map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MapKind {
    /// Hash map; inserts fail with `E2BIG` when full.
    Hash,
    /// Array indexed by a little-endian `u32` key (key_size 4); all entries exist, zeroed.
    Array,
    /// Hash map that evicts the least recently used entry when full.
    LruHash,
}

impl MapKind {
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            Self::Hash => 1,
            Self::Array => 2,
            Self::LruHash => 3,
        }
    }
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Hash),
            2 => Some(Self::Array),
            3 => Some(Self::LruHash),
            _ => None,
        }
    }
}

/// Definition of one map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapDef {
    pub name: String,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl MapDef {
    /// Checks sizes and name; the error names the field and the valid range.
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > 64 {
            return Err(format!("name `{}`: must be 1..=64 bytes", self.name));
        }
        if self.key_size == 0 || self.key_size > MAX_KV_SIZE {
            return Err(format!(
                "key_size {}: must be 1..={MAX_KV_SIZE}",
                self.key_size
            ));
        }
        if self.value_size == 0 || self.value_size > MAX_KV_SIZE {
            return Err(format!(
                "value_size {}: must be 1..={MAX_KV_SIZE}",
                self.value_size
            ));
        }
        if self.max_entries == 0 || self.max_entries > MAX_ENTRIES {
            return Err(format!(
                "max_entries {}: must be 1..={MAX_ENTRIES}",
                self.max_entries
            ));
        }
        if self.kind == MapKind::Array && self.key_size != 4 {
            return Err(format!(
                "key_size {}: an array map's key is a u32 index, key_size must be 4",
                self.key_size
            ));
        }
        Ok(())
    }

    /// Heap bytes this map may use at most:
    /// `(key_size + value_size + MAP_ENTRY_OVERHEAD_BYTES) * max_entries`. Every kind stays
    /// within it whatever the module does (array maps hold only their values).
    pub fn budget_bytes(&self) -> u64 {
        (u64::from(self.key_size) + u64::from(self.value_size) + MAP_ENTRY_OVERHEAD_BYTES)
            * u64::from(self.max_entries)
    }

    /// Same name, kind, key and value sizes (capacity may differ).
    pub fn layout_eq(&self, other: &MapDef) -> bool {
        self.name == other.name
            && self.kind == other.kind
            && self.key_size == other.key_size
            && self.value_size == other.value_size
    }
}

/// No slot: the end of an LRU map's recency list.
pub(crate) const NIL: u32 = u32::MAX;

/// One map with flat, preallocated storage.
#[derive(Clone)]
pub struct Map {
    def: MapDef,
    ks: usize,
    vs: usize,
    keys: Vec<u8>,
    values: Vec<u8>,
    live: Vec<bool>,
    table: HashTable<u32>,
    free: Vec<u32>,
    len: usize,
    // LRU list over slots: `head` is the most recently used.
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    hasher: hashbrown::DefaultHashBuilder,
}

/// What an update did besides inserting: an LRU eviction to be logged.
pub(crate) enum Evicted {
    None,
    Yes,
}

impl Map {
    /// Creates an empty map (arrays: all entries zero). The definition must be checked.
    pub fn new(def: MapDef) -> Self {
        let ks = def.key_size as usize;
        let vs = def.value_size as usize;
        let n = def.max_entries as usize;
        let mut m = Self {
            ks,
            vs,
            keys: Vec::new(),
            values: Vec::new(),
            live: Vec::new(),
            table: HashTable::new(),
            free: Vec::new(),
            len: 0,
            prev: Vec::new(),
            next: Vec::new(),
            head: NIL,
            tail: NIL,
            hasher: hashbrown::DefaultHashBuilder::default(),
            def,
        };
        match m.def.kind {
            MapKind::Array => {
                m.values = vec![0; n * vs];
                m.len = n;
            }
            MapKind::Hash | MapKind::LruHash => {
                m.keys.reserve_exact(n * ks);
                m.values.reserve_exact(n * vs);
                m.live.reserve_exact(n);
                // At most `n` slots exist, so the free list never holds more than `n`.
                m.free.reserve_exact(n);
                m.table = HashTable::with_capacity(n);
                if m.def.kind == MapKind::LruHash {
                    m.prev.reserve_exact(n);
                    m.next.reserve_exact(n);
                }
            }
        }
        m
    }

    /// The definition.
    pub fn def(&self) -> &MapDef {
        &self.def
    }

    /// Number of entries (arrays: `max_entries`).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the map holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes this map holds now (allocated capacities, touched or not); never more than
    /// `def().budget_bytes()`.
    pub fn heap_bytes(&self) -> u64 {
        let bytes = self.keys.capacity()
            + self.values.capacity()
            + self.live.capacity() * size_of::<bool>()
            + self.free.capacity() * size_of::<u32>()
            + (self.prev.capacity() + self.next.capacity()) * size_of::<u32>()
            + self.table.allocation_size();
        bytes as u64
    }

    /// Which slots of a hash map hold an entry (the others are free).
    pub(crate) fn live_slots(&self) -> &[bool] {
        &self.live
    }

    /// The entry in `slot` of a hash map, if one lives there.
    pub(crate) fn slot_entry(&self, slot: usize) -> Option<(&[u8], &[u8])> {
        let s = u32::try_from(slot).ok()?;
        (*self.live.get(slot)?).then(|| (self.key_at(s), self.value_at(s)))
    }

    fn key_at(&self, slot: u32) -> &[u8] {
        let s = slot as usize * self.ks;
        &self.keys[s..s + self.ks]
    }

    fn value_at(&self, slot: u32) -> &[u8] {
        let s = slot as usize * self.vs;
        &self.values[s..s + self.vs]
    }

    /// The slot of `key` in a hash map, if it holds it.
    pub(crate) fn slot_of(&self, key: &[u8]) -> Option<usize> {
        if key.len() != self.ks || self.def.kind == MapKind::Array {
            return None;
        }
        self.find(key).map(|s| s as usize)
    }

    fn find(&self, key: &[u8]) -> Option<u32> {
        let h = self.hasher.hash_one(key);
        let ks = self.ks;
        let keys = &self.keys;
        self.table
            .find(h, |&s| &keys[s as usize * ks..(s as usize + 1) * ks] == key)
            .copied()
    }

    /// The index `key` names in an array map, if it is one of its indices.
    pub(crate) fn array_index(&self, key: &[u8]) -> Option<usize> {
        let idx = u32::from_le_bytes(key.try_into().ok()?) as usize;
        (idx < self.def.max_entries as usize).then_some(idx)
    }

    fn lru_unlink(&mut self, s: u32) {
        let (p, n) = (self.prev[s as usize], self.next[s as usize]);
        if p != NIL {
            self.next[p as usize] = n;
        } else {
            self.head = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        } else {
            self.tail = p;
        }
    }

    fn lru_push_front(&mut self, s: u32) {
        self.prev[s as usize] = NIL;
        self.next[s as usize] = self.head;
        if self.head != NIL {
            self.prev[self.head as usize] = s;
        }
        self.head = s;
        if self.tail == NIL {
            self.tail = s;
        }
    }

    /// Looks a key up (LRU: marks it most recently used). `key.len()` must equal `key_size`.
    pub fn lookup(&mut self, key: &[u8]) -> Option<&[u8]> {
        if key.len() != self.ks {
            return None;
        }
        match self.def.kind {
            MapKind::Array => {
                let i = self.array_index(key)?;
                Some(&self.values[i * self.vs..(i + 1) * self.vs])
            }
            MapKind::Hash => {
                let s = self.find(key)?;
                Some(self.value_at(s))
            }
            MapKind::LruHash => {
                let s = self.find(key)?;
                if self.head != s {
                    self.lru_unlink(s);
                    self.lru_push_front(s);
                }
                Some(self.value_at(s))
            }
        }
    }

    /// Reads without touching LRU order.
    pub fn peek(&self, key: &[u8]) -> Option<&[u8]> {
        if key.len() != self.ks {
            return None;
        }
        match self.def.kind {
            MapKind::Array => {
                let i = self.array_index(key)?;
                Some(&self.values[i * self.vs..(i + 1) * self.vs])
            }
            MapKind::Hash | MapKind::LruHash => self.find(key).map(|s| self.value_at(s)),
        }
    }

    /// Inserts or replaces; returns an ABI code (`code::OK` on success).
    pub(crate) fn update(&mut self, key: &[u8], value: &[u8], flags: i32) -> (i32, Evicted) {
        if key.len() != self.ks || value.len() != self.vs {
            return (code::EINVAL, Evicted::None);
        }
        if !(update_flags::ANY..=update_flags::EXIST).contains(&flags) {
            return (code::EINVAL, Evicted::None);
        }
        if self.def.kind == MapKind::Array {
            let Some(i) = self.array_index(key) else {
                return (code::EINVAL, Evicted::None);
            };
            if flags == update_flags::NOEXIST {
                return (code::EEXIST, Evicted::None);
            }
            self.values[i * self.vs..(i + 1) * self.vs].copy_from_slice(value);
            return (code::OK, Evicted::None);
        }
        if let Some(s) = self.find(key) {
            if flags == update_flags::NOEXIST {
                return (code::EEXIST, Evicted::None);
            }
            let vs = self.vs;
            self.values[s as usize * vs..(s as usize + 1) * vs].copy_from_slice(value);
            if self.def.kind == MapKind::LruHash && self.head != s {
                self.lru_unlink(s);
                self.lru_push_front(s);
            }
            return (code::OK, Evicted::None);
        }
        if flags == update_flags::EXIST {
            return (code::ENOENT, Evicted::None);
        }
        let mut evicted = Evicted::None;
        if self.len >= self.def.max_entries as usize {
            if self.def.kind != MapKind::LruHash {
                return (code::E2BIG, Evicted::None);
            }
            let victim = self.tail;
            evicted = Evicted::Yes;
            self.remove_slot(victim);
        }
        let slot = match self.free.pop() {
            Some(s) => {
                let (ks, vs) = (self.ks, self.vs);
                self.keys[s as usize * ks..(s as usize + 1) * ks].copy_from_slice(key);
                self.values[s as usize * vs..(s as usize + 1) * vs].copy_from_slice(value);
                self.live[s as usize] = true;
                s
            }
            None => {
                let s = self.live.len() as u32;
                self.keys.extend_from_slice(key);
                self.values.extend_from_slice(value);
                self.live.push(true);
                if self.def.kind == MapKind::LruHash {
                    self.prev.push(NIL);
                    self.next.push(NIL);
                }
                s
            }
        };
        let h = self.hasher.hash_one(key);
        let (ks, hasher, keys) = (self.ks, &self.hasher, &self.keys);
        self.table.insert_unique(h, slot, |&s| {
            hasher.hash_one(&keys[s as usize * ks..(s as usize + 1) * ks])
        });
        if self.def.kind == MapKind::LruHash {
            self.lru_push_front(slot);
        }
        self.len += 1;
        (code::OK, evicted)
    }

    fn remove_slot(&mut self, s: u32) {
        let h = self.hasher.hash_one(self.key_at(s));
        if let Ok(e) = self.table.find_entry(h, |&x| x == s) {
            e.remove();
        }
        if self.def.kind == MapKind::LruHash {
            self.lru_unlink(s);
        }
        self.live[s as usize] = false;
        self.free.push(s);
        self.len -= 1;
    }

    /// Deletes a key; returns an ABI code.
    pub fn delete(&mut self, key: &[u8]) -> i32 {
        if key.len() != self.ks || self.def.kind == MapKind::Array {
            return code::EINVAL;
        }
        match self.find(key) {
            Some(s) => {
                self.remove_slot(s);
                code::OK
            }
            None => code::ENOENT,
        }
    }

    /// The key an insert of `key` would evict (LRU map full and `key` absent).
    pub(crate) fn lru_victim(&self, key: &[u8]) -> Option<&[u8]> {
        self.lru_victim_slot(key).map(|s| self.key_at(s as u32))
    }

    /// The slot an insert of `key` would evict (LRU map full and `key` absent).
    pub(crate) fn lru_victim_slot(&self, key: &[u8]) -> Option<usize> {
        if self.def.kind != MapKind::LruHash
            || self.len < self.def.max_entries as usize
            || self.tail == NIL
            || key.len() != self.ks
            || self.find(key).is_some()
        {
            return None;
        }
        Some(self.tail as usize)
    }

    /// An LRU map's recency list: its least recently used slot ([`NIL`] when empty) and, for
    /// each slot, the next more recently used one.
    pub(crate) fn lru_links(&self) -> (u32, &[u32]) {
        (self.tail, &self.prev)
    }

    /// Visits every entry: arrays in index order (key = LE index), LRU maps from least to most
    /// recently used, hash maps in slot order.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8])) {
        match self.def.kind {
            MapKind::Array => {
                for i in 0..self.def.max_entries {
                    f(&i.to_le_bytes(), self.value_at(i));
                }
            }
            MapKind::Hash => {
                for (s, live) in self.live.iter().enumerate() {
                    if *live {
                        f(self.key_at(s as u32), self.value_at(s as u32));
                    }
                }
            }
            MapKind::LruHash => {
                let mut s = self.tail;
                while s != NIL {
                    f(self.key_at(s), self.value_at(s));
                    s = self.prev[s as usize];
                }
            }
        }
    }

    /// All entries as owned pairs, sorted by key for hash maps (for comparisons and tools);
    /// LRU maps keep recency order, arrays index order.
    pub fn entries(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut v = Vec::with_capacity(self.len);
        self.for_each(|k, val| v.push((k.to_vec(), val.to_vec())));
        if self.def.kind == MapKind::Hash {
            v.sort();
        }
        v
    }

    /// Raw value storage of an array map (index order).
    pub(crate) fn array_values(&self) -> &[u8] {
        &self.values
    }

    pub(crate) fn array_values_mut(&mut self) -> &mut [u8] {
        &mut self.values
    }
}

/// Log of updates since the last snapshot (or last taken log).
pub(crate) struct UpdateLog {
    /// Encoded entries; its capacity never exceeds the set's `log_cap`.
    pub(crate) buf: Vec<u8>,
    /// Updates since the last snapshot or taken log; equals the entries in `buf` unless
    /// `overflowed`.
    pub(crate) count: u64,
    /// The log outgrew its cap: `buf` was freed and the next delta must be a full snapshot.
    pub(crate) overflowed: bool,
}

impl UpdateLog {
    pub(crate) fn new() -> Self {
        Self {
            buf: Vec::new(),
            count: 0,
            overflowed: false,
        }
    }
}

/// Operation tags in the update log.
pub(crate) const LOG_UPDATE: u8 = 1;
pub(crate) const LOG_DELETE: u8 = 2;

impl MapSet {
    /// Restarts the update log from this point (a sliced snapshot under way ends).
    pub(crate) fn restart_log(&mut self) {
        self.log = Some(UpdateLog::new());
        self.slicing = None;
    }
}

/// What [`MapSet::change`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapChanged {
    /// Keys removed (those of `delete` the map held).
    pub deleted: u64,
    /// Entries inserted or replaced.
    pub put: u64,
    /// Entries the map holds after the change (an array: always its `max_entries`).
    pub entries: u64,
}

/// All maps of one VNF, addressed by id (index in the manifest's map list).
pub struct MapSet {
    pub(crate) maps: Vec<Map>,
    pub(crate) log: Option<UpdateLog>,
    /// A snapshot being taken in slices (see [`MapSet::begin_sliced_snapshot`]).
    pub(crate) slicing: Option<crate::snapshot::Slicing>,
    /// A copy for disk being taken in slices (see [`MapSet::begin_sliced_copy`]).
    pub(crate) copying: Option<crate::snapshot::Slicing>,
    /// Checksum of the last snapshot or log this set was written to / restored from.
    pub(crate) base: u32,
    /// Largest update log in bytes before it overflows (then a new snapshot is needed); see
    /// [`MapSet::log_cap`].
    pub(crate) log_cap: usize,
    /// Successful updates and deletes since the set was made: tells a reader of snapshots
    /// whether anything changed since its last one without touching the update log.
    changes: u64,
    /// While a new version of the module starts on these maps ([`MapSet::keep_originals`]):
    /// each map as it was before its first change (or, for an LRU map, its first lookup, which
    /// reorders it), so a start that fails can hand the maps back untouched.
    originals: Option<Vec<Option<Map>>>,
    scratch: Vec<u8>,
}

/// Largest cap of the update log, whatever the maps' budget.
pub const DEFAULT_LOG_CAP: usize = 64 << 20;

/// The update-log cap for maps of these definitions: the payload of a full snapshot of them
/// (`max_entries * (key_size + value_size)` summed), at least [`MIN_LOG_CAP`] and at most
/// [`DEFAULT_LOG_CAP`]. A log bigger than a snapshot is never worth keeping: the snapshot is
/// smaller. Being below the maps' total `budget_bytes`, the maps and their log together hold at
/// most twice that budget (or the budget plus [`MIN_LOG_CAP`]).
pub fn log_cap(defs: &[MapDef]) -> usize {
    let snapshot: u64 = defs
        .iter()
        .map(|d| u64::from(d.max_entries) * (u64::from(d.key_size) + u64::from(d.value_size)))
        .sum();
    usize::try_from(snapshot)
        .unwrap_or(usize::MAX)
        .clamp(MIN_LOG_CAP, DEFAULT_LOG_CAP)
}

impl MapSet {
    /// Creates empty maps; every definition is checked.
    pub fn new(defs: &[MapDef]) -> Result<Self> {
        for (i, d) in defs.iter().enumerate() {
            d.check()
                .map_err(|e| Error::Map(format!("maps[{i}]: {e}")))?;
            if defs[..i].iter().any(|o| o.name == d.name) {
                return Err(Error::Map(format!(
                    "maps[{i}]: duplicate name `{}`",
                    d.name
                )));
            }
        }
        Ok(Self {
            maps: defs.iter().cloned().map(Map::new).collect(),
            log: None,
            slicing: None,
            copying: None,
            base: 0,
            log_cap: log_cap(defs),
            changes: 0,
            originals: None,
            scratch: Vec::with_capacity(MAX_KV_SIZE as usize),
        })
    }

    /// Definitions in id order.
    pub fn defs(&self) -> Vec<MapDef> {
        self.maps.iter().map(|m| m.def.clone()).collect()
    }

    /// Map by id.
    pub fn get(&self, id: usize) -> Option<&Map> {
        self.maps.get(id)
    }

    /// Map by name.
    pub fn by_name(&self, name: &str) -> Option<&Map> {
        self.maps.get(self.id_of(name)?)
    }

    /// The id of the map named `name`.
    pub fn id_of(&self, name: &str) -> Option<usize> {
        self.maps.iter().position(|m| m.def.name == name)
    }

    /// Number of maps.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether there is no map.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// A control-plane change of map `name` (a rule or a bearer provisioned): the keys of
    /// `delete` removed, then the entries of `put` inserted or replaced, all or nothing. Every
    /// key and value is checked against the map's sizes, and a hash map's room against what
    /// the change would leave, before anything changes; logged like the module's own updates
    /// (a standby or a move's destination follows).
    pub fn change(
        &mut self,
        name: &str,
        delete: &[Vec<u8>],
        put: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<MapChanged> {
        let invalid = |field: &str, reason: String| Error::InvalidChange {
            field: field.to_owned(),
            reason,
        };
        let Some(id) = self.id_of(name) else {
            let names: Vec<&str> = self.maps.iter().map(|m| m.def.name.as_str()).collect();
            let has = if names.is_empty() {
                "no maps".to_owned()
            } else {
                format!("the maps {}", names.join(", "))
            };
            return Err(invalid(
                "map",
                format!("no map named `{name}`; this VNF has {has}"),
            ));
        };
        let m = &self.maps[id];
        let (ks, vs, kind, max) = (m.ks, m.vs, m.def.kind, m.def.max_entries);
        if kind == MapKind::Array && !delete.is_empty() {
            return Err(invalid(
                "delete",
                format!(
                    "map `{name}` is an array: its {max} entries always exist; put zeroes instead"
                ),
            ));
        }
        let check_key = |field: &str, key: &[u8]| -> Result<()> {
            if key.len() != ks {
                return Err(invalid(
                    field,
                    format!(
                        "{} bytes; the keys of map `{name}` are {ks} bytes",
                        key.len()
                    ),
                ));
            }
            if kind == MapKind::Array && m.array_index(key).is_none() {
                return Err(invalid(
                    field,
                    format!(
                        "past the {max} entries of array `{name}` (its keys are little-endian indices)"
                    ),
                ));
            }
            Ok(())
        };
        for (i, k) in delete.iter().enumerate() {
            check_key(&format!("delete[{i}]"), k)?;
        }
        for (i, (k, v)) in put.iter().enumerate() {
            check_key(&format!("put[{i}].key"), k)?;
            if v.len() != vs {
                return Err(invalid(
                    &format!("put[{i}].value"),
                    format!(
                        "{} bytes; the values of map `{name}` are {vs} bytes",
                        v.len()
                    ),
                ));
            }
        }
        if kind == MapKind::Hash {
            let gone: std::collections::HashSet<&[u8]> = delete
                .iter()
                .map(Vec::as_slice)
                .filter(|k| m.peek(k).is_some())
                .collect();
            let added: std::collections::HashSet<&[u8]> = put
                .iter()
                .map(|(k, _)| k.as_slice())
                .filter(|k| m.peek(k).is_none() || gone.contains(k))
                .collect();
            let after = m.len() - gone.len() + added.len();
            if after > max as usize {
                return Err(invalid(
                    "put",
                    format!(
                        "map `{name}` holds {} of its {max} entries and this change would leave {after}: delete entries first, or raise its max_entries in the descriptor",
                        m.len()
                    ),
                ));
            }
        }
        let mut changed = MapChanged::default();
        for k in delete {
            if self.delete(id, k) == code::OK {
                changed.deleted += 1;
            }
        }
        for (k, v) in put {
            let rc = self.update(id, k, v, update_flags::ANY);
            if rc != code::OK {
                return Err(Error::Map(format!(
                    "map `{name}`: an update checked beforehand failed with code {rc}"
                )));
            }
            changed.put += 1;
        }
        changed.entries = u64::try_from(self.maps[id].len()).unwrap_or(u64::MAX);
        Ok(changed)
    }

    /// Looks up a key in map `id`.
    pub fn lookup(&mut self, id: usize, key: &[u8]) -> Option<&[u8]> {
        if self.maps.get(id)?.def.kind == MapKind::LruHash {
            self.keep_original(id);
        }
        self.maps.get_mut(id)?.lookup(key)
    }

    /// From now on each map is copied whole before its first change (an LRU map before its
    /// first lookup too), so that [`MapSet::into_originals`] gives back the maps as they are
    /// now: a new version's `tv_init` that fails must not leave its writes in the maps of the
    /// version that keeps running. Maps it never touches cost nothing.
    pub(crate) fn keep_originals(&mut self) {
        self.originals = Some(vec![None; self.maps.len()]);
    }

    /// The start went well: the copies kept since [`MapSet::keep_originals`] are dropped.
    pub(crate) fn forget_originals(&mut self) {
        self.originals = None;
    }

    /// The maps as they were when [`MapSet::keep_originals`] was called (as they are now
    /// where nothing changed them since).
    pub(crate) fn into_originals(self) -> Vec<Map> {
        let mut originals = self.originals.unwrap_or_default();
        self.maps
            .into_iter()
            .enumerate()
            .map(|(i, m)| originals.get_mut(i).and_then(Option::take).unwrap_or(m))
            .collect()
    }

    /// Counts on from `before`'s changes (a set carried into a new version of its module is
    /// the same state: a reader comparing counts must see what changes after it).
    pub(crate) fn count_changes_on_from(&mut self, before: &MapSet) {
        self.changes = before.changes;
    }

    fn keep_original(&mut self, id: usize) {
        if let Some(originals) = self.originals.as_mut()
            && let Some(slot @ None) = originals.get_mut(id)
            && let Some(m) = self.maps.get(id)
        {
            *slot = Some(m.clone());
        }
    }

    /// Before `key` of map `id` changes: a sliced snapshot or copy under way saves the entry
    /// as it was if its slot was not copied yet.
    pub(crate) fn note_change(&mut self, id: usize, key: &[u8]) {
        self.keep_original(id);
        let Some(m) = self.maps.get(id) else {
            return;
        };
        for sl in [self.slicing.as_mut(), self.copying.as_mut()]
            .into_iter()
            .flatten()
        {
            sl.before_change(id, m, key);
        }
    }

    /// Updates map `id`; returns an ABI code. Logged when the update log is on.
    pub fn update(&mut self, id: usize, key: &[u8], value: &[u8], flags: i32) -> i32 {
        self.note_change(id, key);
        let Some(m) = self.maps.get_mut(id) else {
            return code::EINVAL;
        };
        let logging = self.log.as_ref().is_some_and(|l| !l.overflowed);
        if logging && let Some(victim) = m.lru_victim(key) {
            self.scratch.clear();
            self.scratch.extend_from_slice(victim);
        } else {
            self.scratch.clear();
        }
        let (rc, ev) = m.update(key, value, flags);
        if rc == code::OK {
            self.changes += 1;
        }
        if rc == code::OK
            && let Some(log) = self.log.as_mut()
        {
            if matches!(ev, Evicted::Yes) && !self.scratch.is_empty() {
                log_op(log, self.log_cap, LOG_DELETE, id, &self.scratch, None);
            }
            log_op(log, self.log_cap, LOG_UPDATE, id, key, Some(value));
        }
        rc
    }

    /// Deletes a key from map `id`; returns an ABI code. Logged when the update log is on.
    pub fn delete(&mut self, id: usize, key: &[u8]) -> i32 {
        self.note_change(id, key);
        let Some(m) = self.maps.get_mut(id) else {
            return code::EINVAL;
        };
        let rc = m.delete(key);
        if rc == code::OK {
            self.changes += 1;
        }
        if rc == code::OK
            && let Some(log) = self.log.as_mut()
        {
            log_op(log, self.log_cap, LOG_DELETE, id, key, None);
        }
        rc
    }

    /// Successful updates and deletes since this set was made (restored sets count from 0; a set
    /// carried into a new version of its module counts on).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Number of updates since the last snapshot or taken log (None when not logging), counted
    /// also after the log overflowed.
    pub fn logged_updates(&self) -> Option<u64> {
        self.log.as_ref().map(|l| l.count)
    }

    /// Whether the update log outgrew its cap since the last snapshot: the next delta must be a
    /// full snapshot (`take_log` refuses until then).
    pub fn log_overflowed(&self) -> bool {
        self.log.as_ref().is_some_and(|l| l.overflowed)
    }

    /// Largest update log in bytes this set keeps (see [`log_cap`]).
    pub fn log_cap(&self) -> usize {
        self.log_cap
    }

    /// Heap bytes held by the update log now (at most [`MapSet::log_cap`]).
    pub fn log_heap_bytes(&self) -> u64 {
        self.log.as_ref().map_or(0, |l| l.buf.capacity() as u64)
    }

    /// Heap bytes held by the maps and the update log now.
    pub fn heap_bytes(&self) -> u64 {
        self.maps.iter().map(Map::heap_bytes).sum::<u64>() + self.log_heap_bytes()
    }

    /// Checks that maps of `old` can be carried into `new`: same name means same kind, key and
    /// value size, and enough capacity for the entries held. Errors name the map.
    pub fn check_carry_over(&self, new: &[MapDef]) -> Result<()> {
        for d in new {
            let Some(om) = self.by_name(&d.name) else {
                continue;
            };
            if !om.def.layout_eq(d) {
                return Err(Error::Map(format!(
                    "map `{}` changes layout from {:?}/{}/{} to {:?}/{}/{} (kind/key_size/value_size): state cannot be carried over",
                    d.name,
                    om.def.kind,
                    om.def.key_size,
                    om.def.value_size,
                    d.kind,
                    d.key_size,
                    d.value_size
                )));
            }
            if d.kind != MapKind::Array && om.len() > d.max_entries as usize {
                return Err(Error::Map(format!(
                    "map `{}` holds {} entries, more than the new max_entries {}",
                    d.name,
                    om.len(),
                    d.max_entries
                )));
            }
        }
        Ok(())
    }

    /// Builds a set for `defs` from a pool of maps: a map of the same name is moved in (or its
    /// entries copied when the capacity differs, the map itself staying in the pool; arrays
    /// keep the common prefix); other maps start empty. Returns the set and the maps of the
    /// pool not moved in. Call `check_carry_over` first: entries that do not fit are dropped.
    pub(crate) fn carry_over(pool: Vec<Map>, defs: &[MapDef]) -> Result<(MapSet, Vec<Map>)> {
        let mut fresh = MapSet::new(defs)?;
        let mut pool: Vec<Option<Map>> = pool.into_iter().map(Some).collect();
        for (i, d) in defs.iter().enumerate() {
            let Some(slot) = pool
                .iter_mut()
                .find(|m| m.as_ref().is_some_and(|m| m.def.layout_eq(d)))
            else {
                continue;
            };
            if slot
                .as_ref()
                .is_some_and(|m| m.def.max_entries == d.max_entries)
            {
                if let Some(om) = slot.take() {
                    fresh.maps[i] = om;
                }
                continue;
            }
            let Some(om) = slot.as_ref() else {
                continue;
            };
            let target = &mut fresh.maps[i];
            if d.kind == MapKind::Array {
                let n = om.array_values().len().min(target.array_values().len());
                target.array_values_mut()[..n].copy_from_slice(&om.array_values()[..n]);
            } else {
                om.for_each(|k, v| {
                    let _ = target.update(k, v, update_flags::ANY);
                });
            }
        }
        Ok((fresh, pool.into_iter().flatten().collect()))
    }

    /// The maps of `pool` whose definitions are exactly `defs`, in their order: a set whose
    /// new version failed to start taken back from what it was handed and what stayed behind.
    /// An error names a definition with no such map (nothing else is lost: the pool is
    /// consumed either way).
    pub(crate) fn exactly(pool: Vec<Map>, defs: &[MapDef]) -> Result<Vec<Map>> {
        let mut pool: Vec<Option<Map>> = pool.into_iter().map(Some).collect();
        defs.iter()
            .map(|d| {
                pool.iter_mut()
                    .find(|m| m.as_ref().is_some_and(|m| m.def == *d))
                    .and_then(Option::take)
                    .ok_or_else(|| Error::Map(format!("map `{}` was not handed back", d.name)))
            })
            .collect()
    }

    /// Takes the maps out, leaving the set empty (log and base stay). A sliced snapshot or
    /// copy of them under way ends: maps put back are laid out anew.
    pub(crate) fn take_maps(&mut self) -> Vec<Map> {
        self.slicing = None;
        self.copying = None;
        std::mem::take(&mut self.maps)
    }
}

pub(crate) fn log_op(
    log: &mut UpdateLog,
    cap: usize,
    op: u8,
    id: usize,
    key: &[u8],
    value: Option<&[u8]>,
) {
    log.count += 1;
    if log.overflowed {
        return;
    }
    let need = 3 + key.len() + value.map_or(0, <[u8]>::len);
    let len = log.buf.len();
    if len + need > cap {
        // Past the cap a snapshot is cheaper than the log: free it and require one.
        log.overflowed = true;
        log.buf = Vec::new();
        return;
    }
    if log.buf.capacity() < len + need {
        // Grow by doubling, but never past the cap (plain `Vec` growth could reach twice it).
        let target = (log.buf.capacity() * 2).max(len + need).max(4096).min(cap);
        log.buf.reserve_exact(target - len);
    }
    log.buf.push(op);
    log.buf.extend_from_slice(&(id as u16).to_le_bytes());
    log.buf.extend_from_slice(key);
    if let Some(v) = value {
        log.buf.extend_from_slice(v);
    }
}
