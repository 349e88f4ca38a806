//! How the kitchen reacts to the order service: take placed orders, and
//! apply cancel requests that were deferred while the kitchen was away.

use restaurant_contract::{CookCancelled, Envelope, Event};
use restaurant_platform::{
    consumer::{HandleError, Handler},
    db::Tx,
    outbox,
};

use crate::{App, domain::CancelOutcome, kitchen};

pub struct KitchenEvents(pub App);

impl Handler for KitchenEvents {
    const TYPES: &'static [&'static str] = &["OrderPlaced", "OrderCancelRequested"];
    /// An order is claimed by its first ticket (UNIQUE order_id): placed
    /// again, it finds its ticket, reserves nothing and publishes nothing
    /// (tests/idempotent.rs). A cancel request stays recorded: refused
    /// again, it would publish its refusal again.
    const IDEMPOTENT_TYPES: &'static [&'static str] = &["OrderPlaced"];

    /// Runs of placed orders are taken set-wise; a cancel request in
    /// between is applied in its place, so the batch keeps log order.
    async fn handle_batch(
        &self,
        tx: &mut Tx,
        batch: Vec<(Envelope, Event)>,
    ) -> Result<(), HandleError> {
        let mut run = Vec::new();
        for (env, event) in &batch {
            if let Event::OrderPlaced(placed) = event {
                run.push((env, placed));
                continue;
            }
            kitchen::take_orders(&self.0, tx, &run).await?;
            run.clear();
            self.handle(tx, env, event.clone()).await?;
        }
        kitchen::take_orders(&self.0, tx, &run).await?;
        Ok(())
    }

    async fn handle(&self, tx: &mut Tx, env: &Envelope, event: Event) -> Result<(), HandleError> {
        let cause = env.as_cause();
        match event {
            Event::OrderPlaced(placed) => {
                kitchen::take_orders(&self.0, tx, &[(env, &placed)]).await?;
            }
            Event::OrderCancelRequested(_) => {
                let c = kitchen::cancel_order(&self.0, tx, &env.order_id, &cause).await?;
                if c.outcome == CancelOutcome::TooLate {
                    let ev = Event::CookCancelRefused(CookCancelled {
                        cook_id: c.cook_id,
                        reason: c.reason,
                    });
                    outbox::emit(tx, crate::NAME, &env.order_id, &ev, &cause).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn after_commit(&self) {
        self.0.timer_wake.notify_one();
    }
}
