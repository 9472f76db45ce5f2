//! `telvirt net ...`: networks through the API.
//!
//! Owns the CLI side of networks (arguments, printing, waiting for a steering switch). It must
//! not hold network rules: the model, the controller and the agent do.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use reqwest::Method;
use telvirt_dataplane::capture::PcapngFrameCounter;
use telvirt_model::network::{CaptureRequest, Network, NetworkDescriptor, SteerRequest};

use crate::cli::Output;
use crate::client::Client;

#[derive(Subcommand, Debug)]
pub enum NetCommand {
    /// Create a network from a descriptor file (kind: Network)
    Create {
        /// Descriptor file, or - for standard input
        #[arg(short = 'f', long = "file")]
        file: std::path::PathBuf,
    },
    /// Create a network, or change an existing one in place (links in both versions stay up,
    /// VNFs keep running, a changed steering `active` is one atomic switch)
    Apply {
        /// Descriptor file, or - for standard input
        #[arg(short = 'f', long = "file")]
        file: std::path::PathBuf,
    },
    /// Point a steering endpoint at another instance, and wait until the data plane switched
    Steer {
        /// Network name
        network: String,
        /// Steering endpoint of the network
        endpoint: String,
        /// The instance that receives the endpoint's traffic from now on
        instance: String,
        /// Give up waiting for the data plane after this many seconds
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// List the networks you may see
    #[command(alias = "ls")]
    List,
    /// Show a network's links with packet, byte and drop counters (every network without NAME)
    Show { name: Option<String> },
    /// Delete a network (its links go; VNFs keep running)
    #[command(alias = "rm")]
    Delete { name: String },
    /// Capture the frames one link of a network carries into a pcapng file (tcpdump -r and
    /// Wireshark read it), written while the capture runs
    Capture {
        /// Network name
        network: String,
        /// The link: the port it leaves (fw1.out), the port it enters (sink.in), or the link
        /// as the descriptor writes it ("fw1.out -> sink.in")
        link: String,
        /// Stop after this many frames
        #[arg(short = 'c', long = "count", default_value_t = 1000)]
        count: u64,
        /// Stop after this many seconds, whatever came
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Bytes kept of each frame (64..=65535)
        #[arg(short = 's', long = "snaplen", default_value_t = 65535)]
        snaplen: u32,
        /// The pcapng file to write, or - for standard output (e.g. `| tcpdump -r -`)
        #[arg(short = 'w', long = "write")]
        write: std::path::PathBuf,
    },
}

/// What `net capture` wrote.
#[derive(Debug, serde::Serialize)]
struct CaptureSummary {
    file: String,
    frames: u64,
    missed: u64,
}

/// Streams the capture `req` of `network` into `path` (`-`: standard output) as it arrives.
async fn capture(
    client: &Client,
    network: &str,
    req: &CaptureRequest,
    path: &std::path::Path,
) -> Result<CaptureSummary> {
    let body = serde_json::to_vec(req)?;
    let mut response = client
        .open(
            Method::POST,
            &format!("/v1/networks/{network}/capture"),
            Some((body, "application/json")),
        )
        .await?;
    let mut out: Box<dyn Write> = if path.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(path)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?,
        )
    };
    let mut counter = PcapngFrameCounter::default();
    while let Some(bytes) = response.chunk().await.map_err(|e| {
        anyhow::anyhow!("the capture stream broke off: {e} (the server's log says why)")
    })? {
        counter.feed(&bytes);
        out.write_all(&bytes)?;
        out.flush()?;
    }
    Ok(CaptureSummary {
        file: path.display().to_string(),
        frames: counter.frames(),
        missed: counter.missed(),
    })
}

fn print_status(n: &Network) {
    // Link i travels between hosts with VNI `vni + i`.
    let vnis = match (n.vni, n.vnis.max(1)) {
        (0, _) => String::new(),
        (first, 1) => format!(", VNI {first}"),
        (first, count) => format!(", VNIs {first}-{}", first + (count - 1)),
    };
    println!("network/{} (owner {}{vnis})", n.name, n.owner);
    match &n.status {
        Some(s) => {
            print!("{}", s.table);
            for w in &s.waiting {
                println!("waiting: {w}");
            }
        }
        None => println!("not applied on the data plane yet"),
    }
}

pub async fn run(client: &Client, format: Output, cmd: NetCommand) -> Result<()> {
    match cmd {
        NetCommand::Create { file } => {
            let (bytes, f) = crate::read_descriptor(&file)?;
            let n: Network = client
                .call(Method::POST, "/v1/networks", Some((bytes, f.media_type())))
                .await?
                .json()?;
            if !crate::output::structured(format, &n)? {
                println!("network/{} created", n.name);
            }
        }
        NetCommand::Apply { file } => {
            let (bytes, f) = crate::read_descriptor(&file)?;
            let d: NetworkDescriptor = telvirt_model::from_text(&bytes, f)?;
            let content_type = f.media_type();
            let path = format!("/v1/networks/{}", d.name());
            let (n, verb): (Network, &str) = if client.exists(&path).await? {
                let n = client
                    .call(Method::PUT, &path, Some((bytes, content_type)))
                    .await?
                    .json()?;
                (n, "configured")
            } else {
                let n = client
                    .call(Method::POST, "/v1/networks", Some((bytes, content_type)))
                    .await?
                    .json()?;
                (n, "created")
            };
            if !crate::output::structured(format, &n)? {
                println!("network/{} {verb}", n.name);
            }
        }
        NetCommand::Steer {
            network,
            endpoint,
            instance,
            timeout,
        } => {
            let active = instance
                .parse()
                .map_err(|e| anyhow::anyhow!("instance `{instance}`: {e}"))?;
            let body = serde_json::to_vec(&SteerRequest { active })?;
            client
                .call(
                    Method::PUT,
                    &format!("/v1/networks/{network}/steering/{endpoint}"),
                    Some((body, "application/json")),
                )
                .await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
            let state = loop {
                let n: Network = client.get(&format!("/v1/networks/{network}")).await?;
                let st = n
                    .status
                    .iter()
                    .flat_map(|s| s.steering.iter())
                    .find(|s| s.name == endpoint && s.active == instance)
                    .cloned();
                if let Some(st) = st {
                    break st;
                }
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "stored, but the data plane did not switch {endpoint} to {instance} within \
                         {timeout} s (is the network applied? see `telvirt net show {network}`)"
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            if !crate::output::structured(format, &state)? {
                println!(
                    "network/{network}: {endpoint} -> {} (switch {})",
                    state.active, state.generation
                );
            }
        }
        NetCommand::List => {
            let list: Vec<Network> = client.get("/v1/networks").await?;
            if !crate::output::structured(format, &list)? {
                println!("{:<16} {:<12} LINKS", "NAME", "OWNER");
                for n in &list {
                    println!(
                        "{:<16} {:<12} {}",
                        n.name.as_str(),
                        n.owner.as_str(),
                        n.descriptor.spec.links.len()
                    );
                }
            }
        }
        NetCommand::Show { name } => {
            let names: Vec<String> = match name {
                Some(n) => vec![n],
                None => client
                    .get::<Vec<Network>>("/v1/networks")
                    .await?
                    .into_iter()
                    .map(|n| n.name.as_str().to_owned())
                    .collect(),
            };
            let mut shown = Vec::new();
            for n in names {
                shown.push(client.get::<Network>(&format!("/v1/networks/{n}")).await?);
            }
            let structured = if shown.len() == 1 {
                crate::output::structured(format, &shown[0])?
            } else {
                crate::output::structured(format, &shown)?
            };
            if !structured {
                for (i, n) in shown.iter().enumerate() {
                    if i > 0 {
                        println!();
                    }
                    print_status(n);
                }
            }
        }
        NetCommand::Capture {
            network,
            link,
            count,
            duration,
            snaplen,
            write,
        } => {
            let duration_ms = if duration.is_finite() && duration > 0.0 {
                (duration * 1000.0).ceil() as u64
            } else {
                anyhow::bail!("--duration {duration}: give a number of seconds above 0");
            };
            let req = CaptureRequest {
                link: link.clone(),
                packets: Some(count),
                duration_ms: Some(duration_ms),
                snaplen: Some(snaplen),
            };
            let summary = capture(client, &network, &req, &write).await?;
            // With `-w -` the frames are on standard output: the summary goes to standard error.
            let mut err = std::io::stderr().lock();
            let structured = if write.as_os_str() == "-" {
                crate::output::structured_to(format, &summary, &mut err)?
            } else {
                crate::output::structured(format, &summary)?
            };
            if !structured {
                // The frames may be on standard output: the summary goes to standard error.
                eprintln!(
                    "{} frames of {network} {link} captured to {}{}",
                    summary.frames,
                    write.display(),
                    if summary.missed > 0 {
                        format!(" ({} missed: the capture fell behind)", summary.missed)
                    } else {
                        String::new()
                    }
                );
            }
        }
        NetCommand::Delete { name } => {
            client
                .call(Method::DELETE, &format!("/v1/networks/{name}"), None)
                .await?;
            let value = serde_json::json!({ "name": name, "deleted": true });
            if !crate::output::structured(format, &value)? {
                println!("network/{name} deleted");
            }
        }
    }
    Ok(())
}
