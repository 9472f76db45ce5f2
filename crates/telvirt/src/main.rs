//! The `telvirt` binary: parses the command line and dispatches to the node or the API client.
//!
//! It must not hold logic another crate could own; errors become one line on stderr and a
//! non-zero exit.

mod agent;
mod agent_link;
mod bench;
mod bench_api;
mod bench_cluster;
mod bench_control;
mod bench_failover;
mod bench_handover;
mod bench_migrate;
mod bench_ports;
mod bench_stream;
mod bench_vhost;
mod bench_vm_move;
mod bench_vrrp;
mod cli;
mod client;
mod cluster;
mod config;
mod control_threads;
mod ha;
mod latency;
mod migrate;
mod modules;
mod net;
mod netns;
mod output;
mod progress;
mod serve;
mod tls;
mod vm;
mod wasm;

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use reqwest::{Method, StatusCode};
use telvirt_model::HostGrants;
use telvirt_model::api::{
    Authority, AuthorityToken, HostView, VnfApplied, VnfWatchEvent, VnfWatchKind,
};
use telvirt_model::{Event, Phase, Vnf};

use cli::{AuthorityCommand, Cli, Command, HostCommand, Output, VnfCommand};
use client::Client;

/// `telvirt stream-relay END`: one end of a sealed guest stream until it ends; the exit code.
fn stream_relay(end: &str, uid: Option<u32>) -> i32 {
    let Some(end) = telvirt_runtime_vm::stream_seal::parse_end(end) else {
        eprintln!("error: stream-relay takes source or destination, not {end:?}");
        return 2;
    };
    match telvirt_runtime_vm::stream_seal::relay_main(end, uid) {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("telvirt stream-relay {end:?}: {e}");
            1
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if let cli::Command::StreamRelay { end, uid } = &cli.command {
        std::process::exit(stream_relay(end, *uid));
    }
    // A moving guest's stream is sealed by a process of this very binary (`stream-relay`):
    // its image as the kernel holds it, so an upgrade in place since this process started
    // neither changes the relay's frames nor leaves it without a program.
    telvirt_runtime_vm::stream_seal::set_relay_program(
        telvirt_runtime_vm::stream_seal::RelayProgram {
            program: "/proc/self/exe".into(),
            args: vec!["stream-relay".into()],
        },
    );
    // SIGPIPE stays ignored (Rust's default) in every command: a peer that goes away mid-write
    // (a TLS stream writes with writev, which raises SIGPIPE) is an error on that connection,
    // never the process's end, for a node as for a CLI call whose upload the server cut short.
    // A closed stdout (`telvirt vnf list | head -1`) ends the command quietly instead.
    quiet_on_closed_stdout();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TELVIRT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    let node = match &cli.command {
        cli::Command::Serve(a) => Some(&a.agent),
        cli::Command::Agent(a) => Some(&a.agent),
        _ => None,
    };
    if let Some(node) = node
        && let Err(e) =
            control_threads::install(&mut builder, node.control_priority, node.control_nice)
    {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let format = cli.output;
    if let Err(e) = runtime.block_on(dispatch(cli)) {
        // Output written into a pipe whose reader has gone: end quietly (see above).
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        {
            std::process::exit(141);
        }
        let code = client::exit_code(&e);
        match format {
            // Machine-readable to the end: the error as a problem document too (on stderr,
            // like the text).
            cli::Output::Json => eprintln!("{}", client::problem_json(&e, &one_line(&e))),
            _ => eprintln!("error: {}", one_line(&e)),
        }
        std::process::exit(code);
    }
}

/// Ends the process quietly, with status 141 (what a shell shows for a SIGPIPE death), when
/// writing to a stdout whose reader has gone panics, instead of printing the panic: the way
/// other Unix tools end in `| head`.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let text = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        // println! says "failed printing to stdout: Broken pipe …", a writer's `expect` (shell
        // completion) "…: Os { …, kind: BrokenPipe, … }"; network errors are never panics.
        if text.contains("Broken pipe") || text.contains("kind: BrokenPipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}

async fn dispatch(cli: Cli) -> Result<()> {
    let format = cli.output;
    let flags = config::ClientFlags {
        server: cli.server,
        token: cli.token,
        config: cli.config,
        ca_file: cli.ca_file,
    };
    let api = || Client::new(config::resolve(&flags)?);
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Controller(args) => serve::run_controller(args).await,
        Command::Agent(args) => agent::run(args).await,
        Command::Cluster(command) => cluster::run(command, format).await,
        Command::StreamRelay { .. } => anyhow::bail!("stream-relay runs before the async runtime"),
        Command::Schema => {
            let schema = telvirt_controller::descriptor_schema();
            // JSON unless YAML is asked for (a table of a schema means nothing).
            let yaml = if format == cli::Output::Yaml {
                cli::Output::Yaml
            } else {
                cli::Output::Json
            };
            output::structured(yaml, &schema)?;
            Ok(())
        }
        Command::Status { wait } => status(&flags, format, wait).await,
        Command::Completion { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "telvirt", &mut std::io::stdout());
            Ok(())
        }
        Command::Bench(cmd) => bench::run(format, cmd),
        Command::Wasm(cmd) => wasm::run(format, cmd),
        Command::Net(cmd) => {
            let client = api()?;
            net::run(&client, format, cmd).await
        }
        Command::Latency(cmd) => {
            let client = match &cmd {
                latency::LatencyCommand::Chain(_) => Some(api()?),
                latency::LatencyCommand::Timer(_) => None,
            };
            latency::run(client.as_ref(), format, cmd).await
        }
        Command::Image(cmd) => vm::image(format, cmd).await,
        Command::Vnf(VnfCommand::Console(args)) => {
            let client = api()?;
            vm::console(&client, format, args).await
        }
        Command::Vnf(cmd) => {
            let client = api()?;
            vnf(&client, format, cmd).await
        }
        Command::Host(cmd) => {
            let client = api()?;
            host(&client, format, cmd).await
        }
        Command::Authority(cmd) => {
            let client = api()?;
            authority(&client, format, cmd).await
        }
        Command::Module(cmd) => {
            let client = api()?;
            modules::run(&client, format, cmd).await
        }
    }
}

/// A descriptor file (or `-`: standard input) and its format: JSON by extension or content.
fn read_descriptor(path: &std::path::Path) -> Result<(Vec<u8>, telvirt_model::Format)> {
    let bytes = if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        buf
    } else {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    let format = if path.extension().is_some_and(|e| e == "json") {
        telvirt_model::Format::Json
    } else {
        telvirt_model::Format::sniff(&bytes)
    };
    Ok((bytes, format))
}

fn print_vnf(format: Output, vnf: &Vnf) -> Result<()> {
    if !output::structured(format, vnf)? {
        print!("{}", output::vnf_detail(vnf));
    }
    Ok(())
}

/// `POST /v1/vnfs` with a resolved descriptor, then waits for Running when asked.
async fn create_vnf(
    client: &Client,
    format: Output,
    bytes: Vec<u8>,
    f: telvirt_model::Format,
    wait: Option<u64>,
) -> Result<()> {
    let vnf: Vnf = client
        .call(Method::POST, "/v1/vnfs", Some((bytes, f.media_type())))
        .await?
        .json()?;
    let vnf = match wait {
        Some(secs) => wait_phase(client, vnf.name.as_str(), Phase::Running, secs).await?,
        None => vnf,
    };
    if !output::structured(format, &vnf)? {
        println!("vnf/{} created ({})", vnf.name, vnf.phase);
    }
    Ok(())
}

/// `PUT /v1/vnfs/{name}` (with `dryRun`): prints each field old → new and the placement.
async fn apply_vnf(
    client: &Client,
    format: Output,
    name: &str,
    bytes: Vec<u8>,
    f: telvirt_model::Format,
    dry_run: bool,
    wait: Option<u64>,
) -> Result<()> {
    let path = format!(
        "/v1/vnfs/{name}{}",
        if dry_run { "?dryRun=true" } else { "" }
    );
    let mut applied: VnfApplied = client
        .call(Method::PUT, &path, Some((bytes, f.media_type())))
        .await?
        .json()?;
    if let (Some(secs), false) = (wait, dry_run) {
        applied.vnf = wait_phase(client, name, Phase::Running, secs).await?;
    }
    if output::structured(format, &applied)? {
        return Ok(());
    }
    match (applied.changes.is_empty(), dry_run) {
        (true, _) => println!("vnf/{name} unchanged"),
        (false, true) => println!("vnf/{name} would be changed (dry run):"),
        (false, false) => println!("vnf/{name} changed ({}):", applied.vnf.phase),
    }
    for c in &applied.changes {
        println!("  {c}");
    }
    if !applied.changes.is_empty() {
        print!("{}", output::placement_lines(&applied.vnf));
    }
    Ok(())
}

async fn vnf(client: &Client, format: Output, cmd: VnfCommand) -> Result<()> {
    match cmd {
        VnfCommand::Create { file, wait } => {
            let (bytes, f) = read_descriptor(&file)?;
            let (bytes, f) =
                modules::resolve_descriptor(client, &file, bytes, f, modules::Upload::Yes).await?;
            create_vnf(client, format, bytes, f, wait.wait).await?;
        }
        VnfCommand::Apply {
            file,
            dry_run,
            wait,
        } => {
            let (bytes, f) = read_descriptor(&file)?;
            let upload = if dry_run {
                modules::Upload::DigestOnly
            } else {
                modules::Upload::Yes
            };
            let (bytes, f) = modules::resolve_descriptor(client, &file, bytes, f, upload).await?;
            // A descriptor this cannot read is created, so the API names what is wrong with it.
            let name = telvirt_model::parse_vnf(&bytes, f).map(|d| d.name().to_string());
            let exists = match &name {
                Ok(name) => client.exists(&format!("/v1/vnfs/{name}")).await?,
                Err(_) => false,
            };
            match name {
                Ok(name) if exists => {
                    apply_vnf(client, format, &name, bytes, f, dry_run, wait.wait).await?;
                }
                Ok(name) if dry_run => {
                    if !output::structured(
                        format,
                        &serde_json::json!({ "created": name, "dry_run": true }),
                    )? {
                        println!("vnf/{name} would be created (dry run)");
                    }
                }
                _ => create_vnf(client, format, bytes, f, wait.wait).await?,
            }
        }
        VnfCommand::List {
            selector,
            watch: true,
            ..
        } => watch_vnfs(client, format, selector).await?,
        VnfCommand::List {
            selector, limit, ..
        } => {
            let mut query = Vec::new();
            if let Some(limit) = limit {
                query.push(("limit", limit.to_string()));
            }
            if let Some(selector) = selector {
                query.push(("labelSelector", selector));
            }
            let vnfs: Vec<Vnf> = client.get_all_pages("/v1/vnfs", &query).await?;
            if !output::structured(format, &vnfs)? {
                println!("{}", output::vnf_table(&vnfs, format == Output::Wide));
            }
        }
        VnfCommand::Show { name } => {
            let vnf: Vnf = client.get(&format!("/v1/vnfs/{name}")).await?;
            print_vnf(format, &vnf)?;
        }
        VnfCommand::Events { name } => {
            let events: Vec<Event> = client.get(&format!("/v1/vnfs/{name}/events")).await?;
            if !output::structured(format, &events)? {
                println!("{}", output::event_table(&events));
            }
        }
        VnfCommand::Start { name, wait } => {
            let done = (Phase::Running, "start requested");
            action(client, format, &name, "start", done, wait).await?
        }
        VnfCommand::Stop { name, wait } => {
            let done = (Phase::Stopped, "stop requested");
            action(client, format, &name, "stop", done, wait).await?
        }
        VnfCommand::Lock { name, wait } => {
            let done = (Phase::Locked, "locked");
            action(client, format, &name, "lock", done, wait).await?
        }
        VnfCommand::Console(_) => bail!("vnf console is dispatched before the API client"),
        VnfCommand::Logs { name, follow } => {
            crate::wasm::logs(client, format, &name, follow).await?
        }
        VnfCommand::Attach(args) => vm::attach(client, format, args).await?,
        VnfCommand::Detach { name, id } => vm::detach(client, format, &name, &id).await?,
        VnfCommand::Unlock { name, wait } => {
            let done = (Phase::Running, "unlocked");
            action(client, format, &name, "unlock", done, wait).await?
        }
        VnfCommand::Upgrade { name, module } => {
            let module = modules::resolve_upgrade(client, &module).await?;
            crate::wasm::upgrade(client, format, &name, &module).await?
        }
        VnfCommand::Migrate(args) => crate::migrate::migrate(client, format, args).await?,
        VnfCommand::Maps { name } => crate::wasm::maps(client, format, &name).await?,
        VnfCommand::MapUpdate(args) => crate::wasm::map_update(client, format, args).await?,
        VnfCommand::Stats { name } => crate::wasm::stats(client, format, &name).await?,
        VnfCommand::Delete {
            name,
            no_wait,
            wait,
        } => {
            let path = format!("/v1/vnfs/{name}");
            let answer = client.call(Method::DELETE, &path, None).await?;
            if answer.status == StatusCode::ACCEPTED && !no_wait {
                wait_gone(client, &path, Duration::from_secs(wait.unwrap_or(120))).await?;
            }
            let gone = answer.status == StatusCode::NO_CONTENT || !no_wait;
            let value = serde_json::json!({ "name": name, "deleted": gone });
            if !output::structured(format, &value)? {
                if gone {
                    println!("vnf/{name} deleted");
                } else {
                    println!("vnf/{name} stopping; it is removed once stopped");
                }
            }
        }
    }
    Ok(())
}

/// `POST /v1/vnfs/NAME/VERB`; with `--wait`, then until the VNF is in `done.0`. Prints the VNF
/// (structured) or `done.1`, or, after waiting, its phase.
async fn action(
    client: &Client,
    format: Output,
    name: &str,
    verb: &str,
    done: (Phase, &str),
    wait: cli::WaitArg,
) -> Result<()> {
    let vnf: Vnf = client.post(&format!("/v1/vnfs/{name}/{verb}")).await?;
    let (vnf, said) = match wait.wait {
        Some(secs) => (
            wait_phase(client, name, done.0, secs).await?,
            done.0.as_str(),
        ),
        None => (vnf, done.1),
    };
    if !output::structured(format, &vnf)? {
        println!("vnf/{name} {said}");
    }
    Ok(())
}

/// Polls VNF `name` until it is in `phase` (answering it), with a deadline of `secs`; an error
/// when it ends Failed (with its reason) or the deadline passes (with the phase it is in).
async fn wait_phase(client: &Client, name: &str, phase: Phase, secs: u64) -> Result<Vnf> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let vnf: Vnf = client.get(&format!("/v1/vnfs/{name}")).await?;
        if vnf.phase == phase {
            return Ok(vnf);
        }
        if vnf.phase == Phase::Failed && phase != Phase::Failed {
            bail!(
                "vnf/{name} failed: {}",
                vnf.reason.as_deref().unwrap_or("no reason given")
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "vnf/{name} is {} after {secs} s, not {}{}",
                vnf.phase,
                phase.as_str(),
                vnf.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls until the VNF is gone, with a deadline.
async fn wait_gone(client: &Client, path: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if !client.exists(path).await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("still not deleted after {}s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `POST /v1/hosts/NAME/ACTION` (cordon, uncordon, drain), printing the host it answers.
async fn host_action(client: &Client, format: Output, name: &str, action: &str) -> Result<()> {
    let host: HostView = client.post(&format!("/v1/hosts/{name}/{action}")).await?;
    if !output::structured(format, &host)? {
        println!("host/{name} {action}ed");
        println!(
            "{}",
            output::host_table(std::slice::from_ref(&host), format == Output::Wide)
        );
    }
    Ok(())
}

async fn host(client: &Client, format: Output, cmd: HostCommand) -> Result<()> {
    match cmd {
        HostCommand::List => {
            let hosts: Vec<HostView> = client.get("/v1/hosts").await?;
            if !output::structured(format, &hosts)? {
                println!("{}", output::host_table(&hosts, format == Output::Wide));
            }
        }
        HostCommand::Show { name } => {
            let host: HostView = client.get(&format!("/v1/hosts/{name}")).await?;
            if !output::structured(format, &host)? {
                println!(
                    "{}",
                    output::host_table(std::slice::from_ref(&host), format == Output::Wide)
                );
                if let Some(qemu) = &host.qemu {
                    println!(
                        "QEMU {qemu}, machine types {} (a vm moves here from the same or an older QEMU whose guest's type is among them)",
                        telvirt_model::vnf::machine_span(&host.qemu_machines)
                    );
                }
                if let Some(accel) = host.accel {
                    println!(
                        "Guests run under {accel}{}",
                        match accel {
                            telvirt_model::vnf::Accelerator::Kvm => "",
                            telvirt_model::vnf::Accelerator::Tcg =>
                                " (emulated: a KVM guest does not move here)",
                        }
                    );
                }
                if let Some(cpu) = &host.cpu {
                    println!(
                        "CPU {cpu} (a KVM guest on its host's CPU moves here only from the same CPU; one with spec.vm.cpu_model from any)"
                    );
                }
                println!();
                print!(
                    "{}",
                    client
                        .get_text(&format!("/v1/hosts/{name}/coremap"))
                        .await?
                );
            }
        }
        HostCommand::Cordon { name } => host_action(client, format, &name, "cordon").await?,
        HostCommand::Uncordon { name } => host_action(client, format, &name, "uncordon").await?,
        HostCommand::Drain { name } => host_action(client, format, &name, "drain").await?,
        HostCommand::Delete { name } => {
            client
                .call(Method::DELETE, &format!("/v1/hosts/{name}"), None)
                .await?;
            let value = serde_json::json!({ "name": name, "deleted": true });
            if !output::structured(format, &value)? {
                println!("host/{name} deleted");
            }
        }
        HostCommand::RotateReplicationSecret => {
            let rotation: telvirt_model::api::SecretRotation = client
                .call(Method::POST, "/v1/secrets/replication/rotate", None)
                .await?
                .json()?;
            if !output::structured(format, &rotation)? {
                println!(
                    "replication secret rotated: {} stream(s) take a new key{}",
                    rotation.streams.len(),
                    if rotation.streams.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", rotation.streams.join(", "))
                    }
                );
            }
        }
        HostCommand::Credential { name, out } => {
            let issued: telvirt_controller::nodes::NodeCredential = client
                .call(Method::POST, &format!("/v1/hosts/{name}/credential"), None)
                .await?
                .json()?;
            match out {
                Some(path) => {
                    config::write_private(&path, format!("{}\n", issued.token).as_bytes())?;
                    let value = serde_json::json!({ "host": name, "token_file": path });
                    if !output::structured(format, &value)? {
                        println!(
                            "host/{name} credential written to {} (its previous one no longer works)",
                            path.display()
                        );
                    }
                }
                None => {
                    if !output::structured(format, &issued)? {
                        println!(
                            "host/{name} credential (shown once; its previous one no longer works):"
                        );
                        println!("{}", issued.token);
                    }
                }
            }
        }
    }
    Ok(())
}

async fn authority(client: &Client, format: Output, cmd: AuthorityCommand) -> Result<()> {
    match cmd {
        AuthorityCommand::RotateToken { name } => {
            let rotated: AuthorityToken = client
                .post(&format!("/v1/authorities/{name}/token"))
                .await?;
            if !output::structured(format, &rotated)? {
                println!(
                    "authority/{} has a new token; the old one no longer works",
                    rotated.name
                );
                println!("token (shown once, keep it safe): {}", rotated.token);
            }
        }
        AuthorityCommand::Delete { name } => {
            client
                .call(Method::DELETE, &format!("/v1/authorities/{name}"), None)
                .await?;
            let value = serde_json::json!({ "name": name, "deleted": true });
            if !output::structured(format, &value)? {
                println!("authority/{name} deleted");
            }
        }
        AuthorityCommand::Create { name, domain } => {
            let mut body = serde_json::json!({ "name": name });
            if let Some(domain) = domain {
                body["domain"] = serde_json::Value::String(domain);
            }
            let body = serde_json::to_vec(&body)?;
            let created: AuthorityToken = client
                .call(
                    Method::POST,
                    "/v1/authorities",
                    Some((body, "application/json")),
                )
                .await?
                .json()?;
            if !output::structured(format, &created)? {
                println!(
                    "authority/{} created (security domain {})",
                    created.name, created.domain
                );
                println!("token (shown once, keep it safe): {}", created.token);
            }
        }
        AuthorityCommand::List => {
            let list: Vec<Authority> = client.get("/v1/authorities").await?;
            if !output::structured(format, &list)? {
                println!("{}", output::authority_table(&list));
            }
        }
        AuthorityCommand::Grant(args) | AuthorityCommand::Revoke(args)
            if args.paths.is_empty() && args.interfaces.is_empty() && args.taps.is_empty() =>
        {
            bail!("name what to grant or revoke: --path, --interface or --tap")
        }
        AuthorityCommand::Grant(args) => {
            grants_call(client, format, Method::POST, args, "granted").await?
        }
        AuthorityCommand::Revoke(args) => {
            grants_call(client, format, Method::DELETE, args, "revoked").await?
        }
        AuthorityCommand::Grants { name } => {
            let grants: HostGrants = client
                .get(&format!("/v1/authorities/{name}/grants"))
                .await?;
            if !output::structured(format, &grants)? {
                print!("{}", output::grants_table(&grants));
            }
        }
    }
    Ok(())
}

async fn grants_call(
    client: &Client,
    format: Output,
    method: Method,
    args: cli::GrantArgs,
    done: &str,
) -> Result<()> {
    let body = HostGrants {
        paths: args.paths.into_iter().collect(),
        interfaces: args.interfaces.into_iter().collect(),
        taps: args.taps.into_iter().collect(),
    };
    let name = args.name;
    let grants: HostGrants = client
        .call(
            method,
            &format!("/v1/authorities/{name}/grants"),
            Some((serde_json::to_vec(&body)?, "application/json")),
        )
        .await?
        .json()?;
    if !output::structured(format, &grants)? {
        println!("authority/{name} {done}; it now holds:");
        print!("{}", output::grants_table(&grants));
    }
    Ok(())
}

/// `vnf list -w`: the list as the watch's first messages give it, then a line per change, until
/// interrupted or the server ends the stream.
async fn watch_vnfs(client: &Client, format: Output, selector: Option<String>) -> Result<()> {
    let path = match &selector {
        Some(s) => format!(
            "/v1/watch/vnfs?labelSelector={}",
            crate::client::encode_query_value(s)
        ),
        None => "/v1/watch/vnfs".to_owned(),
    };
    let mut stream = client.events(&path).await?;
    let mut first: Option<Vec<Vnf>> = Some(Vec::new());
    while let Some((_, data)) = stream.next().await? {
        let change: VnfWatchEvent = serde_json::from_str(&data)
            .map_err(|e| anyhow!("the server's watch message is not what this CLI expects: {e}"))?;
        match format {
            Output::Json => println!("{}", serde_json::to_string(&change)?),
            Output::Yaml => print!("---\n{}", yaml_serde::to_string(&change)?),
            Output::Table | Output::Wide => match (&mut first, change.kind) {
                (Some(list), VnfWatchKind::Synced) => {
                    println!("{}", output::vnf_table(list, format == Output::Wide));
                    first = None;
                }
                (Some(list), _) => list.extend(change.vnf),
                (None, _) => {
                    if let Some(line) = output::vnf_change_line(&change, format == Output::Wide) {
                        println!("{line}");
                    }
                }
            },
        }
    }
    bail!("the watch ended: the server closed the stream; run the command again to go on watching")
}

/// `telvirt status [--wait[=SECONDS]]`: the node's readiness (`GET /v1/readyz`); with a wait,
/// asks again every 200 ms (the client config may not exist yet) until it answers ready.
async fn status(flags: &config::ClientFlags, format: Output, wait: Option<u64>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(wait.unwrap_or(0));
    loop {
        let attempt = async {
            let client = Client::new(config::resolve(flags)?)?;
            client.get::<telvirt_model::api::Health>("/v1/readyz").await
        };
        match attempt.await {
            Ok(health) => {
                if !output::structured(format, &health)? {
                    println!("{}", output::health_table(&health));
                }
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(match wait {
                    Some(secs) => e.context(format!("the node was not ready within {secs} s")),
                    None => e,
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
