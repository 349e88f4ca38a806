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
    db::{Db, DbOptions, Params, rows_per_statement},
    tail::{Tail, TailEvent},
};

/// A committed outbox row on its way to the bus.
#[derive(Debug, Clone)]
pub struct OutgoingEvent {
    pub event_id: String,
    pub order_id: String,
    pub event_type: String,
    pub payload: String,
}

/// One message handed to a consumer.
#[derive(Debug)]
pub struct Delivery {
    pub payload: String,
    /// Where this message sits in the log (embedded) or stream (JetStream).
    pub position: i64,
    /// How many times it has been delivered, this time included.
    pub attempt: i64,
    /// The JetStream message, to acknowledge it.
    message: Option<async_nats::jetstream::Message>,
}

#[derive(Clone, Debug)]
pub enum Bus {
    Embedded(EventLog),
    Nats(Box<NatsBus>),
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
        // One multi-row insert per batch: a few hundred events cost one
        // statement and one commit.
        for chunk in batch.chunks(rows_per_statement(&tx, 6)) {
            let values = Params::of(&tx).rows(chunk.len(), 6);
            let sql = format!(
                "INSERT INTO events (seq, event_id, order_id, event_type, payload, appended_at) \
                 VALUES {values} ON CONFLICT (event_id) DO NOTHING"
            );
            let now = now_ms();
            let mut q = sqlx::query(AssertSqlSafe(sql)).persistent(false);
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
            .run(db.writer())
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
        let rows =
            sqlx::query("SELECT seq, payload FROM events WHERE seq > $1 ORDER BY seq LIMIT $2")
                .bind(after)
                .bind(max)
                .fetch_all(self.db.reader())
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
        let rows = q.fetch_all(self.db.reader()).await?;
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
        sqlx::query(
            "INSERT INTO consumer_positions (consumer, position) VALUES ($1, $2) \
             ON CONFLICT (consumer) DO UPDATE SET position = excluded.position",
        )
        .bind(&self.consumer)
        .bind(position)
        .execute(self.db.writer())
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
        js.get_or_create_stream(Config {
            name: stream.to_owned(),
            subjects: vec![format!("{stream}.events.>")],
            storage: StorageType::File,
            // Longer than any relay retry: a republished event within it is
            // dropped by the server.
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(30 * 24 * 3600),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating stream {stream}: {e}"))?;
        Ok(NatsBus {
            client,
            js,
            stream: stream.to_owned(),
        })
    }

    async fn publish(&self, batch: &[OutgoingEvent]) -> anyhow::Result<()> {
        use async_nats::jetstream::message::PublishMessage as Publish;
        // Pipelined: send the whole batch, then wait for every ack.
        let mut acks = Vec::with_capacity(batch.len());
        for e in batch {
            let msg = Publish::build()
                .payload(e.payload.clone().into())
                .message_id(&e.event_id);
            let subject = format!("{}.events.{}", self.stream, e.event_type);
            let ack = self
                .js
                .send_publish(subject, msg)
                .await
                .map_err(|err| anyhow::anyhow!("publish {}: {err}", e.event_id))?;
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
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| anyhow::anyhow!("stream {}: {e}", self.stream))?;
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
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| anyhow::anyhow!("stream {}: {e}", self.stream))?;
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

    async fn ping(&self) -> anyhow::Result<()> {
        use async_nats::connection::State;
        match self.client.connection_state() {
            State::Connected => Ok(()),
            state => anyhow::bail!("NATS connection is {state:?}"),
        }
    }
}

pub struct NatsSubscription {
    consumers: Vec<
        async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>,
    >,
    /// Messages pulled ahead by a task of their own (see `prefetch`).
    messages: Option<tokio::sync::mpsc::Receiver<anyhow::Result<async_nats::jetstream::Message>>>,
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
fn prefetch(
    streams: Vec<async_nats::jetstream::consumer::pull::Stream>,
    capacity: usize,
) -> tokio::sync::mpsc::Receiver<anyhow::Result<async_nats::jetstream::Message>> {
    use futures_util::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    tokio::spawn(async move {
        let mut merged = futures_util::stream::select_all(streams);
        loop {
            let item = tokio::select! {
                item = merged.next() => item,
                _ = tx.closed() => return,
            };
            let (item, last) = match item {
                Some(Ok(m)) => (Ok(m), false),
                Some(Err(e)) => (Err(anyhow::anyhow!("pull: {e}")), true),
                None => (Err(anyhow::anyhow!("pull ended")), true),
            };
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
    rx
}

impl NatsSubscription {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> anyhow::Result<Vec<Delivery>> {
        if self.messages.is_none() {
            // Pulled ahead is held in memory: the per-type consumers of one
            // subscription share one batch's worth (each pull keeps up to
            // one and a half of its batch in flight).
            let per_pull = (max / self.consumers.len().max(1)).max(32);
            let mut all = Vec::with_capacity(self.consumers.len());
            for c in &self.consumers {
                all.push(
                    c.stream()
                        .max_messages_per_batch(per_pull)
                        .messages()
                        .await
                        .map_err(|e| anyhow::anyhow!("pull: {e}"))?,
                );
            }
            self.messages = Some(prefetch(all, max));
        }
        let messages = self.messages.as_mut().expect("just set");
        let mut raw = Vec::new();
        let mut failed = None;
        match tokio::time::timeout(wait, messages.recv()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(Some(Ok(m))) => raw.push(m),
            Ok(Some(Err(e))) => failed = Some(e),
            Ok(None) => failed = Some(anyhow::anyhow!("pull ended")),
        }
        // Take whatever else is already here, without waiting.
        while failed.is_none() && raw.len() < max {
            match messages.try_recv() {
                Ok(Ok(m)) => raw.push(m),
                Ok(Err(e)) => failed = Some(e),
                Err(_) => break,
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
            out.push(Delivery {
                payload: String::from_utf8_lossy(&m.payload).into_owned(),
                position,
                attempt,
                message: Some(m),
            });
        }
        Ok(out)
    }
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
            out.push(Delivery {
                payload: String::from_utf8_lossy(&m.payload).into_owned(),
                position,
                attempt: 1,
                message: None,
            });
        }
        Ok(out)
    }
}
