//! The kitchen keeps no dedup record for `OrderPlaced`
//! (`Handler::IDEMPOTENT_TYPES`): that is sound only because an order placed
//! again — in the same batch, in a later one, after its ticket was cancelled
//! or cooked — reserves nothing and publishes nothing.

use std::sync::Arc;

use restaurant_contract::{Cause, Envelope, Event, OrderLine, OrderPlaced};
use restaurant_cook::{App, domain::MenuItem, events::KitchenEvents, kitchen, store};
use restaurant_platform::{
    consumer::{self, Handler},
    db::Db,
    outbox,
    service::ServiceContext,
};

fn placed(order_id: &str, qty: i64) -> (Envelope, Event) {
    let ev = Event::OrderPlaced(OrderPlaced {
        customer_id: "c".into(),
        restaurant_id: "r".into(),
        items: vec![OrderLine {
            menu_id: "m".into(),
            qty,
        }],
        address: "a".into(),
    });
    (Envelope::new("order", order_id, &ev, &Cause::default()), ev)
}

async fn stock(db: &Db) -> i64 {
    store::menus(db, "r").await.unwrap()[0].stock
}

#[tokio::test]
async fn an_order_placed_again_reserves_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ServiceContext::scratch("cook", dir.path(), &restaurant_cook::migrations())
        .await
        .unwrap();
    let db = ctx.db.clone();
    let item = MenuItem {
        name: "m".into(),
        price: 1,
        stock: 10,
    };
    store::put_menu(&db, "r", "m", &item).await.unwrap();
    let app = App {
        ctx,
        cook_time: None,
        timer_wake: Arc::default(),
    };
    let handler = KitchenEvents(app.clone());
    let apply = async |batch| consumer::apply_batch(&db, &handler, batch).await.unwrap();
    assert!(KitchenEvents::IDEMPOTENT_TYPES.contains(&"OrderPlaced"));
    let (a, b, c) = (
        placed("order-a", 2),
        placed("order-b", 3),
        placed("order-c", 1),
    );
    // Twice in one batch, then again in a later one.
    apply(vec![a.clone(), b.clone(), a.clone()]).await;
    assert_eq!(stock(&db).await, 5);
    apply(vec![b.clone()]).await;
    // After b's ticket is cancelled (its stock back) and a's is cooked.
    let mut tx = db.begin().await.unwrap();
    kitchen::cancel_order(&app, &mut tx, "order-b", &Cause::default())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let ticket_a = store::ticket(&db, store::TicketKey::OrderId, "order-a")
        .await
        .unwrap()
        .unwrap();
    kitchen::complete(&app, &ticket_a.id, &Cause::default())
        .await
        .unwrap();
    assert_eq!(stock(&db).await, 8);
    // A redelivered order first and a new one behind it in one batch.
    apply(vec![b.clone(), a.clone(), c.clone()]).await;
    assert_eq!(stock(&db).await, 7, "only c reserved");

    let events = outbox::waiting(&db).await.unwrap();
    let count = |t: &str, order: &str| {
        events
            .iter()
            .filter(|e| e.event_type == t && e.order_id == order)
            .count()
    };
    for order in ["order-a", "order-b", "order-c"] {
        assert_eq!(count("StockChecked", order), 1, "{order}");
        assert_eq!(count("CookStarted", order), 1, "{order}");
    }
    assert_eq!(count("CookCompleted", "order-a"), 1);
    assert_eq!(count("CookCancelled", "order-b"), 1);
    assert_eq!(events.len(), 8);
    // c's events name c's placement as their cause, not the order that
    // stood before it in the batch.
    for e in events.iter().filter(|e| e.order_id == "order-c") {
        assert_eq!(e.causation_id.as_deref(), Some(c.0.event_id.as_str()));
    }
    let tickets: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM cooks")
        .fetch_one(db.reader())
        .await
        .unwrap();
    assert_eq!(tickets, 3);
}
