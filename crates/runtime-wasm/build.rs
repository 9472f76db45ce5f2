//! Builds the example VNFs of `examples/vnfs/` twice from the same C sources: to wasm32 with
//! Debian's clang + wasm-ld (the `telvirt.manifest` custom section is appended from
//! `<name>.manifest.json`), and natively with the `cc` crate as the benchmark baseline.
//! Fails with a message naming the Debian packages when clang or wasm-ld is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

const VNFS: [&str; 3] = ["firewall", "nat", "gtpu"];
const EXPORTS: [&str; 4] = ["tv_buffer", "tv_init", "tv_process", "tv_tick"];

fn leb(mut v: usize, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
}

fn append_manifest(wasm: &mut Vec<u8>, json: &[u8]) {
    let name = b"telvirt.manifest";
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name);
    body.extend_from_slice(json);
    wasm.push(0);
    leb(body.len(), wasm);
    wasm.extend_from_slice(&body);
}

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let src = manifest_dir.join("../../examples/vnfs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = std::env::var("TELVIRT_CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=TELVIRT_CLANG");
    let header = src.join("telvirt_vnf.h");
    println!("cargo:rerun-if-changed={}", header.display());
    for name in VNFS {
        let c = src.join(format!("{name}.c"));
        let json_path = src.join(format!("{name}.manifest.json"));
        println!("cargo:rerun-if-changed={}", c.display());
        println!("cargo:rerun-if-changed={}", json_path.display());
        let wasm_path = out.join(format!("{name}.wasm"));
        build_wasm(&clang, &c, &wasm_path);
        let mut wasm = std::fs::read(&wasm_path).expect("read the wasm clang produced");
        let json = std::fs::read(&json_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", json_path.display()));
        let json = String::from_utf8(json).expect("manifest is UTF-8");
        append_manifest(&mut wasm, json.trim().as_bytes());
        std::fs::write(&wasm_path, wasm).expect("write the wasm module");

        let mut b = cc::Build::new();
        b.compiler(&clang)
            .file(&c)
            .include(&src)
            .opt_level(2)
            .debug(false)
            .warnings(true)
            .extra_warnings(true)
            .warnings_into_errors(true);
        for e in EXPORTS {
            b.define(e, Some(format!("{name}_{e}").as_str()));
        }
        b.compile(&format!("telvirt_vnf_{name}"));
    }
}

fn build_wasm(clang: &str, c: &Path, out: &Path) {
    let status = Command::new(clang)
        .args([
            "--target=wasm32",
            "-nostdlib",
            "-O2",
            "-mbulk-memory",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wl,--no-entry",
            "-Wl,-z,stack-size=65536",
            "-Wl,--initial-memory=262144",
            "-Wl,--max-memory=1048576",
            "-o",
        ])
        .arg(out)
        .arg(c)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "`{clang} --target=wasm32` failed ({s}) on {}: install Debian's `clang lld` packages (apt-get install -y clang lld) — wasm-ld comes from lld",
            c.display()
        ),
        Err(e) => panic!(
            "cannot run `{clang}` ({e}): install Debian's `clang lld` packages (apt-get install -y clang lld), or set TELVIRT_CLANG"
        ),
    }
}
