//! Async framing over a worker's socket (the supervisor side of `wasmbox_protocol`).

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use bytes::{Bytes, BytesMut};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use wasmbox_protocol::{FrameError, FromWorker, PREFIX_LEN, ToWorker, decode_header, encode_head, parse_prefix};

/// A worker's socket, registered with the reactor for input only: the kernel announces
/// free write space each time the worker reads a frame, and a registration for output would
/// wake this process's I/O thread for each of them. A send that finds the socket full (a
/// large payload) waits for space through a registration of its own, made then.
pub struct Connection {
    socket: AsyncFd<UnixStream>,
    max_payload: u64,
    /// Bytes read from the worker and not yet consumed: a frame's prefix and header arrive
    /// with one read, not one each.
    inbox: BytesMut,
}

/// How much one read asks for beyond what a frame still needs.
const READ_CHUNK: usize = 16 << 10;

impl Connection {
    /// Takes over `socket` (made non-blocking here); fails only if the reactor refuses it.
    pub fn new(socket: UnixStream, max_payload: u64) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        // SAFETY: the descriptor is the socket's own, owned by it for the AsyncFd's life.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }.map_err(io::Error::from)?;
        Ok(Connection { socket, max_payload, inbox: BytesMut::new() })
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
        let receiver = Receiver { socket: &self.socket, inbox: &mut self.inbox, max_payload: self.max_payload };
        (Sender { socket: self.socket.get_ref() }, receiver)
    }
}

/// The sending direction of a [`Connection`]. A send dropped before it finished leaves a
/// partial frame: the worker is then beyond use.
#[derive(Clone, Copy)]
pub struct Sender<'a> {
    socket: &'a UnixStream,
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
        // Made the first time the socket is full, for the rest of this frame.
        let mut space: Option<AsyncFd<OwnedFd>> = None;
        while !rest.is_empty() {
            match sendmsg::<()>(self.socket.as_raw_fd(), rest, control, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(0) => return Err(FrameError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    control = &[];
                    IoSlice::advance_slices(&mut rest, n);
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    if space.is_none() {
                        let dup = self.socket.as_fd().try_clone_to_owned().map_err(FrameError::Io)?;
                        // SAFETY: `dup` is a descriptor of its own, owned by the AsyncFd.
                        let registered = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) };
                        space = Some(registered.map_err(|e| FrameError::Io(e.into()))?);
                    }
                    if let Some(space) = &space {
                        space.writable().await.map_err(FrameError::Io)?.clear_ready();
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(FrameError::Io(e.into())),
            }
        }
        Ok(())
    }
}

/// The receiving direction of a [`Connection`].
pub struct Receiver<'a> {
    socket: &'a AsyncFd<UnixStream>,
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
            let mut ready = self.socket.readable().await.map_err(FrameError::Io)?;
            match ready.try_io(|socket| read_into(socket.get_ref(), self.inbox)) {
                Ok(Ok(0)) => return Err(FrameError::Truncated),
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(FrameError::Io(e)),
                // Would block: readiness cleared, wait again.
                Err(_) => {}
            }
        }
        Ok(())
    }
}

/// One `read` into the free capacity of `inbox`.
fn read_into(socket: &UnixStream, inbox: &mut BytesMut) -> io::Result<usize> {
    let spare = inbox.spare_capacity_mut();
    // SAFETY: `spare` is writable memory of `spare.len()` bytes owned by `inbox`; the
    // kernel writes at most that many, and only the bytes it reports are marked as set.
    let n = unsafe { nix::libc::read(socket.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialized the first `n` bytes of the spare capacity.
    unsafe { inbox.set_len(inbox.len() + n) };
    Ok(n)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
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
        let mut conn = Connection::new(a, 16).unwrap();
        b.write_all(&encode_head(&hello(), 5)).unwrap();
        b.write_all(b"12345").unwrap();
        let (msg, payload) = conn.recv().await.unwrap();
        assert_eq!(msg, hello());
        assert_eq!(&payload[..], b"12345");
    }

    #[tokio::test]
    async fn oversized_payload_and_eof_are_errors() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(a, 4).unwrap();
        b.write_all(&encode_head(&hello(), 5)).unwrap();
        assert!(matches!(conn.recv().await, Err(FrameError::PayloadTooLarge { len: 5, limit: 4 })));
        let (a, b) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(a, 4).unwrap();
        drop(b);
        assert!(matches!(conn.recv().await, Err(FrameError::Truncated)));
    }

    /// A frame larger than the socket holds goes out in parts, waiting for space between
    /// them, while the peer reads at its own pace.
    #[tokio::test]
    async fn a_frame_larger_than_the_socket_waits_for_space() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(a, 0).unwrap();
        let payload = Bytes::from(vec![7u8; 8 << 20]);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 64 << 10];
            while got.len() < (8 << 20) + 64 {
                std::thread::sleep(std::time::Duration::from_micros(200));
                match b.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
            got
        });
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            conn.send_with_fds(&ToWorker::Shutdown, &[payload], &[]),
        )
        .await
        .expect("the send finished")
        .unwrap();
        drop(conn);
        let got = reader.join().unwrap();
        let head = encode_head(&ToWorker::Shutdown, 8 << 20);
        assert_eq!(got.len(), head.len() + (8 << 20));
        assert_eq!(&got[..head.len()], &head[..]);
        assert!(got[head.len()..].iter().all(|&b| b == 7));
    }
}
