//! TLS shared by the control plane and the agent (mutual TLS) and by https
//! probes: PEM files loaded with errors that name the file, the server and
//! client config builders, the identity a peer certificate carries, and a
//! holder whose configs are reloaded from disk without a restart.
//!
//! **One crypto provider, ring**, passed explicitly to every config (never
//! the process-wide default), so a dependency that switches on aws-lc-rs can
//! neither change what runs nor make rustls panic over two defaults. ring is
//! Rust plus assembly and a little C, built by `cc` with no other tool;
//! aws-lc-rs builds a large C library with cmake and complicates the
//! crt-static glibc build (`just static`). TLS 1.3 first, 1.2 allowed
//! (docs/decisions.md).
//!
//! **Identity convention**: the subject CN is the peer's name (a host's
//! hostname, an operator's name, the CP's name); the role is a URI SAN,
//! exactly `nixfleet:host`, `nixfleet:operator` or `nixfleet:cp`. A URI SAN,
//! not `OU=`: SANs are the typed, unambiguous place for identities (SPIFFE
//! does the same), publicly trusted CAs no longer issue `OU`, and every CA
//! tool a large fleet brings (step-ca, Vault, cfssl, openssl) can add a URI
//! SAN. A certificate with two different `nixfleet:` roles, or an unknown
//! one, has no usable identity: a typo in a CA template must not quietly
//! become "no role".
//!
//! **Reload**: [`Reloadable::reload`] builds the new config completely
//! before swapping it in, so a bad new file leaves the old config serving
//! and the error says why. Connections already open keep the config they
//! started with.

use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};

use crate::ids::Hostname;

/// A certificate chain, key or CA bundle is a few KiB; a system bundle is
/// about 200 KiB. A bigger file is a mistake (a wrong path, a log file), and
/// it is refused before it is read whole.
pub const MAX_PEM_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// TLS 1.3 first; 1.2 for peers that lack 1.3 (older load balancers and
/// health endpoints behind them).
pub static PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The scheme of the role URI SAN: `nixfleet:host`, `nixfleet:operator`, `nixfleet:cp`.
pub const ROLE_URI_SCHEME: &str = "nixfleet:";

/// Why a TLS file, config or peer identity cannot be used; file errors name the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: larger than {MAX_PEM_FILE_BYTES} bytes; not a certificate, key or CA file", path.display())]
    TooLarge { path: PathBuf },
    #[error("{}: not valid PEM: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("{}: no PEM CERTIFICATE block", path.display())]
    NoCertificates { path: PathBuf },
    #[error("{}: no PEM private key (a PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block)", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error("{}: certificate #{index} cannot be a trust anchor: {reason}", path.display())]
    BadCaCertificate { path: PathBuf, index: usize, reason: String },
    #[error("no trusted root certificates in the system store (SSL_CERT_FILE, /etc/ssl/certs){reason}")]
    NoSystemRoots { reason: String },
    #[error("client CA {}: {reason}", path.display())]
    ClientVerifier { path: PathBuf, reason: String },
    /// rustls refused the pieces, e.g. a key that does not match its certificate.
    #[error("{what}: {source}")]
    Config { what: String, source: rustls::Error },
    #[error("peer certificate: {0}")]
    Identity(String),
}

/// The one crypto provider of every nixfleet TLS config: ring.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a whole PEM file, refusing one larger than [`MAX_PEM_FILE_BYTES`].
fn read_pem_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_error = |source| TlsError::Read { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(read_error)?;
    if bytes.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(TlsError::TooLarge { path: path.to_owned() });
    }
    Ok(bytes)
}

fn pem_error(path: &Path, err: pem::Error) -> TlsError {
    TlsError::Pem { path: path.to_owned(), reason: err.to_string() }
}

/// Every CERTIFICATE block of a PEM file, in order (a chain: leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_pem_file(path)?;
    let certs =
        CertificateDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>().map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates { path: path.to_owned() });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_pem_file(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey { path: path.to_owned() },
        e => pem_error(path, e),
    })
}

/// A CA bundle: every certificate of the file must be a usable trust anchor
/// (a file we are told to trust is never half used).
pub fn load_ca_bundle(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in load_certs(path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsError::BadCaCertificate {
            path: path.to_owned(),
            index,
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The host's trust store (rustls-native-certs: `SSL_CERT_FILE` /
/// `SSL_CERT_DIR`, else the distribution's bundle, on NixOS
/// `/etc/ssl/certs/ca-certificates.crt`). Unparsable entries are skipped,
/// as every TLS client does with a system store; an empty result is an error.
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _skipped) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let reason = found.errors.first().map(|e| format!(": {e}")).unwrap_or_default();
        return Err(TlsError::NoSystemRoots { reason });
    }
    Ok(roots)
}

/// A certificate chain file (leaf first) and its private key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKeyFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertKeyFiles {
    fn load(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        Ok((load_certs(&self.cert)?, load_private_key(&self.key)?))
    }

    fn describe(&self) -> String {
        format!("certificate {} with key {}", self.cert.display(), self.key.display())
    }
}

/// What a mutual-TLS server (the CP) loads: its own chain and key, and the
/// CA every client certificate must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    pub identity: CertKeyFiles,
    pub client_ca: PathBuf,
}

/// What a client (the agent, `cp publish|status`) loads: the CA the server
/// must chain to, and its own certificate when the server asks for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    pub ca: PathBuf,
    pub identity: Option<CertKeyFiles>,
}

/// A server config that REQUIRES a client certificate chained to
/// `client_ca`; anonymous clients fail the handshake.
pub fn server_config(files: &ServerTlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = crypto_provider();
    let client_roots = load_ca_bundle(&files.client_ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots), Arc::clone(&provider))
        .build()
        .map_err(|e| TlsError::ClientVerifier { path: files.client_ca.clone(), reason: e.to_string() })?;
    let (chain, key) = files.identity.load()?;
    ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|source| TlsError::Config { what: "protocol versions".to_owned(), source })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Config { what: files.identity.describe(), source })
}

/// A client config trusting only the CA file, with a client certificate if given.
pub fn client_config(files: &ClientTlsFiles) -> Result<ClientConfig, TlsError> {
    client_config_with_roots(load_ca_bundle(&files.ca)?, files.identity.as_ref())
}

/// A client config trusting `roots` (a CA file's, or [`system_roots`]).
pub fn client_config_with_roots(
    roots: RootCertStore,
    identity: Option<&CertKeyFiles>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|source| TlsError::Config { what: "protocol versions".to_owned(), source })?
        .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(files) => {
            let (chain, key) = files.load()?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|source| TlsError::Config { what: files.describe(), source })
        }
    }
}

/// What a nixfleet certificate is for, from its `nixfleet:ROLE` URI SAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// An agent: the CN is its hostname.
    Host,
    /// A person or script using `cp publish|status`.
    Operator,
    /// The control plane's server certificate.
    Cp,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Host, Role::Operator, Role::Cp];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Operator => "operator",
            Role::Cp => "cp",
        }
    }

    /// The URI SAN that marks the role, e.g. `nixfleet:host`.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_SCHEME}{}", self.as_str())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a certificate names: its CN, DNS SANs and nixfleet role. Read from a
/// certificate rustls has already verified; this is naming, not trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub common_name: Option<String>,
    pub dns_names: Vec<String>,
    pub role: Option<Role>,
}

impl PeerIdentity {
    /// Parses a DER certificate. Several CNs, or a conflicting or unknown
    /// `nixfleet:` role URI, are errors.
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Result<PeerIdentity, TlsError> {
        use x509_parser::extensions::GeneralName;
        let identity_error = |why: String| TlsError::Identity(why);
        let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| identity_error(format!("not an X.509 certificate: {e}")))?;
        let mut common_names = x509.subject().iter_common_name();
        let common_name = match (common_names.next(), common_names.next()) {
            (None, _) => None,
            (Some(cn), None) => {
                Some(cn.as_str().map_err(|e| identity_error(format!("the CN is not a string: {e}")))?.to_owned())
            }
            (Some(_), Some(_)) => return Err(identity_error("the subject has several CNs".to_owned())),
        };
        let sans = x509
            .subject_alternative_name()
            .map_err(|e| identity_error(format!("bad subjectAltName extension: {e}")))?
            .map(|ext| ext.value.general_names.as_slice())
            .unwrap_or_default();
        let mut dns_names = Vec::new();
        let mut role = None;
        for san in sans {
            match san {
                GeneralName::DNSName(name) => dns_names.push((*name).to_owned()),
                GeneralName::URI(uri) => {
                    let Some(name) = uri.strip_prefix(ROLE_URI_SCHEME) else { continue };
                    let found = Role::ALL.into_iter().find(|r| r.as_str() == name).ok_or_else(|| {
                        identity_error(format!(
                            "unknown role URI {uri:?} (known: nixfleet:host, nixfleet:operator, nixfleet:cp)"
                        ))
                    })?;
                    if role.is_some_and(|r| r != found) {
                        return Err(identity_error("more than one nixfleet role URI".to_owned()));
                    }
                    role = Some(found);
                }
                _ => {}
            }
        }
        Ok(PeerIdentity { common_name, dns_names, role })
    }

    /// The identity of a connection's peer (its end-entity certificate).
    pub fn from_connection(conn: &rustls::CommonState) -> Result<PeerIdentity, TlsError> {
        let leaf = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or_else(|| TlsError::Identity("the peer sent no certificate".to_owned()))?;
        PeerIdentity::from_certificate(leaf)
    }

    /// Fails unless the certificate carries `role`.
    pub fn require_role(&self, role: Role) -> Result<(), TlsError> {
        match self.role {
            Some(r) if r == role => Ok(()),
            Some(r) => Err(TlsError::Identity(format!("role {r}, expected {role}"))),
            None => Err(TlsError::Identity(format!("no nixfleet role URI, expected {}", role.uri()))),
        }
    }

    /// Whether the certificate names `name`: its CN or one of its DNS SANs,
    /// exactly (DNS names compare without regard to ASCII case). The CP
    /// lets a host certificate act only for a hostname it names.
    pub fn names(&self, name: &str) -> bool {
        self.common_name.iter().chain(&self.dns_names).any(|n| n.eq_ignore_ascii_case(name))
    }

    /// The host a `nixfleet:host` certificate names: its CN, a valid hostname.
    pub fn host(&self) -> Result<Hostname, TlsError> {
        self.require_role(Role::Host)?;
        let cn = self
            .common_name
            .as_deref()
            .ok_or_else(|| TlsError::Identity("a host certificate without a CN".to_owned()))?;
        Hostname::parse(cn).map_err(|e| TlsError::Identity(format!("CN: {e}")))
    }
}

/// A set of files that builds one TLS config; what [`Reloadable`] re-reads.
pub trait TlsFiles: fmt::Debug {
    type Config: fmt::Debug;
    fn build(&self) -> Result<Self::Config, TlsError>;
}

impl TlsFiles for ServerTlsFiles {
    type Config = ServerConfig;
    fn build(&self) -> Result<ServerConfig, TlsError> {
        server_config(self)
    }
}

impl TlsFiles for ClientTlsFiles {
    type Config = ClientConfig;
    fn build(&self) -> Result<ClientConfig, TlsError> {
        client_config(self)
    }
}

/// A config built from files, swapped whole on [`reload`](Reloadable::reload).
/// Readers take an `Arc` per connection and never wait on a reload's file I/O.
#[derive(Debug)]
pub struct Reloadable<F: TlsFiles> {
    files: F,
    current: RwLock<Arc<F::Config>>,
}

/// The CP's mutual-TLS server config.
pub type ReloadableServerConfig = Reloadable<ServerTlsFiles>;
/// The agent's (or an operator's) client config.
pub type ReloadableClientConfig = Reloadable<ClientTlsFiles>;

impl<F: TlsFiles> Reloadable<F> {
    /// Builds the first config; an error here is a start-up error.
    pub fn load(files: F) -> Result<Reloadable<F>, TlsError> {
        let config = Arc::new(files.build()?);
        Ok(Reloadable { files, current: RwLock::new(config) })
    }

    /// The config new connections should use.
    pub fn current(&self) -> Arc<F::Config> {
        // A poisoned lock only means a thread panicked while swapping an Arc;
        // the Arc inside is whole either way.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Re-reads the files. On success new connections use the new config;
    /// on error the old config stays in use and the error says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(self.files.build()?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    /// [`reload`](Self::reload) for SIGHUP: logs what was re-read, or why
    /// the config in use stays.
    pub fn reload_logged(&self) {
        match self.reload() {
            Ok(()) => tracing::info!(files = ?self.files, "SIGHUP: TLS files re-read; new connections use them"),
            Err(e) => tracing::error!(
                error = %e,
                "SIGHUP: cannot use the new TLS files; keeping the certificate and CA already in use"
            ),
        }
    }

    pub fn files(&self) -> &F {
        &self.files
    }
}

impl Reloadable<ServerTlsFiles> {
    /// An acceptor on the current config; take one per accepted connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current())
    }
}

impl Reloadable<ClientTlsFiles> {
    /// A connector on the current config; take one per connection.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.current())
    }
}

#[cfg(test)]
mod tests;
