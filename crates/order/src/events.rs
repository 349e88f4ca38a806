//! How the order service reacts to the kitchen and the delivery: the order
//! side of the saga. The rules are in [`crate::domain::Order::apply`].

use restaurant_contract::{Envelope, Event};
use restaurant_platform::{
    consumer::{HandleError, Handler},
    db::Tx,
};

use crate::App;

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

    async fn handle(&self, tx: &mut Tx, env: &Envelope, event: Event) -> Result<(), HandleError> {
        let cause = env.as_cause();
        let found =
            crate::http::change_in(&self.0, tx, &env.order_id, &cause, |o| o.apply(&event)).await?;
        match found {
            Some(_) => Ok(()),
            // Every order id on the bus was minted here; an unknown one is a
            // foreign or corrupt event, and retrying will not make it known.
            None => Err(HandleError::Permanent(format!(
                "event for unknown order {}",
                env.order_id
            ))),
        }
    }
}
