//! Storage: one database per service, SQLite by default, PostgreSQL for
//! scale-out, both through sqlx's `Any` driver so that every query is written
//! once. The portable subset we keep to: `$n` placeholders, `BIGINT` for
//! integers and epoch-millisecond times, `TEXT` for ids and JSON,
//! `ON CONFLICT … DO NOTHING/UPDATE`, `RETURNING`. Where the dialects differ
//! (auto-increment keys, row locks) the migrations come in two folders and
//! [`Db::lock_suffix`] adds `FOR UPDATE` on PostgreSQL.

use std::{
    ops::{Deref, DerefMut},
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::{
    Any, AnyConnection, AnyPool, AssertSqlSafe, Executor,
    any::{AnyConnectOptions, AnyPoolOptions, AnyQueryResult},
    migrate::{Migration, Migrator},
    pool::PoolConnection,
};

pub type Tx = Transaction;
/// A statement being bound, on either backend.
pub type Query<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// See [`Db::lock_suffix`].
    fn lock_suffix(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }
}

/// A service's migrations in both dialects (same schema, same versions).
pub struct Migrations {
    pub sqlite: Migrator,
    pub postgres: Migrator,
}

impl Migrations {
    /// Migrations written in the portable subset, valid for both backends.
    pub fn portable(m: Migrator) -> Self {
        Migrations {
            sqlite: Migrator::with_migrations(m.migrations.to_vec()),
            postgres: m,
        }
    }

    /// Portable migrations plus some for PostgreSQL alone (storage settings
    /// SQLite has no words for); their versions must be unused by `m`.
    pub fn portable_and_postgres(m: Migrator, postgres_only: Migrator) -> Self {
        Migrations {
            sqlite: Migrator::with_migrations(m.migrations.to_vec()),
            postgres: Migrator::with_migrations(merged(&m.migrations, &postgres_only.migrations)),
        }
    }
}

/// Two sets of migrations as one, in version order. A version in both is a
/// programming error, found at the first start of any test.
fn merged(a: &[Migration], b: &[Migration]) -> Vec<Migration> {
    let mut all: Vec<Migration> = a.iter().chain(b).cloned().collect();
    all.sort_by_key(|m| m.version);
    if let Some(w) = all.windows(2).find(|w| w[0].version == w[1].version) {
        panic!("migration version {} is used twice", w[0].version);
    }
    all
}

/// Platform tables (outbox, processed events, dead letters) take versions
/// below 100; a service's own migrations start at 100.
fn platform_migrations() -> Migrations {
    Migrations {
        sqlite: sqlx::migrate!("migrations/sqlite"),
        postgres: sqlx::migrate!("migrations/postgres"),
    }
}

#[derive(Clone, Debug)]
pub struct Db {
    backend: Backend,
    /// Every transaction that writes. On SQLite this pool has exactly one
    /// connection: SQLite has one writer anyway, and queueing writers here
    /// instead of in SQLite's lock means no `SQLITE_BUSY` and no lock
    /// upgrade deadlocks between a reader that turns writer and another.
    write: AnyPool,
    /// SQLite's writer, out of [`write`](Self::write) once first used (see
    /// [`Kept`]); `None` on PostgreSQL.
    kept: Option<Kept>,
    /// Plain reads. With WAL, SQLite readers never wait for the writer.
    read: AnyPool,
    /// Connections kept out of [`read`](Self::read) between uses (see
    /// [`KeptSet`]): on SQLite its readers, on PostgreSQL every reader and
    /// writer.
    lent: Arc<KeptSet>,
}

/// Connections kept out of their pool between uses, for the reason
/// SQLite's writer is ([`Kept`]): sqlx pings a connection on its way back
/// to the pool, on SQLite a round trip to the connection's thread and on
/// PostgreSQL one to the server (a `Sync` and its `ReadyForQuery`), so
/// every read and every transaction through the pool paid one more wait.
/// Here a use takes an idle connection and puts it back; as many are out
/// at once as the pool may hold but one, which reads through the pool
/// itself (`Db::reader`, for tools and tests, and `Db::ping`) keep.
#[derive(Debug)]
struct KeptSet {
    /// Idle connections, newest last.
    idle: Idle,
    permits: Arc<tokio::sync::Semaphore>,
    pool: AnyPool,
    /// A connection idle this long is pinged before it is used again, as
    /// the pool would: a server restarted meanwhile shows there, not as a
    /// failed statement. `None` for a file (SQLite).
    ping_after: Option<Duration>,
}

/// Idle connections, each with when it was put back; `None` for one to
/// ping before its next use whatever its idle time (see
/// [`SetConn::give_up`]).
type Idle = Arc<std::sync::Mutex<Vec<(KeptConn, Option<Instant>)>>>;

/// How long a PostgreSQL connection may stay idle and be used without a
/// ping. Under load a connection is back in use within milliseconds.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

impl KeptSet {
    fn new(pool: AnyPool, max: u32, ping_after: Option<Duration>) -> KeptSet {
        KeptSet {
            idle: Arc::default(),
            permits: Arc::new(tokio::sync::Semaphore::new(max.max(1) as usize)),
            pool,
            ping_after,
        }
    }

    async fn take(&self) -> Result<SetConn, sqlx::Error> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        loop {
            let idle = self.idle.lock().expect("not poisoned").pop();
            let Some((mut conn, since)) = idle else {
                // At most as many out as the pool holds but one: this
                // waits for nothing but opening a connection (the pool
                // pings one it had idle).
                return Ok(SetConn {
                    conn: KeptConn(Some(self.pool.acquire().await?)),
                    home: Some((self.idle.clone(), permit)),
                });
            };
            let stale = self
                .ping_after
                .is_some_and(|after| since.is_none_or(|t| t.elapsed() >= after));
            let live = conn.0.as_mut().expect("idle ones are held");
            if stale && let Err(e) = sqlx::Connection::ping(&mut **live).await {
                tracing::warn!(error = %e, "an idle connection failed its ping; taking another");
                live.close_on_drop();
                continue;
            }
            return Ok(SetConn {
                conn,
                home: Some((self.idle.clone(), permit)),
            });
        }
    }

    /// Lets every idle connection go back to the pool, and every one out
    /// go back there when done, so that closing the pool does not wait for
    /// them.
    fn close(&self) {
        let mut idle = self.idle.lock().expect("not poisoned");
        self.permits.close();
        let idle = std::mem::take(&mut *idle);
        drop(idle);
    }
}

/// A connection of a [`KeptSet`] ([`Db::read`]); use `&mut *conn` as the
/// executor and pass the outcome through [`SetConn::check`], which gives
/// up a connection that failed.
pub struct SetConn {
    conn: KeptConn,
    /// Where it goes back to, and its place among those out; `None` once
    /// given up (it goes back to the pool, pinged there, closed if dead).
    home: Option<(Idle, tokio::sync::OwnedSemaphorePermit)>,
}

impl SetConn {
    /// `outcome`, after giving up this connection if it says the
    /// connection itself failed: it goes back to the pool, which pings it
    /// and closes it if dead, and the next use takes another.
    pub fn check<T>(&mut self, outcome: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if let Err(e) = &outcome
            && broken(e)
        {
            tracing::warn!(error = %e, "a connection failed; taking a new one");
            self.give_up();
        }
        outcome
    }

    /// Never hands this connection out again: it goes back to the pool,
    /// which closes it. The idle ones are pinged before their next use
    /// (PostgreSQL): what ended this one, a server restarted, likely ended
    /// them too, and each would otherwise fail a statement first.
    fn give_up(&mut self) {
        if let Some((idle, _)) = self.home.take() {
            for (_, since) in idle.lock().expect("not poisoned").iter_mut() {
                *since = None;
            }
        }
        if let Some(conn) = &mut self.conn.0 {
            conn.close_on_drop();
        }
    }
}

impl Drop for SetConn {
    fn drop(&mut self) {
        let Some((idle, permit)) = self.home.take() else {
            return;
        };
        let mut idle = idle.lock().expect("not poisoned");
        // Once the database is closing (checked under the lock that
        // closing takes), back to the pool, whose closing waits for it.
        if !permit.semaphore().is_closed()
            && let Some(conn) = self.conn.0.take()
        {
            idle.push((KeptConn(Some(conn)), Some(Instant::now())));
        }
    }
}

impl Deref for SetConn {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        self.conn.0.as_ref().expect("held until dropped")
    }
}

impl DerefMut for SetConn {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        self.conn.0.as_mut().expect("held until dropped")
    }
}

/// SQLite's one writer connection, taken from its pool once and kept.
/// sqlx pings a connection on its way back to the pool, and on SQLite a
/// ping is a round trip to the connection's thread: with the writer in the
/// pool, every write transaction was followed by one more wait for a core
/// before the next writer could begin, on the path every placement takes.
/// Kept here, it passes from one writer to the next with no round trip.
/// What the ping was for, finding a connection that no longer works, is
/// done where a failure shows: a write that fails for the connection
/// itself ([`broken`]) gives it back to the pool (which pings it and closes
/// it if it is dead), and the next writer takes a connection afresh.
#[derive(Clone, Debug)]
struct Kept {
    slot: Arc<tokio::sync::Mutex<KeptConn>>,
    pool: AnyPool,
    /// The database's file name without `.db`, the label of its metrics.
    name: Arc<str>,
}

impl Kept {
    async fn take(&self) -> Result<WriteConn, sqlx::Error> {
        // A placement on SQLite is mostly this wait and the holds of the
        // writers before it (docs/benchmarks.md): both are exported, as
        // `sqlite_writer_wait_seconds` and `sqlite_writer_held_seconds`.
        let asked = Instant::now();
        let mut slot = self.slot.clone().lock_owned().await;
        let taken = Instant::now();
        metrics::histogram!("sqlite_writer_wait_seconds", "db" => self.name.clone())
            .record(taken - asked);
        if slot.0.is_none() {
            let mut conn = self.pool.acquire().await?;
            // One given back after a failure may be inside its transaction.
            if let Err(e) = conn.execute("ROLLBACK").await
                && !no_transaction(&e)
            {
                return Err(e);
            }
            slot.0 = Some(conn);
        }
        let mut conn = WriteConn::new(Held::Kept(slot));
        conn.timed = Some((taken, self.name.clone()));
        Ok(conn)
    }
}

/// The kept writer, if taken. It lives as long as its [`Db`], which may be
/// dropped where there is no runtime (a test's end, a process's): sqlx
/// returns a connection to its pool on a task of its own and panics where
/// it has none to spawn it on, so there it is closed on a runtime made for
/// the purpose.
#[derive(Debug, Default)]
struct KeptConn(Option<PoolConnection<Any>>);

impl KeptConn {
    fn let_go(&mut self) {
        if let Some(conn) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                drop(conn);
            } else if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                // sqlx spawns even for a connection closed or detached
                // (to keep its pool's minimum): a runtime of the moment
                // for that.
                rt.block_on(async move {
                    let _ = conn.close().await;
                });
            }
        }
    }
}

impl Drop for KeptConn {
    fn drop(&mut self) {
        self.let_go();
    }
}

/// Whether `e` is SQLite's answer to a `ROLLBACK` outside a transaction
/// (PostgreSQL only warns).
fn no_transaction(e: &sqlx::Error) -> bool {
    e.to_string().contains("no transaction is active")
}

/// Whether `e` says the connection itself failed, not the statement: on
/// PostgreSQL also a server that ended it (SQLSTATE class 08, connection
/// exceptions, and 57P01-57P03, the server shutting down, crashed or
/// starting), which it says once, before the socket closes.
fn broken(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::WorkerCrashed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
        _ => false,
    }
}

/// A connection to write with, held until dropped: SQLite's kept writer
/// (no other writer runs meanwhile), or one from PostgreSQL's pool.
pub struct WriteConn {
    held: Held,
    /// Given up ([`WriteConn::discard`]): nothing more is sent on it.
    discarded: bool,
    /// A kept writer: when it was taken, and its database's name.
    timed: Option<(Instant, Arc<str>)>,
}

impl Drop for WriteConn {
    fn drop(&mut self) {
        if let Some((taken, db)) = self.timed.take() {
            metrics::histogram!("sqlite_writer_held_seconds", "db" => db).record(taken.elapsed());
        }
    }
}

enum Held {
    Kept(tokio::sync::OwnedMutexGuard<KeptConn>),
    Set(SetConn),
}

impl WriteConn {
    fn new(held: Held) -> WriteConn {
        WriteConn {
            held,
            discarded: false,
            timed: None,
        }
    }

    /// Never hands this connection out again: a kept writer goes back to
    /// its pool (pinged there, closed if dead) and the next writer takes a
    /// connection afresh; a pooled one is closed.
    fn discard(&mut self) {
        self.discarded = true;
        match &mut self.held {
            Held::Kept(slot) => slot.let_go(),
            Held::Set(conn) => conn.give_up(),
        }
    }

    /// `outcome`, after discarding the connection if it says the
    /// connection failed.
    fn check<T>(&mut self, outcome: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if let Err(e) = &outcome
            && broken(e)
        {
            tracing::warn!(error = %e, "the writer's connection failed; taking a new one");
            self.discard();
        }
        outcome
    }
}

impl Deref for WriteConn {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        match &self.held {
            Held::Kept(slot) => slot
                .0
                .as_ref()
                .expect("a kept writer is held until discarded"),
            Held::Set(conn) => conn,
        }
    }
}

impl DerefMut for WriteConn {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match &mut self.held {
            Held::Kept(slot) => slot
                .0
                .as_mut()
                .expect("a kept writer is held until discarded"),
            Held::Set(conn) => conn,
        }
    }
}

/// A write transaction ([`Db::begin`]); use `&mut **tx` (or `&mut *tx`)
/// as the executor of its statements. Dropped before
/// [`commit`](Self::commit) succeeds, it rolls back before its connection
/// writes anything else.
pub struct Transaction {
    conn: RollbackUnlessDone,
}

impl Transaction {
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        let conn = self.conn.0.as_mut().expect("open until committed");
        let outcome = conn.execute("COMMIT").await;
        conn.check(outcome)?;
        // Committed: nothing to roll back when dropped.
        self.conn.0 = None;
        Ok(())
    }

    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        roll_back(self.conn.0.take().expect("open until committed")).await;
        Ok(())
    }
}

impl Deref for Transaction {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        self.conn.0.as_ref().expect("open until committed")
    }
}

impl DerefMut for Transaction {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        self.conn.0.as_mut().expect("open until committed")
    }
}

#[derive(Clone, Copy, Debug)]
pub struct DbOptions {
    /// SQLite `synchronous=FULL` (fsync on every commit) instead of NORMAL.
    /// NORMAL in WAL mode survives a process crash (kill -9) but may lose
    /// the last commits on power loss; FULL survives both.
    pub fsync: bool,
    pub max_connections: u32,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            fsync: true,
            max_connections: 8,
        }
    }
}

impl Db {
    /// Opens (creating if needed) the database at `url` and migrates it.
    /// `url` is `sqlite://path/to/file.db` or `postgres://…`.
    pub async fn connect(
        url: &str,
        migrations: &Migrations,
        opts: DbOptions,
    ) -> Result<Db, sqlx::Error> {
        let db = Self::open(url, opts).await?;
        db.migrate(migrations).await?;
        Ok(db)
    }

    /// Opens a service's database. On PostgreSQL every service gets its own
    /// schema (`<service>_svc`) in the one database `url` names — separate
    /// tables, one server to run — created if missing; on SQLite `url` is
    /// already the service's own file.
    pub async fn connect_service(
        url: &str,
        service: &str,
        migrations: &Migrations,
        opts: DbOptions,
    ) -> Result<Db, sqlx::Error> {
        if !(url.starts_with("postgres:") || url.starts_with("postgresql:")) {
            return Self::connect(url, migrations, opts).await;
        }
        sqlx::any::install_default_drivers();
        let schema = format!("{service}_svc");
        if !schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(sqlx::Error::Configuration(
                format!("bad service name {service:?}").into(),
            ));
        }
        {
            use sqlx::Connection;
            let mut admin = sqlx::AnyConnection::connect(url).await?;
            // Replicas starting together may race to create it; losing
            // the race is fine as long as it exists afterwards.
            let created = admin
                .execute(AssertSqlSafe(format!(
                    "CREATE SCHEMA IF NOT EXISTS {schema}"
                )))
                .await;
            if let Err(e) = created {
                let exists: Option<i64> = sqlx::query_scalar(
                    "SELECT 1::BIGINT FROM information_schema.schemata WHERE schema_name = $1",
                )
                .bind(&schema)
                .fetch_optional(&mut admin)
                .await?;
                if exists.is_none() {
                    return Err(e);
                }
            }
            admin.close().await?;
        }
        let sep = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{sep}options[search_path]={schema}");
        Self::connect(&url, migrations, opts).await
    }

    /// Opens the database without migrating it.
    pub async fn open(url: &str, opts: DbOptions) -> Result<Db, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(sqlx::Error::Configuration(
                format!("unsupported database url {url:?}: use sqlite:// or postgres://").into(),
            ));
        };
        let db = match backend {
            Backend::Sqlite => {
                let url = if url.contains('?') {
                    url.to_owned()
                } else {
                    format!("{url}?mode=rwc")
                };
                let options = AnyConnectOptions::from_str(&url)?;
                let sync = if opts.fsync { "FULL" } else { "NORMAL" };
                let pool = |n: u32| {
                    AnyPoolOptions::new()
                        .max_connections(n)
                        // sqlx pings every connection it takes from the
                        // pool, and on SQLite a ping is a round trip to the
                        // connection's thread: one more thread hop per
                        // transaction and per read. A file has no far end
                        // to lose (PostgreSQL's pool keeps its pings).
                        // Alternating 15 s runs, embedded: 2,443 / 2,366 /
                        // 2,711 -> 2,846 / 2,720 / 2,804 completed/s; the
                        // SQLite threads' context switches at 2,500/s -9
                        // to -14%.
                        .test_before_acquire(false)
                        .min_connections(1)
                        .idle_timeout(None)
                        .max_lifetime(None)
                        .acquire_timeout(Duration::from_secs(30))
                        // Temp files in memory: a statement journal over
                        // 64 KiB (a multi-row upsert's) was spilled to a
                        // file created and unlinked each time — 206 of each
                        // in 5 s at 800 orders/s embedded, none with it,
                        // and 9% fewer `pwrite`s.
                        .after_connect(move |conn, _| {
                            Box::pin(async move {
                                conn.execute(AssertSqlSafe(format!(
                                    "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; \
                                     PRAGMA busy_timeout=10000; PRAGMA foreign_keys=ON; \
                                     PRAGMA temp_store=MEMORY;"
                                )))
                                .await?;
                                Ok(())
                            })
                        })
                };
                let write = pool(1).connect_with(options.clone()).await?;
                // One connection more than the kept readers may hold (see
                // `KeptSet`).
                let readers = opts.max_connections.max(1);
                let read = pool(readers + 1).connect_with(options).await?;
                let name = url
                    .split('?')
                    .next()
                    .and_then(|path| path.rsplit(['/', ':']).next())
                    .map(|file| file.strip_suffix(".db").unwrap_or(file))
                    .unwrap_or_default();
                Db {
                    backend,
                    kept: Some(Kept {
                        slot: Arc::default(),
                        pool: write.clone(),
                        name: name.into(),
                    }),
                    write,
                    lent: Arc::new(KeptSet::new(read.clone(), readers, None)),
                    read,
                }
            }
            Backend::Postgres => {
                // Plan every statement for its parameters and the tables as
                // they are now. A generic plan cached while a table was
                // empty (a fresh database, before autovacuum's first
                // ANALYZE a minute later) keeps its sequential scan as the
                // table grows: measured under load, the relay's ordered read
                // scanned 60,000 dead outbox rows on every poll, and MyPage's
                // locked read scanned its views. Custom planning of these
                // short statements costs less than one such scan.
                let sep = if url.contains('?') { '&' } else { '?' };
                // Multi-row statements differ in text by their row count, so
                // most are used once; sqlx's default of 100 cached per
                // connection held up to 100 of them, kilobytes each (peak
                // RSS of MyPage 33 -> 53 MiB with larger statements; 24
                // still put it at 28.8-30.2 MiB with two batches in flight).
                let url = format!(
                    "{url}{sep}options[plan_cache_mode]=force_custom_plan&statement-cache-capacity=16"
                );
                // At most four connections per process in use: the
                // services batch their work, so more connections only
                // meant more backends competing for the same cores
                // (measured, distributed shape on 2 cores: 1,056-1,119
                // completed/s with eight, 1,346-1,363 with four). The pool
                // holds one more, opened only when used (see `KeptSet`).
                let lent = opts.max_connections.clamp(2, 4);
                let pool = AnyPoolOptions::new()
                    .max_connections(lent + 1)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(&url)
                    .await?;
                Db {
                    backend,
                    write: pool.clone(),
                    kept: None,
                    lent: Arc::new(KeptSet::new(pool.clone(), lent, Some(PING_AFTER_IDLE))),
                    read: pool,
                }
            }
        };
        Ok(db)
    }

    async fn migrate(&self, service: &Migrations) -> Result<(), sqlx::Error> {
        let platform = platform_migrations();
        let (platform, service) = match self.backend {
            Backend::Sqlite => (platform.sqlite, &service.sqlite),
            Backend::Postgres => (platform.postgres, &service.postgres),
        };
        Migrator::with_migrations(merged(&platform.migrations, &service.migrations))
            .run(&self.write)
            .await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether this process is the database's only writer: a SQLite file
    /// belongs to one process, PostgreSQL tables are shared by replicas.
    /// What only this process writes, it can keep track of in memory and be
    /// woken for by its own commits instead of polling.
    pub fn single_process(&self) -> bool {
        self.backend == Backend::Sqlite
    }

    /// Begins a write transaction. On SQLite it takes the write lock up
    /// front (`BEGIN IMMEDIATE`): a transaction that reads and then writes
    /// would otherwise fail with `SQLITE_BUSY` instead of waiting when
    /// another process (a CLI, a service sharing the event log) writes.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        let begin = match self.backend {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        };
        // Rolled back if dropped from before `BEGIN` is sent: a caller that
        // stops waiting for it may leave it to run on the connection all
        // the same (a `ROLLBACK` with no transaction open is harmless).
        let mut retried = false;
        loop {
            let mut tx = Transaction {
                conn: RollbackUnlessDone(Some(self.write_conn().await?)),
            };
            let conn = tx.conn.0.as_mut().expect("just put");
            let outcome = conn.execute(begin).await;
            match conn.check(outcome) {
                Ok(_) => return Ok(tx),
                // A kept connection whose server went away while it was
                // idle (within the second before `KeptSet` pings one):
                // nothing was done on it, so once more on another (the idle
                // ones are now pinged first, see `SetConn::give_up`).
                Err(e) if broken(&e) && !retried => retried = true,
                Err(e) => return Err(e),
            }
        }
    }

    /// The connection writes go to, held until dropped; on SQLite no other
    /// writer runs meanwhile. For writes outside a transaction, each its
    /// own (see [`Db::execute`]).
    pub async fn write_conn(&self) -> Result<WriteConn, sqlx::Error> {
        match &self.kept {
            Some(kept) => kept.take().await,
            None => Ok(WriteConn::new(Held::Set(self.lent.take().await?))),
        }
    }

    /// Runs one write outside a transaction (it commits by itself).
    pub async fn execute(&self, write: Query<'_>) -> Result<AnyQueryResult, sqlx::Error> {
        let mut conn = self.write_conn().await?;
        let outcome = write.execute(&mut *conn).await;
        conn.check(outcome)
    }

    /// Runs `writes` — statements that together make one transaction and
    /// return nothing — as one text, its arguments bound by `bind` in the
    /// statements' order. On PostgreSQL `writes` must be one statement
    /// (which commits by itself; several writes go in as one with
    /// data-modifying `WITH`s). On SQLite it is wrapped in `BEGIN
    /// IMMEDIATE` … `COMMIT` and reaches the writer connection's thread at
    /// once: one round trip instead of four for a transaction of two
    /// statements, each a wait for a core on a busy machine. If any part
    /// fails, or the caller stops waiting, the transaction is rolled back
    /// before the connection goes back to the pool (and the connection is
    /// closed if even that fails), so no later user finds a transaction
    /// left open.
    pub async fn write_as_one<'q>(
        &self,
        writes: &str,
        bind: impl FnOnce(Query<'q>) -> Query<'q>,
    ) -> Result<(), sqlx::Error> {
        match self.planned() {
            // A planned transaction that reads nothing: `BEGIN IMMEDIATE`,
            // the writes and `COMMIT` in one text.
            Some(mut tx) => tx.commit(writes, bind).await,
            None => {
                self.execute(bind(
                    sqlx::query(AssertSqlSafe(writes.to_owned())).persistent(false),
                ))
                .await?;
                Ok(())
            }
        }
    }

    /// A write transaction whose statements reach SQLite's writer thread
    /// in two texts, for work that reads what it changes and then writes
    /// what it decided: `BEGIN IMMEDIATE` goes with the first read, the
    /// writes go with `COMMIT` ([`Planned`]). `None` on PostgreSQL, where a
    /// [`Tx`] does the same.
    pub fn planned(&self) -> Option<Planned> {
        Some(Planned {
            kept: self.kept.clone()?,
            writer: RollbackUnlessDone(None),
            also: Vec::new(),
            committed: false,
        })
    }

    /// The pool for reads that need no transaction. Each read through it
    /// pays a ping on the connection's way back: reads on a service's
    /// paths take a [`SetConn`] ([`Db::read`]) instead.
    pub fn reader(&self) -> &AnyPool {
        &self.read
    }

    /// Runs `read` (reads that need no transaction) on a connection from
    /// [`Db::read`], which it gives up if `read` says it failed. A kept
    /// PostgreSQL connection is pinged only after a second idle
    /// ([`KeptSet`]): one whose server went away within that second fails
    /// the read it is taken for (as one busy then does), and the next read
    /// takes another, the idle ones pinged first. (Repeating the read here
    /// would need `AsyncFn`, whose futures the compiler cannot yet prove
    /// `Send` for every borrow.)
    pub async fn read_with<T>(
        &self,
        read: impl AsyncFnOnce(&mut AnyConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let mut conn = self.read().await?;
        let outcome = read(&mut conn).await;
        conn.check(outcome)
    }

    /// A connection for reads that need no transaction, held until
    /// dropped: one of the kept connections ([`KeptSet`]).
    pub async fn read(&self) -> Result<SetConn, sqlx::Error> {
        self.lent.take().await
    }

    /// Appended to a `SELECT` that must lock the rows it reads until commit.
    /// SQLite needs none: its single writer connection serialises writers.
    pub fn lock_suffix(&self) -> &'static str {
        self.backend.lock_suffix()
    }

    /// Like [`Db::lock_suffix`], skipping rows another replica holds.
    pub fn skip_locked_suffix(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    pub async fn close(&self) {
        // The pool waits for every connection it handed out.
        if let Some(kept) = &self.kept {
            kept.slot.lock().await.let_go();
        }
        self.lent.close();
        self.write.close().await;
        self.read.close().await;
    }

    pub fn is_closed(&self) -> bool {
        self.write.is_closed()
    }
}

/// Writes a [`Planned`] transaction sends with its own, after them.
type Also = Box<dyn for<'q> FnOnce(Query<'q>) -> Query<'q> + Send>;

/// A write transaction on SQLite in two round trips to the writer's thread
/// instead of one per statement ([`Db::planned`]). A [`Tx`] sends `BEGIN
/// IMMEDIATE`, each statement and `COMMIT` one at a time, and on a busy
/// machine each waits for a core while the transaction holds the
/// database's one writer: the order consumer's batch of six took ~6 ms at
/// 3,000 orders/s, and placements waited behind it (docs/benchmarks.md,
/// eighteenth session). Here the first
/// [`read`](Self::read) begins the transaction in the same text, and
/// [`commit`](Self::commit) sends the writes, those added with
/// [`also`](Self::also), and `COMMIT` as one. Dropped or failed before its
/// commit, it rolls back, as [`Db::write_as_one`] does.
pub struct Planned {
    kept: Kept,
    /// The writer, once the transaction has begun.
    writer: RollbackUnlessDone,
    also: Vec<(String, Also)>,
    committed: bool,
}

impl Planned {
    /// Runs `sql` (placeholders `?`, bound by `bind`) inside the
    /// transaction and returns its rows; the first read begins it.
    pub async fn read<'q>(
        &mut self,
        sql: &str,
        bind: impl FnOnce(Query<'q>) -> Query<'q>,
    ) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
        assert!(!self.committed, "read after commit");
        let text = format!("{}{sql}", self.begin().await?);
        let conn = self.writer.0.as_mut().expect("begun above");
        let outcome = bind(sqlx::query(AssertSqlSafe(text)).persistent(false))
            .fetch_all(&mut **conn)
            .await;
        conn.check(outcome)
    }

    /// What the next text starts with: `BEGIN IMMEDIATE` the first time,
    /// once the writer is taken; after that nothing.
    async fn begin(&mut self) -> Result<&'static str, sqlx::Error> {
        if self.writer.0.is_some() {
            return Ok("");
        }
        self.writer.0 = Some(self.kept.take().await?);
        Ok("BEGIN IMMEDIATE; ")
    }

    /// Adds a write that [`commit`](Self::commit) sends after the caller's
    /// own: a consumer's offset, which commits with its handler's effects.
    pub fn also(&mut self, sql: String, bind: Also) {
        self.also.push((sql, bind));
    }

    /// Placeholders for this transaction's statements.
    pub fn params(&self) -> Params {
        Params::on(Backend::Sqlite)
    }

    /// Whether [`commit`](Self::commit) has succeeded.
    pub fn committed(&self) -> bool {
        self.committed
    }

    /// Sends `writes` (statements separated by `;`, or empty; placeholders
    /// `?`, bound by `bind`), then the writes added with
    /// [`also`](Self::also), then `COMMIT`, as one text. On a failure the
    /// transaction is rolled back.
    pub async fn commit<'q>(
        &mut self,
        writes: &str,
        bind: impl FnOnce(Query<'q>) -> Query<'q>,
    ) -> Result<(), sqlx::Error> {
        assert!(!self.committed, "committed twice");
        let mut text = String::with_capacity(writes.len() + 64);
        text.push_str(self.begin().await?);
        for part in std::iter::once(writes).chain(self.also.iter().map(|(sql, _)| sql.as_str())) {
            if !part.is_empty() {
                text.push_str(part);
                text.push_str("; ");
            }
        }
        text.push_str("COMMIT");
        let mut q = bind(sqlx::query(AssertSqlSafe(text)).persistent(false));
        for (_, bind_also) in self.also.drain(..) {
            q = bind_also(q);
        }
        let conn = self.writer.0.as_mut().expect("begun above");
        let outcome = q.execute(&mut **conn).await;
        let outcome = conn.check(outcome);
        let conn = self.writer.0.take().expect("begun above");
        match outcome {
            Ok(_) => {
                self.committed = true;
                Ok(())
            }
            Err(failed) => {
                roll_back(conn).await;
                Err(failed)
            }
        }
    }
}

/// The writer of a transaction: a [`Transaction`], or a [`Planned`] one
/// (and so a [`Db::write_as_one`]) on SQLite. Dropped before its `COMMIT`
/// ran (its caller stopped waiting: sqlx-sqlite then stops a text after the
/// statement running, so `BEGIN` may have run and `COMMIT` not), it rolls
/// back on a task of its own, which holds the writer until then: the
/// `ROLLBACK` queues behind that statement on the connection, and no other
/// writer finds the transaction open.
struct RollbackUnlessDone(Option<WriteConn>);

impl Drop for RollbackUnlessDone {
    fn drop(&mut self) {
        if let Some(mut conn) = self.0.take().filter(|c| !c.discarded) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn(roll_back(conn))),
                // No runtime left to roll back on: never reuse it.
                Err(_) => conn.discard(),
            }
        }
    }
}

/// Ends whatever transaction `conn` may be in. `BEGIN IMMEDIATE` itself may
/// be what failed (a lock not granted in time), or the text may have
/// committed: then there is nothing to roll back.
async fn roll_back(mut conn: WriteConn) {
    if conn.discarded {
        return;
    }
    match conn.execute("ROLLBACK").await {
        Ok(_) => {}
        Err(e) if no_transaction(&e) => {}
        Err(e) => {
            tracing::warn!(error = %e, "rollback failed; closing the connection");
            conn.discard();
        }
    }
}

/// On PostgreSQL, `columns` of the rows of `param`, one JSON parameter: an
/// array of objects keyed by `table`'s column names, each value of its
/// column's type (text columns take JSON strings, JSON text too). A
/// multi-row write from it is one text whatever its row count, prepared
/// once per connection, where a `VALUES` list's text differs with its row
/// count and is parsed afresh with every value bound apart (MyPage's
/// upsert, eleventh session: PostgreSQL's CPU per order 0.394 / 0.401 ->
/// 0.364 / 0.341 ms; placements, twenty-fourth session: 0.559 / 0.514 /
/// 0.508 -> 0.511 / 0.485 / 0.485 ms).
pub fn json_rows(table: &str, columns: &str, param: &str) -> String {
    format!("SELECT {columns} FROM json_populate_recordset(NULL::{table}, {param}::json)")
}

/// `select`, whose result columns are `columns` (plain names, comma
/// separated), rewritten to return its rows as one JSON array of arrays in
/// a single text column; decode it with [`unpack`]. On SQLite, sqlx hands
/// each row from the connection's thread to the reading task through a
/// channel the two contend for: a read of a few hundred rows costs a few
/// hundred contended hand-offs, where one row costs one (embedded shape,
/// the relays' reads: 0.49 -> 0.46 ms CPU per order). PostgreSQL gets the
/// same shape, so that callers decode one way. Row order is not kept:
/// sort what [`unpack`] returns if it matters.
pub fn packed(backend: Backend, columns: &str, select: &str) -> String {
    match backend {
        Backend::Sqlite => {
            format!("SELECT json_group_array(json_array({columns})) FROM ({select})")
        }
        Backend::Postgres => format!(
            "SELECT COALESCE(json_agg(json_build_array({columns})), '[]')::text \
             FROM ({select}) AS packed"
        ),
    }
}

/// The rows a [`packed`] statement returned, each decoded as a `T` (a
/// tuple of the columns' types, `Option` where they may be NULL).
pub fn unpack<T: serde::de::DeserializeOwned>(json: &str) -> Result<Vec<T>, sqlx::Error> {
    serde_json::from_str(json).map_err(|e| sqlx::Error::Decode(e.into()))
}

/// `columns` of the rows of `table` whose `id` is in `ids` and that meet
/// `also` (a condition, or empty), read inside `tx` to be changed: on
/// PostgreSQL locked, in id order so that replicas cannot deadlock; on
/// SQLite the transaction holds the one writer already. [`packed`] into
/// one row per statement, and decoded as `T`s (see [`unpack`]).
pub async fn select_for_update<T: serde::de::DeserializeOwned>(
    tx: &mut Tx,
    table: &str,
    columns: &str,
    also: &str,
    ids: &[&str],
) -> Result<Vec<T>, sqlx::Error> {
    let mut rows = Vec::with_capacity(ids.len());
    let also = if also.is_empty() {
        String::new()
    } else {
        format!(" AND {also}")
    };
    let backend = backend_of(tx);
    for chunk in ids.chunks(rows_per_statement(tx, 1)) {
        let sql = for_update_sql(backend, table, columns, &also, chunk.len());
        let mut q = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql)).persistent(false);
        for id in chunk {
            q = q.bind(*id);
        }
        rows.extend(unpack::<T>(&q.fetch_one(&mut **tx).await?)?);
    }
    Ok(rows)
}

/// [`select_for_update`] over a [`Planned`] transaction (SQLite): the
/// same rows, its first read beginning the transaction.
pub async fn select_planned<T: serde::de::DeserializeOwned>(
    tx: &mut Planned,
    table: &str,
    columns: &str,
    ids: &[&str],
) -> Result<Vec<T>, sqlx::Error> {
    let mut rows = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(rows_per_statement_on(Backend::Sqlite, 1)) {
        let sql = for_update_sql(Backend::Sqlite, table, columns, "", chunk.len());
        let read = tx
            .read(&sql, |mut q| {
                for id in chunk {
                    q = q.bind(*id);
                }
                q
            })
            .await?;
        for row in read {
            rows.extend(unpack::<T>(&sqlx::Row::try_get::<String, _>(&row, 0)?)?);
        }
    }
    Ok(rows)
}

/// The [`packed`] read of `n` rows by id of [`select_for_update`].
fn for_update_sql(backend: Backend, table: &str, columns: &str, also: &str, n: usize) -> String {
    let select = format!(
        "SELECT {columns} FROM {table} WHERE id IN ({}){also} ORDER BY id{}",
        Params::on(backend).list(n),
        backend.lock_suffix()
    );
    packed(backend, columns, &select)
}

/// Which rows of an `INSERT … ON CONFLICT DO NOTHING` went in.
#[derive(Debug)]
pub enum Inserted {
    All,
    Only(std::collections::HashSet<String>),
}

impl Inserted {
    pub fn contains(&self, id: &str) -> bool {
        match self {
            Inserted::All => true,
            Inserted::Only(ids) => ids.contains(id),
        }
    }
}

/// Which of the rows with `ids` that a statement tried to insert into
/// `table` went in, given the count it reported (`rows_affected`): all,
/// or, only when some did not, those found by their `id` inside `tx`.
/// Counting instead of `RETURNING` saves a row back per insert, which on
/// SQLite is a contended hand-off each (see [`packed`]).
pub async fn inserted(
    tx: &mut Tx,
    table: &str,
    ids: &[&str],
    count: u64,
) -> Result<Inserted, sqlx::Error> {
    if count == ids.len() as u64 {
        return Ok(Inserted::All);
    }
    let mut found = std::collections::HashSet::with_capacity(ids.len());
    for chunk in ids.chunks(rows_per_statement(tx, 1)) {
        let mut q = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT id FROM {table} WHERE id IN ({})",
            Params::of(tx).list(chunk.len())
        )))
        .persistent(false);
        for id in chunk {
            q = q.bind(*id);
        }
        found.extend(q.fetch_all(&mut **tx).await?);
    }
    Ok(Inserted::Only(found))
}

/// Most parameters per statement on SQLite. Each statement is two thread
/// switches through sqlx-sqlite's connection thread, so fewer, larger
/// statements are cheaper, now that binding is linear (see [`Params`]; with
/// numbered parameters 1,200 of them spent 8% of the CPU binding). Well
/// inside SQLite's limit of 32,766.
const SQLITE_PARAMS: usize = 2_000;
/// Most parameters per statement on PostgreSQL: binding is linear there, and
/// every statement is a round trip to a server that may be busy, so the
/// fewer the better, well inside its limit of 65,535.
const POSTGRES_PARAMS: usize = 1_024;

/// How many rows of `columns` values one multi-row statement in `tx` should
/// carry.
pub fn rows_per_statement(tx: &Tx, columns: usize) -> usize {
    rows_per_statement_on(backend_of(tx), columns)
}

/// The same for a statement on `backend`.
pub fn rows_per_statement_on(backend: Backend, columns: usize) -> usize {
    let params = match backend {
        Backend::Postgres => POSTGRES_PARAMS,
        Backend::Sqlite => SQLITE_PARAMS,
    };
    (params / columns).max(1)
}

/// Rows per statement of a multi-row write whose texts SQLite's writer
/// connections keep prepared ([`kept_chunks`]).
pub const KEPT_ROWS: usize = 32;

/// `rows` in statements of [`KEPT_ROWS`] rows and one of the rest, so
/// that a site's texts are at most [`KEPT_ROWS`] different ones and each
/// can be kept prepared (sqlx's statement cache, 100 texts per
/// connection): a multi-row text sized to its batch was prepared afresh
/// on every batch, and preparing was 9.1% of the embedded shape's CPU
/// (twenty-third session; MyPage's upsert of ~36 rows alone ~0.6 ms a
/// batch). On PostgreSQL, where a statement is a round trip to the server
/// and planning is per run anyway, the chunks stay as large as
/// [`rows_per_statement`] allows, and their texts must stay
/// `.persistent(false)` (a cache of 16 named statements there, see
/// [`Db::open`]): the callers so far write SQLite alone.
pub fn kept_chunks<'r, T>(tx: &Tx, rows: &'r [T], columns: usize) -> std::slice::Chunks<'r, T> {
    match backend_of(tx) {
        Backend::Sqlite => rows.chunks(KEPT_ROWS),
        Backend::Postgres => rows.chunks(rows_per_statement(tx, columns)),
    }
}

/// The backend `tx` runs on.
pub fn backend_of(tx: &Tx) -> Backend {
    if tx.backend_name() == "PostgreSQL" {
        Backend::Postgres
    } else {
        Backend::Sqlite
    }
}

/// The placeholders of one statement, written in the order their values
/// are bound: `?` on SQLite, `$1, $2, …` on PostgreSQL.
///
/// Why not `$n` everywhere: for every numbered or named parameter sqlx-sqlite
/// asks SQLite for the parameter's name, and SQLite finds it by walking the
/// statement's list of names — quadratic in the parameter count (4% of the
/// embedded shape's samples with 240-parameter statements). An anonymous `?`
/// has no name and is bound by position. Every placeholder of a statement
/// must come from one `Params` (sqlx cannot mix the two kinds).
///
/// The statements built with it differ in text by their row count, so they
/// are marked `.persistent(false)`: kept in sqlx's per-connection cache they
/// are rarely used again, and a prepared statement of a few hundred rows
/// holds hundreds of kilobytes. Except in chunks of [`kept_chunks`] on
/// SQLite, whose texts repeat.
#[derive(Debug)]
pub struct Params {
    numbered: bool,
    next: usize,
}

impl Params {
    /// For a statement on `tx`'s connection.
    pub fn of(tx: &Tx) -> Params {
        Params::on(backend_of(tx))
    }

    /// For a statement on one of `db`'s pools.
    pub fn for_db(db: &Db) -> Params {
        Params::on(db.backend())
    }

    fn on(backend: Backend) -> Params {
        Params {
            numbered: backend == Backend::Postgres,
            next: 1,
        }
    }

    /// The next placeholder.
    pub fn one(&mut self) -> String {
        let mut out = String::new();
        self.push(&mut out);
        out
    }

    fn push(&mut self, out: &mut String) {
        use std::fmt::Write;
        if self.numbered {
            let _ = write!(out, "${}", self.next);
        } else {
            out.push('?');
        }
        self.next += 1;
    }

    /// `n` placeholders separated by commas, for `IN (…)` lists.
    pub fn list(&mut self, n: usize) -> String {
        let mut out = String::with_capacity(n * 4);
        for i in 0..n {
            if i > 0 {
                out.push_str(", ");
            }
            self.push(&mut out);
        }
        out
    }

    /// The VALUES of a `rows` × `columns` multi-row insert.
    pub fn rows(&mut self, rows: usize, columns: usize) -> String {
        self.rows_of(rows, |p| format!("({})", p.list(columns)))
    }

    /// `rows` rows, each written by `row`, separated by commas.
    pub fn rows_of(&mut self, rows: usize, mut row: impl FnMut(&mut Params) -> String) -> String {
        (0..rows).map(|_| row(self)).collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::{Backend, Migrations, Params};
    use sqlx::migrate::{Migration, MigrationType, Migrator};

    fn migrator(versions: &[i64]) -> Migrator {
        Migrator::with_migrations(
            versions
                .iter()
                .map(|&v| {
                    Migration::new(
                        v,
                        format!("m{v}").into(),
                        MigrationType::Simple,
                        sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(format!("SELECT {v}"))),
                        false,
                    )
                })
                .collect(),
        )
    }

    /// Every SQLite connection, the writer and each reader, gets the
    /// settings: WAL, an fsync per commit unless told otherwise, and temp
    /// files (a statement journal over 64 KiB, a large sort) in memory.
    #[tokio::test]
    async fn sqlite_connections_get_their_settings() {
        use sqlx::Row;
        let dir = tempfile::tempdir().unwrap();
        for (fsync, synchronous) in [(true, 2), (false, 1)] {
            let url = format!(
                "sqlite://{}",
                dir.path().join(format!("{fsync}.db")).display()
            );
            let db = super::Db::open(
                &url,
                super::DbOptions {
                    fsync,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let mut writer = db.write_conn().await.unwrap();
            let mut reader = db.reader().acquire().await.unwrap();
            for conn in [&mut *writer, &mut *reader] {
                let mode: String = sqlx::query("PRAGMA journal_mode")
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(mode, "wal");
                for (pragma, want) in [
                    ("PRAGMA synchronous", synchronous),
                    ("PRAGMA temp_store", 2),
                    ("PRAGMA foreign_keys", 1),
                    ("PRAGMA busy_timeout", 10_000),
                ] {
                    let got: i64 = sqlx::query(pragma)
                        .fetch_one(&mut *conn)
                        .await
                        .unwrap()
                        .get(0);
                    assert_eq!(got, want, "{pragma}");
                }
            }
        }
    }

    /// The SQLite writer's waits and holds are measured per database,
    /// named after its file: the metrics that tell where a placement's
    /// time went.
    #[tokio::test]
    async fn the_sqlite_writer_is_timed_per_database() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("orders-x.db").display());
        let db = super::Db::open(&url, super::DbOptions::default())
            .await
            .unwrap();
        assert_eq!(db.kept.as_ref().map(|k| &*k.name), Some("orders-x"));
        let count = |metric: &str| {
            crate::telemetry::rendered(&format!("{metric}_count{{db=\"orders-x\"}}"))
                .map_or(0, |n| n as u64)
        };
        let held = count("sqlite_writer_held_seconds");
        let waited = count("sqlite_writer_wait_seconds");
        db.execute(sqlx::query("CREATE TABLE t (x INTEGER)"))
            .await
            .unwrap();
        let mut tx = db.begin().await.unwrap();
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(count("sqlite_writer_held_seconds"), held + 2);
        assert_eq!(count("sqlite_writer_wait_seconds"), waited + 2);
    }

    /// Writes sent as one text on SQLite commit together or not at all: a
    /// statement that fails after another has run takes that one back,
    /// and the writer goes back to the pool outside any transaction (the
    /// next write and an ordinary transaction both work on it).
    #[tokio::test]
    async fn writes_sent_as_one_commit_all_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("one.db").display());
        let db = super::Db::open(&url, Default::default()).await.unwrap();
        db.execute(sqlx::query(
            "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)",
        ))
        .await
        .unwrap();
        let rows = || async {
            sqlx::query_scalar::<_, Option<String>>("SELECT group_concat(v, ',') FROM t")
                .fetch_one(db.reader())
                .await
                .unwrap()
                .unwrap_or_default()
        };
        // Rows k ("v{k}") and then k + 1 (`second`).
        let write = |second: &str, k: i64| {
            let writes = format!("INSERT INTO t VALUES (?, ?); {second}");
            let db = db.clone();
            async move {
                db.write_as_one(&writes, |q| q.bind(k).bind(format!("v{k}")).bind(k + 1))
                    .await
            }
        };
        let pair = "INSERT INTO t (k, v) VALUES (?, 'next')";
        write(pair, 1).await.unwrap();
        write(pair, 3).await.unwrap();
        assert_eq!(rows().await, "v1,next,v3,next");
        // Row 0 goes in, then row 1 violates the key.
        assert!(write(pair, 0).await.is_err());
        assert_eq!(rows().await, "v1,next,v3,next", "row 0 is taken back");
        // Row 7 goes in, then a statement that cannot even be prepared.
        assert!(write("INSERT INTO missing VALUES (?)", 7).await.is_err());
        assert_eq!(rows().await, "v1,next,v3,next", "row 7 is taken back");
        let mut tx = db
            .begin()
            .await
            .expect("the writer is outside a transaction");
        sqlx::query("INSERT INTO t VALUES (9, 'v9')")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        write(pair, 10).await.unwrap();
        assert_eq!(rows().await, "v1,next,v3,next,v9,v10,next");
        // The caller stops waiting while a slow second statement runs, after
        // `BEGIN` and the first insert: that transaction is taken back too,
        // and the writer is usable again.
        let slow = "INSERT INTO t (k, v) SELECT ?, 'slow' WHERE (WITH RECURSIVE \
                    c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) \
                    SELECT count(*) FROM c) > 0";
        let started = std::time::Instant::now();
        let gave_up =
            tokio::time::timeout(std::time::Duration::from_millis(30), write(slow, 20)).await;
        assert!(gave_up.is_err(), "the slow statement outlasts the wait");
        write(pair, 30)
            .await
            .expect("the writer is outside a transaction");
        assert!(
            started.elapsed() > std::time::Duration::from_millis(30),
            "the next write waited for the abandoned one"
        );
        assert_eq!(rows().await, "v1,next,v3,next,v9,v10,next,v30,next");
    }

    /// On SQLite a multi-row write goes in chunks of `KEPT_ROWS` rows and
    /// one of the rest, texts that repeat and so are kept prepared.
    #[tokio::test]
    async fn sqlite_writes_go_in_chunks_whose_texts_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("chunks.db").display());
        let db = super::Db::open(&url, Default::default()).await.unwrap();
        let tx = db.begin().await.unwrap();
        let rows: Vec<u32> = (0..70).collect();
        let sizes: Vec<usize> = super::kept_chunks(&tx, &rows, 3)
            .map(<[u32]>::len)
            .collect();
        assert_eq!(
            sizes,
            [
                super::KEPT_ROWS,
                super::KEPT_ROWS,
                70 - 2 * super::KEPT_ROWS
            ]
        );
        let few: Vec<usize> = super::kept_chunks(&tx, &rows[..5], 3)
            .map(<[u32]>::len)
            .collect();
        assert_eq!(few, [5]);
        assert_eq!(super::kept_chunks(&tx, &rows[..0], 3).count(), 0);
        tx.rollback().await.unwrap();
    }

    /// SQLite's writer passes from one transaction to the next without going
    /// back to its pool (where sqlx would ping it first); a transaction
    /// dropped uncommitted is rolled back before the next writer begins;
    /// and a writer given up as broken is replaced from the pool.
    #[tokio::test]
    async fn the_sqlite_writer_is_kept_between_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("kept.db").display());
        let db = super::Db::open(&url, Default::default()).await.unwrap();
        db.execute(sqlx::query("CREATE TABLE t (k INTEGER PRIMARY KEY)"))
            .await
            .unwrap();
        let keys = || async {
            sqlx::query_scalar::<_, i64>("SELECT k FROM t ORDER BY k")
                .fetch_all(db.reader())
                .await
                .unwrap()
        };
        // A transaction begun, with row `k` inserted, not yet committed.
        let inserted = async |k: i64| {
            let mut tx = db
                .begin()
                .await
                .expect("the writer is outside a transaction");
            sqlx::query("INSERT INTO t VALUES ($1)")
                .bind(k)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx
        };
        inserted(1).await.commit().await.unwrap();
        assert_eq!(db.write.size(), 1, "one writer connection");
        assert_eq!(
            db.write.num_idle(),
            0,
            "kept out of the pool, not idle in it"
        );

        // Dropped with its insert made and no commit.
        drop(inserted(2).await);
        // `BEGIN IMMEDIATE` would fail inside a transaction left open.
        db.write_as_one("INSERT INTO t VALUES (3)", |q| q)
            .await
            .expect("the writer is outside a transaction");
        assert_eq!(keys().await, [1, 3], "the dropped insert is taken back");

        let mut conn = db.write_conn().await.unwrap();
        conn.discard();
        drop(conn);
        // A writer taken afresh.
        inserted(4).await.commit().await.unwrap();
        assert_eq!(keys().await, [1, 3, 4]);
        assert_eq!(db.write.size(), 1, "the given-up connection went back");

        // A transaction whose connection failed for itself (made up here:
        // a real one would be dead) is given up without a rollback sent on
        // it; the next writer takes the connection afresh, out of whatever
        // it was left in.
        let mut tx = inserted(5).await;
        let conn = tx.conn.0.as_mut().unwrap();
        assert!(conn.check::<()>(Err(sqlx::Error::WorkerCrashed)).is_err());
        drop(tx);
        inserted(6).await.commit().await.unwrap();
        assert_eq!(keys().await, [1, 3, 4, 6]);
        db.close().await;
        assert!(db.is_closed(), "close does not wait for the kept writer");
    }

    /// SQLite's readers stay out of their pool between reads (its way
    /// back is a ping, a round trip to the connection's thread); no more
    /// are out at once than the pool holds; one that failed is given up;
    /// closing waits for none of them.
    #[tokio::test]
    async fn sqlite_readers_are_kept_between_reads() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("readers.db").display());
        let opts = super::DbOptions {
            max_connections: 2,
            ..Default::default()
        };
        let db = super::Db::open(&url, opts).await.unwrap();
        db.execute(sqlx::query("CREATE TABLE t (k INTEGER)"))
            .await
            .unwrap();
        db.execute(sqlx::query("INSERT INTO t VALUES (7)"))
            .await
            .unwrap();
        let read = async || {
            db.read_with(async |c| {
                sqlx::query_scalar::<_, i64>("SELECT k FROM t")
                    .fetch_one(c)
                    .await
            })
            .await
            .unwrap()
        };
        for _ in 0..50 {
            assert_eq!(read().await, 7);
        }
        let idle = || db.lent.idle.lock().unwrap().len();
        assert_eq!(idle(), 1, "one reader did every read in turn");
        assert_eq!(db.read.num_idle(), 0, "kept out of the pool");

        // Two out, as many as `max_connections`: a third read waits for
        // one of them, while the pool keeps one for reads through it.
        let first = db.read().await.unwrap();
        let mut second = db.read().await.unwrap();
        assert_eq!(db.read.size(), 2);
        let third = tokio::time::timeout(Duration::from_millis(100), db.read()).await;
        assert!(third.is_err(), "no third reader while two are out");
        let direct = tokio::time::timeout(Duration::from_secs(5), db.reader().acquire()).await;
        assert!(matches!(direct, Ok(Ok(_))), "the pool's own reads go on");
        drop(direct);
        db.ping().await.unwrap();
        drop(first);
        assert_eq!(read().await, 7);
        assert_eq!(idle(), 1);

        // A reader whose connection failed (made up here) is given up:
        // back to the pool, not to the readers.
        assert!(second.check::<()>(Err(sqlx::Error::WorkerCrashed)).is_err());
        drop(second);
        assert_eq!(idle(), 1, "the failed one was not kept");
        for _ in 0..3 {
            assert_eq!(read().await, 7);
        }

        // Closing while a reader is out: it goes back to the pool when
        // done, and the close ends.
        let out = db.read().await.unwrap();
        let closing = tokio::spawn({
            let db = db.clone();
            async move { db.close().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(out);
        tokio::time::timeout(Duration::from_secs(5), closing)
            .await
            .expect("the close ends once the reader is back")
            .unwrap();
        assert_eq!(idle(), 0);
        assert!(db.read().await.is_err(), "no reads after closing");
    }

    /// The kept writer and readers live as long as their `Db`, which may
    /// outlive the runtime it was used on: dropping it then closes them
    /// instead of panicking for want of a task to return them to their pool on.
    #[test]
    fn a_db_whose_writer_is_kept_can_be_dropped_after_its_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("late.db").display());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let db = rt.block_on(async {
            let db = super::Db::open(&url, Default::default()).await.unwrap();
            db.execute(sqlx::query("CREATE TABLE t (k INTEGER)"))
                .await
                .unwrap();
            // A kept reader too.
            let n = db
                .read_with(async |c| {
                    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM t")
                        .fetch_one(c)
                        .await
                })
                .await
                .unwrap();
            assert_eq!(n, 0);
            db
        });
        drop(rt);
        drop(db);
    }

    #[test]
    fn postgres_only_migrations_join_the_portable_ones_in_version_order() {
        let m = Migrations::portable_and_postgres(migrator(&[100, 200]), migrator(&[190]));
        let versions = |m: &Migrator| m.migrations.iter().map(|m| m.version).collect::<Vec<_>>();
        assert_eq!(versions(&m.postgres), [100, 190, 200]);
        assert_eq!(versions(&m.sqlite), [100, 200]);
    }

    #[test]
    #[should_panic(expected = "migration version 100 is used twice")]
    fn a_postgres_only_migration_may_not_reuse_a_portable_version() {
        Migrations::portable_and_postgres(migrator(&[100]), migrator(&[100]));
    }

    #[test]
    fn placeholders_are_numbered_for_postgres_and_anonymous_for_sqlite() {
        let mut pg = Params::on(Backend::Postgres);
        assert_eq!(pg.one(), "$1");
        assert_eq!(pg.rows(2, 2), "($2, $3), ($4, $5)");
        assert_eq!(pg.list(2), "$6, $7");
        let mut lite = Params::on(Backend::Sqlite);
        assert_eq!(lite.one(), "?");
        assert_eq!(
            lite.rows_of(2, |p| format!("({}, 0)", p.one())),
            "(?, 0), (?, 0)"
        );
        assert_eq!(lite.list(3), "?, ?, ?");
    }
}
