//! `restaurant up --processes`: every service, and the gateway, as its own
//! OS process (`restaurant serve …`), supervised. A child that dies is
//! started again on the same port after a short backoff — the local
//! analogue of a Kubernetes restart — so its peers and the gateway find it
//! where they left it. The children's pids are kept in
//! `<data-dir>/processes.json` for operators, tests and the chaos script.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use restaurant_platform::{client::JsonClient, shutdown::Shutdown};
use serde::Serialize;
use tokio::{process::Command, task::JoinSet};

use crate::UpConfig;

/// Set on every child: the pid of its supervisor. A child whose parent is
/// no longer that pid has been orphaned (the supervisor was killed) and
/// stops itself instead of running on unsupervised.
pub const SUPERVISOR_PID_ENV: &str = "RESTAURANT_SUPERVISOR_PID";

/// Resolves when this process's supervisor is gone; never, if it has none.
pub async fn orphaned() {
    let Some(supervisor) = std::env::var(SUPERVISOR_PID_ENV)
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return std::future::pending().await;
    };
    loop {
        #[cfg(unix)]
        if std::os::unix::process::parent_id() != supervisor {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Resolves on Ctrl-C, SIGTERM, or the loss of the supervisor.
pub async fn stop_requested() {
    tokio::select! {
        _ = restaurant_platform::shutdown::os_signal() => {}
        _ = orphaned() => tracing::warn!("supervisor gone; stopping"),
    }
}

/// One supervised process, as written to `processes.json`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRecord {
    pub name: String,
    pub replica: usize,
    pub pid: Option<u32>,
    pub port: u16,
    pub restarts: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProcessFile<'a> {
    supervisor: u32,
    gateway_url: &'a str,
    processes: &'a [ProcessRecord],
}

/// What one child runs.
struct ChildSpec {
    index: usize,
    args: Vec<String>,
}

fn free_port() -> anyhow::Result<u16> {
    // Bound and released at once; the child binds it a moment later. The
    // window for another process to take it is tiny on a dev machine.
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn timer_arg(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{}ms", d.as_millis()),
        None => "off".into(),
    }
}

/// The flags every `serve` child shares with `up`.
fn common_args(cfg: &UpConfig) -> Vec<String> {
    let mut args = vec![
        "--data-dir".into(),
        cfg.data_dir.display().to_string(),
        "--cook-time".into(),
        timer_arg(cfg.cook_time),
        "--delivery-time".into(),
        timer_arg(cfg.delivery_time),
        "--cancel-timeout".into(),
        timer_arg(Some(cfg.cancel_timeout)),
        "--breaker-failures".into(),
        cfg.cancel_breaker.failure_threshold.to_string(),
        "--breaker-open".into(),
        timer_arg(Some(cfg.cancel_breaker.open_for)),
        "--max-in-flight".into(),
        cfg.max_in_flight.to_string(),
        "--drain".into(),
        timer_arg(Some(cfg.gateway_drain)),
        "--max-backlog".into(),
        cfg.max_backlog.to_string(),
    ];
    if !cfg.cors_origins.is_empty() {
        args.extend(["--cors-origin".into(), cfg.cors_origins.join(",")]);
    }
    if !cfg.fsync {
        args.push("--no-fsync".into());
    }
    if let Some(url) = &cfg.database_url {
        args.extend(["--database-url".into(), url.clone()]);
    }
    if let Some(url) = &cfg.nats_url {
        args.extend([
            "--nats-url".into(),
            url.clone(),
            "--stream".into(),
            cfg.stream.clone(),
        ]);
    }
    args
}

struct Supervised {
    exe: PathBuf,
    /// Each child's `TOKIO_WORKER_THREADS` (see [`worker_threads_per_child`]).
    worker_threads: String,
    file: PathBuf,
    gateway_url: String,
    records: Mutex<Vec<ProcessRecord>>,
}

impl Supervised {
    fn update(&self, index: usize, f: impl FnOnce(&mut ProcessRecord)) {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut records[index]);
        let file = ProcessFile {
            supervisor: std::process::id(),
            gateway_url: &self.gateway_url,
            processes: &records,
        };
        // Written whole and renamed, so a reader never sees half a file.
        let tmp = self.file.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(&file).expect("serializes");
        if let Err(e) = std::fs::write(&tmp, json).and_then(|_| std::fs::rename(&tmp, &self.file)) {
            tracing::warn!(error = %e, "cannot write processes.json");
        }
    }

    fn name(&self, index: usize) -> String {
        self.records.lock().unwrap_or_else(|p| p.into_inner())[index]
            .name
            .clone()
    }
}

/// Sends SIGTERM without unsafe code: the `kill` utility is everywhere.
fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// The allocator's setting for the service processes: mimalloc (see
/// `main.rs`) returns freed pages to the OS at once instead of after 10 ms.
/// Each service process is held to 30 MB of resident memory, and with the
/// delay their peaks were order 32.7, mypage 30.1 MiB; without it 26.7 and
/// 25.5 (`bench/e2e.sh distributed 20s 64`); glibc's malloc had 26.2 and
/// 25.1 in that run, and 23.2 and 23.3 in a 30 s run of the release build,
/// where mimalloc peaks at 26.9-27.4 MiB (the 30 MB line is 28.6 MiB).
/// The one-process embedded shape keeps the delay (3,590 vs 3,451
/// completed/s in 20 s runs). A value already in the environment is passed
/// on instead. (This replaces glibc's `arena_max=1`, which stopped
/// mattering when Rust's allocations left glibc's malloc.)
pub const SERVICE_ALLOCATOR: (&str, &str) = ("MIMALLOC_PURGE_DELAY", "0");

/// Tokio's variable for a process's worker threads (`main.rs` runs one on
/// the current-thread scheduler).
pub const WORKER_THREADS_ENV: &str = "TOKIO_WORKER_THREADS";

/// Worker threads for each of `children` processes sharing this machine's
/// cores: the cores divided among them, at least one. Every child is a
/// scheduler of its own, so a worker per core in each (tokio's default) put
/// five to seven times as many workers as cores on a two-core machine,
/// handing tasks to each other across context switches. Measured,
/// distributed shape on 2 cores, 1,500 orders/s offered for 30 s,
/// alternating: CPU per order (all processes) 1.190 / 1.191 / 1.199 ->
/// 1.123 / 1.114 / 1.117 ms, placement p99 20.7 / 23.8 / 25.4 -> 16.2 /
/// 19.0 / 18.6 ms; closed loop 2,879 / 2,550 -> 3,380 / 2,928 completed/s.
pub fn worker_threads_per_child(cores: usize, children: usize) -> usize {
    (cores / children.max(1)).max(1)
}

/// Runs one child until shutdown, starting it again whenever it exits.
async fn supervise(sup: Arc<Supervised>, spec: ChildSpec, shutdown: Shutdown) {
    let name = sup.name(spec.index);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut command = Command::new(&sup.exe);
        // A value already in the environment is passed on instead.
        for (key, value) in [
            SERVICE_ALLOCATOR,
            (WORKER_THREADS_ENV, sup.worker_threads.as_str()),
        ] {
            if std::env::var_os(key).is_none() {
                command.env(key, value);
            }
        }
        let mut child = match command
            .args(&spec.args)
            .env(SUPERVISOR_PID_ENV, std::process::id().to_string())
            // Children get their backends from their flags only.
            .env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(process = %name, error = %e, "cannot start");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.wait() => return,
                }
            }
        };
        let pid = child.id();
        sup.update(spec.index, |r| r.pid = pid);
        let started = Instant::now();
        tokio::select! {
            status = child.wait() => {
                sup.update(spec.index, |r| {
                    r.pid = None;
                    r.restarts += 1;
                });
                tracing::warn!(process = %name, ?status, "exited; restarting in {backoff:?}");
                metrics::counter!("supervisor_restarts_total", "process" => name.clone()).increment(1);
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_millis(100);
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            _ = shutdown.wait() => {
                if let Some(pid) = pid {
                    terminate(pid);
                }
                if tokio::time::timeout(Duration::from_secs(15), child.wait()).await.is_err() {
                    tracing::warn!(process = %name, "did not stop in 15 s; killing");
                    let _ = child.kill().await;
                }
                sup.update(spec.index, |r| r.pid = None);
                return;
            }
        }
    }
}

/// Starts every process, waits until the gateway is ready, then supervises
/// until `shutdown`. Returns the gateway URL through `on_ready`.
pub async fn run(
    cfg: UpConfig,
    shutdown: Shutdown,
    on_ready: impl FnOnce(&str, &Path),
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let exe = std::env::current_exe().context("locating the restaurant binary")?;
    // Create and migrate the shared event log once, here: SQLite migrations
    // do not lock across processes, and every child opens this file.
    if cfg.nats_url.is_none() {
        restaurant_platform::bus::EventLog::open(&cfg.data_dir.join("events.db"), cfg.fsync)
            .await
            .context("preparing the event log")?
            .close()
            .await;
    }
    let names = crate::SERVICES;
    let mut records = Vec::new();
    for name in names {
        for replica in 0..cfg.replicas.max(1) {
            records.push(ProcessRecord {
                name: name.into(),
                replica,
                pid: None,
                port: free_port()?,
                restarts: 0,
            });
        }
    }
    let gateway_port = if cfg.port == 0 {
        free_port()?
    } else {
        cfg.port
    };
    records.push(ProcessRecord {
        name: "gateway".into(),
        replica: 0,
        pid: None,
        port: gateway_port,
        restarts: 0,
    });
    // Every replica of a service, comma-separated.
    let url_of = |n: &str| {
        records
            .iter()
            .filter(|r| r.name == n)
            .map(|r| format!("http://127.0.0.1:{}", r.port))
            .collect::<Vec<_>>()
            .join(",")
    };
    let common = common_args(&cfg);
    let mut specs = Vec::new();
    for (index, r) in records.iter().enumerate() {
        let mut args = vec![
            "serve".to_owned(),
            r.name.clone(),
            "--port".into(),
            r.port.to_string(),
        ];
        args.extend(common.iter().cloned());
        match r.name.as_str() {
            "order" => args.extend(["--cook-url".into(), url_of("cook")]),
            "cook" if cfg.seed_demo_menu && r.replica == 0 => args.push("--seed-demo-menu".into()),
            "gateway" => {
                for n in names {
                    args.extend([format!("--{n}-url"), url_of(n)]);
                }
            }
            _ => {}
        }
        specs.push(ChildSpec { index, args });
    }
    let gateway_url = url_of("gateway");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sup = Arc::new(Supervised {
        exe,
        worker_threads: worker_threads_per_child(cores, records.len()).to_string(),
        file: cfg.data_dir.join("processes.json"),
        gateway_url: gateway_url.clone(),
        records: Mutex::new(records),
    });
    let mut tasks = JoinSet::new();
    for spec in specs {
        tasks.spawn(supervise(sup.clone(), spec, shutdown.clone()));
    }

    let client = JsonClient::new();
    let ready_url = format!("{gateway_url}/readyz");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((status, _)) = client.get(&ready_url, Duration::from_secs(1)).await
            && status.is_success()
        {
            break;
        }
        if Instant::now() > deadline {
            shutdown.trigger();
            while tasks.join_next().await.is_some() {}
            anyhow::bail!("the system did not become ready within 60 s");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = shutdown.wait() => break,
        }
    }
    on_ready(&gateway_url, &sup.file);
    while tasks.join_next().await.is_some() {}
    let _ = std::fs::remove_file(&sup.file);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::worker_threads_per_child;

    #[test]
    fn cores_are_divided_among_the_children_and_each_keeps_one() {
        // Five children on two cores: one each, not two.
        assert_eq!(worker_threads_per_child(2, 5), 1);
        assert_eq!(worker_threads_per_child(1, 5), 1);
        assert_eq!(worker_threads_per_child(16, 5), 3);
        assert_eq!(worker_threads_per_child(8, 1), 8);
        assert_eq!(worker_threads_per_child(4, 0), 4);
    }
}
