//! The release engineer's commands as a user types them: keygen, manifest
//! check, sign and verify, with their exit codes and messages.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;

use crate::harness::TempDir;

/// The example manifest shipped in `examples/`, so the docs and the tests agree.
const MANIFEST: &str = include_str!("../../examples/manifest.json");

fn nixfleet(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nixfleet"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run nixfleet")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_exit(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "stdout: {}\nstderr: {}", stdout(o), stderr(o));
}

/// A temp dir with a key pair `rel`, a manifest and its signed envelope.
struct Signed {
    dir: TempDir,
}

impl Signed {
    fn new() -> Signed {
        let dir = TempDir::new("cli-signed");
        fs_err::write(dir.path().join("manifest.json"), MANIFEST).expect("write manifest");
        assert_exit(&nixfleet(dir.path(), &["keygen", "--out", "rel"]), 0);
        let signed = nixfleet(dir.path(), &["manifest", "sign", "--key", "rel.key", "manifest.json"]);
        assert_exit(&signed, 0);
        fs_err::write(dir.path().join("signed.json"), &signed.stdout).expect("write envelope");
        Signed { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn envelope(&self) -> serde_json::Value {
        serde_json::from_slice(&fs_err::read(self.path("signed.json")).expect("read")).expect("json")
    }
    fn write_envelope(&self, name: &str, v: &serde_json::Value) {
        fs_err::write(self.path(name), v.to_string()).expect("write");
    }
    fn verify(&self, file: &str) -> Output {
        nixfleet(self.dir.path(), &["manifest", "verify", "--trust-key", "rel.pub", file])
    }
}

#[test]
fn keygen_writes_a_private_key_and_never_overwrites_it() {
    // Proves the key file modes and that a second keygen keeps the old key.
    let dir = TempDir::new("cli-keygen");
    let out = nixfleet(dir.path(), &["keygen", "--out", "release"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("keyid: "), "{}", stdout(&out));
    let key = dir.path().join("release.key");
    let mode = fs_err::metadata(&key).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let before = fs_err::read(&key).expect("read");
    let again = nixfleet(dir.path(), &["keygen", "--out", "release"]);
    assert_exit(&again, 1);
    assert!(stderr(&again).contains("refusing to overwrite existing key file"), "{}", stderr(&again));
    assert_eq!(fs_err::read(&key).expect("read"), before);
}

#[test]
fn sign_then_verify_prints_the_exact_manifest_bytes() {
    // Proves the round trip a release pipeline relies on: verify outputs the
    // very bytes that were signed.
    let s = Signed::new();
    let env = s.envelope();
    assert_eq!(env["payloadType"], "application/vnd.nixfleet.rollout+json");
    assert_eq!(env["signatures"].as_array().map(Vec::len), Some(1));
    let out = s.verify("signed.json");
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), MANIFEST);
}

#[test]
fn verify_refuses_an_untrusted_key_a_tampered_payload_a_wrong_type_and_garbage() {
    // Proves each way an envelope can be bad is refused with its own message
    // and exit code 1, and nothing is printed on stdout.
    let s = Signed::new();
    assert_exit(&nixfleet(s.dir.path(), &["keygen", "--out", "other"]), 0);
    let out = nixfleet(s.dir.path(), &["manifest", "verify", "--trust-key", "other.pub", "signed.json"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("no signature is from a trusted key"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());

    let b64 = base64::engine::general_purpose::STANDARD;
    let mut tampered = s.envelope();
    let changed = MANIFEST.replace("max_failed_hosts\": 0", "max_failed_hosts\": 9");
    tampered["payload"] = b64.encode(changed).into();
    s.write_envelope("tampered.json", &tampered);

    let mut wrong_type = s.envelope();
    wrong_type["payloadType"] = "application/json".into();
    s.write_envelope("wrong-type.json", &wrong_type);

    let mut garbage = s.envelope();
    garbage["payload"] = "%%% not base64 %%%".into();
    s.write_envelope("garbage.json", &garbage);

    let mut bad_sig = s.envelope();
    bad_sig["signatures"][0]["sig"] = "AAAA".into();
    s.write_envelope("bad-sig.json", &bad_sig);

    fs_err::write(s.path("not-json.json"), "{").expect("write");

    for (file, needle) in [
        ("tampered.json", "does not verify"),
        ("wrong-type.json", "payloadType"),
        ("garbage.json", "base64"),
        ("bad-sig.json", "is not 64 bytes"),
        ("not-json.json", "not a valid DSSE envelope"),
    ] {
        let out = s.verify(file);
        assert_exit(&out, 1);
        assert!(stderr(&out).contains(needle), "{file}: {}", stderr(&out));
        assert!(stderr(&out).contains(file), "the error names the file: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{file}");
    }
}

#[test]
fn signing_refuses_an_invalid_manifest_naming_the_field() {
    // Proves a signature is never put on a manifest the CP would refuse.
    let s = Signed::new();
    fs_err::write(s.path("bad.json"), MANIFEST.replace("\"wave\": 1", "\"wave\": 7")).expect("write");
    let out = nixfleet(s.dir.path(), &["manifest", "sign", "--key", "rel.key", "bad.json"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("hosts.web-2.wave"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let out = nixfleet(s.dir.path(), &["manifest", "sign", "--key", "rel.pub", "manifest.json"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("holds a nixfleet public key"), "{}", stderr(&out));
}

#[test]
fn manifest_check_summarises_and_usage_errors_exit_2() {
    // Proves `manifest check` output and the usage exit code.
    let s = Signed::new();
    let out = nixfleet(s.dir.path(), &["manifest", "check", "manifest.json"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("rollout stable@2026-11-25.1"), "{text}");
    assert!(text.contains("wave 1 \"rest\": soak 600s, max_in_flight 10, 1 hosts: web-2"), "{text}");
    let out = nixfleet(s.dir.path(), &["manifest", "check", "--json", "manifest.json"]);
    assert_exit(&out, 0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["hosts"]["web-1"]["wave"], 0);
    assert_exit(&nixfleet(s.dir.path(), &["manifest", "verify", "signed.json"]), 2);
    assert_exit(&nixfleet(s.dir.path(), &["frobnicate"]), 2);
    let missing = nixfleet(s.dir.path(), &["manifest", "check", "nope.json"]);
    assert_exit(&missing, 1);
    assert!(stderr(&missing).contains("nope.json"), "{}", stderr(&missing));
}

#[test]
fn closures_follow_nix_store_dir_and_a_bad_one_is_refused_before_anything_runs() {
    // NIX_STORE_DIR, as Nix reads it, names the store a closure must be in:
    // the example manifest (/nix/store) is refused under another store dir
    // and the same manifest moved there is accepted; a value that is not an
    // absolute directory with one spelling is a usage error naming it.
    let dir = TempDir::new("cli-store-dir");
    fs_err::write(dir.path().join("nix.json"), MANIFEST).expect("write manifest");
    let moved = MANIFEST.replace("\"/nix/store/", "\"/srv/fleet/store/");
    fs_err::write(dir.path().join("srv.json"), moved).expect("write manifest");
    let check = |store_dir: Option<&str>, file: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixfleet"));
        cmd.args(["manifest", "check", file]).current_dir(dir.path()).env_remove("NIX_STORE_DIR");
        if let Some(store_dir) = store_dir {
            cmd.env("NIX_STORE_DIR", store_dir);
        }
        cmd.output().expect("run nixfleet")
    };
    assert_exit(&check(None, "nix.json"), 0);
    assert_exit(&check(Some("/nix/store"), "nix.json"), 0);
    assert_exit(&check(Some("/srv/fleet/store"), "srv.json"), 0);
    let refused = check(Some("/srv/fleet/store"), "nix.json");
    assert_exit(&refused, 1);
    let text = stderr(&refused);
    assert!(text.contains("hosts.web-1.target_closure"), "{text}");
    assert!(text.contains("must start with /srv/fleet/store/ (the store directory NIX_STORE_DIR names)"), "{text}");
    let refused = check(None, "srv.json");
    assert_exit(&refused, 1);
    assert!(stderr(&refused).contains("must start with /nix/store/"), "{}", stderr(&refused));
    for (bad, why) in [
        ("", "must be an absolute path"),
        ("srv/fleet/store", "must be an absolute path"),
        ("/srv/fleet/store/", "must not end with /"),
        ("/srv/../nix/store", "must not contain . or .. components"),
        ("/srv//store", "must not contain an empty component"),
    ] {
        let out = check(Some(bad), "nix.json");
        assert_exit(&out, 2);
        let text = stderr(&out);
        assert!(text.contains(&format!("NIX_STORE_DIR={bad:?} is not a usable Nix store directory: {why}")), "{text}");
        assert!(out.stdout.is_empty(), "{bad:?}: the command ran");
    }
}

#[test]
fn sim_usage_errors_exit_2_and_a_run_names_what_it_checked() {
    // Proves `nixfleet sim` keeps exit 1 for a broken invariant only: a bad
    // --until, --hosts 0, an unreadable or invalid --manifest are usage
    // errors (2) naming the problem; a small run exits 0 and lists the
    // invariants it checked and each wave's settled time.
    let dir = TempDir::new("cli-sim");
    let bad_until = nixfleet(dir.path(), &["sim", "--hosts", "2", "--until", "5d"]);
    assert_exit(&bad_until, 2);
    assert!(
        stderr(&bad_until).contains("--until") && stderr(&bad_until).contains("unknown unit"),
        "{}",
        stderr(&bad_until)
    );
    let overflow = nixfleet(dir.path(), &["sim", "--hosts", "2", "--until", "99999999999999999999h"]);
    assert_exit(&overflow, 2);
    let no_hosts = nixfleet(dir.path(), &["sim", "--hosts", "0"]);
    assert_exit(&no_hosts, 2);
    assert!(stderr(&no_hosts).contains("at least 1 host"), "{}", stderr(&no_hosts));
    let missing = nixfleet(dir.path(), &["sim", "--manifest", "nope.json"]);
    assert_exit(&missing, 2);
    assert!(stderr(&missing).contains("--manifest") && stderr(&missing).contains("nope.json"), "{}", stderr(&missing));
    fs_err::write(dir.path().join("bad.json"), "{\"rollout_id\": 3}").expect("write");
    let invalid = nixfleet(dir.path(), &["sim", "--manifest", "bad.json"]);
    assert_exit(&invalid, 2);
    assert!(stderr(&invalid).contains("bad.json"), "{}", stderr(&invalid));
    let ok = nixfleet(dir.path(), &["sim", "--seed", "1", "--hosts", "3", "--faults", "none"]);
    assert_exit(&ok, 0);
    let out = stdout(&ok);
    assert!(out.contains("checked: one-live-rollout,") && out.contains(", drift"), "{out}");
    assert!(out.contains(", settled ") && !out.contains("promoted -"), "{out}");
}
