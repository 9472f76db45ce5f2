//! Criterion benchmark: what beginning a sliced copy of a VNF's maps holds the VNF for, with
//! an LRU map of a million NAT-sized entries (key 16 bytes, value 8). Baseline, in the same
//! run: encoding that map whole into a reserved buffer (walking its recency list, as a begin
//! did before LRU maps were copied in slices), without the snapshot's checksum. And the whole
//! copy in 1 MiB slices, for the total work the slices spread.

use criterion::{Criterion, criterion_group, criterion_main};
use telvirt_runtime_wasm::{MapDef, MapKind, MapSet};

/// Entries of the map.
const ENTRIES: u32 = 1 << 20;

fn sliced_begin(c: &mut Criterion) {
    let defs = [MapDef {
        name: "sessions".into(),
        kind: MapKind::LruHash,
        key_size: 16,
        value_size: 8,
        max_entries: ENTRIES,
    }];
    let mut set = MapSet::new(&defs).expect("maps");
    let mut key = [0u8; 16];
    for i in 0..ENTRIES {
        key[..4].copy_from_slice(&i.to_le_bytes());
        set.update(0, &key, &u64::from(i).to_le_bytes(), 0);
    }
    // Recency unlike slot order, as a NAT's traffic leaves it.
    for i in (0..ENTRIES).step_by(3) {
        key[..4].copy_from_slice(&i.to_le_bytes());
        set.lookup(0, &key);
    }
    let mut g = c.benchmark_group("lru_1m_entries");
    g.sample_size(20);
    g.bench_function("begin_sliced_copy", |b| b.iter(|| set.begin_sliced_copy()));
    // The whole copy in slices of 1 MiB (as the agent takes them): the total work, which the
    // slices spread between batches (about 24 slices here).
    g.bench_function("begin_and_every_1mib_slice", |b| {
        b.iter(|| {
            set.begin_sliced_copy();
            loop {
                if let Some(done) = set.copy_slice(1 << 20).expect("slice") {
                    break done;
                }
            }
        })
    });
    g.bench_function("encode_whole_baseline", |b| {
        b.iter(|| {
            let map = set.get(0).expect("map");
            let mut out = Vec::with_capacity(map.len() * 24);
            map.for_each(|k, v| {
                out.extend_from_slice(k);
                out.extend_from_slice(v);
            });
            out
        })
    });
    g.finish();
}

criterion_group!(benches, sliced_begin);
criterion_main!(benches);
