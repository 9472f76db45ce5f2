//! The `/metrics` exposition, with the `prometheus-client` crate. Owns the metrics the API and
//! controller update as they work (requests and their latency, events, placements and how long
//! VNFs waited for one) and the encoding of a [`Scrape`] (what the store, the scheduler and the
//! hosts' agents hold at scrape time) into metric families, in the Prometheus text format or
//! OpenMetrics. It must not block (the live metrics are atomics) and must not gather anything
//! itself: the scrape is read by `Controller::scrape`, confined to what the caller may see.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use telvirt_api::VnfUsage;
use telvirt_model::api::{CpuUse, HostView, WasmStatsView};
use telvirt_model::network::{HostPortStatus, Network, NetworkStatus, SINK_LATENCY_BOUNDS_NS};
use telvirt_model::{Phase, Vnf};

type RequestLabels = [(&'static str, String); 3];
type RouteLabels = [(&'static str, String); 2];
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Content type of the OpenMetrics text format, served when the scraper asks for it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The lifecycle phases, in the order the per-phase gauge lists them.
const PHASES: [Phase; 9] = [
    Phase::Pending,
    Phase::Scheduled,
    Phase::Starting,
    Phase::Running,
    Phase::Locked,
    Phase::Stopping,
    Phase::Stopped,
    Phase::Failed,
    Phase::Unknown,
];

fn request_latency() -> Histogram {
    // 0.5 ms to about 16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The metrics the API and controller update as they work.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    request_seconds: HistogramFamily<RouteLabels>,
    events: Counter,
    placements: Counter,
    pending_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(request_latency),
            events: Counter::default(),
            placements: Counter::default(),
            // 1 ms to about 2 min.
            pending_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
        }
    }
}

impl Metrics {
    /// One API request answered with `status` after `took`.
    pub fn request(&self, method: &str, route: &str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&[
                ("method", method.to_owned()),
                ("route", route.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
        self.request_seconds
            .get_or_create(&[("method", method.to_owned()), ("route", route.to_owned())])
            .observe(took.as_secs_f64());
    }

    pub fn event(&self) {
        self.events.inc();
    }

    /// A VNF placed; `pending_since` is when it last changed before (RFC 3339), so the time
    /// it waited for a placement.
    pub fn placement(&self, pending_since: &str) {
        self.placements.inc();
        if let Ok(since) = humantime::parse_rfc3339(pending_since) {
            let waited = SystemTime::now()
                .duration_since(since)
                .unwrap_or(Duration::ZERO);
            self.pending_seconds.observe(waited.as_secs_f64());
        }
    }

    /// The exposition of these metrics and of `scrape`: Prometheus text (0.0.4), or
    /// OpenMetrics when `openmetrics`.
    pub fn render(&self, scrape: Scrape, openmetrics: bool) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register(
            "telvirt_build",
            "telvirt version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "telvirt_http_requests",
            "API requests answered, by method, route and status",
            self.requests.clone(),
        );
        registry.register(
            "telvirt_http_request_duration_seconds",
            "Time to answer an API request, by method and route",
            self.request_seconds.clone(),
        );
        registry.register(
            "telvirt_events",
            "Lifecycle events recorded",
            self.events.clone(),
        );
        registry.register(
            "telvirt_placements",
            "VNFs placed by the scheduler",
            self.placements.clone(),
        );
        registry.register(
            "telvirt_scheduling_wait_seconds",
            "Time a VNF waited between its last change (creation, start, heal) and its placement",
            self.pending_seconds.clone(),
        );
        registry.register_collector(Box::new(scrape));
        let mut out = String::new();
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &registry)?;
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        }
        Ok(out)
    }
}

/// What one scrape read, confined to what its caller may see: admin sees everything; an
/// authority its own VNFs and networks (with their counters) and nothing of hosts, the store
/// or the node's process.
#[derive(Debug, Default)]
pub struct Scrape {
    /// Hosts, store and process families are filled (admin).
    pub admin: bool,
    /// The VNFs, in name order.
    pub vnfs: Vec<Vnf>,
    /// What the hosts' agents reported for those VNFs, by VNF name.
    pub usage: BTreeMap<String, VnfUsage>,
    /// The networks with their status as the hosts' data planes hold them.
    pub networks: Vec<Network>,
    /// Admin: every host.
    pub hosts: Vec<HostView>,
    /// Admin: each host asked for its VNFs' usage, and whether its agent answered in time.
    pub host_answers: Vec<(String, bool)>,
    /// Admin: the store's size on disk and revision.
    pub store_bytes: Option<u64>,
    pub store_revision: u64,
    /// When the scrape was read.
    pub now: Option<SystemTime>,
}

/// Each of the networks' parts that `parts` picks from a status (its links, its sinks), labelled
/// by its network and, under `key`, by its `name`.
fn per_network<'a, T: 'a>(
    networks: &'a [Network],
    key: &'static str,
    parts: fn(&'a NetworkStatus) -> &'a [T],
    name: fn(&T) -> String,
) -> impl Iterator<Item = ([(&'static str, String); 2], &'a T)> + 'a {
    networks.iter().flat_map(move |n| {
        n.status.iter().flat_map(move |st| {
            parts(st)
                .iter()
                .map(move |p| ([("network", n.name.to_string()), (key, name(p))], p))
        })
    })
}

/// A histogram given by its buckets (counts per bucket, not cumulative), sum and count.
struct BucketHistogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for BucketHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// One sample of an info family: its labels say it all (`<name>_info{...} 1`).
struct InfoSample;

impl EncodeMetric for InfoSample {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_info(&NO_LABELS)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Info
    }
}

/// Writes one family: its descriptor, then one sample per row. A family without rows is left
/// out, as Prometheus's own clients leave out empty families.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    rows: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut rows = rows.into_iter().peekable();
    if rows.peek().is_none() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in rows {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn seconds(ns: u64) -> ConstCounter<f64> {
    ConstCounter::new(ns as f64 / 1e9)
}

fn gauge(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

fn vnf_label(name: &str) -> [(&'static str, String); 1] {
    [("vnf", name.to_owned())]
}

/// Seconds since an RFC 3339 time, or zero when it cannot be read.
fn age_seconds(now: SystemTime, since: &str) -> f64 {
    humantime::parse_rfc3339(since)
        .ok()
        .and_then(|t| now.duration_since(t).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_vnfs(&mut e)?;
        self.encode_usage(&mut e)?;
        self.encode_networks(&mut e)?;
        if self.admin {
            self.encode_hosts(&mut e)?;
            self.encode_node(&mut e)?;
        }
        Ok(())
    }
}

impl Scrape {
    fn encode_vnfs(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut phases: BTreeMap<&str, u64> = BTreeMap::new();
        for v in &self.vnfs {
            *phases.entry(v.phase.as_str()).or_insert(0) += 1;
        }
        family(
            e,
            "telvirt_vnfs",
            "VNFs by lifecycle phase",
            MetricType::Gauge,
            PHASES.iter().map(|p| {
                let n = phases.get(p.as_str()).copied().unwrap_or(0);
                ([("phase", p.as_str().to_owned())], gauge(n))
            }),
        )?;
        family(
            e,
            "telvirt_vnf",
            "One per VNF: its owner, runtime and the host of its active instance (empty while unplaced)",
            MetricType::Info,
            self.vnfs.iter().map(|v| {
                let host = v
                    .placements
                    .iter()
                    .find(|p| p.role == telvirt_model::Role::Active)
                    .map_or_else(String::new, |p| p.host.clone());
                (
                    [
                        ("vnf", v.name.to_string()),
                        ("authority", v.owner.to_string()),
                        ("runtime", v.descriptor.spec.runtime.as_str().to_owned()),
                        ("host", host),
                    ],
                    InfoSample,
                )
            }),
        )?;
        family(
            e,
            "telvirt_vnf_phase",
            "One per VNF: 1 for its current lifecycle phase",
            MetricType::Gauge,
            self.vnfs.iter().map(|v| {
                (
                    [
                        ("vnf", v.name.to_string()),
                        ("phase", v.phase.as_str().to_owned()),
                    ],
                    gauge(1),
                )
            }),
        )?;
        family(
            e,
            "telvirt_vnf_memory_bytes",
            "Host memory a VNF may use, as placement counts it",
            MetricType::Gauge,
            self.vnfs
                .iter()
                .map(|v| (vnf_label(v.name.as_str()), gauge(v.memory_bytes))),
        )?;
        let now = self.now.unwrap_or_else(SystemTime::now);
        let oldest = self
            .vnfs
            .iter()
            .filter(|v| v.phase == Phase::Pending)
            .map(|v| age_seconds(now, &v.updated_at))
            .fold(0.0, f64::max);
        family(
            e,
            "telvirt_pending_oldest_seconds",
            "How long the VNF waiting longest for a placement has been Pending (0: none waits)",
            MetricType::Gauge,
            [(NO_LABELS, ConstGauge::new(oldest))],
        )
    }

    fn encode_usage(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let wasm: Vec<_> = self
            .usage
            .values()
            .filter_map(|u| Some((u.vnf.as_str(), u.wasm.as_ref()?)))
            .collect();
        type Figure = fn(&WasmStatsView) -> u64;
        let counters: [(&str, &str, Figure); 7] = [
            (
                "telvirt_vnf_restarts",
                "Restarts of a wasm VNF's instance after a failure",
                |s| u64::from(s.restarts),
            ),
            (
                "telvirt_vnf_packets_received",
                "Packets a wasm VNF received",
                |s| s.packets_in,
            ),
            (
                "telvirt_vnf_packets_forwarded",
                "Packets a wasm VNF forwarded",
                |s| s.packets_forwarded,
            ),
            (
                "telvirt_vnf_packets_emitted",
                "Packets a wasm VNF created (tv_emit)",
                |s| s.packets_emitted,
            ),
            ("telvirt_vnf_batches", "Batches a wasm VNF processed", |s| {
                s.batches
            }),
            (
                "telvirt_vnf_traps",
                "Batches dropped because a wasm VNF's module trapped",
                |s| s.batches_trapped,
            ),
            (
                "telvirt_vnf_fuel_used",
                "Fuel a wasm VNF's code used (about one unit per wasm instruction): its CPU",
                |s| s.fuel_used,
            ),
        ];
        for (name, help, figure) in counters {
            family(
                e,
                name,
                help,
                MetricType::Counter,
                wasm.iter()
                    .map(|(vnf, s)| (vnf_label(vnf), counter(figure(s)))),
            )?;
        }
        family(
            e,
            "telvirt_vnf_packets_dropped",
            "Packets a wasm VNF lost, by reason: its verdict, an invalid verdict, a trap, an error status, or a port with no link",
            MetricType::Counter,
            wasm.iter().flat_map(|(vnf, s)| {
                let verdict = s
                    .packets_dropped
                    .saturating_sub(s.packets_trapped)
                    .saturating_sub(s.packets_errored)
                    .saturating_sub(s.invalid_verdicts);
                [
                    ("verdict", verdict),
                    ("invalid_verdict", s.invalid_verdicts),
                    ("trap", s.packets_trapped),
                    ("error", s.packets_errored),
                    ("unlinked", s.packets_unlinked),
                ]
                .map(|(reason, n)| {
                    (
                        [("vnf", (*vnf).to_owned()), ("reason", reason.to_owned())],
                        counter(n),
                    )
                })
            }),
        )?;
        family(
            e,
            "telvirt_vnf_module_counter",
            "A wasm VNF's module counters by their manifest names (from zero again after an upgrade)",
            MetricType::Counter,
            wasm.iter().flat_map(|(vnf, s)| {
                s.counters.iter().map(|c| {
                    (
                        [("vnf", (*vnf).to_owned()), ("counter", c.name.clone())],
                        counter(c.value),
                    )
                })
            }),
        )?;
        let vms: Vec<_> = self
            .usage
            .values()
            .filter_map(|u| Some((u.vnf.as_str(), u.vm.as_ref()?)))
            .collect();
        family(
            e,
            "telvirt_vm_resident_memory_bytes",
            "Resident memory of a vm VNF's QEMU process",
            MetricType::Gauge,
            vms.iter()
                .map(|(vnf, u)| (vnf_label(vnf), gauge(u.rss_bytes))),
        )?;
        family(
            e,
            "telvirt_vm_cpu_seconds",
            "CPU time of a vm VNF's QEMU process, every thread",
            MetricType::Counter,
            vms.iter()
                .map(|(vnf, u)| (vnf_label(vnf), seconds(u.cpu_ns))),
        )?;
        let vcpus = || {
            vms.iter().flat_map(|(vnf, u)| {
                u.vcpus.iter().map(move |c| {
                    (
                        [("vnf", (*vnf).to_owned()), ("vcpu", c.index.to_string())],
                        c,
                    )
                })
            })
        };
        family(
            e,
            "telvirt_vm_vcpu_run_seconds",
            "Time a vm VNF's vCPU thread ran on a host CPU",
            MetricType::Counter,
            vcpus().map(|(l, c)| (l, seconds(c.run_ns))),
        )?;
        family(
            e,
            "telvirt_vm_vcpu_steal_seconds",
            "Time a vm VNF's vCPU thread was runnable but waited for a host CPU (the guest's steal)",
            MetricType::Counter,
            vcpus().map(|(l, c)| (l, seconds(c.wait_ns))),
        )?;
        let nics = || {
            self.usage.values().flat_map(|u| {
                u.nics
                    .iter()
                    .map(move |n| ([("vnf", u.vnf.clone()), ("port", n.port.clone())], n))
            })
        };
        family(
            e,
            "telvirt_vm_nic_frames",
            "Frames a vm VNF's vhost-user NIC carried, by direction (to or from the guest)",
            MetricType::Counter,
            nics().flat_map(|([vnf, port], n)| {
                [
                    ("to_guest", n.frames_to_guest),
                    ("from_guest", n.frames_from_guest),
                ]
                .map(|(direction, v)| {
                    (
                        [
                            vnf.clone(),
                            port.clone(),
                            ("direction", direction.to_owned()),
                        ],
                        counter(v),
                    )
                })
            }),
        )?;
        family(
            e,
            "telvirt_vm_nic_dropped",
            "Frames a vm VNF's vhost-user NIC dropped on the host's side (too big for the guest's buffer, bad, or no buffer)",
            MetricType::Counter,
            nics().map(|(l, n)| (l, counter(n.dropped()))),
        )
    }

    fn encode_networks(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let links = || per_network(&self.networks, "link", |st| &st.links, |l| l.link.clone());
        family(
            e,
            "telvirt_link_up",
            "1 while a network's link is wired on a data plane",
            MetricType::Gauge,
            links().map(|(k, l)| (k, gauge(u64::from(l.active)))),
        )?;
        // Counters per holding host: each is that host's own and only grows while the network
        // keeps its part there; a host that did not answer leaves its series out (rather than
        // count from zero, or take another host's count in its place).
        let hosts = || {
            self.networks.iter().flat_map(|n| {
                n.status
                    .iter()
                    .flat_map(|st| &st.hosts)
                    .map(move |h| (n.name.to_string(), h))
            })
        };
        let host_links = || {
            hosts().flat_map(|(network, h)| {
                h.links.iter().map(move |l| {
                    let labels = [
                        ("network", network.clone()),
                        ("link", l.link.clone()),
                        ("host", h.host.clone()),
                    ];
                    (labels, l)
                })
            })
        };
        family(
            e,
            "telvirt_link_packets",
            "Packets a network's link carried on a host (a link between hosts counts on both)",
            MetricType::Counter,
            host_links().map(|(k, l)| (k, counter(l.packets))),
        )?;
        family(
            e,
            "telvirt_link_bytes",
            "Bytes a network's link carried on a host (a link between hosts counts on both)",
            MetricType::Counter,
            host_links().map(|(k, l)| (k, counter(l.bytes))),
        )?;
        family(
            e,
            "telvirt_link_drops",
            "Packets a network's link dropped on a host (its ring full, or the tunnel between hosts could not carry them)",
            MetricType::Counter,
            host_links().map(|(k, l)| (k, counter(l.drops))),
        )?;
        family(
            e,
            "telvirt_network_node_drops",
            "Packets a node of a network dropped outside any link on a host: sent to a port with no link, or refused by its verdict",
            MetricType::Counter,
            hosts().flat_map(|(network, h)| {
                h.node_drops.iter().flat_map(move |d| {
                    [("unlinked", d.unlinked), ("refused", d.refused)].map(|(reason, v)| {
                        (
                            [
                                ("network", network.clone()),
                                ("node", d.node.clone()),
                                ("host", h.host.clone()),
                                ("reason", reason.to_owned()),
                            ],
                            counter(v),
                        )
                    })
                })
            }),
        )?;
        // The host ports a network names, per direction: frames moved, and frames dropped
        // (on receive: by the kernel before the port took them, too big, no buffer).
        let host_ports = |counts: fn(&HostPortStatus) -> [u64; 2]| {
            per_network(
                &self.networks,
                "host",
                |st| &st.host_ports,
                |p| p.host.clone(),
            )
            .flat_map(move |([network, host], p)| {
                let [received, sent] = counts(p);
                [("received", received), ("sent", sent)].map(|(direction, n)| {
                    (
                        [
                            network.clone(),
                            host.clone(),
                            ("interface", p.interface.clone()),
                            ("direction", direction.to_owned()),
                        ],
                        counter(n),
                    )
                })
            })
        };
        family(
            e,
            "telvirt_network_host_port_frames",
            "Frames a host port of a network received from its interface or sent on it",
            MetricType::Counter,
            host_ports(|p| [p.received, p.sent]),
        )?;
        family(
            e,
            "telvirt_network_host_port_dropped",
            "Frames a host port of a network dropped: on receive (the kernel's ring full, too big, no buffer) or on send",
            MetricType::Counter,
            host_ports(|p| [p.rx_dropped, p.tx_dropped]),
        )?;
        family(
            e,
            "telvirt_network_tunnel_endpoint_dropped",
            "Datagrams a host's tunnel endpoint (of the hosts a network crosses) dropped: in the kernel (its receive buffer full), not VXLAN, for no tunnel, queued in a tunnel removed; the endpoint is the host's, repeated under each of its networks (do not sum over networks)",
            MetricType::Counter,
            per_network(
                &self.networks,
                "host",
                |st| &st.tunnel_endpoints,
                |t| t.host.clone(),
            )
            .flat_map(|([network, host], t)| {
                [
                    ("kernel", t.kernel_dropped),
                    ("not_vxlan", t.not_vxlan),
                    ("no_tunnel", t.no_tunnel),
                    ("removed_tunnel", t.removed_queued),
                ]
                .map(|(reason, n)| {
                    (
                        [network.clone(), host.clone(), ("reason", reason.to_owned())],
                        counter(n),
                    )
                })
            }),
        )?;
        let sinks = || per_network(&self.networks, "sink", |st| &st.sinks, |s| s.name.clone());
        family(
            e,
            "telvirt_sink_received",
            "Test frames a network's sink received",
            MetricType::Counter,
            sinks().map(|(k, s)| (k, counter(s.received))),
        )?;
        family(
            e,
            "telvirt_sink_lost",
            "Test frames that never reached a network's sink",
            MetricType::Counter,
            sinks().map(|(k, s)| (k, counter(s.lost))),
        )?;
        family(
            e,
            "telvirt_sink_latency_seconds",
            "One-way latency of the test frames a network's sink received, generator to sink",
            MetricType::Histogram,
            sinks().map(|(k, s)| {
                let buckets = SINK_LATENCY_BOUNDS_NS
                    .iter()
                    .map(|b| *b as f64 / 1e9)
                    .chain([f64::INFINITY])
                    .zip(s.latency_buckets.iter().copied())
                    .collect();
                (
                    k,
                    BucketHistogram {
                        sum: s.latency_sum_ns as f64 / 1e9,
                        count: s.latency_buckets.iter().sum(),
                        buckets,
                    },
                )
            }),
        )
    }

    fn encode_hosts(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let host = |h: &HostView| [("host", h.name.clone())];
        family(
            e,
            "telvirt_host_ready",
            "1 while a host's agent holds its heartbeat lease",
            MetricType::Gauge,
            self.hosts
                .iter()
                .map(|h| (host(h), gauge(u64::from(h.ready)))),
        )?;
        family(
            e,
            "telvirt_host_schedulable",
            "1 while new VNFs may be placed on a host (0 once cordoned or drained)",
            MetricType::Gauge,
            self.hosts
                .iter()
                .map(|h| (host(h), gauge(u64::from(h.schedulable)))),
        )?;
        family(
            e,
            "telvirt_host_cpus",
            "A host's logical CPUs by use: free (dedicated set, unallocated), dedicated (held by one VNF), group (a shared group's), shared, reserved, unassigned",
            MetricType::Gauge,
            self.hosts.iter().flat_map(|h| {
                let mut by_use: BTreeMap<&str, u64> = [
                    "free",
                    "dedicated",
                    "group",
                    "shared",
                    "reserved",
                    "unassigned",
                ]
                .into_iter()
                .map(|u| (u, 0))
                .collect();
                for c in &h.cpus {
                    let u = match c.usage {
                        CpuUse::Free => "free",
                        CpuUse::Vnf { .. } | CpuUse::InUse => "dedicated",
                        CpuUse::Group { .. } => "group",
                        CpuUse::Shared => "shared",
                        CpuUse::Reserved => "reserved",
                        CpuUse::Unassigned => "unassigned",
                    };
                    *by_use.entry(u).or_insert(0) += 1;
                }
                by_use
                    .into_iter()
                    .map(|(u, n)| ([("host", h.name.clone()), ("use", u.to_owned())], gauge(n)))
            }),
        )?;
        family(
            e,
            "telvirt_host_memory_bytes",
            "Memory a host offers to VNFs",
            MetricType::Gauge,
            self.hosts.iter().map(|h| (host(h), gauge(h.memory_bytes))),
        )?;
        let mut allocated: BTreeMap<&str, u64> = BTreeMap::new();
        for v in &self.vnfs {
            for p in &v.placements {
                *allocated.entry(p.host.as_str()).or_insert(0) += v.memory_bytes;
            }
        }
        family(
            e,
            "telvirt_host_memory_allocated_bytes",
            "Memory the VNF instances placed on a host may use",
            MetricType::Gauge,
            self.hosts.iter().map(|h| {
                let n = allocated.get(h.name.as_str()).copied().unwrap_or(0);
                (host(h), gauge(n))
            }),
        )?;
        family(
            e,
            "telvirt_host_scrape_success",
            "1 when a host's agent reported its VNFs' counters for this scrape in time",
            MetricType::Gauge,
            self.host_answers
                .iter()
                .map(|(h, ok)| ([("host", h.clone())], gauge(u64::from(*ok)))),
        )
    }

    fn encode_node(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        family(
            e,
            "telvirt_store_size_bytes",
            "Bytes the store takes on disk (etcd: the answering member's database)",
            MetricType::Gauge,
            self.store_bytes.map(|b| (NO_LABELS, gauge(b))),
        )?;
        family(
            e,
            "telvirt_store_revision",
            "The store's revision: that of its last change",
            MetricType::Gauge,
            [(NO_LABELS, gauge(self.store_revision))],
        )?;
        let pid = std::process::id() as i32;
        let stat = telvirt_files::proc::process(pid);
        family(
            e,
            "process_cpu_seconds",
            "User and system CPU time of this process",
            MetricType::Counter,
            stat.as_ref().map(|s| (NO_LABELS, seconds(s.cpu_ns))),
        )?;
        let gauges: [(&str, &str, Option<u64>); 5] = [
            (
                "process_resident_memory_bytes",
                "Resident memory of this process",
                stat.as_ref().map(|s| s.resident_bytes),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory of this process",
                stat.as_ref().map(|s| s.virtual_bytes),
            ),
            (
                "process_threads",
                "Threads of this process",
                stat.as_ref().map(|s| s.threads),
            ),
            (
                "process_open_fds",
                "Open file descriptors of this process",
                telvirt_files::proc::open_fds(pid),
            ),
            (
                "process_max_fds",
                "The limit on open file descriptors of this process",
                telvirt_files::proc::max_fds(pid),
            ),
        ];
        for (name, help, v) in gauges {
            family(
                e,
                name,
                help,
                MetricType::Gauge,
                v.map(|v| (NO_LABELS, gauge(v))),
            )?;
        }
        family(
            e,
            "process_start_time_seconds",
            "When this process started, seconds since the Unix epoch",
            MetricType::Gauge,
            stat.map(|s| (NO_LABELS, ConstGauge::new(s.start_time_unix_s))),
        )
    }
}

/// The label set of a family with one unlabelled sample.
const NO_LABELS: [(&str, &str); 0] = [];

#[cfg(test)]
mod tests {
    use super::*;
    use telvirt_api::{VcpuUsage, VmUsage};
    use telvirt_model::network::{HostCounts, LinkState, NodeDropState};

    fn with_a_vm() -> Scrape {
        let vm = VnfUsage {
            vnf: "vm1".into(),
            wasm: None,
            vm: Some(VmUsage {
                rss_bytes: 512 << 20,
                cpu_ns: 2_500_000_000,
                vcpus: vec![VcpuUsage {
                    index: 0,
                    run_ns: 2_000_000_000,
                    wait_ns: 30_000_000,
                }],
            }),
            nics: vec![telvirt_model::api::NicStatsView {
                port: "n3".into(),
                connected: true,
                frames_to_guest: 1200,
                frames_from_guest: 1100,
                dropped_too_big: 1,
                dropped_bad: 2,
                dropped_no_buffer: 4,
                connections: 1,
            }],
        };
        Scrape {
            admin: true,
            usage: [("vm1".to_owned(), vm)].into(),
            store_bytes: Some(4096),
            ..Scrape::default()
        }
    }

    #[test]
    fn both_formats_parse_and_carry_a_vms_usage() {
        let metrics = Metrics::default();
        metrics.request("GET", "/v1/vnfs/{name}", 200, Duration::from_millis(3));
        let text = metrics.render(with_a_vm(), false).unwrap();
        let parsed = openmetrics_parser::prometheus::parse_prometheus(&text)
            .unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        for family in [
            "telvirt_vm_resident_memory_bytes",
            "telvirt_vm_vcpu_steal_seconds_total",
            "telvirt_http_request_duration_seconds",
            "process_resident_memory_bytes",
        ] {
            assert!(parsed.families.contains_key(family), "{family}:\n{text}");
        }
        assert!(
            text.contains("telvirt_vm_vcpu_steal_seconds_total{vnf=\"vm1\",vcpu=\"0\"} 0.03\n"),
            "{text}"
        );
        assert!(text.contains("telvirt_vm_resident_memory_bytes{vnf=\"vm1\"} 536870912\n"));
        for line in [
            "telvirt_vm_nic_frames_total{vnf=\"vm1\",port=\"n3\",direction=\"to_guest\"} 1200\n",
            "telvirt_vm_nic_frames_total{vnf=\"vm1\",port=\"n3\",direction=\"from_guest\"} 1100\n",
            "telvirt_vm_nic_dropped_total{vnf=\"vm1\",port=\"n3\"} 7\n",
        ] {
            assert!(text.contains(line), "{line}{text}");
        }
        let open = metrics.render(with_a_vm(), true).unwrap();
        assert!(open.ends_with("# EOF\n"), "{open}");
        openmetrics_parser::openmetrics::parse_openmetrics(&open)
            .unwrap_or_else(|e| panic!("{e:?}\n{open}"));
    }

    #[test]
    fn a_networks_host_ports_and_tunnel_endpoints_are_counted() {
        let descriptor = telvirt_model::parse_network(
            b"apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: wire }\nspec:\n  links: [host:a1 -> fw1.in]\n",
            telvirt_model::Format::Yaml,
        )
        .unwrap();
        let port = telvirt_model::network::HostPortStatus {
            host: "h1".into(),
            interface: "a1".into(),
            socket: "tpacket_v3".into(),
            af_xdp_refused: None,
            af_xdp_queues: None,
            received: 900,
            sent: 800,
            rx_dropped: 7,
            tx_dropped: 3,
        };
        let network = Network {
            name: "wire".parse().unwrap(),
            owner: "admin".parse().unwrap(),
            descriptor,
            created_at: String::new(),
            vni: 0,
            vnis: 0,
            status: Some(NetworkStatus {
                links: Vec::new(),
                table: String::new(),
                waiting: Vec::new(),
                steering: Vec::new(),
                node_drops: Vec::new(),
                sinks: Vec::new(),
                host_ports: vec![port],
                tunnel_endpoints: vec![telvirt_model::network::TunnelEndpointStatus {
                    host: "h2".into(),
                    address: "10.0.0.2:4789".into(),
                    received: 50,
                    kernel_dropped: 1,
                    not_vxlan: 2,
                    no_tunnel: 4,
                    removed_queued: 5,
                }],
                departed: Vec::new(),
                // The link between hosts as each counted it.
                hosts: [("h1", 900, 0, 0), ("h2", 850, 6, 8)]
                    .map(|(host, packets, drops, refused)| HostCounts {
                        host: host.into(),
                        links: vec![LinkState {
                            link: "host:a1 -> fw1.in".into(),
                            active: true,
                            packets,
                            bytes: packets * 64,
                            drops,
                            since: String::new(),
                        }],
                        node_drops: vec![NodeDropState {
                            node: "fw1".into(),
                            unlinked: 0,
                            refused,
                        }],
                    })
                    .into(),
            }),
        };
        let scrape = Scrape {
            networks: vec![network],
            ..with_a_vm()
        };
        let text = Metrics::default().render(scrape, false).unwrap();
        openmetrics_parser::prometheus::parse_prometheus(&text)
            .unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        let labels = |d: &str| {
            format!("{{network=\"wire\",host=\"h1\",interface=\"a1\",direction=\"{d}\"}}")
        };
        for line in [
            format!(
                "telvirt_network_host_port_frames_total{} 900\n",
                labels("received")
            ),
            format!(
                "telvirt_network_host_port_frames_total{} 800\n",
                labels("sent")
            ),
            format!(
                "telvirt_network_host_port_dropped_total{} 7\n",
                labels("received")
            ),
            format!(
                "telvirt_network_host_port_dropped_total{} 3\n",
                labels("sent")
            ),
            "telvirt_network_tunnel_endpoint_dropped_total{network=\"wire\",host=\"h2\",reason=\"kernel\"} 1\n".to_owned(),
            "telvirt_network_tunnel_endpoint_dropped_total{network=\"wire\",host=\"h2\",reason=\"no_tunnel\"} 4\n".to_owned(),
            "telvirt_network_tunnel_endpoint_dropped_total{network=\"wire\",host=\"h2\",reason=\"removed_tunnel\"} 5\n".to_owned(),
            "telvirt_link_packets_total{network=\"wire\",link=\"host:a1 -> fw1.in\",host=\"h1\"} 900\n".to_owned(),
            "telvirt_link_packets_total{network=\"wire\",link=\"host:a1 -> fw1.in\",host=\"h2\"} 850\n".to_owned(),
            "telvirt_link_drops_total{network=\"wire\",link=\"host:a1 -> fw1.in\",host=\"h2\"} 6\n".to_owned(),
            "telvirt_network_node_drops_total{network=\"wire\",node=\"fw1\",host=\"h2\",reason=\"refused\"} 8\n".to_owned(),
        ] {
            assert!(text.contains(&line), "{line}{text}");
        }
    }

    #[test]
    fn an_authority_gets_no_host_store_or_process_family() {
        let scrape = Scrape {
            admin: false,
            ..with_a_vm()
        };
        let text = Metrics::default().render(scrape, false).unwrap();
        for hidden in ["telvirt_host_", "telvirt_store_", "process_"] {
            assert!(!text.contains(hidden), "{hidden}:\n{text}");
        }
    }
}
