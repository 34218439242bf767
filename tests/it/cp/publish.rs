//! Publishing signed manifests: signature and manifest checks, idempotence,
//! conflicts.

use super::*;

/// Publishing verifies the signature and the manifest, is idempotent for the
/// same bytes, and refuses other bytes under the same id with 409.
#[test]
fn publish_verifies_signatures_and_is_idempotent() {
    let (dir, release, cp) = setup("publish");
    let other = Release::new(dir.path(), "stranger");
    rt().block_on(async {
        let good = two_waves("stable@r1", T0, 0);
        let envelope = release.sign(&good);
        let resp = cp.publish(&envelope).await;
        assert_eq!(resp.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&resp.body));
        assert_eq!(cp.publish(&envelope).await.status, StatusCode::OK, "identical re-publish is a no-op");

        let conflicting = release.sign(&two_waves("stable@r1", T1, 0));
        let resp = cp.publish(&conflicting).await;
        assert_eq!(resp.status, StatusCode::CONFLICT);
        assert!(resp.error().to_string().contains("different manifest bytes"), "{}", resp.error());

        let unknown_key = other.sign(&two_waves("stable@r2", T1, 0));
        assert_eq!(cp.publish(&unknown_key).await.status, StatusCode::FORBIDDEN);

        let mut tampered: serde_json::Value =
            serde_json::from_slice(&release.sign(&two_waves("stable@r3", T1, 0))).unwrap();
        let evil = two_waves("stable@r3", T1, 5);
        tampered["payload"] = base64_encode(evil.as_bytes()).into();
        let resp = cp.publish(tampered.to_string().as_bytes()).await;
        assert_eq!(resp.status, StatusCode::FORBIDDEN, "tampered payload");
        assert!(resp.error().to_string().contains("does not verify"), "{}", resp.error());

        let mut bad_sig: serde_json::Value =
            serde_json::from_slice(&release.sign(&two_waves("stable@r4", T1, 0))).unwrap();
        let sig = bad_sig["signatures"][0]["sig"].as_str().unwrap().to_owned();
        let flipped = match sig.strip_prefix('A') {
            Some(rest) => format!("B{rest}"),
            None => format!("A{}", &sig[1..]),
        };
        bad_sig["signatures"][0]["sig"] = flipped.into();
        assert_eq!(cp.publish(bad_sig.to_string().as_bytes()).await.status, StatusCode::FORBIDDEN, "bad signature");

        let invalid = release.sign(&good.replace("\"max_in_flight\":1", "\"max_in_flight\":0"));
        let resp = cp.publish(&invalid).await;
        assert_eq!(resp.status, StatusCode::BAD_REQUEST);
        assert!(resp.error().to_string().contains("max_in_flight"), "{}", resp.error());

        assert_eq!(cp.publish(b"{not json").await.status, StatusCode::BAD_REQUEST);

        let rollouts = cp.get_json("/v1/rollouts").await;
        let ids: Vec<&str> = rollouts.as_array().unwrap().iter().map(|r| r["rollout_id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["stable@r1"], "only the good manifest was stored");
        let stored = cp.get("/v1/rollouts/stable%40r1/manifest").await;
        assert_eq!(stored.body.as_ref(), envelope.as_slice(), "the envelope is served as published");
    });
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
