//! The VM's serial console: read from the socket the VMM serves it on (and
//! from the VM process's stderr) into a bounded ring buffer, so a guest that
//! prints without end costs a fixed amount of broker memory, and a failed
//! boot can quote the console's last lines.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};

/// Last `cap` bytes of a console.
#[derive(Debug, Clone)]
pub struct ConsoleLog {
    inner: Arc<Mutex<VecDeque<u8>>>,
    cap: usize,
}

impl ConsoleLog {
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(VecDeque::with_capacity(cap.min(1 << 16)))),
            cap,
        }
    }

    pub fn push(&self, bytes: &[u8]) {
        let mut buf = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = &bytes[bytes.len().saturating_sub(self.cap)..];
        let overflow = (buf.len() + bytes.len()).saturating_sub(self.cap);
        buf.drain(..overflow);
        buf.extend(bytes);
    }

    /// The last `max_lines` lines (lossy UTF-8, control characters removed).
    pub fn tail(&self, max_lines: usize) -> String {
        let buf = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let text: String = String::from_utf8_lossy(&buf.iter().copied().collect::<Vec<u8>>())
            .chars()
            .filter(|c| *c == '\n' || !c.is_control())
            .collect();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(max_lines)..].join("\n")
    }

    /// Connects to the VMM's console socket (a socket owned by `uid`;
    /// waiting for it to appear until `deadline`) and copies it into the log from then on.
    pub async fn attach(
        &self,
        socket: &std::path::Path,
        uid: u32,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        let stream = loop {
            match crate::vm_socket::connect_owned(socket, uid).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!(
                        "cannot connect to the console {}: {e}",
                        socket.display()
                    ))
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        };
        tokio::spawn(self.clone().follow(stream));
        Ok(())
    }

    /// Copies `reader` into the log until EOF.
    pub async fn follow<R: AsyncRead + Unpin>(self, mut reader: R) {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = reader.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            self.push(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_last_bytes_and_lines() {
        let log = ConsoleLog::new(16);
        log.push(b"first line\nsecond line\n");
        log.push(b"third\n");
        let tail = log.tail(10);
        assert!(!tail.contains("first"), "{tail}");
        assert!(tail.ends_with("third"), "{tail}");
        log.push(&[b'x'; 100]);
        assert_eq!(log.tail(1), "x".repeat(16));
        assert_eq!(log.tail(1).len(), 16);
    }

    #[test]
    fn control_characters_are_removed() {
        let log = ConsoleLog::new(64);
        log.push(b"a\x1b[31mred\x07\r\nb\n");
        assert_eq!(log.tail(5), "a[31mred\nb");
    }
}
