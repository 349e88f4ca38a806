//! Durable timers. A timer is a "due at" column in the service's table
//! (a cook ticket's `complete_at`); this loop fires what is due and sleeps
//! until the next one. Nothing lives only in memory, so a restart fires
//! whatever came due while the process was down.

use std::{future::Future, sync::Arc, time::Duration};

use restaurant_contract::now_ms;
use sqlx::AssertSqlSafe;
use tokio::sync::Notify;

use crate::{
    db::{Db, Params, Tx, packed, rows_per_statement, unpack},
    shutdown::Shutdown,
};

/// Longest sleep between checks of a table other processes write too (a
/// replica's timers cannot wake us): it bounds how late those fire.
pub const MAX_SLEEP_SHARED: Duration = Duration::from_millis(500);
/// The same for a table only this process writes (a SQLite file), whose
/// every new timer wakes the loop and whose next due time the loop knows:
/// it only bounds the harm of a wall clock set back. At 500 ms the two
/// timers of an idle `restaurant up` were 40 of its ~440 SQLite round trips
/// in 10 s.
pub const MAX_SLEEP_OWNED: Duration = Duration::from_secs(5);

/// Calls `fire` until shutdown. `fire` handles every timer due now and
/// returns the due time (epoch ms) of the next one, if any. `wake` is
/// notified when a new timer is written. `max_sleep` is one of the two
/// above.
pub async fn run<F, Fut>(
    name: &'static str,
    wake: Arc<Notify>,
    max_sleep: Duration,
    shutdown: Shutdown,
    mut fire: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<i64>>>,
{
    while !shutdown.is_triggered() {
        metrics::counter!("timer_passes_total", "timer" => name).increment(1);
        let sleep = match fire().await {
            Ok(Some(due)) => Duration::from_millis((due - now_ms()).max(0) as u64).min(max_sleep),
            Ok(None) => max_sleep,
            Err(e) => {
                tracing::warn!(timer = name, error = %e, "timer pass failed; retrying");
                MAX_SLEEP_SHARED
            }
        };
        if sleep.is_zero() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = wake.notified() => {}
            _ = shutdown.wait() => {}
        }
    }
}

/// The ids of the (at most `limit`) longest-due rows of `table` in
/// `status` whose `complete_at` has come by `now`, in no particular order:
/// the due timers of a table that keeps them the usual way. One row back,
/// however many are due (see [`packed`]).
pub async fn due(
    db: &Db,
    table: &str,
    status: &str,
    now: i64,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    let select = format!(
        "SELECT id FROM {table} WHERE status = '{status}' AND complete_at IS NOT NULL \
         AND complete_at <= $1 ORDER BY complete_at, id LIMIT $2"
    );
    let json: String = db
        .read_with(async |c| {
            sqlx::query_scalar(AssertSqlSafe(packed(db.backend(), "id", &select)))
                .bind(now)
                .bind(limit)
                .fetch_one(c)
                .await
        })
        .await?;
    Ok(unpack::<(String,)>(&json)?
        .into_iter()
        .map(|(id,)| id)
        .collect())
}

/// Moves the rows of `table` whose `id` is in `ids` to `status` and clears
/// their timer (`complete_at`): the end of what [`due`] found, once the
/// caller has read (and locked) the rows it may finish.
pub async fn finish(
    tx: &mut Tx,
    table: &str,
    status: &str,
    ids: &[&str],
    now: i64,
) -> Result<(), sqlx::Error> {
    for chunk in ids.chunks(rows_per_statement(tx, 1)) {
        let mut p = Params::of(tx);
        let mut q = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} SET status = '{status}', complete_at = NULL, updated_at = {} \
             WHERE id IN ({})",
            p.one(),
            p.list(chunk.len())
        )))
        .persistent(false)
        .bind(now);
        for id in chunk {
            q = q.bind(*id);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// With nothing due the loop sleeps `max_sleep`; a wake-up (a new
    /// timer written here) or a due time sooner than that ends the sleep.
    #[tokio::test(start_paused = true)]
    async fn sleeps_until_woken_the_next_due_time_or_at_most_max_sleep() {
        let passes: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let next_due: Arc<Mutex<Option<i64>>> = Arc::default();
        let (wake, shutdown) = (Arc::new(Notify::new()), Shutdown::new());
        let start = tokio::time::Instant::now();
        let task = tokio::spawn(run(
            "test",
            wake.clone(),
            MAX_SLEEP_OWNED,
            shutdown.clone(),
            {
                let (passes, next_due) = (passes.clone(), next_due.clone());
                move || {
                    passes.lock().unwrap().push(start.elapsed());
                    let due = *next_due.lock().unwrap();
                    async move { Ok(due) }
                }
            },
        ));
        let at = |secs: f64| Duration::from_secs_f64(secs);
        tokio::time::sleep(at(12.0)).await;
        assert_eq!(*passes.lock().unwrap(), [at(0.0), at(5.0), at(10.0)]);
        wake.notify_one();
        tokio::time::sleep(at(0.5)).await;
        assert_eq!(passes.lock().unwrap().last(), Some(&at(12.0)), "woken");
        // Paused time leaves the wall clock running: due 1 s from now.
        *next_due.lock().unwrap() = Some(now_ms() + 1_000);
        wake.notify_one();
        tokio::time::sleep(at(1.7)).await;
        let passes_now = passes.lock().unwrap().clone();
        assert_eq!(passes_now[4..], [at(12.5), at(13.5)], "{passes_now:?}");
        shutdown.trigger();
        task.await.unwrap();
    }
}
