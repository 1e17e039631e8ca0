//! Closing TCP connections of other network namespaces, as `ss -K` does: a SOCK_DESTROY request
//! on a NETLINK_SOCK_DIAG socket opened inside the socket's namespace. The kernel aborts the
//! socket (its owner sees ECONNABORTED) and sends the peer a reset. It needs inet_diag
//! (built in, or the tcp_diag module) and CONFIG_INET_DIAG_DESTROY, which Debian, Ubuntu and
//! Fedora kernels have.
use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

/// From linux/sock_diag.h and linux/inet_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const ALL_STATES: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the kernel has no TCP socket diagnostics (inet_diag/tcp_diag): {0}")]
    NoDiag(io::Error),
    #[error("the kernel cannot close sockets on request (CONFIG_INET_DIAG_DESTROY is off)")]
    NoDestroy,
    #[error("entering the network namespace {path}: {source}")]
    Namespace { path: String, source: io::Error },
    #[error("netlink sock_diag: {0}")]
    Netlink(io::Error),
}

/// One end of a TCP connection, as its own socket sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `SO_COOKIE`: the kernel closes the socket only if it still has this cookie.
    pub cookie: u64,
}

/// What became of one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Closed,
    /// No such socket (any more): it closed by itself, or its 4-tuple now belongs to another.
    Gone,
}

/// `struct inet_diag_req_v2` with its `struct inet_diag_sockid`, behind a `struct nlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    /// Ports and addresses in network byte order.
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

fn octets(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

impl Request {
    fn new(kind: u16, flags: u16, socket: &TcpSocket) -> Self {
        let v4 = socket.local.is_ipv4();
        Self {
            len: size_of::<Self>() as u32,
            kind,
            flags: libc::NLM_F_REQUEST as u16 | flags,
            family: if v4 { libc::AF_INET } else { libc::AF_INET6 } as u8,
            protocol: libc::IPPROTO_TCP as u8,
            states: ALL_STATES,
            sport: socket.local.port().to_be_bytes(),
            dport: socket.remote.port().to_be_bytes(),
            src: octets(socket.local.ip()),
            dst: octets(socket.remote.ip()),
            // As the kernel splits it (sock_diag_save_cookie).
            cookie: [socket.cookie as u32, (socket.cookie >> 32) as u32],
            ..Self::default()
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: a repr(C) struct of integers and byte arrays with no padding.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }
}

/// A NETLINK_SOCK_DIAG socket of the calling thread's network namespace.
struct DiagSocket {
    fd: OwnedFd,
    seq: u32,
}

impl DiagSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The kernel answers at once; a bound on the wait all the same.
        let timeout = libc::timeval { tv_sec: 5, tv_usec: 0 };
        // SAFETY: valid fd and option value.
        let set = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        if set < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, seq: 0 })
    }

    /// Sends one request and returns the kernel's errno for it (0: done). A dump's answer is
    /// read to its end.
    fn ask(&mut self, mut request: Request) -> io::Result<i32> {
        self.seq = self.seq.wrapping_add(1);
        request.seq = self.seq;
        let bytes = request.bytes();
        // SAFETY: valid fd and buffer; the kernel is the default destination of a netlink socket.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
                let seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
                if len < 16 || len > rest.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                if seq == self.seq {
                    // Both carry an int: the negative errno, 0 for success.
                    let code = || if len >= 20 { -i32::from_ne_bytes(rest[16..20].try_into().expect("4 bytes")) } else { 0 };
                    match kind as i32 {
                        libc::NLMSG_ERROR | libc::NLMSG_DONE => return Ok(code()),
                        _ => {}
                    }
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    }
}

/// Whether this namespace's kernel can close TCP sockets on request: diagnostics are there
/// (a dump of no states answers) and destroying a socket that does not exist says "no such
/// socket" rather than "not supported".
pub fn probe() -> Result<(), Error> {
    let mut diag = DiagSocket::open().map_err(Error::Netlink)?;
    let nothing = TcpSocket { local: "127.0.0.1:0".parse().expect("addr"), remote: "127.0.0.1:0".parse().expect("addr"), cookie: 0 };
    let dump_nothing = Request { states: 0, ..Request::new(SOCK_DIAG_BY_FAMILY, libc::NLM_F_DUMP as u16, &nothing) };
    match diag.ask(dump_nothing).map_err(Error::Netlink)? {
        0 => {}
        errno => return Err(Error::NoDiag(io::Error::from_raw_os_error(errno))),
    }
    match diag.ask(Request::new(SOCK_DESTROY, libc::NLM_F_ACK as u16, &nothing)).map_err(Error::Netlink)? {
        libc::EOPNOTSUPP => Err(Error::NoDestroy),
        _ => Ok(()),
    }
}

/// Closes `sockets`, which live in the network namespace `netns` (a /proc/PID/ns/net), from
/// a thread of its own that enters it (a namespace is per thread; the agent's others stay).
/// One outcome per socket, in order.
pub fn destroy_in(netns: &Path, sockets: Vec<TcpSocket>) -> Result<Vec<Outcome>, Error> {
    let namespace = File::open(netns).map_err(|source| Error::Namespace { path: netns.display().to_string(), source })?;
    let path = netns.display().to_string();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: a valid namespace fd; only this thread moves.
                if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                    return Err(Error::Namespace { path, source: io::Error::last_os_error() });
                }
                destroy(&sockets)
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Netlink(io::Error::other("the closing thread panicked"))))
    })
}

/// Closes `sockets` of the calling thread's network namespace.
fn destroy(sockets: &[TcpSocket]) -> Result<Vec<Outcome>, Error> {
    let mut diag = DiagSocket::open().map_err(Error::Netlink)?;
    let mut out = Vec::with_capacity(sockets.len());
    for socket in sockets {
        match diag.ask(Request::new(SOCK_DESTROY, libc::NLM_F_ACK as u16, socket)).map_err(Error::Netlink)? {
            0 => out.push(Outcome::Closed),
            // ENOENT: no socket with this 4-tuple; ESTALE: another socket has it now.
            libc::ENOENT | libc::ESTALE => out.push(Outcome::Gone),
            libc::EOPNOTSUPP => return Err(Error::NoDestroy),
            errno => return Err(Error::Netlink(io::Error::from_raw_os_error(errno))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read,
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd,
    };

    use super::*;

    fn cookie_of(stream: &TcpStream) -> u64 {
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as u32;
        // SAFETY: valid fd and out-pointer.
        let r =
            unsafe { libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&mut cookie as *mut u64).cast(), &mut len) };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        cookie
    }

    /// Needs the kernel's support (and CAP_NET_ADMIN): skipped with the reason otherwise.
    #[test]
    fn a_destroyed_socket_aborts_and_its_peer_is_reset_and_a_stale_cookie_is_left_alone() {
        if let Err(e) = probe() {
            eprintln!("skipped: {e}");
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let socket = TcpSocket { local: server.local_addr().unwrap(), remote: server.peer_addr().unwrap(), cookie: cookie_of(&server) };
        let here = Path::new("/proc/self/ns/net");
        // A cookie that is not the socket's: nothing happens.
        let stale = TcpSocket { cookie: socket.cookie + 1_000_000, ..socket };
        assert_eq!(destroy_in(here, vec![stale]).unwrap(), [Outcome::Gone]);
        assert_eq!(destroy_in(here, vec![socket]).unwrap(), [Outcome::Closed]);
        let mut buf = [0u8; 1];
        assert_eq!(server.read(&mut buf).unwrap_err().raw_os_error(), Some(libc::ECONNABORTED));
        let mut client = client;
        assert_eq!(client.read(&mut buf).unwrap_err().raw_os_error(), Some(libc::ECONNRESET));
        assert_eq!(destroy_in(here, vec![socket]).unwrap(), [Outcome::Gone], "already gone");
    }
}
