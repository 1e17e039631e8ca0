//! Who a workload is, and the certificates that prove it.
//!
//! An identity is Istio's and ztunnel's SPIFFE form, `spiffe://<trust domain>/ns/<namespace>/sa/
//! <service account>`, so policies and dashboards carry over. The agent holds a certificate
//! for each enrolled workload of its node (`certs`): a P-256 key made on the node, which never
//! leaves it, and a short-lived certificate with the identity as its one URI SAN, signed by a
//! `Signer` (`ca`: the files of `mesh ca init`, standalone) and renewed at half-life.
#![forbid(unsafe_code)]
pub mod ca;
pub mod certs;

use std::fmt;

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE workload identity: expected spiffe://<trust domain>/ns/<namespace>/sa/<service account>")]
    NotSpiffe(String),
    #[error("{0:?} is not a valid trust domain: lowercase letters, digits, '.', '-' and '_' only")]
    TrustDomain(String),
    #[error("{what} {value:?} is not a Kubernetes name: lowercase letters, digits, '-' and '.', at most 253")]
    Name { what: &'static str, value: String },
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, IdentityError> {
        check_trust_domain(trust_domain)?;
        check_name("namespace", namespace)?;
        check_name("service account", service_account)?;
        Ok(Self { trust_domain: trust_domain.to_owned(), namespace: namespace.to_owned(), service_account: service_account.to_owned() })
    }

    /// Parses the URI form (a certificate's URI SAN).
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let not = || IdentityError::NotSpiffe(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(not)?;
        let (trust_domain, path) = rest.split_once('/').ok_or_else(not)?;
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["ns", namespace, "sa", service_account] => Self::new(trust_domain, namespace, service_account),
            _ => Err(not()),
        }
    }

    /// The TLS server name a client asks for to reach this identity's certificate at a peer
    /// agent (which holds one per workload of its node). Namespaces have no dots, so the last
    /// label before the suffix is the namespace and the rest the service account.
    pub fn server_name(&self) -> String {
        format!("{}.{}.{SERVER_NAME_SUFFIX}", self.service_account, self.namespace)
    }

    /// The identity a `server_name` asks for, in `trust_domain`.
    pub fn from_server_name(name: &str, trust_domain: &str) -> Option<Self> {
        let rest = name.strip_suffix(SERVER_NAME_SUFFIX)?.strip_suffix('.')?;
        let (service_account, namespace) = rest.rsplit_once('.')?;
        Self::new(trust_domain, namespace, service_account).ok()
    }
}

/// The DNS suffix of `Identity::server_name`.
const SERVER_NAME_SUFFIX: &str = "sa.mesh.internal";

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

pub fn check_trust_domain(domain: &str) -> Result<(), IdentityError> {
    let ok = !domain.is_empty()
        && domain.len() <= 255
        && domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'));
    if ok { Ok(()) } else { Err(IdentityError::TrustDomain(domain.to_owned())) }
}

fn check_name(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
        // A namespace is a DNS label: no dots (server names rely on it).
        && (what != "namespace" || !value.contains('.'));
    if ok { Ok(()) } else { Err(IdentityError::Name { what, value: value.to_owned() }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_reads_back_from_its_uri_and_its_server_name() {
        let id = Identity::new("cluster.local", "shop", "web.front").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web.front");
        assert_eq!(Identity::parse(&id.to_string()).unwrap(), id);
        assert_eq!(Identity::from_server_name(&id.server_name(), "cluster.local").unwrap(), id);
        assert_eq!(Identity::from_server_name("web.shop.example.com", "cluster.local"), None);
    }

    #[test]
    fn malformed_identities_are_refused_with_the_reason() {
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "https://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://cluster.local/ns//sa/web",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Identity::parse("spiffe://Cluster/ns/a/sa/b"), Err(IdentityError::TrustDomain("Cluster".into())));
        assert!(matches!(Identity::new("td", "a.b", "sa"), Err(IdentityError::Name { what: "namespace", .. })));
    }
}
