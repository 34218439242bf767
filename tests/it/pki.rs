//! `nixfleet pki` as a user runs it (the real binary), and the files it
//! writes used as they will be: a rustls server config and client config
//! built with `nixfleet::tls` from them, in a real handshake over loopback.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use nixfleet::tls::{self, CertKeyFiles, ClientTlsFiles, PeerIdentity, Role, ServerTlsFiles};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn nixfleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nixfleet")).args(args).env("RUST_LOG", "warn").output().expect("run nixfleet")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_exit(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "stdout: {}\nstderr: {}", String::from_utf8_lossy(&o.stdout), stderr(o));
}

fn mode(path: &Path) -> u32 {
    fs_err::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// A pki directory made by the real binary.
struct Pki {
    _tmp: crate::harness::TempDir,
    dir: PathBuf,
}

impl Pki {
    /// `pki init` in a fresh (not yet existing) directory.
    fn init() -> Pki {
        let tmp = crate::harness::TempDir::new("pki");
        let dir = tmp.path().join("pki");
        assert_exit(&nixfleet(&["pki", "init", "--dir", dir.to_str().expect("utf8")]), 0);
        Pki { _tmp: tmp, dir }
    }

    fn issue(&self, args: &[&str]) -> Output {
        let mut all = vec!["pki", "issue", "--dir", self.dir.to_str().expect("utf8")];
        all.extend_from_slice(args);
        nixfleet(&all)
    }

    fn issued(&self, args: &[&str]) -> CertKeyFiles {
        let out = self.issue(args);
        assert_exit(&out, 0);
        let name = args.iter().skip_while(|a| **a != "--name").nth(1).expect("--name");
        CertKeyFiles { cert: self.path(&format!("{name}.crt")), key: self.path(&format!("{name}.key")) }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn identity(cert: &Path) -> PeerIdentity {
    PeerIdentity::from_certificate(&tls::load_certs(cert).expect("load")[0]).expect("identity")
}

#[test]
fn pki_init_writes_a_ca_with_a_0600_key_and_never_overwrites_it() {
    // Proves init's files and modes (dir 0700, key 0600, cert 0644) and that a second init keeps the first CA.
    let pki = Pki::init();
    assert_eq!((mode(&pki.dir), mode(&pki.path("ca.key")), mode(&pki.path("ca.crt"))), (0o700, 0o600, 0o644));
    assert_eq!(tls::load_ca_bundle(&pki.path("ca.crt")).expect("a CA bundle").len(), 1);
    let before = (fs_err::read(pki.path("ca.crt")).expect("read"), fs_err::read(pki.path("ca.key")).expect("read"));
    let again = nixfleet(&["pki", "init", "--dir", pki.dir.to_str().expect("utf8")]);
    assert_exit(&again, 1);
    assert!(stderr(&again).contains("refusing to overwrite existing"), "{}", stderr(&again));
    let after = (fs_err::read(pki.path("ca.crt")).expect("read"), fs_err::read(pki.path("ca.key")).expect("read"));
    assert!(before == after, "the CA changed");
}

#[test]
fn pki_issue_writes_each_role_with_its_name_addresses_and_role_uri() {
    // Proves the identity convention end to end: CN = name, host name also a DNS SAN, role as nixfleet:ROLE.
    let pki = Pki::init();
    let host = pki.issued(&["--name", "web1", "--ip", "10.0.0.5"]);
    let operator = pki.issued(&["--name", "alice", "--role", "operator"]);
    let cp = pki.issued(&["--name", "cp", "--role", "cp", "--dns", "cp.example.org", "--ip", "127.0.0.1"]);
    for files in [&host, &operator, &cp] {
        assert_eq!((mode(&files.key), mode(&files.cert)), (0o600, 0o644), "{files:?}");
    }
    let web1 = identity(&host.cert);
    assert_eq!((web1.role, web1.dns_names.as_slice()), (Some(Role::Host), ["web1".to_owned()].as_slice()));
    assert_eq!(web1.host().expect("a host certificate").as_str(), "web1");
    let alice = identity(&operator.cert);
    assert_eq!(
        (alice.role, alice.common_name.as_deref(), alice.dns_names.len()),
        (Some(Role::Operator), Some("alice"), 0)
    );
    let cp_id = identity(&cp.cert);
    assert_eq!((cp_id.role, cp_id.dns_names.as_slice()), (Some(Role::Cp), ["cp.example.org".to_owned()].as_slice()));
}

#[test]
fn pki_issue_refuses_overwrites_bad_names_a_missing_ca_and_a_cp_without_an_address() {
    // Proves each refusal exits 1 with a message naming the problem and writes nothing.
    let pki = Pki::init();
    let first = pki.issued(&["--name", "web1"]);
    let before = fs_err::read(&first.key).expect("read");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--name", "web1"], "refusing to overwrite existing"),
        (vec!["--name", "Web_1"], "invalid --name \"Web_1\": a host certificate's name is its hostname"),
        (vec!["--name", "ca", "--role", "operator"], "\"ca\" is the CA's own file name"),
        (vec!["--name", "cp", "--role", "cp"], "--role cp needs at least one --dns or --ip"),
        (vec!["--name", "bob", "--role", "operator", "--dns", "x.org"], "--role operator takes no --dns or --ip"),
        (vec!["--name", "web2", "--dns", "not a name"], "invalid --dns \"not a name\""),
        (vec!["--name", "web3", "--days", "0"], "--days 0: must be 1..=3650"),
    ];
    for (args, message) in cases {
        let out = pki.issue(&args);
        assert_exit(&out, 1);
        assert!(stderr(&out).contains(message), "{args:?}: {} should contain {message:?}", stderr(&out));
    }
    assert_eq!(fs_err::read(&first.key).expect("read"), before, "web1.key was replaced");
    let mut left: Vec<_> = fs_err::read_dir(&pki.dir).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    left.sort();
    assert_eq!(left, ["ca.crt", "ca.key", "web1.crt", "web1.key"]);

    let empty = crate::harness::TempDir::new("pki-empty");
    let out = nixfleet(&["pki", "issue", "--dir", empty.path().to_str().expect("utf8"), "--name", "web1"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("no CA in") && stderr(&out).contains("nixfleet pki init --dir"), "{}", stderr(&out));
    let bad_ip = nixfleet(&["pki", "issue", "--dir", "x", "--name", "web1", "--ip", "10.0.0"]);
    assert_exit(&bad_ip, 2);
}

/// One TLS connection over loopback: the server's view (the client's
/// identity, or why it failed) and the client's (ok, or why it failed).
async fn connect(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
    server_name: &str,
) -> (Result<PeerIdentity, String>, Result<(), String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).expect("server name");
    let serve = async {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let seen = PeerIdentity::from_connection(tls.get_ref().1).map_err(|e| e.to_string())?;
        let mut ping = [0u8; 4];
        tls.read_exact(&mut ping).await.map_err(|e| e.to_string())?;
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok(seen)
    };
    let dial = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut pong = [0u8; 4];
        // A refused client certificate (TLS 1.3) shows up here, as the server's alert.
        tls.read_exact(&mut pong).await.map_err(|e| e.to_string())?;
        Ok(())
    };
    let both = async { tokio::join!(serve, dial) };
    tokio::time::timeout(Duration::from_secs(10), both).await.expect("the handshake finished")
}

/// The CP's server config from pki files: cp certificate, clients checked against `client_ca`.
fn cp_server(cp: &CertKeyFiles, client_ca: &Path) -> rustls::ServerConfig {
    tls::server_config(&ServerTlsFiles { identity: cp.clone(), client_ca: client_ca.to_owned() })
        .expect("server config")
}

fn agent_client(ca: &Path, identity: Option<&CertKeyFiles>) -> rustls::ClientConfig {
    tls::client_config(&ClientTlsFiles { ca: ca.to_owned(), identity: identity.cloned() }).expect("client config")
}

/// A fleet: a CA, a cp certificate for 127.0.0.1 and `cp.test`, a host certificate for web1.
struct Fleet {
    pki: Pki,
    cp: CertKeyFiles,
    web1: CertKeyFiles,
}

fn fleet() -> Fleet {
    let pki = Pki::init();
    let cp = pki.issued(&["--name", "cp", "--role", "cp", "--dns", "cp.test", "--ip", "127.0.0.1"]);
    let web1 = pki.issued(&["--name", "web1"]);
    Fleet { pki, cp, web1 }
}

#[tokio::test]
async fn pki_files_make_a_mutual_tls_connection_and_the_cp_sees_the_host() {
    // Proves the issued files work together: by DNS name and by IP, the CP learns the host's name from its certificate.
    let f = fleet();
    let ca = f.pki.path("ca.crt");
    for server_name in ["cp.test", "127.0.0.1"] {
        let (server, client) = connect(cp_server(&f.cp, &ca), agent_client(&ca, Some(&f.web1)), server_name).await;
        client.expect("client side");
        assert_eq!(server.expect("server side").host().expect("host").as_str(), "web1");
    }
}

#[tokio::test]
async fn another_ca_an_expired_certificate_or_no_client_certificate_fail_the_handshake() {
    // Proves what mTLS must refuse, each on the side that checks it: the agent refuses a CP from another CA; the
    // CP refuses a host from another CA, an expired host certificate, and a client without a certificate.
    let f = fleet();
    let ca = f.pki.path("ca.crt");
    let other = fleet();
    let other_ca = other.pki.path("ca.crt");

    let (_, client) = connect(cp_server(&other.cp, &other_ca), agent_client(&ca, Some(&f.web1)), "cp.test").await;
    let why = client.expect_err("a CP from another CA");
    assert!(why.contains("invalid peer certificate") && why.contains("UnknownIssuer"), "{why}");

    let (server, _) = connect(cp_server(&f.cp, &ca), agent_client(&ca, Some(&other.web1)), "cp.test").await;
    let why = server.expect_err("a host from another CA");
    assert!(why.contains("invalid peer certificate") && why.contains("UnknownIssuer"), "{why}");

    let expired = expired_host_certificate(&f.pki, "web9");
    let (server, client) = connect(cp_server(&f.cp, &ca), agent_client(&ca, Some(&expired)), "cp.test").await;
    let why = server.expect_err("an expired host certificate");
    assert!(why.contains("certificate expired"), "{why}");
    assert!(client.is_err(), "the client must not get an answer either");

    let (server, client) = connect(cp_server(&f.cp, &ca), agent_client(&ca, None), "cp.test").await;
    let why = server.expect_err("no client certificate");
    assert!(why.contains("peer sent no certificates"), "{why}");
    assert!(client.is_err());
}

#[tokio::test]
async fn a_host_certificate_cannot_serve_as_the_cp() {
    // Proves the EKU split: a host key (clientAuth only) used as a server certificate is refused by clients.
    let f = fleet();
    let ca = f.pki.path("ca.crt");
    let host_as_server = f.pki.issued(&["--name", "cp-test", "--dns", "cp.test"]);
    let (_, client) = connect(cp_server(&host_as_server, &ca), agent_client(&ca, Some(&f.web1)), "cp.test").await;
    let why = client.expect_err("a host certificate posing as the CP");
    assert!(why.contains("does not allow extended key usage for server authentication"), "{why}");
}

/// A host certificate signed by the pki's CA that expired yesterday (made
/// here with rcgen from ca.key: `pki issue` refuses `--days 0`).
fn expired_host_certificate(pki: &Pki, name: &str) -> CertKeyFiles {
    let ca_key = rcgen::KeyPair::from_pem(&fs_err::read_to_string(pki.path("ca.key")).expect("read")).expect("key");
    let ca_pem = fs_err::read_to_string(pki.path("ca.crt")).expect("read");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.subject_alt_names.push(rcgen::SanType::URI("nixfleet:host".try_into().expect("ia5")));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = nixfleet::clock::ClockHandle::system().now();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let files = CertKeyFiles { cert: pki.path(&format!("{name}.crt")), key: pki.path(&format!("{name}.key")) };
    fs_err::write(&files.cert, cert.pem()).expect("write");
    fs_err::write(&files.key, key.serialize_pem()).expect("write");
    files
}

/// `pki export` as a script runs it: the password in the environment.
fn export(pki: &Pki, name: &str, out: &Path, password: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixfleet"));
    cmd.args(["pki", "export", "--dir", pki.dir.to_str().expect("utf8"), "--name", name, "--out"]).arg(out);
    cmd.env_remove("NIXFLEET_P12_PASSWORD").stdin(std::process::Stdio::null());
    if let Some(password) = password {
        cmd.env("NIXFLEET_P12_PASSWORD", password);
    }
    cmd.output().expect("run nixfleet")
}

/// `openssl pkcs12 ARGS -in P12`, the password passed through the environment: stdout and stderr
/// (where `-info` writes the algorithms), or stderr.
fn openssl_pkcs12(p12: &Path, password: &str, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new("openssl")
        .arg("pkcs12")
        .arg("-in")
        .arg(p12)
        .args(["-passin", "env:P12_PASS"])
        .args(args)
        .env("P12_PASS", password)
        .output()
        .expect("run openssl");
    if out.status.success() {
        Ok([out.stdout, out.stderr].concat())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn pki_export_bundles_an_operator_identity_that_openssl_reads_back_and_the_cp_accepts() {
    // Proves the PKCS#12 file holds exactly the operator's certificate, its key and the CA, under the password,
    // AES-256, mode 0600; and that the identity read back out of it (as a browser would) passes the CP's handshake.
    if Command::new("openssl").arg("version").output().is_err() {
        println!("skipped: openssl is not installed, and it is the independent reader of the bundle here");
        return;
    }
    let f = fleet();
    let alice = f.pki.issued(&["--name", "alice", "--role", "operator"]);
    let p12 = f.pki.dir.join("alice.p12");
    let out = export(&f.pki, "alice", &p12, Some("correct horse battery"));
    assert_exit(&out, 0);
    assert_eq!(mode(&p12), 0o600, "the bundle holds a private key");

    let info = openssl_pkcs12(&p12, "correct horse battery", &["-info", "-nokeys"]).expect("openssl reads it");
    let info = String::from_utf8_lossy(&info);
    assert!(info.contains("PBES2, PBKDF2, AES-256-CBC") && info.contains("MAC: sha256"), "{info}");
    let leaf = openssl_pkcs12(&p12, "correct horse battery", &["-nokeys", "-clcerts"]).expect("the certificate");
    let cas = openssl_pkcs12(&p12, "correct horse battery", &["-nokeys", "-cacerts"]).expect("the CA");
    let key = openssl_pkcs12(&p12, "correct horse battery", &["-nocerts", "-noenc"]).expect("the key");
    let first = |pem: &[u8]| CertificateDer::pem_slice_iter(pem).next().expect("a certificate").expect("PEM");
    assert_eq!(first(&leaf), tls::load_certs(&alice.cert).expect("load")[0], "alice's certificate");
    assert_eq!(first(&cas), tls::load_certs(&f.pki.path("ca.crt")).expect("load")[0], "the CA certificate");

    // The identity as it comes out of the bundle, in a real mutual-TLS handshake with the CP's config.
    let back = CertKeyFiles { cert: f.pki.dir.join("back.crt"), key: f.pki.dir.join("back.key") };
    fs_err::write(&back.cert, &leaf).expect("write");
    fs_err::write(&back.key, &key).expect("write");
    let ca = f.pki.path("ca.crt");
    let (server, client) = connect(cp_server(&f.cp, &ca), agent_client(&ca, Some(&back)), "cp.test").await;
    client.expect("client side");
    let seen = server.expect("server side");
    assert_eq!((seen.role, seen.common_name.as_deref()), (Some(Role::Operator), Some("alice")));

    let wrong = openssl_pkcs12(&p12, "not the password", &["-info", "-nokeys"]).expect_err("a wrong password");
    assert!(wrong.contains("verify error") || wrong.contains("mac"), "{wrong}");
}

#[test]
fn pki_export_refuses_without_a_good_password_for_a_non_operator_and_over_an_existing_file() {
    // Proves each refusal exits 1 naming the problem and leaves no file; an existing bundle is never replaced.
    let f = fleet();
    f.pki.issued(&["--name", "alice", "--role", "operator"]);
    let out_path = |name: &str| f.pki.dir.join(name);
    let cases: Vec<(&str, Option<&str>, &str)> = vec![
        ("alice", None, "no password: set NIXFLEET_P12_PASSWORD or run on a terminal"),
        ("alice", Some("short"), "the password is shorter than 8 characters"),
        ("web1", Some("long enough"), "web1.crt is a host certificate: only an operator certificate"),
        ("cp", Some("long enough"), "cp.crt is a cp certificate"),
        ("bob", Some("long enough"), "bob.crt"),
    ];
    for (name, password, message) in cases {
        let out = export(&f.pki, name, &out_path("x.p12"), password);
        assert_exit(&out, 1);
        assert!(stderr(&out).contains(message), "{name}: {} should contain {message:?}", stderr(&out));
        assert!(!out_path("x.p12").exists(), "{name}: a refused export wrote a file");
    }
    fs_err::write(out_path("kept.p12"), b"earlier").expect("write");
    let out = export(&f.pki, "alice", &out_path("kept.p12"), Some("long enough"));
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("refusing to overwrite existing"), "{}", stderr(&out));
    assert_eq!(fs_err::read(out_path("kept.p12")).expect("read"), b"earlier");
}

/// `pki export` on a terminal: `script` (util-linux) gives it a pseudo-terminal
/// as stdin; each answer is typed once its prompt has been shown. Returns
/// everything the terminal showed, and the exit code.
fn export_on_a_terminal(pki: &Pki, out: &Path, answers: &[&str]) -> (String, Option<i32>) {
    use std::io::{Read as _, Write as _};
    let command = format!(
        "{} pki export --dir {} --name alice --out {}",
        env!("CARGO_BIN_EXE_nixfleet"),
        pki.dir.display(),
        out.display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("NIXFLEET_P12_PASSWORD")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run script");
    let shown = Arc::new(std::sync::Mutex::new(String::new()));
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = {
        let shown = Arc::clone(&shown);
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                shown.lock().expect("lock").push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let mut stdin = child.stdin.take().expect("stdin");
    for (prompt, answer) in ["password for the bundle: ", "again: "].iter().zip(answers) {
        crate::harness::wait_for(prompt, || shown.lock().expect("lock").contains(prompt).then_some(()));
        stdin.write_all(format!("{answer}\n").as_bytes()).expect("type");
    }
    drop(stdin);
    let status = child.wait().expect("wait");
    reader.join().expect("reader");
    let shown = shown.lock().expect("lock").clone();
    (shown, status.code())
}

#[test]
fn pki_export_asks_twice_on_a_terminal_without_echoing_the_password() {
    // Proves the interactive path: both prompts, nothing typed is echoed, the bundle opens with what was typed,
    // and two different answers write nothing.
    if Command::new("script").arg("--version").output().is_err()
        || Command::new("openssl").arg("version").output().is_err()
    {
        println!("skipped: needs `script` (util-linux) for a terminal and openssl to read the bundle");
        return;
    }
    let pki = Pki::init();
    pki.issued(&["--name", "alice", "--role", "operator"]);
    let p12 = pki.dir.join("typed.p12");
    let (shown, code) = export_on_a_terminal(&pki, &p12, &["typed secret 1", "typed secret 1"]);
    assert_eq!(code, Some(0), "{shown}");
    assert!(!shown.contains("typed secret"), "the password was echoed: {shown:?}");
    assert!(shown.contains("wrote ") && shown.contains("typed.p12"), "{shown}");
    openssl_pkcs12(&p12, "typed secret 1", &["-info", "-nokeys"]).expect("the typed password opens it");

    let other = pki.dir.join("differ.p12");
    let (shown, code) = export_on_a_terminal(&pki, &other, &["typed secret 1", "typed secret 2"]);
    assert_eq!(code, Some(1), "{shown}");
    assert!(shown.contains("the two passwords differ"), "{shown}");
    assert!(!other.exists(), "nothing is written");
}
