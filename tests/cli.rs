//! The binary's maintenance commands, run as a user runs them. Needs NATS
//! with JetStream at `NATS_URL` (scripts/services.sh starts it); fails,
//! never skips, if it is not there.

use restaurant_platform::bus::{NatsBus, delete_nats_stream};

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Benchmark and chaos runs each make a stream; `drop-stream` is how their
/// scripts remove it (before it existed, every distributed run left its
/// events on disk: 68 streams, 7.8 GB on one machine).
#[tokio::test]
async fn drop_stream_deletes_the_stream_and_fails_for_one_that_is_not_there() {
    let stream = format!("rt_cli_{}", restaurant_contract::new_id().replace('-', ""));
    NatsBus::connect(&nats_url(), &stream)
        .await
        .expect("NATS with JetStream must be reachable at NATS_URL: run scripts/services.sh");
    let drop = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_restaurant"))
            .args([
                "drop-stream",
                "--nats-url",
                &nats_url(),
                "--stream",
                &stream,
            ])
            .output()
            .unwrap()
    };
    let first = drop();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        delete_nats_stream(&nats_url(), &stream).await.is_err(),
        "the stream is gone"
    );
    assert!(!drop().status.success(), "nothing to drop is an error");
}
