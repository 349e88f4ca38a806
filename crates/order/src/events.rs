//! How the order service reacts to the kitchen and the delivery: the order
//! side of the saga. The rules are in [`crate::domain::Order::apply`].

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use restaurant_contract::{Envelope, Event, now_ms};
use restaurant_platform::{
    consumer::{HandleError, Handler},
    db::{Planned, Tx},
    outbox,
};

use crate::{App, domain::Order, store};

pub struct OrderEvents(pub App);

impl Handler for OrderEvents {
    const TYPES: &'static [&'static str] = &[
        "StockChecked",
        "CookStarted",
        "CookCancelled",
        "CookCancelRefused",
        "DeliveryStarted",
        "DeliveryCompleted",
    ];

    /// Each moves an order only into states it never leaves again (cook
    /// and delivery ids are set once; DELIVERING, DELIVERED and CANCELLED
    /// are never left for a state these events act on), so applied again,
    /// at any later point, it changes nothing and publishes nothing
    /// (`domain::tests`, a property test). StockChecked and
    /// CookCancelRefused stay recorded: ACCEPTED and CANCEL_PENDING follow
    /// each other as customers ask to cancel, so a refusal applied again
    /// could undo a later request.
    const IDEMPOTENT_TYPES: &'static [&'static str] = &[
        "CookStarted",
        "CookCancelled",
        "DeliveryStarted",
        "DeliveryCompleted",
    ];

    /// Nobody waits on this consumer: the kitchen and the couriers go on
    /// from their own events and MyPage projects every event itself; what
    /// lags is the order row (`GET /orders/{id}`) and `OrderRejected` /
    /// `OrderDelivered`, by up to 20 ms. In exchange, under load it commits
    /// at most 50 times a second instead of after every placement batch,
    /// so placements wait less for the order database's one SQLite writer.
    /// Embedded shape at 800 orders/s offered, 15 s: 1,280 -> 699 batches,
    /// `POST /orders` at the service 17.0 -> 12.4 ms on average; closed
    /// loop throughput unchanged (docs/benchmarks.md, seventh session).
    /// Lingering the kitchen and delivery consumers too gained nothing.
    const LINGER: Duration = Duration::from_millis(20);

    /// On SQLite each batch holds the order database's one writer, which
    /// placements wait for; fewer, larger batches hold it less in all.
    /// The gain measured in the eighteenth session (placement p99 at
    /// 3,000/s 18.1 / 20.7 against 19.4 / 28.2 ms at 20 ms) was mostly
    /// work put off: lingering after full batches too, this consumer did
    /// at most 5,120 of the 12,000 events a second that rate brings, and
    /// finished the rest after the run. Since the twenty-fifth session a
    /// full batch is followed at once, so at 3,000/s it keeps up (27
    /// batches a second of ~440 events, 3.7 ms each) and the linger spaces
    /// only the batches of a lighter load. The order row, and
    /// `OrderRejected` / `OrderDelivered` (which MyPage also learns from
    /// the kitchen's and the courier's own events), lag by up to 100 ms
    /// under load. On PostgreSQL a batch locks only its rows, and 40 ms
    /// gained nothing there (twelfth session).
    const LINGER_ON_SQLITE: Duration = Duration::from_millis(100);

    /// The batch as a few set-based statements: load every order it
    /// touches, run the state machine in memory, save what changed and
    /// append the resulting events.
    async fn handle_batch(
        &self,
        tx: &mut Tx,
        batch: Vec<(Envelope, Event)>,
    ) -> Result<(), HandleError> {
        let orders = store::load_many_for_update(tx, &touched(&batch)).await?;
        let (changed, out) = decide(orders, &batch)?;
        store::save_all(tx, &changed.iter().collect::<Vec<_>>()).await?;
        outbox::append_all(tx, &out).await?;
        Ok(())
    }

    /// The embedded shape's path: the same statements in two texts, so
    /// that placements wait for the order database's writer for two round
    /// trips to its thread, not six (docs/benchmarks.md, eighteenth session).
    const PLANNED: bool = true;

    async fn handle_batch_planned(
        &self,
        tx: &mut Planned,
        batch: Vec<(Envelope, Event)>,
    ) -> Result<(), HandleError> {
        let orders = store::load_many_planned(tx, &touched(&batch)).await?;
        let (changed, out) = decide(orders, &batch)?;
        store::save_all_emitting_planned(tx, &changed.iter().collect::<Vec<_>>(), &out).await?;
        Ok(())
    }

    async fn handle(&self, tx: &mut Tx, env: &Envelope, event: Event) -> Result<(), HandleError> {
        self.handle_batch(tx, vec![(env.clone(), event)]).await
    }
}

/// The orders a batch is about, each once, in id order.
fn touched(batch: &[(Envelope, Event)]) -> Vec<&str> {
    batch
        .iter()
        .map(|(env, _)| env.order_id.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Runs the state machine over `batch` from the `orders` it touches:
/// the orders it changed and the events they emit.
fn decide(
    orders: Vec<Order>,
    batch: &[(Envelope, Event)],
) -> Result<(Vec<Order>, Vec<Envelope>), HandleError> {
    let mut orders: HashMap<String, (Order, Order)> = orders
        .into_iter()
        .map(|o| (o.id.clone(), (o.clone(), o)))
        .collect();
    let mut out = Vec::new();
    for (env, event) in batch {
        let Some((order, _)) = orders.get_mut(&env.order_id) else {
            return Err(unknown(&env.order_id));
        };
        if let Some(next) = order.apply(event) {
            out.push(Envelope::new(
                crate::NAME,
                &env.order_id,
                &next,
                &env.as_cause(),
            ));
        }
    }
    let now = now_ms();
    let changed = orders
        .into_values()
        .filter(|(order, before)| order != before)
        .map(|(mut order, _)| {
            order.updated_at = now;
            order
        })
        .collect();
    Ok((changed, out))
}

/// Every order id on the bus was minted here; an unknown one is a foreign or
/// corrupt event, and retrying will not make it known.
fn unknown(order_id: &str) -> HandleError {
    HandleError::Permanent(format!("event for unknown order {order_id}"))
}
