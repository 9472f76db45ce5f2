//! The controller's integration tests, one binary: each module drives a real node (redb or etcd
//! store, controller, agent, HTTP server; `common`) through one part of the API. One binary
//! instead of one per file: each linked the whole stack (about 100 MB), so twenty of them took
//! about 2 GB of a clean build's disk and as many link steps. Run one module with
//! `cargo test -p telvirt-controller --test node MODULE::`.

mod common;

mod agent_protocol;
mod agent_wakeup;
mod api;
mod apply;
mod bad_input;
mod confinement;
mod consistency;
mod devices;
mod grants;
mod healing;
mod health;
mod history;
mod hosts;
mod lists;
mod liveness_clock;
mod migration;
mod module_bytes;
mod networks;
mod pending_index;
mod upgrade;
