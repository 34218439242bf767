//! `nixfleet pki export`: an operator's certificate and key as one
//! password-protected PKCS#12 file, the form browsers and key stores import,
//! so an operator can open the CP's web page under mutual TLS.
//!
//! The bundle holds the operator's key, its certificate and the CA
//! certificate (the chain), encrypted with PBES2 (PBKDF2-HMAC-SHA256,
//! AES-256-CBC) and MACed with HMAC-SHA256: what OpenSSL 3 writes by default
//! and what current Firefox, Chromium (NSS), macOS and Windows import.
//!
//! The password never appears on a command line (where `ps` shows it to
//! every user): it comes from `NIXFLEET_P12_PASSWORD` (scripts), else it is
//! asked twice on the terminal with echo off. The file is created 0600 and
//! never overwrites anything, as every `pki` file.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};

use fs_err::os::unix::fs::OpenOptionsExt as _;
use rcgen::PublicKeyData as _;
use sha2::Digest as _;

use crate::output::print_stdout;
use crate::tls::{self, PeerIdentity, Role};
use crate::tools::pki::{PkiError, CA_CERT_FILE};

/// The environment variable a script sets the bundle's password in.
pub const PASSWORD_ENV: &str = "NIXFLEET_P12_PASSWORD";
/// A shorter password would protect an operator key in name only.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// PBKDF2 rounds for the key and the MAC: OpenSSL 3's default is 2048; more
/// costs an importer a few milliseconds and a guesser as many times more.
const KDF_ITERATIONS: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(
        "{} is a {role} certificate: only an operator certificate (`pki issue --role operator`) opens the web page",
        path.display()
    )]
    NotOperator { path: PathBuf, role: String },
    #[error("{}: not a PKCS#8 private key (as `pki issue` writes): {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("{} does not belong to {}: their public keys differ", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("no password: set {PASSWORD_ENV} or run on a terminal to be asked")]
    NoPassword,
    #[error("the password is shorter than {MIN_PASSWORD_CHARS} characters")]
    ShortPassword,
    #[error("the two passwords differ")]
    PasswordsDiffer,
    #[error("cannot write the PKCS#12 bundle: {0}")]
    Encode(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `pki export`: reads `DIR/NAME.crt`, `DIR/NAME.key` and `DIR/ca.crt`,
/// writes `out`, prints what it wrote.
pub fn export_cmd(dir: &Path, name: &str, out: &Path) -> Result<(), ExportError> {
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    let ca_path = dir.join(CA_CERT_FILE);
    if out.symlink_metadata().is_ok() {
        return Err(PkiError::Exists { path: out.to_owned() }.into());
    }
    let bundle = Bundle::load(&cert_path, &key_path, &ca_path)?;
    let password = password()?;
    let der = bundle.pkcs12(&password)?;
    write_new(out, &der)?;
    print_stdout(&format!(
        "wrote {} (mode 0600: {name}'s key, its certificate and the CA certificate, PKCS#12, AES-256)\n",
        out.display()
    ))?;
    Ok(())
}

/// What goes into the bundle, checked: an operator certificate and its key.
#[derive(Debug)]
pub struct Bundle {
    /// The key as PKCS#8 DER.
    key: Vec<u8>,
    /// Leaf first, then the CA.
    chain: Vec<Vec<u8>>,
    name: String,
}

impl Bundle {
    pub fn load(cert_path: &Path, key_path: &Path, ca_path: &Path) -> Result<Bundle, ExportError> {
        let leaf = tls::load_certs(cert_path)?.swap_remove(0);
        let identity = PeerIdentity::from_certificate(&leaf)?;
        if identity.role != Some(Role::Operator) {
            let role = identity.role.map_or("role-less".to_owned(), |r| r.as_str().to_owned());
            return Err(ExportError::NotOperator { path: cert_path.to_owned(), role });
        }
        let key_pem = fs_err::read_to_string(key_path)?;
        let key = rcgen::KeyPair::from_pem(&key_pem)
            .map_err(|e| ExportError::BadKey { path: key_path.to_owned(), reason: e.to_string() })?;
        let (_, x509) =
            x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| tls::TlsError::Identity(e.to_string()))?;
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(ExportError::KeyMismatch { key: key_path.to_owned(), cert: cert_path.to_owned() });
        }
        let mut chain = vec![leaf.to_vec()];
        chain.extend(tls::load_certs(ca_path)?.into_iter().map(|c| c.to_vec()));
        let name = identity.common_name.unwrap_or_default();
        Ok(Bundle { key: key.serialize_der(), chain, name })
    }

    /// The PKCS#12 (PFX) bytes, encrypted and MACed with `password`.
    pub fn pkcs12(&self, password: &str) -> Result<Vec<u8>, ExportError> {
        let encode = |e: p12_keystore::error::Error| ExportError::Encode(e.to_string());
        let certs =
            self.chain.iter().map(|der| p12_keystore::Certificate::from_der(der)).collect::<Result<Vec<_>, _>>();
        // The localKeyId ties the key to its certificate in the importer.
        let key_id = sha2::Sha256::digest(&self.chain[0]);
        let chain = p12_keystore::PrivateKeyChain::new(&self.key, key_id, certs.map_err(encode)?);
        let mut store = p12_keystore::KeyStore::new();
        store.add_entry(
            &format!("nixfleet operator {}", self.name),
            p12_keystore::KeyStoreEntry::PrivateKeyChain(chain),
        );
        store
            .writer(password)
            .encryption_algorithm(p12_keystore::EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
            .mac_algorithm(p12_keystore::MacAlgorithm::HmacSha256)
            .encryption_iterations(KDF_ITERATIONS)
            .mac_iterations(KDF_ITERATIONS)
            .write()
            .map_err(encode)
    }
}

/// The password from the environment, else asked twice on the terminal.
fn password() -> Result<String, ExportError> {
    let password = match std::env::var(PASSWORD_ENV) {
        Ok(p) => p,
        Err(_) if std::io::stdin().is_terminal() => {
            let first = ask("password for the bundle: ")?;
            if first.chars().count() >= MIN_PASSWORD_CHARS && ask("again: ")? != first {
                return Err(ExportError::PasswordsDiffer);
            }
            first
        }
        Err(_) => return Err(ExportError::NoPassword),
    };
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(ExportError::ShortPassword);
    }
    Ok(password)
}

/// One line from the terminal on stdin, with echo off while it is typed.
fn ask(prompt: &str) -> Result<String, ExportError> {
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin).map_err(std::io::Error::from)?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    // Echo goes off before the prompt shows, so nothing typed after it is
    // echoed, and comes back whatever happens in between.
    tcsetattr(&stdin, OptionalActions::Now, &quiet).map_err(std::io::Error::from)?;
    let mut line = String::new();
    let read = (|| -> std::io::Result<usize> {
        let mut stderr = std::io::stderr();
        write!(stderr, "{prompt}")?;
        stderr.flush()?;
        stdin.lock().read_line(&mut line)
    })();
    tcsetattr(&stdin, OptionalActions::Now, &saved).map_err(std::io::Error::from)?;
    eprintln!();
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let mut file = fs_err::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            ExportError::Pki(PkiError::Exists { path: path.to_owned() })
        } else {
            ExportError::Io(e)
        }
    })?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(e.into());
    }
    Ok(())
}
