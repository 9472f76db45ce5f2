//! Fencing of this host's active instances that have a standby elsewhere: such an instance
//! forwards only while its host holds its lease with the controller or its standby still
//! acknowledges its state, and never once a peer told it of a higher epoch (ADR 054).
//!
//! The controller makes a standby the active only when the active's agent is gone (its
//! connection closed) or when both the active's lease ran out and the standby stopped hearing
//! it. The gate closes before either can be true of a live active: its lease counts as lapsed
//! a quarter of the TTL before the controller's, and the standby's silence is twice what the
//! gate waits for an acknowledgement. The data plane's worker asks the gate before each poll,
//! so a process that was stopped and goes on finds its gate closed before it forwards a packet.
//!
//! Owns the lease clock, each instance's gate and the rules above. It must not decide roles
//! (assignments say which instance is active, at which epoch) nor stop instances.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use telvirt_api::Assignment;
use telvirt_model::{Name, Role};
use tokio::sync::Notify;

/// The part of the controller's lease TTL after the last heartbeat it took within which this
/// host still counts itself as holding the lease (measured from when that heartbeat was sent,
/// which is before the controller took it).
const LEASE_SHARE_NUM: u32 = 3;
const LEASE_SHARE_DEN: u32 = 4;

/// What an instance's gate lets through.
const OPEN: u8 = 0;
const CLOSED: u8 = 1;
const LEASED: u8 = 2;

/// The clock the gates read: nanoseconds since the agent started.
#[derive(Debug)]
struct LeaseClock {
    base: Instant,
    /// Until when this host holds its lease (ns since `base`); `u64::MAX`: the controller keeps
    /// no lease for it (nothing to fence by).
    lease_until: AtomicU64,
}

impl LeaseClock {
    fn at(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Whether one instance forwards. Shared with the data plane's worker, which asks
/// [`ForwardGate::open`] before each poll.
#[derive(Debug)]
pub struct ForwardGate {
    clock: Arc<LeaseClock>,
    mode: AtomicU8,
    /// The epoch of the assignment that set the mode.
    epoch: AtomicU64,
    /// A peer holds this epoch: an instance of a lower one never forwards.
    fenced_below: AtomicU64,
    /// Until when the standby's last acknowledgement keeps the instance forwarding (ns).
    acked_until: AtomicU64,
}

impl ForwardGate {
    /// Whether the instance may forward now.
    pub fn open(&self) -> bool {
        match self.mode.load(Ordering::Acquire) {
            OPEN => true,
            CLOSED => false,
            _ => self.leased_open(self.clock.at(Instant::now())),
        }
    }

    fn leased_open(&self, now: u64) -> bool {
        self.epoch.load(Ordering::Acquire) >= self.fenced_below.load(Ordering::Acquire)
            && (now < self.clock.lease_until.load(Ordering::Acquire)
                || now < self.acked_until.load(Ordering::Acquire))
    }

    /// The standby acknowledged the instance's state: it keeps forwarding for `window` more,
    /// whatever its lease.
    pub fn acknowledged(&self, window: Duration) {
        let until = self.clock.at(Instant::now() + window);
        self.acked_until.fetch_max(until, Ordering::AcqRel);
    }

    /// A peer holds the pair at `epoch`: an instance assigned a lower one stops forwarding
    /// for good (until an assignment names a higher epoch). Returns whether it fenced.
    pub fn fence_below(&self, epoch: u64) -> bool {
        self.fenced_below.fetch_max(epoch, Ordering::AcqRel);
        self.epoch.load(Ordering::Acquire) < epoch
    }

    /// Whether the assignments make the instance an active (its gate open or leased), whatever
    /// its lease says at this moment; a standby's never.
    pub fn assigned_active(&self) -> bool {
        self.mode.load(Ordering::Acquire) != CLOSED
    }

    fn set(&self, mode: u8, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
        self.mode.store(mode, Ordering::Release);
    }
}

/// This host's lease and the gates of its instances.
#[derive(Debug)]
pub struct Fencing {
    clock: Arc<LeaseClock>,
    gates: Mutex<HashMap<Name, Arc<ForwardGate>>>,
    /// A heartbeat the controller took after the lease had lapsed (when it was sent): the lease
    /// holds again only once the assignments read after it set every gate.
    pending: Mutex<Option<(Instant, Duration)>>,
    /// Signalled when `pending` is set: the agent lists its assignments at once.
    confirm: Notify,
}

impl Default for Fencing {
    fn default() -> Self {
        Self::new()
    }
}

/// How an assignment sets its instance's gate: a standby never forwards; an active with a
/// standby forwards under the lease; any other active always does.
fn mode_of(a: &Assignment) -> u8 {
    match (a.placement.role, &a.standby) {
        (Role::Standby, _) => CLOSED,
        (Role::Active, Some(_)) => LEASED,
        (Role::Active, None) => OPEN,
    }
}

impl Fencing {
    pub fn new() -> Self {
        Self {
            clock: Arc::new(LeaseClock {
                base: Instant::now(),
                lease_until: AtomicU64::new(u64::MAX),
            }),
            gates: Mutex::new(HashMap::new()),
            pending: Mutex::new(None),
            confirm: Notify::new(),
        }
    }

    fn gates(&self) -> std::sync::MutexGuard<'_, HashMap<Name, Arc<ForwardGate>>> {
        self.gates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The gate of `vnf`'s instance on this host (made closed when no assignment set it yet).
    pub fn gate(&self, vnf: &Name) -> Arc<ForwardGate> {
        Arc::clone(self.gates().entry(vnf.clone()).or_insert_with(|| {
            Arc::new(ForwardGate {
                clock: Arc::clone(&self.clock),
                mode: AtomicU8::new(CLOSED),
                epoch: AtomicU64::new(0),
                fenced_below: AtomicU64::new(0),
                acked_until: AtomicU64::new(0),
            })
        }))
    }

    /// Sets every gate as `assignments` (all of this host's) say; the gate of an instance no
    /// longer assigned here closes.
    pub fn assign(&self, assignments: &[Assignment]) {
        let by_name: HashMap<&Name, &Assignment> =
            assignments.iter().map(|a| (&a.vnf, a)).collect();
        for a in assignments {
            self.gate(&a.vnf).set(mode_of(a), a.epoch);
        }
        // A gate no longer assigned closes; one nothing else holds any more (its instance is
        // gone) is forgotten.
        self.gates().retain(|name, gate| {
            if by_name.contains_key(name) {
                return true;
            }
            gate.set(CLOSED, gate.epoch.load(Ordering::Acquire));
            Arc::strong_count(gate) > 1
        });
    }

    /// The controller took a heartbeat sent at `sent`; its lease lasts `ttl` (`None`: it keeps
    /// none). Extends the lease, unless it had lapsed: then it holds again only once
    /// [`Fencing::confirm`] runs after the assignments are read anew. Returns whether it had
    /// lapsed.
    pub fn renewed(&self, sent: Instant, ttl: Option<Duration>) -> bool {
        let Some(ttl) = ttl else {
            self.clock.lease_until.store(u64::MAX, Ordering::Release);
            return false;
        };
        let now = self.clock.at(Instant::now());
        let lease_until = self.clock.lease_until.load(Ordering::Acquire);
        if lease_until != u64::MAX && now >= lease_until {
            *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some((sent, ttl));
            self.confirm.notify_one();
            return true;
        }
        self.extend(sent, ttl);
        false
    }

    fn extend(&self, sent: Instant, ttl: Duration) {
        let held = ttl * LEASE_SHARE_NUM / LEASE_SHARE_DEN;
        self.clock
            .lease_until
            .store(self.clock.at(sent + held), Ordering::Release);
    }

    /// The heartbeat waiting for the assignments to confirm the lease, if any: taken before
    /// the assignments are read, given to [`Fencing::confirm`] after [`Fencing::assign`].
    pub fn take_pending(&self) -> Option<(Instant, Duration)> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Keeps `pending` waiting (the assignments could not be read), unless a newer one came.
    pub fn put_back(&self, pending: (Instant, Duration)) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(pending);
    }

    /// The assignments read after the heartbeat `pending` set every gate: the lease holds again.
    pub fn confirm(&self, pending: (Instant, Duration)) {
        self.extend(pending.0, pending.1);
    }

    /// Waits until a heartbeat after a lapse wants the assignments read.
    pub async fn confirm_wanted(&self) {
        self.confirm.notified().await;
    }

    /// Whether this host's lease has lapsed (it is kept, and has not been renewed in time).
    pub fn lapsed(&self) -> bool {
        let until = self.clock.lease_until.load(Ordering::Acquire);
        until != u64::MAX && self.clock.at(Instant::now()) >= until
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use telvirt_api::Assignment;
    use telvirt_model::api::StandbyPeer;
    use telvirt_model::{DesiredState, Format, Placement, parse_vnf};

    pub(crate) fn assignment(role: Role, standby: bool, epoch: u64) -> Assignment {
        let descriptor = parse_vnf(
            b"apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: natp }\nspec:\n  runtime: wasm\n  cpu: { policy: dedicated, count: 1 }\n  ports: [in, out]\n  wasm: { module: nat.wasm }\n",
            Format::Yaml,
        )
        .unwrap();
        Assignment {
            vnf: descriptor.name().clone(),
            descriptor,
            placement: Placement {
                role,
                host: "h1".into(),
                vcpus: vec![vec![1]],
                emulator_cpus: Vec::new(),
                held: Vec::new(),
                numa_nodes: vec![0],
                group: None,
            },
            desired: DesiredState::Running,
            locked: false,
            memory_bytes: 0,
            generation: 1,
            devices: Vec::new(),
            domain: "d".into(),
            standby: standby.then(|| StandbyPeer {
                host: "h2".into(),
                address: "127.0.0.2:1".into(),
                move_id: 0,
                key: telvirt_model::api::PairKey::new([5; 32]),
            }),
            epoch,
            incoming_from: None,
            hand_off: false,
            resume_moved_copy: false,
            active_from: None,
            active_key: None,
        }
    }

    fn natp() -> Name {
        "natp".parse().unwrap()
    }

    #[test]
    fn a_gate_is_closed_until_an_assignment_opens_it_and_a_standby_never_forwards() {
        let f = Fencing::new();
        let gate = f.gate(&natp());
        assert!(!gate.open());
        f.assign(&[assignment(Role::Active, false, 0)]);
        assert!(gate.open());
        f.assign(&[assignment(Role::Standby, false, 1)]);
        assert!(!gate.open());
        f.assign(&[assignment(Role::Active, true, 1)]);
        assert!(gate.open(), "no lease kept: nothing to fence by");
        f.assign(&[]);
        assert!(!gate.open(), "no longer assigned here");
    }

    #[test]
    fn a_paired_active_stops_once_both_its_lease_and_its_standby_are_gone() {
        let f = Fencing::new();
        let gate = f.gate(&natp());
        f.assign(&[assignment(Role::Active, true, 3)]);
        let now = Instant::now();
        // A lease of 400 ms taken now: held for 300 ms.
        assert!(!f.renewed(now, Some(Duration::from_millis(400))));
        let at = |ms: u64| f.clock.at(now + Duration::from_millis(ms));
        assert!(gate.leased_open(at(299)));
        assert!(!gate.leased_open(at(300)));
        // The standby's acknowledgement carries it on.
        gate.acked_until
            .store(at(350), std::sync::atomic::Ordering::Release);
        assert!(gate.leased_open(at(349)));
        assert!(!gate.leased_open(at(350)));
    }

    #[test]
    fn after_a_lapse_only_the_assignments_read_anew_bring_the_lease_back() {
        let f = Fencing::new();
        let gate = f.gate(&natp());
        f.assign(&[assignment(Role::Active, true, 1)]);
        // A heartbeat sent a second ago with a lease of 4 ms: lapsed.
        let long_ago = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
        assert!(!f.renewed(long_ago, Some(Duration::from_millis(4))));
        assert!(f.lapsed() && !gate.open());
        // A heartbeat goes through again: still fenced until the assignments are read.
        assert!(f.renewed(Instant::now(), Some(Duration::from_secs(60))));
        assert!(!gate.open());
        let pending = f.take_pending().unwrap();
        // They say the standby took over: the instance is the standby now.
        f.assign(&[assignment(Role::Standby, false, 2)]);
        f.confirm(pending);
        assert!(!f.lapsed() && !gate.open());
        // Another host's VNF of the same epoch as before would be open again.
        f.assign(&[assignment(Role::Active, true, 2)]);
        assert!(gate.open());
    }

    #[test]
    fn a_higher_epoch_from_a_peer_fences_until_an_assignment_names_one() {
        let f = Fencing::new();
        let gate = f.gate(&natp());
        f.assign(&[assignment(Role::Active, true, 4)]);
        assert!(gate.open());
        assert!(!gate.fence_below(4), "its own epoch fences nothing");
        assert!(gate.open());
        assert!(gate.fence_below(5));
        assert!(!gate.open());
        // The stale assignment again: still fenced.
        f.assign(&[assignment(Role::Active, true, 4)]);
        assert!(!gate.open());
        f.assign(&[assignment(Role::Active, true, 6)]);
        assert!(gate.open());
    }
}
