//! The MyPage projection, pure.
//!
//! Events arrive at least once and in any order, so the view must come out
//! the same whatever the order and however many copies. The design that
//! guarantees it: the view is a *join-semilattice*. Each event only adds
//! facts — a bit in a set, a field that is set once (ties broken by the
//! smaller value), the maximum of the times — and adding is commutative,
//! associative and idempotent. The statuses a reader sees are then a pure
//! function of the facts ([`View::order_status`] etc.), so a late event can
//! never move a status backwards: it adds a fact that was already implied
//! or outranked. The property test below checks this on random histories.

use restaurant_contract::{Event, OrderLine};

/// What has been seen about an order.
pub mod fact {
    pub const PLACED: i64 = 1;
    pub const STOCK_OK: i64 = 1 << 1;
    pub const STOCK_SHORT: i64 = 1 << 2;
    pub const ORDER_REJECTED: i64 = 1 << 3;
    pub const CANCEL_REQUESTED: i64 = 1 << 4;
    pub const CANCEL_REFUSED: i64 = 1 << 5;
    pub const COOK_CANCELLED: i64 = 1 << 6;
    pub const ORDER_CANCELLED: i64 = 1 << 7;
    pub const COOK_STARTED: i64 = 1 << 8;
    pub const COOK_COMPLETED: i64 = 1 << 9;
    pub const DELIVERY_STARTED: i64 = 1 << 10;
    pub const DELIVERY_COMPLETED: i64 = 1 << 11;
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct View {
    pub order_id: String,
    pub customer_id: Option<String>,
    pub restaurant_id: Option<String>,
    pub items: Option<Vec<OrderLine>>,
    pub facts: i64,
    pub cook_id: Option<String>,
    pub delivery_id: Option<String>,
    pub reject_reason: Option<String>,
    pub cancel_reason: Option<String>,
    pub refuse_reason: Option<String>,
    pub updated_at: i64,
    /// When the order was placed (epoch ms): its `OrderPlaced`.
    pub placed_at: Option<i64>,
    /// When the courier handed the order over (epoch ms): the earliest of
    /// the delivery's `DeliveryCompleted` and the order's `OrderDelivered`,
    /// which follows it. The least, not the latest, so that it is the same
    /// whichever copy of either arrives first.
    pub delivered_at: Option<i64>,
}

/// Sets a write-once field; on a conflict keeps the smaller value, so the
/// result does not depend on which came first.
fn join<T: Ord + Clone>(slot: &mut Option<T>, value: &T) {
    match slot {
        Some(cur) if *cur <= *value => {}
        _ => *slot = Some(value.clone()),
    }
}

/// [`join`] for the items, ordered as their stored JSON text is: the
/// database joins a batch's views into the stored ones by comparing the
/// stored text, and both must pick the same value.
fn join_items(slot: &mut Option<Vec<OrderLine>>, value: &[OrderLine]) {
    let text = |items: &[OrderLine]| serde_json::to_string(items).expect("serializes");
    match slot {
        Some(cur) if text(cur) <= text(value) => {}
        _ => *slot = Some(value.to_vec()),
    }
}

impl View {
    pub fn new(order_id: impl Into<String>) -> Self {
        View {
            order_id: order_id.into(),
            ..Default::default()
        }
    }

    fn has(&self, f: i64) -> bool {
        self.facts & f != 0
    }

    /// Adds what `event` (which happened at `at`, epoch ms) says.
    pub fn apply(&mut self, event: &Event, at: i64) {
        use fact::*;
        self.updated_at = self.updated_at.max(at);
        let f = match event {
            Event::OrderPlaced(p) => {
                join(&mut self.customer_id, &p.customer_id);
                join(&mut self.restaurant_id, &p.restaurant_id);
                join_items(&mut self.items, &p.items);
                join(&mut self.placed_at, &at);
                PLACED
            }
            Event::OrderRejected(r) => {
                join(&mut self.reject_reason, &r.reason);
                ORDER_REJECTED
            }
            Event::OrderCancelRequested(_) => CANCEL_REQUESTED,
            Event::OrderCancelled(r) => {
                join(&mut self.cancel_reason, &r.reason);
                ORDER_CANCELLED
            }
            Event::OrderDelivered(d) => {
                join(&mut self.delivery_id, &d.delivery_id);
                join(&mut self.delivered_at, &at);
                DELIVERY_COMPLETED
            }
            Event::StockChecked(s) => {
                join(&mut self.cook_id, &s.cook_id);
                if s.in_stock {
                    STOCK_OK
                } else {
                    if let Some(r) = &s.reason {
                        join(&mut self.reject_reason, r);
                    }
                    STOCK_SHORT
                }
            }
            Event::CookStarted(c) => {
                join(&mut self.cook_id, &c.cook_id);
                COOK_STARTED
            }
            Event::CookCompleted(c) => {
                join(&mut self.cook_id, &c.cook_id);
                COOK_COMPLETED
            }
            Event::CookCancelled(c) => {
                if let Some(id) = &c.cook_id {
                    join(&mut self.cook_id, id);
                }
                join(&mut self.cancel_reason, &c.reason);
                COOK_CANCELLED
            }
            Event::CookCancelRefused(c) => {
                join(
                    &mut self.refuse_reason,
                    &format!("cancel refused: {}", c.reason),
                );
                CANCEL_REFUSED
            }
            Event::DeliveryStarted(d) => {
                join(&mut self.delivery_id, &d.delivery_id);
                DELIVERY_STARTED
            }
            Event::DeliveryCompleted(d) => {
                join(&mut self.delivery_id, &d.delivery_id);
                join(&mut self.delivered_at, &at);
                DELIVERY_COMPLETED
            }
        };
        self.facts |= f;
    }

    /// The order's status as the order service would report it.
    pub fn order_status(&self) -> &'static str {
        use fact::*;
        if self.has(ORDER_CANCELLED | COOK_CANCELLED) {
            "CANCELLED"
        } else if self.has(ORDER_REJECTED | STOCK_SHORT) {
            "REJECTED"
        } else if self.has(DELIVERY_COMPLETED) {
            "DELIVERED"
        } else if self.has(DELIVERY_STARTED) {
            "DELIVERING"
        } else if self.has(CANCEL_REQUESTED) && !self.has(CANCEL_REFUSED) {
            "CANCEL_PENDING"
        } else if self.has(STOCK_OK | COOK_STARTED | COOK_COMPLETED) {
            "ACCEPTED"
        } else {
            // Known to exist (some event named it) but the kitchen has not
            // answered: waiting, not failed.
            "PLACED"
        }
    }

    pub fn cook_status(&self) -> Option<&'static str> {
        use fact::*;
        Some(if self.has(COOK_CANCELLED) {
            "CANCELLED"
        } else if self.has(STOCK_SHORT) {
            "REJECTED"
        } else if self.has(COOK_COMPLETED | DELIVERY_STARTED | DELIVERY_COMPLETED) {
            "COOKED"
        } else if self.has(COOK_STARTED | STOCK_OK) {
            "COOKING"
        } else {
            return None;
        })
    }

    pub fn delivery_status(&self) -> Option<&'static str> {
        use fact::*;
        Some(if self.has(DELIVERY_COMPLETED) {
            "DELIVERED"
        } else if self.has(DELIVERY_STARTED) {
            "DELIVERING"
        } else {
            return None;
        })
    }

    /// Why the order is where it is, when that needs saying.
    pub fn reason(&self) -> Option<&str> {
        match self.order_status() {
            "CANCELLED" => self.cancel_reason.as_deref(),
            "REJECTED" => self.reject_reason.as_deref(),
            _ if self.has(fact::CANCEL_REFUSED) => self.refuse_reason.as_deref(),
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use restaurant_contract::*;

    fn placed() -> Event {
        Event::OrderPlaced(OrderPlaced {
            customer_id: "c".into(),
            restaurant_id: "r".into(),
            items: vec![OrderLine {
                menu_id: "m".into(),
                qty: 1,
            }],
            address: "a".into(),
        })
    }

    fn stock(ok: bool) -> Event {
        Event::StockChecked(StockChecked {
            cook_id: "k".into(),
            in_stock: ok,
            shortages: vec![],
            reason: (!ok).then(|| "out of stock: m".into()),
        })
    }

    fn cook(id: &str) -> CookRef {
        CookRef { cook_id: id.into() }
    }

    fn cancelled(reason: &str) -> CookCancelled {
        CookCancelled {
            cook_id: Some("k".into()),
            reason: reason.into(),
        }
    }

    /// A history and the order, cook and delivery status it ends in.
    pub(crate) type History = (
        Vec<Event>,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
    );

    /// The event histories the services can produce for one order.
    pub(crate) fn histories() -> Vec<History> {
        let delivered = vec![
            placed(),
            stock(true),
            Event::CookStarted(cook("k")),
            Event::CookCompleted(CookCompleted {
                cook_id: "k".into(),
                restaurant_id: "r".into(),
                address: "a".into(),
            }),
            Event::DeliveryStarted(DeliveryStarted {
                delivery_id: "d".into(),
                cook_id: "k".into(),
                address: "a".into(),
            }),
            Event::DeliveryCompleted(DeliveryRef {
                delivery_id: "d".into(),
            }),
            Event::OrderDelivered(DeliveryRef {
                delivery_id: "d".into(),
            }),
        ];
        let mut refused_then_delivered = delivered.clone();
        refused_then_delivered.push(Event::OrderCancelRequested(CancelRequested {
            request_id: "q".into(),
        }));
        refused_then_delivered.push(Event::CookCancelRefused(cancelled("already cooked")));
        vec![
            (delivered, "DELIVERED", Some("COOKED"), Some("DELIVERED")),
            (
                refused_then_delivered,
                "DELIVERED",
                Some("COOKED"),
                Some("DELIVERED"),
            ),
            (
                vec![
                    placed(),
                    stock(false),
                    Event::OrderRejected(Reason {
                        reason: "out of stock: m".into(),
                    }),
                ],
                "REJECTED",
                Some("REJECTED"),
                None,
            ),
            (
                vec![
                    placed(),
                    stock(true),
                    Event::CookStarted(cook("k")),
                    Event::OrderCancelRequested(CancelRequested {
                        request_id: "q".into(),
                    }),
                    Event::CookCancelled(cancelled("cancelled by customer")),
                    Event::OrderCancelled(Reason {
                        reason: "cancelled by customer".into(),
                    }),
                ],
                "CANCELLED",
                Some("CANCELLED"),
                None,
            ),
        ]
    }

    /// `timed` with the events whose bit is set in `dup_mask` delivered
    /// twice, all shuffled by a small deterministic PRNG seeded by `seed`.
    pub(crate) fn shuffled_with_duplicates(
        timed: &[(usize, Event)],
        seed: u64,
        dup_mask: u32,
    ) -> Vec<(usize, Event)> {
        let mut shuffled = timed.to_vec();
        for (i, e) in timed.iter().enumerate() {
            if dup_mask & (1 << i) != 0 {
                shuffled.push(e.clone());
            }
        }
        // Fisher-Yates with xorshift.
        let mut s = seed | 1;
        for i in (1..shuffled.len()).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            shuffled.swap(i, (s % (i as u64 + 1)) as usize);
        }
        shuffled
    }

    pub(crate) fn fold(events: &[(usize, Event)]) -> View {
        let mut v = View::new("o");
        for (t, e) in events {
            v.apply(e, *t as i64);
        }
        v
    }

    #[test]
    fn in_order_histories_give_the_expected_statuses() {
        for (events, order, cook, delivery) in histories() {
            let timed: Vec<_> = events.into_iter().enumerate().collect();
            let v = fold(&timed);
            assert_eq!(v.order_status(), order);
            assert_eq!(v.cook_status(), cook);
            assert_eq!(v.delivery_status(), delivery);
            assert_eq!(v.customer_id.as_deref(), Some("c"));
            // Delivered when the delivery completed (the sixth event, at
            // 5), not when the order service confirmed it (at 6).
            let delivered = (delivery == Some("DELIVERED")).then_some(5);
            assert_eq!(v.delivered_at, delivered);
            assert_eq!(v.placed_at, Some(0));
        }
    }

    #[test]
    fn the_delivery_time_is_the_earliest_copy_whatever_arrives_first() {
        let done = |id: &str| DeliveryRef {
            delivery_id: id.into(),
        };
        let mut v = View::new("o");
        v.apply(&Event::OrderDelivered(done("d")), 30);
        assert_eq!(v.delivered_at, Some(30));
        v.apply(&Event::DeliveryCompleted(done("d")), 20);
        v.apply(&Event::OrderDelivered(done("d")), 30);
        assert_eq!(v.delivered_at, Some(20));
        assert_eq!(v.updated_at, 30);
    }

    #[test]
    fn a_refused_cancel_is_explained_and_a_pending_one_shows() {
        let mut v = View::new("o");
        v.apply(&placed(), 1);
        v.apply(&stock(true), 2);
        v.apply(
            &Event::OrderCancelRequested(CancelRequested {
                request_id: "q".into(),
            }),
            3,
        );
        assert_eq!(v.order_status(), "CANCEL_PENDING");
        v.apply(&Event::CookCancelRefused(cancelled("already cooked")), 4);
        assert_eq!(v.order_status(), "ACCEPTED");
        assert_eq!(v.reason(), Some("cancel refused: already cooked"));
    }

    #[test]
    fn an_unseen_order_has_no_cook_or_delivery_status() {
        let v = View::new("o");
        assert_eq!(v.order_status(), "PLACED");
        assert_eq!(v.cook_status(), None);
        assert_eq!(v.delivery_status(), None);
    }

    proptest! {
        /// Any permutation of any history, with any events delivered again,
        /// gives the same view as the history in order.
        #[test]
        fn permutations_and_duplicates_give_the_same_view(
            which in 0usize..4,
            seed in any::<u64>(),
            dup_mask in any::<u32>(),
        ) {
            let (events, ..) = histories().swap_remove(which);
            let timed: Vec<(usize, Event)> = events.into_iter().enumerate().collect();
            let expected = fold(&timed);

            let shuffled = shuffled_with_duplicates(&timed, seed, dup_mask);
            prop_assert_eq!(fold(&shuffled), expected);
        }
    }
}
