//! Criterion benchmark of placement: the indexed engine against the naive first-fit scan on the
//! same synthetic hosts and workload (smaller than `telvirt bench placement` to stay quick on
//! shared machines), plus one host failure.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use telvirt_sched::bench::{synthetic_hosts, synthetic_workload};
use telvirt_sched::{SchedConfig, Scheduler, Search};

fn cluster(search: Search, hosts: u32) -> Scheduler {
    let mut s = Scheduler::new(SchedConfig {
        search,
        ..SchedConfig::default()
    })
    .expect("valid config");
    for h in synthetic_hosts(hosts) {
        s.add_host(h).expect("synthetic hosts are valid");
    }
    s
}

fn placement(c: &mut Criterion) {
    const HOSTS: u32 = 100;
    const VNFS: u32 = 10_000;
    let work = synthetic_workload(VNFS, 1);
    let mut g = c.benchmark_group("place_10k_vnfs_on_100_hosts");
    g.sample_size(10);
    for (name, search) in [
        ("indexed", Search::Indexed),
        ("first_fit", Search::FirstFit),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || cluster(search, HOSTS),
                |mut s| {
                    let mut placed = 0u32;
                    for r in &work {
                        placed += s.place(r).is_ok() as u32;
                    }
                    // Returned so that dropping the scheduler is not timed.
                    (s, placed)
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();

    let mut g = c.benchmark_group("fail_host_100_hosts");
    g.sample_size(10);
    let mut full = cluster(Search::Indexed, HOSTS);
    for r in &work {
        let _ = full.place(r);
    }
    g.bench_function("indexed", |b| {
        b.iter_batched(
            || full.clone(),
            |mut s| {
                let n = s.fail_host("host-0000").expect("host exists").len();
                (s, n)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, placement);
criterion_main!(benches);
