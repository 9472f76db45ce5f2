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

/// Actions of the example firewall (its rules' values and its default action).
pub mod fw_action {
    /// Drop the packet.
    pub const DROP: u32 = 0;
    /// Forward to the other port of the pair the packet came in on (0 <-> 1): a bump in the
    /// wire that passes traffic both ways.
    pub const CROSS: u32 = u32::MAX;

    /// Forward to output port `port`.
    pub const fn forward(port: u32) -> u32 {
        port + 1
    }
}

/// One rule of the example firewall: the 5-tuple it matches (addresses as written, ports in
/// host order) and its action. A rule with source address and port zero is a service rule that
/// matches any source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirewallRule {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    pub action: u32,
}

impl FirewallRule {
    /// The 16-byte key of the firewall's `rules` map.
    pub fn key(&self) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[0..4].copy_from_slice(&self.src);
        k[4..8].copy_from_slice(&self.dst);
        k[8..10].copy_from_slice(&self.sport.to_be_bytes());
        k[10..12].copy_from_slice(&self.dport.to_be_bytes());
        k[12] = self.proto;
        k
    }
}

/// The example firewall's `tv_init` blob: the default action, then every rule (key, action).
pub fn firewall_config(default_action: u32, rules: &[FirewallRule]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + rules.len() * 20);
    out.extend_from_slice(&default_action.to_le_bytes());
    for r in rules {
        out.extend_from_slice(&r.key());
        out.extend_from_slice(&r.action.to_le_bytes());
    }
    out
}

/// [`firewall_config`] as a descriptor's `spec.wasm.config.blob_hex` writes it.
pub fn firewall_blob_hex(default_action: u32, rules: &[FirewallRule]) -> String {
    firewall_config(default_action, rules)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
