//! Criterion benchmark: one batch of 32 64-byte packets through each example VNF, wasm on
//! cranelift vs the same C compiled natively (the baseline), in the same run.

use criterion::{Criterion, criterion_group, criterion_main};
use telvirt_runtime_wasm::native::NativeVnf;
use telvirt_runtime_wasm::{
    EngineKind, InstallRequest, PacketBatch, RuntimeConfig, VnfConfig, WasmRuntime, trace,
};

fn batches(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("telvirt-criterion-{}", std::process::id()));
    let rt = WasmRuntime::new(RuntimeConfig::new(&dir)).expect("runtime");
    for w in [
        trace::firewall(1024, 4096),
        trace::nat(1024, 4096),
        trace::gtpu(1024, 4096),
    ] {
        let m = rt
            .install(&InstallRequest {
                bytes: w.vnf.wasm,
                domain: "operator",
                signature: None,
                precompile: &[EngineKind::Cranelift],
            })
            .expect("install");
        let cfg = VnfConfig {
            config: w.config.clone(),
            ports: w.ports,
            ..VnfConfig::default()
        };
        let mut inst = rt.instantiate(&m, cfg).expect("instantiate");
        let mut native =
            NativeVnf::new(w.vnf, &m.manifest.maps, &w.config, w.ports).expect("native");
        for (map, k, v) in &w.provision {
            inst.map_update(map, k, v).expect("provision");
            native.map_update(map, k, v).expect("provision");
        }
        let chunks: Vec<_> = w.packets.chunks(32).collect();
        let mut b = PacketBatch::new();
        let mut g = c.benchmark_group(w.vnf.name);
        g.throughput(criterion::Throughput::Elements(32));
        let mut i = 0;
        g.bench_function("wasm_cranelift", |bench| {
            bench.iter(|| {
                b.clear();
                for (port, p) in chunks[i % chunks.len()] {
                    b.push(*port, p).expect("push");
                }
                i += 1;
                inst.process_batch(&mut b).expect("batch");
            })
        });
        g.bench_function("native", |bench| {
            bench.iter(|| {
                b.clear();
                for (port, p) in chunks[i % chunks.len()] {
                    b.push(*port, p).expect("push");
                }
                i += 1;
                native.process_batch(&mut b).expect("batch");
            })
        });
        g.finish();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, batches);
criterion_main!(benches);
