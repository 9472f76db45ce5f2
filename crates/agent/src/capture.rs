//! Captures of links on this host's data plane, taken in slices: the first slice arms a tap on
//! the link, each slice answers the frames taken so far as a piece of one pcapng stream, and
//! the capture ends when every frame asked for came, on its last slice, or when no slice came
//! for [`CAPTURE_KEEP`] (its caller went away).
//!
//! Owns the running captures and the pcapng bytes; must not decide which link a network's
//! link is on this host (the network reconciler resolves it) nor who may capture.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use telvirt_api::{CAPTURE_KEEP, CaptureChunk, CaptureSlice};
use telvirt_dataplane::capture::{LinkTap, PcapngWriter};
use telvirt_dataplane::graph::LinkSpec;

use crate::AgentError;
use crate::dataplane::NodeDataPlane;

/// How often a slice looks for new frames while it waits.
const POLL: Duration = Duration::from_millis(5);
/// Most pcapng bytes one slice answers (about 700 KiB once base64 in JSON: under the 1 MiB a
/// controller takes in one agent reply); the rest waits in the tap for the next slice.
const SLICE_BYTES: usize = 512 << 10;
/// Most captures running on one host at once (each tap may hold a queue of frames).
const MAX_CAPTURES: usize = 8;

struct Running {
    spec: LinkSpec,
    tap: Arc<LinkTap>,
    /// When the capture ends unless another slice comes.
    expires: Instant,
}

/// The captures running on this host, by network and link index.
#[derive(Default)]
pub struct Captures {
    running: Mutex<BTreeMap<(String, usize), Running>>,
}

impl Captures {
    /// Answer one slice of the capture of link `slice.link` of `network`, which is `spec` on
    /// this host's panel and is called `label` in the file.
    pub fn slice(
        &self,
        dp: &NodeDataPlane,
        network: &str,
        spec: LinkSpec,
        label: &str,
        slice: &CaptureSlice,
    ) -> Result<CaptureChunk, AgentError> {
        self.end_expired(dp);
        let key = (network.to_owned(), slice.link);
        let tap = {
            let mut running = self.lock();
            match (running.get_mut(&key), slice.first) {
                (Some(_), true) => {
                    return Err(AgentError::DataPlane(format!(
                        "link {label} of network {network} is being captured already; one \
                         capture of a link runs at a time"
                    )));
                }
                (None, false) => {
                    return Err(AgentError::DataPlane(format!(
                        "the capture of link {label} of network {network} ended (no slice came \
                         for {} ms, or the link went)",
                        CAPTURE_KEEP.as_millis()
                    )));
                }
                (Some(r), false) => {
                    r.expires = Instant::now() + CAPTURE_KEEP;
                    Arc::clone(&r.tap)
                }
                (None, true) => {
                    if running.len() >= MAX_CAPTURES {
                        return Err(AgentError::DataPlane(format!(
                            "{MAX_CAPTURES} captures run on this host already; wait for one to \
                             end"
                        )));
                    }
                    let tap = LinkTap::new(slice.packets, slice.snaplen);
                    dp.panel()
                        .tap_link(&spec, Arc::clone(&tap))
                        .map_err(|e| AgentError::DataPlane(e.to_string()))?;
                    running.insert(
                        key.clone(),
                        Running {
                            spec,
                            tap: Arc::clone(&tap),
                            expires: Instant::now() + CAPTURE_KEEP,
                        },
                    );
                    tap
                }
            }
        };
        let deadline = Instant::now() + Duration::from_millis(slice.wait_ms);
        let mut frames = Vec::new();
        let mut bytes = 0;
        let done = loop {
            // `wanted` reaches 0 only after the sender queued its last frame: once seen, the
            // capture is done when the queue is empty.
            let all_came = tap.wanted() == 0;
            while bytes < SLICE_BYTES {
                let before = frames.len();
                if tap.take(&mut frames, before + 1) == 0 {
                    break;
                }
                bytes += frames[before].data.len() + 32;
            }
            if bytes >= SLICE_BYTES || (all_came && tap.is_empty()) || Instant::now() >= deadline {
                break all_came && tap.is_empty();
            }
            std::thread::sleep(POLL);
        };
        let mut w = if slice.first {
            PcapngWriter::new(Vec::new(), label, tap.snaplen())
        } else {
            Ok(PcapngWriter::continuing(Vec::new()))
        }
        .map_err(io_err)?;
        for f in &frames {
            w.write_frame(f).map_err(io_err)?;
        }
        let ends = done || slice.last;
        if ends {
            w.write_missed(tap.missed()).map_err(io_err)?;
            if let Some(r) = self.lock().remove(&key) {
                dp.panel().untap_link(&r.spec, &r.tap);
            }
        }
        Ok(CaptureChunk {
            frames: w.frames_written(),
            pcapng: base64::engine::general_purpose::STANDARD.encode(w.into_inner()),
            done: ends,
        })
    }

    /// End the captures no slice came for in time.
    pub fn end_expired(&self, dp: &NodeDataPlane) {
        let now = Instant::now();
        let mut running = self.lock();
        let expired: Vec<_> = running
            .iter()
            .filter(|(_, r)| r.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            if let Some(r) = running.remove(&k) {
                dp.panel().untap_link(&r.spec, &r.tap);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, usize), Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn io_err(e: std::io::Error) -> AgentError {
    AgentError::DataPlane(format!("writing the capture: {e}"))
}
