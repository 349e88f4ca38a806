//! The delivery consumer keeps no dedup records (`Handler::IDEMPOTENT_TYPES`):
//! that is sound only because a CookCompleted applied again — in the same
//! batch, in a later one, after the delivery finished — starts nothing and
//! publishes nothing.

use std::{sync::Arc, time::Duration};

use restaurant_contract::{Cause, CookCompleted, Envelope, Event};
use restaurant_delivery::{App, DeliveryEvents};
use restaurant_platform::{consumer, db::Db, outbox, service::ServiceContext};

fn cooked(order_id: &str) -> (Envelope, Event) {
    let ev = Event::CookCompleted(CookCompleted {
        cook_id: format!("cook-{order_id}"),
        restaurant_id: "r".into(),
        address: "a".into(),
    });
    (Envelope::new("cook", order_id, &ev, &Cause::default()), ev)
}

async fn count(db: &Db, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(db.reader())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_cook_completed_applied_again_starts_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ServiceContext::scratch("delivery", dir.path(), &restaurant_delivery::migrations())
        .await
        .unwrap();
    let db = ctx.db.clone();
    let handler = DeliveryEvents(App {
        ctx,
        delivery_time: Some(Duration::ZERO),
        timer_wake: Arc::default(),
    });
    let apply = async |batch| consumer::apply_batch(&db, &handler, batch).await.unwrap();
    let (a, b) = (cooked("order-a"), cooked("order-b"));
    // Twice in one batch, then again in later batches.
    apply(vec![a.clone(), b.clone(), a.clone()]).await;
    apply(vec![b.clone()]).await;
    // After the delivery is done, too.
    db.execute(sqlx::query(
        "UPDATE deliveries SET status = 'DELIVERED', complete_at = NULL",
    ))
    .await
    .unwrap();
    apply(vec![a.clone(), b.clone()]).await;
    apply(vec![a.clone()]).await;

    assert_eq!(count(&db, "SELECT COUNT(*) FROM deliveries").await, 2);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM deliveries WHERE status = 'DELIVERED'"
        )
        .await,
        2,
        "a finished delivery is not started again"
    );
    assert_eq!(
        outbox::pending(&db).await.unwrap(),
        2,
        "one DeliveryStarted each"
    );
    // Each names the delivery its order got (the first batch named order
    // a twice, so which of its two inserts went in had to be read back).
    for env in outbox::waiting(&db).await.unwrap() {
        let Ok(Some(Event::DeliveryStarted(s))) = env.event() else {
            panic!("not a DeliveryStarted: {env:?}");
        };
        let id: String = sqlx::query_scalar("SELECT id FROM deliveries WHERE order_id = $1")
            .bind(&env.order_id)
            .fetch_one(db.reader())
            .await
            .unwrap();
        assert_eq!(s.delivery_id, id);
    }
}
