//! The wasm runtime's integration tests, one binary: each module runs real modules (the
//! examples, hostile ones) through the runtime's public API. One binary instead of one per file,
//! since each linked wasmtime (about 60 MB apiece). `rss` stays a binary of its own: it measures
//! its process's resident memory, which tests running beside it would disturb. Run one module
//! with `cargo test -p telvirt-runtime-wasm --test runtime MODULE::`.

#[path = "../common/mod.rs"]
mod common;

mod confinement;
mod examples;
mod host_functions;
mod hostile;
mod lifecycle;
mod maps;
