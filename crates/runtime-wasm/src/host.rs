//! Host functions of module `telvirt` (ABI v1) and the per-VNF state they act on. Only the
//! functions whose permission is granted are linked; the rest are absent, never stubbed.
//! Owns the host side of each call, including the cached view of linear memory the calls use
//! (see `MemView`) and the fuel the map functions and `random` charge (`abi::host_fuel`); it
//! does not decide grants (see `security`).

use std::collections::{BTreeSet, VecDeque};
use std::ops::Range;
use std::time::Instant;

use wasmtime::{Caller, Linker, Memory, ResourceLimiter, Trap};

use crate::abi::{self, MAX_LOG_LEN, MAX_LOG_PER_BATCH, code, host_fuel};
use crate::batch::Emitted;
use crate::maps::MapSet;
use crate::security::Permission;

/// Most table elements one instance may hold, all its tables together (a module may declare
/// up to 100 tables; each element is host memory outside the linear-memory cap).
pub(crate) const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Linear-memory cap and table budget enforced through wasmtime's `ResourceLimiter`.
pub(crate) struct Limiter {
    pub(crate) cap: u64,
    /// Elements of the current store's tables, all of them together (at most
    /// [`MAX_TABLE_ELEMENTS`]); a new store starts from 0.
    pub(crate) table_elements: usize,
    /// Bytes requested by the growth that hit the cap.
    pub(crate) hit: Option<u64>,
    /// Set on every growth attempt: the host's `MemView` must be refreshed before its next use.
    pub(crate) grew: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grew = true;
        if desired as u64 > self.cap {
            self.hit = Some(desired as u64);
            return Err(wasmtime::Error::msg(format!(
                "linear memory cap of {} bytes exceeded (requested {desired})",
                self.cap
            )));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .table_elements
            .saturating_sub(current)
            .saturating_add(desired);
        if total > MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        self.table_elements = total;
        Ok(true)
    }
}

/// One line logged by a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// 1 for the first line the instance kept since it (re)started, then one more per line:
    /// a reader asks for the lines after the last it saw.
    pub seq: u64,
    /// The instance's clock when it was logged (`clock_ns`: ns since it started, or the
    /// batch's replay time).
    pub at_ns: u64,
    pub level: i32,
    pub text: String,
}

/// Everything the host functions of one VNF instance act on.
pub(crate) struct HostState {
    pub(crate) maps: MapSet,
    pub(crate) limiter: Limiter,
    pub(crate) memory: Option<Memory>,
    /// Where `memory` was last seen; see `with_mem`.
    pub(crate) view: MemView,
    pub(crate) counters: Vec<u64>,
    pub(crate) emitted: Emitted,
    pub(crate) ports: u32,
    pub(crate) logs: VecDeque<LogLine>,
    /// Lines kept since the instance started (the last line's `seq`).
    pub(crate) logs_kept: u64,
    pub(crate) logs_this_batch: usize,
    pub(crate) logs_dropped: u64,
    pub(crate) now_ns: Option<u64>,
    pub(crate) clock_base: Instant,
    pub(crate) rng: u64,
}

impl HostState {
    /// The instance's clock as `clock_ns` reads it: the replayed batch's time, else
    /// nanoseconds since the instance started.
    pub(crate) fn clock_ns(&self) -> u64 {
        self.now_ns.unwrap_or_else(|| {
            u64::try_from(self.clock_base.elapsed().as_nanos()).unwrap_or(u64::MAX)
        })
    }

    pub(crate) fn new(maps: MapSet, cap: u64, counters: usize, ports: u32, seed: u64) -> Self {
        Self {
            maps,
            limiter: Limiter {
                cap,
                table_elements: 0,
                hit: None,
                grew: false,
            },
            memory: None,
            view: MemView::default(),
            counters: vec![0; counters],
            emitted: Emitted::new(),
            ports,
            logs: VecDeque::with_capacity(64),
            logs_kept: 0,
            logs_this_batch: 0,
            logs_dropped: 0,
            now_ns: None,
            clock_base: Instant::now(),
            rng: seed,
        }
    }
}

/// The bytes `len` long at wasm address `ptr` (an unsigned 32-bit address carried in an
/// `i32`: addresses from 2 GiB on arrive negative) when they lie inside `mem` bytes.
fn range(ptr: i32, len: usize, mem: usize) -> Option<Range<usize>> {
    let start = ptr as u32 as usize;
    let end = start.checked_add(len)?;
    (end <= mem).then_some(start..end)
}

/// Base address and length of the instance's linear memory as last resolved through wasmtime.
///
/// Resolving a `Memory` through the store costs a chain of dependent loads on every host call
/// (a third of the host-call overhead measured on the example VNFs, see ADR 036). The view is
/// valid without re-resolving because (1) the engine is built with `memory_may_move(false)`,
/// so the base never changes while the memory lives, (2) memories never shrink, and (3) every
/// growth attempt passes through `Limiter::memory_growing`, which sets `grew`, after which the
/// next host call re-resolves. `base == 0` means "not resolved yet".
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MemView {
    base: usize,
    len: usize,
}

impl HostState {
    /// Forgets the memory view (a new instance, or a store about to be torn down).
    pub(crate) fn reset_view(&mut self) {
        self.view = MemView::default();
        self.limiter.grew = false;
    }
}

fn with_mem<R>(
    caller: &mut Caller<'_, HostState>,
    fallback: R,
    f: impl FnOnce(&mut [u8], &mut HostState) -> R,
) -> R {
    let st = caller.data();
    if st.view.base == 0 || st.limiter.grew {
        let Some(mem) = st.memory else {
            return fallback;
        };
        let (data, st) = mem.data_and_store_mut(caller);
        st.view = MemView {
            base: data.as_mut_ptr() as usize,
            len: data.len(),
        };
        st.limiter.grew = false;
        return f(data, st);
    }
    let st = caller.data_mut();
    let view = st.view;
    // SAFETY: `view` was taken from this store's memory by the branch above (`reset_view` runs
    // whenever `memory` changes). The memory lives as long as the store that owns this
    // `HostState`, cannot move (`memory_may_move(false)` in `engine::build`) and cannot shrink,
    // and any growth since the view was taken would have set `limiter.grew`; so `view.len` bytes
    // at `view.base` are mapped, writable and owned by this memory. Host functions run while
    // the module is suspended in the call, and no other reference into the linear memory
    // exists meanwhile: the runtime only borrows memory between calls.
    let data = unsafe { std::slice::from_raw_parts_mut(view.base as *mut u8, view.len) };
    f(data, st)
}

/// Takes `cost` fuel from the calling store; traps as out of fuel (and takes what is left) when
/// there is not enough, so the call does nothing and the module stops like wasm code would.
fn charge(caller: &mut Caller<'_, HostState>, cost: u64) -> wasmtime::Result<()> {
    let left = caller.get_fuel()?;
    if left < cost {
        caller.set_fuel(0)?;
        return Err(Trap::OutOfFuel.into());
    }
    caller.set_fuel(left - cost)
}

/// Key and value sizes of map `id`, or `None` for an unknown map.
fn map_sizes(caller: &Caller<'_, HostState>, id: usize) -> Option<(u64, u64)> {
    let d = caller.data().maps.get(id)?.def();
    Some((u64::from(d.key_size), u64::from(d.value_size)))
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Defines the host functions whose permission is in `granted`.
pub(crate) fn link(
    linker: &mut Linker<HostState>,
    granted: &BTreeSet<Permission>,
) -> wasmtime::Result<()> {
    let m = abi::IMPORT_MODULE;
    if granted.contains(&Permission::MapsRead) {
        linker.func_wrap(
            m,
            "map_lookup",
            |mut c: Caller<'_, HostState>, map: i32, kp: i32, vp: i32| -> wasmtime::Result<i32> {
                let id = map as u32 as usize;
                let bytes = map_sizes(&c, id).map_or(0, |(k, v)| k + v);
                charge(&mut c, host_fuel::cost(host_fuel::MAP_LOOKUP, bytes))?;
                Ok(with_mem(&mut c, code::EFAULT, |data, st| {
                    let Some(def) = st.maps.get(id).map(|m| m.def()) else {
                        return code::EINVAL;
                    };
                    let (ks, vs) = (def.key_size as usize, def.value_size as usize);
                    let (Some(kr), Some(vr)) =
                        (range(kp, ks, data.len()), range(vp, vs, data.len()))
                    else {
                        return code::EFAULT;
                    };
                    match st.maps.lookup(id, &data[kr]) {
                        Some(v) => {
                            data[vr].copy_from_slice(v);
                            code::OK
                        }
                        None => code::ENOENT,
                    }
                }))
            },
        )?;
    }
    if granted.contains(&Permission::MapsWrite) {
        linker.func_wrap(
            m,
            "map_update",
            |mut c: Caller<'_, HostState>,
             map: i32,
             kp: i32,
             vp: i32,
             flags: i32|
             -> wasmtime::Result<i32> {
                let id = map as u32 as usize;
                let bytes = map_sizes(&c, id).map_or(0, |(k, v)| k + v);
                charge(&mut c, host_fuel::cost(host_fuel::MAP_UPDATE, bytes))?;
                Ok(with_mem(&mut c, code::EFAULT, |data, st| {
                    let Some(def) = st.maps.get(id).map(|m| m.def()) else {
                        return code::EINVAL;
                    };
                    let (ks, vs) = (def.key_size as usize, def.value_size as usize);
                    let (Some(kr), Some(vr)) =
                        (range(kp, ks, data.len()), range(vp, vs, data.len()))
                    else {
                        return code::EFAULT;
                    };
                    st.maps.update(id, &data[kr], &data[vr], flags)
                }))
            },
        )?;
        linker.func_wrap(
            m,
            "map_delete",
            |mut c: Caller<'_, HostState>, map: i32, kp: i32| -> wasmtime::Result<i32> {
                let id = map as u32 as usize;
                let bytes = map_sizes(&c, id).map_or(0, |(k, _)| k);
                charge(&mut c, host_fuel::cost(host_fuel::MAP_DELETE, bytes))?;
                Ok(with_mem(&mut c, code::EFAULT, |data, st| {
                    let Some(def) = st.maps.get(id).map(|m| m.def()) else {
                        return code::EINVAL;
                    };
                    let Some(kr) = range(kp, def.key_size as usize, data.len()) else {
                        return code::EFAULT;
                    };
                    st.maps.delete(id, &data[kr])
                }))
            },
        )?;
    }
    if granted.contains(&Permission::Clock) {
        linker.func_wrap(m, "clock_ns", |c: Caller<'_, HostState>| -> i64 {
            c.data().clock_ns() as i64
        })?;
    }
    if granted.contains(&Permission::Log) {
        linker.func_wrap(
            m,
            "log",
            |mut c: Caller<'_, HostState>, level: i32, p: i32, len: i32| {
                with_mem(&mut c, (), |data, st| {
                    if st.logs_this_batch >= MAX_LOG_PER_BATCH {
                        st.logs_dropped += 1;
                        return;
                    }
                    let n = (len.max(0) as usize).min(MAX_LOG_LEN);
                    let Some(r) = range(p, n, data.len()) else {
                        st.logs_dropped += 1;
                        return;
                    };
                    st.logs_this_batch += 1;
                    st.logs_kept += 1;
                    if st.logs.len() == 64 {
                        st.logs.pop_front();
                    }
                    let at_ns = st.clock_ns();
                    st.logs.push_back(LogLine {
                        seq: st.logs_kept,
                        at_ns,
                        level,
                        text: String::from_utf8_lossy(&data[r]).into_owned(),
                    });
                })
            },
        )?;
    }
    if granted.contains(&Permission::Random) {
        linker.func_wrap(
            m,
            "random",
            |mut c: Caller<'_, HostState>, p: i32, len: i32| -> wasmtime::Result<i32> {
                if !(0..=4096).contains(&len) {
                    return Ok(code::EINVAL);
                }
                charge(&mut c, host_fuel::cost(host_fuel::RANDOM, len as u64))?;
                Ok(with_mem(&mut c, code::EFAULT, |data, st| {
                    let Some(r) = range(p, len as usize, data.len()) else {
                        return code::EFAULT;
                    };
                    for chunk in data[r].chunks_mut(8) {
                        let v = splitmix(&mut st.rng).to_le_bytes();
                        chunk.copy_from_slice(&v[..chunk.len()]);
                    }
                    code::OK
                }))
            },
        )?;
    }
    if granted.contains(&Permission::Emit) {
        linker.func_wrap(
            m,
            "emit",
            |mut c: Caller<'_, HostState>, port: i32, p: i32, len: i32| -> i32 {
                with_mem(&mut c, code::EFAULT, |data, st| {
                    if port < 0 || port as u32 >= st.ports || len < 0 {
                        return code::EINVAL;
                    }
                    let Some(r) = range(p, len as usize, data.len()) else {
                        return code::EFAULT;
                    };
                    if st.emitted.push(port as u32, &data[r]) {
                        code::OK
                    } else {
                        code::EFULL
                    }
                })
            },
        )?;
    }
    if granted.contains(&Permission::Counters) {
        linker.func_wrap(
            m,
            "counter_add",
            |mut c: Caller<'_, HostState>, idx: i32, delta: i64| {
                if let Some(v) = c.data_mut().counters.get_mut(idx as u32 as usize) {
                    *v = v.wrapping_add(delta as u64);
                }
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::range;

    /// Wasm addresses are unsigned: one from 2 GiB on (negative as an `i32`) is a place in a
    /// memory that large, not an error; what runs past the memory still is.
    #[test]
    fn addresses_from_2_gib_on_are_places_not_errors() {
        let at_2_gib = 0x8000_0000_u32 as i32;
        assert!(at_2_gib < 0);
        assert_eq!(
            range(at_2_gib, 8, 0x8000_0010),
            Some(0x8000_0000..0x8000_0008)
        );
        assert_eq!(range(at_2_gib, 0x11, 0x8000_0010), None);
        assert_eq!(
            range(-1, 1, 0x1_0000_0000),
            Some(0xffff_ffff..0x1_0000_0000)
        );
        assert_eq!(range(16, 8, 20), None);
    }
}
