//! The JetStream transport keeps the bus's promises: publishing is
//! idempotent on the event id, a durable consumer resumes where it
//! acknowledged, and types a consumer does not want never reach it.
//! Needs NATS with JetStream at `NATS_URL` (scripts/services.sh starts it);
//! fails, never skips, if it is not there.

use std::time::Duration;

use restaurant_contract::{Cause, Envelope, Event, Reason, new_id};
use restaurant_platform::bus::{Bus, NatsBus, OutgoingEvent, delete_nats_stream};

fn url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn event(kind: &str) -> OutgoingEvent {
    let ev = match kind {
        "OrderRejected" => Event::OrderRejected(Reason { reason: "r".into() }),
        _ => Event::OrderCancelled(Reason { reason: "c".into() }),
    };
    let env = Envelope::new("test", &new_id(), &ev, &Cause::default());
    OutgoingEvent {
        event_id: env.event_id.clone(),
        order_id: env.order_id.clone(),
        event_type: env.event_type.clone(),
        payload: env.to_json(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_is_idempotent_and_consumers_resume_where_they_acked() {
    let stream = format!("rt_{}", new_id().replace('-', ""));
    let bus = Bus::Nats(Box::new(NatsBus::connect(&url(), &stream).await.expect(
        "NATS with JetStream must be reachable at NATS_URL: run scripts/services.sh",
    )));
    bus.ping().await.unwrap();
    let (a, b, other) = (
        event("OrderRejected"),
        event("OrderRejected"),
        event("OrderCancelled"),
    );
    bus.publish(&[a.clone(), other, b.clone()]).await.unwrap();
    // The relay republishing after a crash: the duplicate window drops it.
    bus.publish(std::slice::from_ref(&a)).await.unwrap();

    const TYPES: &[&str] = &["OrderRejected"];
    let mut sub = bus.subscribe("c1", TYPES).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let batch = sub.next_batch(10, Duration::from_secs(5)).await.unwrap();
        assert!(!batch.is_empty(), "timed out; got {}", got.len());
        for d in &batch {
            got.push(Envelope::from_json(d.payload.as_bytes()).unwrap().event_id);
            assert_eq!(d.attempt, 1);
        }
        sub.ack(&batch).await.unwrap();
    }
    assert_eq!(got, vec![a.event_id.clone(), b.event_id.clone()]);
    // Nothing more: the duplicate and the other type never arrive.
    assert!(
        sub.next_batch(10, Duration::from_millis(500))
            .await
            .unwrap()
            .is_empty()
    );

    // A new subscription under the same durable name starts after the acks.
    drop(sub);
    let c = event("OrderRejected");
    bus.publish(std::slice::from_ref(&c)).await.unwrap();
    let mut sub = bus.subscribe("c1", TYPES).await.unwrap();
    let batch = sub.next_batch(10, Duration::from_secs(5)).await.unwrap();
    let ids: Vec<String> = batch
        .iter()
        .map(|d| Envelope::from_json(d.payload.as_bytes()).unwrap().event_id)
        .collect();
    assert_eq!(ids, vec![c.event_id]);
    sub.ack(&batch).await.unwrap();
    delete_nats_stream(&url(), &stream).await.unwrap();
}
