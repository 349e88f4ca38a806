//! Group commit. On SQLite every write transaction goes through one writer
//! connection, and on either backend a transaction costs a few round trips
//! and a commit (an fsync) whatever it holds. Requests that each need a
//! small write are therefore queued here and applied together: while one
//! batch commits, the next one gathers, so a quiet system pays no delay and
//! a busy one pays one commit for many requests.

use std::{future::Future, time::Instant};

use tokio::sync::{mpsc, oneshot};

/// A batch that panicked answers nobody (its callers see `None`) but must
/// not take the queue down with it.
fn reap(done: Option<Result<(), tokio::task::JoinError>>) {
    if let Some(Err(e)) = done
        && e.is_panic()
    {
        tracing::error!("a write batch panicked; its requests failed");
    }
}

/// A queue in front of a batch function; cheap to clone.
pub struct Batcher<Req, Resp> {
    /// Each request with where to answer it and when it was queued.
    queue: mpsc::Sender<(Req, oneshot::Sender<Resp>, Instant)>,
}

impl<Req, Resp> std::fmt::Debug for Batcher<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Batcher {
            queue: self.queue.clone(),
        }
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// A batcher that hands up to `max` queued requests at a time to `apply`,
    /// which answers each, in order, one batch after another. The returned
    /// task runs the batches; it ends when every `Batcher` clone is gone.
    /// `name` labels its metric (`group_commit_batch_size{batcher}`).
    pub fn new<F, Fut>(
        name: &'static str,
        max: usize,
        apply: F,
    ) -> (Self, impl Future<Output = ()> + Send + 'static)
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Resp>> + Send + 'static,
    {
        Self::overlapping(name, max, 1, apply)
    }

    /// Like [`Batcher::new`], with up to `in_flight` batches applied at
    /// once, for batches that need not follow one another (each its own
    /// transaction on a server that commits them concurrently). A request
    /// that arrives while a batch commits then starts the next batch at
    /// once instead of waiting for that commit. The task ends once the
    /// last batch has answered.
    ///
    /// Besides the batch sizes it records, per `name`, how long each
    /// request waited before its batch began (`group_commit_wait_seconds`:
    /// mostly the batch before it) and how long each batch took to apply
    /// (`group_commit_apply_seconds`), the two parts of a request's time
    /// here.
    pub fn overlapping<F, Fut>(
        name: &'static str,
        max: usize,
        in_flight: usize,
        apply: F,
    ) -> (Self, impl Future<Output = ()> + Send + 'static)
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Resp>> + Send + 'static,
    {
        let (queue, mut rx) = mpsc::channel::<(Req, oneshot::Sender<Resp>, Instant)>(max * 4);
        let in_flight = in_flight.max(1);
        let task = async move {
            let mut running = tokio::task::JoinSet::new();
            let mut batch = Vec::with_capacity(max);
            loop {
                while running.len() >= in_flight {
                    reap(running.join_next().await);
                }
                if rx.recv_many(&mut batch, max).await == 0 {
                    break;
                }
                metrics::histogram!("group_commit_batch_size", "batcher" => name)
                    .record(batch.len() as f64);
                let began = Instant::now();
                let waited = metrics::histogram!("group_commit_wait_seconds", "batcher" => name);
                let mut reqs = Vec::with_capacity(batch.len());
                let mut replies = Vec::with_capacity(batch.len());
                for (req, reply, queued) in batch.drain(..) {
                    waited.record(began.saturating_duration_since(queued));
                    reqs.push(req);
                    replies.push(reply);
                }
                let applied = apply(reqs);
                running.spawn(async move {
                    let answers = applied.await;
                    metrics::histogram!("group_commit_apply_seconds", "batcher" => name)
                        .record(began.elapsed());
                    for (reply, resp) in replies.into_iter().zip(answers) {
                        let _ = reply.send(resp);
                    }
                });
                while let Some(done) = running.try_join_next() {
                    reap(Some(done));
                }
            }
            while let Some(done) = running.join_next().await {
                reap(Some(done));
            }
        };
        (Batcher { queue }, task)
    }

    /// Queues `req` and waits for its answer; `None` if the batch task is
    /// gone or the batch failed without answering.
    pub async fn submit(&self, req: Req) -> Option<Resp> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((req, reply, Instant::now())).await.ok()?;
        answer.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    #[tokio::test]
    async fn concurrent_requests_share_batches_and_each_gets_its_own_answer() {
        let batches = Arc::new(AtomicUsize::new(0));
        let seen = batches.clone();
        let (b, task) = Batcher::new("test", 64, move |reqs: Vec<u32>| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
                reqs.into_iter().map(|r| r * 2).collect::<Vec<_>>()
            }
        });
        tokio::spawn(task);
        let answers = futures_util::future::join_all((0..200u32).map(|i| {
            let b = b.clone();
            async move { (i, b.submit(i).await) }
        }))
        .await;
        for (i, a) in answers {
            assert_eq!(a, Some(i * 2));
        }
        let n = batches.load(Ordering::Relaxed);
        assert!(n < 200, "200 concurrent requests took {n} batches");
    }

    /// A batch held open: with one batch at a time the next request waits
    /// for it; with two in flight it is answered meanwhile. Either way
    /// the task ends only after the held batch has answered.
    #[tokio::test]
    async fn overlapping_batches_answer_while_an_earlier_one_is_still_open() {
        for in_flight in [1, 2] {
            let gate = Arc::new(tokio::sync::Semaphore::new(0));
            let held = gate.clone();
            let (b, task) = Batcher::overlapping("test", 1, in_flight, move |reqs: Vec<u32>| {
                let held = held.clone();
                async move {
                    if reqs[0] == 0 {
                        held.acquire().await.unwrap().forget();
                    }
                    reqs
                }
            });
            let task = tokio::spawn(task);
            let first = tokio::spawn({
                let b = b.clone();
                async move { b.submit(0).await }
            });
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let second =
                tokio::time::timeout(std::time::Duration::from_millis(200), b.submit(1)).await;
            match in_flight {
                1 => assert!(second.is_err(), "one at a time: waits for the open batch"),
                _ => assert_eq!(second.unwrap(), Some(1), "answered beside the open batch"),
            }
            drop(b);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert!(!task.is_finished(), "the open batch keeps the task");
            gate.add_permits(1);
            assert_eq!(first.await.unwrap(), Some(0));
            task.await.unwrap();
        }
    }

    /// A request queued behind a batch held open waits at least as long
    /// as it stays queued; each request's wait and each batch's time are
    /// recorded under the batcher's name.
    #[tokio::test]
    async fn each_wait_and_each_batch_is_timed() {
        let series = |metric: &str, part: &str| {
            crate::telemetry::rendered(&format!("{metric}_{part}{{batcher=\"timed\"}}"))
                .unwrap_or(0.0)
        };
        // Installs the recorder: what is recorded before goes nowhere.
        assert_eq!(series("group_commit_wait_seconds", "count"), 0.0);
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let held = gate.clone();
        let (b, task) = Batcher::new("timed", 1, move |reqs: Vec<u32>| {
            let held = held.clone();
            async move {
                if reqs[0] == 0 {
                    held.acquire().await.unwrap().forget();
                }
                reqs
            }
        });
        tokio::spawn(task);
        let queued = |b: &Batcher<u32, u32>| b.queue.max_capacity() - b.queue.capacity();
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.submit(0).await }
        });
        let second = tokio::spawn({
            let b = b.clone();
            async move { b.submit(1).await }
        });
        // Batches of one: the second request stays queued behind the
        // first, held open until 60 ms after the second is seen queued.
        while queued(&b) < 1 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        gate.add_permits(1);
        assert_eq!(first.await.unwrap(), Some(0));
        assert_eq!(second.await.unwrap(), Some(1));
        assert_eq!(series("group_commit_wait_seconds", "count"), 2.0);
        assert_eq!(series("group_commit_apply_seconds", "count"), 2.0);
        let waited = series("group_commit_wait_seconds", "sum");
        assert!(
            (0.06..10.0).contains(&waited),
            "the second request waited for the held batch: {waited} s in all"
        );
        let applying = series("group_commit_apply_seconds", "sum");
        assert!(
            (0.05..10.0).contains(&applying),
            "the held batch took about 60 ms: {applying} s in all"
        );
    }

    #[tokio::test]
    async fn a_panicking_batch_fails_its_requests_and_the_queue_goes_on() {
        let (b, task) = Batcher::new("test", 1, |reqs: Vec<u32>| async move {
            assert!(reqs[0] != 13, "unlucky");
            reqs
        });
        tokio::spawn(task);
        assert_eq!(b.submit(13).await, None);
        assert_eq!(b.submit(7).await, Some(7));
    }
}
