//! Facts about the host the agent runs on: where cgroup v2 and bpffs are mounted, the kernel
//! version, capabilities. Read from /proc, never assumed (cgroup v2 may be at
//! /sys/fs/cgroup or, on hybrid systems, /sys/fs/cgroup/unified).
use std::{
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// Default pin directory.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/mesh";
const BPFFS_ROOT: &str = "/sys/fs/bpf";

pub mod sock_diag;

/// Mount points of a filesystem type, from /proc/self/mountinfo.
pub fn mount_points(fstype: &str) -> io::Result<Vec<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mount_points(&text, fstype))
}

fn parse_mount_points(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            (post.split(' ').next()? == fstype).then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect()
}

/// mountinfo escapes spaces and a few other bytes as \ooo.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(b) = u8::from_str_radix(&code, 8) {
                out.push(b as char);
                continue;
            }
            out.push(c);
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}

/// The cgroup v2 mount point.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    mount_points("cgroup2")?
        .into_iter()
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 filesystem in /proc/self/mountinfo"))
}

/// A pod's cgroup directory and its id (the directory's inode number: what
/// `bpf_get_current_cgroup_id()` returns for the pod's sockets' cgroup and its ancestors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    pub path: PathBuf,
    pub id: u64,
}

/// Finds the cgroup kubelet made for the pod `uid` under `root` (the node's cgroup v2 root),
/// for both cgroup drivers and any kubelet `--cgroup-root`:
/// systemd `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, _ for ->.slice`,
/// cgroupfs `kubepods/burstable/pod<uid>` (Guaranteed pods sit right under kubepods), and the
/// same under e.g. kind's `kubelet.slice/kubelet-kubepods.slice`. Only directories named
/// `kube*` or a QoS class are entered, a few levels deep: a handful of reads per pod.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PodCgroup> {
    if uid.is_empty() {
        return None;
    }
    let systemd = format!("pod{}.slice", uid.replace('-', "_"));
    let cgroupfs = format!("pod{uid}");
    let mut level = vec![root.to_path_buf()];
    for _ in 0..5 {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(entries) = fs::read_dir(dir) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if name == cgroupfs || name.ends_with(&systemd) {
                    return cgroup_at(&entry.path());
                }
                if name.starts_with("kube") || name == "burstable" || name == "besteffort" {
                    next.push(entry.path());
                }
            }
        }
        level = next;
    }
    None
}

/// A pod's cgroup: the one its `mesh.dev/cgroup` annotation names (a path under the cgroup v2
/// `mount`, as /proc/PID/cgroup shows it), or else the one kubelet made for `uid` under `root`.
pub fn locate_pod_cgroup(root: &Path, mount: Option<&Path>, annotated: Option<&Path>, uid: &str) -> Option<PodCgroup> {
    match (annotated, mount) {
        (Some(path), Some(mount)) => cgroup_at(&mount.join(path.strip_prefix("/").unwrap_or(path))),
        (Some(_), None) => None,
        (None, _) => find_pod_cgroup(root, uid),
    }
}

/// The cgroup at `path` (a standalone pod's, named by its annotation), when it exists.
/// The calling process's own cgroup v2 directory (from /proc/self/cgroup), under `mount`.
pub fn own_cgroup(mount: &Path) -> Option<PodCgroup> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    let relative = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    cgroup_at(&mount.join(relative.trim_start_matches('/')))
}

pub fn cgroup_at(path: &Path) -> Option<PodCgroup> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(path).ok().filter(|m| m.is_dir())?;
    Some(PodCgroup { path: path.to_path_buf(), id: meta.ino() })
}

/// The network namespace (its /proc/PID/ns/net) of a process in the cgroup at `path` or below
/// it: a pod's containers sit in child cgroups of the pod's and share its namespace. None when
/// no process is there.
pub fn netns_of_cgroup(path: &Path) -> Option<PathBuf> {
    let mut level = vec![path.to_path_buf()];
    for _ in 0..4 {
        let mut next = Vec::new();
        for dir in &level {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            // The first one still running (a listed process may have exited since).
            let found = procs.lines().map(|pid| PathBuf::from(format!("/proc/{}/ns/net", pid.trim()))).find(|ns| ns.exists());
            if found.is_some() {
                return found;
            }
            let Ok(entries) = fs::read_dir(dir) else { continue };
            next.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
        level = next;
    }
    None
}

/// The addresses of this network namespace's interfaces (the node's, for an agent on the host
/// network).
pub fn interface_addresses() -> io::Result<std::collections::HashSet<std::net::IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: out-pointer to a list freed below.
    if unsafe { libc::getifaddrs(&mut list) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = std::collections::HashSet::new();
    let mut at = list;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs made; its address, when set, is a sockaddr of
        // the family it names.
        unsafe {
            let addr = (*at).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*addr.cast::<libc::sockaddr_in>();
                        out.insert(std::net::IpAddr::from(v4.sin_addr.s_addr.to_ne_bytes()));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*addr.cast::<libc::sockaddr_in6>();
                        out.insert(std::net::IpAddr::from(v6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            at = (*at).ifa_next;
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// Makes sure `dir` is on a bpffs, mounting one at /sys/fs/bpf when nothing is mounted there,
/// and creates `dir`.
pub fn ensure_bpffs_dir(dir: &Path) -> io::Result<()> {
    let mounts = mount_points("bpf")?;
    if !mounts.iter().any(|m| dir.starts_with(m)) {
        if !dir.starts_with(BPFFS_ROOT) {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} is not on a bpf filesystem", dir.display())));
        }
        mount_bpffs(Path::new(BPFFS_ROOT))?;
    }
    fs::create_dir_all(dir)
}

fn mount_bpffs(at: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt as _;
    fs::create_dir_all(at)?;
    let target = CString::new(at.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// (major, minor, patch) of the running kernel.
pub fn kernel_version() -> io::Result<(u32, u32, u32)> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Ok((next(), next(), next()))
}

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_BPF: u32 = 39;

/// Whether this process has capability `cap` in its effective set.
pub fn has_capability(cap: u32) -> io::Result<bool> {
    let status = fs::read_to_string("/proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff in /proc/self/status"))?;
    Ok(eff & (1 << cap) != 0)
}

/// Gives free heap pages back to the system (glibc keeps them otherwise): after reading a big
/// configuration, or a big kernel sync, megabytes of parsed and planned data were freed.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The other end of a TCP connection on this host: its user and its socket's inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpPeer {
    pub uid: u32,
    pub inode: u64,
}

/// The other end of a local TCP connection: the socket whose local address is `peer` and
/// remote address `local`, found in /proc/net/tcp{,6} (what SO_PEERCRED gives for Unix
/// sockets). None when it is not a local socket (or is gone).
pub fn tcp_peer(local: SocketAddr, peer: SocketAddr) -> Option<TcpPeer> {
    let table = if peer.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    let text = fs::read_to_string(table).ok()?;
    let (want_local, want_remote) = (proc_net_addr(peer), proc_net_addr(local));
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
        if fields.len() <= 9 || !fields[1].eq_ignore_ascii_case(&want_local) || !fields[2].eq_ignore_ascii_case(&want_remote) {
            return None;
        }
        Some(TcpPeer { uid: fields[7].parse().ok()?, inode: fields[9].parse().ok()? })
    })
}

/// Whether the processes holding socket `inode` all run in this process's mount namespace
/// (its container; on a host, the host's). False when no visible process holds it. Scans
/// /proc/*/fd: for rare administrative calls only.
pub fn socket_held_in_own_mount_namespace(inode: u64) -> bool {
    let Ok(own) = fs::read_link("/proc/self/ns/mnt") else { return false };
    let wanted = PathBuf::from(format!("socket:[{inode}]"));
    let Ok(processes) = fs::read_dir("/proc") else { return false };
    let mut holders = 0;
    for process in processes.flatten() {
        let path = process.path();
        if !process.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let Ok(fds) = fs::read_dir(path.join("fd")) else { continue };
        if fds.flatten().any(|fd| fs::read_link(fd.path()).is_ok_and(|target| target == wanted)) {
            if fs::read_link(path.join("ns/mnt")).ok().as_ref() != Some(&own) {
                return false;
            }
            holders += 1;
        }
    }
    holders > 0
}

/// An address as /proc/net/tcp prints it: the address's 32-bit words in host order, in hex,
/// then the port.
fn proc_net_addr(addr: SocketAddr) -> String {
    let words: Vec<u32> = match addr.ip() {
        std::net::IpAddr::V4(v4) => vec![u32::from_ne_bytes(v4.octets())],
        std::net::IpAddr::V6(v6) => v6.octets().chunks(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect(),
    };
    let hex: String = words.iter().map(|w| format!("{w:08X}")).collect();
    format!("{hex}:{:04X}", addr.port())
}

/// This process's effective user.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Clock ticks per second, the unit of /proc's CPU times (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cgroups_are_found_for_both_kubelet_drivers() {
        let root = tempfile::tempdir().unwrap();
        let uid = "0c1d2e3f-aaaa-bbbb-cccc-123456789abc";
        for (layout, dir) in [
            ("systemd burstable", format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice", uid.replace('-', "_"))),
            ("systemd guaranteed", format!("kubepods.slice/kubepods-pod{}.slice", uid.replace('-', "_"))),
            ("cgroupfs besteffort", format!("kubepods/besteffort/pod{uid}")),
            ("cgroupfs guaranteed", format!("kubepods/pod{uid}")),
            (
                "kind",
                format!(
                    "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice",
                    uid.replace('-', "_")
                ),
            ),
        ] {
            let base = root.path().join(layout.replace(' ', "-"));
            // A container's cgroup inside, and another pod beside: neither is the answer.
            fs::create_dir_all(base.join(&dir).join("cri-containerd-1234.scope")).unwrap();
            fs::create_dir_all(base.join(dir.replace(&uid.replace('-', "_"), "other").replace(uid, "other"))).unwrap();
            fs::create_dir_all(base.join("system.slice/kubepods-burstable-podnot-this.slice")).unwrap();
            let found = find_pod_cgroup(&base, uid).unwrap_or_else(|| panic!("{layout}: not found"));
            assert_eq!(found.path, base.join(&dir), "{layout}");
            assert_eq!(found.id, std::os::unix::fs::MetadataExt::ino(&fs::metadata(base.join(&dir)).unwrap()));
            assert_eq!(find_pod_cgroup(&base, "ffffffff-0000-0000-0000-000000000000"), None, "{layout}");
        }
        assert_eq!(find_pod_cgroup(root.path(), ""), None);
    }

    #[test]
    fn finds_cgroup2_and_bpf_mounts() {
        let info = "24 30 0:22 / /sys rw - sysfs sysfs rw\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                    50 24 0:40 / /sys/fs/bpf rw - bpf bpf rw,mode=700\n\
                    51 24 0:41 / /mnt/with\\040space rw - bpf bpf rw\n";
        assert_eq!(parse_mount_points(info, "cgroup2"), vec![PathBuf::from("/sys/fs/cgroup/unified")]);
        assert_eq!(parse_mount_points(info, "bpf"), vec![PathBuf::from("/sys/fs/bpf"), PathBuf::from("/mnt/with space")]);
        assert!(parse_mount_points(info, "cgroup").is_empty());
    }

    #[test]
    fn the_peer_of_a_loopback_connection_is_this_user() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let found = tcp_peer(server.local_addr().unwrap(), peer).expect("the client's socket");
        assert_eq!(found.uid, effective_uid());
        assert!(socket_held_in_own_mount_namespace(found.inode), "this process holds it");
        // A peer that is no socket of this host's.
        assert_eq!(tcp_peer(server.local_addr().unwrap(), "127.0.0.1:1".parse().unwrap()), None);
        drop(client);
        // Closed: no process holds the socket any more (its inode may linger in the table).
        assert!(!socket_held_in_own_mount_namespace(found.inode));
    }
}
