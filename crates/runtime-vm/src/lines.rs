//! Newline-ended lines read from a peer the runtime does not trust (QEMU's QMP socket, the
//! guest agent), each at most a bound: a peer that sends bytes without a newline costs the
//! agent that bound, not its memory. Owns the reading; must not parse what it reads.

use std::io;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// A reader of bounded lines. Cancel-safe: a line read in part when the future is dropped
/// (a timeout) is kept and finished by the next call.
pub(crate) struct BoundedLines<R> {
    reader: BufReader<R>,
    max: usize,
    line: Vec<u8>,
}

impl<R: AsyncRead + Unpin> BoundedLines<R> {
    /// Lines of at most `max` bytes (without their newline) from `reader`.
    pub(crate) fn new(reader: R, max: usize) -> Self {
        Self {
            reader: BufReader::new(reader),
            max,
            line: Vec::new(),
        }
    }

    /// The next line without its `\n` (or `\r\n`); `None` at the end of the stream (a last
    /// line without a newline is given first). A longer line, or one that is not UTF-8, is an
    /// error of kind `InvalidData`: the stream is no longer to be read.
    pub(crate) async fn next_line(&mut self) -> io::Result<Option<String>> {
        loop {
            let buf = self.reader.fill_buf().await?;
            if buf.is_empty() {
                if self.line.is_empty() {
                    return Ok(None);
                }
                return self.take().map(Some);
            }
            let (part, used, ended) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], i + 1, true),
                None => (buf, buf.len(), false),
            };
            if self.line.len() + part.len() > self.max {
                let max = self.max;
                self.line.clear();
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a line longer than {max} bytes"),
                ));
            }
            self.line.extend_from_slice(part);
            self.reader.consume(used);
            if ended {
                return self.take().map(Some);
            }
        }
    }

    fn take(&mut self) -> io::Result<String> {
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        String::from_utf8(std::mem::take(&mut self.line))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// At most the first 200 characters of `line`, for a log.
pub(crate) fn shown(line: &str) -> &str {
    line.char_indices()
        .nth(200)
        .map_or(line, |(i, _)| &line[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(bytes: &'static [u8], max: usize) -> BoundedLines<&'static [u8]> {
        BoundedLines::new(bytes, max)
    }

    #[tokio::test]
    async fn lines_up_to_the_bound_are_read_and_a_longer_one_is_refused() {
        let mut l = lines_of(b"one\r\n\ntwelve bytes\nlast", 12);
        assert_eq!(l.next_line().await.unwrap().as_deref(), Some("one"));
        assert_eq!(l.next_line().await.unwrap().as_deref(), Some(""));
        assert_eq!(
            l.next_line().await.unwrap().as_deref(),
            Some("twelve bytes")
        );
        assert_eq!(l.next_line().await.unwrap().as_deref(), Some("last"));
        assert_eq!(l.next_line().await.unwrap(), None);

        let mut l = lines_of(b"thirteen byte\nok\n", 12);
        let e = l.next_line().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("longer than 12 bytes"), "{e}");
        // Endless bytes without a newline: refused at the bound, not read to the end.
        let endless = tokio::io::repeat(b'x');
        let mut l = BoundedLines::new(endless, 1 << 20);
        assert!(l.next_line().await.is_err());
        let mut l = lines_of(b"\xff\n", 12);
        assert_eq!(
            l.next_line().await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
