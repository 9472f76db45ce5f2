//! Choosing hardware threads inside one NUMA node for one VNF role, per thread policy.
//!
//! Owns the deterministic within-node choice (lowest core index first, sibling pairs first under
//! `prefer`). Must not choose hosts or nodes, and must not change state: it only reads which
//! threads are available through a predicate.

use crate::inventory::Topology;
use crate::request::ThreadPolicy;

/// The threads chosen for one role on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Picked {
    pub vcpus: Vec<u32>,
    pub emulator: Option<u32>,
    pub held: Vec<u32>,
}

fn core_threads(topo: &Topology, core: u32) -> std::ops::Range<u32> {
    let c = &topo.cores[core as usize];
    c.first..c.first + c.nthreads
}

/// Cores of `node` whose threads are all dedicated and available, ordered: cores holding a
/// `keep` thread first (in `keep` order), then ascending.
fn whole_cores(
    topo: &Topology,
    node: u32,
    avail: &dyn Fn(u32) -> bool,
    keep: &[u32],
    min_threads: u32,
) -> Vec<u32> {
    let n = &topo.nodes[node as usize];
    let ok = |c: u32| {
        let core = &topo.cores[c as usize];
        core.whole && core.nthreads >= min_threads && core_threads(topo, c).all(avail)
    };
    let mut out: Vec<u32> = Vec::new();
    for &t in keep {
        let c = topo.threads[t as usize].core;
        if topo.cores[c as usize].node == node && !out.contains(&c) && ok(c) {
            out.push(c);
        }
    }
    for c in n.cores.clone() {
        if (keep.is_empty() || !out.contains(&c)) && ok(c) {
            out.push(c);
        }
    }
    out
}

/// Picks `n` vCPU threads (+1 emulator thread when `emulator`) on `node` for a dedicated role.
/// `keep` lists threads the role already holds (resize): they are reused first, in order.
pub(crate) fn pick_dedicated(
    topo: &Topology,
    node: u32,
    avail: &dyn Fn(u32) -> bool,
    policy: ThreadPolicy,
    n: u32,
    emulator: bool,
    keep: &[u32],
) -> Option<Picked> {
    let want = (n + emulator as u32) as usize;
    let mut taken: Vec<u32> = Vec::with_capacity(want);
    let mut held = Vec::new();
    match policy {
        ThreadPolicy::Isolate => {
            let cores = whole_cores(topo, node, avail, keep, 1);
            if cores.len() < want {
                return None;
            }
            for &c in &cores[..want] {
                let r = core_threads(topo, c);
                let first = keep
                    .iter()
                    .copied()
                    .find(|t| r.contains(t))
                    .unwrap_or(r.start);
                taken.push(first);
                held.extend(r.filter(|&t| t != first));
            }
        }
        ThreadPolicy::Require => {
            let cores = whole_cores(topo, node, avail, keep, 2);
            for c in cores {
                if taken.len() >= want {
                    break;
                }
                for t in core_threads(topo, c) {
                    if taken.len() < want {
                        taken.push(t);
                    } else {
                        held.push(t);
                    }
                }
            }
            if taken.len() < want {
                return None;
            }
        }
        ThreadPolicy::Prefer => {
            let node_ref = &topo.nodes[node as usize];
            let usable = |t: u32| {
                topo.threads[t as usize].class == crate::inventory::Class::Dedicated && avail(t)
            };
            for &t in keep {
                if taken.len() < want
                    && topo.node_of_thread(t) == node
                    && usable(t)
                    && !taken.contains(&t)
                {
                    taken.push(t);
                }
            }
            let mut need = want - taken.len();
            // Cores with available threads: all of them (pairs) or only some (half-used).
            let mut half: Vec<u32> = Vec::new();
            let mut pairs: Vec<u32> = Vec::new();
            for c in node_ref.cores.clone() {
                let r = core_threads(topo, c);
                let free = r.filter(|&t| usable(t) && !taken.contains(&t)).count() as u32;
                if free == 0 {
                    continue;
                }
                let core = &topo.cores[c as usize];
                if core.whole && free == core.nthreads {
                    pairs.push(c);
                } else {
                    half.push(c);
                }
            }
            // An odd vCPU first fills a core whose sibling is already busy, keeping pairs whole.
            if need % 2 == 1
                && let Some(&c) = half.first()
                && let Some(t) = core_threads(topo, c)
                    .rev()
                    .find(|&t| usable(t) && !taken.contains(&t))
            {
                taken.push(t);
                need -= 1;
            }
            'pairs: for &c in &pairs {
                for t in core_threads(topo, c) {
                    if need < 2 {
                        break 'pairs;
                    }
                    taken.push(t);
                    need -= 1;
                }
            }
            for &c in half.iter().chain(pairs.iter()) {
                for t in core_threads(topo, c) {
                    if need > 0 && usable(t) && !taken.contains(&t) {
                        taken.push(t);
                        need -= 1;
                    }
                }
            }
            if need > 0 {
                return None;
            }
        }
    }
    let emulator_t = if emulator { taken.pop() } else { None };
    Some(Picked {
        vcpus: taken,
        emulator: emulator_t,
        held,
    })
}

/// One available dedicated thread on `node`, preferring a core whose sibling is busy.
pub(crate) fn pick_one(
    topo: &Topology,
    node: u32,
    avail: &dyn Fn(u32) -> bool,
    exclude: &[u32],
) -> Option<u32> {
    let p = pick_dedicated(
        topo,
        node,
        &|t| avail(t) && !exclude.contains(&t),
        ThreadPolicy::Prefer,
        1,
        false,
        &[],
    )?;
    p.vcpus.first().copied()
}

/// The lowest whole, available core on `node`.
pub(crate) fn pick_whole_core(
    topo: &Topology,
    node: u32,
    avail: &dyn Fn(u32) -> bool,
) -> Option<u32> {
    whole_cores(topo, node, avail, &[], 1).first().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::HostSpec;

    fn topo() -> Topology {
        // 1 socket, 4 cores, 2 threads: core0 = 0,4 (shared), core1 = 1,5, core2 = 2,6, core3 = 3,7
        HostSpec::synthetic("h", 1, 4, 2).build().unwrap()
    }

    fn cpus(t: &Topology, idx: &[u32]) -> Vec<u32> {
        idx.iter().map(|&i| t.threads[i as usize].cpu).collect()
    }

    #[test]
    fn isolate_keeps_siblings_empty() {
        let t = topo();
        let p = pick_dedicated(&t, 0, &|_| true, ThreadPolicy::Isolate, 2, false, &[]).unwrap();
        assert_eq!(cpus(&t, &p.vcpus), vec![1, 2]);
        assert_eq!(cpus(&t, &p.held), vec![5, 6]);
        assert!(pick_dedicated(&t, 0, &|_| true, ThreadPolicy::Isolate, 4, false, &[]).is_none());
    }

    #[test]
    fn require_fills_pairs_and_holds_odd_sibling() {
        let t = topo();
        let p = pick_dedicated(&t, 0, &|_| true, ThreadPolicy::Require, 3, false, &[]).unwrap();
        assert_eq!(cpus(&t, &p.vcpus), vec![1, 5, 2]);
        assert_eq!(cpus(&t, &p.held), vec![6]);
        let single = HostSpec::synthetic("h", 1, 4, 1).build().unwrap();
        assert!(
            pick_dedicated(&single, 0, &|_| true, ThreadPolicy::Require, 1, false, &[]).is_none()
        );
    }

    #[test]
    fn prefer_puts_odd_vcpu_on_half_used_core() {
        let t = topo();
        let busy = t.thread_of_cpu(1).unwrap();
        let p = pick_dedicated(&t, 0, &|x| x != busy, ThreadPolicy::Prefer, 3, false, &[]).unwrap();
        assert_eq!(cpus(&t, &p.vcpus), vec![5, 2, 6]);
        let p = pick_dedicated(&t, 0, &|x| x != busy, ThreadPolicy::Prefer, 4, true, &[]).unwrap();
        assert_eq!(cpus(&t, &p.vcpus), vec![5, 2, 6, 3]);
        assert_eq!(cpus(&t, &[p.emulator.unwrap()]), vec![7]);
        assert!(
            pick_dedicated(&t, 0, &|x| x != busy, ThreadPolicy::Prefer, 6, false, &[]).is_none()
        );
    }
}
