//! Reading the supervisor's frames together with the descriptors sent alongside them.
//!
//! The supervisor opens the module file and the preopened directories of each invocation
//! and sends the descriptors with the `Invoke` frame (SCM_RIGHTS), so the worker never
//! resolves a host path itself. [`FdReader`] is a buffered reader over the socket that
//! uses `recvmsg` and keeps every descriptor that arrives, in order, until the serve loop
//! claims them for the frame they came with.

use std::collections::VecDeque;
use std::io::{self, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use wasmbox_protocol::MAX_PASSED_FDS;

const BUFFER: usize = 64 << 10;

pub struct FdReader {
    socket: UnixStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    fds: VecDeque<OwnedFd>,
}

impl FdReader {
    pub fn new(socket: UnixStream) -> Self {
        FdReader { socket, buf: vec![0; BUFFER].into_boxed_slice(), start: 0, end: 0, fds: VecDeque::new() }
    }

    /// The socket's descriptor number.
    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Takes the `n` descriptors that came with the frame just read. Any other number
    /// queued is a protocol error: descriptors only ever travel with an `Invoke` frame,
    /// and the supervisor sends the next one only after the previous result.
    pub fn take_fds(&mut self, n: usize) -> Result<Vec<OwnedFd>, String> {
        if self.fds.len() != n {
            let got = self.fds.len();
            self.fds.clear();
            return Err(format!("frame announced {n} descriptors, {got} arrived"));
        }
        Ok(self.fds.drain(..).collect())
    }

    fn recv(&mut self, into_buffer: bool, out: &mut [u8]) -> io::Result<usize> {
        let fd: RawFd = self.socket.as_raw_fd();
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_PASSED_FDS]);
        let target: &mut [u8] = if into_buffer { &mut self.buf } else { out };
        let mut iov = [IoSliceMut::new(target)];
        loop {
            // Never a blocking `recvmsg`: it sleeps on the socket's one wait queue, where the
            // kernel also announces free write space, each time the supervisor reads a reply
            // of this worker's; it would wake for nothing once per invocation (two context
            // switches). `poll` waits for input only.
            match recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT) {
                Ok(msg) => {
                    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                    for c in msg.cmsgs().map_err(io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(fds) = c {
                            for raw in fds {
                                // SAFETY: the kernel just installed `raw` in this process
                                // for this message; nothing else refers to it.
                                self.fds.push_back(unsafe { OwnedFd::from_raw_fd(raw) });
                            }
                        }
                    }
                    if truncated {
                        return Err(io::Error::other("more descriptors arrived than a frame may carry"));
                    }
                    return Ok(msg.bytes);
                }
                Err(nix::errno::Errno::EAGAIN) => wait_readable(&self.socket)?,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Sleeps until `socket` has input (or its peer hung up).
fn wait_readable(socket: &UnixStream) -> io::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    loop {
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

impl Read for FdReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            if out.len() >= self.buf.len() {
                return self.recv(false, out);
            }
            self.end = self.recv(true, &mut [])?;
            self.start = 0;
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{ControlMessage, sendmsg};
    use std::io::{IoSlice, Write};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_arrive_with_their_bytes_and_are_claimed_once() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let file = tempfile::tempfile().expect("tempfile");
        let raw = [file.as_fd().as_raw_fd(), file.as_fd().as_raw_fd()];
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(b"head")],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        (&a).write_all(b"tail").expect("write");
        let mut reader = FdReader::new(b);
        let mut got = [0u8; 8];
        reader.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"headtail");
        assert!(reader.take_fds(1).is_err(), "a count mismatch is refused");
        assert!(reader.take_fds(0).is_ok(), "and the mismatched descriptors were dropped");
    }
}
