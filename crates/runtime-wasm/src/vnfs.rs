//! The example VNFs of `examples/vnfs/`, built by `build.rs`: their wasm modules (with the
//! manifest section appended) and, for the benchmark baseline, the same C compiled natively.
//! Owns access to the built artifacts only.

/// One example VNF.
#[derive(Debug, Clone, Copy)]
pub struct ExampleVnf {
    pub name: &'static str,
    /// The wasm module, ready to install.
    pub wasm: &'static [u8],
    pub(crate) native: NativeFns,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct NativeFns {
    pub(crate) buffer: unsafe extern "C" fn(i32) -> *mut u8,
    pub(crate) init: unsafe extern "C" fn(*const u8, i32) -> i32,
    pub(crate) process: unsafe extern "C" fn(*mut u8, i32) -> i32,
}

macro_rules! native {
    ($buffer:ident, $init:ident, $process:ident) => {{
        unsafe extern "C" {
            fn $buffer(size: i32) -> *mut u8;
            fn $init(cfg: *const u8, len: i32) -> i32;
            fn $process(buf: *mut u8, n: i32) -> i32;
        }
        NativeFns {
            buffer: $buffer,
            init: $init,
            process: $process,
        }
    }};
}

/// The 5-tuple ACL firewall.
pub fn firewall() -> ExampleVnf {
    ExampleVnf {
        name: "firewall",
        wasm: include_bytes!(concat!(env!("OUT_DIR"), "/firewall.wasm")),
        native: native!(firewall_tv_buffer, firewall_tv_init, firewall_tv_process),
    }
}

/// The stateful source NAT.
pub fn nat() -> ExampleVnf {
    ExampleVnf {
        name: "nat",
        wasm: include_bytes!(concat!(env!("OUT_DIR"), "/nat.wasm")),
        native: native!(nat_tv_buffer, nat_tv_init, nat_tv_process),
    }
}

/// The GTP-U bearer forwarder.
pub fn gtpu() -> ExampleVnf {
    ExampleVnf {
        name: "gtpu",
        wasm: include_bytes!(concat!(env!("OUT_DIR"), "/gtpu.wasm")),
        native: native!(gtpu_tv_buffer, gtpu_tv_init, gtpu_tv_process),
    }
}

/// Every example VNF.
pub fn all() -> [ExampleVnf; 3] {
    [firewall(), nat(), gtpu()]
}
