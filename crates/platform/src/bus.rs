//! The event bus. One enum, one variant per transport, so that the services
//! and the consumer loop are written once: [`EventLog`] is the embedded
//! durable log used by `restaurant up` (a SQLite file, no server).
//!
//! Semantics every variant keeps: publishing is idempotent on the event id;
//! delivery is at-least-once and in publish order per subscription; a
//! subscription's position is durable and advances only when acknowledged.

use std::{path::Path, sync::Arc, time::Duration};

use restaurant_contract::now_ms;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::watch;

use crate::db::{Db, DbOptions, placeholders};

/// A committed outbox row on its way to the bus.
#[derive(Debug, Clone)]
pub struct OutgoingEvent {
    pub event_id: String,
    pub order_id: String,
    pub event_type: String,
    pub payload: String,
}

/// One message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub payload: String,
    /// Where this message sits in the subscription; acknowledging it
    /// acknowledges everything before it too.
    pub position: i64,
}

#[derive(Clone, Debug)]
pub enum Bus {
    Embedded(EventLog),
}

impl Bus {
    pub async fn publish(&self, batch: &[OutgoingEvent]) -> anyhow::Result<()> {
        match self {
            Bus::Embedded(log) => log.append(batch).await,
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
        }
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        match self {
            Bus::Embedded(log) => Ok(log.db.ping().await?),
        }
    }
}

pub enum Subscription {
    Embedded(LogSubscription),
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
        }
    }

    /// Durably acknowledges `d` and everything delivered before it.
    pub async fn ack(&mut self, d: &Delivery) -> anyhow::Result<()> {
        match self {
            Subscription::Embedded(s) => s.ack(d.position).await,
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
}

impl EventLog {
    /// Opens the log for use by one process.
    pub async fn open(path: &Path, fsync: bool) -> anyhow::Result<EventLog> {
        Self::open_with_poll(path, fsync, Duration::from_secs(1)).await
    }

    /// Opens a log that other processes append to as well.
    pub async fn open_shared(path: &Path, fsync: bool) -> anyhow::Result<EventLog> {
        Self::open_with_poll(path, fsync, Duration::from_millis(20)).await
    }

    async fn open_with_poll(path: &Path, fsync: bool, poll: Duration) -> anyhow::Result<EventLog> {
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
        Ok(EventLog {
            db,
            last_seq: Arc::new(watch::Sender::new(last)),
            poll,
        })
    }

    async fn append(&self, batch: &[OutgoingEvent]) -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin().await?;
        // One multi-row insert per batch: a few hundred events cost one
        // statement and one commit.
        for chunk in batch.chunks(100) {
            let values = (0..chunk.len())
                .map(|i| format!("({})", placeholders(i * 5 + 1, 5)))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO events (event_id, order_id, event_type, payload, appended_at) \
                 VALUES {values} ON CONFLICT (event_id) DO NOTHING"
            );
            let now = now_ms();
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for e in chunk {
                q = q
                    .bind(&e.event_id)
                    .bind(&e.order_id)
                    .bind(&e.event_type)
                    .bind(&e.payload)
                    .bind(now);
            }
            q.execute(&mut *tx).await?;
        }
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM events")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        self.last_seq.send_replace(last);
        Ok(())
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
            wake: self.last_seq.subscribe(),
            poll: self.poll,
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
                })
            })
            .collect()
    }

    pub async fn close(&self) {
        self.db.close().await;
    }
}

pub struct LogSubscription {
    db: Db,
    consumer: String,
    types: &'static [&'static str],
    /// Last position handed out.
    position: i64,
    /// Last position durably acknowledged.
    acked: i64,
    wake: watch::Receiver<i64>,
    poll: Duration,
}

impl LogSubscription {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> anyhow::Result<Vec<Delivery>> {
        if *self.wake.borrow_and_update() <= self.position {
            // Nothing new as far as we know: sleep until an append or the
            // timeout (the timeout also covers appends by another process).
            let _ = tokio::time::timeout(wait.min(self.poll), self.wake.changed()).await;
        }
        // Read the head before querying: every event up to it is committed,
        // so if the query finds none of ours, none of ours is at or below it.
        let head = *self.wake.borrow_and_update();
        let sql = format!(
            "SELECT seq, payload FROM events WHERE seq > $1 AND event_type IN ({}) \
             ORDER BY seq LIMIT {max}",
            placeholders(2, self.types.len())
        );
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(self.position);
        for t in self.types {
            q = q.bind(*t);
        }
        let rows = q.fetch_all(self.db.reader()).await?;
        let batch: Vec<Delivery> = rows
            .iter()
            .map(|r| {
                Ok(Delivery {
                    position: r.try_get(0)?,
                    payload: r.try_get(1)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        if let Some(last) = batch.last() {
            self.position = last.position;
        } else {
            // Skip over events of other types so the next scan starts later.
            if head > self.position {
                self.position = head;
                self.ack(head).await?;
            }
        }
        Ok(batch)
    }

    async fn ack(&mut self, position: i64) -> anyhow::Result<()> {
        if position <= self.acked {
            return Ok(());
        }
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
