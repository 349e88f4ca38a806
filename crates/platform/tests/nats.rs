//! The JetStream transport keeps the bus's promises: publishing is
//! idempotent on the event id, a durable consumer resumes where it
//! acknowledged, and types a consumer does not want never reach it.
//! Needs NATS with JetStream at `NATS_URL` (scripts/services.sh starts it);
//! fails, never skips, if it is not there.

use std::time::Duration;

use restaurant_contract::{Cause, Envelope, Event, Reason, new_id};
use restaurant_platform::bus::{Bus, Delivery, NatsBus, OutgoingEvent, delete_nats_stream};

fn url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn event(kind: &str) -> OutgoingEvent {
    let ev = match kind {
        "OrderRejected" => Event::OrderRejected(Reason { reason: "r".into() }),
        _ => Event::OrderCancelled(Reason { reason: "c".into() }),
    };
    let env = Envelope::new("test", &new_id(), &ev, &Cause::default());
    // Each its own outbox row: one message each.
    OutgoingEvent::new(&env, ROW.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

static ROW: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);

/// A bus on a stream of its own, and the stream's name.
async fn fresh_bus() -> (Bus, String) {
    let stream = format!("rt_{}", new_id().replace('-', ""));
    let bus = NatsBus::connect(&url(), &stream)
        .await
        .expect("NATS with JetStream must be reachable at NATS_URL: run scripts/services.sh");
    (Bus::Nats(std::sync::Arc::new(bus)), stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_is_idempotent_and_consumers_resume_where_they_acked() {
    let (bus, stream) = fresh_bus().await;
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

/// Events written in one outbox row as `row`.
fn in_row(row: i64, kinds: &[&str]) -> Vec<OutgoingEvent> {
    kinds
        .iter()
        .map(|kind| OutgoingEvent { row, ..event(kind) })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rows_events_travel_packed_and_a_message_is_acked_only_when_all_are_handled() {
    let (bus, stream) = fresh_bus().await;
    let js = async_nats::jetstream::new(async_nats::connect(url()).await.unwrap());
    let mut batch = in_row(
        1,
        &[
            "OrderRejected",
            "OrderCancelled",
            "OrderRejected",
            "OrderRejected",
        ],
    );
    batch.extend(in_row(2, &["OrderRejected"]));
    bus.publish(&batch).await.unwrap();
    // A relay publishing the rows again (its pass cut differently: the
    // second row alone) adds nothing: the packing is the row's own.
    bus.publish(&batch).await.unwrap();
    bus.publish(&batch[4..]).await.unwrap();
    let mut info = js.get_stream(&stream).await.unwrap();
    // Row 1: its three rejections, its cancellation; row 2: one.
    assert_eq!(info.info().await.unwrap().state.messages, 3);

    const TYPES: &[&str] = &["OrderRejected"];
    let mut sub = bus.subscribe("c", TYPES).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 4 {
        let next = sub.next_batch(10, Duration::from_secs(5)).await.unwrap();
        assert!(!next.is_empty(), "timed out; got {}", got.len());
        got.extend(next);
    }
    let ids: Vec<String> = got
        .iter()
        .map(|d| Envelope::from_json(d.payload.as_bytes()).unwrap().event_id)
        .collect();
    let rejected: Vec<String> = [0, 2, 3, 4]
        .iter()
        .map(|&i| batch[i].event_id.clone())
        .collect();
    assert_eq!(ids, rejected, "each event delivered by itself, in order");
    assert_eq!(got[0].position, got[2].position, "one message");
    assert_ne!(got[2].position, got[3].position);

    // Acks are not answered; the server takes a connection's messages in
    // order, so once a later ack shows, every earlier one has been taken.
    let settled = |want: usize| {
        let (js, stream) = (js.clone(), stream.clone());
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let mut c: async_nats::jetstream::consumer::PullConsumer = js
                    .get_consumer_from_stream("c-OrderRejected", &stream)
                    .await
                    .unwrap();
                let pending = c.info().await.unwrap().num_ack_pending;
                if pending <= want || tokio::time::Instant::now() > deadline {
                    return pending;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(settled(2).await, 2);
    // Two of the first message's three events handled: it stays pending,
    // to be delivered again whole (its handled events as duplicates),
    // while the second message, handled, is acknowledged.
    sub.ack(&got[..2]).await.unwrap();
    sub.ack(&got[3..]).await.unwrap();
    assert_eq!(settled(1).await, 1);
    sub.ack(&got[2..3]).await.unwrap();
    assert_eq!(settled(0).await, 0);

    // A replay hands out every event by itself too, in stream order.
    let replayed: Vec<String> = replay_all(&bus)
        .await
        .iter()
        .map(|d| Envelope::from_json(d.payload.as_bytes()).unwrap().event_id)
        .collect();
    let in_stream_order: Vec<String> = [0, 2, 3, 1, 4]
        .iter()
        .map(|&i| batch[i].event_id.clone())
        .collect();
    assert_eq!(replayed, in_stream_order);
    delete_nats_stream(&url(), &stream).await.unwrap();
}

/// Everything the stream holds, through a replay.
async fn replay_all(bus: &Bus) -> Vec<Delivery> {
    let mut replay = bus.replay(0).await.unwrap();
    let mut all = Vec::new();
    loop {
        let batch = replay.next_batch(100).await.unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

/// Prunes until `want` messages have gone in all (acknowledgements reach
/// the consumers' state on the server a moment after they are sent), and
/// never more.
async fn prune_until(nats: &NatsBus, max_messages: u64, want: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut purged = 0;
    while purged < want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "purged {purged} of {want}"
        );
        purged += nats.prune(max_messages).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(purged, want);
}

/// The stream keeps its newest messages, and every message a durable
/// consumer has not acknowledged however far behind it is; the rest goes.
/// A consumer whose type stops arriving and a replay in progress hold
/// nothing back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_drops_only_what_every_durable_consumer_acknowledged_beyond_the_bound() {
    let stream = format!("rt_{}", new_id().replace('-', ""));
    let nats = std::sync::Arc::new(
        NatsBus::connect(&url(), &stream)
            .await
            .expect("NATS with JetStream must be reachable at NATS_URL: run scripts/services.sh"),
    );
    let bus = Bus::Nats(nats.clone());
    const REJECTED: &[&str] = &["OrderRejected"];
    const CANCELLED: &[&str] = &["OrderCancelled"];
    let mut reader = bus.subscribe("reader", REJECTED).await.unwrap();
    let _idle = bus.subscribe("idle", CANCELLED).await.unwrap();
    // Ten messages, sequences 1 to 10.
    let events: Vec<_> = (0..10).map(|_| event("OrderRejected")).collect();
    bus.publish(&events).await.unwrap();
    let _replay = bus.replay(0).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 10 {
        let batch = reader.next_batch(10, Duration::from_secs(5)).await.unwrap();
        assert!(!batch.is_empty(), "timed out; got {}", got.len());
        got.extend(batch);
    }
    assert_eq!(nats.prune(2).await.unwrap(), 0, "nothing acknowledged yet");

    reader.ack(&got[..6]).await.unwrap();
    // Beyond the bound of 2 are 1 to 8; the reader has acknowledged 1 to 6.
    prune_until(&nats, 2, 6).await;
    // What the gauge of each consumer's distance shows.
    assert_eq!(
        nats.consumers_behind().await.unwrap(),
        [
            ("idle-OrderCancelled".to_owned(), 0),
            ("reader-OrderRejected".to_owned(), 4)
        ]
    );
    assert_eq!(nats.prune(2).await.unwrap(), 0, "7 and 8 are unread");

    reader.ack(&got[6..]).await.unwrap();
    // Nothing is pending for the reader: the bound alone keeps 9 and 10.
    prune_until(&nats, 2, 2).await;

    // A consumer that has read nothing yet keeps what is left.
    let _late = bus.subscribe("late", REJECTED).await.unwrap();
    assert_eq!(nats.prune(0).await.unwrap(), 0);
    let behind = nats.consumers_behind().await.unwrap();
    assert!(
        behind.contains(&("late-OrderRejected".to_owned(), 2)),
        "{behind:?}"
    );
    let left: Vec<i64> = replay_all(&bus).await.iter().map(|d| d.position).collect();
    assert_eq!(left, [9, 10]);
    delete_nats_stream(&url(), &stream).await.unwrap();
}

/// Streams created and deleted side by side (as the tests and the
/// services of several systems do on one server) are all created:
/// nats-server 2.9 drops an account's storage directory with its last
/// stream, and a creation racing that failed with "error creating store
/// for stream" until `NatsBus::connect` tried again. Without the retry two
/// runs of five failed here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_created_while_others_are_deleted_are_all_created() {
    let run = new_id().replace('-', "");
    let loops: Vec<_> = (0..8)
        .map(|t| {
            let run = run.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    let stream = format!("rt_{run}_{t}_{i}");
                    NatsBus::connect(&url(), &stream)
                        .await
                        .unwrap_or_else(|e| panic!("{stream}: {e}"));
                    delete_nats_stream(&url(), &stream).await.unwrap();
                }
            })
        })
        .collect();
    for l in loops {
        l.await.unwrap();
    }
}
