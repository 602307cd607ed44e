//! Async framing over a worker's socket (the supervisor side of `wasmbox_protocol`).

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use bytes::{Bytes, BytesMut};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use wasmbox_protocol::{FrameError, FromWorker, PREFIX_LEN, ToWorker, decode_header, encode_head, parse_prefix};

pub struct Connection {
    stream: UnixStream,
    max_payload: u64,
}

impl Connection {
    pub fn new(stream: UnixStream, max_payload: u64) -> Self {
        Connection { stream, max_payload }
    }

    /// Sends a message; the payload is written as is, after the header.
    pub async fn send(&mut self, message: &ToWorker, payload: &[u8]) -> Result<(), FrameError> {
        let head = encode_head(message, payload.len());
        self.stream.write_all(&head).await.map_err(FrameError::Io)?;
        if !payload.is_empty() {
            self.stream.write_all(payload).await.map_err(FrameError::Io)?;
        }
        Ok(())
    }

    /// Sends a message with descriptors attached to its first bytes (SCM_RIGHTS); the
    /// kernel duplicates them into the worker, the caller keeps and closes its own.
    pub async fn send_with_fds(
        &mut self,
        message: &ToWorker,
        payload: &[u8],
        fds: &[OwnedFd],
    ) -> Result<(), FrameError> {
        if fds.is_empty() {
            return self.send(message, payload).await;
        }
        let head = encode_head(message, payload.len());
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let sent = loop {
            self.stream.writable().await.map_err(FrameError::Io)?;
            let attempt = self.stream.try_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    self.stream.as_raw_fd(),
                    &[IoSlice::new(&head)],
                    &[ControlMessage::ScmRights(&raw)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match attempt {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(FrameError::Io(e)),
            }
        };
        self.stream.write_all(&head[sent..]).await.map_err(FrameError::Io)?;
        if !payload.is_empty() {
            self.stream.write_all(payload).await.map_err(FrameError::Io)?;
        }
        Ok(())
    }

    /// Receives one message. EOF at any point is `Truncated`: a worker never closes its
    /// socket while the supervisor is waiting for a reply, unless it died.
    pub async fn recv(&mut self) -> Result<(FromWorker, Bytes), FrameError> {
        let mut prefix = [0u8; PREFIX_LEN];
        self.read_exact(&mut prefix).await?;
        let lengths = parse_prefix(&prefix, self.max_payload)?;
        let mut header = vec![0u8; lengths.header];
        self.read_exact(&mut header).await?;
        let mut payload = BytesMut::zeroed(lengths.payload);
        self.read_exact(&mut payload).await?;
        Ok((decode_header(&header)?, payload.freeze()))
    }

    async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), FrameError> {
        match self.stream.read_exact(buf).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
            Err(e) => Err(FrameError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use wasmbox_protocol::{Hello, PROTOCOL_VERSION};

    fn hello() -> FromWorker {
        FromWorker::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            worker_version: "test".into(),
            engine: "wasmtime".into(),
            engine_version: "x".into(),
            pid: 1,
            cgroup: "0::/\n".into(),
            hardening: vec!["pdeathsig".into()],
        })
    }

    #[tokio::test]
    async fn frames_cross_a_real_socketpair() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(a, 16);
        b.write_all(&encode_head(&hello(), 5)).await.unwrap();
        b.write_all(b"12345").await.unwrap();
        let (msg, payload) = conn.recv().await.unwrap();
        assert_eq!(msg, hello());
        assert_eq!(&payload[..], b"12345");
    }

    #[tokio::test]
    async fn oversized_payload_and_eof_are_errors() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(a, 4);
        b.write_all(&encode_head(&hello(), 5)).await.unwrap();
        assert!(matches!(conn.recv().await, Err(FrameError::PayloadTooLarge { len: 5, limit: 4 })));
        let (a, b) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(a, 4);
        drop(b);
        assert!(matches!(conn.recv().await, Err(FrameError::Truncated)));
    }
}
