//! Transactional outbox. A service never publishes directly: it appends the
//! event to its own `outbox` table in the transaction that changes its state,
//! so either both happen or neither does. The relay then copies committed
//! rows to the bus and deletes them; a crash between the two re-publishes,
//! which the bus deduplicates on the event id and consumers tolerate anyway.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use restaurant_contract::{Cause, Envelope, Event, now_ms};
use sqlx::AssertSqlSafe;
use tokio::sync::Notify;

use crate::{
    bus::{Bus, OutgoingEvent},
    db::{Db, Params, Query, Tx},
    shutdown::Shutdown,
};

/// What one relay pass moves: rows in `seq` order until they hold this
/// many events (at least one row, however large), and at most this many
/// rows. A row is one appending statement's events, from one to a
/// consumer batch's worth (hundreds of KB), so rows alone bound neither
/// the pass's memory nor its work: with at most 16 rows a pass the cook
/// service's peak RSS rose from 17-19 to 22.5-25.1 MiB (distributed,
/// closed loop), and at most 4 would cut a pass of small placement rows
/// to a few events.
const RELAY_EVENTS: i64 = 1_024;
const RELAY_ROWS: i64 = 64;
/// The `seq`s of one relay pass: of the `candidates` (a `SELECT seq, events`
/// in `seq` order), those before the running count of events reaches
/// `budget` (see [`RELAY_EVENTS`]). The payloads stay out of the window:
/// SQLite copies every column of a window's rows into a temporary table,
/// and with them the count took 1.08-1.28 ms for a pass of 21 rows
/// (536 KB) where reading the same payloads by `seq` afterwards took
/// 0.15-0.33 ms (sqlite3 3.40, warm cache).
fn pass_seqs(candidates: &str, budget: &str) -> String {
    format!(
        "SELECT seq FROM \
         (SELECT seq, SUM(events) OVER (ORDER BY seq) - events AS before FROM \
          ({candidates}) AS candidates) AS counted \
         WHERE before < {budget}"
    )
}
/// The name dead letters parked by the relay carry.
const RELAY_NAME: &str = "outbox";
/// How long a woken relay waits for more commits before it moves a batch,
/// per event its last batch moved, and at most. Under load every batch costs
/// an append (a commit on the log's one writer, or a publish) and a delete
/// (a commit on the service's writer), and so does every consumer's batch
/// downstream: gathering makes them fewer and larger. Measured, embedded
/// shape, 15 s runs at 64 clients, alternating: no wait 2,217-2,342
/// completed/s; 5 ms 2,388-2,462; 10 ms 2,550-2,607; 20 ms 2,768-2,863,
/// MyPage staleness p99 22-24 -> 46-47 ms. Since SQLite relays delete in
/// bulk and the log group-commits appends, a batch costs little, and the
/// shorter wait is as fast with less staleness (20 s alternating runs on a
/// slower machine: 20 ms 1,460-1,645/s, staleness p50 51-55 ms; 10 ms
/// 1,443-1,627/s, 43-47 ms; in the runs without hypervisor steal, 10 ms
/// 1,482-1,569/s, p50/p99 41-45/88-92 ms, 5 ms 1,597-1,613/s,
/// 37-38/73-85 ms). Proportional to the last batch, so that a quiet
/// system (batches of one) waits half a millisecond, not 5.
const RELAY_GATHER_PER_EVENT: Duration = Duration::from_micros(500);
const RELAY_GATHER_MAX: Duration = Duration::from_millis(5);
/// The cap when the bus is JetStream, where a pass costs more: a publish
/// round trip to nats-server per message (a row's events of one type),
/// each message a delivery to every consumer downstream, and on
/// PostgreSQL `BEGIN`, the `DELETE … RETURNING` and a `COMMIT` with its
/// fsync. Distributed shape, 1,500 orders/s offered for 30 s, alternating
/// (ms of CPU per order over all processes; placement and MyPage
/// staleness p99): 5 ms 1.123 / 1.113, 21.6 / 25.3, 37 / 41 ms; 10 ms
/// 1.071 / 1.087, 20.1 / 20.4, 33 / 34 ms; then 10 ms 1.056 / 0.983,
/// 15.6 / 11.4, 29 / 23 ms against 20 ms 0.940 / 0.898, 11.6 / 10.7,
/// 38 / 34 ms, relay passes 7,700 -> 5,300 -> 3,050 in 30 s.
const RELAY_GATHER_MAX_NATS: Duration = Duration::from_millis(20);

fn gather_for(last_batch: usize, max: Duration) -> Duration {
    (RELAY_GATHER_PER_EVENT * last_batch.min(1_000) as u32).min(max)
}
/// How long the relay sleeps when nobody wakes it: a safety net for rows
/// committed by another process (a replica, a CLI) that cannot signal us.
const RELAY_IDLE_POLL: Duration = Duration::from_millis(250);
/// The same for an outbox only this process writes (a SQLite file), whose
/// every commit wakes the relay: the poll only covers a wake-up lost to a
/// bug, and at 250 ms the four relays of `restaurant up` were 160 of the
/// ~440 SQLite round trips an idle system made in 10 s.
const RELAY_IDLE_POLL_OWNED: Duration = Duration::from_secs(5);

/// Appends `env` to the outbox inside `tx`.
pub async fn append(tx: &mut Tx, env: &Envelope) -> Result<(), sqlx::Error> {
    append_all(tx, std::slice::from_ref(env)).await
}

/// Appends many envelopes as one outbox row: their JSON, one per line.
/// Rows, not bytes, are what the outbox costs (every row is inserted,
/// read, deleted and vacuumed, with its index entry): one row per event
/// was 14 of the ~32 tuple operations PostgreSQL did per order.
pub async fn append_all(tx: &mut Tx, envs: &[Envelope]) -> Result<(), sqlx::Error> {
    if envs.is_empty() {
        return Ok(());
    }
    let sql = insert_sql(&mut Params::of(tx));
    bind_row(sqlx::query(AssertSqlSafe(sql)), envs)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The statement that appends one outbox row, its placeholders taken from
/// `params`, for a caller that writes it together with its own (see
/// [`bind_row`]).
pub fn insert_sql(params: &mut Params) -> String {
    format!(
        "INSERT INTO outbox (events, payload, created_at) VALUES ({}, {}, {})",
        params.one(),
        params.one(),
        params.one()
    )
}

/// Outbox rows bound by [`bind_row`] in this process so far. A consumer
/// reads it before and after a batch to tell whether its transaction
/// appended anything and wakes the relay only if so: MyPage appends
/// nothing, and each of its batches used to wake its relay for an empty
/// pass (distributed shape at 700 orders/s: ~200 a second, each a
/// transaction around the relay's `DELETE`, whose planning alone took 0.15
/// ms). Another task's row bound meanwhile only makes a wake-up that was
/// not needed, never misses one.
static APPENDED: AtomicU64 = AtomicU64::new(0);

/// How many rows [`APPENDED`] counted when a transaction began; see
/// [`OutboxSignal::notify_if_appended`].
#[derive(Debug, Clone, Copy)]
pub struct AppendMark(u64);

impl AppendMark {
    pub fn now() -> Self {
        AppendMark(APPENDED.load(Ordering::Relaxed))
    }
}

/// Binds the row of [`insert_sql`] for `envs` (at least one).
pub fn bind_row<'q, 'e>(q: Query<'q>, envs: impl IntoIterator<Item = &'e Envelope>) -> Query<'q> {
    APPENDED.fetch_add(1, Ordering::Relaxed);
    let envs = envs.into_iter();
    let mut lines = String::with_capacity(envs.size_hint().0 * 512);
    let mut events = 0i32;
    for env in envs {
        if events > 0 {
            lines.push('\n');
        }
        lines.push_str(&env.to_json());
        events += 1;
        metrics::counter!("outbox_appended_total", "type" => env.event_type.clone()).increment(1);
    }
    q.bind(events).bind(lines).bind(now_ms())
}

/// Builds the envelope for `event` and appends it; the usual call.
pub async fn emit(
    tx: &mut Tx,
    source: &str,
    order_id: &str,
    event: &Event,
    cause: &Cause,
) -> Result<Envelope, sqlx::Error> {
    let env = Envelope::new(source, order_id, event, cause);
    append(tx, &env).await?;
    Ok(env)
}

/// Wakes the relay after a commit that appended events, so latency is the
/// relay's work and not its poll interval.
#[derive(Clone, Default, Debug)]
pub struct OutboxSignal(Arc<SignalState>);

#[derive(Default, Debug)]
struct SignalState {
    wake: Notify,
    /// Commits announced so far. The relay compares it with the count it saw
    /// before its last read: a wake-up left over from a commit that read
    /// already moved is not worth another read. Without it, most batches
    /// were followed by an empty poll (distributed shape at 1,200 orders/s:
    /// 161 empty relay transactions a second, ~13% of the statements
    /// PostgreSQL ran).
    commits: AtomicU64,
}

impl OutboxSignal {
    /// Call after the commit, never before: a relay that sees the count
    /// changed must find the rows.
    pub fn notify(&self) {
        self.0.commits.fetch_add(1, Ordering::Release);
        self.0.wake.notify_one();
    }

    /// [`OutboxSignal::notify`], if any outbox row was bound since `mark`
    /// (taken before the transaction that just committed).
    pub fn notify_if_appended(&self, mark: AppendMark) {
        if AppendMark::now().0 != mark.0 {
            self.notify();
        }
    }

    fn commits(&self) -> u64 {
        self.0.commits.load(Ordering::Acquire)
    }

    /// Waits for a commit announced after `seen` was read; `false` if
    /// `idle` passed first.
    async fn committed_since(&self, seen: u64, idle: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + idle;
        loop {
            if self.commits() != seen {
                return true;
            }
            // `Notify` keeps one wake-up for a later waiter, so a stale one
            // costs one more turn of this loop, not a read.
            if tokio::time::timeout_at(deadline, self.0.wake.notified())
                .await
                .is_err()
            {
                return false;
            }
        }
    }
}

/// Moves committed outbox rows to the bus until shutdown. On shutdown it
/// drains what is committed first, so a graceful stop leaves nothing behind.
pub async fn run_relay(db: Db, bus: Bus, signal: OutboxSignal, shutdown: Shutdown) {
    // The only relay of its outbox keeps its place in memory.
    let mut owned = db.single_process().then(OwnedOutbox::default);
    let gather_max = match bus {
        Bus::Embedded(_) => RELAY_GATHER_MAX,
        Bus::Nats(_) => RELAY_GATHER_MAX_NATS,
    };
    let mut failures = 0u32;
    loop {
        let seen = signal.commits();
        let pass = match &mut owned {
            Some(owned) => owned.relay(&db, &bus).await,
            None => relay_batch(&db, &bus).await,
        };
        let last = match pass {
            Ok(r) if r.rows == RELAY_ROWS as usize || r.events >= RELAY_EVENTS as usize => continue,
            Ok(r) => {
                failures = 0;
                r.events
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "outbox relay failed; will retry");
                let backoff = Duration::from_millis(50 * 2u64.pow(failures.min(6)));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait() => return,
                }
                continue;
            }
        };
        if shutdown.is_triggered() {
            return;
        }
        tokio::select! {
            woken = signal.committed_since(seen, idle_poll(owned.as_ref())) => if woken {
                tokio::time::sleep(gather_for(last, gather_max)).await;
            },
            _ = shutdown.wait() => {
                // One last pass for rows committed just before the signal.
                let drained = match &mut owned {
                    Some(owned) => owned.drain(&db, &bus).await,
                    None => relay_batch(&db, &bus).await.map(drop),
                };
                if let Err(e) = drained {
                    tracing::warn!(error = %e, "final outbox drain failed; rows stay for the next start");
                }
                return;
            }
        }
    }
}

/// How long an idle relay waits for a wake-up before it looks by itself.
/// An owned outbox with published rows not yet deleted looks again when
/// they are due, so that a quiet outbox is emptied within [`DELETE_AFTER`].
fn idle_poll(owned: Option<&OwnedOutbox>) -> Duration {
    match owned {
        None => RELAY_IDLE_POLL,
        Some(o) if o.undeleted > 0 => DELETE_AFTER,
        Some(_) => RELAY_IDLE_POLL_OWNED,
    }
}

/// Published rows are deleted together once this many events wait or the
/// oldest has waited this long (or the outbox is found empty).
const DELETE_AFTER_EVENTS: usize = 4_096;
const DELETE_AFTER: Duration = Duration::from_millis(200);

/// What one relay pass moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// Outbox rows: appending statements, each one or more events.
    pub rows: usize,
    pub events: usize,
}

/// The relay of an outbox only it reads (SQLite). It reads past the last
/// row it published without a transaction, so it never holds the
/// database's one writer while the bus commits, and deletes what it
/// published in bulk: one commit every 200 ms instead of one per batch
/// (embedded shape under load: 675 of the service databases' 2,925 commits
/// in 10 s were these deletes). Rows published but not yet deleted when
/// the process dies are published again on the next start, which the bus
/// deduplicates on the event id, as it does for a crash between publish
/// and delete anyway.
#[derive(Debug, Default)]
pub struct OwnedOutbox {
    /// Every row with `seq` up to this is on the bus. SQLite assigns `seq`
    /// in its one write transaction at a time, so rows commit in `seq`
    /// order and none can appear behind this mark later.
    published: i64,
    undeleted: usize,
    waiting_since: Option<std::time::Instant>,
}

impl OwnedOutbox {
    /// Publishes the next batch of rows.
    pub async fn relay(&mut self, db: &Db, bus: &Bus) -> anyhow::Result<Relayed> {
        let published = self.published;
        let rows: Vec<(i64, String)> = db
            .read_with(async |c| {
                sqlx::query_as(AssertSqlSafe(format!(
                    "SELECT seq, payload FROM outbox WHERE seq IN ({}) ORDER BY seq",
                    pass_seqs(
                        "SELECT seq, events FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                        "?"
                    )
                )))
                .bind(published)
                .bind(RELAY_ROWS)
                .bind(RELAY_EVENTS)
                .fetch_all(c)
                .await
            })
            .await?;
        let Some(&(last_seq, _)) = rows.last() else {
            self.delete_published(db).await?;
            return Ok(Relayed::default());
        };
        let (batch, unreadable) = events_of(&rows);
        let (read, lines) = (rows.len(), batch.len() + unreadable.len());
        if !unreadable.is_empty() {
            // Parked and taken out of their rows in one transaction, so that
            // a pass that fails after it does not park them again.
            let mut tx = db.begin().await?;
            park(&mut tx, &unreadable).await?;
            for (seq, _) in rows
                .iter()
                .filter(|(seq, _)| unreadable.iter().any(|u| u.seq == *seq))
            {
                let kept: Vec<&str> = batch
                    .iter()
                    .filter(|e| e.seq == *seq)
                    .map(|e| e.event.payload.as_str())
                    .collect();
                let rewrite = if kept.is_empty() {
                    sqlx::query("DELETE FROM outbox WHERE seq = ?")
                } else {
                    sqlx::query("UPDATE outbox SET events = ?, payload = ? WHERE seq = ?")
                        .bind(kept.len() as i32)
                        .bind(kept.join("\n"))
                };
                rewrite.bind(seq).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        drop(rows);
        let batch: Vec<OutgoingEvent> = batch.into_iter().map(|e| e.event).collect();
        bus.publish(&batch).await?;
        self.published = last_seq;
        self.undeleted += lines;
        let relayed = count_relayed(read, batch.len());
        let since = *self
            .waiting_since
            .get_or_insert_with(std::time::Instant::now);
        if self.undeleted >= DELETE_AFTER_EVENTS || since.elapsed() >= DELETE_AFTER {
            self.delete_published(db).await?;
        }
        Ok(relayed)
    }

    /// Publishes and deletes everything committed so far.
    pub async fn drain(&mut self, db: &Db, bus: &Bus) -> anyhow::Result<()> {
        while self.relay(db, bus).await?.rows > 0 {}
        Ok(())
    }

    async fn delete_published(&mut self, db: &Db) -> Result<(), sqlx::Error> {
        if self.undeleted == 0 {
            return Ok(());
        }
        db.execute(sqlx::query("DELETE FROM outbox WHERE seq <= ?").bind(self.published))
            .await?;
        self.undeleted = 0;
        self.waiting_since = None;
        Ok(())
    }
}

/// Both relays' instruments for a published batch.
fn count_relayed(rows: usize, events: usize) -> Relayed {
    metrics::counter!("outbox_relayed_total").increment(events as u64);
    metrics::histogram!("outbox_relay_batch_size").record(events as f64);
    Relayed { rows, events }
}

/// An event read from the outbox row `seq`.
struct Read {
    seq: i64,
    event: OutgoingEvent,
}

/// A line of the outbox row `seq` that is not an envelope, and why.
struct Unreadable {
    seq: i64,
    line: String,
    error: String,
}

/// The events of outbox rows (`seq`, payload), in `seq` order and in
/// order within a row. Only the envelope's head is decoded, for the bus's
/// subject and deduplication; the payload goes on as it was written.
fn events_of(rows: &[(i64, String)]) -> (Vec<Read>, Vec<Unreadable>) {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Head {
        event_id: String,
        #[serde(rename = "type")]
        event_type: String,
        order_id: String,
    }
    let mut events = Vec::with_capacity(rows.len());
    let mut unreadable = Vec::new();
    for &(seq, ref payload) in rows {
        for line in payload.split('\n') {
            match serde_json::from_str::<Head>(line) {
                Ok(head) => events.push(Read {
                    seq,
                    event: OutgoingEvent {
                        event_id: head.event_id,
                        order_id: head.order_id,
                        event_type: head.event_type,
                        payload: line.to_owned(),
                        row: seq,
                    },
                }),
                Err(e) => unreadable.push(Unreadable {
                    seq,
                    line: line.to_owned(),
                    error: format!("outbox line is not an envelope: {e}"),
                }),
            }
        }
    }
    (events, unreadable)
}

/// Parks lines no relay can publish, so that they never block the rows
/// behind them. Only a damaged row has any: every line is written by
/// [`append_all`] from an [`Envelope`].
async fn park(tx: &mut Tx, unreadable: &[Unreadable]) -> Result<(), sqlx::Error> {
    for u in unreadable {
        tracing::error!(error = %u.error, "parking an unreadable outbox line as a dead letter");
        metrics::counter!("outbox_unreadable_total").increment(1);
        sqlx::query(
            "INSERT INTO dead_letters (consumer, payload, error, attempts, parked_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(RELAY_NAME)
        .bind(&u.line)
        .bind(&u.error)
        .bind(1i64)
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Publishes one batch of rows in `seq` order and deletes it in one
/// transaction. On PostgreSQL the rows are locked with `SKIP LOCKED`, so
/// replicas of a service relay disjoint batches. The rows are deleted as
/// they are read (`DELETE … RETURNING`, one statement where a read and a
/// delete were two) and the deletion commits only after the bus has the
/// batch: a failed publish rolls it back.
pub async fn relay_batch(db: &Db, bus: &Bus) -> anyhow::Result<Relayed> {
    let mut tx = db.begin().await?;
    // The limit is a parameter so that PostgreSQL plans each poll for the
    // table as it is (see `Db::open`): a statement without parameters keeps
    // the plan it got first, and a plan made on the empty table of a fresh
    // database is a sequential scan — measured at 3–24 ms a poll once tens of
    // thousands of dead rows await autovacuum.
    // The rows are locked before the running count is taken (PostgreSQL
    // allows no row locks beside a window function); rows locked but past
    // the budget stay, locked until this transaction ends.
    let mut params = Params::of(&tx);
    let candidates = format!(
        "SELECT seq, events FROM outbox ORDER BY seq LIMIT {}{}",
        params.one(),
        db.skip_locked_suffix()
    );
    let mut rows: Vec<(i64, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "DELETE FROM outbox WHERE seq IN ({}) RETURNING seq, payload",
        pass_seqs(&candidates, &params.one())
    )))
    .bind(RELAY_ROWS)
    .bind(RELAY_EVENTS)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(Relayed::default());
    }
    // RETURNING gives no order; the bus must get them in commit order.
    rows.sort_unstable_by_key(|r| r.0);
    let (batch, unreadable) = events_of(&rows);
    let read = rows.len();
    drop(rows);
    park(&mut tx, &unreadable).await?;
    let batch: Vec<OutgoingEvent> = batch.into_iter().map(|e| e.event).collect();
    bus.publish(&batch).await?;
    tx.commit().await?;
    Ok(count_relayed(read, batch.len()))
}

/// The envelopes waiting in the outbox, in the order they were appended:
/// for tests and tools that drive a service without its relay.
pub async fn waiting(db: &Db) -> Result<Vec<Envelope>, sqlx::Error> {
    let rows: Vec<String> = db
        .read_with(async |c| {
            sqlx::query_scalar("SELECT payload FROM outbox ORDER BY seq")
                .fetch_all(c)
                .await
        })
        .await?;
    rows.iter()
        .flat_map(|row| row.split('\n'))
        .map(|line| Envelope::from_json(line.as_bytes()).map_err(|e| sqlx::Error::Decode(e.into())))
        .collect()
}

/// Events not yet relayed; exported as a gauge and used by tests.
pub async fn pending(db: &Db) -> Result<i64, sqlx::Error> {
    db.read_with(async |c| {
        sqlx::query_scalar("SELECT COALESCE(SUM(events), 0) FROM outbox")
            .fetch_one(c)
            .await
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_relay_hardly_waits_and_a_busy_one_waits_at_most_the_cap() {
        for max in [RELAY_GATHER_MAX, RELAY_GATHER_MAX_NATS] {
            assert_eq!(gather_for(0, max), Duration::ZERO);
            assert_eq!(gather_for(1, max), Duration::from_micros(500));
            assert_eq!(gather_for(512, max), max);
            assert_eq!(gather_for(usize::MAX, max), max);
        }
        assert_eq!(gather_for(10, RELAY_GATHER_MAX), RELAY_GATHER_MAX);
        assert_eq!(
            gather_for(10, RELAY_GATHER_MAX_NATS),
            Duration::from_millis(5)
        );
        assert_eq!(gather_for(40, RELAY_GATHER_MAX_NATS), RELAY_GATHER_MAX_NATS);
    }

    #[test]
    fn only_a_shared_outbox_or_undeleted_rows_make_an_idle_relay_look_often() {
        assert_eq!(idle_poll(None), RELAY_IDLE_POLL, "replicas write it too");
        let mut owned = OwnedOutbox::default();
        assert_eq!(idle_poll(Some(&owned)), RELAY_IDLE_POLL_OWNED);
        owned.undeleted = 3;
        assert_eq!(idle_poll(Some(&owned)), DELETE_AFTER);
        assert!(DELETE_AFTER < RELAY_IDLE_POLL_OWNED);
    }

    /// No other test of this crate's own binds outbox rows, so the count
    /// moves here only by what this test binds.
    #[test]
    fn only_a_transaction_that_appended_wakes_the_relay() {
        let signal = OutboxSignal::default();
        let mark = AppendMark::now();
        signal.notify_if_appended(mark);
        assert_eq!(signal.commits(), 0, "nothing appended: the relay sleeps on");
        let env = Envelope::new(
            "test",
            "o",
            &Event::OrderRejected(restaurant_contract::Reason { reason: "r".into() }),
            &Cause::default(),
        );
        drop(bind_row(sqlx::query("SELECT 1"), [&env]));
        signal.notify_if_appended(mark);
        assert_eq!(signal.commits(), 1, "a row bound since the mark wakes it");
        let after = AppendMark::now();
        signal.notify_if_appended(after);
        assert_eq!(signal.commits(), 1);
    }

    #[tokio::test]
    async fn a_wake_up_from_a_commit_already_read_is_not_a_new_commit() {
        let signal = OutboxSignal::default();
        let idle = Duration::from_millis(30);
        // A commit announced before the relay's read: its rows are in that
        // read, but its wake-up is still stored.
        signal.notify();
        let seen = signal.commits();
        let started = std::time::Instant::now();
        assert!(!signal.committed_since(seen, idle).await);
        assert!(started.elapsed() >= idle, "waited out the idle poll");
        // A commit after the read wakes the relay at once, even if it came
        // before the relay began to wait.
        signal.notify();
        assert!(signal.committed_since(seen, idle).await);
        let seen = signal.commits();
        let later = signal.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            later.notify();
        });
        let started = std::time::Instant::now();
        assert!(signal.committed_since(seen, Duration::from_secs(5)).await);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
