//! Runs the chaos script (`scripts/chaos.py`) briefly against the real
//! binary: processes killed and frozen at random under load, then every
//! promise checked. The script's own last line is the verdict.

#[test]
fn a_short_chaos_run_loses_and_doubles_nothing() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("python3")
        .arg(format!("{root}/scripts/chaos.py"))
        .args(["--duration", "8", "--workers", "4", "--settle", "60"])
        .args(["--binary", env!("CARGO_BIN_EXE_restaurant")])
        .output()
        .expect("python3 runs (it is part of the test toolchain)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().unwrap_or_default();
    assert!(out.status.success(), "chaos run failed: {last}");
    assert!(
        last.starts_with("orders: ") && last.contains(" 0 lost, 0 doubled, stock balanced: yes"),
        "{last}"
    );
    let acked: u64 = last["orders: ".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(acked > 0, "the run placed orders");
}
