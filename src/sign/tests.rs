//! Tests for the signing module: PAE vectors, envelope round trips and
//! tampering, key text and key files.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::Signer as _;
use sha2::{Digest as _, Sha256};

use super::keys::{hex_lower, KEY_BYTES};
use super::*;
use std::os::unix::fs::PermissionsExt as _;

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd-length hex {s:?}");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("valid hex digit")).collect()
}

fn seed(s: &str) -> [u8; KEY_BYTES] {
    hex(s).try_into().expect("32-byte seed")
}

/// Checks one RFC 8032 §7.1 vector: seed → public key, and the
/// deterministic signature, byte for byte.
fn check_rfc8032(seed_hex: &str, public_hex: &str, message: &[u8], sig_hex: &str) {
    let key = SigningKey::from_seed(&seed(seed_hex));
    assert_eq!(key.public_key().to_bytes().to_vec(), hex(public_hex));
    let sig = key.0.sign(message);
    assert_eq!(sig.to_bytes().to_vec(), hex(sig_hex));
    assert!(key.public_key().0.verify_strict(message, &sig).is_ok());
}

/// A small manifest-like payload; the bytes are opaque to this module.
const MANIFEST: &[u8] = br#"{"schema":1,"channel":"stable","ref":"2026-11-25.1"}"#;

// Proves the empty-message vector (RFC 8032 §7.1 TEST 1).
#[test]
fn rfc8032_test_1() {
    check_rfc8032(
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        b"",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    );
}

// Proves the one-byte-message vector (RFC 8032 §7.1 TEST 2).
#[test]
fn rfc8032_test_2() {
    check_rfc8032(
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        &hex("72"),
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    );
}

// Proves the two-byte-message vector (RFC 8032 §7.1 TEST 3).
#[test]
fn rfc8032_test_3() {
    check_rfc8032(
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        &hex("af82"),
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    );
}

// Proves the 64-byte-message vector (RFC 8032 §7.1 TEST SHA(abc)),
// whose message is SHA-512("abc").
#[test]
fn rfc8032_test_sha_abc() {
    let message = hex("ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
         2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f");
    assert_eq!(message, sha2::Sha512::digest(b"abc").to_vec());
    check_rfc8032(
        "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
        &message,
        "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
    );
}

// Proves PAE matches the DSSE specification's worked example.
#[test]
fn pae_matches_dsse_spec_vector() {
    assert_eq!(
        pae("http://example.com/HelloWorld", b"hello world"),
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
    );
}

// Proves an empty payload still gets its length field and separator.
#[test]
fn pae_of_empty_payload() {
    assert_eq!(pae(PAYLOAD_TYPE, b""), b"DSSEv1 37 application/vnd.nixfleet.rollout+json 0 ".to_vec());
}

// Proves lengths are byte counts, not character counts.
#[test]
fn pae_counts_bytes_not_chars() {
    assert_eq!(pae("é", b"x"), "DSSEv1 2 é 1 x".as_bytes().to_vec());
}

// Proves the keyid is 32 lowercase hex chars of sha256(public key).
#[test]
fn keyid_is_truncated_sha256_hex() {
    let key = SigningKey::from_seed(&seed("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"));
    let public = key.public_key();
    let keyid = public.keyid();
    assert_eq!(keyid.len(), 32);
    assert!(keyid.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
    let digest = Sha256::digest(public.to_bytes());
    let expected: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(keyid, expected);
    let other = generate().expect("randomness");
    assert_ne!(other.public_key().keyid(), keyid);
}

// Proves sign → JSON → parse → verify returns the exact payload bytes,
// including bytes that are not UTF-8.
#[test]
fn sign_verify_round_trip() {
    let key = generate().expect("randomness");
    let payload: Vec<u8> = MANIFEST.iter().copied().chain([0xff, 0x00, 0x80]).collect();
    let env = sign_envelope(&key, &payload);
    assert_eq!(env.payload_type, PAYLOAD_TYPE);
    assert_eq!(env.signatures.len(), 1);
    assert_eq!(env.signatures[0].keyid, key.public_key().keyid());

    let json = serde_json::to_vec(&env).expect("serialize envelope");
    let text = String::from_utf8(json.clone()).expect("JSON is UTF-8");
    assert!(text.contains(r#""payloadType":"application/vnd.nixfleet.rollout+json""#));
    let parsed = parse_envelope(&json).expect("parse envelope");
    assert_eq!(parsed, env);
    let verified = verify_envelope(&parsed, &[key.public_key()]).expect("verifies");
    assert_eq!(verified, payload);
}

// Proves one trusted key among several is enough, in any position.
#[test]
fn verify_finds_trusted_key_among_many() {
    let key = generate().expect("randomness");
    let others: Vec<PublicKey> = (0..3).map(|_| generate().expect("randomness").public_key()).collect();
    let mut trusted = others.clone();
    trusted.insert(1, key.public_key());
    let env = sign_envelope(&key, MANIFEST);
    assert_eq!(verify_envelope(&env, &trusted), Ok(MANIFEST.to_vec()));
}

// Proves the keyid is a hint: an empty or wrong keyid still verifies
// against the trusted key that actually signed.
#[test]
fn keyid_is_a_hint_not_trust() {
    let key = generate().expect("randomness");
    for keyid in ["", "0123456789abcdef0123456789abcdef"] {
        let mut env = sign_envelope(&key, MANIFEST);
        env.signatures[0].keyid = keyid.to_owned();
        assert_eq!(verify_envelope(&env, &[key.public_key()]), Ok(MANIFEST.to_vec()), "keyid {keyid:?}");
    }
}

// Proves a rotation envelope (old untrusted key + new trusted key)
// verifies whichever signature comes first.
#[test]
fn any_valid_signature_is_enough() {
    let old = generate().expect("randomness");
    let new = generate().expect("randomness");
    let mut env = sign_envelope(&old, MANIFEST);
    let new_sig = sign_envelope(&new, MANIFEST).signatures.remove(0);
    env.signatures.push(new_sig);
    assert_eq!(verify_envelope(&env, &[new.public_key()]), Ok(MANIFEST.to_vec()));
    env.signatures.reverse();
    assert_eq!(verify_envelope(&env, &[new.public_key()]), Ok(MANIFEST.to_vec()));
}

// Proves a payload changed after signing is refused as a bad signature
// by the named trusted key.
#[test]
fn rejects_tampered_payload() {
    let key = generate().expect("randomness");
    let mut env = sign_envelope(&key, MANIFEST);
    let mut payload = BASE64.decode(&env.payload).expect("own payload decodes");
    payload[5] ^= 0x01;
    env.payload = BASE64.encode(&payload);
    assert_eq!(
        verify_envelope(&env, &[key.public_key()]),
        Err(VerifyError::BadSignature { keyid: key.public_key().keyid() })
    );
}

// Proves a signature by a key that is not trusted is refused and the
// error lists the keyid it carried.
#[test]
fn rejects_wrong_key() {
    let signer = generate().expect("randomness");
    let trusted = generate().expect("randomness").public_key();
    let env = sign_envelope(&signer, MANIFEST);
    assert_eq!(
        verify_envelope(&env, &[trusted]),
        Err(VerifyError::UnknownKey { keyids: vec![signer.public_key().keyid()] })
    );
    assert_eq!(verify_envelope(&env, &[]), Err(VerifyError::UnknownKey { keyids: vec![signer.public_key().keyid()] }));
}

// Proves a changed payloadType is refused before any signature check.
#[test]
fn rejects_wrong_payload_type() {
    let key = generate().expect("randomness");
    let mut env = sign_envelope(&key, MANIFEST);
    env.payload_type = "application/vnd.in-toto+json".to_owned();
    assert_eq!(
        verify_envelope(&env, &[key.public_key()]),
        Err(VerifyError::WrongPayloadType { got: "application/vnd.in-toto+json".to_owned() })
    );
}

// Proves a payload that is not base64 is refused as such.
#[test]
fn rejects_garbage_payload_base64() {
    let key = generate().expect("randomness");
    let mut env = sign_envelope(&key, MANIFEST);
    env.payload = "not base64!!".to_owned();
    assert_eq!(verify_envelope(&env, &[key.public_key()]), Err(VerifyError::BadPayloadEncoding));
}

// Proves a sig field that is not base64 is refused, naming its keyid.
#[test]
fn rejects_garbage_signature_base64() {
    let key = generate().expect("randomness");
    let mut env = sign_envelope(&key, MANIFEST);
    env.signatures[0].sig = "%%%".to_owned();
    assert_eq!(
        verify_envelope(&env, &[key.public_key()]),
        Err(VerifyError::BadSignatureEncoding { keyid: key.public_key().keyid() })
    );
}

// Proves a signature that decodes to anything but 64 bytes is refused.
#[test]
fn rejects_signature_of_wrong_length() {
    let key = generate().expect("randomness");
    let mut env = sign_envelope(&key, MANIFEST);
    let sig = BASE64.decode(&env.signatures[0].sig).expect("own sig decodes");
    for bad in [&sig[..63], &[sig.as_slice(), &[0]].concat()[..], &[][..]] {
        env.signatures[0].sig = BASE64.encode(bad);
        assert_eq!(
            verify_envelope(&env, &[key.public_key()]),
            Err(VerifyError::BadSignatureEncoding { keyid: key.public_key().keyid() }),
            "length {}",
            bad.len()
        );
    }
}

// Proves one malformed signature spoils the envelope even when another
// signature would verify.
#[test]
fn malformed_signature_refuses_whole_envelope() {
    let key = generate().expect("randomness");
    let mut env = sign_envelope(&key, MANIFEST);
    env.signatures.push(Signature { keyid: "junk".to_owned(), sig: "AAAA".to_owned() });
    assert_eq!(
        verify_envelope(&env, &[key.public_key()]),
        Err(VerifyError::BadSignatureEncoding { keyid: "junk".to_owned() })
    );
}

// Proves an envelope without signatures is refused.
#[test]
fn rejects_empty_signatures() {
    let key = generate().expect("randomness");
    let mut env = sign_envelope(&key, MANIFEST);
    env.signatures.clear();
    assert_eq!(verify_envelope(&env, &[key.public_key()]), Err(VerifyError::NoSignatures));
}

// Proves the signature-count limit is enforced before any verification.
#[test]
fn rejects_too_many_signatures() {
    let key = generate().expect("randomness");
    let mut env = sign_envelope(&key, MANIFEST);
    let sig = env.signatures[0].clone();
    env.signatures = vec![sig; MAX_SIGNATURES + 1];
    assert_eq!(
        verify_envelope(&env, &[key.public_key()]),
        Err(VerifyError::TooManySignatures { count: MAX_SIGNATURES + 1, limit: MAX_SIGNATURES })
    );
    env.signatures.truncate(MAX_SIGNATURES);
    assert_eq!(verify_envelope(&env, &[key.public_key()]), Ok(MANIFEST.to_vec()));
}

// Proves bad JSON and missing or mistyped fields are Malformed.
#[test]
fn rejects_malformed_json() {
    for input in [
        &b"not json"[..],
        b"",
        br#"{"payloadType":"x","payload":"AA=="}"#,
        br#"{"payload_type":"x","payload":"AA==","signatures":[]}"#,
        br#"{"payloadType":"x","payload":"AA==","signatures":[{"keyid":"k"}]}"#,
        br#"{"payloadType":1,"payload":"AA==","signatures":[]}"#,
        br#"[]"#,
    ] {
        assert!(
            matches!(parse_envelope(input), Err(VerifyError::Malformed { .. })),
            "input {:?}",
            String::from_utf8_lossy(input)
        );
    }
}

// Proves both key texts round-trip and tolerate the file's newline.
#[test]
fn key_text_round_trip() {
    let key = generate().expect("randomness");
    let secret_text = key.to_text();
    let public_text = key.public_key().to_text();
    assert!(secret_text.starts_with("nixfleet-ed25519-secret-v1:"));
    assert!(public_text.starts_with("nixfleet-ed25519-public-v1:"));
    assert!(!secret_text.contains('\n') && !public_text.contains('\n'));

    for text in [secret_text.clone(), format!("{secret_text}\n")] {
        let parsed = SigningKey::from_text(&text).expect("secret parses");
        assert_eq!(parsed.public_key(), key.public_key());
        assert_eq!(parsed.to_text(), secret_text);
    }
    for text in [public_text.clone(), format!("{public_text}\r\n")] {
        let parsed = PublicKey::from_text(&text).expect("public parses");
        assert_eq!(parsed, key.public_key());
    }
}

// Proves Debug output names the key but never prints the secret seed.
#[test]
fn debug_does_not_leak_secret() {
    let key = generate().expect("randomness");
    let printed = format!("{key:?}");
    let seed_b64 = BASE64.encode(key.0.to_bytes());
    assert!(printed.contains(&key.public_key().keyid()));
    assert!(!printed.contains(&seed_b64));
    assert!(!printed.contains(&hex_lower(&key.0.to_bytes())));
}

// Proves each kind of bad key text gets its own, specific error.
#[test]
fn rejects_bad_key_text() {
    let key = generate().expect("randomness");
    assert!(matches!(PublicKey::from_text(&key.to_text()), Err(SignError::SecretKeyGivenAsPublic { .. })));
    assert!(matches!(
        SigningKey::from_text(&key.public_key().to_text()),
        Err(SignError::PublicKeyGivenAsSecret { .. })
    ));
    let cases = [
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI",
        "",
        "nixfleet-ed25519-public-v1:not base64!",
        "nixfleet-ed25519-public-v1:AAAA",
    ];
    for text in cases {
        assert!(
            matches!(PublicKey::from_text(text), Err(SignError::BadKeyText { expected: "public", .. })),
            "public {text:?}"
        );
    }
    // 32 bytes that decode to the identity point, which has small order.
    match PublicKey::from_text("nixfleet-ed25519-public-v1:AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=") {
        Err(SignError::BadKeyText { reason, .. }) => assert!(reason.contains("small-order")),
        other => panic!("expected weak key refusal, got {other:?}"),
    }
    for text in
        ["nixfleet-ed25519-secret-v1:AAAA", "nixfleet-ed25519-secret-v1:@@@@", " nixfleet-ed25519-secret-v1:AAAA"]
    {
        assert!(
            matches!(SigningKey::from_text(text), Err(SignError::BadKeyText { expected: "secret", .. })),
            "secret {text:?}"
        );
    }
}

// Proves write_keypair writes loadable files with 0600/0644 modes and
// never overwrites an existing key.
#[test]
fn write_keypair_modes_and_no_overwrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = dir.path().join("release.2026");
    let (key_path, pub_path) = write_keypair(&prefix).expect("write keypair");
    assert_eq!(key_path, dir.path().join("release.2026.key"));
    assert_eq!(pub_path, dir.path().join("release.2026.pub"));

    let mode = |p: &Path| std::fs::metadata(p).expect("stat key file").permissions().mode() & 0o777;
    assert_eq!(mode(&key_path), 0o600);
    assert_eq!(mode(&pub_path), 0o644);

    let key_text = std::fs::read_to_string(&key_path).expect("read key");
    assert!(key_text.ends_with('\n'));
    let key = SigningKey::load(&key_path).expect("load secret");
    let public = PublicKey::load(&pub_path).expect("load public");
    assert_eq!(key.public_key(), public);

    match write_keypair(&prefix) {
        Err(SignError::KeyExists { path }) => assert_eq!(path, key_path),
        other => panic!("expected KeyExists, got {other:?}"),
    }
    assert_eq!(std::fs::read_to_string(&key_path).expect("re-read key"), key_text);
}

// Proves an existing .pub alone also blocks generation and leaves no
// orphan .key behind.
#[test]
fn write_keypair_refuses_existing_pub_without_leftovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = dir.path().join("release");
    let pub_path = dir.path().join("release.pub");
    std::fs::write(&pub_path, "keep me\n").expect("write pub");
    match write_keypair(&prefix) {
        Err(SignError::KeyExists { path }) => assert_eq!(path, pub_path),
        other => panic!("expected KeyExists, got {other:?}"),
    }
    assert!(!dir.path().join("release.key").exists());
    assert_eq!(std::fs::read_to_string(&pub_path).expect("re-read pub"), "keep me\n");
}

// Proves loading a secret key file as a trust key fails with the
// dedicated error naming the file, and vice versa.
#[test]
fn key_files_of_the_wrong_kind_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key_path, pub_path) = write_keypair(&dir.path().join("k")).expect("write keypair");
    match PublicKey::load(&key_path) {
        Err(err @ SignError::SecretKeyGivenAsPublic { .. }) => {
            assert!(err.to_string().contains(&key_path.display().to_string()));
        }
        other => panic!("expected SecretKeyGivenAsPublic, got {other:?}"),
    }
    assert!(matches!(SigningKey::load(&pub_path), Err(SignError::PublicKeyGivenAsSecret { .. })));
}

// Proves load errors carry the path: missing file, oversized file,
// binary file.
#[test]
fn load_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.pub");
    let err = PublicKey::load(&missing).expect_err("missing file");
    assert!(matches!(err, SignError::Io(_)));
    assert!(err.to_string().contains(&missing.display().to_string()));

    let big = dir.path().join("big.pub");
    std::fs::write(&big, vec![b'A'; 5000]).expect("write big");
    assert!(matches!(
        PublicKey::load(&big),
        Err(SignError::KeyFileTooLarge { path, .. }) if path == big
    ));

    let binary = dir.path().join("binary.key");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).expect("write binary");
    let err = SigningKey::load(&binary).expect_err("binary file");
    assert!(matches!(err, SignError::BadKeyText { .. }));
    assert!(err.to_string().contains(&binary.display().to_string()));
}

// Proves the error messages name the field or keyid involved.
#[test]
fn verify_error_messages_name_the_culprit() {
    let keyid = "00112233445566778899aabbccddeeff".to_owned();
    let messages = [
        VerifyError::WrongPayloadType { got: "text/plain".to_owned() }.to_string(),
        VerifyError::BadSignatureEncoding { keyid: keyid.clone() }.to_string(),
        VerifyError::BadSignature { keyid: keyid.clone() }.to_string(),
        VerifyError::UnknownKey { keyids: vec![keyid.clone()] }.to_string(),
    ];
    assert!(messages[0].contains("text/plain") && messages[0].contains(PAYLOAD_TYPE));
    for message in &messages[1..] {
        assert!(message.contains(&keyid), "{message}");
    }
}
