//! telvirt's controller: the REST API, authorities, scheduling calls and lifecycle events.
//!
//! Everything it decides is written to the store first, then acted on by agents. It must not
//! start processes or talk to runtimes: agents do that through their `ControlLink`.

pub mod access;
pub mod agent_api;
pub mod auth;
pub mod capture;
pub mod consistency;
pub mod console;
pub mod health;
pub mod http;
pub mod leader;
pub mod link;
pub mod listing;
pub mod maps;
pub mod metrics;
pub mod modules;
pub mod network;
pub mod nodecalls;
pub mod nodes;
pub mod pair_keys;
pub mod placement;
pub mod records;
pub mod scrape;
pub mod service;
pub mod upgrade;
pub mod vnf_watch;
pub mod web;

pub use health::{HealthRegistry, HealthReport, Restart};
pub use http::{descriptor_schema, openapi_document, router};
pub use link::LocalLink;
pub use records::HostRecord;
pub use service::{Caller, Controller, ControllerError, Deletion};
