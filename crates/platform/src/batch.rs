//! Group commit. On SQLite every write transaction goes through one writer
//! connection, and on either backend a transaction costs a few round trips
//! and a commit (an fsync) whatever it holds. Requests that each need a
//! small write are therefore queued here and applied together: while one
//! batch commits, the next one gathers, so a quiet system pays no delay and
//! a busy one pays one commit for many requests.

use std::future::Future;

use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};

/// A queue in front of a batch function; cheap to clone.
pub struct Batcher<Req, Resp> {
    queue: mpsc::Sender<(Req, oneshot::Sender<Resp>)>,
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
    /// which answers each, in order. The returned task runs the batches; it
    /// ends when every `Batcher` clone is gone. `name` labels its metric
    /// (`group_commit_batch_size{batcher}`).
    pub fn new<F, Fut>(
        name: &'static str,
        max: usize,
        apply: F,
    ) -> (Self, impl Future<Output = ()> + Send + 'static)
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Resp>> + Send,
    {
        let (queue, mut rx) = mpsc::channel::<(Req, oneshot::Sender<Resp>)>(max * 4);
        let task = async move {
            let mut batch = Vec::with_capacity(max);
            while rx.recv_many(&mut batch, max).await > 0 {
                metrics::histogram!("group_commit_batch_size", "batcher" => name)
                    .record(batch.len() as f64);
                let (reqs, replies): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
                // A panicking batch answers nobody (their callers see `None`)
                // but must not take the queue down with it.
                match std::panic::AssertUnwindSafe(apply(reqs))
                    .catch_unwind()
                    .await
                {
                    Ok(resps) => {
                        for (reply, resp) in replies.into_iter().zip(resps) {
                            let _ = reply.send(resp);
                        }
                    }
                    Err(_) => tracing::error!("a write batch panicked; its requests failed"),
                }
            }
        };
        (Batcher { queue }, task)
    }

    /// Queues `req` and waits for its answer; `None` if the batch task is
    /// gone or the batch failed without answering.
    pub async fn submit(&self, req: Req) -> Option<Resp> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((req, reply)).await.ok()?;
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
