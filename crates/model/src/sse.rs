//! Server-sent events (the wire format of `GET /v1/watch/vnfs`) decoded from the bytes of a
//! streaming answer as they arrive.
//!
//! Owns splitting the stream into events, each its `event:` name and its `data:` lines joined;
//! comment lines (keep-alives) and events without a name are skipped. It must not do I/O: the
//! caller reads the bytes and bounds how many it lets wait ([`SseDecoder::buffered`]).

/// One event: its name and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub name: String,
    pub data: String,
}

/// Bytes received and not yet a whole event.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buffered: Vec<u8>,
}

impl SseDecoder {
    /// Adds bytes as they came off the stream (an event may span several chunks).
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffered.extend_from_slice(bytes);
    }

    /// How many bytes wait for the end of their event.
    pub fn buffered(&self) -> usize {
        self.buffered.len()
    }

    /// The next whole event, if one has arrived. The stream is UTF-8; a byte that is not
    /// decodes as U+FFFD.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        while let Some(end) = self.buffered.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buffered.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block);
            let mut name = None;
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = Some(n.trim().to_owned());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            if let Some(name) = name {
                return Some(SseEvent {
                    name,
                    data: data.join("\n"),
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_come_whole_and_comments_are_skipped() {
        let mut d = SseDecoder::default();
        d.push(b": keep-alive\n\nevent: added\nda");
        assert_eq!(d.next_event(), None);
        d.push(b"ta: {\"a\":\n");
        d.push(b"data: 1}\n\nevent: synced\ndata:{}\n\n");
        assert_eq!(
            d.next_event(),
            Some(SseEvent {
                name: "added".into(),
                data: "{\"a\":\n1}".into()
            })
        );
        assert_eq!(d.next_event().map(|e| e.name), Some("synced".into()));
        assert_eq!(d.next_event(), None);
        assert_eq!(d.buffered(), 0);
    }
}
