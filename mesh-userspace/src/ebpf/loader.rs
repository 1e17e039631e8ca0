//! Loads the kernel programs, attaches them to a cgroup and pins programs' links and maps under
//! the pin directory, so the datapath outlives the agent.
//!
//! Restart: maps are pinned by name, so a new agent's programs reuse them; links are pinned as
//! `link_<program>`, and a new agent swaps its freshly loaded program into the existing link
//! (BPF_LINK_UPDATE, atomic), so no connect() ever runs without a program attached.
//! Upgrade: when the pinned `mesh_meta` holds another layout version, the old service maps cannot
//! be read by the new programs; they are unpinned and rebuilt from configuration.
use std::{
    fs,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, SockHash},
    programs::{
        CgroupAttachMode, Program, SkMsg,
        links::{FdLink, LinkError},
    },
};
use mesh_common::{LAYOUT_VERSION, ProxyAddr, SockKey, map_names, program_names, sizes};

use super::PROGRAMS;
use crate::host;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("pin directory {0}: {1}")]
    PinDir(PathBuf, #[source] std::io::Error),
    #[error("cgroup {0}: {1}")]
    Cgroup(PathBuf, #[source] std::io::Error),
    #[error("loading the kernel programs: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program {0}: {1}")]
    Program(&'static str, #[source] aya::programs::ProgramError),
    #[error("program {0}: pinning its link at {1}: {2}")]
    PinLink(&'static str, PathBuf, String),
    #[error("map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("kernel program logging: {0}")]
    Log(#[source] aya_log::Error),
    #[error("pin directory {0} is in use by another mesh agent; stop it first, or give this one another --bpffs")]
    InUse(PathBuf),
}

/// An exclusive lock on the pin directory, held for the agent's life: two agents on one pin
/// directory would adopt, rewrite and remove each other's state.
#[derive(Debug)]
pub struct PinDirLock(#[expect(dead_code, reason = "held for its lock, never read")] OwnedFd);

impl PinDirLock {
    /// Takes the lock at once or fails: a second agent must not wait for the first.
    pub fn take(dir: &Path) -> Result<Self, LoadError> {
        let file = fs::File::open(dir).map_err(|e| LoadError::PinDir(dir.to_owned(), e))?;
        let fd = OwnedFd::from(file);
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                LoadError::InUse(dir.to_owned())
            } else {
                LoadError::PinDir(dir.to_owned(), e)
            });
        }
        Ok(Self(fd))
    }
}

/// Log level of the kernel programs (aya-log): 0 (off) to 5 (trace), aya-log's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BpfLogLevel {
    #[default]
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

/// How the programs are loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramOptions {
    pub log_level: BpfLogLevel,
    /// Same-node redirection (sockhash + sk_msg).
    pub redirection: bool,
    /// Slots of `mesh_conns` in use, a power of two up to `sizes::CONN_SLOTS`: fewer only for
    /// tests that need connections to spill into `mesh_conns_ovfl`.
    pub conn_slots: u32,
}

/// How the datapath came up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Nothing was pinned: programs attached fresh, maps empty.
    Fresh,
    /// Pinned links and maps found: new programs swapped in, maps kept as they were.
    Adopted,
    /// Pinned maps had another layout: rebuilt empty, programs swapped in.
    Upgraded,
}

/// The loaded programs. Dropping it does not detach anything: the pins keep the datapath up.
/// `teardown` takes it down.
pub struct Loaded {
    _ebpf: Ebpf,
    pub start: Start,
    /// Reads the programs' log records when `--bpf-log` is on.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Same-node redirection (sockhash + sk_msg) is attached.
    pub redirecting: bool,
    lock: Option<PinDirLock>,
}

impl Loaded {
    /// The pin directory's lock, to hold until the pins are removed (or left, with
    /// --keep-datapath).
    pub fn take_lock(&mut self) -> Option<PinDirLock> {
        self.lock.take()
    }
}

pub(crate) fn link_pin(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("link_{program}"))
}

/// Where an on-demand program itself is pinned (to be attached later).
pub(crate) fn program_pin(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("prog_{program}"))
}

/// Attaches and detaches the on-demand ingress filter (`program_names::INGRESS`) from its
/// pinned program: attached while some pod of the node is STRICT or under policy.
pub struct IngressSwitch {
    pin_dir: PathBuf,
    cgroup: PathBuf,
}

impl IngressSwitch {
    pub fn new(pin_dir: &Path, cgroup: &Path) -> Self {
        Self { pin_dir: pin_dir.to_owned(), cgroup: cgroup.to_owned() }
    }

    pub fn is_on(&self) -> bool {
        link_pin(&self.pin_dir, program_names::INGRESS).exists()
    }

    /// Attaches (`on`) or detaches the filter; whether anything changed.
    pub fn set(&self, on: bool) -> Result<bool, LoadError> {
        let name = program_names::INGRESS;
        let pin = link_pin(&self.pin_dir, name);
        if on == self.is_on() {
            return Ok(false);
        }
        if !on {
            fs::remove_file(&pin).map_err(|e| LoadError::PinLink(name, pin.clone(), e.to_string()))?;
            return Ok(true);
        }
        let program_at = program_pin(&self.pin_dir, name);
        let mut program = aya::programs::CgroupSkb::from_pin(&program_at, aya::programs::CgroupSkbAttachType::Ingress)
            .map_err(|e| LoadError::Program(name, e))?;
        let cgroup = fs::File::open(&self.cgroup).map_err(|e| LoadError::Cgroup(self.cgroup.clone(), e))?;
        let id = program
            .attach(&cgroup, aya::programs::CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
            .map_err(|e| LoadError::Program(name, e))?;
        let link: FdLink = program
            .take_link(id)
            .map_err(|e| LoadError::Program(name, e))?
            .try_into()
            .map_err(|e: LinkError| LoadError::PinLink(name, pin.clone(), e.to_string()))?;
        link.pin(&pin).map_err(|e| LoadError::PinLink(name, pin.clone(), e.to_string()))?;
        Ok(true)
    }
}

/// Nothing is half-applied: every program passes the verifier before any is attached, and a
/// start that found nothing pinned removes what it pinned when it fails.
pub fn load_and_attach(pin_dir: &Path, cgroup: &Path, options: ProgramOptions) -> Result<Loaded, LoadError> {
    host::ensure_bpffs_dir(pin_dir).map_err(|e| LoadError::PinDir(pin_dir.to_owned(), e))?;
    let lock = PinDirLock::take(pin_dir)?;
    let found_pins = fs::read_dir(pin_dir).map_err(|e| LoadError::PinDir(pin_dir.to_owned(), e))?.next().is_some();
    let result = bring_up(pin_dir, cgroup, options);
    if result.is_err() && !found_pins {
        // Nothing was pinned before and the lock keeps others out: all of it is ours.
        let _ = teardown(pin_dir);
    }
    result.map(|loaded| Loaded { lock: Some(lock), ..loaded })
}

fn bring_up(pin_dir: &Path, cgroup: &Path, options: ProgramOptions) -> Result<Loaded, LoadError> {
    let ProgramOptions { log_level, redirection, conn_slots } = options;
    assert!(conn_slots.is_power_of_two() && conn_slots <= sizes::CONN_SLOTS, "checked by the CLI");
    let cgroup_dir = fs::File::open(cgroup).map_err(|e| LoadError::Cgroup(cgroup.to_owned(), e))?;
    let cgroup_id = cgroup_dir.metadata().map_err(|e| LoadError::Cgroup(cgroup.to_owned(), e))?.ino();
    forget_links_of_other_cgroups(pin_dir, cgroup_id);

    let had_links = program_names::ALL.iter().any(|p| link_pin(pin_dir, p).exists());
    let upgraded = match pinned_layout(pin_dir) {
        Some(v) if v != LAYOUT_VERSION => {
            tracing::warn!(pinned = v, ours = LAYOUT_VERSION, "pinned maps have another layout; rebuilding them");
            for name in map_names::ALL {
                let _ = fs::remove_file(pin_dir.join(name));
            }
            true
        }
        _ => false,
    };

    // Load-time constants: the verifier drops disabled log statements and folds the mask.
    let level = log_level as u8;
    let slot_mask = conn_slots - 1;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .override_global(aya_log::LEVEL, &level, true)
        .override_global("CONN_SLOT_MASK", &slot_mask, true)
        .load(PROGRAMS)
        .map_err(LoadError::Load)?;
    let logger = match log_level {
        BpfLogLevel::Off => None,
        _ => Some(aya_log::EbpfLogger::init(&mut ebpf).map_err(LoadError::Log)?),
    };
    {
        let meta = ebpf.map_mut(map_names::META).expect("mesh_meta is declared by the programs");
        let mut meta: Array<&mut MapData, u32> = Array::try_from(meta).map_err(|e| LoadError::Map(map_names::META, e))?;
        meta.set(0, &LAYOUT_VERSION, 0).map_err(|e| LoadError::Map(map_names::META, e))?;
    }

    for name in program_names::ALL.iter().chain(program_names::ON_DEMAND.iter()) {
        load_program(&mut ebpf, name)?;
    }
    for name in program_names::ALL {
        attach_or_adopt(&mut ebpf, name, pin_dir, &cgroup_dir)?;
    }
    // On-demand programs: pinned, for `IngressSwitch` to attach when needed; one attached
    // by an earlier agent runs the new program from now on.
    for name in program_names::ON_DEMAND {
        let pin = program_pin(pin_dir, name);
        let program = ebpf.program_mut(name).expect("every program in program_names is in the object");
        let _ = fs::remove_file(&pin);
        program.pin(&pin).map_err(|e| LoadError::PinLink(name, pin.clone(), e.to_string()))?;
        if let Some(link) = open_pinned(&link_pin(pin_dir, name)) {
            let fd = program.fd().map_err(|e| LoadError::Program(name, e))?;
            update_link(&link, fd.as_fd()).map_err(|e| LoadError::PinLink(name, link_pin(pin_dir, name), e.to_string()))?;
        }
    }
    let redirecting = if redirection {
        match attach_redirection(&mut ebpf, pin_dir, &cgroup_dir) {
            Ok(()) => true,
            Err(e) => {
                // Older kernels lack bpf_get_netns_cookie in sock_ops/sk_msg (5.15+): run
                // without redirection rather than not at all.
                tracing::warn!("same-node redirection unavailable on this kernel (needs 5.15+), continuing without it: {e}");
                detach_redirection(pin_dir);
                false
            }
        }
    } else {
        detach_redirection(pin_dir);
        false
    };

    let start = match (had_links, upgraded) {
        (_, true) => Start::Upgraded,
        (true, false) => Start::Adopted,
        (false, false) => Start::Fresh,
    };
    Ok(Loaded { _ebpf: ebpf, start, logger, redirecting, lock: None })
}

/// Loads cgroup program `name` into the kernel (the verifier's turn), attaching nothing.
pub(crate) fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), LoadError> {
    match ebpf.program_mut(name).expect("every program in program_names is in the object") {
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        other => unreachable!("{name} is a {:?}, not a cgroup program", other.prog_type()),
    }
    .map_err(|e| LoadError::Program(name, e))
}

/// Makes the pinned cgroup link of loaded program `name` run it: a link pinned by an earlier
/// agent gets the new program swapped in atomically (BPF_LINK_UPDATE); otherwise the program is
/// attached and its link pinned.
pub(crate) fn attach_or_adopt(ebpf: &mut Ebpf, name: &'static str, pin_dir: &Path, cgroup: &fs::File) -> Result<(), LoadError> {
    let pin = link_pin(pin_dir, name);
    let program = ebpf.program_mut(name).expect("every program in program_names is in the object");
    let pin_error = |e: String| LoadError::PinLink(name, pin.clone(), e);
    // Single: a cgroup bpf_link always coexists with other programs, and the kernel rejects
    // any attach flag on link creation (EINVAL).
    // aya's program types share these methods without a common trait: one body for each.
    macro_rules! link {
        ($p:expr $(, $attach_type:expr)?) => {{
            let p = $p;
            if let Some(link) = open_pinned(&pin) {
                let fd = p.fd().map_err(|e| LoadError::Program(name, e))?;
                update_link(&link, fd.as_fd()).map_err(|e| pin_error(e.to_string()))?;
                None
            } else {
                let id = p.attach(cgroup, $($attach_type,)? CgroupAttachMode::Single).map_err(|e| LoadError::Program(name, e))?;
                let link = p.take_link(id).map_err(|e| LoadError::Program(name, e))?;
                Some(link.try_into().map_err(|e: LinkError| pin_error(e.to_string()))?)
            }
        }};
    }
    let fd_link: Option<FdLink> = match program {
        Program::CgroupSockAddr(p) => link!(p),
        Program::CgroupSock(p) => link!(p),
        Program::SockOps(p) => link!(p),
        Program::CgroupSkb(p) => link!(p, aya::programs::CgroupSkbAttachType::Ingress),
        other => unreachable!("{name} is a {:?}, not a cgroup program", other.prog_type()),
    };
    if let Some(fd_link) = fd_link {
        fd_link.pin(&pin).map_err(|e| pin_error(e.to_string()))?;
    }
    Ok(())
}

/// Same-node redirection: the sk_msg program on the sockhash, then the sock_ops program that
/// fills it. An sk_msg attachment is a link (pinned like the others) from 6.10 on; before, it
/// belongs to the pinned map and a new attach replaces it.
pub(crate) fn attach_redirection(ebpf: &mut Ebpf, pin_dir: &Path, cgroup: &fs::File) -> Result<(), LoadError> {
    let name = program_names::REDIRECT;
    let sockhash = ebpf.map(map_names::SOCKHASH).expect("mesh_sockhash is declared by the programs");
    let sockhash: SockHash<&MapData, SockKey> = SockHash::try_from(sockhash).map_err(|e| LoadError::Map(map_names::SOCKHASH, e))?;
    let map_fd = sockhash.fd().try_clone().map_err(|e| LoadError::Map(map_names::SOCKHASH, e.into()))?;
    let program: &mut SkMsg =
        ebpf.program_mut(name).expect("mesh_redirect is in the object").try_into().map_err(|e| LoadError::Program(name, e))?;
    program.load().map_err(|e| LoadError::Program(name, e))?;
    let pin = link_pin(pin_dir, name);
    if let Some(link) = open_pinned(&pin) {
        update_link(&link, program.fd().map_err(|e| LoadError::Program(name, e))?.as_fd())
            .map_err(|e| LoadError::PinLink(name, pin.clone(), e.to_string()))?;
    } else {
        let id = program.attach(&map_fd).map_err(|e| LoadError::Program(name, e))?;
        let link = program.take_link(id).map_err(|e| LoadError::Program(name, e))?;
        if crate::host::kernel_version().is_ok_and(|v| v >= (6, 10, 0)) {
            let fd_link = FdLink::try_from(link).map_err(|e| LoadError::PinLink(name, pin.clone(), e.to_string()))?;
            fd_link.pin(&pin).map_err(|e| LoadError::PinLink(name, pin.clone(), e.to_string()))?;
        } else {
            // A pre-6.10 attachment lives with the pinned map; dropping its handle would
            // detach it.
            std::mem::forget(link);
        }
    }
    load_program(ebpf, program_names::SOCKMAP)?;
    attach_or_adopt(ebpf, program_names::SOCKMAP, pin_dir, cgroup)
}

/// Takes redirection down: unpinning the sock_ops link stops new sockets from entering the
/// sockhash; established pairs keep going as they were.
fn detach_redirection(pin_dir: &Path) {
    for name in program_names::REDIRECTION {
        let _ = fs::remove_file(link_pin(pin_dir, name));
    }
}

/// Tells the kernel where L7 Services' connections go (`mesh_proxy`).
pub fn set_proxy(pin_dir: &Path, addr: std::net::SocketAddr) -> Result<(), LoadError> {
    let map = MapData::from_pin(pin_dir.join(map_names::PROXY)).map_err(|e| LoadError::Map(map_names::PROXY, e))?;
    let map = aya::maps::Map::from_map_data(map).map_err(|e| LoadError::Map(map_names::PROXY, e))?;
    let mut proxy: Array<MapData, ProxyAddr> = Array::try_from(map).map_err(|e| LoadError::Map(map_names::PROXY, e))?;
    let value = ProxyAddr { addr: super::image::addr_of(addr.ip()), port_be: addr.port().to_be(), _pad16: 0, _pad32: 0 };
    proxy.set(0, &value, 0).map_err(|e| LoadError::Map(map_names::PROXY, e))
}

/// Tells the kernel where tunneled connections go (`mesh_tunnel`); None: nowhere (the
/// kernel then refuses connections to pods it still lists as tunneled).
pub fn set_tunnel(pin_dir: &Path, addr: Option<std::net::SocketAddr>) -> Result<(), LoadError> {
    let map = MapData::from_pin(pin_dir.join(map_names::TUNNEL)).map_err(|e| LoadError::Map(map_names::TUNNEL, e))?;
    let map = aya::maps::Map::from_map_data(map).map_err(|e| LoadError::Map(map_names::TUNNEL, e))?;
    let mut tunnel: Array<MapData, ProxyAddr> = Array::try_from(map).map_err(|e| LoadError::Map(map_names::TUNNEL, e))?;
    let value = addr.map_or_else(ProxyAddr::default, |a| ProxyAddr {
        addr: super::image::addr_of(a.ip()),
        port_be: a.port().to_be(),
        _pad16: 0,
        _pad32: 0,
    });
    tunnel.set(0, &value, 0).map_err(|e| LoadError::Map(map_names::TUNNEL, e))
}

/// BPF_OBJ_GET: a descriptor for a pinned object, if the pin exists.
fn open_pinned(pin: &Path) -> Option<OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).ok()?;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = ObjGet { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: attr outlives the call and has the layout of union bpf_attr for BPF_OBJ_GET.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &attr, std::mem::size_of::<ObjGet>()) };
    // SAFETY: on success a new descriptor that we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_UPDATE: make `link` run `program` instead, atomically (5.7+).
fn update_link(link: &OwnedFd, program: BorrowedFd<'_>) -> std::io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdate { link_fd: link.as_raw_fd() as u32, new_prog_fd: program.as_raw_fd() as u32, flags: 0, old_prog_fd: 0 };
    // SAFETY: attr outlives the call and has the layout of union bpf_attr for BPF_LINK_UPDATE.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, &attr, std::mem::size_of::<LinkUpdate>()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// A pinned link attached to another cgroup (the agent was restarted with another --cgroup) is
/// unpinned, which detaches it, so that the programs are attached where they were asked to be.
fn forget_links_of_other_cgroups(pin_dir: &Path, cgroup_id: u64) {
    for name in program_names::ALL.iter().chain(program_names::ON_DEMAND.iter()) {
        let pin = link_pin(pin_dir, name);
        if let Some(pinned_on) = pinned_link_cgroup_id(&pin)
            && pinned_on != cgroup_id
        {
            tracing::warn!(program = name, pinned_on, cgroup_id, "pinned link is attached to another cgroup; moving it");
            let _ = fs::remove_file(&pin);
        }
    }
}

/// The cgroup id a pinned cgroup link is attached to, from the link's fdinfo (5.8+).
fn pinned_link_cgroup_id(pin: &Path) -> Option<u64> {
    let fd = open_pinned(pin)?;
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines().find_map(|l| l.strip_prefix("cgroup_id:")).and_then(|v| v.trim().parse().ok())
}

fn pinned_layout(pin_dir: &Path) -> Option<u32> {
    let data = MapData::from_pin(pin_dir.join(map_names::META)).ok()?;
    let map = aya::maps::Map::from_map_data(data).ok()?;
    let array: Array<MapData, u32> = Array::try_from(map).ok()?;
    array.get(&0, 0).ok()
}

/// Detaches the programs and removes every pin, leaving nothing behind. Safe to call when
/// nothing is pinned.
pub fn teardown(pin_dir: &Path) -> std::io::Result<()> {
    // Links first: once their pins are gone (and no process holds them), the programs detach.
    for name in program_names::ALL.iter().chain(program_names::REDIRECTION.iter()).chain(program_names::ON_DEMAND.iter()) {
        remove_if_exists(&link_pin(pin_dir, name))?;
    }
    for name in program_names::ON_DEMAND {
        remove_if_exists(&program_pin(pin_dir, name))?;
    }
    for name in map_names::ALL {
        remove_if_exists(&pin_dir.join(name))?;
    }
    match fs::remove_dir(pin_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
