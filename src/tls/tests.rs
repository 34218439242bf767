//! The TLS module against certificates generated here: loading with errors
//! naming the file, mutual-TLS handshakes in memory (no sockets), identity
//! extraction, and reload keeping the old config when a file is bad.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::{ClientConnection, ServerConnection};

use super::*;
use crate::clock::ClockHandle;

/// A throwaway CA: its PEM certificate and an issuer for leaves.
struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn test_ca(name: &str) -> TestCa {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let pem = params.self_signed(&key).expect("self-sign").pem();
    TestCa { pem, issuer: Issuer::new(params, key) }
}

/// What a leaf certificate says; `days` may be negative for an expired one.
struct Leaf<'a> {
    cn: &'a str,
    sans: Vec<SanType>,
    server: bool,
    days: i64,
}

fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().expect("ia5"))
}

fn uri(text: &str) -> SanType {
    SanType::URI(text.try_into().expect("ia5"))
}

/// A leaf signed by `ca`: (certificate PEM, key PEM).
fn issue(ca: &TestCa, leaf: Leaf<'_>) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let now = ClockHandle::system().now();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, leaf.cn);
    params.subject_alt_names = leaf.sans;
    params.extended_key_usages =
        vec![if leaf.server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
    params.not_before = now - time::Duration::days(30);
    params.not_after = now + time::Duration::days(leaf.days);
    let cert = params.signed_by(&key, &ca.issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

/// A temp dir holding a named set of PEM files.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files { dir: tempfile::tempdir().expect("tempdir") }
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs_err::write(&path, text).expect("write");
        path
    }
    fn pair(&self, name: &str, (cert, key): &(String, String)) -> CertKeyFiles {
        CertKeyFiles { cert: self.write(&format!("{name}.crt"), cert), key: self.write(&format!("{name}.key"), key) }
    }
}

fn server_cert(ca: &TestCa) -> (String, String) {
    issue(ca, Leaf { cn: "cp", sans: vec![dns("cp.test"), uri("nixfleet:cp")], server: true, days: 30 })
}

fn host_cert(ca: &TestCa, host: &str) -> (String, String) {
    issue(ca, Leaf { cn: host, sans: vec![dns(host), uri("nixfleet:host")], server: false, days: 30 })
}

/// Runs a whole handshake in memory; Ok is the identity the server saw.
/// Err names the side that refused and rustls' reason.
fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Result<PeerIdentity, String> {
    handshake_version(client, server).map(|(identity, _)| identity)
}

fn handshake_version(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> Result<(PeerIdentity, rustls::ProtocolVersion), String> {
    let name = rustls::pki_types::ServerName::try_from("cp.test").expect("name");
    let mut client = ClientConnection::new(client, name).expect("client connection");
    let mut server = ServerConnection::new(server).expect("server connection");
    // A TLS 1.3 handshake is three flights; 10 rounds means something is stuck.
    for _ in 0..10 {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("client write");
        }
        server.read_tls(&mut wire.as_slice()).expect("server read");
        server.process_new_packets().map_err(|e| format!("server: {e}"))?;
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).expect("server write");
        }
        client.read_tls(&mut wire.as_slice()).expect("client read");
        client.process_new_packets().map_err(|e| format!("client: {e}"))?;
        if !client.is_handshaking() && !server.is_handshaking() {
            let version = server.protocol_version().expect("negotiated");
            return PeerIdentity::from_connection(&server).map(|id| (id, version)).map_err(|e| e.to_string());
        }
    }
    Err("handshake did not finish".to_owned())
}

/// A CA, a CP server config trusting it for clients, and a host's client config.
struct Pair {
    ca: TestCa,
    files: Files,
    server: ServerTlsFiles,
    client: ClientTlsFiles,
}

fn pair() -> Pair {
    let ca = test_ca("fleet CA");
    let files = Files::new();
    let ca_path = files.write("ca.crt", &ca.pem);
    let server = ServerTlsFiles { identity: files.pair("cp", &server_cert(&ca)), client_ca: ca_path.clone() };
    let client = ClientTlsFiles { ca: ca_path, identity: Some(files.pair("web1", &host_cert(&ca, "web1"))) };
    Pair { ca, files, server, client }
}

fn configs(pair: &Pair) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    (Arc::new(client_config(&pair.client).expect("client")), Arc::new(server_config(&pair.server).expect("server")))
}

#[test]
fn mutual_tls_succeeds_with_the_fleet_ca_and_the_server_sees_the_host() {
    // Proves the two builders interoperate: TLS with client auth completes and the server reads CN, DNS SAN and role.
    let pair = pair();
    let (client, server) = configs(&pair);
    let seen = handshake(client, server).expect("handshake");
    assert_eq!(
        seen,
        PeerIdentity { common_name: Some("web1".into()), dns_names: vec!["web1".into()], role: Some(Role::Host) }
    );
    assert_eq!(seen.host().expect("host").as_str(), "web1");
}

#[test]
fn a_client_without_a_certificate_is_refused_by_the_server() {
    // Proves the server config REQUIRES a client certificate (no anonymous fallback).
    let pair = pair();
    let (_, server) = configs(&pair);
    let anonymous = ClientTlsFiles { ca: pair.client.ca.clone(), identity: None };
    let err = handshake(Arc::new(client_config(&anonymous).expect("client")), server).expect_err("refused");
    assert!(err.starts_with("server:") && err.contains("no certificates"), "{err}");
}

#[test]
fn certificates_from_another_ca_are_refused_on_both_sides() {
    // Proves trust is the named CA file only: a foreign client cert fails at the server, a foreign server cert at the client.
    let pair = pair();
    let (client, server) = configs(&pair);
    let other = test_ca("other CA");
    let foreign_client = ClientTlsFiles {
        ca: pair.client.ca.clone(),
        identity: Some(pair.files.pair("stranger", &host_cert(&other, "web1"))),
    };
    let err = handshake(Arc::new(client_config(&foreign_client).expect("client")), Arc::clone(&server))
        .expect_err("foreign client");
    assert!(err.starts_with("server:") && err.contains("UnknownIssuer"), "{err}");
    let foreign_server = ServerTlsFiles {
        identity: pair.files.pair("fake-cp", &server_cert(&other)),
        client_ca: pair.server.client_ca.clone(),
    };
    let err = handshake(client, Arc::new(server_config(&foreign_server).expect("server"))).expect_err("foreign server");
    assert!(err.starts_with("client:") && err.contains("UnknownIssuer"), "{err}");
}

#[test]
fn an_expired_client_certificate_is_refused() {
    // Proves validity dates are checked for client certificates (the control: the same CA's fresh cert passes).
    let pair = pair();
    let (_, server) = configs(&pair);
    let expired = issue(&pair.ca, Leaf { cn: "web1", sans: vec![uri("nixfleet:host")], server: false, days: -1 });
    let client = ClientTlsFiles { ca: pair.client.ca.clone(), identity: Some(pair.files.pair("old", &expired)) };
    let err = handshake(Arc::new(client_config(&client).expect("client")), server).expect_err("expired");
    assert!(err.starts_with("server:") && err.contains("certificate expired"), "{err}");
}

#[test]
fn loading_errors_name_the_file_and_the_problem() {
    // Proves every file error is actionable on its own: the path and what is wrong with it.
    let pair = pair();
    let missing = pair.files.dir.path().join("missing.crt");
    let garbage = pair.files.write("garbage.pem", "hello\n");
    let broken = pair.files.write("broken.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n");
    let key_only = pair.server.identity.key.clone();
    let cert_only = pair.server.identity.cert.clone();
    let cases: Vec<(TlsError, &Path, &str)> = vec![
        (load_certs(&missing).expect_err("missing"), &missing, "No such file"),
        (load_certs(&garbage).expect_err("garbage"), &garbage, "no PEM CERTIFICATE block"),
        (load_certs(&broken).expect_err("broken"), &broken, "not valid PEM"),
        (load_certs(&key_only).expect_err("a key"), &key_only, "no PEM CERTIFICATE block"),
        (load_private_key(&cert_only).expect_err("a cert"), &cert_only, "no PEM private key"),
        (load_ca_bundle(&garbage).expect_err("garbage CA"), &garbage, "no PEM CERTIFICATE block"),
    ];
    for (err, path, says) in cases {
        let text = err.to_string();
        assert!(
            text.contains(&path.display().to_string()) && text.contains(says),
            "{text} should name {path:?}: {says}"
        );
    }
    let huge = pair.files.dir.path().join("huge.pem");
    std::fs::File::create(&huge).expect("create").set_len(MAX_PEM_FILE_BYTES + 1).expect("grow");
    assert!(matches!(load_certs(&huge), Err(TlsError::TooLarge { .. })));
}

#[test]
fn a_key_that_does_not_match_its_certificate_names_both_files() {
    // Proves a swapped key is caught when the config is built, not at the first handshake.
    let pair = pair();
    let mut wrong = pair.server.clone();
    wrong.identity.key = pair.client.identity.as_ref().expect("identity").key.clone();
    let text = server_config(&wrong).expect_err("mismatch").to_string();
    assert!(text.contains("cp.crt") && text.contains("web1.key") && text.contains("match"), "{text}");
    let mut wrong_client = pair.client.clone();
    wrong_client.identity = Some(pair.server.identity.clone()).map(|mut i| {
        i.key = pair.client.identity.as_ref().expect("identity").key.clone();
        i
    });
    assert!(client_config(&wrong_client).is_err());
}

fn identity_of(sans: Vec<SanType>, cn: &str) -> Result<PeerIdentity, TlsError> {
    let ca = test_ca("CA");
    let (cert, _) = issue(&ca, Leaf { cn, sans, server: false, days: 1 });
    let der = CertificateDer::from_pem_slice(cert.as_bytes()).expect("pem");
    PeerIdentity::from_certificate(&der)
}

#[test]
fn identity_reads_the_role_uri_and_refuses_ambiguous_ones() {
    // Proves the role convention: one nixfleet:ROLE URI SAN; none = no role; unknown or conflicting = error.
    let operator = identity_of(vec![uri("nixfleet:operator"), uri("https://example.org/alice")], "alice").expect("ok");
    assert_eq!((operator.role, operator.common_name.as_deref()), (Some(Role::Operator), Some("alice")));
    assert!(operator.require_role(Role::Operator).is_ok());
    assert!(operator.host().expect_err("not a host").to_string().contains("role operator, expected host"));
    let plain = identity_of(vec![dns("web1")], "web1").expect("ok");
    assert_eq!(plain.role, None);
    assert!(plain.host().expect_err("no role").to_string().contains("no nixfleet role URI, expected nixfleet:host"));
    let twice = identity_of(vec![uri("nixfleet:host"), uri("nixfleet:host")], "web1").expect("same role twice");
    assert_eq!(twice.role, Some(Role::Host));
    let both = identity_of(vec![uri("nixfleet:host"), uri("nixfleet:operator")], "web1").expect_err("two roles");
    assert!(both.to_string().contains("more than one nixfleet role"), "{both}");
    let unknown = identity_of(vec![uri("nixfleet:admin")], "web1").expect_err("unknown role");
    assert!(unknown.to_string().contains("unknown role URI \"nixfleet:admin\""), "{unknown}");
    let bad_host = identity_of(vec![uri("nixfleet:host")], "Web_1").expect("parses");
    assert!(bad_host.host().expect_err("bad hostname").to_string().contains("invalid hostname"));
}

#[test]
fn reload_keeps_the_old_config_when_a_file_is_bad_and_switches_when_it_is_good() {
    // Proves reload never leaves the server without a config: a bad file is an error naming it and the old
    // config still serves; a good file (a new CA and certificate) takes effect for new handshakes.
    let pair = pair();
    let holder = ReloadableServerConfig::load(pair.server.clone()).expect("load");
    let (old_client, _) = configs(&pair);
    let before = holder.current();
    handshake(Arc::clone(&old_client), holder.current()).expect("old config works");

    // A half-written certificate file: reload fails, names the file, and changes nothing.
    let cert_path = pair.server.identity.cert.clone();
    fs_err::write(&cert_path, "-----BEGIN CERTIFICATE-----\ntrunc").expect("corrupt");
    let err = holder.reload().expect_err("bad file");
    assert!(err.to_string().contains(&cert_path.display().to_string()), "{err}");
    assert!(Arc::ptr_eq(&before, &holder.current()), "the old config must stay in place");
    handshake(Arc::clone(&old_client), holder.current()).expect("still serving the old certificate");

    // A new CA for everything: after reload, only clients of the new CA get through.
    let new_ca = test_ca("fleet CA 2");
    let new_server = server_cert(&new_ca);
    fs_err::write(&pair.server.client_ca, &new_ca.pem).expect("new CA");
    fs_err::write(&cert_path, &new_server.0).expect("new cert");
    fs_err::write(&pair.server.identity.key, &new_server.1).expect("new key");
    holder.reload().expect("good files");
    assert!(!Arc::ptr_eq(&before, &holder.current()));
    let err = handshake(Arc::clone(&old_client), holder.current()).expect_err("old CA no longer trusted");
    assert!(err.contains("UnknownIssuer"), "{err}");
    let new_client = ClientTlsFiles {
        ca: pair.server.client_ca.clone(),
        identity: Some(pair.files.pair("web2", &host_cert(&new_ca, "web2"))),
    };
    let seen = handshake(Arc::new(client_config(&new_client).expect("client")), holder.current()).expect("new");
    assert_eq!(seen.host().expect("host").as_str(), "web2");
}

#[test]
fn the_client_holder_reloads_too() {
    // Proves ReloadableClientConfig has the same keep-old-on-error behaviour.
    let pair = pair();
    let holder = ReloadableClientConfig::load(pair.client.clone()).expect("load");
    let before = holder.current();
    fs_err::write(&pair.client.ca, "not a CA").expect("corrupt");
    let err = holder.reload().expect_err("bad CA");
    assert!(err.to_string().contains("ca.crt") && err.to_string().contains("no PEM CERTIFICATE"), "{err}");
    assert!(Arc::ptr_eq(&before, &holder.current()));
}

#[test]
fn configs_use_ring_prefer_tls13_and_allow_tls12() {
    // Proves the provider decision is what runs (ring's suites only), 1.3 is negotiated by default, and a
    // client limited to TLS 1.2 still completes mutual TLS.
    let pair = pair();
    let (client, server) = configs(&pair);
    let ring: Vec<_> = rustls::crypto::ring::default_provider().cipher_suites.iter().map(|s| s.suite()).collect();
    for provider in [client.crypto_provider(), server.crypto_provider()] {
        assert_eq!(provider.cipher_suites.iter().map(|s| s.suite()).collect::<Vec<_>>(), ring);
    }
    let (_, version) = handshake_version(Arc::clone(&client), Arc::clone(&server)).expect("default");
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
    let (chain, key) = pair.client.identity.as_ref().expect("identity").load().expect("load");
    let tls12_only = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("tls12")
        .with_root_certificates(load_ca_bundle(&pair.client.ca).expect("ca"))
        .with_client_auth_cert(chain, key)
        .expect("client");
    let (seen, version) = handshake_version(Arc::new(tls12_only), server).expect("tls 1.2");
    assert_eq!((version, seen.role), (rustls::ProtocolVersion::TLSv1_2, Some(Role::Host)));
}

#[test]
fn a_certificate_names_a_host_by_its_cn_or_one_of_its_dns_sans_only() {
    // Proves the host-identity rule the CP applies: the CN or any DNS SAN, exactly (ASCII case aside); a URI
    // SAN, a prefix or a suffix never names a host.
    let id = identity_of(vec![dns("web-1"), dns("WEB-7"), uri("nixfleet:host")], "web-1.example.org").expect("ok");
    for name in ["web-1", "web-1.example.org", "web-7"] {
        assert!(id.names(name), "{name}");
    }
    for name in ["web-2", "web", "web-1.example", "example.org", "nixfleet:host", "host"] {
        assert!(!id.names(name), "{name}");
    }
    let no_cn = PeerIdentity { common_name: None, dns_names: vec![], role: Some(Role::Host) };
    assert!(!no_cn.names("web-1") && !no_cn.names(""));
}
