//! The command line: every subcommand and flag, in the style of kubectl and virsh.
//!
//! Owns argument shapes and help text only. It must not do work: `main` dispatches to the
//! modules that do.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// `--worker-idle-spin-us` by default: the data plane's own ([`telvirt_dataplane::worker::IDLE_SPIN`]).
pub const IDLE_SPIN_DEFAULT_US: u64 = telvirt_dataplane::worker::IDLE_SPIN.as_micros() as u64;
/// The environment variable that sets `--worker-idle-spin-us` (agents a benchmark or `cluster
/// up` starts inherit it).
pub const WORKER_IDLE_SPIN_ENV: &str = "TELVIRT_WORKER_IDLE_SPIN_US";

#[derive(Parser, Debug)]
#[command(
    name = "telvirt",
    version,
    about = "Run network functions in QEMU/KVM virtual machines or verified WebAssembly, managed by one control plane",
    after_help = "Server and token come from --server/--token, TELVIRT_SERVER/TELVIRT_TOKEN, or the client \
config file (--config, TELVIRT_CONFIG, else <data-dir>/client.toml written by `telvirt serve`).\n\
Exit codes: 0 done; 2 input refused (400, 413, 415, 422); 3 caller refused (401, 403); 4 not found \
(404); 5 conflict (409, 412); 1 anything else. Under -o json an error is a problem document (RFC 9457) on stderr, with exit_code."
)]
pub struct Cli {
    /// API endpoint, e.g. https://127.0.0.1:7070
    #[arg(long, global = true, env = "TELVIRT_SERVER")]
    pub server: Option<String>,
    /// Bearer token of the management authority to act as
    #[arg(long, global = true, env = "TELVIRT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Client config file (server, token and the API's trust anchor)
    #[arg(long, global = true, env = "TELVIRT_CONFIG")]
    pub config: Option<PathBuf>,
    /// PEM certificate(s) the API's certificate must chain to, instead of the client config's
    /// `ca` [default: the client config's, else the system's trusted roots]
    #[arg(long, global = true, value_name = "FILE", env = "TELVIRT_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Output format
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    /// A table with more columns (`vnf list`: standby host, memory, labels, reason; `host
    /// list`: labels, CPUs held by VNFs, tunnel); other commands print their table
    Wide,
    Json,
    Yaml,
}

impl Output {
    /// Whether the output is for people (`table` or `wide`), not machines.
    pub fn is_table(self) -> bool {
        matches!(self, Output::Table | Output::Wide)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run an all-in-one node: controller, this host's agent and the embedded store
    Serve(ServeArgs),
    /// Run the control plane alone (API, store, scheduler); agents join over the network
    /// with `telvirt agent`
    Controller(ControllerArgs),
    /// Run this host's agent against a controller (`telvirt controller` or `telvirt serve`),
    /// authenticated with a node credential
    Agent(AgentArgs),
    /// Lay out a cluster on this machine (etcd, controllers, one agent per network namespace)
    /// and take it down again
    #[command(subcommand)]
    Cluster(crate::cluster::ClusterCommand),
    /// Manage VNFs
    #[command(subcommand)]
    Vnf(VnfCommand),
    /// Inspect hosts and their core maps
    #[command(subcommand)]
    Host(HostCommand),
    /// Manage management authorities and the host resources granted to them
    #[command(subcommand)]
    Authority(AuthorityCommand),
    /// Upload and manage wasm modules (verified at upload, named by their SHA-256)
    #[command(subcommand)]
    Module(crate::modules::ModuleCommand),
    /// Print the JSON Schema of the VNF descriptor (as YAML with -o yaml)
    Schema,
    /// One end of a moving guest's sealed stream (started by the agent only: the connection
    /// at descriptor 3, QEMU's socket at 4, the key on standard input)
    #[command(hide = true)]
    StreamRelay {
        /// `source` or `destination`
        end: String,
        /// The uid it runs as (its QEMU's own)
        uid: Option<u32>,
    },
    /// Measure telvirt against a baseline run in the same process
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Wasm runtime tools (example modules)
    #[command(subcommand)]
    Wasm(crate::wasm::WasmCommand),
    /// Manage networks: links between VNF ports, host interfaces and built-in traffic nodes
    #[command(subcommand)]
    Net(crate::net::NetCommand),
    /// Build the default vm guest image
    #[command(subcommand)]
    Image(crate::vm::ImageCommand),
    /// Latency measurement tools
    #[command(subcommand)]
    Latency(crate::latency::LatencyCommand),
    /// The node's health (`GET /v1/readyz`: store, scheduler, agent loop, data plane); exit 1
    /// when it is not ready
    Status {
        /// Wait until the node answers ready, up to SECONDS (default 60): for a node just
        /// started in the background (`telvirt serve &`), whose client config may not exist yet
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "60", value_parser = clap::value_parser!(u64).range(1..=3600))]
        wait: Option<u64>,
    },
    /// Print a shell completion script, e.g. `telvirt completion bash >
    /// /etc/bash_completion.d/telvirt`, or `source <(telvirt completion bash)`
    Completion {
        /// The shell to complete in
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(flatten)]
    pub agent: HostAgentArgs,
}

#[derive(Args, Debug)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The controller's API endpoint, e.g. https://10.0.0.1:7070; several, comma-separated, for
    /// controllers sharing an etcd store (the agent moves to the next when one does not answer)
    #[arg(long, env = "TELVIRT_CONTROLLER")]
    pub controller: String,
    /// PEM certificate(s) the controllers' certificates must chain to: the `ca` of the admin's
    /// client config, or the controller's <data-dir>/tls/server.crt when it generated its own
    /// [default: the system's trusted roots]
    #[arg(long, value_name = "FILE", env = "TELVIRT_CONTROLLER_CA")]
    pub controller_ca: Option<PathBuf>,
    /// File holding this host's node credential (`telvirt host credential NAME --out FILE`);
    /// an authority's token is refused
    #[arg(long)]
    pub token_file: PathBuf,
    /// Serve this agent's health (`GET /v1/healthz`, `/v1/readyz`: its reconcile loop,
    /// heartbeat, node calls, map snapshots and data-plane workers) on this address, e.g.
    /// 127.0.0.1:7071 [default: not served]
    #[arg(long)]
    pub health_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub agent: HostAgentArgs,
}

/// What every telvirt process keeps on its node.
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Where the store, instances, modules and the client config live [default: $XDG_DATA_HOME/telvirt or ~/.local/share/telvirt]
    #[arg(long, env = "TELVIRT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Wasm security policy (YAML or JSON: domains with their allowed permissions and
    /// signature keys); must define `operator` and `untrusted` [default: the built-in policy]
    #[arg(long)]
    pub security_policy: Option<PathBuf>,
}

/// The controller's API and host liveness.
#[derive(Args, Debug, Clone)]
pub struct ControlArgs {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// How long a host stays Ready after its last heartbeat, in milliseconds; then it is
    /// NotReady and its VNFs Unknown. Must exceed the agents' --heartbeat-interval-ms
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub host_lease_ttl_ms: u64,
    /// How long a host stays NotReady before the VNFs it held without a standby (and lost
    /// standbys) are placed again on a Ready host, in milliseconds (0: at once). An active
    /// whose standby lives on a Ready host fails over at once regardless
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    pub heal_after_ms: u64,
    /// How long a move (`vnf migrate`) may take before the controller cancels it (the VNF
    /// stays where it runs, an event says what was missing), in milliseconds
    #[arg(long, default_value_t = 120_000, value_parser = clap::value_parser!(u64).range(1000..=86_400_000))]
    pub move_timeout_ms: u64,
    /// Never move VNFs off a NotReady host (they wait there, Unknown, until it is back);
    /// failover of an active to its live standby still happens
    #[arg(long)]
    pub no_heal: bool,
    /// The store: a redb file path (the embedded default is telvirt.redb in the data dir), or
    /// etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE] for a cluster (`telvirt controller` only:
    /// several controllers share it, one leads, the others forward to it)
    #[arg(long, env = "TELVIRT_STORE")]
    pub store: Option<String>,
    /// This controller's API as the others and agents reach it [default: https://LISTEN, http:// with --plain-http]
    #[arg(long)]
    pub advertise: Option<String>,
    /// With an etcd store: how long the leader key outlives a leader that died, in
    /// milliseconds (another controller leads after it); at least 1000, etcd's lease granularity
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1000..=60_000))]
    pub leader_ttl_ms: u64,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// How the API is protected: TLS with a generated or the operator's certificate, or plain HTTP
/// on loopback when asked.
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// The API's certificate, PEM (the server's first, then any intermediates) [default: one
    /// generated on first start into <data-dir>/tls/server.crt, self-signed]
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert, PEM
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The certificate(s) clients and the other controllers must chain --tls-cert to, written
    /// into the client config as its `ca` [default: the API's certificate itself, pinned]
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// A further DNS name or IP address a generated certificate is valid for (repeatable);
    /// it always names localhost, 127.0.0.1, ::1, this host's name and a specific --listen address
    #[arg(long, value_name = "NAME", conflicts_with = "tls_cert")]
    pub tls_san: Vec<String>,
    /// Serve the API as plain HTTP, unencrypted; refused unless --listen is a loopback address
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca", "tls_san"])]
    pub plain_http: bool,
}

/// A runtime `--runtimes` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeArg {
    /// Verified WebAssembly on the data plane's workers
    Wasm,
    /// QEMU/KVM virtual machines
    Vm,
}

/// How host ports move frames (`--host-port-socket`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HostPortSocketArg {
    /// Zero-copy AF_XDP where the interface's driver has it (one receive queue, native XDP, no
    /// other XDP program), else an AF_PACKET socket with a mapped receive ring
    Auto,
    /// AF_XDP wherever the interface allows it, in copy mode where the driver has no zero-copy
    /// (veth), else an AF_PACKET socket
    AfXdp,
    /// Always an AF_PACKET socket (leaves the interface's XDP hook alone)
    AfPacket,
}

impl HostPortSocketArg {
    /// The data plane's mode for it.
    pub fn mode(self) -> telvirt_dataplane::afpacket::RxMode {
        use telvirt_dataplane::afpacket::RxMode;
        match self {
            Self::Auto => RxMode::Auto,
            Self::AfXdp => RxMode::Xdp,
            Self::AfPacket => RxMode::Packet,
        }
    }
}

/// A host agent: this host's facts, its runtimes and its heartbeat.
#[derive(Args, Debug)]
pub struct HostAgentArgs {
    /// Inventory YAML describing this host (and marking cores reserved for the host OS);
    /// discovered from /sys when omitted
    #[arg(long)]
    pub inventory: Option<PathBuf>,
    /// Name of this host [default: the kernel's hostname]
    #[arg(long, visible_alias = "host")]
    pub host_name: Option<String>,
    /// CPUs kept for the host OS, telvirt and shared emulator threads, never given to one VNF:
    /// a CPU list (`0`, `0-1,8`) or `none`, so every CPU may go to VNFs (a 2-CPU machine then
    /// fits a dedicated VNF and a shared group, but no vm VNF with `emulator: share`)
    /// [default: CPU 0 when the host has more than one CPU]. An inventory says it there instead
    #[arg(long, value_name = "CPUS", conflicts_with = "inventory", value_parser = parse_shared_cpus)]
    pub shared_cpus: Option<telvirt_sched::CpuList>,
    /// Accelerator of vm VNFs: auto probes whether KVM really boots a guest and falls back to
    /// TCG with a warning
    #[arg(long, value_enum, default_value_t = crate::vm::AccelArg::Auto)]
    pub accel: crate::vm::AccelArg,
    /// The runtimes this host offers, comma-separated. Without `vm` no QEMU is looked for and
    /// no guest image is built; vm VNFs go to other hosts, or stay Pending saying why. With
    /// it, the guest image is built and the accelerator probed when the first vm VNF starts
    #[arg(long, value_enum, value_delimiter = ',', num_args = 1.., default_values_t = [RuntimeArg::Wasm, RuntimeArg::Vm])]
    pub runtimes: Vec<RuntimeArg>,
    /// Where the default vm guest image is built and cached [default: the data dir]
    #[arg(long, env = "TELVIRT_IMAGE_CACHE")]
    pub image_cache: Option<PathBuf>,
    /// The QEMU that runs this host's vm VNFs (its version and machine types are reported
    /// with the host) [default: qemu-system-x86_64 on PATH]
    #[arg(long, value_name = "PATH", env = "TELVIRT_QEMU", value_parser = parse_qemu)]
    pub qemu: Option<PathBuf>,
    /// The user each vm VNF's QEMU changes to once started (telvirt as root): `auto`, a uid of
    /// its own leased from 1900000000-1900065535 where QEMU takes a numeric uid (else the
    /// system user `telvirt-qemu`, else `nobody`); `current`, telvirt's own user (no change);
    /// or a user name every QEMU of the host shares. What a VM got is in its warnings when it
    /// is less than asked
    #[arg(long, value_name = "USER", env = "TELVIRT_QEMU_USER", default_value = "auto", value_parser = parse_qemu_user)]
    pub qemu_user: telvirt_runtime_vm::QemuUser,
    /// Run QEMU without its seccomp sandbox (`-sandbox on,...=deny`): only to find out whether
    /// the filter kills a QEMU; each VM says so in its warnings
    #[arg(long)]
    pub no_qemu_sandbox: bool,
    /// How often the maps of running wasm VNFs are snapshotted into the data dir, in
    /// milliseconds (a SIGKILL loses at most this much map state)
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub snapshot_interval_ms: u64,
    /// Memory of this host kept from VNFs (host OS, telvirt, page cache), e.g. `2GiB`; what is
    /// left is the budget placement gives out (wasm linear memory + map bytes, vm guest RAM)
    /// [default: a tenth of physical memory, at least 1GiB]
    #[arg(long)]
    pub memory_reserve: Option<telvirt_model::ByteSize>,
    /// Where this host's data plane receives links from other hosts: IP[:PORT] of a local
    /// address (VXLAN over UDP, port 4789 when left out), and its standby instances their
    /// actives' state (TCP, same address and port); without it, links between this host and
    /// another wait and standby instances here receive no state
    #[arg(long)]
    pub tunnel_address: Option<String>,
    /// How often this host's agent sends a heartbeat, in milliseconds
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub heartbeat_interval_ms: u64,
    /// VNFs the agent works on at once (a VM boot never holds another VNF back)
    #[arg(long, default_value_t = telvirt_agent::DEFAULT_WORKERS)]
    pub workers: std::num::NonZeroUsize,
    /// How often the agent looks at every instance even when nothing told it to, in
    /// milliseconds: a safety net (instances report their own changes: a QEMU's exit, a
    /// guest's arrival); raise it on hosts with many VNFs
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=86_400_000))]
    pub resync_interval_ms: u64,
    /// How often an active wasm instance with a standby sends its state to the standby's host
    /// (a keepalive when nothing changed), in milliseconds: the pair's heartbeat
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub pair_interval_ms: u64,
    /// Intervals of silence after which a standby takes its active for lost
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=60))]
    pub pair_detect_multiplier: u32,
    /// Never busy-poll: every data-plane worker backs off when idle, whatever a VNF's
    /// `spec.wasm.poll` says (for several hosts simulated on one machine, whose cores they
    /// share)
    #[arg(long)]
    pub no_busy_poll: bool,
    /// How long a data-plane worker that is not busy polling polls on after its last packet
    /// before it sleeps 50 µs between rounds, in microseconds (0: sleep at once). Longer
    /// keeps a shared worker's latency at a few thousand packets a second and costs its core
    /// the spin after every packet (BENCHMARKS "Idle workers sleep after 50 µs")
    #[arg(long, value_name = "MICROSECONDS", env = WORKER_IDLE_SPIN_ENV, default_value_t = IDLE_SPIN_DEFAULT_US, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub worker_idle_spin_us: u64,
    /// Run the node's async control threads (state streams of moves and standbys, the
    /// agent's reports, the API) at this SCHED_FIFO priority, 1-99, so on a loaded host they
    /// run as soon as they wake instead of after a data-plane worker's or another process's
    /// turn on the core (a wasm move's freeze waits for them). What they start (data-plane
    /// workers, QEMU, blocking work) stays SCHED_OTHER. Needs CAP_SYS_NICE [default:
    /// SCHED_OTHER, as every other thread]
    #[arg(long, value_name = "PRIORITY", env = crate::control_threads::PRIORITY_ENV, value_parser = clap::value_parser!(u8).range(1..=99))]
    pub control_priority: Option<u8>,
    /// Run the node's async control threads at this nice value, -20..=0 (SCHED_OTHER, a
    /// larger share and earlier wake-ups on a loaded host than the data-plane workers and
    /// other processes at nice 0; a wasm move's freeze waits for them). What they start stays
    /// at nice 0. 0 leaves them as every other thread; ignored with --control-priority. A
    /// value below 0 needs CAP_SYS_NICE [default: -10 where the host permits it and the node
    /// was started at SCHED_OTHER, nice 0; else as started]
    #[arg(long, value_name = "NICE", env = crate::control_threads::NICE_ENV, allow_hyphen_values = true, value_parser = clap::value_parser!(i8).range(-20..=0))]
    pub control_nice: Option<i8>,
    /// How host ports (`host:IF` in a network's links) move frames; `net show` reports what
    /// each port uses and why AF_XDP was not. AF_XDP takes every frame of the interface from
    /// the host's own stack (a packet socket only copies them): name interfaces dedicated to
    /// the data plane
    #[arg(long, value_enum, default_value_t = HostPortSocketArg::Auto)]
    pub host_port_socket: HostPortSocketArg,
}

impl HostAgentArgs {
    /// The agent's work-queue settings these arguments ask for.
    pub fn agent_config(&self) -> telvirt_agent::AgentConfig {
        telvirt_agent::AgentConfig {
            workers: self.workers,
            resync: std::time::Duration::from_millis(self.resync_interval_ms),
            ..telvirt_agent::AgentConfig::default()
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum VnfCommand {
    /// Create a VNF from a descriptor file (YAML or JSON) and start it
    Create {
        /// Descriptor file, or - for standard input
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Apply a descriptor file: create the VNF when it does not exist, otherwise change it in
    /// place where it can (labels; a wasm VNF's config and fuel per batch; a pinned vm VNF's
    /// cores, its vCPU threads moved while it runs) and print each field old → new. Any other
    /// change is refused (exit 5, conflict) naming the fields that need a re-create; nothing
    /// changes then
    Apply {
        /// Descriptor file, or - for standard input
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Print what would change and the placement it would get; change nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// List the VNFs you may see
    #[command(alias = "ls")]
    List {
        /// Only VNFs whose labels match: comma-separated `key=value`, `key!=value`, `key`
        /// (present) or `!key` (absent), all of which must hold
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
        /// VNFs asked per request (1 to 1000); every page is fetched and printed
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000), conflicts_with = "watch")]
        limit: Option<u32>,
        /// After the list, print each change as it happens (a line per change; with `-o json`
        /// one watch message per line), until interrupted
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Show one VNF with its placement
    Show { name: String },
    /// Show a VNF's lifecycle events
    Events { name: String },
    /// Ask for a VNF to run
    Start {
        name: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Ask for a VNF to stop
    Stop {
        name: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Lock a VNF: pause it and refuse every change but unlock and delete
    Lock {
        name: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Unlock a locked VNF
    Unlock {
        name: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Move a running VNF to another host with its state (a wasm VNF's maps, then its
    /// traffic; a vm's guest, live, by QEMU's migration stream); follows the move to its end
    /// with a progress bar
    Migrate(crate::migrate::MigrateArgs),
    /// Swap a running wasm VNF's module between batches, keeping its maps
    Upgrade {
        name: String,
        /// The new module: a local .wasm file (uploaded first), a `sha256:` reference of an
        /// uploaded module, or an absolute path on the node (admin, or granted)
        #[arg(long)]
        module: String,
    },
    /// Show a running wasm VNF's maps and how many entries each holds
    Maps { name: String },
    /// Change one map of a running wasm VNF (a firewall rule, a UPF's bearer): delete keys,
    /// then put entries, all or nothing, between two batches (keys and values in hex, of the
    /// map's sizes; an array's key is its little-endian index)
    MapUpdate(crate::wasm::MapUpdateArgs),
    /// Show a running VNF's counters: a wasm VNF's batches, packets in/forwarded/dropped,
    /// traps and the module's own (e.g. the firewall's allowed/denied); a vm VNF's NICs (frames
    /// to and from the guest, drops on the host's side)
    Stats { name: String },
    /// Show the last lines of a vm VNF's serial console (read on its host, through its agent)
    Console(crate::vm::ConsoleArgs),
    /// Show a VNF's log: a wasm module's log lines (the newest 64 its instance keeps), a vm
    /// VNF's serial console; `-f` follows it until interrupted
    Logs {
        name: String,
        /// Keep printing new lines as they come (polls every 500 ms; -o json prints one JSON
        /// object per line)
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Grant a device to a vm VNF; its agent attaches it to the running VM
    Attach(crate::vm::AttachArgs),
    /// Revoke a granted device; its agent detaches it from the running VM
    Detach {
        name: String,
        /// The device id given to attach
        id: String,
    },
    /// Delete a VNF (stopping it first)
    #[command(alias = "rm")]
    Delete {
        name: String,
        /// Return at once instead of waiting until it is gone
        #[arg(long)]
        no_wait: bool,
        /// How long to wait until it is gone, in seconds (default 120); past it the command
        /// fails (exit 1) and the delete goes on
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "120", conflicts_with = "no_wait", value_parser = clap::value_parser!(u64).range(1..=86_400))]
        wait: Option<u64>,
    },
}

/// `--wait[=SECONDS]` of the VNF commands whose effect is a phase.
#[derive(Args, Debug, Clone, Copy)]
pub struct WaitArg {
    /// Return only once the VNF reached the phase the command asks for (Running, Stopped,
    /// Locked), printing it; fail (exit 1) when it ends Failed or is not there within SECONDS
    /// (default 300)
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "300", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub wait: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// List hosts with their status (Ready, NotReady, SchedulingDisabled) and heartbeat age
    List,
    /// Show a host and its core map
    Show { name: String },
    /// Place nothing new on a host (admin only); what it runs stays
    Cordon { name: String },
    /// Let the scheduler place on a host again (admin only)
    Uncordon { name: String },
    /// Cordon a host and move its VNFs back to Pending, to be placed elsewhere (admin only)
    Drain { name: String },
    /// Delete a host that holds no VNF and sends no heartbeat, e.g. the old name of a renamed
    /// host (admin only)
    #[command(alias = "rm")]
    Delete { name: String },
    /// Issue a host's node credential for `telvirt agent --token-file` (admin only); its
    /// previous one stops working
    Credential {
        name: String,
        /// Write the token to this file (mode 0600) instead of printing it
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Give the cluster a new replication secret (admin only): every stream of a VNF's state to
    /// its standby takes a new key from it, on the connection it holds. Refused while a move is
    /// under way
    RotateReplicationSecret,
}

#[derive(Subcommand, Debug)]
pub enum AuthorityCommand {
    /// Create an authority; its token is shown once
    Create {
        name: String,
        /// Wasm security domain of its modules (a domain of the node's security policy:
        /// operator, trusted, untrusted by default) [default: untrusted]
        #[arg(long)]
        domain: Option<String>,
    },
    /// List authorities
    List,
    /// Grant host resources to an authority (admin only): paths for vm kernels, initrds, disks,
    /// blk devices and module files; interfaces for `host:IF` links; TAPs for net devices
    Grant(GrantArgs),
    /// Take granted host resources back (admin only; refused while a VNF or network uses them)
    Revoke(GrantArgs),
    /// Show the host resources granted to an authority (yours, or any for admin)
    Grants { name: String },
    /// Give an authority a new token, shown once; the old one stops working at once (your own,
    /// or any for admin)
    RotateToken { name: String },
    /// Delete an authority with its token and grants (admin only; refused while it owns VNFs
    /// or networks, naming them)
    #[command(alias = "rm")]
    Delete { name: String },
}

#[derive(Args, Debug)]
pub struct GrantArgs {
    /// The authority
    pub name: String,
    /// A host path; a trailing `/` means everything below that directory (`/srv/images/`)
    #[arg(long = "path")]
    pub paths: Vec<String>,
    /// A host interface for `host:IF` links; a trailing `*` means a prefix (`veth*`)
    #[arg(long = "interface")]
    pub interfaces: Vec<String>,
    /// An existing TAP device for `kind: net` devices; a trailing `*` means a prefix (`tv-*`)
    #[arg(long = "tap")]
    pub taps: Vec<String>,
}

/// `--shared-cpus`: a CPU list, or `none`.
/// A `--qemu` path: a file, made absolute (a bare name would otherwise be looked up on PATH
/// when run, not where it was checked).
pub(crate) fn parse_qemu(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    if !path.is_file() {
        return Err(
            "no such file: give the path of a QEMU system emulator (qemu-system-x86_64)".into(),
        );
    }
    std::path::absolute(&path).map_err(|e| format!("cannot make it absolute: {e}"))
}

/// A `--qemu-user`: `auto`, `current`, or a user name (whether this host has such a user, not
/// root, is checked only where the vm runtime runs: [`crate::agent::host_records`]).
fn parse_qemu_user(text: &str) -> Result<telvirt_runtime_vm::QemuUser, String> {
    text.parse()
        .map_err(|e: telvirt_runtime_vm::Error| e.to_string())
}

fn parse_shared_cpus(text: &str) -> Result<telvirt_sched::CpuList, String> {
    if text == "none" {
        return Ok(telvirt_sched::CpuList::new());
    }
    text.parse()
        .map_err(|e| format!("{e}; give a CPU list such as 0 or 0-1,8, or none"))
}
