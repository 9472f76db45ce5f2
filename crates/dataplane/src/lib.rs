//! telvirt data plane: packet rings, buffer pool, ports, patch panel, steering and measurement
//! tools. Takes plain Rust configuration types; must not know about descriptors or the store.

pub mod error;
pub mod pool;
pub mod region;
pub mod ring;

pub use error::{Error, Result};
pub mod afpacket;
pub mod bench;
pub mod capture;
pub mod doorbell;
pub mod firewall;
pub mod graph;
pub mod hist;
pub mod latency;
pub(crate) mod netdev;
pub mod node;
pub mod packet;
pub mod panel;
pub mod pcap;
pub mod steering;
pub mod traffic;
pub mod vxlan;
pub mod worker;
pub(crate) mod xdp;
