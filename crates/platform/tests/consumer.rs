//! The consumer's guarantees, tested at the consumer: an event delivered
//! twice has one effect; a transient failure is retried; an event that can
//! never be applied is parked and does not block the ones behind it; a
//! parked event can be replayed; positions survive a restart.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use restaurant_contract::{Cause, Envelope, Event, OrderLine, OrderPlaced, Reason};
use restaurant_platform::{
    bus::{Bus, EventLog, OutgoingEvent},
    consumer::{Consumer, HandleError, Handler, Outcome, RetryPolicy},
    db::{Db, DbOptions, Migrations, Planned, Tx},
    outbox::{self, OutboxSignal},
    shutdown::Shutdown,
};
use sqlx::migrate::Migrator;

/// Applies `OrderPlaced` by writing one event to the outbox: the number of
/// outbox rows is the number of effects.
#[derive(Default)]
struct Recorder {
    /// Fail this many more attempts (transiently) before succeeding.
    failures_left: AtomicU32,
    /// Events of customer "flaky" fail transiently the first time each is
    /// handled: the batch holding one falls back to one event at a time.
    flaky_seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Handler for Recorder {
    const TYPES: &'static [&'static str] = &["OrderPlaced"];

    async fn handle(&self, tx: &mut Tx, env: &Envelope, event: Event) -> Result<(), HandleError> {
        let Event::OrderPlaced(p) = event else {
            unreachable!("filtered by TYPES")
        };
        if p.customer_id == "poison" {
            return Err(HandleError::Permanent("poisoned on purpose".into()));
        }
        if p.customer_id == "flaky" && self.flaky_seen.lock().unwrap().insert(env.event_id.clone())
        {
            return Err(HandleError::Transient(anyhow::anyhow!("flaky on purpose")));
        }
        if self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(HandleError::Transient(anyhow::anyhow!("database hiccup")));
        }
        let ev = Event::OrderRejected(Reason {
            reason: "recorded".into(),
        });
        outbox::emit(tx, "test", &env.order_id, &ev, &env.as_cause()).await?;
        Ok(())
    }
}

struct Fixture<H = Recorder> {
    db: Db,
    consumer: Arc<Consumer<H>>,
    _dir: tempfile::TempDir,
    dir_path: std::path::PathBuf,
}

async fn fixture(failures: u32) -> Fixture {
    fixture_with(Arc::new(Recorder {
        failures_left: AtomicU32::new(failures),
        ..Default::default()
    }))
    .await
}

async fn fixture_with<H: Handler>(handler: Arc<H>) -> Fixture<H> {
    let dir = tempfile::tempdir().unwrap();
    let none = || Migrator::with_migrations(vec![]);
    let db = Db::connect(
        &format!("sqlite://{}", dir.path().join("svc.db").display()),
        &Migrations {
            sqlite: none(),
            postgres: none(),
        },
        DbOptions {
            fsync: false,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let consumer = Consumer::new("test", db.clone(), handler, OutboxSignal::default()).with_retry(
        RetryPolicy {
            max_attempts: 3,
            first_backoff: Duration::from_millis(1),
        },
    );
    Fixture {
        db,
        consumer: Arc::new(consumer),
        dir_path: dir.path().to_owned(),
        _dir: dir,
    }
}

fn placed(customer: &str) -> Envelope {
    placed_to(customer, "a")
}

fn placed_to(customer: &str, address: &str) -> Envelope {
    let ev = Event::OrderPlaced(OrderPlaced {
        customer_id: customer.into(),
        restaurant_id: "r".into(),
        items: vec![OrderLine {
            menu_id: "m".into(),
            qty: 1,
        }],
        address: address.into(),
    });
    Envelope::new(
        "order",
        &restaurant_contract::new_id(),
        &ev,
        &Cause::default(),
    )
}

async fn effects(db: &Db) -> i64 {
    outbox::pending(db).await.unwrap()
}

#[tokio::test]
async fn the_same_event_delivered_twice_has_one_effect() {
    let f = fixture(0).await;
    let env = placed("alice").to_json();
    let stop = Shutdown::new();
    assert_eq!(f.consumer.offer(&env, &stop).await, Some(Outcome::Applied));
    assert_eq!(
        f.consumer.offer(&env, &stop).await,
        Some(Outcome::Duplicate)
    );
    assert_eq!(
        f.consumer.offer(&env, &stop).await,
        Some(Outcome::Duplicate)
    );
    assert_eq!(effects(&f.db).await, 1);
    // Records younger than the retention are kept; older ones go.
    assert_eq!(
        f.consumer.prune(Duration::from_secs(3600)).await.unwrap(),
        0
    );
    assert_eq!(
        f.consumer.offer(&env, &stop).await,
        Some(Outcome::Duplicate)
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(f.consumer.prune(Duration::ZERO).await.unwrap(), 1);
}

#[tokio::test]
async fn a_transient_failure_is_retried_and_applied_once() {
    let f = fixture(2).await;
    let env = placed("alice").to_json();
    assert_eq!(
        f.consumer.offer(&env, &Shutdown::new()).await,
        Some(Outcome::Applied)
    );
    assert_eq!(effects(&f.db).await, 1);
    assert!(f.consumer.dead_letters().await.unwrap().is_empty());
}

#[tokio::test]
async fn bad_events_are_parked_with_their_error_and_unknown_types_ignored() {
    let f = fixture(0).await;
    let stop = Shutdown::new();
    let poison = placed("poison");
    assert_eq!(
        f.consumer.offer(&poison.to_json(), &stop).await,
        Some(Outcome::Parked)
    );
    assert_eq!(
        f.consumer.offer("not json at all", &stop).await,
        Some(Outcome::Parked)
    );
    let mut wrong_schema = placed("x");
    wrong_schema.data =
        serde_json::value::to_raw_value(&serde_json::json!({"customerId": 42})).unwrap();
    assert_eq!(
        f.consumer.offer(&wrong_schema.to_json(), &stop).await,
        Some(Outcome::Parked)
    );
    let mut unknown = placed("x");
    unknown.event_type = "SomethingFromTheFuture".into();
    assert_eq!(
        f.consumer.offer(&unknown.to_json(), &stop).await,
        Some(Outcome::Ignored)
    );

    let parked = f.consumer.dead_letters().await.unwrap();
    assert_eq!(parked.len(), 3);
    assert_eq!(
        parked[0].event_id.as_deref(),
        Some(poison.event_id.as_str())
    );
    assert_eq!(parked[0].error, "poisoned on purpose");
    assert_eq!(parked[0].attempts, 1, "permanent errors are not retried");
    assert!(parked[1].error.contains("malformed envelope"));
    assert!(parked[2].error.contains("does not match its schema"));
    assert_eq!(effects(&f.db).await, 0);
}

#[tokio::test]
async fn an_event_parked_after_exhausting_retries_can_be_replayed() {
    let f = fixture(100).await;
    let env = placed("alice");
    assert_eq!(
        f.consumer.offer(&env.to_json(), &Shutdown::new()).await,
        Some(Outcome::Parked)
    );
    let parked = f.consumer.dead_letters().await.unwrap();
    assert_eq!(parked[0].attempts, 3);
    assert!(parked[0].error.contains("database hiccup"));

    // Still failing: replay parks it again (not lost, not duplicated).
    assert_eq!(
        f.consumer.replay(parked[0].id).await.unwrap(),
        Some(Outcome::Parked)
    );
    let parked = f.consumer.dead_letters().await.unwrap();
    assert_eq!(parked.len(), 1);

    // The cause is fixed: replay applies it and the dead letter goes.
    // (`failures_left` cannot be reset through the Arc; a fresh consumer on
    // the same database stands in for "after the fix was deployed".)
    let fixed = Consumer::new(
        "test",
        f.db.clone(),
        Arc::new(Recorder::default()),
        OutboxSignal::default(),
    );
    assert_eq!(
        fixed.replay(parked[0].id).await.unwrap(),
        Some(Outcome::Applied)
    );
    assert!(fixed.dead_letters().await.unwrap().is_empty());
    assert_eq!(effects(&f.db).await, 1);
    assert_eq!(fixed.replay(parked[0].id).await.unwrap(), None);
}

/// A build from before JetStream messages carried several events parks
/// such a message whole (its payload is not one envelope). After the
/// upgrade, replaying it applies its events one by one and parks only the
/// one that still fails.
#[tokio::test]
async fn a_message_of_several_events_parked_whole_is_replayed_event_by_event() {
    let f = fixture(0).await;
    let lines = [placed("alice"), placed("poison"), placed("bob")]
        .map(|env| env.to_json())
        .join("\n");
    sqlx::query(
        "INSERT INTO dead_letters (consumer, payload, error, attempts, parked_at) \
         VALUES ('test', $1, 'malformed envelope: trailing characters', 1, 0)",
    )
    .bind(&lines)
    .execute(&mut *f.db.write_conn().await.unwrap())
    .await
    .unwrap();
    let parked = f.consumer.dead_letters().await.unwrap();
    assert_eq!(
        f.consumer.replay(parked[0].id).await.unwrap(),
        Some(Outcome::Parked)
    );
    assert_eq!(effects(&f.db).await, 2, "alice and bob applied");
    let parked = f.consumer.dead_letters().await.unwrap();
    assert_eq!(parked.len(), 1, "only the poison is parked again");
    assert!(parked[0].payload.contains("poison") && !parked[0].payload.contains('\n'));
}

fn outgoing(env: &Envelope) -> OutgoingEvent {
    OutgoingEvent::new(env, 0)
}

#[tokio::test]
async fn a_poison_event_does_not_block_the_events_behind_it() {
    let f = fixture(0).await;
    let log = EventLog::open(&f.dir_path.join("events.db"), false)
        .await
        .unwrap();
    let bus = Bus::Embedded(log);
    let good = placed("alice");
    bus.publish(&[outgoing(&placed("poison")), outgoing(&good)])
        .await
        .unwrap();
    // Publishing the same event again is deduplicated by the log.
    bus.publish(&[outgoing(&good)]).await.unwrap();

    let stop = Shutdown::new();
    let run = tokio::spawn(f.consumer.clone().run(bus.clone(), stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while effects(&f.db).await < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "good event not applied"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.trigger();
    run.await.unwrap();
    assert_eq!(f.consumer.dead_letters().await.unwrap().len(), 1);

    // Positions are durable: a new subscription after "restart" sees
    // nothing old, only what comes next.
    let later = placed("bob");
    bus.publish(&[outgoing(&later)]).await.unwrap();
    let mut sub = bus.subscribe("test", Recorder::TYPES).await.unwrap();
    let batch = sub
        .next_batch(10, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(
        Envelope::from_json(batch[0].payload.as_bytes())
            .unwrap()
            .event_id,
        later.event_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_each_event_logged_once_in_publish_order() {
    let f = fixture(0).await;
    let (log, bus) = log_beside(&f).await;
    let mut sub = bus.subscribe("reader", &["OrderPlaced"]).await.unwrap();
    let batches: Vec<Vec<OutgoingEvent>> = (0..8)
        .map(|_| (0..50).map(|_| outgoing(&placed("x"))).collect())
        .collect();
    let publishers: Vec<_> = batches
        .iter()
        .cloned()
        .map(|batch| {
            let bus = bus.clone();
            tokio::spawn(async move {
                for chunk in batch.chunks(10) {
                    bus.publish(chunk).await.unwrap();
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    // A subscriber sees exactly what the table holds, in the same order.
    let logged = log.read_from(0, 1_000).await.unwrap();
    assert_eq!(logged.len(), 400);
    let mut delivered = Vec::new();
    while delivered.len() < 400 {
        let batch = sub.next_batch(128, Duration::from_secs(2)).await.unwrap();
        assert!(!batch.is_empty(), "the subscriber stopped short");
        delivered.extend(batch.into_iter().map(|d| (d.position, d.payload)));
    }

    // A republished batch (a relay that died before deleting) adds nothing;
    // one part republished, part new logs only the new ones, in order, and
    // the subscriber (now reading the log's in-memory tail) gets them
    // numbered as the table numbers them.
    let fresh: Vec<OutgoingEvent> = (0..3).map(|_| outgoing(&placed("y"))).collect();
    let mixed = [
        batches[5][0].clone(),
        fresh[0].clone(),
        batches[5][1].clone(),
        fresh[1].clone(),
        fresh[2].clone(),
    ];
    bus.publish(&mixed).await.unwrap();
    bus.publish(&batches[3]).await.unwrap();
    let logged = log.read_from(0, 1_000).await.unwrap();
    assert_eq!(logged.len(), 403);
    let new_ids: Vec<String> = logged[400..]
        .iter()
        .map(|d| Envelope::from_json(d.payload.as_bytes()).unwrap().event_id)
        .collect();
    let fresh_ids: Vec<String> = fresh.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(new_ids, fresh_ids);
    let batch = sub.next_batch(128, Duration::from_secs(2)).await.unwrap();
    delivered.extend(batch.into_iter().map(|d| (d.position, d.payload)));
    let table: Vec<(i64, String)> = logged
        .into_iter()
        .map(|d| (d.position, d.payload))
        .collect();
    assert_eq!(delivered, table);

    let mut seen = std::collections::HashSet::new();
    for (_, payload) in &table {
        let id = Envelope::from_json(payload.as_bytes()).unwrap().event_id;
        assert!(seen.insert(id), "an event logged twice");
    }
    // Each publisher's events keep the order it published them in.
    let position: std::collections::HashMap<String, i64> = table
        .iter()
        .map(|(at, payload)| {
            (
                Envelope::from_json(payload.as_bytes()).unwrap().event_id,
                *at,
            )
        })
        .collect();
    for batch in &batches {
        let at: Vec<i64> = batch.iter().map(|e| position[&e.event_id]).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}");
    }
}

/// An event log in the fixture's directory, and the bus over it.
async fn log_beside<H>(f: &Fixture<H>) -> (EventLog, Bus) {
    let log = EventLog::open(&f.dir_path.join("events.db"), false)
        .await
        .unwrap();
    (log.clone(), Bus::Embedded(log))
}

/// The event ids in the log, in its order.
async fn logged_ids(log: &EventLog) -> Vec<String> {
    log.read_from(0, 2_000)
        .await
        .unwrap()
        .iter()
        .map(|d| Envelope::from_json(d.payload.as_bytes()).unwrap().event_id)
        .collect()
}

/// Commits `n` new OrderPlaced events to the outbox.
async fn append_placed(db: &Db, n: usize) {
    let mut tx = db.begin().await.unwrap();
    for _ in 0..n {
        outbox::append(&mut tx, &placed("x")).await.unwrap();
    }
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn the_relay_moves_outbox_rows_to_the_log_once() {
    let f = fixture(0).await;
    let (log, bus) = log_beside(&f).await;
    append_placed(&f.db, 3).await;
    assert_eq!(outbox::relay_batch(&f.db, &bus).await.unwrap().events, 3);
    assert_eq!(outbox::relay_batch(&f.db, &bus).await.unwrap().events, 0);
    assert_eq!(effects(&f.db).await, 0);
    assert_eq!(log.read_from(0, 100).await.unwrap().len(), 3);
}

#[tokio::test]
async fn the_owned_relay_deletes_in_bulk_and_a_restart_republishes_nothing_twice() {
    let f = fixture(0).await;
    let (log, bus) = log_beside(&f).await;
    append_placed(&f.db, 3).await;
    let mut relay = outbox::OwnedOutbox::default();
    assert_eq!(relay.relay(&f.db, &bus).await.unwrap().events, 3);
    assert_eq!(log.read_from(0, 100).await.unwrap().len(), 3);
    assert_eq!(
        effects(&f.db).await,
        3,
        "published rows wait to be deleted together"
    );

    // The process dies here: a new relay starts from the outbox as it is
    // and publishes the three again, which the log keeps once.
    let mut restarted = outbox::OwnedOutbox::default();
    assert_eq!(restarted.relay(&f.db, &bus).await.unwrap().events, 3);
    assert_eq!(log.read_from(0, 100).await.unwrap().len(), 3);
    // Finding nothing new, it deletes what it published.
    assert_eq!(restarted.relay(&f.db, &bus).await.unwrap().events, 0);
    assert_eq!(effects(&f.db).await, 0);

    append_placed(&f.db, 2).await;
    restarted.drain(&f.db, &bus).await.unwrap();
    assert_eq!(effects(&f.db).await, 0, "a drain leaves nothing behind");
    let ids = logged_ids(&log).await;
    assert_eq!(ids.len(), 5);
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        5,
        "no event twice"
    );
}

#[tokio::test]
async fn the_owned_relay_publishes_every_payload_unchanged_in_commit_order() {
    let f = fixture(0).await;
    let (log, bus) = log_beside(&f).await;
    // More than one relay batch, over several transactions, with text that
    // JSON must escape on the way (the relay reads a batch as one array).
    let mut sent = Vec::new();
    for t in 0..3 {
        let mut tx = f.db.begin().await.unwrap();
        for i in 0..250 {
            let env = placed_to(
                &format!("c{t}-{i}"),
                &format!("\"종로\" 1\\2\n\t\u{1}🍜 {i}"),
            );
            outbox::append(&mut tx, &env).await.unwrap();
            sent.push(env.to_json());
        }
        tx.commit().await.unwrap();
    }
    let mut relay = outbox::OwnedOutbox::default();
    relay.drain(&f.db, &bus).await.unwrap();
    let logged: Vec<String> = log
        .read_from(0, 1_000)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.payload)
        .collect();
    assert_eq!(logged, sent);
    assert_eq!(effects(&f.db).await, 0);
}

#[tokio::test]
async fn the_owned_relay_parks_a_damaged_line_once_and_publishes_the_rest_of_its_row() {
    let f = fixture(0).await;
    let (log, bus) = log_beside(&f).await;
    let together: Vec<Envelope> = (0..3).map(|i| placed(&format!("t{i}"))).collect();
    let mut tx = f.db.begin().await.unwrap();
    outbox::append_all(&mut tx, &together).await.unwrap();
    tx.commit().await.unwrap();
    let good = placed("g");
    for payload in [format!("{}\n[1, 2", good.to_json()), "not json".to_owned()] {
        sqlx::query("INSERT INTO outbox (events, payload, created_at) VALUES (1, $1, 0)")
            .bind(payload)
            .execute(&mut *f.db.write_conn().await.unwrap())
            .await
            .unwrap();
    }
    let parked = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT payload FROM dead_letters WHERE consumer = 'outbox' ORDER BY id",
        )
        .fetch_all(f.db.reader())
        .await
        .unwrap()
    };
    let mut relay = outbox::OwnedOutbox::default();
    let relayed = relay.relay(&f.db, &bus).await.unwrap();
    assert_eq!((relayed.rows, relayed.events), (3, 4));
    assert_eq!(
        parked().await,
        vec!["[1, 2".to_owned(), "not json".to_owned()]
    );

    // The process dies before the bulk delete: the rows are published again
    // (the log keeps each event once) and nothing is parked twice.
    let mut restarted = outbox::OwnedOutbox::default();
    restarted.drain(&f.db, &bus).await.unwrap();
    assert_eq!(parked().await.len(), 2);
    assert_eq!(effects(&f.db).await, 0);
    let ids = logged_ids(&log).await;
    let sent: Vec<String> = together
        .iter()
        .chain([&good])
        .map(|e| e.event_id.clone())
        .collect();
    assert_eq!(ids, sent, "in commit order, and in order within a row");
}

#[tokio::test]
async fn an_owned_relay_pass_stops_at_the_row_that_reaches_its_event_budget() {
    let f = fixture(0).await;
    let (log, bus) = log_beside(&f).await;
    for n in [1_000, 100, 1] {
        let envs: Vec<Envelope> = (0..n).map(|i| placed(&format!("b{i}"))).collect();
        let mut tx = f.db.begin().await.unwrap();
        outbox::append_all(&mut tx, &envs).await.unwrap();
        tx.commit().await.unwrap();
    }
    let mut relay = outbox::OwnedOutbox::default();
    let first = relay.relay(&f.db, &bus).await.unwrap();
    assert_eq!((first.rows, first.events), (2, 1_100));
    let second = relay.relay(&f.db, &bus).await.unwrap();
    assert_eq!((second.rows, second.events), (1, 1));
    assert_eq!(relay.relay(&f.db, &bus).await.unwrap().rows, 0);
    assert_eq!(logged_ids(&log).await.len(), 1_101);
}

async fn wait_for_effects(db: &Db, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while effects(db).await < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} effects not reached"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn count(db: &Db, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(db.reader())
        .await
        .unwrap()
}

/// `n` `OrderPlaced` events, for customers `{prefix}0`, `{prefix}1`, …
fn placed_events(prefix: &str, n: usize) -> Vec<OutgoingEvent> {
    (0..n)
        .map(|i| outgoing(&placed(&format!("{prefix}{i}"))))
        .collect()
}

/// Forgets the log's saved subscriber positions, as if the process died
/// before saving them: the log hands out everything again.
async fn lose_log_positions<H>(f: &Fixture<H>) {
    let path = f.dir_path.join("events.db");
    sqlx::query("DELETE FROM consumer_positions")
        .execute(
            &sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
}

/// Runs the fixture's consumer until `n` effects exist, and a while longer
/// so that a wrongly doubled batch would show; then stops it.
async fn run_until_settled<H: Handler>(f: &Fixture<H>, bus: &Bus, n: i64) {
    let stop = Shutdown::new();
    let run = tokio::spawn(f.consumer.clone().run(bus.clone(), stop.clone()));
    wait_for_effects(&f.db, n).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.trigger();
    run.await.unwrap();
}

/// The batch path: a crash after applying but before the log position was
/// saved redelivers a whole batch, mixed with new events. The consumer's
/// offset, committed with the effects, drops every old event, a parked one
/// included; and once there is an offset, no event id is recorded.
#[tokio::test]
async fn a_redelivered_batch_has_one_effect_per_event() {
    let f = fixture(0).await;
    let (_log, bus) = log_beside(&f).await;
    let mut first = placed_events("c", 50);
    first.insert(25, outgoing(&placed("poison")));
    bus.publish(&first).await.unwrap();
    run_until_settled(&f, &bus, 50).await;
    assert_eq!(f.consumer.dead_letters().await.unwrap().len(), 1);
    let recorded = count(&f.db, "processed_events").await;

    lose_log_positions(&f).await;
    bus.publish(&placed_events("d", 10)).await.unwrap();
    run_until_settled(&f, &bus, 60).await;
    assert_eq!(effects(&f.db).await, 60);
    assert_eq!(f.consumer.dead_letters().await.unwrap().len(), 1);
    assert_eq!(count(&f.db, "processed_events").await, recorded);
    let offset: i64 = sqlx::query_scalar("SELECT position FROM consumer_offsets")
        .fetch_one(f.db.reader())
        .await
        .unwrap();
    assert_eq!(
        offset, 61,
        "the offset is the log position of the last event"
    );
}

/// The offset a consumer keeps in memory between batches must never be
/// older than the table's: a batch applied whole, then a batch that fails
/// once and is applied one event at a time (moving the offset event by
/// event), then the whole log handed out again as after a lost log
/// position. Every event still has one effect.
#[tokio::test]
async fn the_offset_kept_between_batches_follows_the_one_by_one_path() {
    let f = fixture(0).await;
    let (_log, bus) = log_beside(&f).await;
    bus.publish(&placed_events("a", 10)).await.unwrap();
    let stop = Shutdown::new();
    let run = tokio::spawn(f.consumer.clone().run(bus.clone(), stop.clone()));
    wait_for_effects(&f.db, 10).await;
    // The same run, so the offset is in memory: now a batch that fails.
    let mut failing = placed_events("b", 10);
    failing.insert(5, outgoing(&placed("flaky")));
    bus.publish(&failing).await.unwrap();
    wait_for_effects(&f.db, 21).await;
    stop.trigger();
    run.await.unwrap();

    lose_log_positions(&f).await;
    bus.publish(&[outgoing(&placed("c"))]).await.unwrap();
    run_until_settled(&f, &bus, 22).await;
    assert_eq!(effects(&f.db).await, 22);
    assert!(f.consumer.dead_letters().await.unwrap().is_empty());
}

/// [`Recorder`]'s effect (an outbox row per event) in planned batches too:
/// a batch that holds a "flaky" customer's event fails after its read the
/// first time; one that holds a "bad-write" customer's fails in its
/// commit, after its outbox rows went in, every time.
#[derive(Default)]
struct Planner {
    recorder: Recorder,
    planned: AtomicU32,
    failed_commits: AtomicU32,
}

impl Handler for Planner {
    const TYPES: &'static [&'static str] = &["OrderPlaced"];
    const PLANNED: bool = true;

    async fn handle(&self, tx: &mut Tx, env: &Envelope, event: Event) -> Result<(), HandleError> {
        self.recorder.handle(tx, env, event).await
    }

    async fn handle_batch_planned(
        &self,
        tx: &mut Planned,
        batch: Vec<(Envelope, Event)>,
    ) -> Result<(), HandleError> {
        let before = tx.read("SELECT COUNT(*) FROM outbox", |q| q).await?;
        assert_eq!(before.len(), 1);
        let customers: Vec<String> = batch
            .iter()
            .map(|(_, ev)| match ev {
                Event::OrderPlaced(p) => p.customer_id.clone(),
                _ => unreachable!("filtered by TYPES"),
            })
            .collect();
        for ((env, _), customer) in batch.iter().zip(&customers) {
            if customer == "flaky"
                && self
                    .recorder
                    .flaky_seen
                    .lock()
                    .unwrap()
                    .insert(env.event_id.clone())
            {
                return Err(HandleError::Transient(anyhow::anyhow!("flaky on purpose")));
            }
        }
        let mut params = tx.params();
        let mut writes: Vec<String> = batch
            .iter()
            .map(|_| outbox::insert_sql(&mut params))
            .collect();
        if customers.iter().any(|c| c == "bad-write") {
            // NOT NULL: fails after the outbox rows went in.
            writes.push(
                "INSERT INTO processed_events (consumer, event_id, processed_at) \
                 VALUES ('test', NULL, 0)"
                    .into(),
            );
        }
        let rejected: Vec<Envelope> = batch
            .iter()
            .map(|(env, _)| {
                let ev = Event::OrderRejected(Reason {
                    reason: "recorded".into(),
                });
                Envelope::new("test", &env.order_id, &ev, &env.as_cause())
            })
            .collect();
        let committed = tx
            .commit(&writes.join("; "), |mut q| {
                for env in &rejected {
                    q = outbox::bind_row(q, [env]);
                }
                q
            })
            .await;
        if committed.is_err() {
            self.failed_commits.fetch_add(1, Ordering::SeqCst);
        }
        committed?;
        self.planned.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

async fn offset<H>(f: &Fixture<H>) -> i64 {
    sqlx::query_scalar("SELECT position FROM consumer_offsets")
        .fetch_one(f.db.reader())
        .await
        .unwrap()
}

/// A planned batch commits its effects with the consumer's offset, or
/// neither: one that fails after its read, and one whose commit fails
/// after some of its writes ran, go through one event at a time with one
/// effect each; a whole log handed out again after that has no effect.
#[tokio::test]
async fn a_planned_batch_commits_its_effects_with_the_offset_or_neither() {
    let planner = Arc::new(Planner::default());
    let f = fixture_with(planner.clone()).await;
    let (_log, bus) = log_beside(&f).await;
    // The first batch records the offset the planned ones start from.
    bus.publish(&placed_events("a", 5)).await.unwrap();
    let stop = Shutdown::new();
    let run = tokio::spawn(f.consumer.clone().run(bus.clone(), stop.clone()));
    wait_for_effects(&f.db, 5).await;
    bus.publish(&placed_events("b", 10)).await.unwrap();
    wait_for_effects(&f.db, 15).await;
    let planned = planner.planned.load(Ordering::SeqCst);
    assert!(planned >= 1, "no batch went through the planned path");
    assert_eq!(offset(&f).await, 15);

    let mut failing = placed_events("c", 10);
    failing.insert(3, outgoing(&placed("flaky")));
    bus.publish(&failing).await.unwrap();
    wait_for_effects(&f.db, 26).await;
    // A batch that went one by one leaves the offset unknown: the next
    // reads it in an ordinary transaction, and the one after is planned.
    bus.publish(&placed_events("d", 5)).await.unwrap();
    wait_for_effects(&f.db, 31).await;
    let mut failing = placed_events("e", 5);
    failing.insert(2, outgoing(&placed("bad-write")));
    bus.publish(&failing).await.unwrap();
    wait_for_effects(&f.db, 37).await;
    assert_eq!(planner.failed_commits.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.trigger();
    run.await.unwrap();
    assert_eq!(effects(&f.db).await, 37, "an effect was doubled");
    assert_eq!(offset(&f).await, 37);
    assert!(f.consumer.dead_letters().await.unwrap().is_empty());

    // The whole log again, after a lost log position: nothing twice, and
    // the batches after the first are planned again.
    lose_log_positions(&f).await;
    let planned = planner.planned.load(Ordering::SeqCst);
    let stop = Shutdown::new();
    let run = tokio::spawn(f.consumer.clone().run(bus.clone(), stop.clone()));
    bus.publish(&placed_events("f", 3)).await.unwrap();
    wait_for_effects(&f.db, 40).await;
    bus.publish(&placed_events("g", 3)).await.unwrap();
    wait_for_effects(&f.db, 43).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.trigger();
    run.await.unwrap();
    assert_eq!(effects(&f.db).await, 43);
    assert!(planner.planned.load(Ordering::SeqCst) > planned);
    assert_eq!(offset(&f).await, 43);
}

/// Counts the batches and events it is given; on SQLite (the fixture's
/// database) lingers `MS` ms after a batch, elsewhere takes them as they
/// come.
#[derive(Default)]
struct Lingering<const MS: u64> {
    batches: AtomicU32,
    events: AtomicU32,
}

impl<const MS: u64> Handler for Lingering<MS> {
    const TYPES: &'static [&'static str] = &["OrderPlaced"];
    const LINGER_ON_SQLITE: Duration = Duration::from_millis(MS);

    async fn handle(&self, _: &mut Tx, _: &Envelope, _: Event) -> Result<(), HandleError> {
        self.events.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn handle_batch(
        &self,
        _: &mut Tx,
        batch: Vec<(Envelope, Event)>,
    ) -> Result<(), HandleError> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.events.fetch_add(batch.len() as u32, Ordering::SeqCst);
        Ok(())
    }
}

impl<const MS: u64> Lingering<MS> {
    /// Waits until `n` events are applied, failing once `within` has passed.
    async fn applied(&self, n: u32, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.events.load(Ordering::SeqCst) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} events applied within {within:?}, in {} batches",
                self.events.load(Ordering::SeqCst),
                self.batches.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// A consumer `name` of `bus` with a fresh [`Lingering`], running: its
/// handler, what stops it, and its task.
fn run_lingering<const MS: u64>(
    f: &Fixture,
    bus: &Bus,
    name: &str,
) -> (Arc<Lingering<MS>>, Shutdown, tokio::task::JoinHandle<()>) {
    let handler = Arc::new(Lingering::<MS>::default());
    let consumer = Arc::new(Consumer::new(
        name,
        f.db.clone(),
        handler.clone(),
        OutboxSignal::default(),
    ));
    let stop = Shutdown::new();
    let run = tokio::spawn(consumer.run(bus.clone(), stop.clone()));
    (handler, stop, run)
}

/// A lingering consumer takes the first event after a quiet spell at once,
/// and events that trickle in after it together, each once.
#[tokio::test]
async fn a_lingering_consumer_takes_a_trickle_in_few_batches() {
    let f = fixture(0).await;
    let (_log, bus) = log_beside(&f).await;
    let (handler, stop, run) = run_lingering::<250>(&f, &bus, "lingering");
    let applied = |n: u32| handler.applied(n, Duration::from_secs(10));

    let first = tokio::time::Instant::now();
    bus.publish(&placed_events("first", 1)).await.unwrap();
    applied(1).await;
    assert!(
        first.elapsed() < Duration::from_millis(200),
        "the first event after a quiet spell waited {:?}",
        first.elapsed()
    );
    // Thirty events, one every 2 ms: taken as they come, they were 31
    // batches with the first.
    for e in placed_events("trickle", 30) {
        bus.publish(&[e]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    applied(31).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.trigger();
    run.await.unwrap();
    assert_eq!(handler.events.load(Ordering::SeqCst), 31, "each event once");
    let batches = handler.batches.load(Ordering::SeqCst);
    assert!((2..=5).contains(&batches), "31 events in {batches} batches");
}

/// A lingering consumer that is behind takes its full batches back to back:
/// the linger spaces batches only while it keeps up. Lingering after every
/// batch, 2,000 events waiting took four lingers (8 s here) however fast
/// the consumer was, and a steady load of more than a batch per linger
/// left it further behind every second.
#[tokio::test]
async fn a_lingering_consumer_that_is_behind_does_not_linger() {
    let f = fixture(0).await;
    let (_log, bus) = log_beside(&f).await;
    for chunk in placed_events("backlog", 2_000).chunks(250) {
        bus.publish(chunk).await.unwrap();
    }
    let (handler, stop, run) = run_lingering::<2_000>(&f, &bus, "behind");
    handler.applied(2_000, Duration::from_secs(4)).await;
    stop.trigger();
    run.await.unwrap();
    assert_eq!(
        handler.events.load(Ordering::SeqCst),
        2_000,
        "each event once"
    );
    assert!(
        handler.batches.load(Ordering::SeqCst) >= 4,
        "batches are bounded"
    );
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A bus on a fresh JetStream stream, and the stream's name.
async fn nats_bus() -> (Bus, String) {
    let stream = format!("rt_{}", restaurant_contract::new_id().replace('-', ""));
    let bus = restaurant_platform::bus::NatsBus::connect(&nats_url(), &stream)
        .await
        .expect("NATS with JetStream must be reachable at NATS_URL: run scripts/services.sh");
    (Bus::Nats(std::sync::Arc::new(bus)), stream)
}

async fn drop_stream(stream: &str) {
    restaurant_platform::bus::delete_nats_stream(&nats_url(), stream)
        .await
        .unwrap();
}

/// On JetStream a message carries the events of one outbox row (see
/// `bus::messages_of`): a line that cannot be applied is parked by itself,
/// one that fails once is retried by itself, and the rest of the message is
/// applied once, though the row is published twice and one of its events
/// comes again in another message. Needs NATS at `NATS_URL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream_a_packed_messages_bad_line_is_parked_and_the_rest_applied_once() {
    let f = fixture(0).await;
    let (bus, stream) = nats_bus().await;
    let alice = placed("alice");
    let row: Vec<OutgoingEvent> = [
        alice.clone(),
        placed("poison"),
        placed("flaky"),
        placed("bob"),
    ]
    .iter()
    .map(|env| OutgoingEvent::new(env, 1))
    .collect();
    bus.publish(&row).await.unwrap();
    bus.publish(&row).await.unwrap();
    let again = [
        OutgoingEvent::new(&alice, 2),
        OutgoingEvent::new(&placed("carol"), 2),
    ];
    bus.publish(&again).await.unwrap();
    // alice, flaky, bob, carol.
    run_until_settled(&f, &bus, 4).await;
    assert_eq!(effects(&f.db).await, 4);
    let parked = f.consumer.dead_letters().await.unwrap();
    assert_eq!(parked.len(), 1);
    assert!(parked[0].payload.contains("poison"), "{parked:?}");
    drop_stream(&stream).await;
}

/// Counts the events it applies by id; declares cancellations idempotent.
#[derive(Default)]
struct PartlyIdempotent {
    applied: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl Handler for PartlyIdempotent {
    const TYPES: &'static [&'static str] = &["OrderPlaced", "OrderCancelled"];
    const IDEMPOTENT_TYPES: &'static [&'static str] = &["OrderCancelled"];

    async fn handle(&self, _: &mut Tx, env: &Envelope, _: Event) -> Result<(), HandleError> {
        *self
            .applied
            .lock()
            .unwrap()
            .entry(env.event_id.clone())
            .or_default() += 1;
        Ok(())
    }
}

/// Only the types a handler does not declare idempotent are recorded:
/// delivered again (one by one, and in batches on JetStream, where the
/// records are what deduplicates), those are dropped and the others
/// applied again, which their handler has to make harmless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_events_of_types_not_declared_idempotent_are_recorded() {
    let f = fixture(0).await;
    let handler = Arc::new(PartlyIdempotent::default());
    let consumer = Arc::new(Consumer::new(
        "partly",
        f.db.clone(),
        handler.clone(),
        OutboxSignal::default(),
    ));
    let cancelled = Envelope::new(
        "order",
        "o1",
        &Event::OrderCancelled(Reason { reason: "r".into() }),
        &Cause::default(),
    );
    let placed = placed("alice");
    let stop = Shutdown::new();
    for env in [&placed, &cancelled, &placed, &cancelled] {
        let outcome = consumer.offer(&env.to_json(), &stop).await;
        assert!(matches!(
            outcome,
            Some(Outcome::Applied | Outcome::Duplicate)
        ));
    }
    let times = |env: &Envelope| handler.applied.lock().unwrap()[&env.event_id];
    assert_eq!((times(&placed), times(&cancelled)), (1, 2));
    assert_eq!(count(&f.db, "processed_events").await, 1);

    // The batch path, on JetStream: the events again in a second row,
    // packed with others, so that the server delivers them twice (a
    // message of one row's events is not a duplicate of another's).
    let (bus, stream) = nats_bus().await;
    let cancel = |order: &str| {
        Envelope::new(
            "order",
            order,
            &Event::OrderCancelled(Reason { reason: "r".into() }),
            &Cause::default(),
        )
    };
    let (placed, cancelled) = (placed_to("bob", "b"), cancel("o2"));
    let (other_placed, other_cancelled) = (placed_to("carol", "c"), cancel("o3"));
    bus.publish(&[
        OutgoingEvent::new(&placed, 1),
        OutgoingEvent::new(&cancelled, 1),
    ])
    .await
    .unwrap();
    bus.publish(&[
        OutgoingEvent::new(&placed, 2),
        OutgoingEvent::new(&other_placed, 2),
        OutgoingEvent::new(&cancelled, 2),
        OutgoingEvent::new(&other_cancelled, 2),
    ])
    .await
    .unwrap();
    let run = tokio::spawn(consumer.clone().run(bus.clone(), stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while handler.applied.lock().unwrap().len() < 6 {
        assert!(tokio::time::Instant::now() < deadline, "not applied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.trigger();
    run.await.unwrap();
    assert_eq!(times(&placed), 1, "the recorded type is applied once");
    assert_eq!(times(&other_placed), 1);
    assert_eq!(count(&f.db, "processed_events").await, 3);
    drop_stream(&stream).await;
}

/// A caught-up subscription learns from the log's head whether anything is
/// new when only this process appends (the log keeps a tail): idle, it
/// does not touch the database at all. A log other processes append to must
/// be read to know. A closed log tells the two apart: a read of it fails.
#[tokio::test]
async fn an_idle_subscription_reads_the_table_only_if_others_append() {
    for shared in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        let log = if shared {
            EventLog::open_shared(&path, false).await
        } else {
            EventLog::open(&path, false).await
        }
        .unwrap();
        let bus = Bus::Embedded(log.clone());
        let alice = placed("alice");
        bus.publish(&[outgoing(&alice)]).await.unwrap();
        let mut sub = bus.subscribe("idle", Recorder::TYPES).await.unwrap();
        let batch = sub.next_batch(10, Duration::from_millis(50)).await.unwrap();
        assert_eq!(batch.len(), 1, "shared: {shared}");
        sub.ack(&batch).await.unwrap();
        sub.flush().await.unwrap();
        log.close().await;
        let idle = sub.next_batch(10, Duration::from_millis(50)).await;
        if shared {
            assert!(idle.is_err(), "a shared log is read: {idle:?}");
        } else {
            assert!(idle.unwrap().is_empty());
        }
    }
}

/// Reads, acknowledges and saves up to `max` events; how many it read.
async fn read_and_save(sub: &mut restaurant_platform::bus::Subscription, max: usize) -> usize {
    let batch = sub
        .next_batch(max, Duration::from_millis(50))
        .await
        .unwrap();
    sub.ack(&batch).await.unwrap();
    sub.flush().await.unwrap();
    batch.len()
}

/// The positions of every event the log retains.
async fn positions(log: &EventLog) -> Vec<i64> {
    let all = log.read_from(0, 100).await.unwrap();
    all.iter().map(|d| d.position).collect()
}

/// A log of six events and two consumers, "ahead" and "behind", that have
/// read nothing yet; the log's directory lives as long as the first.
async fn six_events_and_two_consumers() -> (
    tempfile::TempDir,
    EventLog,
    Bus,
    Vec<i64>,
    restaurant_platform::bus::Subscription,
    restaurant_platform::bus::Subscription,
) {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(&dir.path().join("events.db"), false)
        .await
        .unwrap();
    let bus = Bus::Embedded(log.clone());
    for i in 0..6 {
        bus.publish(&[outgoing(&placed(&format!("p{i}")))])
            .await
            .unwrap();
    }
    let first = positions(&log).await;
    assert_eq!(first.len(), 6);
    let ahead = bus.subscribe("ahead", Recorder::TYPES).await.unwrap();
    let behind = bus.subscribe("behind", Recorder::TYPES).await.unwrap();
    (dir, log, bus, first, ahead, behind)
}

/// The backlog check refuses while the consumer farthest behind trails by
/// more than the limit, names it, and admits again once it has read on;
/// without a limit nothing is refused.
#[tokio::test]
async fn the_backlog_refuses_while_a_consumer_trails_past_the_limit() {
    use restaurant_platform::backlog::Backlog;
    let (_dir, _log, bus, _first, mut ahead, mut behind) = six_events_and_two_consumers().await;
    assert_eq!(read_and_save(&mut ahead, 5).await, 5);
    assert_eq!(read_and_save(&mut behind, 1).await, 1);
    let at_limit = Backlog::new(Some(5));
    assert_eq!(at_limit.check(&bus).await.unwrap(), 5);
    assert!(at_limit.admit().is_ok(), "5 behind is within a limit of 5");

    let backlog = Backlog::new(Some(3));
    assert!(backlog.admit().is_ok(), "nothing refused before a check");
    assert_eq!(backlog.check(&bus).await.unwrap(), 5);
    let refused = backlog.admit().unwrap_err();
    assert_eq!(refused.status, 503);
    assert_eq!(refused.retry_after, Some(Duration::from_secs(1)));
    let body = serde_json::to_value(&refused).unwrap();
    assert_eq!(body["consumer"], "behind");
    assert_eq!(body["behind"], 5);

    assert_eq!(read_and_save(&mut behind, 3).await, 3);
    assert_eq!(backlog.check(&bus).await.unwrap(), 2);
    assert!(backlog.admit().is_ok(), "back within the limit");

    let unbounded = Backlog::new(None);
    unbounded.check(&bus).await.unwrap();
    assert!(unbounded.admit().is_ok());
}

/// The embedded log drops events past its retention once every consumer
/// with a saved position has passed them: never one a known consumer has
/// not read, never one younger than the cut, and never the newest (the
/// next append numbers its events after it).
#[tokio::test]
async fn the_log_prunes_only_old_events_every_known_consumer_has_passed() {
    let (_dir, log, bus, first, mut ahead, mut behind) = six_events_and_two_consumers().await;
    assert_eq!(read_and_save(&mut ahead, 4).await, 4);
    assert_eq!(read_and_save(&mut behind, 2).await, 2);
    // What the gauge of each consumer's distance shows.
    assert_eq!(
        log.consumers_behind().await.unwrap(),
        [("ahead".to_owned(), 2), ("behind".to_owned(), 4)]
    );

    let day = 86_400_000;
    let now = restaurant_contract::now_ms();
    let all = i64::MAX;
    assert_eq!(
        log.prune(now - day, all).await.unwrap(),
        0,
        "nothing is old yet"
    );
    assert_eq!(
        log.prune(now + day, all).await.unwrap(),
        2,
        "what both passed"
    );
    assert_eq!(positions(&log).await, first[2..]);

    assert_eq!(read_and_save(&mut behind, 10).await, 4);
    assert_eq!(read_and_save(&mut ahead, 10).await, 2);
    assert_eq!(
        log.prune(now + day, all).await.unwrap(),
        3,
        "all but the newest"
    );
    assert_eq!(positions(&log).await, first[5..]);

    // The sequence goes on after the newest, and both consumers get it.
    bus.publish(&[outgoing(&placed("later"))]).await.unwrap();
    assert_eq!(positions(&log).await, [first[5], first[5] + 1]);
    assert_eq!(read_and_save(&mut ahead, 10).await, 1);
    assert_eq!(read_and_save(&mut behind, 10).await, 1);
}

/// Beyond its most events the log drops the oldest, however young, and
/// again only what every known consumer has passed; never the newest.
#[tokio::test]
async fn the_log_keeps_at_most_its_newest_events_that_every_known_consumer_has_passed() {
    let (_dir, log, bus, first, mut ahead, mut behind) = six_events_and_two_consumers().await;
    assert_eq!(read_and_save(&mut ahead, 5).await, 5);
    assert_eq!(read_and_save(&mut behind, 1).await, 1);

    let young = restaurant_contract::now_ms() - 86_400_000;
    assert_eq!(log.prune(young, 6).await.unwrap(), 0, "within the bound");
    assert_eq!(log.prune(young, 2).await.unwrap(), 1, "what both passed");
    assert_eq!(positions(&log).await, first[1..]);

    assert_eq!(read_and_save(&mut behind, 10).await, 5);
    assert_eq!(
        log.prune(young, 2).await.unwrap(),
        3,
        "down to the newest two"
    );
    assert_eq!(positions(&log).await, first[4..]);
    assert_eq!(read_and_save(&mut ahead, 10).await, 1);
    assert_eq!(log.prune(young, 0).await.unwrap(), 1, "the newest stays");
    assert_eq!(positions(&log).await, first[5..]);

    bus.publish(&[outgoing(&placed("later"))]).await.unwrap();
    assert_eq!(positions(&log).await, [first[5], first[5] + 1]);
    assert_eq!(read_and_save(&mut ahead, 10).await, 1);
    assert_eq!(read_and_save(&mut behind, 10).await, 1);
}

/// A pass larger than one statement's chunk deletes in several, resting
/// between them, and still leaves only the newest.
#[tokio::test]
async fn the_log_prunes_a_backlog_larger_than_a_chunk_in_several() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(&dir.path().join("events.db"), false)
        .await
        .unwrap();
    let bus = Bus::Embedded(log.clone());
    let mut reader = bus.subscribe("reader", Recorder::TYPES).await.unwrap();
    let batch: Vec<_> = (0..600)
        .map(|i| outgoing(&placed(&format!("p{i}"))))
        .collect();
    bus.publish(&batch).await.unwrap();
    assert_eq!(read_and_save(&mut reader, 1_000).await, 600);
    let young = restaurant_contract::now_ms() - 86_400_000;
    assert_eq!(log.prune(young, 1).await.unwrap(), 599);
    assert_eq!(log.read_from(0, 1_000).await.unwrap().len(), 1);
}
