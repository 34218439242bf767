//! `nixfleet pki init|issue`: a small certificate authority for small
//! fleets, the demo and the tests. Large fleets bring their own CA; what a
//! certificate must carry to work with nixfleet is the identity convention in
//! `src/tls.rs` (CN = name, URI SAN `nixfleet:ROLE`).
//!
//! Files are never overwritten: a CA key may be the only copy of the key
//! every host trusts, and a host key may be installed already. Keys are
//! created with mode 0600 from the first instant (no window in which a
//! secret is readable by others); the directory is created 0700.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};

use fs_err::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData as _, SanType, SerialNumber,
};
use sha2::Digest as _;
use time::OffsetDateTime;

use crate::clock::ClockHandle;
use crate::ids::Hostname;
use crate::output::print_stdout;
use crate::tls::{self, Role, TlsError};

pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
/// The CA's subject CN, followed by 8 hex digits of its key's SHA-256: two
/// fleets' CAs never share a name, so a certificate from the wrong CA is
/// reported as an unknown issuer (not a bad signature) and operators can tell
/// CA files apart.
pub const CA_COMMON_NAME_PREFIX: &str = "nixfleet CA";
/// Ten years: replacing the CA means re-issuing every host's certificate,
/// which a small fleet should not have to plan for.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// A leaf's default validity; `--days` changes it.
pub const DEFAULT_LEAF_DAYS: u32 = 365;
/// Leaves outliving the CA's ten years would only mislead.
pub const MAX_LEAF_DAYS: u32 = 3650;
/// Certificates start to be valid an hour before they are issued, so a host
/// whose clock lags (a fresh boot before NTP) can use one at once.
pub const NOT_BEFORE_BACKDATE: time::Duration = time::Duration::hours(1);
/// Longest name (CN and file stem): a DNS label's limit, as for hostnames.
pub const MAX_NAME_LEN: usize = 63;

const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o700;
/// 16 random bytes: RFC 5280 allows 20 octets; CA/B asks for 64 random bits.
const SERIAL_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("refusing to overwrite existing {}", path.display())]
    Exists { path: PathBuf },
    #[error("no CA in {}: {} is missing (run `nixfleet pki init --dir {}` first)", dir.display(), path.display(), dir.display())]
    MissingCa { dir: PathBuf, path: PathBuf },
    #[error("{}: {reason}", path.display())]
    BadCaFile { path: PathBuf, reason: String },
    #[error("{} does not belong to {}: their public keys differ", key.display(), cert.display())]
    CaKeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("invalid --name {name:?}: {why}")]
    BadName { name: String, why: String },
    #[error("invalid --dns {name:?}: not a DNS name")]
    BadDns { name: String },
    #[error("--days {days}: must be 1..={MAX_LEAF_DAYS}")]
    BadDays { days: u32 },
    #[error("--role cp needs at least one --dns or --ip: clients check the address they dial against them")]
    CpWithoutAddress,
    #[error("--role operator takes no --dns or --ip: an operator certificate names a person, not an address")]
    OperatorWithAddress,
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot get randomness from the operating system: {0}")]
    Randomness(getrandom::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What `pki issue` is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueRequest {
    pub name: String,
    pub role: Role,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub days: u32,
}

/// The two files one command wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The certificate's CN.
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub not_after: OffsetDateTime,
}

/// `pki init`: prints what it wrote.
pub fn init_cmd(dir: &Path, clock: &ClockHandle) -> Result<(), PkiError> {
    let written = init(dir, clock.now())?;
    print_stdout(&format!(
        "wrote {} (the CA certificate: install it on every host and on the CP)\n\
         wrote {} (the CA key, mode 0600: keep it off the fleet)\nCN={}, valid until {}\n",
        written.cert.display(),
        written.key.display(),
        written.name,
        date(written.not_after),
    ))?;
    Ok(())
}

/// `pki issue`: prints what it wrote.
pub fn issue_cmd(dir: &Path, request: &IssueRequest, clock: &ClockHandle) -> Result<(), PkiError> {
    let written = issue(dir, request, clock.now())?;
    let mut names = String::new();
    for name in sans(request).iter().filter_map(|san| match san {
        SanType::DnsName(n) => Some(format!("DNS:{}", n.as_str())),
        SanType::IpAddress(ip) => Some(format!("IP:{ip}")),
        SanType::URI(u) => Some(format!("URI:{}", u.as_str())),
        _ => None,
    }) {
        let _ = write!(names, "{}{name}", if names.is_empty() { "" } else { ", " });
    }
    print_stdout(&format!(
        "wrote {} (CN={}, {names}; valid until {})\nwrote {} (mode 0600)\n",
        written.cert.display(),
        request.name,
        date(written.not_after),
        written.key.display(),
    ))?;
    Ok(())
}

fn date(at: OffsetDateTime) -> String {
    at.date().to_string()
}

/// Writes `DIR/ca.crt` and `DIR/ca.key`, creating DIR (0700) if needed.
pub fn init(dir: &Path, now: OffsetDateTime) -> Result<Written, PkiError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    refuse_existing(&[&cert_path, &key_path])?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let key_hash = sha2::Sha256::digest(key.subject_public_key_info());
    let key_tag: String = key_hash.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let name = format!("{CA_COMMON_NAME_PREFIX} {key_tag}");
    params.distinguished_name = common_name(&name);
    // pathlen 0: this CA signs leaves only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = now - NOT_BEFORE_BACKDATE;
    params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key)?;
    std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir).map_err(|e| with_path(e, dir))?;
    write_pair(&cert_path, &cert.pem(), &key_path, &key.serialize_pem())?;
    Ok(Written { name, cert: cert_path, key: key_path, not_after: params.not_after })
}

/// Writes `DIR/NAME.crt` and `DIR/NAME.key`, signed by `DIR/ca.{crt,key}`.
pub fn issue(dir: &Path, request: &IssueRequest, now: OffsetDateTime) -> Result<Written, PkiError> {
    validate(request)?;
    let cert_path = dir.join(format!("{}.crt", request.name));
    let key_path = dir.join(format!("{}.key", request.name));
    refuse_existing(&[&cert_path, &key_path])?;
    let issuer = load_ca(dir)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(&request.name);
    params.subject_alt_names = sans(request);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // A host or operator key can only authenticate a client, a cp key only a
    // server: a stolen host key cannot pose as the control plane.
    params.extended_key_usages = vec![match request.role {
        Role::Host | Role::Operator => ExtendedKeyUsagePurpose::ClientAuth,
        Role::Cp => ExtendedKeyUsagePurpose::ServerAuth,
    }];
    params.not_before = now - NOT_BEFORE_BACKDATE;
    params.not_after = now + time::Duration::days(i64::from(request.days));
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer)?;
    write_pair(&cert_path, &cert.pem(), &key_path, &key.serialize_pem())?;
    Ok(Written { name: request.name.clone(), cert: cert_path, key: key_path, not_after: params.not_after })
}

fn validate(request: &IssueRequest) -> Result<(), PkiError> {
    let bad_name = |why: &str| PkiError::BadName { name: request.name.clone(), why: why.to_owned() };
    if request.name == "ca" {
        return Err(bad_name("\"ca\" is the CA's own file name"));
    }
    match request.role {
        Role::Host => {
            Hostname::parse(&request.name)
                .map_err(|e| bad_name(&format!("a host certificate's name is its hostname: {}", e.why)))?;
        }
        Role::Operator | Role::Cp => {
            let bytes = request.name.as_bytes();
            let first_ok = bytes.first().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            let rest_ok = bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b));
            if !first_ok || !rest_ok || bytes.len() > MAX_NAME_LEN {
                return Err(bad_name("must match [a-z0-9][a-z0-9._-]{0,62}"));
            }
        }
    }
    for name in &request.dns {
        if rustls::pki_types::DnsName::try_from(name.as_str()).is_err() {
            return Err(PkiError::BadDns { name: name.clone() });
        }
    }
    let has_address = !request.dns.is_empty() || !request.ips.is_empty();
    match request.role {
        Role::Cp if !has_address => return Err(PkiError::CpWithoutAddress),
        Role::Operator if has_address => return Err(PkiError::OperatorWithAddress),
        _ => {}
    }
    if !(1..=MAX_LEAF_DAYS).contains(&request.days) {
        return Err(PkiError::BadDays { days: request.days });
    }
    Ok(())
}

/// The SANs of a leaf: a host's own name first, then `--dns`, `--ip`, and the role URI.
fn sans(request: &IssueRequest) -> Vec<SanType> {
    let mut dns: Vec<&str> = Vec::new();
    if request.role == Role::Host {
        dns.push(&request.name);
    }
    for name in &request.dns {
        if !dns.contains(&name.as_str()) {
            dns.push(name);
        }
    }
    let mut sans: Vec<SanType> = dns.into_iter().filter_map(|n| n.try_into().ok().map(SanType::DnsName)).collect();
    sans.extend(request.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    sans.extend(request.role.uri().try_into().ok().map(SanType::URI));
    sans
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, cn);
    name
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; SERIAL_BYTES];
    getrandom::fill(&mut bytes).map_err(PkiError::Randomness)?;
    // A serial is a positive INTEGER; a clear top bit keeps it positive
    // without a padding byte.
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The CA of `dir`, checked: a CA certificate and the key it was made with.
fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for path in [&cert_path, &key_path] {
        if !path.exists() {
            return Err(PkiError::MissingCa { dir: dir.to_owned(), path: path.clone() });
        }
    }
    let der = tls::load_certs(&cert_path)?.swap_remove(0);
    let key_pem = fs_err::read_to_string(&key_path)?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| PkiError::BadCaFile { path: key_path.clone(), reason: format!("not a private key: {e}") })?;
    let bad_cert = |reason: String| PkiError::BadCaFile { path: cert_path.clone(), reason };
    let (_, x509) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| bad_cert(format!("not a certificate: {e}")))?;
    let is_ca = x509.basic_constraints().ok().flatten().is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(bad_cert("not a CA certificate (no basicConstraints CA:TRUE)".to_owned()));
    }
    if x509.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(PkiError::CaKeyMismatch { key: key_path, cert: cert_path });
    }
    Issuer::from_ca_cert_der(&der, key).map_err(|e| bad_cert(e.to_string()))
}

fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    match paths.iter().find(|p| p.symlink_metadata().is_ok()) {
        Some(path) => Err(PkiError::Exists { path: path.to_path_buf() }),
        None => Ok(()),
    }
}

fn with_path(err: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

/// Creates both files (never replacing one), writes and fsyncs them and the
/// directory; on any failure removes what this call created.
fn write_pair(cert_path: &Path, cert_pem: &str, key_path: &Path, key_pem: &str) -> Result<(), PkiError> {
    let key_file = create_new(key_path, KEY_MODE)?;
    let cert_file = match create_new(cert_path, CERT_MODE) {
        Ok(file) => file,
        Err(e) => {
            let _ = std::fs::remove_file(key_path);
            return Err(e);
        }
    };
    let written = (|| -> std::io::Result<()> {
        // The umask may have narrowed 0644; the certificate is public.
        cert_file.set_permissions(std::fs::Permissions::from_mode(CERT_MODE))?;
        write_and_sync(key_file, key_pem)?;
        write_and_sync(cert_file, cert_pem)?;
        let dir = key_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs_err::File::open(dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(key_path);
        let _ = std::fs::remove_file(cert_path);
        return Err(e.into());
    }
    Ok(())
}

fn create_new(path: &Path, mode: u32) -> Result<fs_err::File, PkiError> {
    fs_err::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists { path: path.to_owned() }
        } else {
            PkiError::Io(e)
        }
    })
}

fn write_and_sync(mut file: fs_err::File, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}
