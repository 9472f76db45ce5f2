//! `telvirt wasm ...`: the wasm runtime's local tools, and building the wasm runtime adapter for
//! `telvirt serve`.
//!
//! Owns writing the built-in example modules out and wiring the agent's wasm adapter to the
//! node's data plane. It must not hold runtime logic (that is `telvirt-runtime-wasm`'s and the
//! agent's).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Subcommand;
use telvirt_agent::Runtime;
use telvirt_agent::dataplane::NodeDataPlane;
use telvirt_agent::runtimes::wasm::WasmRuntime;

use reqwest::Method;
use telvirt_controller::{Controller, ModuleUpgrader};
use telvirt_model::{Name, Vnf};

use crate::cli::Output;
use crate::client::Client;

#[derive(Subcommand, Debug)]
pub enum WasmCommand {
    /// Write the built-in example modules (firewall.wasm, nat.wasm, gtpu.wasm) into a directory
    Examples {
        /// Directory to write into (created if missing)
        #[arg(long, default_value = "examples/vnfs")]
        out: PathBuf,
    },
}

pub fn run(format: Output, cmd: WasmCommand) -> Result<()> {
    match cmd {
        WasmCommand::Examples { out } => {
            let written = write_examples(&out)?;
            if !crate::output::structured(format, &written)? {
                for w in &written {
                    println!("wrote {w}");
                }
            }
        }
    }
    Ok(())
}

/// Writes every example module as `<dir>/<name>.wasm`; returns the paths written.
pub fn write_examples(dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    for (name, wasm) in telvirt_agent::runtimes::wasm::example_modules() {
        let path = dir.join(format!("{name}.wasm"));
        std::fs::write(&path, wasm).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

/// The agent's wasm runtime for `telvirt serve`: modules stored under `<data_dir>/wasm`,
/// relative module paths resolved against the working directory, VNFs placed on `dataplane`.
/// The controller gets it as its module upgrader (in-process on the all-in-one node).
pub fn runtime(
    data_dir: &Path,
    dataplane: Arc<NodeDataPlane>,
    controller: &Controller,
) -> Result<Arc<dyn Runtime>> {
    let cwd = std::env::current_dir().context("reading the working directory")?;
    let rt = WasmRuntime::new(data_dir.join("wasm"), cwd, dataplane)
        .map_err(|e| anyhow::anyhow!("starting the wasm runtime: {e}"))?;
    let rt = Arc::new(rt);
    controller.set_module_upgrader(Arc::new(Upgrader(Arc::clone(&rt))));
    Ok(rt)
}

struct Upgrader(Arc<WasmRuntime>);

impl ModuleUpgrader for Upgrader {
    fn upgrade(&self, vnf: &str, module: &str) -> Result<String, String> {
        let name: Name = vnf.parse().map_err(|e| format!("{e}"))?;
        self.0.upgrade(&name, module).map_err(|e| e.to_string())
    }
}

/// `telvirt vnf upgrade NAME --module FILE`.
pub async fn upgrade(client: &Client, format: Output, name: &str, module: &str) -> Result<()> {
    let body = serde_json::to_vec(&serde_json::json!({ "module": module }))?;
    let vnf: Vnf = client
        .call(
            Method::POST,
            &format!("/v1/vnfs/{name}/upgrade"),
            Some((body, "application/json")),
        )
        .await?
        .json()?;
    if !crate::output::structured(format, &vnf)? {
        println!(
            "vnf/{name} upgraded: {}",
            vnf.reason.as_deref().unwrap_or("module swapped")
        );
    }
    Ok(())
}
