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

/// Longest sleep between checks; bounds the delay for timers written by
/// another process (a replica) that cannot wake us.
const MAX_SLEEP: Duration = Duration::from_millis(500);

/// Calls `fire` until shutdown. `fire` handles every timer due now and
/// returns the due time (epoch ms) of the next one, if any. `wake` is
/// notified when a new timer is written.
pub async fn run<F, Fut>(name: &'static str, wake: Arc<Notify>, shutdown: Shutdown, mut fire: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<i64>>>,
{
    while !shutdown.is_triggered() {
        metrics::counter!("timer_passes_total", "timer" => name).increment(1);
        let sleep = match fire().await {
            Ok(Some(due)) => Duration::from_millis((due - now_ms()).max(0) as u64).min(MAX_SLEEP),
            Ok(None) => MAX_SLEEP,
            Err(e) => {
                tracing::warn!(timer = name, error = %e, "timer pass failed; retrying");
                MAX_SLEEP
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
    let json: String = sqlx::query_scalar(AssertSqlSafe(packed(db.backend(), "id", &select)))
        .bind(now)
        .bind(limit)
        .fetch_one(db.reader())
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
