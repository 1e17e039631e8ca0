//! Who is on each end of a connection, for metric labels: Services by the id the kernel
//! recorded (from the kernel sync), workloads by IP address (from the store's snapshot: this
//! node's pods, with their service account, and the EndpointSlices' `targetRef`s).
#![forbid(unsafe_code)]
use std::{net::IpAddr, sync::Arc};

use mesh_common::{ConnValue, direction};

use super::metrics::TcpLabels;
use crate::ebpf::image::ip_of;
pub use crate::state::ObjectKey as Named;
use crate::state::model::Workload;

const UNKNOWN: &str = "unknown";

/// A label value: the name, or "unknown".
pub fn name_or_unknown(n: Option<&Named>) -> String {
    n.map_or_else(|| UNKNOWN.to_owned(), |n| n.name.clone())
}

/// A label value: the namespace, or "unknown".
pub fn namespace_or_unknown(n: Option<&Named>) -> String {
    n.map_or_else(|| UNKNOWN.to_owned(), |n| n.namespace.clone())
}

/// Istio's `destination_service`: `name.namespace.svc.cluster.local`, or "unknown".
pub fn service_fqdn(n: Option<&Named>) -> String {
    n.map_or_else(|| UNKNOWN.to_owned(), |s| format!("{}.{}.svc.cluster.local", s.name, s.namespace))
}

/// The maps are shared with their producers (persistent maps: O(1) to hand over).
#[derive(Debug, Default, Clone)]
pub struct Identities {
    /// service id → the Service.
    pub services: imbl::HashMap<u32, Named>,
    /// endpoint IP → its workload.
    pub workloads: imbl::HashMap<IpAddr, Named>,
    /// pod IP → the pod, for pods on this node.
    pub pods: imbl::HashMap<IpAddr, Arc<Workload>>,
    /// The agent's number for a pod (`mesh_workloads`), which the kernel records on the
    /// connections it dials → the pod.
    pub by_kernel_id: imbl::HashMap<u32, Arc<Workload>>,
    /// Of the principals (`spiffe://<trust domain>/...`).
    pub trust_domain: String,
}

/// Who is at an address: a workload (namespace, name), and its principal when it is a pod of
/// this node.
pub struct Who {
    pub workload: Option<Named>,
    pub principal: Option<String>,
}

impl Who {
    pub fn principal_or_unknown(&self) -> String {
        self.principal.clone().unwrap_or_else(|| UNKNOWN.to_owned())
    }
}

impl Identities {
    /// This node's pods first (they know their service account), then Services' endpoints.
    pub fn who(&self, ip: IpAddr) -> Who {
        match self.pods.get(&ip) {
            Some(pod) => self.who_pod(pod),
            None => Who { workload: self.workloads.get(&ip).cloned(), principal: None },
        }
    }

    fn who_pod(&self, pod: &Workload) -> Who {
        Who {
            workload: Some(Named { namespace: pod.spec.key.namespace.clone(), name: pod.spec.workload.clone() }),
            principal: Some(pod.principal(&self.trust_domain)),
        }
    }

    /// The labels of a connection, with bounded values: names from configuration or
    /// "unknown", never addresses or ports.
    pub fn labels(&self, c: &ConnValue) -> TcpLabels {
        let outbound = c.direction == direction::OUTBOUND;
        let (client, server) = if outbound { (ip_of(&c.local), ip_of(&c.remote)) } else { (ip_of(&c.remote), ip_of(&c.local)) };
        // The kernel knows the dialling pod by its cgroup, which holds for host-network pods too.
        let dialler = self.by_kernel_id.get(&c.workload).filter(|_| outbound && c.workload != 0);
        let source = match dialler {
            Some(pod) => self.who_pod(pod),
            None => self.who(client),
        };
        let destination = self.who(server);
        let service = self.services.get(&c.service_id).filter(|_| c.service_id != 0);
        let (name, namespace) = (name_or_unknown, namespace_or_unknown);
        TcpLabels {
            reporter: if outbound { "source" } else { "destination" }.to_owned(),
            source_workload: name(source.workload.as_ref()),
            source_workload_namespace: namespace(source.workload.as_ref()),
            source_principal: source.principal_or_unknown(),
            destination_service: service_fqdn(service),
            destination_service_name: name(service),
            destination_service_namespace: namespace(service),
            destination_workload: name(destination.workload.as_ref()),
            destination_workload_namespace: namespace(destination.workload.as_ref()),
            destination_principal: destination.principal_or_unknown(),
            connection_security_policy: if outbound { "unknown" } else { "none" }.to_owned(),
        }
    }

    /// The labels of a connection carried by an HBONE tunnel, as `reporter` (`source` or
    /// `destination`) sees it: both principals proven by TLS.
    pub fn tunnel_labels(&self, reporter: &str, ends: TunnelEnds<'_>) -> TcpLabels {
        let workload =
            |pod: Option<&Workload>| pod.map(|p| Named { namespace: p.spec.key.namespace.clone(), name: p.spec.workload.clone() });
        let (source, destination) = (workload(ends.source), workload(ends.destination));
        let service = self.services.get(&ends.service_id).filter(|_| ends.service_id != 0);
        let (name, namespace) = (name_or_unknown, namespace_or_unknown);
        TcpLabels {
            reporter: reporter.to_owned(),
            source_workload: name(source.as_ref()),
            source_workload_namespace: namespace(source.as_ref()),
            source_principal: ends.source_principal.to_owned(),
            destination_service: service_fqdn(service),
            destination_service_name: name(service),
            destination_service_namespace: namespace(service),
            destination_workload: name(destination.as_ref()),
            destination_workload_namespace: namespace(destination.as_ref()),
            destination_principal: ends.destination_principal.to_owned(),
            connection_security_policy: "mutual_tls".to_owned(),
        }
    }
}

/// Who is at either end of a tunnel: the pods where known, the principals always.
pub struct TunnelEnds<'a> {
    pub source: Option<&'a Workload>,
    pub source_principal: &'a str,
    pub destination: Option<&'a Workload>,
    pub destination_principal: &'a str,
    /// The Service the source dialled (its kernel id), 0 if none or unknown.
    pub service_id: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_drop_controller_suffixes() {
        use crate::state::model::workload_of_pod;
        assert_eq!(workload_of_pod("web-7d4f8b9c6-x2x9k"), "web");
        assert_eq!(workload_of_pod("my-api-5c9d7b8f4d-abcde"), "my-api");
        assert_eq!(workload_of_pod("db-0"), "db");
        assert_eq!(workload_of_pod("standalone"), "standalone");
    }

    #[test]
    fn labels_come_from_configuration_or_are_unknown() {
        let mut ids = Identities::default();
        ids.services.insert(7, Named { name: "web".into(), namespace: "shop".into() });
        ids.workloads.insert("10.0.0.2".parse().unwrap(), Named { name: "web".into(), namespace: "shop".into() });
        let conn = ConnValue {
            direction: direction::OUTBOUND,
            local: crate::ebpf::image::addr_of("10.0.0.1".parse().unwrap()),
            remote: crate::ebpf::image::addr_of("10.0.0.2".parse().unwrap()),
            service_id: 7,
            ..Default::default()
        };
        let l = ids.labels(&conn);
        assert_eq!(l.reporter, "source");
        assert_eq!(l.destination_service, "web.shop.svc.cluster.local");
        assert_eq!(l.destination_workload, "web");
        assert_eq!(l.source_workload, "unknown");
        let unbalanced = ids.labels(&ConnValue { service_id: 0, ..conn });
        assert_eq!(unbalanced.destination_service, "unknown");
        assert_eq!(l.source_principal, "unknown");

        // A pod of this node at the client's address: its workload and principal.
        let spec = crate::state::model::PodSpec {
            key: Named { namespace: "shop".into(), name: "cart-5c9d7b8f4d-abcde".into() },
            uid: "u".into(),
            workload: "cart".into(),
            service_account: "cart-sa".into(),
            labels: Default::default(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            host_network: false,
            qos: None,
            enrollment: crate::state::model::Enrollment::Inherit,
            local: true,
            host_ip: None,
            cgroup: None,
        };
        ids.trust_domain = "example.org".into();
        ids.pods.insert("10.0.0.1".parse().unwrap(), Arc::new(Workload { spec: Arc::new(spec), enrolled: false }));
        let l = ids.labels(&conn);
        assert_eq!((l.source_workload.as_str(), l.source_workload_namespace.as_str()), ("cart", "shop"));
        assert_eq!(l.source_principal, "spiffe://example.org/ns/shop/sa/cart-sa");
        assert_eq!(l.destination_principal, "unknown", "an endpoint of another node: no service account known");
    }
}
