//! Idempotent consumers with poison handling.
//!
//! Delivery is at-least-once, so the same event may arrive twice, late, or
//! out of order. A [`Consumer`] applies each event in one transaction of the
//! service's own database that also records `(consumer, event_id)` in
//! `processed_events`; a second delivery finds the record and does nothing.
//! Because the record and the effect commit together, a crash at any point
//! leaves either both or neither.
//!
//! The embedded log hands one consumer its events in one total order, so
//! there the record is a single number: the log position of the last event
//! applied or parked, in `consumer_offsets`, written in the transaction of
//! the effect. Everything at or below it is a redelivery. One row per batch
//! instead of one per event, and nothing to prune.
//!
//! An event that cannot be applied is retried a few times with backoff (a
//! transient failure: a lock timeout, a full disk) and then parked in
//! `dead_letters` with its error; one whose data violates the contract is
//! parked at once. Parking acknowledges it, so it never blocks the events
//! behind it. Parked events are listed and replayed over HTTP
//! (`/admin/dead-letters`).

use std::{future::Future, sync::Arc, time::Duration};

use restaurant_contract::{Envelope, Event, now_ms};
use serde::Serialize;
use sqlx::Row;

use crate::{
    bus::{Bus, MAX_DELIVERIES},
    db::{Backend, Db, Params, Planned, Tx, rows_per_statement},
    outbox::{AppendMark, OutboxSignal},
    shutdown::Shutdown,
};

/// Why an event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The event can never be applied (it contradicts the contract or the
    /// handler's invariants): park it without retrying.
    #[error("{0}")]
    Permanent(String),
    /// Possibly transient: retry, then park.
    #[error(transparent)]
    Transient(#[from] anyhow::Error),
}

impl From<sqlx::Error> for HandleError {
    fn from(e: sqlx::Error) -> Self {
        HandleError::Transient(e.into())
    }
}

/// Applies `batch` with `handler` in a transaction of its own on `db`, as
/// a consumer applies a batch it has deduplicated, but recording nothing:
/// for tests and tools that drive a handler directly.
pub async fn apply_batch<H: Handler>(
    db: &Db,
    handler: &H,
    batch: Vec<(Envelope, Event)>,
) -> Result<(), HandleError> {
    let mut tx = db.begin().await?;
    handler.handle_batch(&mut tx, batch).await?;
    tx.commit().await?;
    Ok(())
}

/// A service's reaction to events.
pub trait Handler: Send + Sync + 'static {
    /// The event types this handler wants; others are never delivered.
    const TYPES: &'static [&'static str];

    /// The types of [`TYPES`](Self::TYPES) whose events, applied a second
    /// time, in any order with the others, have no further effect (a
    /// projection that is a join of facts; an insert guarded by a unique
    /// key that emits only what it inserted; a state change that no later
    /// event undoes). For these the consumer keeps no dedup record: a
    /// row, its index entry and their WAL less per event (on PostgreSQL
    /// with JetStream, where the records are kept, 5 per order were 22% of
    /// the WAL records). The handler's own tests must show it.
    const IDEMPOTENT_TYPES: &'static [&'static str] = &[];

    /// The least time between the starts of two batches, after a batch
    /// that was not full (after a full one the next is taken at once).
    /// Zero (the default) takes each batch as soon as an event is there.
    /// A consumer whose effects nobody waits on may trade up to this much
    /// of its own lag for fewer, larger transactions: under load it then
    /// commits once per `LINGER` instead of as often as events trickle in,
    /// and leaves its database's one SQLite writer free for the work users
    /// wait on. After a quiet spell the first event is still taken at once.
    const LINGER: Duration = Duration::ZERO;

    /// [`LINGER`](Self::LINGER) on SQLite, where a batch holds the
    /// database's one writer and everything else that writes there waits
    /// for it (on PostgreSQL it locks only its rows).
    const LINGER_ON_SQLITE: Duration = Self::LINGER;

    /// Applies `event` inside `tx`. Everything the handler writes, including
    /// outgoing events through the outbox, commits with the dedup record.
    fn handle<'a>(
        &'a self,
        tx: &'a mut Tx,
        env: &'a Envelope,
        event: Event,
    ) -> impl Future<Output = Result<(), HandleError>> + Send + 'a;

    /// Applies a batch of new events (already deduplicated, in log order) in
    /// one transaction. The default applies them one by one; a handler whose
    /// work can be done in a few set-based statements overrides it, which is
    /// where a busy consumer's throughput comes from.
    fn handle_batch<'a>(
        &'a self,
        tx: &'a mut Tx,
        batch: Vec<(Envelope, Event)>,
    ) -> impl Future<Output = Result<(), HandleError>> + Send + 'a {
        async move {
            for (env, event) in batch {
                self.handle(tx, &env, event).await?;
            }
            Ok(())
        }
    }

    /// Whether [`handle_batch_planned`](Self::handle_batch_planned) is
    /// implemented. On SQLite, once the consumer knows its offset, batches
    /// then go through it: a batch that holds the database's one writer
    /// for each of its statements keeps everything else that writes there
    /// waiting (placements, for the order service's consumer).
    const PLANNED: bool = false;

    /// What [`handle_batch`](Self::handle_batch) does, over a [`Planned`]
    /// transaction: the rows the batch changes read with one
    /// [`Planned::read`], every write sent with [`Planned::commit`] (the
    /// consumer adds its offset there). Must not commit when it fails. Only
    /// called when [`PLANNED`](Self::PLANNED) says it is implemented.
    fn handle_batch_planned<'a>(
        &'a self,
        tx: &'a mut Planned,
        batch: Vec<(Envelope, Event)>,
    ) -> impl Future<Output = Result<(), HandleError>> + Send + 'a {
        let _ = (tx, batch);
        async { Err(HandleError::Permanent("no planned batches".into())) }
    }

    /// Runs after a successful commit, e.g. to wake a timer.
    fn after_commit(&self) {}
}

/// Moves a consumer's offset forward (never back).
fn offset_upsert(params: &mut Params) -> String {
    format!(
        "INSERT INTO consumer_offsets (consumer, position) VALUES ({}, {}) \
         ON CONFLICT (consumer) DO UPDATE SET position = excluded.position \
         WHERE excluded.position > consumer_offsets.position",
        params.one(),
        params.one()
    )
}

/// A handler's work, with a panic in it a permanent failure of what it was
/// applying, not of the consumer.
async fn unpanicked<T>(
    work: impl Future<Output = Result<T, HandleError>>,
) -> Result<T, HandleError> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .map_err(|_| HandleError::Permanent("the handler panicked".into()))?
}

/// The event ids of `items`.
fn ids(items: &[(Envelope, Event, i64)]) -> std::collections::HashSet<String> {
    items
        .iter()
        .map(|(env, _, _)| env.event_id.clone())
        .collect()
}

/// The events of `items` whose ids are in `fresh`, each once (a batch may
/// hold the same id twice), in order.
fn keep_fresh(
    mut items: Vec<(Envelope, Event, i64)>,
    mut fresh: std::collections::HashSet<String>,
) -> Vec<(Envelope, Event)> {
    items.retain(|(env, _, _)| fresh.remove(&env.event_id));
    items.into_iter().map(|(env, ev, _)| (env, ev)).collect()
}

/// Whether `env` is of a type its handler applies again without effect.
fn idempotent<H: Handler>(env: &Envelope) -> bool {
    H::IDEMPOTENT_TYPES.contains(&env.event_type.as_str())
}

#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub first_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            first_backoff: Duration::from_millis(20),
        }
    }
}

/// The outcome of offering one message to a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    /// A type this consumer does not handle (or this build does not know).
    Ignored,
    Parked,
}

pub struct Consumer<H> {
    name: String,
    db: Db,
    handler: Arc<H>,
    outbox: OutboxSignal,
    retry: RetryPolicy,
    /// The offset as this consumer last committed it, once known (the
    /// inner `None`: no offset recorded yet). Only this consumer's own loop
    /// writes its offset, one transaction at a time, so after its commit
    /// the table holds exactly this, and the next batch need not read it
    /// back: one statement of about seven per batch (4,612 of 40,951
    /// statements at 1,000 orders/s, `sqlx::query` log). Every other write
    /// of the offset forgets it (`save_offset`), and a batch takes it
    /// rather than reads it, so a batch that fails leaves it unknown.
    committed_offset: std::sync::Mutex<Option<Option<i64>>>,
}

const BATCH: usize = 512;
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// How long a dedup record is kept. A redelivery comes from an unacknowledged
/// batch (seconds) or a republished outbox batch (seconds); a week is far
/// beyond either, and keeps `processed_events` from growing without bound.
const DEDUP_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
const PRUNE_EVERY: Duration = Duration::from_secs(600);

impl<H: Handler> Consumer<H> {
    pub fn new(name: impl Into<String>, db: Db, handler: Arc<H>, outbox: OutboxSignal) -> Self {
        Consumer {
            name: name.into(),
            db,
            handler,
            outbox,
            retry: RetryPolicy::default(),
            committed_offset: std::sync::Mutex::new(None),
        }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Consumes until shutdown. A batch in hand is finished first: its
    /// events are applied and acknowledged, or (if cut short) redelivered.
    pub async fn run(self: Arc<Self>, bus: Bus, shutdown: Shutdown) {
        let mut sub = loop {
            match bus.subscribe(&self.name, H::TYPES).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(consumer = %self.name, error = %e, "subscribe failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.wait() => return,
                    }
                }
            }
        };
        self.consume(&mut sub, &shutdown).await;
        // Save the position acknowledged last, so a restart resumes there.
        if let Err(e) = sub.flush().await {
            tracing::warn!(consumer = %self.name, error = %e, "saving the position failed");
        }
    }

    async fn consume(&self, sub: &mut crate::bus::Subscription, shutdown: &Shutdown) {
        use futures_util::StreamExt;
        // Batches applied at once. On JetStream every message is
        // acknowledged by itself, so the next batch can be applied while the
        // last one commits (each waits on round trips to a busy database:
        // MyPage's took ~73 ms for ~500 events, 92% of its time). Concurrent
        // batches are safe: each is one transaction, rows are locked in key
        // order, a duplicate's dedup record waits for the other's commit,
        // and the handlers take events in any order. The embedded log
        // acknowledges by position, in order: one batch at a time there.
        let depth = if sub.acknowledges_each() { 2 } else { 1 };
        // The log's saved position may trail the offset (it is saved
        // lazily): what is handed out again is dropped by the offset.
        let positional = sub.total_order();
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        let mut last_prune = tokio::time::Instant::now();
        // When the last batch was taken; the next waits for the linger.
        let linger = match self.db.backend() {
            Backend::Sqlite => H::LINGER_ON_SQLITE,
            Backend::Postgres => H::LINGER,
        };
        let mut last_batch: Option<tokio::time::Instant> = None;
        loop {
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = tokio::time::Instant::now();
                if let Err(e) = self.prune(DEDUP_RETENTION).await {
                    tracing::warn!(consumer = %self.name, error = %e, "pruning dedup records failed");
                }
            }
            let stopping = shutdown.is_triggered();
            if stopping || in_flight.len() >= depth {
                // Finish what is in hand; on shutdown, take nothing new.
                let next: Option<(Vec<crate::bus::Delivery>, usize)> = in_flight.next().await;
                let Some((batch, done)) = next else {
                    return;
                };
                self.acknowledge(sub, &batch, done).await;
                continue;
            }
            let ready = last_batch.map(|t| t + linger);
            let lingering = ready.is_some_and(|r| tokio::time::Instant::now() < r);
            tokio::select! {
                // Acknowledgements and shutdown go on while it lingers.
                _ = tokio::time::sleep_until(ready.unwrap_or_else(tokio::time::Instant::now)), if lingering => {}
                b = sub.next_batch(BATCH, IDLE_WAIT), if !lingering => match b {
                    Ok(batch) if batch.is_empty() => {}
                    Ok(batch) => {
                        // A full batch says more is waiting, and the next
                        // is taken at once: the linger trades lag for fewer
                        // transactions only while the consumer keeps up.
                        // Lingering behind, it could never do more than
                        // BATCH events per linger: the order consumer on
                        // SQLite 5,120 events a second, where 3,000 orders
                        // a second bring it 12,000, so its lag grew for as
                        // long as the load lasted (twenty-fifth session).
                        last_batch =
                            (batch.len() < BATCH).then(tokio::time::Instant::now);
                        in_flight.push(self.process(batch, positional, shutdown));
                    }
                    Err(e) => {
                        tracing::warn!(consumer = %self.name, error = %e, "fetch failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
                Some((batch, done)) = in_flight.next(), if !in_flight.is_empty() => {
                    self.acknowledge(sub, &batch, done).await;
                }
                _ = shutdown.wait() => {}
            }
        }
    }

    /// Acknowledges the first `done` events of `batch`.
    async fn acknowledge(
        &self,
        sub: &mut crate::bus::Subscription,
        batch: &[crate::bus::Delivery],
        done: usize,
    ) {
        if let Err(e) = sub.ack(&batch[..done]).await {
            // Harmless: the events are applied; a redelivery is a duplicate.
            tracing::warn!(consumer = %self.name, error = %e, "ack failed");
        }
    }

    /// Applies a batch: whole, in one transaction, or (if that fails) one
    /// event at a time with retries and parking. Returns the batch and how
    /// many of its events, from the first, are done and may be acknowledged.
    async fn process(
        &self,
        batch: Vec<crate::bus::Delivery>,
        positional: bool,
        shutdown: &Shutdown,
    ) -> (Vec<crate::bus::Delivery>, usize) {
        // The fast path: the whole batch in one transaction (one commit,
        // one fsync, for up to BATCH events). Any failure rolls it all
        // back and the batch goes through one event at a time, where
        // retries and parking isolate the bad one.
        metrics::histogram!("consumer_batch_size", "consumer" => self.name.clone())
            .record(batch.len() as f64);
        let started = std::time::Instant::now();
        let applied = self.apply_batch(&batch, positional).await;
        metrics::histogram!("consumer_batch_seconds", "consumer" => self.name.clone())
            .record(started.elapsed().as_secs_f64());
        match applied {
            Ok(()) => {
                let n = batch.len();
                return (batch, n);
            }
            Err(e) => {
                tracing::debug!(consumer = %self.name, error = %e, "batch failed; one by one");
            }
        }
        // One by one, a redelivery must not be parked (or parked again)
        // either: below the offset, nothing is looked at. Only this
        // consumer writes its offset, one batch at a time.
        let offset = if positional {
            self.offset(self.db.reader()).await.ok().flatten()
        } else {
            None
        };
        let mut done = 0;
        for d in &batch {
            let position = positional.then_some(d.position);
            let outcome = if offset.is_some_and(|o| d.position <= o) {
                Some(Outcome::Duplicate)
            } else if d.attempt > MAX_DELIVERIES {
                // Handed out this often only if the process died handling
                // it each time: a poison that crashes. Park, don't retry.
                let why = format!("delivered {} times without being acknowledged", d.attempt);
                let env = Envelope::from_json(d.payload.as_bytes()).ok();
                Some(
                    self.park(&d.payload, env.as_ref(), &why, d.attempt as u32, position)
                        .await,
                )
            } else {
                self.offer_at(&d.payload, position, shutdown).await
            };
            if outcome.is_none() {
                break; // shutting down mid-retry: leave the rest unacked
            }
            done += 1;
        }
        (batch, done)
    }

    /// Applies one raw message with retries and parking. `None` only when
    /// shutdown interrupted the retries.
    pub async fn offer(&self, payload: &str, shutdown: &Shutdown) -> Option<Outcome> {
        self.offer_at(payload, None, shutdown).await
    }

    /// [`offer`](Self::offer) for an event at `position` of a totally
    /// ordered log: its effect, or its parking, advances the offset.
    async fn offer_at(
        &self,
        payload: &str,
        position: Option<i64>,
        shutdown: &Shutdown,
    ) -> Option<Outcome> {
        let env = match Envelope::from_json(payload.as_bytes()) {
            Ok(env) => env,
            Err(e) => return Some(self.park(payload, None, &e.to_string(), 1, position).await),
        };
        let event = match env.event() {
            Ok(Some(ev)) if H::TYPES.contains(&env.event_type.as_str()) => ev,
            Ok(_) => return Some(Outcome::Ignored),
            Err(e) => {
                return Some(
                    self.park(payload, Some(&env), &e.to_string(), 1, position)
                        .await,
                );
            }
        };
        let mut attempt = 1;
        loop {
            match self.apply(&env, event.clone(), position).await {
                Ok(outcome) => return Some(outcome),
                Err(HandleError::Permanent(msg)) => {
                    return Some(
                        self.park(payload, Some(&env), &msg, attempt, position)
                            .await,
                    );
                }
                Err(HandleError::Transient(e)) if attempt >= self.retry.max_attempts => {
                    return Some(
                        self.park(payload, Some(&env), &format!("{e:#}"), attempt, position)
                            .await,
                    );
                }
                Err(HandleError::Transient(e)) => {
                    tracing::warn!(consumer = %self.name, event_id = %env.event_id, attempt, error = %e, "handler failed; retrying");
                    let backoff = self.retry.first_backoff * 2u32.pow(attempt - 1);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait() => return None,
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// Applies every event of `batch` in one transaction, or none.
    async fn apply_batch(
        &self,
        batch: &[crate::bus::Delivery],
        positional: bool,
    ) -> Result<(), HandleError> {
        let mut items = Vec::with_capacity(batch.len());
        for d in batch {
            if d.attempt > MAX_DELIVERIES {
                return Err(HandleError::Permanent("redelivered too often".into()));
            }
            let env = Envelope::from_json(d.payload.as_bytes())
                .map_err(|e| HandleError::Permanent(e.to_string()))?;
            match env.event() {
                Ok(Some(ev)) if H::TYPES.contains(&env.event_type.as_str()) => {
                    items.push((env, ev, d.position))
                }
                Ok(_) => {}
                Err(e) => return Err(HandleError::Permanent(e.to_string())),
            }
        }
        let Some(last) = items.last().map(|(_, _, position)| *position) else {
            return Ok(());
        };
        let appended = AppendMark::now();
        // Taken, so that a batch that fails leaves the offset unknown.
        let known = if positional {
            self.committed_offset().take()
        } else {
            None
        };
        if H::PLANNED
            && let Some(Some(offset)) = known
            && let Some(tx) = self.db.planned()
        {
            return self.apply_planned(tx, items, offset, last, appended).await;
        }
        let mut tx = self.db.begin().await?;
        let offered = items.len();
        // Without an offset yet (a new database, or one that recorded event
        // ids before offsets existed) the ids are recorded this once.
        let offset = match known {
            Some(known) => known,
            None if positional => self.offset(&mut *tx).await?,
            None => None,
        };
        if let Some(offset) = offset {
            items.retain(|(_, _, position)| *position > offset);
        }
        let fresh = if offset.is_some() {
            ids(&items)
        } else {
            let (unrecorded, recorded): (Vec<_>, Vec<_>) = items
                .iter()
                .map(|(env, _, _)| env)
                .partition(|env| idempotent::<H>(env));
            let ids: Vec<&str> = recorded.iter().map(|env| env.event_id.as_str()).collect();
            let mut fresh = self.record_batch(&mut tx, &ids).await?;
            fresh.extend(unrecorded.into_iter().map(|env| env.event_id.clone()));
            fresh
        };
        let items = keep_fresh(items, fresh);
        let applied = items.len() as u64;
        self.count_duplicates(offered, applied);
        if applied > 0 {
            unpanicked(self.handler.handle_batch(&mut tx, items)).await?;
        }
        if positional {
            self.save_offset(&mut tx, last).await?;
        }
        tx.commit().await?;
        if positional {
            // What `save_offset` left in the table: it never moves back.
            *self.committed_offset() = Some(Some(offset.map_or(last, |o| o.max(last))));
        }
        self.applied(applied, appended);
        Ok(())
    }

    /// [`apply_batch`](Self::apply_batch) over a [`Planned`] transaction,
    /// for a consumer on the log that knows its offset: what the handler
    /// reads begins it, its writes and the new offset commit as one text.
    async fn apply_planned(
        &self,
        mut tx: Planned,
        mut items: Vec<(Envelope, Event, i64)>,
        offset: i64,
        last: i64,
        appended: AppendMark,
    ) -> Result<(), HandleError> {
        let offered = items.len();
        items.retain(|(_, _, position)| *position > offset);
        let fresh = ids(&items);
        let items = keep_fresh(items, fresh);
        let applied = items.len() as u64;
        self.count_duplicates(offered, applied);
        let name = self.name.clone();
        tx.also(
            offset_upsert(&mut Params::for_db(&self.db)),
            Box::new(move |q| q.bind(name).bind(last)),
        );
        if applied > 0 {
            unpanicked(self.handler.handle_batch_planned(&mut tx, items)).await?;
        }
        if !tx.committed() {
            tx.commit("", |q| q).await?;
        }
        *self.committed_offset() = Some(Some(offset.max(last)));
        self.applied(applied, appended);
        Ok(())
    }

    fn count_duplicates(&self, offered: usize, applied: u64) {
        if offered as u64 > applied {
            metrics::counter!("consumer_duplicates_total", "consumer" => self.name.clone())
                .increment(offered as u64 - applied);
        }
    }

    /// What follows a batch's commit.
    fn applied(&self, applied: u64, appended: AppendMark) {
        if applied > 0 {
            self.outbox.notify_if_appended(appended);
            self.handler.after_commit();
            metrics::counter!("consumer_applied_total", "consumer" => self.name.clone())
                .increment(applied);
        }
    }

    /// Records a batch's event ids as processed in one statement per chunk
    /// and returns the ids that were new.
    async fn record_batch(
        &self,
        tx: &mut Tx,
        event_ids: &[&str],
    ) -> Result<std::collections::HashSet<String>, sqlx::Error> {
        let mut fresh = std::collections::HashSet::with_capacity(event_ids.len());
        let now = now_ms();
        for chunk in event_ids.chunks(rows_per_statement(tx, 3)) {
            let values = Params::of(tx).rows(chunk.len(), 3);
            let sql = format!(
                "INSERT INTO processed_events (consumer, event_id, processed_at) VALUES {values} \
                 ON CONFLICT DO NOTHING RETURNING event_id"
            );
            let mut q = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)).persistent(false);
            for id in chunk {
                q = q.bind(&self.name).bind(*id).bind(now);
            }
            fresh.extend(q.fetch_all(&mut **tx).await?);
        }
        Ok(fresh)
    }

    /// Records that this consumer applies `env`; `false` if it already did.
    async fn record(&self, tx: &mut Tx, env: &Envelope) -> Result<bool, sqlx::Error> {
        Ok(!self
            .record_batch(tx, &[env.event_id.as_str()])
            .await?
            .is_empty())
    }

    /// The log position of the last event applied or parked, if recorded.
    async fn offset<'e>(
        &self,
        db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    ) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar("SELECT position FROM consumer_offsets WHERE consumer = $1")
            .bind(&self.name)
            .fetch_optional(db)
            .await
    }

    fn committed_offset(&self) -> std::sync::MutexGuard<'_, Option<Option<i64>>> {
        self.committed_offset
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    async fn save_offset(&self, tx: &mut Tx, position: i64) -> Result<(), sqlx::Error> {
        // Whether this commits is the caller's to see; until it says what
        // the table holds, nothing is assumed.
        *self.committed_offset() = None;
        sqlx::query(sqlx::AssertSqlSafe(offset_upsert(&mut Params::of(tx))))
            .bind(&self.name)
            .bind(position)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// One attempt: dedup record + effect in one transaction. A panicking
    /// handler is a permanent failure of this event, not of the consumer.
    async fn apply(
        &self,
        env: &Envelope,
        event: Event,
        position: Option<i64>,
    ) -> Result<Outcome, HandleError> {
        unpanicked(self.apply_inner(env, event, position)).await
    }

    async fn apply_inner(
        &self,
        env: &Envelope,
        event: Event,
        position: Option<i64>,
    ) -> Result<Outcome, HandleError> {
        let appended = AppendMark::now();
        let mut tx = self.db.begin().await?;
        // The id is recorded on this path even with an offset (unless the
        // event is idempotent): it is also the path of a parked event's
        // replay, which has no position.
        if !idempotent::<H>(env) && !self.record(&mut tx, env).await? {
            tx.rollback().await?;
            metrics::counter!("consumer_duplicates_total", "consumer" => self.name.clone())
                .increment(1);
            return Ok(Outcome::Duplicate);
        }
        self.handler.handle(&mut tx, env, event).await?;
        if let Some(position) = position {
            self.save_offset(&mut tx, position).await?;
        }
        tx.commit().await?;
        self.outbox.notify_if_appended(appended);
        self.handler.after_commit();
        metrics::counter!("consumer_applied_total", "consumer" => self.name.clone(), "type" => env.event_type.clone()).increment(1);
        Ok(Outcome::Applied)
    }

    /// Parks an event; at a log `position`, the offset moves past it in
    /// the same transaction, so a redelivery is never parked twice.
    async fn park(
        &self,
        payload: &str,
        env: Option<&Envelope>,
        error: &str,
        attempts: u32,
        position: Option<i64>,
    ) -> Outcome {
        tracing::error!(consumer = %self.name, event_id = ?env.map(|e| &e.event_id), error, "parking event as a dead letter");
        metrics::counter!("consumer_dead_letters_total", "consumer" => self.name.clone())
            .increment(1);
        let mut wait = Duration::from_millis(100);
        // Parking must not fail silently: the event would be lost. Keep
        // trying; the database being down stops this consumer either way.
        loop {
            let res = async {
                let mut tx = self.db.begin().await?;
                sqlx::query(
                    "INSERT INTO dead_letters \
                     (consumer, event_id, event_type, order_id, payload, error, attempts, parked_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&self.name)
                .bind(env.map(|e| e.event_id.clone()))
                .bind(env.map(|e| e.event_type.clone()))
                .bind(env.map(|e| e.order_id.clone()))
                .bind(payload)
                .bind(error)
                .bind(attempts as i64)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
                if let Some(position) = position {
                    self.save_offset(&mut tx, position).await?;
                }
                tx.commit().await
            }
            .await;
            match res {
                Ok(_) => return Outcome::Parked,
                Err(e) => {
                    tracing::error!(consumer = %self.name, error = %e, "cannot park dead letter; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Forgets dedup records older than `age`; returns how many.
    pub async fn prune(&self, age: Duration) -> Result<u64, sqlx::Error> {
        let cutoff = now_ms() - age.as_millis() as i64;
        let done = self
            .db
            .execute(
                sqlx::query(
                    "DELETE FROM processed_events WHERE consumer = $1 AND processed_at < $2",
                )
                .bind(&self.name)
                .bind(cutoff),
            )
            .await?;
        Ok(done.rows_affected())
    }

    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, consumer, event_id, event_type, order_id, payload, error, attempts, parked_at \
             FROM dead_letters WHERE consumer = $1 ORDER BY id",
        )
        .bind(&self.name)
        .fetch_all(self.db.reader())
        .await?;
        rows.iter().map(DeadLetter::from_row).collect()
    }

    /// Offers a parked event again, then removes it. If it fails again it
    /// is parked anew (with the new error) before the old row goes, and a
    /// crash in between leaves the old row to be replayed as a duplicate:
    /// at no point is the event in neither place. The outcome is `Parked`
    /// if any event of the row was parked again, else `Applied` if any was
    /// applied.
    pub async fn replay(&self, id: i64) -> Result<Option<Outcome>, sqlx::Error> {
        let payload: Option<String> =
            sqlx::query_scalar("SELECT payload FROM dead_letters WHERE id = $1 AND consumer = $2")
                .bind(id)
                .bind(&self.name)
                .fetch_optional(self.db.reader())
                .await?;
        let Some(payload) = payload else {
            return Ok(None);
        };
        // A JetStream message of several events (JSON lines), parked whole
        // by a build from before messages carried more than one (during a
        // rolling upgrade), is offered event by event: each is applied, or
        // parked by itself, before the old row goes.
        let stop = Shutdown::new();
        let mut outcome = None;
        for line in payload.split('\n') {
            let offered = self.offer(line, &stop).await;
            outcome = match (outcome, offered) {
                (Some(Outcome::Parked), _) | (_, Some(Outcome::Parked)) => Some(Outcome::Parked),
                (Some(Outcome::Applied), _) => Some(Outcome::Applied),
                (_, offered) => offered,
            };
        }
        self.db
            .execute(sqlx::query("DELETE FROM dead_letters WHERE id = $1").bind(id))
            .await?;
        Ok(outcome)
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub id: i64,
    pub consumer: String,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub order_id: Option<String>,
    pub payload: String,
    pub error: String,
    pub attempts: i64,
    pub parked_at: String,
}

impl DeadLetter {
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok(DeadLetter {
            id: r.try_get(0)?,
            consumer: r.try_get(1)?,
            event_id: r.try_get(2)?,
            event_type: r.try_get(3)?,
            order_id: r.try_get(4)?,
            payload: r.try_get(5)?,
            error: r.try_get(6)?,
            attempts: r.try_get(7)?,
            parked_at: crate::rfc3339(r.try_get(8)?),
        })
    }
}
