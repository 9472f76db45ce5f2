//! Criterion benchmark of the ring alone: one thread, enqueue a batch of 32 descriptors and
//! dequeue it again (the cost of the index protocol without cross-core traffic), next to
//! rtrb's chunk API doing the same. Cross-core throughput is `bench::ring` (`telvirt bench ring`).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn ring_batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_batch32");
    g.throughput(Throughput::Elements(32));
    let (mut p, mut q) =
        telvirt_dataplane::ring::channel::<u64>("criterion", 1024).expect("ring of 1024 slots");
    let mut inb: Vec<u64> = Vec::with_capacity(32);
    let mut out: Vec<u64> = Vec::with_capacity(32);
    g.bench_function("telvirt", |b| {
        b.iter(|| {
            inb.extend(0..32u64);
            p.push_from(&mut inb);
            out.clear();
            q.pop_into(&mut out, 32);
            black_box(&out);
        })
    });
    let (mut rp, mut rq) = rtrb::RingBuffer::<u64>::new(1024);
    g.bench_function("rtrb", |b| {
        b.iter(|| {
            if let Ok(chunk) = rp.write_chunk_uninit(32) {
                chunk.fill_from_iter(0..32u64);
            }
            if let Ok(chunk) = rq.read_chunk(32) {
                out.clear();
                out.extend(chunk);
            }
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(benches, ring_batch);
criterion_main!(benches);
