//! A workload's stdout and stderr, cut into lines with bounded memory.

use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

impl OutputStream {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

/// One line of a workload's output, without its newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// When slipway read it, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub stream: OutputStream,
    /// The line, decoded lossily as UTF-8. A truncated line ends with a marker saying how many
    /// bytes were dropped.
    pub text: String,
    /// Whether the line was longer than the driver's `max_line_bytes` and was cut.
    pub truncated: bool,
}

/// Where output goes: a bounded channel. A slow consumer slows the reader, the pipe fills and
/// the workload blocks on write; nothing is buffered without bound.
pub type OutputSink = mpsc::Sender<OutputLine>;

const READ_CHUNK: usize = 64 * 1024;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct LineBuf {
    bytes: Vec<u8>,
    dropped: u64,
    max: usize,
}

impl LineBuf {
    fn push(&mut self, data: &[u8]) {
        let room = self.max.saturating_sub(self.bytes.len());
        let take = room.min(data.len());
        self.bytes.extend_from_slice(&data[..take]);
        self.dropped += (data.len() - take) as u64;
    }

    fn take(&mut self, stream: OutputStream) -> OutputLine {
        if self.bytes.last() == Some(&b'\r') && self.dropped == 0 {
            self.bytes.pop();
        }
        let mut text = String::from_utf8_lossy(&self.bytes).into_owned();
        let truncated = self.dropped > 0;
        if truncated {
            text.push_str(&format!(" [… {} bytes truncated]", self.dropped));
        }
        self.bytes.clear();
        self.dropped = 0;
        OutputLine {
            ts_ms: now_ms(),
            stream,
            text,
            truncated,
        }
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.dropped == 0
    }
}

/// Reads `reader` to its end, sending each line to `sink`. If the sink's receiver is gone the
/// rest is read and discarded, so the workload never blocks on a pipe nobody reads.
pub(crate) async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    stream: OutputStream,
    mut sink: Option<OutputSink>,
    max_line_bytes: usize,
) {
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut line = LineBuf {
        bytes: Vec::new(),
        dropped: 0,
        max: max_line_bytes.max(1),
    };
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut data = &chunk[..n];
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            line.push(&data[..pos]);
            data = &data[pos + 1..];
            let out = line.take(stream);
            if let Some(s) = &sink {
                if s.send(out).await.is_err() {
                    sink = None;
                }
            }
        }
        line.push(data);
    }
    if !line.is_empty() {
        if let Some(s) = &sink {
            let _ = s.send(line.take(stream)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(input: &'static [u8], max: usize) -> Vec<OutputLine> {
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(pump(input, OutputStream::Stderr, Some(tx), max));
        let mut out = Vec::new();
        while let Some(l) = rx.recv().await {
            out.push(l);
        }
        task.await.unwrap();
        out
    }

    #[tokio::test]
    async fn splits_lines_and_keeps_the_last_partial_one() {
        let lines = lines_of(b"one\r\ntwo\n\nthree", 100).await;
        let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["one", "two", "", "three"]);
        assert!(lines
            .iter()
            .all(|l| l.stream == OutputStream::Stderr && !l.truncated));
    }

    #[tokio::test]
    async fn long_lines_are_truncated_and_marked() {
        let lines = lines_of(b"abcdefghij\nok\n", 4).await;
        assert_eq!(lines.len(), 2);
        assert!(lines[0].truncated);
        assert_eq!(lines[0].text, "abcd [… 6 bytes truncated]");
        assert_eq!(lines[1].text, "ok");
        assert!(!lines[1].truncated);
    }
}
