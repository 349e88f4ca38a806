use std::time::Duration;

use restaurant::{System, UpConfig};
use serde_json::{Value, json};

/// How long an eventually-consistent step may take before a test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub struct TestApp {
    pub url: String,
    pub client: reqwest::Client,
    pub config: UpConfig,
    system: Option<System>,
    _dir: tempfile::TempDir,
}

/// The suite runs in both shapes: embedded (SQLite files and the embedded
/// log, the default) and distributed (PostgreSQL and NATS JetStream), chosen
/// by `RESTAURANT_TEST_SHAPE=distributed`. A distributed run gets a fresh
/// database and a fresh stream per test, dropped when the test stops.
pub fn distributed() -> bool {
    std::env::var("RESTAURANT_TEST_SHAPE").as_deref() == Ok("distributed")
}

fn database_admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn admin_execute(sql: String) {
    use sqlx::{Connection, Executor};
    sqlx::any::install_default_drivers();
    let mut admin = sqlx::AnyConnection::connect(&database_admin_url())
        .await
        .expect("PostgreSQL must be reachable at DATABASE_URL: run scripts/services.sh");
    admin.execute(sqlx::AssertSqlSafe(sql)).await.unwrap();
}

/// A fresh database and stream for one distributed test.
async fn distributed_backends(config: &mut UpConfig) {
    let (database_url, stream) = fresh_backends().await;
    config.database_url = Some(database_url);
    config.nats_url = Some(nats_url());
    config.stream = stream;
}

/// Creates a fresh PostgreSQL database; returns its URL and a stream name
/// (the same name) for NATS.
pub async fn fresh_backends() -> (String, String) {
    let name = format!("rt_{}", restaurant_contract::new_id().replace('-', ""));
    admin_execute(format!("CREATE DATABASE {name}")).await;
    let base = database_admin_url();
    let base = base.rsplit_once('/').unwrap().0;
    (format!("{base}/{name}"), name)
}

pub async fn drop_distributed_backends(config: &UpConfig) {
    if config.nats_url.is_none() {
        return;
    }
    let _ = restaurant_platform::bus::delete_nats_stream(&nats_url(), &config.stream).await;
    admin_execute(format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        config.stream
    ))
    .await;
}

impl TestApp {
    /// The system with cooking and delivery moved only by their endpoints.
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(tune: impl FnOnce(&mut UpConfig)) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = UpConfig::new(dir.path());
        config.port = 0;
        config.cook_time = None;
        config.delivery_time = None;
        config.fsync = false;
        config.seed_demo_menu = false;
        if distributed() {
            distributed_backends(&mut config).await;
        }
        tune(&mut config);
        let system = System::start(config.clone()).await.expect("system starts");
        TestApp {
            url: system.gateway_url.clone(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            config,
            system: Some(system),
            _dir: dir,
        }
    }

    /// A client for a system running elsewhere (another process).
    pub fn attach(url: &str) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        TestApp {
            url: url.to_owned(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            config: UpConfig::new(dir.path()),
            system: None,
            _dir: dir,
        }
    }

    /// Stops the system (abruptly if `crash`) and starts it again on the
    /// same data directory.
    pub async fn restart(&mut self, crash: bool) {
        let system = self.system.take().expect("running");
        if crash {
            system.kill().await;
        } else {
            system.stop().await;
        }
        let system = System::start(self.config.clone()).await.expect("restarts");
        self.url = system.gateway_url.clone();
        self.system = Some(system);
    }

    pub fn system_mut(&mut self) -> &mut System {
        self.system.as_mut().expect("running in this process")
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.system.take() {
            s.stop().await;
        }
        drop_distributed_backends(&self.config).await;
    }

    pub async fn set_menu(&self, restaurant: &str, menu: &str, stock: i64) {
        let res = self
            .client
            .put(format!("{}/menus/{restaurant}/{menu}", self.url))
            .json(&json!({"name": menu, "price": 1000, "stock": stock}))
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "{}", res.text().await.unwrap());
    }

    pub async fn stock(&self, restaurant: &str, menu: &str) -> i64 {
        let menus: Vec<Value> = self
            .get_ok(&format!("/menus?restaurantId={restaurant}"))
            .await
            .as_array()
            .cloned()
            .unwrap();
        menus
            .iter()
            .find(|m| m["menuId"] == menu)
            .and_then(|m| m["stock"].as_i64())
            .unwrap_or_else(|| panic!("no menu {menu}"))
    }

    pub async fn place(
        &self,
        customer: &str,
        restaurant: &str,
        items: &[(&str, i64)],
    ) -> reqwest::Response {
        let items: Vec<Value> = items
            .iter()
            .map(|(m, q)| json!({"menuId": m, "qty": q}))
            .collect();
        self.client
            .post(format!("{}/orders", self.url))
            .json(&json!({
                "customerId": customer,
                "restaurantId": restaurant,
                "items": items,
                "address": "1 Jongno, Seoul"
            }))
            .send()
            .await
            .unwrap()
    }

    /// Places an order that must be acknowledged; returns its id.
    pub async fn place_ok(
        &self,
        customer: &str,
        restaurant: &str,
        items: &[(&str, i64)],
    ) -> String {
        let res = self.place(customer, restaurant, items).await;
        assert_eq!(res.status(), 201);
        let body: Value = res.json().await.unwrap();
        body["id"].as_str().unwrap().to_owned()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
    }

    pub async fn get_ok(&self, path: &str) -> Value {
        let res = self.get(path).await;
        assert!(res.status().is_success(), "GET {path}: {}", res.status());
        res.json().await.unwrap()
    }

    pub async fn post(&self, path: &str) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
    }

    pub async fn order(&self, id: &str) -> Value {
        self.get_ok(&format!("/orders/{id}")).await
    }

    /// Polls `path` until `done` holds for its JSON body.
    pub async fn wait_until(&self, path: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut last = Value::Null;
        while tokio::time::Instant::now() < deadline {
            let res = self.get(path).await;
            if res.status().is_success() {
                last = res.json().await.unwrap();
                if done(&last) {
                    return last;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("gave up waiting on {path}; last seen: {last}");
    }

    pub async fn wait_status(&self, id: &str, status: &str) -> Value {
        self.wait_until(&format!("/orders/{id}"), |o| o["status"] == status)
            .await
    }

    pub async fn wait_mypage(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        self.wait_until(&format!("/mypages/{id}"), done).await
    }

    pub async fn cancel(&self, id: &str) -> reqwest::Response {
        self.post(&format!("/orders/{id}/cancel")).await
    }
}

/// A restaurant id unique to the calling test.
pub fn restaurant() -> String {
    format!("r-{}", restaurant_contract::new_id())
}

pub fn is_final(status: &str) -> bool {
    matches!(status, "DELIVERED" | "REJECTED" | "CANCELLED")
}
