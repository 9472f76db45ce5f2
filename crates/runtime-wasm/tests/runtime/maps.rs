//! Runtime-owned maps: semantics of each kind, snapshot format checks, update log, and the
//! pinned worker thread.

use crate::common;

use common::*;
use telvirt_runtime_wasm::abi::code;
use telvirt_runtime_wasm::worker::Worker;
use telvirt_runtime_wasm::{Error, MapDef, MapKind, MapSet, PacketBatch, Verdict, VnfConfig};

fn def(name: &str, kind: MapKind, ks: u32, vs: u32, max: u32) -> MapDef {
    MapDef {
        name: name.into(),
        kind,
        key_size: ks,
        value_size: vs,
        max_entries: max,
    }
}

fn k(i: u32) -> [u8; 4] {
    i.to_le_bytes()
}

/// A small deterministic generator from `seed` (xorshift): each call gives a number below its
/// argument, the same ones every run.
fn below(mut seed: u64) -> impl FnMut(u32) -> u32 {
    move |n: u32| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % u64::from(n)) as u32
    }
}

#[test]
fn hash_array_and_lru_semantics() {
    let mut s = MapSet::new(&[
        def("h", MapKind::Hash, 4, 4, 2),
        def("a", MapKind::Array, 4, 4, 3),
        def("l", MapKind::LruHash, 4, 4, 2),
    ])
    .expect("maps");
    assert_eq!(s.update(0, &k(1), &k(10), 0), code::OK);
    assert_eq!(
        s.update(0, &k(1), &k(11), 1),
        code::EEXIST,
        "NOEXIST on existing key"
    );
    assert_eq!(
        s.update(0, &k(2), &k(20), 2),
        code::ENOENT,
        "EXIST on absent key"
    );
    assert_eq!(s.update(0, &k(2), &k(20), 0), code::OK);
    assert_eq!(s.update(0, &k(3), &k(30), 0), code::E2BIG, "hash map full");
    assert_eq!(s.delete(0, &k(1)), code::OK);
    assert_eq!(s.delete(0, &k(1)), code::ENOENT);
    assert_eq!(s.update(0, &k(3), &k(30), 0), code::OK, "slot reused");
    assert_eq!(s.lookup(0, &k(3)), Some(&k(30)[..]));
    assert_eq!(s.update(0, &k(3), &k(1), 7), code::EINVAL, "bad flags");
    assert_eq!(s.update(9, &k(3), &k(1), 0), code::EINVAL, "bad map id");

    assert_eq!(
        s.lookup(1, &k(2)),
        Some(&[0u8; 4][..]),
        "arrays start zeroed"
    );
    assert_eq!(s.update(1, &k(2), &k(5), 0), code::OK);
    assert_eq!(
        s.update(1, &k(3), &k(5), 0),
        code::EINVAL,
        "index out of range"
    );
    assert_eq!(
        s.delete(1, &k(0)),
        code::EINVAL,
        "array entries cannot be deleted"
    );

    s.update(2, &k(1), &k(1), 0);
    s.update(2, &k(2), &k(2), 0);
    assert!(
        s.lookup(2, &k(1)).is_some(),
        "touch 1: 2 is now least recent"
    );
    assert_eq!(
        s.update(2, &k(3), &k(3), 0),
        code::OK,
        "LRU evicts instead of failing"
    );
    assert!(s.lookup(2, &k(2)).is_none(), "2 was evicted");
    let order: Vec<_> = s
        .get(2)
        .expect("lru")
        .entries()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        order,
        vec![k(1).to_vec(), k(3).to_vec()],
        "least recent first"
    );
}

#[test]
fn definitions_are_checked() {
    let err = MapSet::new(&[def("a", MapKind::Array, 8, 4, 4)])
        .err()
        .expect("array key 8");
    assert!(err.to_string().contains("key_size must be 4"), "{err}");
    let err = MapSet::new(&[def("h", MapKind::Hash, 0, 4, 4)])
        .err()
        .expect("key 0");
    assert!(err.to_string().contains("key_size 0"), "{err}");
    let err = MapSet::new(&[def("h", MapKind::Hash, 4, 4, 0)])
        .err()
        .expect("max 0");
    assert!(err.to_string().contains("max_entries 0"), "{err}");
    let err = MapSet::new(&[
        def("h", MapKind::Hash, 4, 4, 4),
        def("h", MapKind::Hash, 4, 4, 4),
    ])
    .err()
    .expect("duplicate");
    assert!(err.to_string().contains("duplicate"), "{err}");
}

#[test]
fn snapshot_roundtrip_and_refusals() {
    let defs = [
        def("h", MapKind::Hash, 4, 8, 100),
        def("a", MapKind::Array, 4, 2, 10),
        def("l", MapKind::LruHash, 4, 4, 3),
    ];
    let mut s = MapSet::new(&defs).expect("maps");
    for i in 0..50 {
        s.update(0, &k(i), &u64::from(i * 7).to_le_bytes(), 0);
    }
    s.update(1, &k(4), &[1, 2], 0);
    for i in 0..5 {
        s.update(2, &k(i), &k(i), 0);
    }
    let snap = s.snapshot();
    assert_eq!(&snap[..4], b"TVMS");
    assert_eq!(
        &snap[4..6],
        &1u16.to_le_bytes(),
        "format version 1, little-endian"
    );
    let r = MapSet::restore(&defs, &snap).expect("restore");
    for id in 0..3 {
        assert_eq!(
            r.get(id).expect("map").entries(),
            s.get(id).expect("map").entries(),
            "map {id}"
        );
    }
    // A larger capacity is fine; another layout is not.
    let mut bigger = defs.clone();
    bigger[0].max_entries = 1000;
    MapSet::restore(&bigger, &snap).expect("bigger capacity");
    let mut other = defs.clone();
    other[0].value_size = 4;
    let err = MapSet::restore(&other, &snap).err().expect("layout");
    assert!(err.to_string().contains("map 0: snapshot has `h`"), "{err}");
    let mut smaller = defs.clone();
    smaller[0].max_entries = 10;
    let err = MapSet::restore(&smaller, &snap)
        .err()
        .expect("too many entries");
    assert!(
        err.to_string().contains("50 entries exceed max_entries 10"),
        "{err}"
    );
    // Corruption, truncation, wrong version.
    let mut bad = snap.clone();
    bad[20] ^= 0x40;
    let err = MapSet::restore(&defs, &bad).err().expect("corrupt");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    let err = MapSet::restore(&defs, &snap[..snap.len() - 9])
        .err()
        .expect("truncated");
    assert!(matches!(err, Error::Snapshot(_)), "{err}");
    let mut v2 = snap.clone();
    v2[4] = 2;
    let body = v2.len() - 4;
    let crc = crc32(&v2[..body]);
    v2[body..].copy_from_slice(&crc.to_le_bytes());
    let err = MapSet::restore(&defs, &v2).err().expect("version");
    assert!(
        err.to_string()
            .contains("format version 2 is not supported"),
        "{err}"
    );
}

fn crc32(b: &[u8]) -> u32 {
    // Bitwise CRC-32 (IEEE), independent of the implementation under test.
    let mut c = !0u32;
    for &x in b {
        c ^= u32::from(x);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn lru_evictions_replay_on_a_standby() {
    let defs = [def("l", MapKind::LruHash, 4, 4, 4)];
    let mut a = MapSet::new(&defs).expect("maps");
    for i in 0..4 {
        a.update(0, &k(i), &k(i), 0);
    }
    let snap = a.snapshot();
    let mut b = MapSet::restore(&defs, &snap).expect("restore");
    // Lookups change recency on the active only; evictions are logged as deletes.
    a.lookup(0, &k(0));
    for i in 10..16 {
        a.update(0, &k(i), &k(i), 0);
    }
    a.delete(0, &k(15));
    assert_eq!(a.logged_updates(), Some(6 + 6 + 1));
    b.apply_log(&a.take_log().expect("log")).expect("apply");
    let sorted = |s: &MapSet| {
        let mut e = s.get(0).expect("map").entries();
        e.sort();
        e
    };
    assert_eq!(sorted(&a), sorted(&b));
}

#[test]
fn a_control_plane_change_is_checked_whole_before_anything_changes_and_is_logged() {
    let defs = [
        def("h", MapKind::Hash, 4, 8, 3),
        def("a", MapKind::Array, 4, 4, 2),
    ];
    let mut s = MapSet::new(&defs).expect("maps");
    let snap = s.snapshot();
    let mut standby = MapSet::restore(&defs, &snap).expect("restore");
    let put = |pairs: &[(u32, u64)]| -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs
            .iter()
            .map(|(key, v)| (k(*key).to_vec(), v.to_le_bytes().to_vec()))
            .collect()
    };
    let done = s.change("h", &[], &put(&[(1, 10), (2, 20)])).expect("put");
    assert_eq!((done.put, done.deleted, done.entries), (2, 0, 2));
    let entries = |s: &MapSet, id: usize| {
        let mut e = s.get(id).expect("map").entries();
        e.sort();
        e
    };
    let before = entries(&s, 0);
    // Each refusal names its field and why, and leaves the map as it was.
    let refused = |s: &mut MapSet, map: &str, del: &[Vec<u8>], p: &[(Vec<u8>, Vec<u8>)]| match s
        .change(map, del, p)
    {
        Err(Error::InvalidChange { field, reason }) => format!("{field}: {reason}"),
        other => panic!("{other:?}"),
    };
    let e = refused(&mut s, "nope", &[], &put(&[(3, 30)]));
    assert!(
        e.starts_with("map: no map named `nope`") && e.contains("h, a"),
        "{e}"
    );
    let mut bad_value = put(&[(3, 30), (4, 40)]);
    bad_value[1].1.pop();
    let e = refused(&mut s, "h", &[], &bad_value);
    assert_eq!(
        e,
        "put[1].value: 7 bytes; the values of map `h` are 8 bytes"
    );
    let e = refused(&mut s, "h", &[vec![1, 2]], &[]);
    assert_eq!(e, "delete[0]: 2 bytes; the keys of map `h` are 4 bytes");
    // Two new keys where one fits; a replaced key takes no room, a deleted one makes some.
    let e = refused(&mut s, "h", &[], &put(&[(2, 21), (3, 30), (4, 40)]));
    assert!(
        e.contains("holds 2 of its 3 entries and this change would leave 4"),
        "{e}"
    );
    assert_eq!(entries(&s, 0), before, "nothing changed");
    // 1 deleted and put again, 2 kept, 3 new: three, its max.
    let done = s
        .change("h", &[k(1).to_vec()], &put(&[(1, 11), (3, 30)]))
        .expect("a deleted key's room is taken again");
    assert_eq!((done.deleted, done.put, done.entries), (1, 2, 3));
    // An array's entries always exist: no delete, no index past its end.
    let e = refused(&mut s, "a", &[k(0).to_vec()], &[]);
    assert!(e.starts_with("delete: map `a` is an array"), "{e}");
    let e = refused(&mut s, "a", &[], &[(k(2).to_vec(), k(5).to_vec())]);
    assert!(
        e.starts_with("put[0].key: past the 2 entries of array `a`"),
        "{e}"
    );
    let done = s
        .change("a", &[], &[(k(1).to_vec(), k(5).to_vec())])
        .expect("array put");
    assert_eq!(done.entries, 2);
    // Logged like the module's updates: a standby following the log ends up the same.
    standby
        .apply_log(&s.take_log().expect("log"))
        .expect("apply");
    assert_eq!(entries(&standby, 0), entries(&s, 0));
    assert_eq!(entries(&standby, 1), entries(&s, 1));
}

#[test]
fn a_snapshot_in_slices_is_the_maps_as_they_were_when_it_began_and_its_log_follows_it() {
    let defs = [
        def("h", MapKind::Hash, 4, 4, 512),
        def("a", MapKind::Array, 4, 4, 300),
        def("l", MapKind::LruHash, 4, 4, 64),
    ];
    let mut next = below(0x2545_f491_4f6c_dd1d);
    for round in 0..20 {
        let mut s = MapSet::new(&defs).expect("maps");
        for i in 0..400 {
            s.update(0, &k(i), &k(i), 0);
        }
        for i in 0..100 {
            s.update(2, &k(i), &k(i), 0);
        }
        let at_begin = s.encode();
        s.begin_sliced_snapshot();
        let mut slices = 0;
        // Slices of 64 bytes (a few entries), each followed by changes: deletes, new keys
        // (into freed slots before or after the copy's position), replaced values.
        let snapshot = loop {
            if let Some(done) = s.snapshot_slice(64).expect("slice") {
                break done;
            }
            slices += 1;
            for _ in 0..next(8) {
                let key = k(next(600));
                match next(4) {
                    0 => {
                        s.delete(0, &key);
                    }
                    1 => {
                        s.update(1, &k(next(300)), &k(next(1000)), 0);
                    }
                    2 => {
                        s.update(2, &k(next(200)), &key, 0);
                    }
                    _ => {
                        s.update(0, &key, &k(next(1000) + round), 0);
                    }
                }
            }
        };
        assert!(slices > 10, "{slices} slices");
        // The maps as they were when it began (copy on write), in another order maybe.
        assert_eq!(
            sorted_entries(&defs, &snapshot),
            sorted_entries(&defs, &at_begin),
            "round {round}"
        );
        let mut standby = MapSet::restore(&defs, &snapshot).expect("a sliced snapshot restores");
        standby
            .apply_log(&s.take_log().expect("log"))
            .expect("its log follows it");
        // Compared as sets (an LRU map's recency on the standby follows the log).
        assert_eq!(entry_sets(&standby), entry_sets(&s), "round {round}");
    }
    // Another snapshot, or a taken log, while slicing: the slices refuse to go on, and no log
    // is taken while one is under way.
    let mut s = MapSet::new(&defs).expect("maps");
    for i in 0..100 {
        s.update(0, &k(i), &k(i), 0);
    }
    s.begin_sliced_snapshot();
    assert!(s.snapshot_slice(16).expect("slice").is_none());
    assert!(matches!(s.take_log(), Err(Error::Snapshot(m)) if m.contains("being taken in slices")));
    s.snapshot();
    assert!(matches!(
        s.snapshot_slice(16),
        Err(Error::Snapshot(m)) if m.contains("start it again")
    ));
    // A full hash map with churn, and an LRU map that deletes and evicts, while slicing: the
    // log replays onto the snapshot without running out of room.
    let tight = [
        def("h", MapKind::Hash, 4, 4, 3),
        def("l", MapKind::LruHash, 4, 4, 3),
    ];
    let mut s = MapSet::new(&tight).expect("maps");
    for i in 0..2 {
        s.update(0, &k(i), &k(i), 0);
    }
    for i in 0..3 {
        s.update(1, &k(i), &k(i), 0);
    }
    s.begin_sliced_snapshot();
    assert!(s.snapshot_slice(1).expect("slice").is_none());
    s.update(0, &k(7), &k(7), 0);
    s.delete(0, &k(7));
    s.update(0, &k(8), &k(8), 0);
    s.update(1, &k(9), &k(9), 0);
    s.delete(1, &k(9));
    s.update(1, &k(10), &k(10), 0);
    let snapshot = loop {
        if let Some(done) = s.snapshot_slice(1).expect("slice") {
            break done;
        }
    };
    let mut standby = MapSet::restore(&tight, &snapshot).expect("restore");
    standby
        .apply_log(&s.take_log().expect("log"))
        .expect("the log replays with room");
    assert_eq!(entry_sets(&standby), entry_sets(&s));
    // A copy for disk holds the maps as they are and leaves the chain alone.
    assert_eq!(
        sorted_entries(&tight, &copy_in_slices(&mut s, 1)),
        sorted_entries(&tight, &s.encode())
    );
    s.update(0, &k(5), &k(55), 0);
    let mut standby = MapSet::restore(&tight, &s.snapshot()).expect("restore");
    s.update(0, &k(6), &k(66), 0);
    let _ = copy_in_slices(&mut s, 1);
    standby
        .apply_log(&s.take_log().expect("log"))
        .expect("still chained");
}

/// Arrays and LRU maps are copied in slices too, not encoded whole when a sliced snapshot or
/// copy begins (which held the VNF as long as a large map took to encode): slices of 64 bytes
/// take many, and give the maps byte for byte as they were when it began, in the order they
/// had (indices; least to most recently used), whatever changed between slices: values
/// replaced, keys deleted, lookups that reorder, inserts that evict.
#[test]
fn arrays_and_lru_maps_are_copied_in_slices_in_the_order_they_had() {
    let defs = [
        def("a", MapKind::Array, 4, 8, 400),
        def("l", MapKind::LruHash, 4, 8, 300),
    ];
    let v = |i: u32| u64::from(i).to_le_bytes();
    let mut next = below(0x9e37_79b9_7f4a_7c15);
    for for_disk in [false, true] {
        for round in 0..10 {
            let mut s = MapSet::new(&defs).expect("maps");
            for i in 0..400 {
                s.update(0, &k(i), &v(i), 0);
            }
            // The LRU map full, its recency not its insertion order.
            for i in 0..300 {
                s.update(1, &k(i), &v(i), 0);
            }
            for i in (0..300).step_by(7) {
                s.lookup(1, &k(i));
            }
            let at_begin = s.encode();
            if for_disk {
                s.begin_sliced_copy();
            } else {
                s.begin_sliced_snapshot();
            }
            let mut slices = 0;
            let bytes = loop {
                let done = if for_disk {
                    s.copy_slice(64)
                } else {
                    s.snapshot_slice(64)
                };
                if let Some(done) = done.expect("slice") {
                    break done;
                }
                slices += 1;
                for _ in 0..next(8) {
                    match next(5) {
                        0 => {
                            s.update(0, &k(next(400)), &v(next(1000)), 0);
                        }
                        1 => {
                            s.delete(1, &k(next(600)));
                        }
                        2 => {
                            s.lookup(1, &k(next(600)));
                        }
                        // A key it may not hold: an insert into the full map evicts.
                        3 => {
                            s.update(1, &k(300 + next(300)), &v(next(1000)), 0);
                        }
                        _ => {
                            s.update(1, &k(next(300)), &v(next(1000)), 0);
                        }
                    }
                }
            };
            assert!(slices > 50, "round {round}: {slices} slices");
            assert!(
                bytes == at_begin,
                "round {round} (for disk: {for_disk}): not the maps as they were, in their order"
            );
            if !for_disk {
                let mut standby = MapSet::restore(&defs, &bytes).expect("restore");
                standby
                    .apply_log(&s.take_log().expect("log"))
                    .expect("its log follows it");
                assert_eq!(entry_sets(&standby), entry_sets(&s), "round {round}");
            }
        }
    }
}

/// Every map's entries of `set`, each map's sorted (maps compared as sets).
fn entry_sets(set: &MapSet) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
    (0..)
        .map_while(|id| set.get(id))
        .map(|m| {
            let mut e = m.entries();
            e.sort();
            e
        })
        .collect()
}

/// [`entry_sets`] of snapshot `bytes` of maps `defs`.
fn sorted_entries(defs: &[MapDef], bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
    entry_sets(&MapSet::restore(defs, bytes).expect("restore"))
}

/// A copy of `s` for disk, taken in slices of `slice` bytes with nothing changing between.
fn copy_in_slices(s: &mut MapSet, slice: usize) -> Vec<u8> {
    s.begin_sliced_copy();
    loop {
        if let Some(done) = s.copy_slice(slice).expect("copy slice") {
            return done;
        }
    }
}

#[test]
fn a_copy_for_disk_in_slices_is_the_maps_when_it_began_while_a_standbys_snapshot_and_log_go_on() {
    let defs = [
        def("h", MapKind::Hash, 4, 4, 512),
        def("l", MapKind::LruHash, 4, 4, 64),
    ];
    let mut s = MapSet::new(&defs).expect("maps");
    for i in 0..400 {
        s.update(0, &k(i), &k(i), 0);
    }
    for i in 0..50 {
        s.update(1, &k(i), &k(i), 0);
    }
    // Logging, as for a standby.
    s.snapshot();
    let at_begin = s.encode();
    s.begin_sliced_copy();
    let (mut copy, mut snapshot, mut slices) = (None, None, 0u32);
    while copy.is_none() || snapshot.is_none() {
        if copy.is_none() {
            copy = s.copy_slice(64).expect("copy slice");
        }
        slices += 1;
        // Halfway through the copy a standby's snapshot begins (the log restarts), sliced
        // alongside it.
        if slices == 20 {
            s.begin_sliced_snapshot();
        }
        if slices > 20 && snapshot.is_none() {
            snapshot = s.snapshot_slice(64).expect("snapshot slice");
        }
        // Changes between slices: deletes, new keys, replaced values.
        let i = slices * 7 % 600;
        match slices % 3 {
            0 => {
                s.delete(0, &k(i));
            }
            1 => {
                s.update(0, &k(i), &k(i + 1000), 0);
            }
            _ => {
                s.update(1, &k(i % 100), &k(i), 0);
            }
        }
    }
    assert!(slices > 40, "{slices} slices");
    // The copy holds the maps as they were when it began.
    let copy = copy.expect("copy");
    assert_eq!(
        sorted_entries(&defs, &copy),
        sorted_entries(&defs, &at_begin)
    );
    // The standby's snapshot and the log after it are the maps as they are now.
    let mut standby = MapSet::restore(&defs, &snapshot.expect("snapshot")).expect("restore");
    standby
        .apply_log(&s.take_log().expect("the log follows the snapshot"))
        .expect("its log follows it");
    assert_eq!(entry_sets(&standby), entry_sets(&s));
    // With no copy under way, a slice says so.
    assert!(matches!(
        s.copy_slice(64),
        Err(Error::Snapshot(m)) if m.contains("start it again")
    ));
    // On a standby the copy holds as its active's logs are applied between slices: a key
    // deleted and a new one put, which takes the freed slot.
    let mut standby = MapSet::restore(&defs, &s.snapshot()).expect("restore");
    let at_begin = standby.encode();
    standby.begin_sliced_copy();
    let (mut copy, mut round) = (None, 0u32);
    while copy.is_none() {
        copy = standby.copy_slice(64).expect("copy slice");
        round += 1;
        let victim = standby.get(0).expect("map").entries()[0].0.clone();
        assert_eq!(s.delete(0, &victim), code::OK);
        assert_eq!(s.update(0, &k(5000 + round), &k(round), 0), code::OK);
        standby
            .apply_log(&s.take_log().expect("log"))
            .expect("apply");
    }
    assert!(round > 10, "{round} slices");
    assert_eq!(
        sorted_entries(&defs, &copy.expect("copy")),
        sorted_entries(&defs, &at_begin)
    );
}

#[test]
fn worker_runs_pinned_and_serialises_commands() {
    let rt = runtime("worker");
    let m = install(&rt, &counter_module(), "untrusted");
    let inst = rt
        .instantiate(&m, VnfConfig::default())
        .expect("instantiate");
    let mut w = Worker::spawn(inst, Some(0)).expect("spawn pinned to core 0");
    let mut b = Box::new(PacketBatch::new());
    for _ in 0..4 {
        b.push(0, &[0u8; 64]).expect("push");
    }
    let (b, r) = w.process(b).expect("process");
    r.expect("batch ok");
    assert_eq!(b.verdicts(), &[Verdict::Forward(0); 4]);
    let affinity = w
        .with(|_| telvirt_runtime_wasm::worker::current_affinity())
        .expect("with");
    assert_eq!(affinity, vec![0], "worker thread is pinned to core 0");
    w.with(|i| i.lock()).expect("with").expect("lock");
    let (_, r) = w.process(b).expect("process");
    assert!(matches!(r, Err(Error::Locked)));
    let inst = w.stop().expect("stop");
    assert_eq!(count_of(&inst), 4);

    let inst = rt
        .instantiate(&m, VnfConfig::default())
        .expect("instantiate");
    let err = Worker::spawn(inst, Some(100_000))
        .err()
        .expect("no such core");
    assert!(err.to_string().contains("core"), "{err}");
}
