//! The order's life, as a pure state machine: no I/O, every rule here is
//! unit-tested. The store loads an [`Order`], these functions change it and
//! say which event to publish, and the store saves both in one transaction.
//!
//! ```text
//!   PLACED ──stock ok──▶ ACCEPTED ──delivery started──▶ DELIVERING ──▶ DELIVERED
//!     │ no stock            │ cancel (kitchen agrees) ▶ CANCELLED
//!     ▼                     │ cancel (kitchen unreachable) ▶ CANCEL_PENDING
//!   REJECTED                                  ├─ kitchen cancels ▶ CANCELLED
//!                                             └─ kitchen refuses ▶ ACCEPTED / DELIVERING
//! ```
//! Every transition is guarded by the current status, so an event that
//! arrives twice, late or out of order never moves an order backwards.

use restaurant_contract::{
    CancelRequested, DeliveryRef, Event, OrderLine, OrderPlaced, Reason, now_ms,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Placed,
    Accepted,
    Rejected,
    CancelPending,
    Cancelled,
    Delivering,
    Delivered,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Placed => "PLACED",
            OrderStatus::Accepted => "ACCEPTED",
            OrderStatus::Rejected => "REJECTED",
            OrderStatus::CancelPending => "CANCEL_PENDING",
            OrderStatus::Cancelled => "CANCELLED",
            OrderStatus::Delivering => "DELIVERING",
            OrderStatus::Delivered => "DELIVERED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "PLACED" => OrderStatus::Placed,
            "ACCEPTED" => OrderStatus::Accepted,
            "REJECTED" => OrderStatus::Rejected,
            "CANCEL_PENDING" => OrderStatus::CancelPending,
            "CANCELLED" => OrderStatus::Cancelled,
            "DELIVERING" => OrderStatus::Delivering,
            "DELIVERED" => OrderStatus::Delivered,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            OrderStatus::Rejected | OrderStatus::Cancelled | OrderStatus::Delivered
        )
    }

    /// Still waiting on the kitchen: cancellable, and its saga is open.
    fn before_delivery(self) -> bool {
        matches!(
            self,
            OrderStatus::Placed | OrderStatus::Accepted | OrderStatus::CancelPending
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: String,
    pub customer_id: String,
    pub restaurant_id: String,
    pub items: Vec<OrderLine>,
    pub address: String,
    pub status: OrderStatus,
    pub reason: Option<String>,
    pub cook_id: Option<String>,
    pub delivery_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A place-order request, checked. Fields are private so an unchecked one
/// cannot be built: "parse, don't validate".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewOrder {
    customer_id: String,
    restaurant_id: String,
    items: Vec<OrderLine>,
    address: String,
}

pub const MAX_LINES: usize = 50;
pub const MAX_QTY: i64 = 100;
const MAX_ID: usize = 128;
const MAX_ADDRESS: usize = 512;

fn check_text(field: &str, value: &str, max: usize) -> Result<String, String> {
    let v = value.trim();
    if v.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if v.chars().count() > max {
        return Err(format!("{field} must be at most {max} characters"));
    }
    Ok(v.to_owned())
}

impl NewOrder {
    pub fn parse(
        customer_id: &str,
        restaurant_id: &str,
        items: &[OrderLine],
        address: &str,
    ) -> Result<Self, String> {
        if items.is_empty() {
            return Err("items must contain at least one line".into());
        }
        if items.len() > MAX_LINES {
            return Err(format!("an order has at most {MAX_LINES} lines"));
        }
        let items = items
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if l.qty < 1 || l.qty > MAX_QTY {
                    return Err(format!("items[{i}].qty must be between 1 and {MAX_QTY}"));
                }
                Ok(OrderLine {
                    menu_id: check_text(&format!("items[{i}].menuId"), &l.menu_id, MAX_ID)?,
                    qty: l.qty,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(NewOrder {
            customer_id: check_text("customerId", customer_id, MAX_ID)?,
            restaurant_id: check_text("restaurantId", restaurant_id, MAX_ID)?,
            items,
            address: check_text("address", address, MAX_ADDRESS)?,
        })
    }

    /// The canonical form an Idempotency-Key is bound to.
    pub fn fingerprint(&self) -> String {
        serde_json::to_string(self).expect("serializes")
    }

    /// The new order and the event announcing it.
    pub fn place(self, id: String) -> (Order, Event) {
        let now = now_ms();
        let event = Event::OrderPlaced(OrderPlaced {
            customer_id: self.customer_id.clone(),
            restaurant_id: self.restaurant_id.clone(),
            items: self.items.clone(),
            address: self.address.clone(),
        });
        let order = Order {
            id,
            customer_id: self.customer_id,
            restaurant_id: self.restaurant_id,
            items: self.items,
            address: self.address,
            status: OrderStatus::Placed,
            reason: None,
            cook_id: None,
            delivery_id: None,
            created_at: now,
            updated_at: now,
        };
        (order, event)
    }
}

impl Order {
    fn set_status(&mut self, status: OrderStatus, reason: Option<String>) {
        self.status = status;
        if reason.is_some() {
            self.reason = reason;
        }
    }

    /// Reacts to an event of the kitchen or the delivery. Returns the event
    /// to publish, if the reaction has one. Changes nothing when the event
    /// is stale for the current status.
    pub fn apply(&mut self, event: &Event) -> Option<Event> {
        use OrderStatus::*;
        match event {
            Event::StockChecked(s) => {
                self.cook_id.get_or_insert_with(|| s.cook_id.clone());
                match (self.status, s.in_stock) {
                    (Placed, true) => self.set_status(Accepted, None),
                    (Placed | CancelPending, false) => {
                        let reason = s.reason.clone().unwrap_or_else(|| "out of stock".into());
                        self.set_status(Rejected, Some(reason.clone()));
                        return Some(Event::OrderRejected(Reason { reason }));
                    }
                    _ => {}
                }
            }
            Event::CookStarted(c) => {
                self.cook_id.get_or_insert_with(|| c.cook_id.clone());
            }
            Event::CookCancelled(c) => {
                if let Some(id) = &c.cook_id {
                    self.cook_id.get_or_insert_with(|| id.clone());
                }
                return self.cancelled(&c.reason);
            }
            Event::CookCancelRefused(c) if self.status == CancelPending => {
                self.set_status(Accepted, Some(format!("cancel refused: {}", c.reason)));
            }
            Event::DeliveryStarted(d) => {
                self.delivery_id
                    .get_or_insert_with(|| d.delivery_id.clone());
                if self.status.before_delivery() {
                    let reason = (self.status == CancelPending)
                        .then(|| "cancel refused: the order was already cooked".to_owned());
                    self.set_status(Delivering, reason);
                }
            }
            Event::DeliveryCompleted(d) => {
                self.delivery_id
                    .get_or_insert_with(|| d.delivery_id.clone());
                if self.status.before_delivery() || self.status == Delivering {
                    self.set_status(Delivered, None);
                    return Some(Event::OrderDelivered(DeliveryRef {
                        delivery_id: d.delivery_id.clone(),
                    }));
                }
            }
            _ => {}
        }
        None
    }

    /// The kitchen has cancelled (by answer or by event).
    pub fn cancelled(&mut self, reason: &str) -> Option<Event> {
        if !self.status.before_delivery() {
            return None;
        }
        self.set_status(OrderStatus::Cancelled, Some(reason.to_owned()));
        Some(Event::OrderCancelled(Reason {
            reason: reason.to_owned(),
        }))
    }

    /// The kitchen could not be asked: park the request durably.
    pub fn cancel_deferred(&mut self, request_id: &str) -> Option<Event> {
        if !matches!(self.status, OrderStatus::Placed | OrderStatus::Accepted) {
            return None;
        }
        self.set_status(OrderStatus::CancelPending, None);
        Some(Event::OrderCancelRequested(CancelRequested {
            request_id: request_id.to_owned(),
        }))
    }
}

/// What a customer's cancel request leads to, before asking anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelDecision {
    /// Already cancelled: answer 200 again.
    AlreadyCancelled,
    /// A cancel is queued for the kitchen: answer 202 again.
    AlreadyPending,
    /// Final or on its way: 409.
    TooLate,
    /// Ask the kitchen (synchronously).
    AskKitchen,
}

pub fn decide_cancel(status: OrderStatus) -> CancelDecision {
    match status {
        OrderStatus::Cancelled => CancelDecision::AlreadyCancelled,
        OrderStatus::CancelPending => CancelDecision::AlreadyPending,
        OrderStatus::Placed | OrderStatus::Accepted => CancelDecision::AskKitchen,
        OrderStatus::Rejected | OrderStatus::Delivering | OrderStatus::Delivered => {
            CancelDecision::TooLate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use restaurant_contract::{CookCancelled, CookRef, DeliveryStarted, StockChecked};

    fn order() -> Order {
        NewOrder::parse(
            "c",
            "r",
            &[OrderLine {
                menu_id: "m".into(),
                qty: 1,
            }],
            "a",
        )
        .unwrap()
        .place("o".into())
        .0
    }

    fn stock(ok: bool) -> Event {
        Event::StockChecked(StockChecked {
            cook_id: "k".into(),
            in_stock: ok,
            shortages: vec![],
            reason: (!ok).then(|| "no m".into()),
        })
    }

    fn delivery_started() -> Event {
        Event::DeliveryStarted(DeliveryStarted {
            delivery_id: "d".into(),
            cook_id: "k".into(),
            address: "a".into(),
        })
    }

    fn delivered() -> Event {
        Event::DeliveryCompleted(DeliveryRef {
            delivery_id: "d".into(),
        })
    }

    #[test]
    fn happy_path_reaches_delivered() {
        let mut o = order();
        assert_eq!(o.apply(&stock(true)), None);
        assert_eq!(o.status, OrderStatus::Accepted);
        o.apply(&Event::CookStarted(CookRef {
            cook_id: "k".into(),
        }));
        o.apply(&delivery_started());
        assert_eq!(o.status, OrderStatus::Delivering);
        assert!(matches!(
            o.apply(&delivered()),
            Some(Event::OrderDelivered(_))
        ));
        assert_eq!(o.status, OrderStatus::Delivered);
        assert_eq!(o.cook_id.as_deref(), Some("k"));
        assert_eq!(o.delivery_id.as_deref(), Some("d"));
    }

    #[test]
    fn no_stock_rejects_and_publishes_the_reason() {
        let mut o = order();
        let ev = o.apply(&stock(false));
        assert_eq!(o.status, OrderStatus::Rejected);
        assert_eq!(
            ev,
            Some(Event::OrderRejected(Reason {
                reason: "no m".into()
            }))
        );
    }

    #[test]
    fn late_and_duplicate_events_never_move_an_order_backwards() {
        let mut o = order();
        o.apply(&stock(true));
        o.apply(&delivery_started());
        o.apply(&delivered());
        let done = o.clone();
        for ev in [stock(true), stock(false), delivery_started(), delivered()] {
            assert_eq!(o.apply(&ev), None, "{ev:?}");
            assert_eq!(o, done);
        }
    }

    #[test]
    fn a_delivery_event_before_the_stock_result_still_moves_forward() {
        let mut o = order();
        o.apply(&delivered());
        assert_eq!(o.status, OrderStatus::Delivered);
        o.apply(&stock(true));
        assert_eq!(o.status, OrderStatus::Delivered);
    }

    #[test]
    fn cancel_pending_resolves_by_the_kitchens_answer() {
        let mut o = order();
        o.apply(&stock(true));
        assert!(matches!(
            o.cancel_deferred("req"),
            Some(Event::OrderCancelRequested(_))
        ));
        assert_eq!(o.status, OrderStatus::CancelPending);
        assert_eq!(o.cancel_deferred("req"), None, "deferred once");
        let mut refused = o.clone();
        refused.apply(&Event::CookCancelRefused(CookCancelled {
            cook_id: Some("k".into()),
            reason: "already cooked".into(),
        }));
        assert_eq!(refused.status, OrderStatus::Accepted);
        assert_eq!(
            refused.reason.as_deref(),
            Some("cancel refused: already cooked")
        );
        let ev = o.apply(&Event::CookCancelled(CookCancelled {
            cook_id: Some("k".into()),
            reason: "cancelled by customer".into(),
        }));
        assert!(matches!(ev, Some(Event::OrderCancelled(_))));
        assert_eq!(o.status, OrderStatus::Cancelled);
    }

    #[test]
    fn cancel_decisions_follow_the_status() {
        use CancelDecision::*;
        use OrderStatus::*;
        for (s, d) in [
            (Placed, AskKitchen),
            (Accepted, AskKitchen),
            (CancelPending, AlreadyPending),
            (Cancelled, AlreadyCancelled),
            (Rejected, TooLate),
            (Delivering, TooLate),
            (Delivered, TooLate),
        ] {
            assert_eq!(decide_cancel(s), d, "{s:?}");
            assert_eq!(OrderStatus::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn new_orders_are_validated() {
        let line = |m: &str, q| OrderLine {
            menu_id: m.into(),
            qty: q,
        };
        assert!(NewOrder::parse("c", "r", &[], "a").is_err());
        assert!(NewOrder::parse("c", "r", &[line("m", 0)], "a").is_err());
        assert!(NewOrder::parse("c", "r", &[line("m", -3)], "a").is_err());
        assert!(NewOrder::parse("c", "r", &[line("m", MAX_QTY + 1)], "a").is_err());
        assert!(NewOrder::parse("c", "r", &[line(" ", 1)], "a").is_err());
        assert!(NewOrder::parse("", "r", &[line("m", 1)], "a").is_err());
        assert!(NewOrder::parse("c", "r", &[line("m", 1)], "  ").is_err());
        let many = vec![line("m", 1); MAX_LINES + 1];
        assert!(NewOrder::parse("c", "r", &many, "a").is_err());
        let ok = NewOrder::parse(" c ", "r", &[line("m", 2)], "a").unwrap();
        assert_eq!(ok.customer_id, "c", "trimmed");
    }

    /// What happens to an order: an event from the kitchen or the
    /// couriers, or a customer's cancel answered by the kitchen or
    /// deferred.
    #[derive(Debug, Clone)]
    enum Step {
        Event(Event),
        CancelAnswered,
        CancelDeferred,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let id = || prop_oneof![Just("1".to_owned()), Just("2".to_owned())];
        let cancelled = || {
            (id(), any::<bool>()).prop_map(|(k, with)| CookCancelled {
                cook_id: with.then(|| format!("k{k}")),
                reason: format!("reason {k}"),
            })
        };
        prop_oneof![
            any::<bool>().prop_map(|ok| Step::Event(stock(ok))),
            id().prop_map(|k| Step::Event(Event::CookStarted(CookRef {
                cook_id: format!("k{k}")
            }))),
            cancelled().prop_map(|c| Step::Event(Event::CookCancelled(c))),
            cancelled().prop_map(|c| Step::Event(Event::CookCancelRefused(c))),
            id().prop_map(|d| Step::Event(Event::DeliveryStarted(DeliveryStarted {
                delivery_id: format!("d{d}"),
                cook_id: "k1".into(),
                address: "a".into(),
            }))),
            id().prop_map(|d| Step::Event(Event::DeliveryCompleted(DeliveryRef {
                delivery_id: format!("d{d}")
            }))),
            Just(Step::CancelAnswered),
            Just(Step::CancelDeferred),
        ]
    }

    /// The order and everything it published after `steps`.
    fn run(placed: &Order, steps: &[Step]) -> (Order, Vec<Event>) {
        let mut o = placed.clone();
        let published = steps
            .iter()
            .filter_map(|s| match s {
                Step::Event(e) => o.apply(e),
                Step::CancelAnswered => o.cancelled("cancelled by customer"),
                Step::CancelDeferred => o.cancel_deferred("req"),
            })
            .collect();
        (o, published)
    }

    proptest::proptest! {
        // A counterexample takes three or four particular steps in a row:
        // many cases (a few hundred found none for StockChecked, which
        // has one; these find it every time).
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]
        /// What lets the order consumer keep no dedup record for these
        /// types (`OrderEvents::IDEMPOTENT_TYPES`): an event of one of them
        /// applied again, at any later point of any history, changes
        /// nothing and publishes nothing.
        #[test]
        fn an_idempotent_type_applied_again_anywhere_later_changes_nothing(
            steps in proptest::collection::vec(step(), 0..12),
            event in proptest::strategy::Strategy::prop_filter(step(), "an idempotent type", |s| matches!(
                s,
                Step::Event(e) if idempotent_types().contains(&e.event_type())
            )),
            first in proptest::prelude::any::<proptest::sample::Index>(),
            again in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let i = first.index(steps.len() + 1);
            let mut once = steps;
            once.insert(i, event.clone());
            let j = i + 1 + again.index(once.len() - i);
            let mut twice = once.clone();
            twice.insert(j, event);
            let placed = order();
            proptest::prop_assert_eq!(run(&placed, &twice), run(&placed, &once));
        }
    }

    fn idempotent_types() -> &'static [&'static str] {
        use restaurant_platform::consumer::Handler;
        crate::events::OrderEvents::IDEMPOTENT_TYPES
    }

    #[test]
    fn a_refusal_applied_again_could_undo_a_later_cancel_request() {
        // Why CookCancelRefused keeps its dedup record.
        let refused = Step::Event(Event::CookCancelRefused(CookCancelled {
            cook_id: None,
            reason: "cooked".into(),
        }));
        let once = [
            Step::Event(stock(true)),
            Step::CancelDeferred,
            refused.clone(),
            Step::CancelDeferred,
        ];
        let mut twice = once.to_vec();
        twice.push(refused);
        let placed = order();
        assert_eq!(run(&placed, &once).0.status, OrderStatus::CancelPending);
        assert_eq!(run(&placed, &twice).0.status, OrderStatus::Accepted);
    }
}
