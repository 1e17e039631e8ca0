//! The service maps as plain data: their whole content (`MapImage`), one write (`Op`), and
//! the conversions between socket addresses and the kernel's address format. The kernel sync
//! plans in these terms; `maps` carries them to and from the pinned maps.
#![forbid(unsafe_code)]
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use mesh_common::{Addr, BackendValue, FrontendKey, ServiceValue, SlotKey, service_flags};

/// The service-state maps' content, as the kernel sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapImage {
    pub frontends: BTreeMap<FrontendKey, u32>,
    pub services: BTreeMap<u32, ServiceValue>,
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<u32, BackendValue>,
    pub maglev: BTreeMap<u32, Vec<u32>>,
    pub names: BTreeMap<u32, String>,
}

/// One map write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, BackendValue),
    PutMaglev(u32, Vec<u32>),
    PutSlot(SlotKey, u32),
    PutService(u32, ServiceValue),
    PutName(u32, String),
    PutFrontend(FrontendKey, u32),
    DelFrontend(FrontendKey),
    DelService(u32),
    DelName(u32),
    DelMaglev(u32),
    DelSlot(SlotKey),
    DelBackend(u32),
}

impl MapImage {
    pub fn apply(&mut self, op: &Op) {
        match op.clone() {
            Op::PutBackend(id, v) => drop(self.backends.insert(id, v)),
            Op::PutMaglev(id, t) => drop(self.maglev.insert(id, t)),
            Op::PutSlot(k, v) => drop(self.slots.insert(k, v)),
            Op::PutService(id, v) => drop(self.services.insert(id, v)),
            Op::PutName(id, n) => drop(self.names.insert(id, n)),
            Op::PutFrontend(k, v) => drop(self.frontends.insert(k, v)),
            Op::DelFrontend(k) => drop(self.frontends.remove(&k)),
            Op::DelService(id) => drop(self.services.remove(&id)),
            Op::DelName(id) => drop(self.names.remove(&id)),
            Op::DelMaglev(id) => drop(self.maglev.remove(&id)),
            Op::DelSlot(k) => drop(self.slots.remove(&k)),
            Op::DelBackend(id) => drop(self.backends.remove(&id)),
        }
    }

    /// Rebuilds the maps with full nodes. Entries written in id order (as a sync writes them)
    /// leave B-tree nodes about half full; built from sorted entries they are full. After a
    /// large sync this gives back about a third of the image's memory.
    pub fn compact(&mut self) {
        fn rebuilt<K: Ord, V>(map: &mut BTreeMap<K, V>) {
            *map = std::mem::take(map).into_iter().collect();
        }
        rebuilt(&mut self.frontends);
        rebuilt(&mut self.services);
        rebuilt(&mut self.slots);
        rebuilt(&mut self.backends);
        rebuilt(&mut self.maglev);
        rebuilt(&mut self.names);
    }

    /// Total entries, for the occupancy check and leak assertions.
    pub fn len(&self) -> usize {
        self.frontends.len() + self.services.len() + self.slots.len() + self.backends.len() + self.maglev.len() + self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries per service map.
    pub fn entries(&self) -> Vec<(&'static str, usize)> {
        use mesh_common::map_names as n;
        vec![
            (n::FRONTENDS, self.frontends.len()),
            (n::SERVICES, self.services.len()),
            (n::SLOTS, self.slots.len()),
            (n::BACKENDS, self.backends.len()),
            (n::MAGLEV, self.maglev.len()),
            (n::NAMES, self.names.len()),
        ]
    }
}

pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_ip4_word(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            Addr(std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])))
        }
    }
}

pub fn ip_of(addr: &Addr) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in addr.0.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) if addr.is_v4_mapped() => IpAddr::V4(Ipv4Addr::from(v4.octets())),
        _ => IpAddr::V6(v6),
    }
}

pub fn frontend_key(addr: SocketAddr, proto: u8) -> FrontendKey {
    FrontendKey { addr: addr_of(addr.ip()), port_be: addr.port().to_be(), proto, _pad: 0 }
}

pub fn backend_socket_addr(b: &BackendValue) -> SocketAddr {
    SocketAddr::new(ip_of(&b.addr), u16::from_be(b.port_be))
}

/// A service as the kernel holds it, for `/config_dump` and `mesh services`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceRow {
    pub id: u32,
    pub name: String,
    pub frontend: SocketAddr,
    pub protocol: String,
    pub algorithm: &'static str,
    pub affinity_timeout_s: Option<u32>,
    /// Connections go to the agent's proxy (HTTPRoutes decide the backend).
    pub l7: bool,
    /// In slot order.
    pub backends: Vec<SocketAddr>,
}

impl MapImage {
    pub fn service_rows(&self) -> Vec<ServiceRow> {
        let mut rows: Vec<ServiceRow> = self
            .frontends
            .iter()
            .filter_map(|(key, &id)| {
                let svc = self.services.get(&id)?;
                let backends = (0..svc.backend_count)
                    .filter_map(|slot| self.slots.get(&SlotKey { service_id: id, slot }))
                    .filter_map(|bid| self.backends.get(bid))
                    .map(backend_socket_addr)
                    .collect();
                Some(ServiceRow {
                    id,
                    name: self.names.get(&id).cloned().unwrap_or_default(),
                    frontend: SocketAddr::new(ip_of(&key.addr), u16::from_be(key.port_be)),
                    protocol: crate::state::Protocol::from_ip_proto(key.proto).map_or_else(|| key.proto.to_string(), |p| p.to_string()),
                    algorithm: if svc.flags & service_flags::MAGLEV != 0 { "maglev" } else { "random" },
                    affinity_timeout_s: (svc.flags & service_flags::AFFINITY != 0).then_some(svc.affinity_timeout_s),
                    l7: svc.flags & service_flags::L7 != 0,
                    backends,
                })
            })
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name).then(a.frontend.cmp(&b.frontend)));
        rows
    }
}
