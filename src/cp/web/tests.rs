//! Escaping, link segments, the deferral flag, ages and the script policy.
use super::*;

#[test]
fn escaping_leaves_no_markup() {
    let hostile = "<script>alert('x')</script><img src=x onerror=\"y\">&amp;";
    let escaped = esc(hostile);
    assert_eq!(
        escaped,
        "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&lt;img src=x onerror=&quot;y&quot;&gt;&amp;amp;"
    );
    assert!(!escaped.contains(['<', '>', '"', '\'']));
}

#[test]
fn link_segments_are_percent_encoded() {
    assert_eq!(seg("stable@2026-11-25.1"), "stable@2026-11-25.1");
    assert_eq!(seg("a b/\"<"), "a%20b%2F%22%3C");
}

#[test]
fn a_deferral_is_long_from_the_limit_on() {
    assert!(!is_long_deferral(LONG_DEFERRAL_SECS - 1));
    assert!(is_long_deferral(LONG_DEFERRAL_SECS));
}

#[test]
fn ages_read_like_a_person_writes_them() {
    assert_eq!(age(40), "40s");
    assert_eq!(age(302), "5m 2s");
    assert_eq!(age(3 * 3600 + 120), "3h 2m");
    assert_eq!(age(2 * 86_400 + 3600), "2d 1h");
}

#[test]
fn the_policy_allows_exactly_the_inline_script() {
    let policy = csp();
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(SCRIPT.as_bytes()));
    assert!(policy.contains(&format!("script-src 'sha256-{hash}'")), "{policy}");
    assert!(policy.starts_with("default-src 'none'"));
    let page = document("t", "<main id=\"main\"></main>");
    assert!(page.contains(&format!("<script>{SCRIPT}</script>")), "the hashed bytes are the served bytes");
}
