//! Restart without refusing a connection: the running agent hands its listening sockets to the
//! next one, as descriptors over a Unix socket (SCM_RIGHTS). The socket itself changes hands,
//! with the connections waiting in its backlog; nothing is ever closed or re-bound, so a client
//! of an L7 Service never meets a port nobody listens on (with SO_REUSEPORT, connections queued
//! on the old agent's socket would be reset when it closed).
//!
//! The rendezvous is an abstract Unix socket named after the pin directory, so only agents
//! serving the same datapath meet, and nothing is left on disk. A successor asks, the running
//! agent answers with its listeners and their addresses, stops writing the kernel's maps and
//! releases the pin directory (the datapath stays), but goes on accepting and serving with
//! what it knows until the successor says it serves (or goes away); then it stops accepting
//! and drains. Both accept on the same sockets meanwhile: no client waits for the successor's
//! start.
use std::{
    io::{self, Read, Write},
    net::SocketAddr,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream},
    },
    path::Path,
    time::Duration,
};

/// At most this many sockets change hands (the agent has four listeners).
const MAX_FDS: usize = 8;
const ASK: &[u8] = b"mesh-handoff-v1\n";

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("listening for a successor on {name:?}: {source}")]
    Listen { name: String, source: io::Error },
    #[error("exchanging sockets with the running agent: {0}")]
    Exchange(#[source] io::Error),
    #[error("the running agent's answer is malformed: {0}")]
    Malformed(String),
}

fn rendezvous(pin_dir: &Path) -> UnixAddr {
    // Abstract names have no filesystem entry; 107 bytes at most.
    let mut name = format!("mesh-handoff:{}", pin_dir.display()).into_bytes();
    name.truncate(100);
    UnixAddr::from_abstract_name(name).expect("an abstract name of at most 100 bytes")
}

/// A running agent's offer of its listeners to a successor.
pub struct Offer {
    listener: UnixListener,
    sockets: Vec<(SocketAddr, OwnedFd)>,
}

impl Offer {
    /// Offers `sockets` (duplicates of the agent's listeners) to whoever asks at `pin_dir`'s
    /// rendezvous. Fails if another agent offers there already.
    pub fn new(pin_dir: &Path, sockets: Vec<(SocketAddr, OwnedFd)>) -> Result<Self, HandoffError> {
        let addr = rendezvous(pin_dir);
        let listener = UnixListener::bind_addr(&addr)
            .map_err(|source| HandoffError::Listen { name: format!("@mesh-handoff:{}", pin_dir.display()), source })?;
        Ok(Self { listener, sockets })
    }

    /// Waits for a successor and hands it the sockets; returns once they are handed over, with
    /// the line to the successor. A caller that is not a successor is ignored. Cancelled by
    /// dropping it.
    pub async fn handed_over(self) -> io::Result<Successor> {
        self.listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(self.listener)?;
        let sockets = std::sync::Arc::new(self.sockets);
        loop {
            let (stream, _) = listener.accept().await?;
            let stream = stream.into_std()?;
            let sockets = sockets.clone();
            // A few small blocking reads and writes, each bounded by a timeout.
            let handed = tokio::task::spawn_blocking(move || serve_successor(stream, &sockets)).await.map_err(io::Error::other)?;
            if let Ok(stream) = handed {
                return Ok(Successor(stream));
            }
        }
    }
}

/// The running agent's line to the agent that took its sockets.
pub struct Successor(UnixStream);

impl Successor {
    /// Resolves when the successor serves (it said so), is gone (the line closed), or `limit`
    /// has passed.
    pub async fn serving(self, limit: Duration) -> SuccessorState {
        let mut stream = self.0;
        tokio::task::spawn_blocking(move || {
            let _ = stream.set_read_timeout(Some(limit));
            let mut said = [0u8; SERVING.len()];
            match stream.read_exact(&mut said) {
                Ok(()) if said == SERVING => SuccessorState::Serving,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => SuccessorState::Silent,
                _ => SuccessorState::Gone,
            }
        })
        .await
        .unwrap_or(SuccessorState::Gone)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuccessorState {
    Serving,
    Gone,
    Silent,
}

/// The agent that took the sockets: tells its predecessor when it serves.
pub struct Predecessor(UnixStream);

impl Predecessor {
    /// The predecessor may stop accepting now.
    pub fn serving(mut self) {
        let _ = self.0.write_all(SERVING);
    }
}

const SERVING: &[u8] = b"serving\n";

fn serve_successor(mut stream: UnixStream, sockets: &[(SocketAddr, OwnedFd)]) -> io::Result<UnixStream> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut ask = [0u8; ASK.len()];
    stream.read_exact(&mut ask)?;
    if ask != ASK {
        return Err(io::Error::other("not a mesh agent"));
    }
    let addrs: Vec<String> = sockets.iter().map(|(a, _)| a.to_string()).collect();
    let fds: Vec<RawFd> = sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    send_fds(&stream, serde_json::to_string(&addrs).expect("json").as_bytes(), &fds)?;
    // The successor holds them once it says so.
    let mut ok = [0u8; 3];
    stream.read_exact(&mut ok)?;
    if &ok == b"ok\n" { Ok(stream) } else { Err(io::Error::other("the successor did not confirm")) }
}

/// Asks a running agent at `pin_dir` for its listeners. None when no agent offers them.
pub fn take(pin_dir: &Path) -> Result<Option<Taken>, HandoffError> {
    let mut stream = match UnixStream::connect_addr(&rendezvous(pin_dir)) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) => return Ok(None),
        Err(e) => return Err(HandoffError::Exchange(e)),
    };
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(HandoffError::Exchange)?;
    stream.write_all(ASK).map_err(HandoffError::Exchange)?;
    let (data, fds) = recv_fds(&stream).map_err(HandoffError::Exchange)?;
    let addrs: Vec<String> = serde_json::from_slice(&data).map_err(|e| HandoffError::Malformed(e.to_string()))?;
    if addrs.len() != fds.len() {
        return Err(HandoffError::Malformed(format!("{} addresses for {} sockets", addrs.len(), fds.len())));
    }
    let mut sockets = Vec::new();
    for (addr, fd) in addrs.iter().zip(fds) {
        let addr: SocketAddr = addr.parse().map_err(|_| HandoffError::Malformed(format!("address {addr:?}")))?;
        sockets.push((addr, std::net::TcpListener::from(fd)));
    }
    stream.write_all(b"ok\n").map_err(HandoffError::Exchange)?;
    Ok(Some(Taken { sockets, predecessor: Predecessor(stream) }))
}

/// What a successor took: the sockets, and the line to tell the predecessor it serves.
pub struct Taken {
    pub sockets: Vec<(SocketAddr, std::net::TcpListener)>,
    pub predecessor: Predecessor,
}

/// A control buffer with room for `fds` descriptors.
fn control_buffer(fds: usize) -> Vec<u8> {
    // SAFETY: CMSG_SPACE is a pure computation.
    vec![0u8; unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) } as usize]
}

/// A message header over one data buffer and a control buffer; both must outlive its use.
fn message_header(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // socklen_t or size_t, depending on the libc (musl, glibc).
    msg.msg_controllen = control.len() as _;
    msg
}

fn send_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS);
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    let mut control = control_buffer(fds.len());
    let msg = message_header(&mut iov, &mut control);
    // SAFETY: the control buffer has room for one header and the descriptors (CMSG_SPACE).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of_val(fds) as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<RawFd>(), fds.len());
    }
    // SAFETY: a valid msghdr on a socket we own.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn recv_fds(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = vec![0u8; 4096];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    let mut control = control_buffer(MAX_FDS);
    let mut msg = message_header(&mut iov, &mut control);
    // SAFETY: a valid msghdr on a socket we own; received descriptors close on exec.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                let first = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(first.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("more sockets than expected were sent"));
    }
    data.truncate(n as usize);
    Ok((data, fds))
}

/// A duplicate of `listener`'s descriptor, to offer while the listener itself serves.
pub fn duplicate(listener: &tokio::net::TcpListener) -> io::Result<(SocketAddr, OwnedFd)> {
    use std::os::fd::AsFd as _;
    Ok((listener.local_addr()?, listener.as_fd().try_clone_to_owned()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_change_hands_with_their_waiting_connections() {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let offer = Offer::new(dir.path(), vec![duplicate(&listener).unwrap()]).unwrap();
        // A second offer on the same pin directory is refused.
        assert!(Offer::new(dir.path(), vec![]).is_err());
        let handed = tokio::spawn(offer.handed_over());
        // A client connects before the hand-over: it waits in the backlog.
        let mut early = std::net::TcpStream::connect(addr).unwrap();
        let path = dir.path().to_owned();
        let taken = tokio::task::spawn_blocking(move || take(&path)).await.unwrap().unwrap().expect("an offer");
        let line = handed.await.unwrap().unwrap();
        // The predecessor hears when the successor serves.
        let (heard, ()) = tokio::join!(line.serving(Duration::from_secs(30)), async { taken.predecessor.serving() });
        assert_eq!(heard, SuccessorState::Serving);
        drop(listener);
        assert_eq!(taken.sockets.len(), 1);
        let (got_addr, successor) = taken.sockets.into_iter().next().unwrap();
        assert_eq!(got_addr, addr);
        assert_eq!(successor.local_addr().unwrap(), addr);
        // The early client is accepted by the successor, on the same socket.
        let (mut accepted, _) = successor.accept().unwrap();
        early.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        // Nobody offers any more.
        assert!(take(dir.path()).unwrap().is_none());
    }
}
