//! What the kitchen does, each operation one transaction that changes the
//! ticket and stock and appends its events: take an order, cancel it,
//! complete it. HTTP handlers, the event handler and the timer call these.

use restaurant_contract::{
    Cause, CookCancelled, CookCompleted, CookRef, Envelope, Event, OrderPlaced, StockChecked,
    new_id, now_ms,
};
use std::collections::BTreeSet;

use restaurant_platform::{db::Tx, outbox};

use crate::{
    App,
    domain::{
        CancelOutcome, CompleteOutcome, CookStatus, Ticket, cancel_outcome, complete_outcome,
        reservation_plan, reserve_all, shortage_reason,
    },
    store::{self, TicketKey},
};

pub const CANCEL_REASON: &str = "cancelled by customer";

async fn emit(tx: &mut Tx, order_id: &str, event: Event, cause: &Cause) -> Result<(), sqlx::Error> {
    outbox::emit(tx, crate::NAME, order_id, &event, cause).await?;
    Ok(())
}

/// Orders arrived: reserve every line of each or none, and open a ticket
/// that says which, in log order, with a fixed number of statements for the
/// whole batch. Tickets are written first: an order that already has one (a
/// redelivery, or a cancel that came first) reserves nothing. Stock rows are
/// then read under lock, reserved in memory and written back.
pub async fn take_orders(
    app: &App,
    tx: &mut Tx,
    orders: &[(&Envelope, &OrderPlaced)],
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    let tickets: Vec<Ticket> = orders
        .iter()
        .map(|(env, o)| Ticket {
            id: new_id(),
            order_id: env.order_id.clone(),
            restaurant_id: o.restaurant_id.clone(),
            items: o.items.clone(),
            address: o.address.clone(),
            status: CookStatus::Cooking,
            reason: None,
            complete_at: app.cook_time.map(|d| now + d.as_millis() as i64),
            created_at: now,
            updated_at: now,
        })
        .collect();
    let mut claimed = store::insert_tickets(tx, &tickets).await?;
    let mut taken = Vec::with_capacity(tickets.len());
    for (t, (env, _)) in tickets.into_iter().zip(orders) {
        // An order seen before (redelivered, or cancelled before it came)
        // reserves nothing; each order id is claimed by its first ticket.
        if claimed.remove(&t.order_id) {
            taken.push((t, env));
        } else {
            store::fill_placeholder(tx, &t).await?;
        }
    }
    if taken.is_empty() {
        return Ok(());
    }
    let restaurants: BTreeSet<&str> = taken
        .iter()
        .map(|(t, _)| t.restaurant_id.as_str())
        .collect();
    let mut stock = store::stock_for_update(&app.ctx.db, tx, &restaurants).await?;
    let before = stock.clone();
    let mut events = Vec::with_capacity(taken.len() * 2);
    let (mut accepted, mut rejected) = (0u64, 0u64);
    for (mut t, env) in taken {
        let cause = env.as_cause();
        let menu = stock.entry(t.restaurant_id.clone()).or_default();
        let mut event = |e: Event| events.push(Envelope::new(crate::NAME, &t.order_id, &e, &cause));
        match reserve_all(menu, &reservation_plan(&t.items)) {
            Ok(()) => {
                event(Event::StockChecked(StockChecked {
                    cook_id: t.id.clone(),
                    in_stock: true,
                    shortages: vec![],
                    reason: None,
                }));
                event(Event::CookStarted(CookRef {
                    cook_id: t.id.clone(),
                }));
                accepted += 1;
            }
            Err(shortages) => {
                let reason = shortage_reason(&shortages);
                event(Event::StockChecked(StockChecked {
                    cook_id: t.id.clone(),
                    in_stock: false,
                    shortages,
                    reason: Some(reason.clone()),
                }));
                t.status = CookStatus::Rejected;
                t.reason = Some(reason);
                t.complete_at = None;
                store::update_ticket(tx, &t).await?;
                rejected += 1;
            }
        }
    }
    store::save_stock(tx, &before, &stock).await?;
    outbox::append_all(tx, &events).await?;
    metrics::counter!("cook_orders_accepted_total").increment(accepted);
    metrics::counter!("cook_orders_rejected_total").increment(rejected);
    Ok(())
}

/// The result of a cancel request, for the caller to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancellation {
    pub outcome: CancelOutcome,
    pub cook_id: Option<String>,
    pub reason: String,
}

/// Cancels the order's ticket and restores its stock, or says why not.
/// Repeating it is harmless: the second call finds the ticket cancelled.
pub async fn cancel_order(
    app: &App,
    tx: &mut Tx,
    order_id: &str,
    cause: &Cause,
) -> Result<Cancellation, sqlx::Error> {
    let mut ticket =
        store::ticket_for_update(&app.ctx.db, tx, TicketKey::OrderId, order_id).await?;
    if ticket.is_none() {
        // Not seen yet: a CANCELLED ticket now, so the order finds its place
        // taken when it arrives and reserves nothing.
        let now = now_ms();
        let placeholder = Ticket {
            id: new_id(),
            order_id: order_id.to_owned(),
            restaurant_id: String::new(),
            items: vec![],
            address: String::new(),
            status: CookStatus::Cancelled,
            reason: Some("cancelled before cooking started".into()),
            complete_at: None,
            created_at: now,
            updated_at: now,
        };
        if store::insert_ticket(tx, &placeholder).await? {
            let ev = Event::CookCancelled(CookCancelled {
                cook_id: Some(placeholder.id.clone()),
                reason: CANCEL_REASON.into(),
            });
            emit(tx, order_id, ev, cause).await?;
            return Ok(Cancellation {
                outcome: CancelOutcome::Cancel,
                cook_id: Some(placeholder.id),
                reason: CANCEL_REASON.into(),
            });
        }
        // The order arrived meanwhile and took the place: cancel its ticket.
        ticket = store::ticket_for_update(&app.ctx.db, tx, TicketKey::OrderId, order_id).await?;
    }
    let Some(mut ticket) = ticket else {
        return Err(sqlx::Error::RowNotFound);
    };
    let outcome = cancel_outcome(ticket.status);
    let reason = match outcome {
        CancelOutcome::Cancel => {
            store::restore(tx, &ticket.restaurant_id, &reservation_plan(&ticket.items)).await?;
            ticket.status = CookStatus::Cancelled;
            ticket.reason = Some(CANCEL_REASON.into());
            ticket.complete_at = None;
            ticket.updated_at = now_ms();
            store::update_ticket(tx, &ticket).await?;
            let ev = Event::CookCancelled(CookCancelled {
                cook_id: Some(ticket.id.clone()),
                reason: CANCEL_REASON.into(),
            });
            emit(tx, order_id, ev, cause).await?;
            metrics::counter!("cook_orders_cancelled_total").increment(1);
            CANCEL_REASON.to_owned()
        }
        CancelOutcome::AlreadyCancelled => CANCEL_REASON.to_owned(),
        CancelOutcome::NothingReserved => ticket
            .reason
            .clone()
            .unwrap_or_else(|| "the order was rejected".into()),
        CancelOutcome::TooLate => "already cooked".to_owned(),
    };
    Ok(Cancellation {
        outcome,
        cook_id: Some(ticket.id),
        reason,
    })
}

/// Marks a ticket cooked inside `tx`. `None` if there is no such ticket.
async fn complete_in(
    app: &App,
    tx: &mut Tx,
    id: &str,
    cause: &Cause,
) -> Result<Option<(Ticket, CompleteOutcome)>, sqlx::Error> {
    let Some(mut ticket) = store::ticket_for_update(&app.ctx.db, tx, TicketKey::Id, id).await?
    else {
        return Ok(None);
    };
    let outcome = complete_outcome(ticket.status);
    if outcome == CompleteOutcome::Complete {
        ticket.status = CookStatus::Cooked;
        ticket.complete_at = None;
        ticket.updated_at = now_ms();
        store::update_ticket(tx, &ticket).await?;
        let ev = Event::CookCompleted(CookCompleted {
            cook_id: ticket.id.clone(),
            restaurant_id: ticket.restaurant_id.clone(),
            address: ticket.address.clone(),
        });
        emit(tx, &ticket.order_id, ev, cause).await?;
        metrics::counter!("cook_orders_completed_total").increment(1);
    }
    Ok(Some((ticket, outcome)))
}

/// Marks a ticket cooked. `None` if there is no such ticket.
pub async fn complete(
    app: &App,
    id: &str,
    cause: &Cause,
) -> Result<Option<(Ticket, CompleteOutcome)>, sqlx::Error> {
    let mut tx = app.ctx.db.begin().await?;
    let done = complete_in(app, &mut tx, id, cause).await?;
    tx.commit().await?;
    app.ctx.outbox.notify();
    Ok(done)
}

/// One pass of the automatic-completion timer: every due ticket (up to a
/// batch) completes with one guarded update and one outbox append — one
/// transaction and a fixed number of statements for many dishes. The guard
/// (`status = 'COOKING'`) makes a ticket cancelled or completed meanwhile
/// drop out, exactly as [`complete`] would decide one by one.
pub async fn complete_due(app: &App) -> anyhow::Result<Option<i64>> {
    const BATCH: i64 = 256;
    let due = store::due_tickets(&app.ctx.db, now_ms(), BATCH).await?;
    if !due.is_empty() {
        let mut tx = app.ctx.db.begin().await?;
        let cooked = store::mark_cooked(&mut tx, &due, now_ms()).await?;
        let cause = Cause::default();
        let events: Vec<_> = cooked
            .into_iter()
            .map(|(order_id, done)| {
                Envelope::new(crate::NAME, &order_id, &Event::CookCompleted(done), &cause)
            })
            .collect();
        outbox::append_all(&mut tx, &events).await?;
        tx.commit().await?;
        metrics::counter!("cook_orders_completed_total").increment(events.len() as u64);
        app.ctx.outbox.notify();
    }
    if due.len() as i64 == BATCH {
        return Ok(Some(now_ms()));
    }
    Ok(store::next_due(&app.ctx.db).await?)
}
