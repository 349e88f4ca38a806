//! What a SQLite write transaction costs through the storage layer the
//! services use (sqlx's `Any` driver, [`Db::write_as_one`]: one text of
//! `BEGIN IMMEDIATE`, the statements and `COMMIT`, prepared afresh each
//! time), against the layer docs/benchmarks.md's Next steps 2 proposes: a
//! thread of its own per database running the whole transaction as one
//! closure with rusqlite, its statements kept prepared, the task waiting
//! on a oneshot. The transaction is the order service's placement of a
//! batch: `orders` rows and one outbox row.
//!
//!   cargo bench -p restaurant-platform --bench sqlite_storage [-- TX ORDERS]
//!
//! `sqlx-kept` is sqlx with the text kept prepared, which tells the cost of
//! preparing from the rest. Prints, for each layer, with `synchronous=FULL` (the default, an fsync
//! per commit) and NORMAL: transactions per second, and wall and CPU time
//! (the whole process: tokio's threads and SQLite's) per transaction.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use restaurant_platform::db::{Db, DbOptions, Params, Query};

const COLUMNS: &str = "id, customer_id, restaurant_id, items, address, status, reason, \
                       cook_id, delivery_id, created_at, updated_at";
const SCHEMA: &str = "CREATE TABLE orders (id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, \
     restaurant_id TEXT NOT NULL, items TEXT NOT NULL, address TEXT NOT NULL, \
     status TEXT NOT NULL, reason TEXT, cook_id TEXT, delivery_id TEXT, \
     created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL); \
     CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, events INTEGER NOT NULL, \
     payload TEXT NOT NULL, created_at BIGINT NOT NULL)";

/// One order's values, as the order service binds them.
struct Row {
    id: String,
    customer: String,
    items: String,
    at: i64,
}

fn batch(tx: usize, orders: usize) -> (Vec<Row>, String) {
    let rows: Vec<Row> = (0..orders)
        .map(|i| Row {
            id: format!("order-{tx:08}-{i:03}-0123456789abcdef"),
            customer: format!("customer-{}", tx % 997),
            items: r#"[{"menuId":"bibimbap","qty":1},{"menuId":"bulgogi","qty":1}]"#.into(),
            at: 1_765_000_000_000 + tx as i64,
        })
        .collect();
    // An outbox row carries the batch's events as JSON lines, ~600 bytes each.
    let event = format!(
        "{{\"type\":\"OrderPlaced\",\"payload\":\"{}\"}}",
        "x".repeat(560)
    );
    let payload = vec![event; orders].join("\n");
    (rows, payload)
}

/// CPU time of the whole process so far (user + system).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("linux");
    let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after_comm.split(' ').collect();
    // Fields 14 and 15 of stat(5), counted from the state (field 3).
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

struct Measured {
    wall: Duration,
    cpu: Duration,
}

/// Binds a batch as the order service does, by reference.
fn bind_batch<'q>(mut q: Query<'q>, rows: &'q [Row], payload: &'q str) -> Query<'q> {
    for r in rows {
        q = q
            .bind(&r.id)
            .bind(&r.customer)
            .bind("restaurant-1")
            .bind(&r.items)
            .bind("1 Jongno, Seoul")
            .bind("PENDING")
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(r.at)
            .bind(r.at);
    }
    q.bind(rows.len() as i32).bind(payload).bind(rows[0].at)
}

/// Through sqlx: as the order service does ([`Db::write_as_one`], the
/// text prepared each time), or (`kept`) the same text kept prepared by
/// the connection, which tells the preparing from the rest.
async fn through_sqlx(path: &str, fsync: bool, txs: usize, orders: usize, kept: bool) -> Measured {
    let db = Db::open(
        &format!("sqlite://{path}"),
        DbOptions {
            fsync,
            max_connections: 2,
        },
    )
    .await
    .unwrap();
    for ddl in SCHEMA.split("; ") {
        db.execute(sqlx::query(sqlx::AssertSqlSafe(ddl.to_owned())))
            .await
            .unwrap();
    }
    let mut params = Params::for_db(&db);
    let values = params.rows(orders, 11);
    let writes = format!(
        "INSERT INTO orders ({COLUMNS}) VALUES {values}; \
         INSERT INTO outbox (events, payload, created_at) VALUES ({}, {}, {})",
        params.one(),
        params.one(),
        params.one()
    );
    let kept_text = format!("BEGIN IMMEDIATE; {writes}; COMMIT");
    let (cpu0, wall0) = (cpu(), Instant::now());
    for t in 0..txs {
        let (rows, payload) = batch(t, orders);
        if kept {
            let mut conn = db.write_conn().await.unwrap();
            bind_batch(
                sqlx::query(sqlx::AssertSqlSafe(kept_text.clone())),
                &rows,
                &payload,
            )
            .execute(&mut *conn)
            .await
            .unwrap();
        } else {
            db.write_as_one(&writes, |q| bind_batch(q, &rows, &payload))
                .await
                .unwrap();
        }
    }
    let m = Measured {
        wall: wall0.elapsed(),
        cpu: cpu() - cpu0,
    };
    db.close().await;
    m
}

type Job = (
    Vec<Row>,
    String,
    tokio::sync::oneshot::Sender<rusqlite::Result<()>>,
);

async fn through_rusqlite(path: &str, fsync: bool, txs: usize, orders: usize) -> Measured {
    let conn = rusqlite::Connection::open(path).unwrap();
    let sync = if fsync { "FULL" } else { "NORMAL" };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; PRAGMA busy_timeout=10000; \
         PRAGMA temp_store=MEMORY; {SCHEMA};"
    ))
    .unwrap();
    // The database's thread: it owns the connection and runs each
    // transaction whole, so the task that asked waits once.
    let (jobs, mut queue) = tokio::sync::mpsc::channel::<Job>(64);
    let thread = std::thread::spawn(move || {
        let mut conn = conn;
        while let Some((rows, payload, done)) = queue.blocking_recv() {
            let outcome = (|| {
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                {
                    let mut insert = tx.prepare_cached(&format!(
                        "INSERT INTO orders ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    ))?;
                    for r in &rows {
                        insert.execute(rusqlite::params![
                            r.id,
                            r.customer,
                            "restaurant-1",
                            r.items,
                            "1 Jongno, Seoul",
                            "PENDING",
                            None::<String>,
                            None::<String>,
                            None::<String>,
                            r.at,
                            r.at
                        ])?;
                    }
                    tx.prepare_cached(
                        "INSERT INTO outbox (events, payload, created_at) VALUES (?, ?, ?)",
                    )?
                    .execute(rusqlite::params![
                        rows.len() as i32,
                        payload,
                        rows[0].at
                    ])?;
                }
                tx.commit()
            })();
            let _ = done.send(outcome);
        }
    });
    let (cpu0, wall0) = (cpu(), Instant::now());
    for t in 0..txs {
        let (rows, payload) = batch(t, orders);
        let (done, answer) = tokio::sync::oneshot::channel();
        jobs.send((rows, payload, done)).await.unwrap();
        answer.await.unwrap().unwrap();
    }
    let m = Measured {
        wall: wall0.elapsed(),
        cpu: cpu() - cpu0,
    };
    drop(jobs);
    thread.join().unwrap();
    m
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let txs = args.first().copied().unwrap_or(5_000);
    let orders = args.get(1).copied().unwrap_or(6);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("{txs} transactions of {orders} orders and one outbox row each");
    println!("layer     synchronous  tx/s     wall µs/tx  CPU µs/tx");
    for fsync in [true, false] {
        // Alternating, twice, so that a slow phase of the host shows.
        for round in 0..2 {
            for layer in ["sqlx", "sqlx-kept", "rusqlite"] {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join(format!("{layer}-{round}.db"));
                let path = path.to_str().unwrap();
                let m = rt.block_on(async {
                    match layer {
                        "sqlx" => through_sqlx(path, fsync, txs, orders, false).await,
                        "sqlx-kept" => through_sqlx(path, fsync, txs, orders, true).await,
                        _ => through_rusqlite(path, fsync, txs, orders).await,
                    }
                });
                println!(
                    "{layer:<9} {:<12} {:<8.0} {:<11.1} {:.1}",
                    if fsync { "FULL" } else { "NORMAL" },
                    txs as f64 / m.wall.as_secs_f64(),
                    m.wall.as_secs_f64() * 1e6 / txs as f64,
                    m.cpu.as_secs_f64() * 1e6 / txs as f64
                );
            }
        }
    }
}
