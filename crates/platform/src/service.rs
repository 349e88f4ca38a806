//! Wiring a service's parts into running tasks. A service crate builds its
//! API router and event handler; [`ServiceHost`] adds what every service
//! has (health, metrics, dead-letter admin, standard layers, the outbox
//! relay, the consumer loop) and runs them under one shutdown signal.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::State,
    routing::{get, post},
};
use tokio::{net::TcpListener, sync::Notify, task::JoinSet};

use crate::{
    bus::Bus,
    consumer::{Consumer, DeadLetter, Handler, Outcome},
    db::{Db, DbOptions, Migrations},
    http::{self, Path, Problem, Readiness},
    outbox::{self, OutboxSignal},
    shutdown::Shutdown,
    timer,
};

/// A service's shared runtime pieces, handed to its `start` function.
#[derive(Clone, Debug)]
pub struct ServiceContext {
    pub name: &'static str,
    pub db: Db,
    pub bus: Bus,
    pub outbox: OutboxSignal,
    pub shutdown: Shutdown,
}

impl ServiceContext {
    /// A service on its own SQLite file and embedded event log in `dir`,
    /// without fsync: for tests and tools that drive one service alone.
    pub async fn scratch(
        name: &'static str,
        dir: &std::path::Path,
        migrations: &Migrations,
    ) -> anyhow::Result<Self> {
        let url = format!("sqlite://{}", dir.join(format!("{name}.db")).display());
        let opts = DbOptions {
            fsync: false,
            ..Default::default()
        };
        let db = Db::connect(&url, migrations, opts).await?;
        let log = crate::bus::EventLog::open(&dir.join("events.db"), false).await?;
        Ok(Self::new(name, db, Bus::Embedded(log), Shutdown::new()))
    }

    pub fn new(name: &'static str, db: Db, bus: Bus, shutdown: Shutdown) -> Self {
        // Metrics recorded before the recorder exists are dropped, so make
        // sure it exists before the service does anything worth counting.
        crate::telemetry::metrics_handle();
        ServiceContext {
            name,
            db,
            bus,
            outbox: OutboxSignal::default(),
            shutdown,
        }
    }
}

/// Builds and runs one service.
pub struct ServiceHost {
    ctx: ServiceContext,
    tasks: JoinSet<()>,
    admin: Router,
}

impl ServiceHost {
    pub fn new(ctx: ServiceContext) -> Self {
        ServiceHost {
            ctx,
            tasks: JoinSet::new(),
            admin: Router::new(),
        }
    }

    pub fn context(&self) -> &ServiceContext {
        &self.ctx
    }

    /// Runs a background task (a timer loop) until shutdown.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Runs a durable-timer loop (see [`crate::timer`]) until shutdown.
    pub fn spawn_timer<F, Fut>(&mut self, name: &'static str, wake: Arc<Notify>, fire: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<Option<i64>>> + Send + 'static,
    {
        let shutdown = self.ctx.shutdown.clone();
        let max_sleep = if self.ctx.db.single_process() {
            timer::MAX_SLEEP_OWNED
        } else {
            timer::MAX_SLEEP_SHARED
        };
        self.tasks
            .spawn(timer::run(name, wake, max_sleep, shutdown, fire));
    }

    /// Starts the service's consumer and its dead-letter admin routes.
    pub fn consume<H: Handler>(&mut self, handler: Arc<H>) {
        let consumer = Arc::new(Consumer::new(
            self.ctx.name,
            self.ctx.db.clone(),
            handler,
            self.ctx.outbox.clone(),
        ));
        self.admin = dead_letter_routes(consumer.clone());
        self.tasks
            .spawn(consumer.run(self.ctx.bus.clone(), self.ctx.shutdown.clone()));
    }

    /// Serves `api` on `listener` and starts the outbox relay.
    pub fn serve(mut self, listener: TcpListener, api: Router) -> std::io::Result<RunningService> {
        let addr = listener.local_addr()?;
        let ctx = self.ctx;
        let router = http::standard_layers(
            ctx.name,
            api.merge(self.admin).merge(http::health_routes(Readiness {
                db: ctx.db.clone(),
                bus: ctx.bus.clone(),
                shutdown: ctx.shutdown.clone(),
            })),
        );
        let shutdown = ctx.shutdown.clone();
        let name = ctx.name;
        self.tasks.spawn(async move {
            if let Err(e) = http::serve(listener, router, shutdown).await {
                tracing::error!(service = name, error = %e, "http server failed");
            }
        });
        self.tasks.spawn(outbox::run_relay(
            ctx.db.clone(),
            ctx.bus.clone(),
            ctx.outbox.clone(),
            ctx.shutdown.clone(),
        ));
        tracing::info!(service = name, %addr, "service started");
        Ok(RunningService {
            name,
            addr,
            db: ctx.db,
            shutdown: ctx.shutdown,
            tasks: self.tasks,
        })
    }
}

/// A started service: its address, and the handles to stop it.
pub struct RunningService {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub db: Db,
    shutdown: Shutdown,
    tasks: JoinSet<()>,
}

impl RunningService {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful: stop taking work, finish what is in hand, close the database.
    pub async fn stop(mut self) {
        self.shutdown.trigger();
        while self.tasks.join_next().await.is_some() {}
        self.db.close().await;
    }

    /// Abrupt, as a crash: every task is cancelled at its current await
    /// point. Uncommitted transactions roll back; nothing else is cleaned up.
    pub async fn kill(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.db.close().await;
    }
}

fn dead_letter_routes<H: Handler>(consumer: Arc<Consumer<H>>) -> Router {
    Router::new()
        .route("/admin/dead-letters", get(list_dead_letters::<H>))
        .route(
            "/admin/dead-letters/{id}/replay",
            post(replay_dead_letter::<H>),
        )
        .with_state(consumer)
}

async fn list_dead_letters<H: Handler>(
    State(c): State<Arc<Consumer<H>>>,
) -> Result<http::Json<Vec<DeadLetter>>, Problem> {
    Ok(http::Json(c.dead_letters().await?))
}

async fn replay_dead_letter<H: Handler>(
    State(c): State<Arc<Consumer<H>>>,
    Path(id): Path<i64>,
) -> Result<http::Json<serde_json::Value>, Problem> {
    match c.replay(id).await? {
        None => Err(Problem::not_found(format!("no dead letter {id}"))),
        Some(outcome) => {
            let outcome = match outcome {
                Outcome::Applied => "APPLIED",
                Outcome::Duplicate => "DUPLICATE",
                Outcome::Ignored => "IGNORED",
                Outcome::Parked => "PARKED_AGAIN",
            };
            Ok(http::Json(
                serde_json::json!({ "id": id, "outcome": outcome }),
            ))
        }
    }
}
