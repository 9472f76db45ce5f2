//! Native execution of the example VNFs (the same C sources compiled for this host) as the
//! benchmark baseline: the host functions of ABI v1 as C symbols over the same `MapSet`, and
//! the same batch layout and copies as the wasm path. Only the crate's own example code is run
//! this way; it is trusted native code, not a sandbox.

use std::cell::Cell;
use std::ptr;

use crate::abi::{BUFFER_SIZE, code};
use crate::batch::PacketBatch;
use crate::error::{Error, Result};
use crate::maps::{MapDef, MapSet};
use crate::vnfs::ExampleVnf;

struct NativeHost {
    maps: MapSet,
    counters: [u64; 64],
    now_ns: Option<u64>,
    clock_base: std::time::Instant,
}

/// Names of the examples with a live native instance (their C buffer is static).
static IN_USE: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());

thread_local! {
    static CURRENT: Cell<*mut NativeHost> = const { Cell::new(ptr::null_mut()) };
}

fn with_host<R>(fallback: R, f: impl FnOnce(&mut NativeHost) -> R) -> R {
    let p = CURRENT.with(Cell::get);
    if p.is_null() {
        return fallback;
    }
    // SAFETY: `CURRENT` is set only by `NativeVnf::call` to its own boxed host for the duration
    // of a call into the C code on this thread, and reset afterwards; nothing else aliases it then.
    f(unsafe { &mut *p })
}

fn sizes(h: &NativeHost, map: i32) -> Option<(usize, usize)> {
    let d = h.maps.get(map as u32 as usize)?.def();
    Some((d.key_size as usize, d.value_size as usize))
}

/// Native `map_lookup`.
///
/// # Safety
/// `key` and `value` must be valid for the map's key and value sizes (the C examples ensure it).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tv_map_lookup(map: i32, key: *const u8, value: *mut u8) -> i32 {
    with_host(code::EINVAL, |h| {
        let Some((ks, vs)) = sizes(h, map) else {
            return code::EINVAL;
        };
        // SAFETY: the caller guarantees `key` points to `ks` readable bytes.
        let k = unsafe { std::slice::from_raw_parts(key, ks) };
        match h.maps.lookup(map as usize, k) {
            Some(v) => {
                // SAFETY: the caller guarantees `value` points to `vs` writable bytes.
                unsafe { ptr::copy_nonoverlapping(v.as_ptr(), value, vs) };
                code::OK
            }
            None => code::ENOENT,
        }
    })
}

/// Native `map_update`.
///
/// # Safety
/// `key` and `value` must be valid for the map's key and value sizes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tv_map_update(
    map: i32,
    key: *const u8,
    value: *const u8,
    flags: i32,
) -> i32 {
    with_host(code::EINVAL, |h| {
        let Some((ks, vs)) = sizes(h, map) else {
            return code::EINVAL;
        };
        // SAFETY: the caller guarantees both pointers cover the map's key and value sizes.
        let (k, v) = unsafe {
            (
                std::slice::from_raw_parts(key, ks),
                std::slice::from_raw_parts(value, vs),
            )
        };
        h.maps.update(map as usize, k, v, flags)
    })
}

/// Native `map_delete`.
///
/// # Safety
/// `key` must be valid for the map's key size.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tv_map_delete(map: i32, key: *const u8) -> i32 {
    with_host(code::EINVAL, |h| {
        let Some((ks, _)) = sizes(h, map) else {
            return code::EINVAL;
        };
        // SAFETY: the caller guarantees `key` points to `ks` readable bytes.
        let k = unsafe { std::slice::from_raw_parts(key, ks) };
        h.maps.delete(map as usize, k)
    })
}

/// Native `clock_ns`.
#[unsafe(no_mangle)]
pub extern "C" fn tv_clock_ns() -> i64 {
    with_host(0, |h| {
        h.now_ns
            .unwrap_or_else(|| h.clock_base.elapsed().as_nanos() as u64) as i64
    })
}

/// Native `counter_add`.
#[unsafe(no_mangle)]
pub extern "C" fn tv_counter_add(idx: i32, delta: i64) {
    with_host((), |h| {
        if let Some(c) = h.counters.get_mut(idx as u32 as usize) {
            *c = c.wrapping_add(delta as u64);
        }
    })
}

/// Native `emit` (not used by the examples' benchmark paths; refused).
#[unsafe(no_mangle)]
pub extern "C" fn tv_emit(_port: i32, _pkt: *const u8, _len: i32) -> i32 {
    code::EINVAL
}

/// Native `log` (discarded).
#[unsafe(no_mangle)]
pub extern "C" fn tv_log(_level: i32, _msg: *const u8, _len: i32) {}

/// One natively compiled example VNF with its own maps.
pub struct NativeVnf {
    vnf: ExampleVnf,
    buf: *mut u8,
    host: Box<NativeHost>,
    ports: u32,
}

impl NativeVnf {
    /// Creates the VNF's maps and runs its `tv_init`. The C code's buffer is static, so only
    /// one native instance of each example may be used at a time.
    pub fn new(vnf: ExampleVnf, maps: &[MapDef], config: &[u8], ports: u32) -> Result<Self> {
        {
            let mut used = IN_USE
                .lock()
                .map_err(|_| Error::Worker("native registry poisoned".into()))?;
            if used.contains(&vnf.name) {
                return Err(Error::Instantiate(format!(
                    "a native `{}` instance already exists (its C buffer is static)",
                    vnf.name
                )));
            }
            used.push(vnf.name);
        }
        let mut me = Self {
            vnf,
            buf: ptr::null_mut(),
            host: Box::new(NativeHost {
                maps: MapSet::new(maps)?,
                counters: [0; 64],
                now_ns: None,
                clock_base: std::time::Instant::now(),
            }),
            ports,
        };
        let buffer = me.vnf.native.buffer;
        // SAFETY: the example's tv_buffer returns a pointer to its static buffer of
        // BUFFER_SIZE bytes (or null), touching nothing else.
        me.buf = me.call(|| unsafe { buffer(BUFFER_SIZE as i32) });
        if me.buf.is_null() {
            return Err(Error::Instantiate(format!(
                "{}: native tv_buffer returned null",
                vnf.name
            )));
        }
        let init = me.vnf.native.init;
        // SAFETY: `config` outlives the call and tv_init reads at most `len` bytes of it.
        let rc = me.call(|| unsafe { init(config.as_ptr(), config.len() as i32) });
        if rc != 0 {
            return Err(Error::Failed(crate::error::FailureReason::InitFailed(rc)));
        }
        Ok(me)
    }

    fn call<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let p: *mut NativeHost = &mut *self.host;
        CURRENT.with(|c| c.set(p));
        let r = f();
        CURRENT.with(|c| c.set(ptr::null_mut()));
        r
    }

    /// Control-plane map update (e.g. provisioning a bearer).
    pub fn map_update(&mut self, map: &str, key: &[u8], value: &[u8]) -> Result<()> {
        map_update_by_name(&mut self.host.maps, map, key, value)
    }

    /// The maps.
    pub fn maps(&self) -> &MapSet {
        &self.host.maps
    }

    /// Processes a batch exactly like the wasm path: copy in, call, copy back.
    pub fn process_batch(&mut self, batch: &mut PacketBatch) -> Result<()> {
        // SAFETY: `buf` is the example's static buffer of BUFFER_SIZE bytes, valid for the
        // program's lifetime, and no other reference to it exists while this runs.
        let area = unsafe { std::slice::from_raw_parts_mut(self.buf, BUFFER_SIZE) };
        batch.write_to(area);
        self.host.now_ns = batch.now_ns;
        let process = self.vnf.native.process;
        let (buf, n) = (self.buf, batch.len() as i32);
        // SAFETY: the buffer holds `n` descriptors and packets at the ABI layout.
        let rc = self.call(|| unsafe { process(buf, n) });
        if rc < 0 {
            batch.drop_all();
            return Ok(());
        }
        // SAFETY: as above; the C call has returned.
        let area = unsafe { std::slice::from_raw_parts(self.buf, BUFFER_SIZE) };
        batch.read_from(area, self.ports);
        Ok(())
    }
}

impl Drop for NativeVnf {
    fn drop(&mut self) {
        if let Ok(mut used) = IN_USE.lock() {
            used.retain(|n| *n != self.vnf.name);
        }
    }
}

/// Updates a map by name with sizes checked; shared by the native and wasm control paths.
pub(crate) fn map_update_by_name(
    maps: &mut MapSet,
    map: &str,
    key: &[u8],
    value: &[u8],
) -> Result<()> {
    let id = maps
        .id_of(map)
        .ok_or_else(|| Error::Map(format!("no map named `{map}`")))?;
    let rc = maps.update(id, key, value, crate::abi::update_flags::ANY);
    if rc == code::OK {
        Ok(())
    } else {
        Err(Error::Map(format!(
            "update of map `{map}` failed with code {rc} (key {} bytes, value {} bytes)",
            key.len(),
            value.len()
        )))
    }
}
