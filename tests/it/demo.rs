//! `nixfleet demo` as a new user runs it.

use std::process::Command;

#[test]
fn the_demo_rolls_out_two_waves_rolls_one_host_back_and_halts() {
    // Proves what `nixfleet demo --help` promises: a 2-wave rollout, the broken host rolls back by itself,
    // the rollout halts, and the final table says so. Without Nix the demo
    // must refuse with a message that says how to get it.
    let out = Command::new(env!("CARGO_BIN_EXE_nixfleet")).arg("demo").output().expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let has_nix = Command::new("nix-store").arg("--version").output().is_ok_and(|o| o.status.success());
    if !has_nix {
        println!("nix: absent; checking the demo's refusal");
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr.contains("nix-store --add"), "{stderr}");
        return;
    }
    println!("nix: real");
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for line in [
        "control plane on https://127.0.0.1:",
        "(mutual TLS;",
        "rollout converging (wave 1)",
        "web-1  Soaking -> Converged",
        "rollout halted (wave 1): 1 host(s) failed (web-3)",
        "web-3   1     Reverted    old",
        "web-1   0     Converged   new",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}
