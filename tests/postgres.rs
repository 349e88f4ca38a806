//! The same schema and SQL serve PostgreSQL: every service's migrations run
//! on a fresh PostgreSQL database (one per service, as deployed), and the
//! portable queries — stock reservation, row locks, idempotency keys, the
//! outbox relay with SKIP LOCKED, an idempotent consumer, the upgrade of an
//! outbox that still holds rows — work there.
//! Where the two backends take different SQL for one behaviour, the case
//! runs on SQLite here too.
//!
//! Needs PostgreSQL at `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); `scripts/services.sh`
//! installs and starts it. If it is unreachable this test fails: it never
//! skips.

use std::sync::Arc;

use restaurant_contract::{Cause, Envelope, Event, OrderLine, OrderPlaced, Reason, new_id};
use restaurant_platform::{
    bus::{Bus, EventLog},
    consumer::{self, Consumer, Outcome},
    db::{Backend, Db, DbOptions, Migrations},
    outbox::{self, OutboxSignal},
    shutdown::Shutdown,
};
use sqlx::{AssertSqlSafe, Connection, Executor};

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh database per service and run, dropped at the end.
struct Databases {
    admin: String,
    names: Vec<String>,
}

impl Databases {
    async fn create(&mut self, service: &str, m: Migrations) -> Db {
        let url = self.fresh_url(service).await;
        let db = Db::connect(&url, &m, DbOptions::default()).await.unwrap();
        assert_eq!(db.backend(), Backend::Postgres);
        db
    }

    /// A new empty database, not yet migrated.
    async fn fresh_url(&mut self, service: &str) -> String {
        let name = format!("rt_{}_{service}", new_id().replace('-', ""));
        let mut admin = sqlx::AnyConnection::connect(&self.admin)
            .await
            .expect("PostgreSQL must be reachable at DATABASE_URL: run scripts/services.sh");
        admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        self.names.push(name.clone());
        let base = self.admin.rsplit_once('/').unwrap().0;
        format!("{base}/{name}")
    }

    async fn drop_all(self) {
        let mut admin = sqlx::AnyConnection::connect(&self.admin).await.unwrap();
        for n in self.names {
            let _ = admin
                .execute(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {n} WITH (FORCE)"
                )))
                .await;
        }
    }
}

/// A service's database on SQLite in `dir`, for the cases both backends run.
async fn sqlite_in(dir: &std::path::Path, service: &str, m: Migrations) -> Db {
    let db = Db::connect(
        &format!("sqlite://{}", dir.join(format!("{service}.db")).display()),
        &m,
        DbOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(db.backend(), Backend::Sqlite);
    db
}

fn placed(customer: &str) -> Envelope {
    let ev = Event::OrderPlaced(OrderPlaced {
        customer_id: customer.into(),
        restaurant_id: "r".into(),
        items: vec![OrderLine {
            menu_id: "m".into(),
            qty: 2,
        }],
        address: "a".into(),
    });
    Envelope::new("order", &new_id(), &ev, &Cause::default())
}

/// The payloads in the log, in its order.
async fn logged(log: &EventLog) -> Vec<String> {
    log.read_from(0, 1_000)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.payload)
        .collect()
}

/// An event that overtakes its order's placement makes a view without a
/// customer; the placement, arriving later, fills it in. The two backends
/// do this by different SQL (on PostgreSQL the upsert joins the customer,
/// on SQLite a statement of its own: see `restaurant_mypage`), so both run
/// it.
async fn a_late_placement_fills_in_the_customer(mypage: &Db) {
    let consumer = Consumer::new(
        "mypage",
        mypage.clone(),
        Arc::new(restaurant_mypage::MyPageEvents),
        OutboxSignal::default(),
    );
    let stop = Shutdown::new();
    let late = placed("late");
    let rejected = Envelope::new(
        "cook",
        &late.order_id,
        &Event::OrderRejected(Reason {
            reason: "sold out".into(),
        }),
        &Cause::default(),
    );
    let customer = || async {
        sqlx::query_scalar::<_, Option<String>>("SELECT customer_id FROM views WHERE order_id = $1")
            .bind(&late.order_id)
            .fetch_one(mypage.reader())
            .await
            .unwrap()
    };
    assert_eq!(
        consumer.offer(&rejected.to_json(), &stop).await,
        Some(Outcome::Applied)
    );
    assert_eq!(customer().await, None);
    assert_eq!(
        consumer.offer(&late.to_json(), &stop).await,
        Some(Outcome::Applied)
    );
    assert_eq!(customer().await.as_deref(), Some("late"));
}

/// MyPage's views as stored, every column but `projected_at` (when the
/// view was written), in order id order.
async fn stored_views(db: &Db) -> Vec<Vec<Option<String>>> {
    use sqlx::Row;
    sqlx::query(
        "SELECT order_id, customer_id, restaurant_id, items, CAST(facts AS TEXT), cook_id, \
         delivery_id, reject_reason, cancel_reason, refuse_reason, CAST(updated_at AS TEXT), \
         CAST(placed_at AS TEXT), CAST(delivered_at AS TEXT) FROM views ORDER BY order_id",
    )
    .fetch_all(db.reader())
    .await
    .unwrap()
    .iter()
    .map(|r| (0..13).map(|i| r.try_get(i).unwrap()).collect())
    .collect()
}

/// MyPage's batch goes to PostgreSQL as one JSON parameter and to SQLite as
/// bound values (see `restaurant_mypage`): the same events, with text that
/// JSON must escape in every column, must leave the same views on both,
/// and a batch applied again must change nothing.
async fn mypage_batches_store_the_same_on_both_backends(postgres: &Db, sqlite: &Db) {
    use restaurant_contract::{CookCancelled, CookRef, DeliveryRef, DeliveryStarted};

    let odd = "\"q\" \\ 한국어 🍜 \n\t\u{1}";
    let mut placement = placed(odd);
    let Event::OrderPlaced(mut data) = placement.event().unwrap().unwrap() else {
        unreachable!()
    };
    data.items[0].menu_id = odd.into();
    data.restaurant_id = format!("r{odd}");
    placement = Envelope::new(
        "order",
        &placement.order_id,
        &Event::OrderPlaced(data),
        &Cause::default(),
    );
    let order = placement.order_id.clone();
    let reason = |r: &str| Reason {
        reason: format!("{r} {odd}"),
    };
    let on = |id: &str, e: Event, at: i64| {
        let mut env = Envelope::new("test", id, &e, &Cause::default());
        env.occurred_at = at;
        (env, e)
    };
    let mut batch = vec![
        (placement.clone(), placement.event().unwrap().unwrap()),
        on(&order, Event::OrderRejected(reason("rejected")), 5),
        on(&order, Event::OrderCancelled(reason("cancelled")), 6),
        on(
            &order,
            Event::CookCancelRefused(CookCancelled {
                cook_id: Some(format!("k{odd}")),
                reason: format!("refused {odd}"),
            }),
            7,
        ),
        on(
            &order,
            Event::CookStarted(CookRef {
                cook_id: format!("k{odd}"),
            }),
            8,
        ),
        on(
            &order,
            Event::DeliveryStarted(DeliveryStarted {
                delivery_id: format!("d{odd}"),
                cook_id: format!("k{odd}"),
                address: odd.into(),
            }),
            9,
        ),
        // Delivered: the earlier of the two is the delivery time, in
        // whichever order they come.
        on(
            &order,
            Event::OrderDelivered(DeliveryRef {
                delivery_id: format!("d{odd}"),
            }),
            11,
        ),
        on(
            &order,
            Event::DeliveryCompleted(DeliveryRef {
                delivery_id: format!("d{odd}"),
            }),
            10,
        ),
        // An order whose placement has not arrived: no customer yet.
        on(
            "overtaken",
            Event::CookStarted(CookRef {
                cook_id: "k2".into(),
            }),
            3,
        ),
    ];
    batch.reverse();
    let mut after = Vec::new();
    let apply = async |db| {
        consumer::apply_batch(db, &restaurant_mypage::MyPageEvents, batch.clone())
            .await
            .unwrap()
    };
    for db in [postgres, sqlite] {
        apply(db).await;
        let first = stored_views(db).await;
        apply(db).await;
        assert_eq!(
            stored_views(db).await,
            first,
            "the batch again changed nothing"
        );
        after.push(first);
    }
    assert_eq!(after[0].len(), 2);
    let items = vec![OrderLine {
        menu_id: odd.into(),
        qty: 2,
    }];
    let stored = after[0]
        .iter()
        .find(|v| v[0].as_deref() == Some(order.as_str()))
        .unwrap();
    assert_eq!(
        stored[3],
        Some(serde_json::to_string(&items).unwrap()),
        "items as stored text"
    );
    assert_eq!(stored[1].as_deref(), Some(odd), "the customer");
    assert_eq!(
        stored[12].as_deref(),
        Some("10"),
        "delivered at the earlier"
    );
    assert_eq!(
        after[0], after[1],
        "PostgreSQL and SQLite store the same views"
    );
}

/// The relay hands the bus each batch in the order it was committed, and a
/// batch the bus refuses stays in the outbox for the next pass. It reads and
/// deletes in one statement whose deletion commits only after the publish;
/// both backends run that statement (PostgreSQL with SKIP LOCKED). Events
/// appended together share a row and keep their order in it; a line of a
/// damaged row that is not an envelope is parked, and the row's other
/// events go on.
async fn the_relay_keeps_commit_order_and_what_the_bus_refused(order: &Db, dir: &std::path::Path) {
    let mut emitted = Vec::new();
    for n in [3, 2] {
        let mut tx = order.begin().await.unwrap();
        for _ in 0..n {
            let env = placed("c");
            outbox::append(&mut tx, &env).await.unwrap();
            emitted.push(env.event_id);
        }
        tx.commit().await.unwrap();
    }
    let together: Vec<Envelope> = (0..3).map(|_| placed("t")).collect();
    let mut tx = order.begin().await.unwrap();
    outbox::append_all(&mut tx, &together).await.unwrap();
    tx.commit().await.unwrap();
    emitted.extend(together.iter().map(|e| e.event_id.clone()));
    let (before, after) = (placed("d"), placed("d"));
    order
        .execute(
            sqlx::query("INSERT INTO outbox (events, payload, created_at) VALUES (3, $1, 0)").bind(
                format!(
                    "{}\n{{\"eventId\": 7}}\n{}",
                    before.to_json(),
                    after.to_json()
                ),
            ),
        )
        .await
        .unwrap();
    emitted.extend([before.event_id, after.event_id]);
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
        .fetch_one(order.reader())
        .await
        .unwrap();
    assert_eq!(rows, 7, "one row per append");
    let path = dir.join(format!("relay-{}.db", new_id()));
    let closed = EventLog::open(&path, false).await.unwrap();
    closed.close().await;
    assert!(
        outbox::relay_batch(order, &Bus::Embedded(closed))
            .await
            .is_err()
    );
    assert_eq!(
        outbox::pending(order).await.unwrap(),
        11,
        "nothing was lost"
    );
    let parked = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT payload FROM dead_letters WHERE consumer = 'outbox' ORDER BY id",
        )
        .fetch_all(order.reader())
        .await
        .unwrap()
    };
    assert!(parked().await.is_empty(), "a refused batch parks nothing");

    let log = EventLog::open(&path, false).await.unwrap();
    let bus = Bus::Embedded(log.clone());
    let relayed = outbox::relay_batch(order, &bus).await.unwrap();
    assert_eq!((relayed.rows, relayed.events), (7, 10));
    assert_eq!(outbox::relay_batch(order, &bus).await.unwrap().rows, 0);
    assert_eq!(outbox::pending(order).await.unwrap(), 0);
    assert_eq!(parked().await, vec![r#"{"eventId": 7}"#.to_owned()]);
    let published: Vec<String> = logged(&log)
        .await
        .iter()
        .map(|p| Envelope::from_json(p.as_bytes()).unwrap().event_id)
        .collect();
    assert_eq!(published, emitted);

    // A pass stops at the row that brings it to 1,024 events, taking that
    // row whole: rows of 1,000, 100 and 1 events go as 1,100, then 1.
    for n in [1_000, 100, 1] {
        let envs: Vec<Envelope> = (0..n).map(|_| placed("big")).collect();
        let mut tx = order.begin().await.unwrap();
        outbox::append_all(&mut tx, &envs).await.unwrap();
        tx.commit().await.unwrap();
    }
    let first = outbox::relay_batch(order, &bus).await.unwrap();
    assert_eq!((first.rows, first.events), (2, 1_100));
    let second = outbox::relay_batch(order, &bus).await.unwrap();
    assert_eq!((second.rows, second.events), (1, 1));
    log.close().await;
}

/// A database the release before batched outbox rows made, with an event
/// still in its outbox (one row per event then): after the upgrade's
/// migrations the relay publishes it as it was written.
async fn an_outbox_row_from_before_the_upgrade_is_relayed(
    url: &str,
    backend: Backend,
    dir: &std::path::Path,
) {
    let folder = match backend {
        Backend::Postgres => "postgres",
        Backend::Sqlite => "sqlite",
    };
    let all = sqlx::migrate::Migrator::new(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("crates/platform/migrations")
            .join(folder),
    )
    .await
    .unwrap();
    let upgrade = all
        .migrations
        .iter()
        .find(|m| m.description == "outbox batches")
        .expect("the migration that batches outbox rows")
        .version;
    let before = sqlx::migrate::Migrator::with_migrations(
        all.migrations
            .iter()
            .filter(|m| m.version < upgrade)
            .cloned()
            .collect(),
    );
    let old = sqlx::AnyPool::connect(url).await.unwrap();
    before.run(&old).await.unwrap();
    let env = placed("from before");
    sqlx::query(
        "INSERT INTO outbox (event_id, order_id, event_type, payload, created_at) \
         VALUES ($1, $2, $3, $4, 0)",
    )
    .bind(&env.event_id)
    .bind(&env.order_id)
    .bind(&env.event_type)
    .bind(env.to_json())
    .execute(&old)
    .await
    .unwrap();
    old.close().await;

    let db = Db::connect(url, &restaurant_order::migrations(), DbOptions::default())
        .await
        .unwrap();
    assert_eq!(outbox::pending(&db).await.unwrap(), 1);
    let log = EventLog::open(&dir.join(format!("upgrade-{}.db", new_id())), false)
        .await
        .unwrap();
    let relayed = outbox::relay_batch(&db, &Bus::Embedded(log.clone()))
        .await
        .unwrap();
    assert_eq!((relayed.rows, relayed.events), (1, 1));
    assert_eq!(logged(&log).await, vec![env.to_json()]);
    log.close().await;
    db.close().await;
}

/// Ends every connection the server has to database `name`, and waits
/// until it lists none.
async fn kill_backends(admin: &str, name: &str) {
    let mut admin = sqlx::AnyConnection::connect(admin).await.unwrap();
    let killed: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()) AS k",
    )
    .bind(name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(killed >= 1, "the database's connections");
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = $1")
                .bind(name)
                .fetch_one(&mut admin)
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    admin.close().await.unwrap();
}

/// A connection whose server end went away (a restart, a dropped link) is
/// replaced. The services' connections stay out of sqlx's pool between
/// uses (`db::KeptSet`), because its way back is a ping, a round trip to
/// the server, on every transaction and read. So: one idle for over a
/// second is pinged when taken, and replaced without a failure; a
/// transaction begun on one that died more recently begins again on
/// another; a read taken on such a one fails once, as a read on a
/// connection killed while busy does, the connection is given up, and
/// the other idle ones are pinged before their next use.
async fn a_connection_that_lost_its_server_is_replaced(db: &Db, admin: &str, name: &str) {
    use std::time::Duration;
    let pid = || async {
        db.read_with(async |c| {
            sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                .fetch_one(c)
                .await
        })
        .await
    };
    let in_transaction = || async {
        let mut tx = db.begin().await?;
        let pid = sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(pid)
    };
    let before = pid().await.unwrap();
    assert_eq!(in_transaction().await.unwrap(), before, "kept, and reused");

    kill_backends(admin, name).await;
    let after = in_transaction()
        .await
        .expect("BEGIN failed on the dead connection and went to a new one");
    assert_ne!(after, before);
    assert_eq!(pid().await.unwrap(), after);

    // Two kept, idle for over a second when their server goes away.
    let (a, b) = (db.read().await.unwrap(), db.read().await.unwrap());
    drop((a, b));
    kill_backends(admin, name).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let fresh = pid().await.expect("both pinged, given up, and replaced");
    assert_ne!(fresh, after);

    // Two kept, killed just after their last use: the next read fails,
    // once; the other idle one is then pinged before it is used, and
    // replaced.
    let (a, b) = (db.read().await.unwrap(), db.read().await.unwrap());
    drop((a, b));
    kill_backends(admin, name).await;
    assert!(pid().await.is_err(), "a read on a dead connection fails");
    let last = pid()
        .await
        .expect("the dead one given up, the other pinged and replaced");
    assert_ne!(last, fresh);
    assert_eq!(pid().await.unwrap(), last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_schema_and_its_queries_run_on_postgresql() {
    sqlx::any::install_default_drivers();
    let mut dbs = Databases {
        admin: admin_url(),
        names: vec![],
    };
    let order = dbs.create("order", restaurant_order::migrations()).await;
    let cook = dbs.create("cook", restaurant_cook::migrations()).await;
    let delivery = dbs
        .create("delivery", restaurant_delivery::migrations())
        .await;
    let mypage = dbs.create("mypage", restaurant_mypage::migrations()).await;
    a_connection_that_lost_its_server_is_replaced(
        &mypage,
        &dbs.admin,
        dbs.names.last().expect("just created"),
    )
    .await;
    // The tables updated in place leave room on their pages (PostgreSQL's
    // own migrations, beside the portable ones).
    for (db, table) in [(&order, "orders"), (&mypage, "views")] {
        let options: Option<String> = sqlx::query_scalar(
            "SELECT array_to_string(reloptions, ',') FROM pg_class WHERE relname = $1",
        )
        .bind(table)
        .fetch_one(db.reader())
        .await
        .unwrap();
        assert_eq!(options.as_deref(), Some("fillfactor=70"), "{table}");
    }

    // Order: insert, lock-and-update, idempotency keys.
    use restaurant_order::{domain::NewOrder, store};
    let line = OrderLine {
        menu_id: "m".into(),
        qty: 1,
    };
    let (o, ev) = NewOrder::parse("c", "r", &[line], "a")
        .unwrap()
        .place(new_id());
    let mut tx = order.begin().await.unwrap();
    assert_eq!(
        store::claim_key(&mut tx, "k", "fp", &o.id, 1)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store::claim_key(&mut tx, "k", "fp", "other", 2)
            .await
            .unwrap(),
        Some(("fp".into(), o.id.clone()))
    );
    store::insert_all(&mut tx, &[&o]).await.unwrap();
    outbox::emit(&mut tx, "order", &o.id, &ev, &Cause::default())
        .await
        .unwrap();
    let mut locked = store::load_for_update(&mut tx, &o.id)
        .await
        .unwrap()
        .unwrap();
    // Read back packed as JSON (`db::packed`): every column, NULLs included.
    assert_eq!(locked, o);
    locked.reason = Some("checked".into());
    store::update(&mut tx, &locked).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store::get(&order, &o.id).await.unwrap().unwrap(), locked);
    assert_eq!(
        store::list_by_customer(&order, "c", 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // The relay publishes with FOR UPDATE SKIP LOCKED and empties the outbox.
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(&dir.path().join("events.db"), false)
        .await
        .unwrap();
    let bus = Bus::Embedded(log.clone());
    assert_eq!(outbox::relay_batch(&order, &bus).await.unwrap().events, 1);
    assert_eq!(outbox::pending(&order).await.unwrap(), 0);

    // Placement without keys: orders and their events in one statement,
    // which commits both or neither.
    let placing: Vec<(restaurant_order::domain::Order, Envelope)> = (0..3)
        .map(|i| {
            let id = new_id();
            // Stored as JSON text inside the statement's JSON parameter on
            // PostgreSQL: quotes, backslashes and non-ASCII come back as
            // they went in.
            let line = OrderLine {
                menu_id: if i == 1 {
                    "m \"ü\" \\ 1".into()
                } else {
                    "m".into()
                },
                qty: 1,
            };
            let (o, ev) = NewOrder::parse("one", "r", &[line], "a")
                .unwrap()
                .place(id.clone());
            (o, Envelope::new("order", &id, &ev, &Cause::default()))
        })
        .collect();
    let orders: Vec<_> = placing.iter().map(|(o, _)| o).collect();
    let events: Vec<Envelope> = placing.iter().map(|(_, e)| e.clone()).collect();
    let again = [orders[0], orders[1], orders[0]];
    assert!(
        store::insert_all_emitting(&order, &again, &events)
            .await
            .is_err(),
        "an order id twice fails the statement"
    );
    let customer_orders = || async {
        store::list_by_customer(&order, "one", 10)
            .await
            .unwrap()
            .len()
    };
    assert_eq!(
        customer_orders().await,
        0,
        "no order of the failed statement"
    );
    assert_eq!(outbox::pending(&order).await.unwrap(), 0, "nor its events");
    store::insert_all_emitting(&order, &orders, &events)
        .await
        .unwrap();
    assert_eq!(customer_orders().await, 3);
    let stored = store::get(&order, &orders[1].id).await.unwrap().unwrap();
    assert_eq!(&stored, orders[1]);
    assert_eq!(outbox::pending(&order).await.unwrap(), 3);
    let relayed = outbox::relay_batch(&order, &bus).await.unwrap();
    assert_eq!((relayed.rows, relayed.events), (1, 3));
    let sent: Vec<String> = events.iter().map(Envelope::to_json).collect();
    assert_eq!(logged(&log).await[1..], sent);

    // Cook and delivery insert a batch's new rows with `ON CONFLICT DO
    // NOTHING` and read back which went in (`db::inserted`): an order
    // named twice in a batch, or again later, gets one ticket and one
    // delivery, and publishes once.
    let ticket = |id: &str, order: &str| restaurant_cook::domain::Ticket {
        id: id.into(),
        order_id: order.into(),
        restaurant_id: "r".into(),
        items: vec![OrderLine {
            menu_id: "m \"ü\"".into(),
            qty: 2,
        }],
        address: "a".into(),
        status: restaurant_cook::domain::CookStatus::Cooking,
        reason: None,
        complete_at: Some(7),
        created_at: 1,
        updated_at: 1,
    };
    let mut tx = cook.begin().await.unwrap();
    let claimed = restaurant_cook::store::insert_tickets(
        &mut tx,
        &[ticket("t1", "oa"), ticket("t2", "oa"), ticket("t3", "ob")],
    )
    .await
    .unwrap();
    assert_eq!(claimed, ["oa".to_owned(), "ob".to_owned()].into());
    let again = restaurant_cook::store::insert_tickets(&mut tx, &[ticket("t4", "ob")])
        .await
        .unwrap();
    assert!(again.is_empty(), "ob has its ticket");
    tx.commit().await.unwrap();
    let stored = restaurant_cook::store::ticket(&cook, restaurant_cook::store::TicketKey::Id, "t3")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored, ticket("t3", "ob"));

    let delivery_ctx = restaurant_platform::service::ServiceContext::new(
        "delivery",
        delivery.clone(),
        Bus::Embedded(log.clone()),
        Shutdown::new(),
    );
    let couriers = restaurant_delivery::DeliveryEvents(restaurant_delivery::App {
        ctx: delivery_ctx,
        delivery_time: None,
        timer_wake: Arc::default(),
    });
    let cooked = |order: &str| {
        let ev = Event::CookCompleted(restaurant_contract::CookCompleted {
            cook_id: format!("cook-{order}"),
            restaurant_id: "r".into(),
            address: "a".into(),
        });
        (Envelope::new("cook", order, &ev, &Cause::default()), ev)
    };
    consumer::apply_batch(
        &delivery,
        &couriers,
        vec![cooked("oa"), cooked("oa"), cooked("ob")],
    )
    .await
    .unwrap();
    consumer::apply_batch(&delivery, &couriers, vec![cooked("ob")])
        .await
        .unwrap();
    let deliveries: Vec<(String, String, Option<i64>)> =
        sqlx::query_as("SELECT order_id, status, complete_at FROM deliveries ORDER BY order_id")
            .fetch_all(delivery.reader())
            .await
            .unwrap();
    assert_eq!(
        deliveries,
        [
            ("oa".to_owned(), "DELIVERING".to_owned(), None),
            ("ob".to_owned(), "DELIVERING".to_owned(), None)
        ]
    );
    assert_eq!(
        outbox::pending(&delivery).await.unwrap(),
        2,
        "one start each"
    );

    // Cook: stock read under lock, reserved all or nothing, written back.
    use restaurant_cook::{
        domain::{MenuItem, reserve_all},
        store as kitchen,
    };
    let item = MenuItem::parse("M", 100, 3).unwrap();
    assert!(kitchen::put_menu(&cook, "r", "m", &item).await.unwrap());
    assert!(kitchen::put_menu(&cook, "r", "n", &item).await.unwrap());
    let mut tx = cook.begin().await.unwrap();
    let restaurants = ["r"].into_iter().collect();
    let mut stock = kitchen::stock_for_update(&cook, &mut tx, &restaurants)
        .await
        .unwrap();
    let before = stock.clone();
    let menu = stock.get_mut("r").unwrap();
    assert_eq!(
        reserve_all(menu, &[("m".into(), 2), ("n".into(), 3)]),
        Ok(())
    );
    let short = reserve_all(menu, &[("m".into(), 1), ("n".into(), 1)]);
    assert_eq!(short.unwrap_err()[0].menu_id, "n");
    kitchen::save_stock(&mut tx, &before, &stock).await.unwrap();
    tx.commit().await.unwrap();
    let stock: Vec<i64> = kitchen::menus(&cook, "r")
        .await
        .unwrap()
        .iter()
        .map(|m| m.stock)
        .collect();
    assert_eq!(stock, vec![1, 0], "the short order took nothing");

    // MyPage on PostgreSQL: a consumer without dedup records (its view is a
    // join of facts), so a second delivery is applied and changes nothing.
    let consumer = Consumer::new(
        "mypage",
        mypage.clone(),
        Arc::new(restaurant_mypage::MyPageEvents),
        OutboxSignal::default(),
    );
    let env = placed("c").to_json();
    let stop = Shutdown::new();
    let view = || async {
        sqlx::query_as::<_, (i64, i64)>("SELECT facts, projected_at FROM views")
            .fetch_all(mypage.reader())
            .await
            .unwrap()
    };
    assert_eq!(consumer.offer(&env, &stop).await, Some(Outcome::Applied));
    let first = view().await;
    assert_eq!(first.len(), 1);
    assert_eq!(consumer.offer(&env, &stop).await, Some(Outcome::Applied));
    assert_eq!(view().await, first, "the second delivery changed nothing");
    let records: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM processed_events")
        .fetch_one(mypage.reader())
        .await
        .unwrap();
    assert_eq!(records, 0);

    a_late_placement_fills_in_the_customer(&mypage).await;
    // The same on SQLite, where a statement of its own joins the customer.
    let sqlite = sqlite_in(dir.path(), "mypage", restaurant_mypage::migrations()).await;
    a_late_placement_fills_in_the_customer(&sqlite).await;
    sqlite.close().await;
    let pg = dbs
        .create("mypage_rows", restaurant_mypage::migrations())
        .await;
    let lite = sqlite_in(dir.path(), "mypage_rows", restaurant_mypage::migrations()).await;
    mypage_batches_store_the_same_on_both_backends(&pg, &lite).await;
    lite.close().await;

    the_relay_keeps_commit_order_and_what_the_bus_refused(&order, dir.path()).await;
    let sqlite = sqlite_in(dir.path(), "order", restaurant_order::migrations()).await;
    the_relay_keeps_commit_order_and_what_the_bus_refused(&sqlite, dir.path()).await;
    sqlite.close().await;

    let url = dbs.fresh_url("upgrade").await;
    an_outbox_row_from_before_the_upgrade_is_relayed(&url, Backend::Postgres, dir.path()).await;
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("upgrade.db").display()
    );
    an_outbox_row_from_before_the_upgrade_is_relayed(&url, Backend::Sqlite, dir.path()).await;

    for db in [&order, &cook, &mypage] {
        db.close().await;
    }
    log.close().await;
    dbs.drop_all().await;
}
