//! The event bus. One enum, one variant per transport, so that the services
//! and the consumer loop are written once: [`EventLog`] is the embedded
//! durable log used by `restaurant up` (a SQLite file, no server);
//! [`NatsBus`] is NATS JetStream, for services run apart and replicated.
//!
//! Semantics every variant keeps: publishing is idempotent on the event id;
//! delivery is at-least-once and in publish order per subscription; a
//! subscription's position is durable and advances only when acknowledged.

use std::{path::Path, sync::Arc, time::Duration};

use restaurant_contract::now_ms;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::watch;

use crate::{
    batch::Batcher,
    db::{Db, DbOptions, Params, kept_chunks},
    tail::{Tail, TailEvent},
};

/// A committed outbox row on its way to the bus.
#[derive(Debug, Clone)]
pub struct OutgoingEvent {
    pub event_id: String,
    pub order_id: String,
    pub event_type: String,
    pub payload: String,
    /// The outbox row it was written in (its `seq`). On JetStream the
    /// events of one row and type travel as one message
    /// ([`messages_of`]); the row makes that packing the same every time
    /// a relay publishes the row again.
    pub row: i64,
}

impl OutgoingEvent {
    /// `env` as written in outbox row `row`.
    pub fn new(env: &restaurant_contract::Envelope, row: i64) -> Self {
        OutgoingEvent {
            event_id: env.event_id.clone(),
            order_id: env.order_id.clone(),
            event_type: env.event_type.clone(),
            payload: env.to_json(),
            row,
        }
    }
}

/// One message handed to a consumer.
#[derive(Debug)]
pub struct Delivery {
    pub payload: String,
    /// Where this message sits in the log (embedded) or stream (JetStream).
    pub position: i64,
    /// How many times it has been delivered, this time included.
    pub attempt: i64,
    /// The JetStream message, to acknowledge it: held by the last event
    /// of a message only, so that a message is acknowledged when every
    /// event it carries is handled (a prefix that ends inside it leaves
    /// it to be delivered again whole, its handled events as duplicates).
    message: Option<async_nats::jetstream::Message>,
}

#[derive(Clone, Debug)]
pub enum Bus {
    Embedded(EventLog),
    /// Shared: every request clones its service's context, and a boxed
    /// bus was an allocation, a client and a string cloned each time.
    Nats(Arc<NatsBus>),
}

impl Bus {
    pub async fn publish(&self, batch: &[OutgoingEvent]) -> anyhow::Result<()> {
        match self {
            Bus::Embedded(log) => log.append(batch).await,
            Bus::Nats(nats) => nats.publish(batch).await,
        }
    }

    /// A durable subscription named `consumer` to events of `types`.
    pub async fn subscribe(
        &self,
        consumer: &str,
        types: &'static [&'static str],
    ) -> anyhow::Result<Subscription> {
        match self {
            Bus::Embedded(log) => Ok(Subscription::Embedded(
                log.subscribe(consumer, types).await?,
            )),
            Bus::Nats(nats) => Ok(Subscription::Nats(Box::new(
                nats.subscribe(consumer, types).await?,
            ))),
        }
    }

    /// Reads the retained history after `after` (a position), in order,
    /// for rebuilding read models. Consumers' positions are not touched.
    pub async fn replay(&self, after: i64) -> anyhow::Result<Replay> {
        match self {
            Bus::Embedded(log) => Ok(Replay::Embedded {
                log: log.clone(),
                after,
            }),
            Bus::Nats(nats) => Ok(Replay::Nats(Box::new(nats.replay(after).await?))),
        }
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        match self {
            Bus::Embedded(log) => Ok(log.db.ping().await?),
            Bus::Nats(nats) => nats.ping().await,
        }
    }

    /// How far each durable consumer trails, by name (see [`BEHIND_GAUGE`]).
    pub async fn consumers_behind(&self) -> anyhow::Result<Vec<(String, u64)>> {
        match self {
            Bus::Embedded(log) => log.consumers_behind().await,
            Bus::Nats(nats) => nats.consumers_behind().await,
        }
    }

    /// The last event appended, where this process sees every append (an
    /// embedded log only it writes); `None` where others append too.
    pub fn own_head(&self) -> Option<i64> {
        match self {
            Bus::Embedded(log) if log.tail.is_some() => Some(*log.last_seq.borrow()),
            _ => None,
        }
    }
}

pub enum Subscription {
    Embedded(LogSubscription),
    Nats(Box<NatsSubscription>),
}

impl Subscription {
    /// Up to `max` messages; waits up to `wait` for the first one.
    pub async fn next_batch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> anyhow::Result<Vec<Delivery>> {
        match self {
            Subscription::Embedded(s) => s.next_batch(max, wait).await,
            Subscription::Nats(s) => s.next_batch(max, wait).await,
        }
    }

    /// Makes every acknowledgement so far durable (the embedded log saves
    /// positions lazily); on NATS acks are already sent.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            Subscription::Embedded(s) => s.save().await,
            Subscription::Nats(_) => Ok(()),
        }
    }

    /// Each message is acknowledged by itself (JetStream), rather than by a
    /// position that covers everything before it (the embedded log): only
    /// then may batches be applied, and acknowledged, out of order.
    pub fn acknowledges_each(&self) -> bool {
        matches!(self, Subscription::Nats(_))
    }

    /// Every event comes in one total order with rising positions (the
    /// embedded log), so a consumer's position is an exact record of what
    /// it has seen. JetStream's per-type consumers interleave: not there.
    pub fn total_order(&self) -> bool {
        matches!(self, Subscription::Embedded(_))
    }

    /// Acknowledges `handled`, a prefix of the last batch whose events were
    /// all applied, found duplicate, ignored or parked.
    pub async fn ack(&mut self, handled: &[Delivery]) -> anyhow::Result<()> {
        match self {
            // A log position acknowledges everything before it.
            Subscription::Embedded(s) => match handled.last() {
                Some(last) => s.ack(last.position).await,
                None => Ok(()),
            },
            Subscription::Nats(_) => {
                for d in handled {
                    if let Some(m) = &d.message {
                        m.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// A read of the retained history, batch by batch; an empty batch is the end.
pub enum Replay {
    Embedded { log: EventLog, after: i64 },
    Nats(Box<NatsReplay>),
}

impl Replay {
    pub async fn next_batch(&mut self, max: usize) -> anyhow::Result<Vec<Delivery>> {
        match self {
            Replay::Embedded { log, after } => {
                let batch = log.read_from(*after, max as i64).await?;
                if let Some(last) = batch.last() {
                    *after = last.position;
                }
                Ok(batch)
            }
            Replay::Nats(r) => r.next_batch(max).await,
        }
    }
}

/// The embedded durable event log: an append-only SQLite table. Appends wake
/// subscribers through a watch channel holding the last sequence number, so
/// consumers react in microseconds and never busy-poll.
#[derive(Clone, Debug)]
pub struct EventLog {
    db: Db,
    last_seq: Arc<watch::Sender<i64>>,
    /// How often an idle subscription looks for new events by itself. Appends
    /// in this process wake subscribers at once; appends by other processes
    /// sharing the file (services run apart with `restaurant serve`) can only
    /// be seen by looking, so there this is short.
    poll: Duration,
    /// The newest events, for this process's subscribers (see
    /// [`crate::tail`]); none when other processes append too.
    tail: Option<Arc<std::sync::Mutex<Tail>>>,
    /// Appends of this process, committed together (see [`Appender`]).
    appends: Batcher<Vec<OutgoingEvent>, Result<(), String>>,
}

/// Appends at most this many publishers' batches in one transaction.
const APPENDS_PER_COMMIT: usize = 16;

/// The log's group commit: the relays of every service in the process
/// append through one task, which commits whatever batches wait while the
/// previous commit runs in one transaction. Tail and head are updated in
/// commit order, by this one task. Before, each relay waited its turn
/// behind a mutex for a commit of its own (embedded shape under load: a
/// publish averaged 14 ms, 4.6 of them waiting for the lock).
#[derive(Clone)]
struct Appender {
    db: Db,
    last_seq: Arc<watch::Sender<i64>>,
    tail: Option<Arc<std::sync::Mutex<Tail>>>,
}

impl Appender {
    /// Appends `batch` (never empty: [`EventLog::append`] sends none).
    async fn append(&self, batch: &[OutgoingEvent]) -> anyhow::Result<()> {
        let mut tx = self.db.begin().await?;
        let before: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM events")
            .fetch_one(&mut *tx)
            .await?;
        // Every event gets its `seq` here, not from SQLite, so the insert
        // returns no rows: `RETURNING seq, event_id` sent every appended
        // event back through sqlx's row channel to this task, one
        // contended hand-off each (embedded shape under load: 228,319 rows
        // in 10 s, the second-costliest statement after the relays' reads).
        // The numbers above `before` are free: `Db::begin` took SQLite's
        // write lock before the read (`BEGIN IMMEDIATE`), so no appender,
        // in this process or another, can take them until we commit.
        let mut appended: Vec<(i64, &OutgoingEvent)> = Vec::with_capacity(batch.len());
        let mut next = before + 1;
        let now = now_ms();
        // Multi-row inserts of 32 events whose texts repeat, kept prepared
        // (`kept_chunks`): a few hundred events cost a few statements and
        // one commit, none of them prepared again.
        for chunk in kept_chunks(&tx, batch, 6) {
            let values = Params::of(&tx).rows(chunk.len(), 6);
            let sql = format!(
                "INSERT INTO events (seq, event_id, order_id, event_type, payload, appended_at) \
                 VALUES {values} ON CONFLICT (event_id) DO NOTHING"
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (i, e) in chunk.iter().enumerate() {
                q = q
                    .bind(next + i as i64)
                    .bind(&e.event_id)
                    .bind(&e.order_id)
                    .bind(&e.event_type)
                    .bind(&e.payload)
                    .bind(now);
            }
            let inserted = q.execute(&mut *tx).await?.rows_affected();
            if inserted == chunk.len() as u64 {
                appended.extend(chunk.iter().enumerate().map(|(i, e)| (next + i as i64, e)));
            } else {
                // Some were on the log already (a relay republishing after a
                // crash): read back which went in. Their numbers have gaps,
                // which readers of the log never assume away.
                let by_id: std::collections::HashMap<&str, &OutgoingEvent> =
                    chunk.iter().map(|e| (e.event_id.as_str(), e)).collect();
                let rows =
                    sqlx::query("SELECT seq, event_id FROM events WHERE seq >= $1 ORDER BY seq")
                        .bind(next)
                        .fetch_all(&mut *tx)
                        .await?;
                for row in rows {
                    let id: String = row.try_get(1)?;
                    if let Some(e) = by_id.get(id.as_str()) {
                        appended.push((row.try_get(0)?, e));
                    }
                }
            }
            next += chunk.len() as i64;
        }
        let last = appended.last().map_or(before, |(seq, _)| *seq);
        tx.commit().await?;
        if let Some(tail) = &self.tail {
            let events = appended
                .iter()
                .map(|(seq, e)| TailEvent {
                    seq: *seq,
                    event_type: e.event_type.clone(),
                    payload: e.payload.clone(),
                })
                .collect();
            tail.lock().expect("tail lock").extend(before, events, last);
        }
        self.last_seq.send_if_modified(|head| {
            let newer = last > *head;
            *head = (*head).max(last);
            newer
        });
        Ok(())
    }
}

/// How long events are kept for replays (rebuilding a read model): the
/// JetStream stream's `max_age`, and the embedded log's retention. The log
/// keeps an event longer while a consumer it knows has not passed it.
pub const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// The most events the embedded log keeps (~570 MB at the benchmark's
/// ~570 bytes an event, index included), however young: at the embedded
/// shape's full load (~20,000 events/s) 30 days alone bound nothing a disk
/// holds (~700 MB a minute). Past it, the oldest events every known
/// consumer has passed go first, as past [`RETENTION`].
pub const MAX_EVENTS: i64 = 1_000_000;
/// The most messages the JetStream stream keeps once every durable
/// consumer has acknowledged them. A message is the events of one outbox
/// row and type: under the benchmark's load ~9 events and ~3.5 KB (0.74
/// messages for an order's 7 events at 600 orders/s, distributed), so
/// ~860 MB and ~2.4 million events, against the log's ~570 MB; at one
/// event a message, far fewer.
pub const MAX_MESSAGES: u64 = 250_000;
/// How often the embedded log, and each process on a JetStream stream,
/// looks for what to drop (the first time a minute after it opens, not
/// while the system starts): every 10 s while events are appended, so that
/// at full load the log deletes ~200,000 at a time, not an hour's worth;
/// once an hour when nothing is appended (for the log, the age alone), so
/// an idle log is not read (of an idle stream, only its state is asked
/// for).
const PRUNE_EVERY: Duration = Duration::from_secs(10);
const PRUNE_IDLE_EVERY: Duration = Duration::from_secs(3600);
const PRUNE_FIRST_AFTER: Duration = Duration::from_secs(60);
/// Rows deleted per statement, so that the log's one writer (every relay's
/// appends wait for it) is never held for long. Under load (embedded, 2,000
/// orders/s, pruning to 100,000 events, sqlx's statement log): 1,000 rows
/// took 8.0 ms at the median, 14.2 at p90, 25.4 at most; 250 rows 2.4 / 4.5
/// / 14.8 ms (1,124 ms of the writer in all for ~96,000 rows).
const PRUNE_CHUNK: i64 = 250;
/// After each chunk the prune rests as long as the chunk took, so that it
/// has the log's writer (and, with the commits' syncs, a core) half the
/// time at most. Back to back, a pass on a slow phase of the two-core
/// host deleted 57,000 events in 2.7 s at ~12 ms a chunk while the system
/// ran at 800 orders/s, every relay's append queued behind each chunk; a
/// pass of the embedded shape's first minute at full load is ~1,000 chunks.
/// At half the time, with chunks of ~2.4 ms, it deletes ~50,000 events a
/// second, more than twice what the shape appends at 3,000 orders/s; where
/// it falls behind, the next pass goes on from where this one stopped.
const PRUNE_REST: u32 = 1;

/// Events the tail keeps: ~0.7 s of the embedded shape's peak rate, far
/// more than any consumer trails by when it keeps up (~10-100 ms), and a
/// few MiB.
const TAIL_EVENTS: usize = 4_096;

impl EventLog {
    /// Opens the log for use by one process.
    pub async fn open(path: &Path, fsync: bool) -> anyhow::Result<EventLog> {
        Self::open_with_poll(path, fsync, Duration::from_secs(1), true).await
    }

    /// Opens a log that other processes append to as well.
    pub async fn open_shared(path: &Path, fsync: bool) -> anyhow::Result<EventLog> {
        Self::open_with_poll(path, fsync, Duration::from_millis(20), false).await
    }

    async fn open_with_poll(
        path: &Path,
        fsync: bool,
        poll: Duration,
        tail: bool,
    ) -> anyhow::Result<EventLog> {
        let url = format!("sqlite://{}", path.display());
        let opts = DbOptions {
            fsync,
            max_connections: 4,
        };
        let db = Db::open(&url, opts).await?;
        sqlx::migrate!("migrations/eventlog")
            .run(&mut *db.write_conn().await?)
            .await?;
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM events")
            .fetch_one(db.reader())
            .await?;
        let appender = Appender {
            db: db.clone(),
            last_seq: Arc::new(watch::Sender::new(last)),
            tail: tail.then(|| Arc::new(std::sync::Mutex::new(Tail::new(last, TAIL_EVENTS)))),
        };
        let group = appender.clone();
        let (appends, task) = Batcher::new(
            "eventlog_append",
            APPENDS_PER_COMMIT,
            move |batches: Vec<Vec<OutgoingEvent>>| {
                let group = group.clone();
                async move {
                    let n = batches.len();
                    let all: Vec<OutgoingEvent> = batches.into_iter().flatten().collect();
                    let result = group.append(&all).await.map_err(|e| format!("{e:#}"));
                    vec![result; n]
                }
            },
        );
        tokio::spawn(task);
        tokio::spawn(prune_until_closed(
            db.clone(),
            appender.last_seq.subscribe(),
        ));
        Ok(EventLog {
            db,
            last_seq: appender.last_seq,
            poll,
            tail: appender.tail,
            appends,
        })
    }

    async fn append(&self, batch: &[OutgoingEvent]) -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        match self.appends.submit(batch.to_vec()).await {
            Some(result) => result.map_err(anyhow::Error::msg),
            None => anyhow::bail!(
                "the append was not answered (its batch panicked, or the log is closing)"
            ),
        }
    }

    async fn subscribe(
        &self,
        consumer: &str,
        types: &'static [&'static str],
    ) -> anyhow::Result<LogSubscription> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM consumer_positions WHERE consumer = $1")
                .bind(consumer)
                .fetch_optional(self.db.reader())
                .await?;
        Ok(LogSubscription {
            db: self.db.clone(),
            consumer: consumer.to_owned(),
            types,
            position: position.unwrap_or(0),
            acked: position.unwrap_or(0),
            pending: position.unwrap_or(0),
            last_save: std::time::Instant::now(),
            wake: self.last_seq.subscribe(),
            poll: self.poll,
            tail: self.tail.clone(),
        })
    }

    /// Every retained event in order, for rebuilding read models and tests.
    pub async fn read_from(&self, after: i64, max: i64) -> anyhow::Result<Vec<Delivery>> {
        let rows = self
            .db
            .read_with(async |c| {
                sqlx::query("SELECT seq, payload FROM events WHERE seq > $1 ORDER BY seq LIMIT $2")
                    .bind(after)
                    .bind(max)
                    .fetch_all(c)
                    .await
            })
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Delivery {
                    position: r.try_get(0)?,
                    payload: r.try_get(1)?,
                    attempt: 1,
                    message: None,
                })
            })
            .collect()
    }

    pub async fn close(&self) {
        self.db.close().await;
    }

    /// Deletes the events appended before `before` (epoch ms), and the
    /// oldest beyond the newest `max_events`, that every consumer whose
    /// position the log keeps has passed; returns how many. A consumer
    /// that has not saved a position yet holds nothing back (it starts
    /// from what is retained, as on JetStream); one that has, however long
    /// ago, keeps what it has not read, so a consumer that was down past
    /// the retention still gets every event it missed.
    pub async fn prune(&self, before: i64, max_events: i64) -> anyhow::Result<u64> {
        prune(&self.db, before, max_events).await
    }

    /// How many events each consumer that has saved a position trails the
    /// newest by, by name (see [`BEHIND_GAUGE`]).
    pub async fn consumers_behind(&self) -> anyhow::Result<Vec<(String, u64)>> {
        consumers_behind(&self.db).await
    }
}

/// The gauge of how far each consumer trails, set at every prune pass of
/// the bus (every 10 s while events arrive) and, in the order service,
/// every second by its backlog check ([`crate::backlog`]): on the log the
/// events after its saved position, on JetStream the messages of its
/// subject it has not acknowledged. A consumer stuck for good holds
/// everything after it on either bus, which then grows; this is where that
/// shows first, and past the backlog limit new orders are refused.
pub const BEHIND_GAUGE: &str = "bus_consumer_behind";

/// [`EventLog::consumers_behind`] of the log in `db`.
async fn consumers_behind(db: &Db) -> anyhow::Result<Vec<(String, u64)>> {
    let rows: Vec<(String, i64)> = db
        .read_with(async |c| {
            sqlx::query_as(
                "SELECT consumer, (SELECT COALESCE(MAX(seq), 0) FROM events) - position \
                 FROM consumer_positions ORDER BY consumer",
            )
            .fetch_all(c)
            .await
        })
        .await?;
    Ok(rows
        .into_iter()
        .map(|(consumer, behind)| (consumer, behind.max(0) as u64))
        .collect())
}

/// Each durable consumer's messages not yet acknowledged, by name.
fn behind_of(durables: &[async_nats::jetstream::consumer::Info]) -> Vec<(String, u64)> {
    let mut behind: Vec<(String, u64)> = durables
        .iter()
        .map(|c| (c.name.clone(), c.num_pending + c.num_ack_pending as u64))
        .collect();
    behind.sort();
    behind
}

/// Whether a prune pass is due at `now` (the bus's head, the time), after
/// the last pass that succeeded: at once the first time and after a
/// failure, then when the head has moved, or every [`PRUNE_IDLE_EVERY`]
/// regardless.
fn prune_due<S: PartialEq>(
    pruned_at: &Option<(S, tokio::time::Instant)>,
    now: &(S, tokio::time::Instant),
) -> bool {
    pruned_at
        .as_ref()
        .is_none_or(|(head, at)| *head != now.0 || now.1.duration_since(*at) >= PRUNE_IDLE_EVERY)
}

pub(crate) fn set_behind(behind: &[(String, u64)]) {
    for (consumer, n) in behind {
        metrics::gauge!(BEHIND_GAUGE, "consumer" => consumer.clone()).set(*n as f64);
    }
}

/// [`EventLog::prune`] of the log in `db`.
async fn prune(db: &Db, before: i64, max_events: i64) -> anyhow::Result<u64> {
    // Positions are saved lazily, so the saved minimum trails what the
    // consumers have acknowledged: never ahead of it.
    let (passed, newest): (i64, i64) = db
        .read_with(async |c| {
            sqlx::query_as(
                "SELECT (SELECT COALESCE(MIN(position), 0) FROM consumer_positions), \
                        (SELECT COALESCE(MAX(seq), 0) FROM events)",
            )
            .fetch_one(c)
            .await
        })
        .await?;
    // `seq`s have gaps (an append that lost a race for an event id), so
    // at most `max_events` are left above the cut.
    let beyond = newest.saturating_sub(max_events.max(1));
    let upto = if beyond >= passed {
        // All that every consumer has passed is beyond the bound.
        passed
    } else {
        // `appended_at` rises with `seq` (one appender at a time, in `seq`
        // order; a clock set back only keeps events longer), so the old
        // events are a prefix: the first young one bounds it. The scan
        // starts past what the count drops anyway and stops at `passed`,
        // however many old events a consumer holds back, so the cut lies
        // between the two.
        let young: Option<i64> = db
            .read_with(async |c| {
                sqlx::query_scalar(
                    "SELECT seq FROM events WHERE seq > $1 AND seq <= $2 AND appended_at >= $3 \
                     ORDER BY seq LIMIT 1",
                )
                .bind(beyond)
                .bind(passed)
                .bind(before)
                .fetch_optional(c)
                .await
            })
            .await?;
        young.map_or(passed, |seq| seq - 1)
    };
    // The newest event always stays: appends number theirs after the
    // largest `seq` in the table, and an empty table would start again at
    // 1, behind every consumer's position.
    let mut deleted = 0;
    loop {
        let started = tokio::time::Instant::now();
        let n = db
            .execute(
                sqlx::query(
                    "DELETE FROM events WHERE seq IN \
                     (SELECT seq FROM events WHERE seq <= $1 \
                      AND seq < (SELECT MAX(seq) FROM events) ORDER BY seq LIMIT $2)",
                )
                .bind(upto)
                .bind(PRUNE_CHUNK),
            )
            .await?
            .rows_affected();
        deleted += n;
        if n < PRUNE_CHUNK as u64 {
            return Ok(deleted);
        }
        tokio::time::sleep(started.elapsed() * PRUNE_REST).await;
    }
}

/// Prunes the log (see [`EventLog::prune`]) until it is closed: every
/// [`PRUNE_EVERY`] when `head` (the last appended `seq`) has moved since,
/// every [`PRUNE_IDLE_EVERY`] regardless. Without it the log kept every
/// event: ~700 MB a minute at the embedded shape's full load.
async fn prune_until_closed(db: Db, head: watch::Receiver<i64>) {
    tokio::time::sleep(PRUNE_FIRST_AFTER).await;
    // The head and the time of the last pass that succeeded.
    let mut pruned_at: Option<(i64, tokio::time::Instant)> = None;
    while !db.is_closed() {
        let now = (*head.borrow(), tokio::time::Instant::now());
        if prune_due(&pruned_at, &now) {
            let before = now_ms() - RETENTION.as_millis() as i64;
            // A failed pass is tried again at the next interval.
            pruned_at = match prune(&db, before, MAX_EVENTS).await {
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(events = n, "pruned the event log past its retention");
                    }
                    if let Ok(behind) = consumers_behind(&db).await {
                        set_behind(&behind);
                    }
                    Some(now)
                }
                Err(_) if db.is_closed() => None,
                Err(e) => {
                    tracing::warn!(error = %e, "pruning the event log failed");
                    None
                }
            };
        }
        tokio::time::sleep(PRUNE_EVERY).await;
    }
}

/// How often a log subscription saves its position while busy.
const POSITION_SAVE_EVERY: Duration = Duration::from_millis(100);

pub struct LogSubscription {
    db: Db,
    consumer: String,
    types: &'static [&'static str],
    /// Last position handed out.
    position: i64,
    /// Last position durably acknowledged.
    acked: i64,
    /// Last position acknowledged, saved or not.
    pending: i64,
    last_save: std::time::Instant,
    wake: watch::Receiver<i64>,
    poll: Duration,
    tail: Option<Arc<std::sync::Mutex<Tail>>>,
}

impl LogSubscription {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> anyhow::Result<Vec<Delivery>> {
        let mut idle = false;
        if *self.wake.borrow_and_update() <= self.position {
            // Nothing new as far as we know: sleep until an append or the
            // timeout (the timeout also covers appends by another process).
            idle = tokio::time::timeout(wait.min(self.poll), self.wake.changed())
                .await
                .is_err();
        }
        // Read the head before querying: every event up to it is committed,
        // so if the query finds none of ours, none of ours is at or below it.
        let head = *self.wake.borrow_and_update();
        let recent = self.tail.as_ref().and_then(|tail| {
            tail.lock()
                .expect("tail lock")
                .read(self.position, self.types, max)
        });
        let (batch, upto) = match recent {
            Some((events, upto)) => {
                metrics::counter!("eventlog_reads_total", "from" => "tail").increment(1);
                let batch = events
                    .into_iter()
                    .map(|(position, payload)| Delivery {
                        position,
                        payload,
                        attempt: 1,
                        message: None,
                    })
                    .collect::<Vec<_>>();
                (batch, upto)
            }
            // Only this process appends to a log it keeps a tail of, and
            // `head` is its last commit: nothing is past our position. An
            // idle consumer used to read the table every `wait` to learn
            // that (80 of the ~440 SQLite round trips of an idle
            // `restaurant up` in 10 s).
            None if self.tail.is_some() && head <= self.position => (Vec::new(), head),
            None => {
                metrics::counter!("eventlog_reads_total", "from" => "table").increment(1);
                let batch = self.read_table(max).await?;
                let upto = batch.last().map_or(head, |d| d.position);
                (batch, upto)
            }
        };
        self.position = self.position.max(upto);
        if batch.is_empty() {
            // Skip over events of other types so the next scan starts
            // later. Nothing is in flight when a consumer asks again (one
            // batch at a time on this log), so all before is handled.
            self.pending = self.pending.max(self.position);
            // Idle: a good moment to save what was acknowledged. Not after
            // every append of other services' events, though: under load
            // that was ~200 commits/s on the log's one writer, each with
            // its fsync, competing with every relay.
            if idle {
                self.save().await?;
            } else {
                self.ack(self.pending).await?;
            }
        }
        Ok(batch)
    }

    /// Up to `max` events of this subscription's types after its position,
    /// from the table.
    async fn read_table(&self, max: usize) -> anyhow::Result<Vec<Delivery>> {
        let mut p = Params::for_db(&self.db);
        let sql = format!(
            "SELECT seq, payload FROM events WHERE seq > {} AND event_type IN ({}) \
             ORDER BY seq LIMIT {max}",
            p.one(),
            p.list(self.types.len())
        );
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(self.position);
        for t in self.types {
            q = q.bind(*t);
        }
        let rows = self.db.read_with(async |c| q.fetch_all(c).await).await?;
        Ok(rows
            .iter()
            .map(|r| {
                Ok(Delivery {
                    position: r.try_get(0)?,
                    payload: r.try_get(1)?,
                    attempt: 1,
                    message: None,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?)
    }

    /// Saves the position, at most every [`POSITION_SAVE_EVERY`]: every
    /// save is a commit on the log's one writer, shared by every service's
    /// relay. A position not yet saved when the process dies only means
    /// those events are delivered again, and consumers drop them as
    /// duplicates (the position is an optimisation, not the guarantee).
    async fn ack(&mut self, position: i64) -> anyhow::Result<()> {
        self.pending = self.pending.max(position);
        if self.last_save.elapsed() < POSITION_SAVE_EVERY {
            return Ok(());
        }
        self.save().await
    }

    async fn save(&mut self) -> anyhow::Result<()> {
        let position = self.pending;
        if position <= self.acked {
            return Ok(());
        }
        self.last_save = std::time::Instant::now();
        self.db
            .execute(
                sqlx::query(
                    "INSERT INTO consumer_positions (consumer, position) VALUES ($1, $2) \
                     ON CONFLICT (consumer) DO UPDATE SET position = excluded.position",
                )
                .bind(&self.consumer)
                .bind(position),
            )
            .await?;
        self.acked = position;
        Ok(())
    }
}

/// NATS JetStream as the bus. One stream holds every event under
/// `<stream>.events.<Type>`; file storage; a duplicate window makes publish
/// idempotent on `Nats-Msg-Id` = event id, so a relay that republishes
/// after a crash adds nothing. Each service is one durable pull consumer
/// shared by all its replicas (competing consumers), acks explicitly, and is
/// redelivered after `ack_wait` if a replica dies holding a message.
#[derive(Clone, Debug)]
pub struct NatsBus {
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    stream: String,
}

/// Deliveries after which an event is parked without trying it again: it
/// has been handed out this often only if the process handling it died
/// each time (a poison that crashes, not one that fails).
pub const MAX_DELIVERIES: i64 = 5;

/// Tries after the first at creating (or finding) the stream.
const STREAM_CREATE_TRIES: u32 = 3;

impl NatsBus {
    pub async fn connect(url: &str, stream: &str) -> anyhow::Result<NatsBus> {
        use async_nats::jetstream::stream::{Config, StorageType};
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to NATS at {url}: {e}"))?;
        let js = async_nats::jetstream::new(client.clone());
        let config = Config {
            name: stream.to_owned(),
            subjects: vec![format!("{stream}.events.>")],
            storage: StorageType::File,
            // Longer than any relay retry: a republished event within it is
            // dropped by the server.
            duplicate_window: Duration::from_secs(120),
            max_age: RETENTION,
            ..Default::default()
        };
        // A creation can fail for a moment on the server's side: nats-server
        // 2.9 removes an account's storage directory with its last stream,
        // and a stream created meanwhile fails with "error creating store
        // for stream" (10049; its log: `mkdir …/$G/streams/<name>: no such
        // file or directory`). Seen once in CI, where tests create and
        // delete streams side by side; the next try creates the directory.
        let mut tries = 0;
        loop {
            match js.get_or_create_stream(config.clone()).await {
                Ok(_) => break,
                Err(e) if tries < STREAM_CREATE_TRIES => {
                    tries += 1;
                    tracing::warn!(stream, error = %e, tries, "creating the stream failed; trying again");
                    tokio::time::sleep(Duration::from_millis(100 * tries as u64)).await;
                }
                Err(e) => anyhow::bail!("creating stream {stream}: {e}"),
            }
        }
        Ok(NatsBus {
            client,
            js,
            stream: stream.to_owned(),
        })
    }

    async fn publish(&self, batch: &[OutgoingEvent]) -> anyhow::Result<()> {
        use async_nats::jetstream::message::PublishMessage as Publish;
        // Pipelined: send every message, then wait for every ack.
        let messages = messages_of(batch);
        let mut acks = Vec::with_capacity(messages.len());
        for events in messages {
            let first = events[0];
            let mut payload = Vec::with_capacity(events.iter().map(|e| e.payload.len() + 1).sum());
            for (i, e) in events.iter().enumerate() {
                if i > 0 {
                    payload.push(b'\n');
                }
                payload.extend_from_slice(e.payload.as_bytes());
            }
            let msg = Publish::build()
                .payload(payload.into())
                .message_id(message_id(&events));
            let subject = format!("{}.events.{}", self.stream, first.event_type);
            let ack = self
                .js
                .send_publish(subject, msg)
                .await
                .map_err(|err| anyhow::anyhow!("publish {}: {err}", first.event_id))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        consumer: &str,
        types: &'static [&'static str],
    ) -> anyhow::Result<NatsSubscription> {
        use async_nats::jetstream::consumer::{AckPolicy, pull::Config};
        let stream = self.stream().await?;
        // nats-server 2.9 filters a consumer on one subject only. A service
        // that wants a few types gets one durable consumer per type, so the
        // server never sends it the rest of the traffic (without it every
        // service received and acknowledged every event: 28 deliveries per
        // order instead of 13; measured 793 -> 947 orders/s end to end in
        // docs/benchmarks.md). Order across types is not
        // kept; the handlers do not need it (every event may arrive late).
        let durables: Vec<(String, String)> = if types == restaurant_contract::Event::TYPES {
            vec![(consumer.to_owned(), String::new())]
        } else {
            types
                .iter()
                .map(|t| {
                    (
                        format!("{consumer}-{t}"),
                        format!("{}.events.{t}", self.stream),
                    )
                })
                .collect()
        };
        let mut consumers = Vec::with_capacity(durables.len());
        for (name, filter_subject) in durables {
            let c = stream
                .get_or_create_consumer(
                    &name,
                    Config {
                        durable_name: Some(name.clone()),
                        filter_subject,
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: Duration::from_secs(30),
                        // The consumer parks poison itself; these bound what
                        // the server does if processes keep dying mid-message.
                        max_deliver: MAX_DELIVERIES + 5,
                        backoff: vec![Duration::from_secs(1), Duration::from_secs(5)],
                        max_ack_pending: 10_000,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| anyhow::anyhow!("consumer {name}: {e}"))?;
            consumers.push(c);
        }
        Ok(NatsSubscription {
            consumers,
            messages: None,
            prefix: format!("{}.events.", self.stream),
            types,
        })
    }

    /// An ephemeral, unacknowledged consumer reading the stream from
    /// `after + 1`: a replay leaves no trace on the server.
    async fn replay(&self, after: i64) -> anyhow::Result<NatsReplay> {
        use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull::Config};
        let stream = self.stream().await?;
        let consumer = stream
            .create_consumer(Config {
                ack_policy: AckPolicy::None,
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: after.max(0) as u64 + 1,
                },
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("replay consumer: {e}"))?;
        Ok(NatsReplay { consumer })
    }

    /// Purges the oldest messages beyond the newest `max_messages` that
    /// every durable consumer of the stream has acknowledged; returns how
    /// many. The stream's own `max_age` drops the old ones; without this the
    /// rest stayed for those 30 days whatever their number (at 1,500
    /// orders/s, ~14 GB an hour). As on the embedded log, a message a
    /// durable consumer has not acknowledged stays, however far behind it
    /// is; replays (unacknowledged, ephemeral consumers) hold nothing back.
    pub async fn prune(&self, max_messages: u64) -> anyhow::Result<u64> {
        let stream = self.stream().await?;
        self.prune_pass(&stream, max_messages).await
    }

    /// How many messages of its subject each durable consumer has not
    /// acknowledged, by name (see [`BEHIND_GAUGE`]).
    pub async fn consumers_behind(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let stream = self.stream().await?;
        Ok(behind_of(&self.durables(&stream).await?))
    }

    /// The stream, fetched with its state.
    async fn stream(&self) -> anyhow::Result<async_nats::jetstream::stream::Stream> {
        self.js
            .get_stream(&self.stream)
            .await
            .map_err(|e| anyhow::anyhow!("stream {}: {e}", self.stream))
    }

    /// [`NatsBus::prune`] of `stream` as fetched, which also sets
    /// [`BEHIND_GAUGE`]: one listing of the consumers serves both.
    async fn prune_pass(
        &self,
        stream: &async_nats::jetstream::stream::Stream,
        max_messages: u64,
    ) -> anyhow::Result<u64> {
        let state = &stream.cached_info().state;
        // Listed after the stream's state was read: a consumer with nothing
        // pending now has acknowledged every message of its subject up to
        // `last_sequence`, whatever its ack floor says (a consumer of a
        // type that stopped arriving keeps an old floor).
        let durables = self.durables(stream).await?;
        set_behind(&behind_of(&durables));
        let mut upto = state.last_sequence.saturating_sub(max_messages);
        for c in &durables {
            if c.num_pending > 0 || c.num_ack_pending > 0 {
                upto = upto.min(c.ack_floor.stream_sequence);
            }
        }
        if upto < state.first_sequence {
            return Ok(0);
        }
        let purged = stream
            .purge()
            .sequence(upto + 1)
            .await
            .map_err(|e| anyhow::anyhow!("purging {}: {e}", self.stream))?
            .purged;
        Ok(purged)
    }

    /// The state of the stream's durable, acknowledging consumers: the
    /// services'. Replays (ephemeral, unacknowledged) are left out.
    async fn durables(
        &self,
        stream: &async_nats::jetstream::stream::Stream,
    ) -> anyhow::Result<Vec<async_nats::jetstream::consumer::Info>> {
        use async_nats::jetstream::consumer::AckPolicy;
        use futures_util::TryStreamExt;
        stream
            .consumers()
            .try_filter(|c| {
                std::future::ready(
                    c.config.durable_name.is_some() && c.config.ack_policy != AckPolicy::None,
                )
            })
            .try_collect()
            .await
            .map_err(|e| anyhow::anyhow!("consumers of {}: {e}", self.stream))
    }

    /// Prunes the stream (see [`NatsBus::prune`]) every [`PRUNE_EVERY`]
    /// while new messages arrive, until the bus is dropped. Every process
    /// on the stream runs one: a purge up to a sequence is idempotent, and
    /// each computes its cut from the consumers' state on the server.
    pub fn spawn_pruner(self: &Arc<Self>) {
        let bus = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(PRUNE_FIRST_AFTER).await;
            // The last sequence and the time of the last pass that succeeded.
            let mut pruned_at: Option<(u64, tokio::time::Instant)> = None;
            while let Some(nats) = bus.upgrade() {
                // A stream that cannot be read now is looked at next time.
                if let Ok(stream) = nats.stream().await {
                    let now = (
                        stream.cached_info().state.last_sequence,
                        tokio::time::Instant::now(),
                    );
                    if prune_due(&pruned_at, &now) {
                        pruned_at = match nats.prune_pass(&stream, MAX_MESSAGES).await {
                            Ok(n) => {
                                if n > 0 {
                                    tracing::info!(
                                        messages = n,
                                        "pruned the stream past its bound"
                                    );
                                }
                                Some(now)
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "pruning the stream failed");
                                None
                            }
                        };
                    }
                }
                drop(nats);
                tokio::time::sleep(PRUNE_EVERY).await;
            }
        });
    }

    async fn ping(&self) -> anyhow::Result<()> {
        use async_nats::connection::State;
        match self.client.connection_state() {
            State::Connected => Ok(()),
            state => anyhow::bail!("NATS connection is {state:?}"),
        }
    }
}

/// Events a JetStream message carries at most, and bytes of payload (one
/// larger event travels alone).
pub const MESSAGE_EVENTS: usize = 64;
pub const MESSAGE_BYTES: usize = 64 * 1024;
/// Bytes a pull asks for at most. Not less than the server's default
/// `max_payload` (1 MiB), so that every message it accepted fits: one
/// larger than a pull's bytes would never be delivered.
const PULL_BYTES: usize = 1024 * 1024;

/// Packs a relay's batch into JetStream messages: the events of one outbox
/// row and type, in their order, as lines of one message, at most
/// [`MESSAGE_EVENTS`] and [`MESSAGE_BYTES`] a message. One message per
/// event cost nats-server 0.24 ms of CPU per order at 1,500 orders/s, a
/// fifth of the whole system's (docs/benchmarks.md), and every service a
/// delivery and an acknowledgement per event; a busy service's outbox row
/// holds tens of events of one or two types.
///
/// Only the row decides the packing, never how a relay pass cut its batch,
/// so a row published again (a failed publish retried, or rows not yet
/// deleted when a relay died) makes the same messages under the same ids
/// ([`message_id`]), which the stream's duplicate window drops. Events of
/// different types part ways here, as they do on their subjects anyway.
pub fn messages_of(batch: &[OutgoingEvent]) -> Vec<Vec<&OutgoingEvent>> {
    // Each message with its payload's size.
    let mut messages: Vec<(Vec<&OutgoingEvent>, usize)> = Vec::new();
    for row in batch.chunk_by(|a, b| a.row == b.row) {
        let first = messages.len();
        for e in row {
            // The row's newest message of this type is the one still open.
            let open = messages[first..]
                .iter()
                .rposition(|(m, _)| m[0].event_type == e.event_type)
                .map(|i| first + i);
            match open {
                Some(i)
                    if messages[i].0.len() < MESSAGE_EVENTS
                        && messages[i].1 + 1 + e.payload.len() <= MESSAGE_BYTES =>
                {
                    messages[i].0.push(e);
                    messages[i].1 += 1 + e.payload.len();
                }
                _ => messages.push((vec![e], e.payload.len())),
            }
        }
    }
    messages.into_iter().map(|(m, _)| m).collect()
}

/// A message's `Nats-Msg-Id`: its one event's id, or the first event's id
/// and how many it carries. [`messages_of`] never packs an event into two
/// different messages, so the first id and the count name the content.
pub fn message_id(events: &[&OutgoingEvent]) -> String {
    match events {
        [one] => one.event_id.clone(),
        _ => format!("{}+{}", events[0].event_id, events.len()),
    }
}

pub struct NatsSubscription {
    consumers: Vec<
        async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>,
    >,
    /// Messages pulled ahead by a task of their own (see `prefetch`).
    messages: Option<Prefetched<async_nats::jetstream::Message>>,
    prefix: String,
    types: &'static [&'static str],
}

/// Pulls continuously, one pull per consumer, merged, and hands messages
/// over a channel. Why a task: async-nats asks the server for more only
/// when its stream is polled, and a consumer polls only between batches;
/// while it applied one (tens of milliseconds on a busy PostgreSQL), the
/// server had no pull request to answer (`num_waiting` 0 in the consumer's
/// info) and MyPage received ~5,000 events/s of the ~10,000/s produced,
/// in small batches. Pulled ahead, the next batch is waiting when the last
/// one commits. Ends when the subscription is dropped, or after an error
/// (reported through the channel; the next `next_batch` starts anew).
///
/// What waits in the channel is bounded by events, `budget`, not by
/// messages: a message carries one event or up to [`MESSAGE_EVENTS`], so
/// a bound in messages that lets single events flow held 64 times as many
/// packed ones. Measured, distributed shape, 600 orders/s with MyPage and
/// the couriers frozen for 15 s: while the order service drained the
/// couriers' backlog of packed messages it held ~14 MiB more than in the
/// steady state (the same for a backlog twice as long); bounded by events,
/// its peak went from 29.6-31.5 to 25.6-27.0 MiB, and closed-loop
/// throughput stayed the same (`bench/catchup.py`, docs/benchmarks.md).
fn prefetch<S, M, E>(pulled: S, budget: usize, events: fn(&M) -> usize) -> Prefetched<M>
where
    S: futures_util::Stream<Item = Result<M, E>> + Unpin + Send + 'static,
    M: Send + 'static,
    E: std::fmt::Display + Send,
{
    use futures_util::StreamExt;
    let budget = budget.max(1);
    // The channel is bounded by the permits; its own capacity only has to
    // let a budget of single events through.
    let (tx, rx) = tokio::sync::mpsc::channel(budget);
    let room = Arc::new(tokio::sync::Semaphore::new(budget));
    tokio::spawn(async move {
        let mut pulled = pulled;
        loop {
            let item = tokio::select! {
                item = pulled.next() => item,
                _ = tx.closed() => return,
            };
            let (item, last) = match item {
                Some(Ok(m)) => {
                    let n = events(&m);
                    // A message larger than the whole budget waits for an
                    // empty channel, and then goes alone. Waiting for room
                    // ends with the receiver too: it gives no room back.
                    let held = tokio::select! {
                        held = room.clone().acquire_many_owned(n.min(budget) as u32) => held,
                        _ = tx.closed() => return,
                    };
                    let Ok(held) = held else { return };
                    (Ok((m, n, held)), false)
                }
                Some(Err(e)) => (Err(anyhow::anyhow!("pull: {e}")), true),
                None => (Err(anyhow::anyhow!("pull ended")), true),
            };
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
    Prefetched { rx }
}

/// A pulled message and how many events it carries.
type Pulled<M> = anyhow::Result<(M, usize)>;

/// The receiving end of [`prefetch`]: a message travels with the room it
/// holds, which goes back as it is taken out.
struct Prefetched<M> {
    rx: tokio::sync::mpsc::Receiver<anyhow::Result<(M, usize, tokio::sync::OwnedSemaphorePermit)>>,
}

impl<M> Prefetched<M> {
    async fn recv(&mut self) -> Option<Pulled<M>> {
        let item = self.rx.recv().await?;
        Some(item.map(|(m, n, _room)| (m, n)))
    }

    fn try_recv(&mut self) -> Option<Pulled<M>> {
        let item = self.rx.try_recv().ok()?;
        Some(item.map(|(m, n, _room)| (m, n)))
    }
}

impl NatsSubscription {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> anyhow::Result<Vec<Delivery>> {
        if self.messages.is_none() {
            // Pulled ahead is held in memory: the per-type consumers of one
            // subscription share one batch's worth of messages (each pull
            // keeps up to one and a half of its batch in flight), a pull
            // at most PULL_BYTES (a message carries up to MESSAGE_EVENTS
            // events), and the channel two batches' worth of events: the
            // consumer applies two batches at once here.
            let per_pull = (max / self.consumers.len().max(1)).max(32);
            let mut all = Vec::with_capacity(self.consumers.len());
            for c in &self.consumers {
                all.push(
                    c.stream()
                        .max_messages_per_batch(per_pull)
                        .max_bytes_per_batch(PULL_BYTES)
                        .messages()
                        .await
                        .map_err(|e| anyhow::anyhow!("pull: {e}"))?,
                );
            }
            self.messages = Some(prefetch(
                futures_util::stream::select_all(all),
                2 * max,
                |m: &async_nats::jetstream::Message| lines(&m.payload),
            ));
        }
        let messages = self.messages.as_mut().expect("just set");
        let mut raw = Vec::new();
        // Events in `raw`: a message carries one or more (see `messages_of`).
        let mut events = 0;
        let mut failed = None;
        match tokio::time::timeout(wait, messages.recv()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(Some(Ok((m, n)))) => {
                events += n;
                raw.push(m);
            }
            Ok(Some(Err(e))) => failed = Some(e),
            Ok(None) => failed = Some(anyhow::anyhow!("pull ended")),
        }
        // Take whatever else is already here, without waiting; whole
        // messages only.
        while failed.is_none() && events < max {
            match messages.try_recv() {
                Some(Ok((m, n))) => {
                    events += n;
                    raw.push(m);
                }
                Some(Err(e)) => failed = Some(e),
                None => break,
            }
        }
        if let Some(e) = failed {
            self.messages = None;
            if raw.is_empty() {
                return Err(e);
            }
            // What arrived before the error is still ours to handle; the
            // next call pulls anew.
            tracing::warn!(error = %e, "pull failed; pulling anew");
        }
        let mut out = Vec::with_capacity(raw.len());
        for m in raw {
            let wanted = m
                .subject
                .as_str()
                .strip_prefix(self.prefix.as_str())
                .is_some_and(|t| self.types.contains(&t));
            if !wanted {
                // Not ours (a server older than 2.10 cannot filter a consumer
                // on several subjects): done with it at once.
                m.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                continue;
            }
            let (position, attempt) = m
                .info()
                .map(|i| (i.stream_sequence as i64, i.delivered))
                .unwrap_or((0, 1));
            let mut deliveries = split(&m.payload, position, attempt);
            deliveries.last_mut().expect("a message has a line").message = Some(m);
            out.extend(deliveries);
        }
        Ok(out)
    }
}

/// How many events a message's payload carries: one per line.
fn lines(payload: &[u8]) -> usize {
    1 + payload.iter().filter(|&&b| b == b'\n').count()
}

/// A message's events, one delivery per line, none holding the message
/// yet. A line that is not an envelope is the consumer's to park, by
/// itself.
fn split(payload: &[u8], position: i64, attempt: i64) -> Vec<Delivery> {
    String::from_utf8_lossy(payload)
        .split('\n')
        .map(|line| Delivery {
            payload: line.to_owned(),
            position,
            attempt,
            message: None,
        })
        .collect()
}

/// Deletes a stream (test runs clean up after themselves).
pub async fn delete_nats_stream(url: &str, stream: &str) -> anyhow::Result<()> {
    let client = async_nats::connect(url)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to NATS at {url}: {e}"))?;
    async_nats::jetstream::new(client)
        .delete_stream(stream)
        .await
        .map_err(|e| anyhow::anyhow!("deleting stream {stream}: {e}"))?;
    Ok(())
}

pub struct NatsReplay {
    consumer:
        async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>,
}

impl NatsReplay {
    async fn next_batch(&mut self, max: usize) -> anyhow::Result<Vec<Delivery>> {
        use futures_util::StreamExt;
        // `fetch` returns what is there now and no more: an empty batch is
        // the end of the history as of this read.
        let mut messages = self
            .consumer
            .fetch()
            .max_messages(max)
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("replay: {e}"))?;
        let mut out = Vec::new();
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| anyhow::anyhow!("replay: {e}"))?;
            let position = m.info().map(|i| i.stream_sequence as i64).unwrap_or(0);
            out.extend(split(&m.payload, position, 1));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(row: i64, n: usize, event_type: &str, bytes: usize) -> OutgoingEvent {
        OutgoingEvent {
            event_id: format!("e{row}-{n}"),
            order_id: "o".into(),
            event_type: event_type.into(),
            payload: "x".repeat(bytes),
            row,
        }
    }

    fn ids(messages: &[Vec<&OutgoingEvent>]) -> Vec<Vec<String>> {
        messages
            .iter()
            .map(|m| m.iter().map(|e| e.event_id.clone()).collect())
            .collect()
    }

    /// What is pulled ahead waits in the channel up to the budget in
    /// events, however many messages that is; taking messages out lets
    /// more in, and one message above the whole budget still goes, alone.
    // Paused time: each sleep passes only once the prefetch task waits.
    #[tokio::test(start_paused = true)]
    async fn prefetch_holds_at_most_its_budget_of_events() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let pulled = Arc::new(AtomicUsize::new(0));
        let count = pulled.clone();
        // Events per message: packed ones, single ones, one too large.
        let sizes = [64usize, 64, 1, 1, 1, 100, 64, 2];
        let source = futures_util::stream::iter(sizes).map(move |n| {
            count.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::convert::Infallible>(n)
        });
        use futures_util::StreamExt as _;
        let mut ahead = prefetch(source, 80, |n: &usize| *n);
        let settle = || tokio::time::sleep(Duration::from_millis(20));
        settle().await;
        // 64 fit; the next 64 would not: it is pulled and waits for room.
        assert_eq!(pulled.load(Ordering::SeqCst), 2);
        assert_eq!(ahead.recv().await.unwrap().unwrap(), (64, 64));
        settle().await;
        // Now 64 + 1 + 1 + 1 wait; the 100 (over the budget) waits for an
        // empty channel.
        assert_eq!(pulled.load(Ordering::SeqCst), 6);
        for want in [64, 1, 1, 1] {
            assert_eq!(ahead.try_recv().unwrap().unwrap().1, want);
        }
        assert!(ahead.try_recv().is_none(), "the large one waited");
        settle().await;
        assert_eq!(ahead.try_recv().unwrap().unwrap().1, 100);
        settle().await;
        assert_eq!(ahead.try_recv().unwrap().unwrap().1, 64);
        assert_eq!(ahead.try_recv().unwrap().unwrap().1, 2);
        assert!(ahead.recv().await.unwrap().is_err(), "the end is reported");
    }

    /// Dropped while its task waits for room, the prefetch ends, and with
    /// it the pulls it owns.
    // Paused time: each sleep passes only once the prefetch task waits.
    #[tokio::test(start_paused = true)]
    async fn prefetch_ends_when_dropped_while_waiting_for_room() {
        use futures_util::StreamExt as _;
        let owner = Arc::new(());
        let held = owner.clone();
        let source = futures_util::stream::iter([8usize, 8, 8]).map(move |n| {
            let _ = &held;
            Ok::<_, std::convert::Infallible>(n)
        });
        let ahead = prefetch(source, 10, |n: &usize| *n);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(Arc::strong_count(&owner), 2, "waiting for room");
        drop(ahead);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            Arc::strong_count(&owner),
            1,
            "the task and its stream are gone"
        );
    }

    #[test]
    fn a_row_travels_as_one_message_per_type_in_order() {
        let batch = vec![
            event(1, 0, "A", 10),
            event(1, 1, "B", 10),
            event(1, 2, "A", 10),
            event(2, 0, "A", 10),
        ];
        let messages = messages_of(&batch);
        assert_eq!(
            ids(&messages),
            vec![
                vec!["e1-0".to_owned(), "e1-2".to_owned()],
                vec!["e1-1".to_owned()],
                vec!["e2-0".to_owned()],
            ]
        );
        assert_eq!(message_id(&messages[0]), "e1-0+2");
        assert_eq!(message_id(&messages[1]), "e1-1");
    }

    #[test]
    fn a_message_holds_at_most_its_events_and_bytes_and_a_big_event_goes_alone() {
        let many: Vec<OutgoingEvent> = (0..MESSAGE_EVENTS + 1)
            .map(|n| event(1, n, "A", 10))
            .collect();
        let sizes: Vec<usize> = messages_of(&many).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![MESSAGE_EVENTS, 1]);

        let half = MESSAGE_BYTES / 2;
        // Two halves and their separator do not fit; the big one is alone.
        let big = vec![
            event(1, 0, "A", half),
            event(1, 1, "A", half),
            event(1, 2, "A", MESSAGE_BYTES * 2),
            event(1, 3, "A", 1),
        ];
        let sizes: Vec<usize> = messages_of(&big).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1, 1, 1, 1]);
        let fits = vec![event(1, 0, "A", half), event(1, 1, "A", half - 1)];
        assert_eq!(messages_of(&fits).len(), 1);
    }

    proptest! {
        /// What makes a republished row a duplicate on the server: its
        /// messages do not depend on the rows around it in a relay pass.
        /// And every event travels once, with its row and type, in order.
        #[test]
        fn packing_depends_on_the_row_alone_and_keeps_every_event_once(
            rows in proptest::collection::vec(
                proptest::collection::vec((0..3usize, 1..30_000usize), 1..150),
                1..6,
            )
        ) {
            let types = ["A", "B", "C"];
            let batch: Vec<OutgoingEvent> = rows
                .iter()
                .enumerate()
                .flat_map(|(r, row)| {
                    row.iter().enumerate().map(move |(n, &(t, bytes))| {
                        event(r as i64, n, types[t], bytes)
                    })
                })
                .collect();
            let together = messages_of(&batch);
            let apart: Vec<Vec<&OutgoingEvent>> = batch
                .chunk_by(|a, b| a.row == b.row)
                .flat_map(messages_of)
                .collect();
            prop_assert_eq!(ids(&together), ids(&apart));
            let mut seen: Vec<&str> = together
                .iter()
                .flat_map(|m| m.iter().map(|e| e.event_id.as_str()))
                .collect();
            seen.sort_unstable();
            let mut all: Vec<&str> = batch.iter().map(|e| e.event_id.as_str()).collect();
            all.sort_unstable();
            prop_assert_eq!(seen, all);
            for m in &together {
                prop_assert!(m.iter().all(|e| e.row == m[0].row && e.event_type == m[0].event_type));
                prop_assert!(m.len() <= MESSAGE_EVENTS);
                let bytes: usize = m.iter().map(|e| e.payload.len() + 1).sum::<usize>() - 1;
                prop_assert!(m.len() == 1 || bytes <= MESSAGE_BYTES);
            }
            // In order within a row and type: positions only rise.
            for r in 0..rows.len() as i64 {
                for t in types {
                    let order: Vec<usize> = together
                        .iter()
                        .flatten()
                        .filter(|e| e.row == r && e.event_type == t)
                        .map(|e| e.event_id.rsplit('-').next().unwrap().parse().unwrap())
                        .collect();
                    prop_assert!(order.windows(2).all(|w| w[0] < w[1]));
                }
            }
        }
    }
}
