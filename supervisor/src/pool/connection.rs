//! Async framing over a worker's socket (the supervisor side of `wasmbox_protocol`).

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use bytes::{Bytes, BytesMut};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::io::Interest;
use tokio::net::UnixStream;
use wasmbox_protocol::{FrameError, FromWorker, PREFIX_LEN, ToWorker, decode_header, encode_head, parse_prefix};

pub struct Connection {
    stream: UnixStream,
    max_payload: u64,
    /// Bytes read from the worker and not yet consumed: a frame's prefix and header arrive
    /// with one read, not one each.
    inbox: BytesMut,
}

/// How much one read asks for beyond what a frame still needs.
const READ_CHUNK: usize = 16 << 10;

impl Connection {
    pub fn new(stream: UnixStream, max_payload: u64) -> Self {
        Connection { stream, max_payload, inbox: BytesMut::new() }
    }

    /// Sends a message without payload.
    pub async fn send(&mut self, message: &ToWorker) -> Result<(), FrameError> {
        self.split().0.send(message, &[]).await
    }

    /// See [`Sender::send_with_fds`].
    pub async fn send_with_fds(
        &mut self,
        message: &ToWorker,
        payload: &[Bytes],
        fds: &[OwnedFd],
    ) -> Result<(), FrameError> {
        self.split().0.send_with_fds(message, payload, fds).await
    }

    /// See [`Receiver::recv`].
    pub async fn recv(&mut self) -> Result<(FromWorker, Bytes), FrameError> {
        self.split().1.recv().await
    }

    /// The two directions, to send and receive at once (a streamed request body goes out
    /// while the response comes in).
    pub fn split(&mut self) -> (Sender<'_>, Receiver<'_>) {
        let receiver = Receiver { stream: &self.stream, inbox: &mut self.inbox, max_payload: self.max_payload };
        (Sender { stream: &self.stream }, receiver)
    }
}

/// The sending direction of a [`Connection`]. A send dropped before it finished leaves a
/// partial frame: the worker is then beyond use.
#[derive(Clone, Copy)]
pub struct Sender<'a> {
    stream: &'a UnixStream,
}

impl Sender<'_> {
    /// Sends a message with its payload.
    pub async fn send(&self, message: &ToWorker, payload: &[Bytes]) -> Result<(), FrameError> {
        self.send_with_fds(message, payload, &[]).await
    }

    /// Sends a message with descriptors attached to its first bytes (SCM_RIGHTS); the
    /// kernel duplicates them into the worker, the caller keeps and closes its own. The
    /// payload is the concatenation of `payload`'s parts, written as they are (never copied
    /// into one buffer). Head and payload leave in one `sendmsg` when the socket takes them
    /// whole, so the worker wakes up once, to a complete frame.
    pub async fn send_with_fds(
        &self,
        message: &ToWorker,
        payload: &[Bytes],
        fds: &[OwnedFd],
    ) -> Result<(), FrameError> {
        let total = payload.iter().map(Bytes::len).sum();
        let head = encode_head(message, total);
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let mut slices: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&head))
            .chain(payload.iter().filter(|p| !p.is_empty()).map(|p| IoSlice::new(p)))
            .collect();
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        // The descriptors ride on the first write that moves any bytes, and only on it.
        let mut control = control;
        while !rest.is_empty() {
            self.stream.writable().await.map_err(FrameError::Io)?;
            let attempt = self.stream.try_io(Interest::WRITABLE, || {
                sendmsg::<()>(self.stream.as_raw_fd(), rest, control, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(std::io::Error::from)
            });
            match attempt {
                Ok(0) => return Err(FrameError::Io(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    control = &[];
                    IoSlice::advance_slices(&mut rest, n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
        Ok(())
    }
}

/// The receiving direction of a [`Connection`].
pub struct Receiver<'a> {
    stream: &'a UnixStream,
    inbox: &'a mut BytesMut,
    max_payload: u64,
}

impl Receiver<'_> {
    /// Receives one message. EOF at any point is `Truncated`: a worker never closes its
    /// socket while the supervisor is waiting for a reply, unless it died. Cancel-safe:
    /// nothing is taken from the inbox until the whole frame is in it, so a receive given
    /// up (for another event) loses nothing.
    pub async fn recv(&mut self) -> Result<(FromWorker, Bytes), FrameError> {
        self.fill(PREFIX_LEN, 0).await?;
        let prefix = <&[u8; PREFIX_LEN]>::try_from(&self.inbox[..PREFIX_LEN]).map_err(|_| FrameError::Truncated)?;
        let lengths = parse_prefix(prefix, self.max_payload)?;
        // Prefix and header are small; the payload is read straight into the buffer it
        // is handed out in (no copy), with room asked for all of it at once.
        let whole = PREFIX_LEN + lengths.header + lengths.payload;
        self.fill(whole, 0).await?;
        let _ = self.inbox.split_to(PREFIX_LEN);
        let header = self.inbox.split_to(lengths.header);
        let payload = self.inbox.split_to(lengths.payload).freeze();
        Ok((decode_header(&header)?, payload))
    }

    /// Reads until the inbox holds at least `needed` bytes; `more` is what the caller will
    /// want right after, so one read can bring it along.
    async fn fill(&mut self, needed: usize, more: usize) -> Result<(), FrameError> {
        while self.inbox.len() < needed {
            self.inbox.reserve(needed.saturating_add(more).max(READ_CHUNK).saturating_sub(self.inbox.len()));
            self.stream.readable().await.map_err(FrameError::Io)?;
            match self.stream.try_read_buf(self.inbox) {
                Ok(0) => return Err(FrameError::Truncated),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
        Ok(())
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
            deadlines: Default::default(),
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
