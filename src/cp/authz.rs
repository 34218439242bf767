//! Who may call which control-plane route (`docs/protocol.md` §4): the
//! peer identity a transport establishes, and the checks the routes run on
//! it. With mutual TLS every request passes [`authorize`] (by path, default
//! operator) before its handler; handlers acting for a host then call
//! [`require_host`]. Later routes call [`require_operator`] and friends.
//! Without TLS ([`PeerIdentity::Unauthenticated`]) every check passes: the
//! plaintext CP binds loopback unless `--insecure`.

// The checks return the 403 answer itself, so a handler can return it as is.
#![allow(clippy::result_large_err)]

use hyper::StatusCode;

use super::routes::{error, Resp};
use crate::ids::Hostname;
use crate::tls::{self, Role};

/// Who the transport says the peer is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PeerIdentity {
    /// Plaintext HTTP (loopback, or `--insecure` on a trusted network):
    /// nobody is authenticated and every route is open.
    #[default]
    Unauthenticated,
    /// Mutual TLS: a client certificate that chains to the client CA, and
    /// what it names, or why it names nothing usable (a refusal quotes it).
    Certificate(Result<tls::PeerIdentity, String>),
}

impl PeerIdentity {
    /// What a certificate names, for error messages: `CN web-1, DNS web-1, role host`.
    fn describe(&self) -> String {
        match self {
            PeerIdentity::Unauthenticated => "an unauthenticated connection".to_owned(),
            PeerIdentity::Certificate(Err(why)) => format!("a certificate without a usable identity ({why})"),
            PeerIdentity::Certificate(Ok(id)) => {
                let mut parts = vec![format!("CN {}", id.common_name.as_deref().unwrap_or("(none)"))];
                parts.extend(id.dns_names.iter().map(|n| format!("DNS {n}")));
                parts.push(match id.role {
                    Some(role) => format!("role {role}"),
                    None => format!("no {}ROLE URI", tls::ROLE_URI_SCHEME),
                });
                format!("the certificate of {}", parts.join(", "))
            }
        }
    }

    /// The certificate's identity if it carries `role`.
    fn with_role(&self, role: Role) -> Option<&tls::PeerIdentity> {
        match self {
            PeerIdentity::Certificate(Ok(id)) if id.role == Some(role) => Some(id),
            _ => None,
        }
    }
}

fn role_required(peer: &PeerIdentity, needs: &str) -> Resp {
    error(
        StatusCode::FORBIDDEN,
        "role_required",
        format!("this endpoint needs {needs}; this connection presented {}", peer.describe()),
    )
}

/// Operator endpoints (publish, views, a rollout's events, metrics, and
/// every later operator route): a certificate with the URI SAN
/// `nixfleet:operator`. Open on a plaintext connection.
pub fn require_operator(peer: &PeerIdentity) -> Result<(), Resp> {
    match peer {
        PeerIdentity::Unauthenticated => Ok(()),
        _ if peer.with_role(Role::Operator).is_some() => Ok(()),
        _ => Err(role_required(peer, "an operator certificate (URI SAN nixfleet:operator)")),
    }
}

/// An agent acting for `hostname`: a `nixfleet:host` certificate whose CN
/// or one of whose DNS SANs is exactly `hostname`; otherwise 403 naming
/// both names. Open on a plaintext connection.
pub fn require_host(peer: &PeerIdentity, hostname: &Hostname) -> Result<(), Resp> {
    if *peer == PeerIdentity::Unauthenticated {
        return Ok(());
    }
    let Some(id) = peer.with_role(Role::Host) else {
        return Err(role_required(peer, "a host certificate (URI SAN nixfleet:host)"));
    };
    if id.names(hostname.as_str()) {
        return Ok(());
    }
    Err(error(
        StatusCode::FORBIDDEN,
        "identity_mismatch",
        format!(
            "this connection is authenticated as {} ({}), which may not act for host {hostname}",
            id.common_name.as_deref().unwrap_or("(no CN)"),
            peer.describe()
        ),
    ))
}

/// Any agent (a `nixfleet:host` certificate) or an operator: a rollout's
/// signed manifest, which agents fetch and operators may read.
pub fn require_host_or_operator(peer: &PeerIdentity) -> Result<(), Resp> {
    match peer {
        PeerIdentity::Unauthenticated => Ok(()),
        _ if peer.with_role(Role::Host).is_some() || peer.with_role(Role::Operator).is_some() => Ok(()),
        _ => Err(role_required(peer, "a host or an operator certificate")),
    }
}

/// Which certificate a path needs, checked before anything else is read:
/// `/healthz` is open, `/v1/agent/*` needs a host certificate (the handler
/// then checks it names the host acted for), a rollout's manifest a host or
/// an operator, and every other path (the operator endpoints, and any path
/// added later) an operator: an unlisted route is never open by accident.
pub(super) fn authorize(peer: &PeerIdentity, segments: &[&str]) -> Result<(), Resp> {
    match segments {
        ["healthz"] => Ok(()),
        ["v1", "agent", ..] => match peer.with_role(Role::Host) {
            Some(_) => Ok(()),
            None if *peer == PeerIdentity::Unauthenticated => Ok(()),
            None => Err(role_required(peer, "a host certificate (URI SAN nixfleet:host)")),
        },
        ["v1", "rollouts", _, "manifest"] => require_host_or_operator(peer),
        _ => require_operator(peer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, dns: &[&str], role: Option<Role>) -> PeerIdentity {
        let dns_names = dns.iter().map(|d| (*d).to_owned()).collect();
        PeerIdentity::Certificate(Ok(tls::PeerIdentity { common_name: Some(cn.to_owned()), dns_names, role }))
    }

    fn status(result: Result<(), Resp>) -> Option<StatusCode> {
        result.err().map(|resp| resp.status())
    }

    #[test]
    fn paths_are_operator_only_unless_listed_and_plaintext_is_open() {
        // Proves the default-deny rule: only /healthz is open, agent paths need a host, a manifest a host or an
        // operator, and every other path (unknown and future ones too) an operator; plaintext passes everything.
        let host = cert("web-1", &["web-1"], Some(Role::Host));
        let operator = cert("alice", &[], Some(Role::Operator));
        let no_role = cert("web-1", &["web-1"], None);
        let broken = PeerIdentity::Certificate(Err("more than one nixfleet role URI".to_owned()));
        let forbidden = Some(StatusCode::FORBIDDEN);
        let paths: [&[&str]; 6] = [
            &["healthz"],
            &["v1", "agent", "events"],
            &["v1", "rollouts", "stable@r1", "manifest"],
            &["v1", "status"],
            &["metrics"],
            &["v1", "some", "later", "route"],
        ];
        let expect = |peer: &PeerIdentity, allowed: [bool; 6]| {
            for (path, ok) in paths.iter().zip(allowed) {
                assert_eq!(status(authorize(peer, path)), (!ok).then_some(StatusCode::FORBIDDEN), "{peer:?} {path:?}");
            }
        };
        expect(&PeerIdentity::Unauthenticated, [true; 6]);
        expect(&host, [true, true, true, false, false, false]);
        expect(&operator, [true, false, true, true, true, true]);
        expect(&no_role, [true, false, false, false, false, false]);
        expect(&broken, [true, false, false, false, false, false]);
        assert_eq!(status(require_operator(&host)), forbidden);
    }

    #[test]
    fn a_host_acts_only_for_a_name_its_certificate_carries() {
        // Proves require_host: CN or DNS SAN with the host role; another name, or an operator named like the
        // host, is refused with a message naming both names.
        let web1: Hostname = "web-1".parse().expect("hostname");
        let web2: Hostname = "web-2".parse().expect("hostname");
        let by_san = cert("web-1.example.org", &["web-1"], Some(Role::Host));
        assert!(require_host(&by_san, &web1).is_ok());
        assert!(require_host(&cert("web-1", &[], Some(Role::Host)), &web1).is_ok());
        assert!(require_host(&PeerIdentity::Unauthenticated, &web2).is_ok());
        let refused = require_host(&by_san, &web2).expect_err("another host");
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        let body = String::from_utf8_lossy(&body_bytes(refused)).into_owned();
        assert!(
            body.contains("identity_mismatch") && body.contains("web-1.example.org") && body.contains("web-2"),
            "{body}"
        );
        let operator_named_web1 = cert("web-1", &["web-1"], Some(Role::Operator));
        assert_eq!(status(require_host(&operator_named_web1, &web1)), Some(StatusCode::FORBIDDEN));
    }

    /// The bytes of a full (already complete) response body.
    fn body_bytes(resp: Resp) -> bytes::Bytes {
        use http_body_util::BodyExt as _;
        let collected = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(resp.into_body().collect())
            .expect("a full body never fails");
        collected.to_bytes()
    }
}
