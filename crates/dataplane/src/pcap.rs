//! pcap files as packet sources and sinks: nanosecond-resolution pcap (magic `a1b23c4d`,
//! Ethernet link type) that Wireshark and tshark read. Reading also accepts microsecond files
//! and either byte order. Must not interpret packet contents.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::node::{BATCH, Node, NodeIo};
use crate::pool::Packet;

const MAGIC_NS: u32 = 0xa1b2_3c4d;
const MAGIC_US: u32 = 0xa1b2_c3d4;
const LINKTYPE_ETHERNET: u32 = 1;
/// Snap length written into new files.
pub const SNAPLEN: u32 = 65535;

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME), for capture timestamps.
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Writes a nanosecond pcap file.
pub struct Writer {
    out: BufWriter<File>,
    path: PathBuf,
}

impl Writer {
    /// Create (truncate) `path` and write the file header.
    pub fn create(path: &Path) -> Result<Self> {
        let f =
            File::create(path).map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        let mut w = Writer {
            out: BufWriter::new(f),
            path: path.to_path_buf(),
        };
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&MAGIC_NS.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&SNAPLEN.to_le_bytes());
        h.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        w.put(&h)?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.out
            .write_all(b)
            .map_err(|e| Error::io(format!("write {}", self.path.display()), e))
    }

    /// Append one frame captured at `ts_ns` (Unix epoch nanoseconds).
    pub fn write(&mut self, ts_ns: u64, frame: &[u8]) -> Result<()> {
        let incl = frame.len().min(SNAPLEN as usize);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&((ts_ns / 1_000_000_000) as u32).to_le_bytes());
        h[4..8].copy_from_slice(&((ts_ns % 1_000_000_000) as u32).to_le_bytes());
        h[8..12].copy_from_slice(&(incl as u32).to_le_bytes());
        h[12..16].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        self.put(&h)?;
        self.put(&frame[..incl])
    }

    /// Flush buffered records to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| Error::io(format!("flush {}", self.path.display()), e))
    }
}

/// One record read from a pcap file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Capture time, Unix epoch nanoseconds.
    pub ts_ns: u64,
    /// Captured bytes.
    pub data: Vec<u8>,
    /// Original length on the wire.
    pub orig_len: u32,
}

/// Reads a pcap file.
pub struct Reader {
    input: BufReader<File>,
    path: PathBuf,
    big_endian: bool,
    nanos: bool,
}

impl Reader {
    /// Open `path` and check its header (Ethernet link type).
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let mut r = Reader {
            input: BufReader::new(f),
            path: path.to_path_buf(),
            big_endian: false,
            nanos: true,
        };
        let mut h = [0u8; 24];
        match r.read_exact_or_eof(&mut h) {
            Ok(true) => {}
            Ok(false) | Err(Error::Format { .. }) => {
                return Err(r.bad("shorter than the 24-byte pcap header"));
            }
            Err(e) => return Err(e),
        }
        let le = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let be = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        (r.big_endian, r.nanos) = match (le, be) {
            (MAGIC_NS, _) => (false, true),
            (MAGIC_US, _) => (false, false),
            (_, MAGIC_NS) => (true, true),
            (_, MAGIC_US) => (true, false),
            _ => {
                return Err(r.bad(&format!(
                    "magic {le:#010x} is not a pcap magic (a1b2c3d4 or a1b23c4d); pcapng is \
                     not supported"
                )));
            }
        };
        let linktype = r.u32_at(&h[20..24]);
        if linktype != LINKTYPE_ETHERNET {
            return Err(r.bad(&format!("link type {linktype} is not Ethernet (1)")));
        }
        Ok(r)
    }

    fn bad(&self, why: &str) -> Error {
        Error::Format {
            path: self.path.display().to_string(),
            reason: why.to_string(),
        }
    }

    fn u32_at(&self, b: &[u8]) -> u32 {
        let a = [b[0], b[1], b[2], b[3]];
        if self.big_endian {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }
    }

    fn read_exact_or_eof(&mut self, buf: &mut [u8]) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            let n = self
                .input
                .read(&mut buf[got..])
                .map_err(|e| Error::io(format!("read {}", self.path.display()), e))?;
            if n == 0 {
                if got == 0 {
                    return Ok(false);
                }
                return Err(self.bad("truncated record"));
            }
            got += n;
        }
        Ok(true)
    }

    /// The next record, `None` at the end of the file.
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        let mut h = [0u8; 16];
        if !self.read_exact_or_eof(&mut h)? {
            return Ok(None);
        }
        let sec = u64::from(self.u32_at(&h[0..4]));
        let frac = u64::from(self.u32_at(&h[4..8]));
        let incl = self.u32_at(&h[8..12]);
        let orig_len = self.u32_at(&h[12..16]);
        if incl > 256 * 1024 {
            return Err(self.bad(&format!("record of {incl} bytes is implausibly large")));
        }
        let mut data = vec![0u8; incl as usize];
        if !self.read_exact_or_eof(&mut data)? && incl > 0 {
            return Err(self.bad("truncated record"));
        }
        let ts_ns = sec * 1_000_000_000 + if self.nanos { frac } else { frac * 1000 };
        Ok(Some(Record {
            ts_ns,
            data,
            orig_len,
        }))
    }
}

/// Counters of a pcap node.
#[derive(Debug, Default)]
pub struct PcapStats {
    /// Frames written (sink) or sent (source).
    pub packets: AtomicU64,
    /// Frames longer than a pool buffer, truncated (source).
    pub truncated: AtomicU64,
    /// Set when a source reached the end of its file, or a sink failed to write.
    pub done: AtomicBool,
    /// Last error, if any.
    pub error: std::sync::Mutex<Option<String>>,
}

impl PcapStats {
    fn fail(&self, e: &Error) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        self.done.store(true, Ordering::Release);
    }

    /// The last error, if the node stopped because of one.
    pub fn last_error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A node writing every packet arriving on its port to a pcap file.
pub struct PcapSink {
    writer: Writer,
    stats: Arc<PcapStats>,
    buf: Vec<Packet>,
}

impl PcapSink {
    /// Create the file.
    pub fn create(path: &Path) -> Result<Self> {
        Ok(PcapSink {
            writer: Writer::create(path)?,
            stats: Arc::new(PcapStats::default()),
            buf: Vec::with_capacity(BATCH),
        })
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<PcapStats> {
        Arc::clone(&self.stats)
    }
}

impl Node for PcapSink {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        let n = io.recv(0, &mut self.buf, BATCH);
        if n == 0 {
            return 0;
        }
        let pool = io.pool();
        let ts = realtime_ns();
        let mut res = Ok(());
        for p in self.buf.drain(..) {
            if res.is_ok() {
                res = self.writer.write(ts, pool.data(&p));
            }
            io.free(p);
        }
        if res.is_ok() {
            res = self.writer.flush();
        }
        match res {
            Ok(()) => {
                self.stats.packets.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => self.stats.fail(&e),
        }
        n
    }
}

/// A node sending the frames of a pcap file out of its port, as fast as the link accepts.
pub struct PcapSource {
    reader: Reader,
    stats: Arc<PcapStats>,
    batch: Vec<Packet>,
}

impl PcapSource {
    /// Open the file.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(PcapSource {
            reader: Reader::open(path)?,
            stats: Arc::new(PcapStats::default()),
            batch: Vec::with_capacity(BATCH),
        })
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<PcapStats> {
        Arc::clone(&self.stats)
    }
}

impl Node for PcapSource {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        if self.stats.done.load(Ordering::Relaxed) {
            return 0;
        }
        let room = io.tx_space(0).min(BATCH);
        let pool = io.pool();
        for _ in 0..room {
            match self.reader.next_record() {
                Ok(Some(rec)) => {
                    let Some(mut p) = io.alloc() else { break };
                    if pool.write(&mut p, &rec.data) < rec.data.len() {
                        self.stats.truncated.fetch_add(1, Ordering::Relaxed);
                    }
                    self.batch.push(p);
                }
                Ok(None) => {
                    self.stats.done.store(true, Ordering::Release);
                    break;
                }
                Err(e) => {
                    self.stats.fail(&e);
                    break;
                }
            }
        }
        let n = io.send(0, &mut self.batch);
        self.stats.packets.fetch_add(n as u64, Ordering::Relaxed);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("telvirt-dp-{}-{name}", std::process::id()))
    }

    #[test]
    fn write_then_read_back() {
        let path = tmp("rt.pcap");
        let mut w = Writer::create(&path).unwrap();
        w.write(1_700_000_000_123_456_789, &[1, 2, 3]).unwrap();
        w.write(1_700_000_001_000_000_001, &[4; 60]).unwrap();
        w.flush().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            &bytes[..4],
            &[0x4d, 0x3c, 0xb2, 0xa1],
            "nanosecond magic, little endian"
        );
        let mut r = Reader::open(&path).unwrap();
        let a = r.next_record().unwrap().unwrap();
        assert_eq!(
            (a.ts_ns, a.data.as_slice()),
            (1_700_000_000_123_456_789, &[1u8, 2, 3][..])
        );
        let b = r.next_record().unwrap().unwrap();
        assert_eq!((b.data.len(), b.orig_len), (60, 60));
        assert_eq!(r.next_record().unwrap(), None);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_files_are_named_and_explained() {
        let path = tmp("bad.pcap");
        std::fs::write(&path, [0u8; 24]).unwrap();
        let e = Reader::open(&path).err().unwrap().to_string();
        assert!(
            e.contains("bad.pcap") && e.contains("not a pcap magic"),
            "{e}"
        );
        std::fs::write(&path, [0u8; 3]).unwrap();
        let e = Reader::open(&path).err().unwrap().to_string();
        assert!(e.contains("24-byte"), "{e}");
        let mut w = Writer::create(&path).unwrap();
        w.write(0, &[1; 10]).unwrap();
        w.flush().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        let e = Reader::open(&path)
            .unwrap()
            .next_record()
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated record"), "{e}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn microsecond_big_endian_files_are_read() {
        let path = tmp("us.pcap");
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC_US.to_be_bytes());
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(&4u16.to_be_bytes());
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&65535u32.to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        for v in [5u32, 7, 2, 2] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&[9, 9]);
        std::fs::write(&path, &b).unwrap();
        let rec = Reader::open(&path).unwrap().next_record().unwrap().unwrap();
        assert_eq!((rec.ts_ns, rec.data), (5_000_007_000, vec![9, 9]));
        std::fs::remove_file(&path).unwrap();
    }
}
