//! `restaurant bench`: the load generator. It places orders through the
//! gateway from `concurrency` clients for a bounded time, follows every order
//! to its final state on MyPage, and reports what a user of the system cares
//! about: completed orders per second, placement latency, end-to-end latency
//! (placed → delivered) and MyPage staleness, each from an HDR histogram.
//!
//! End-to-end latency, staleness and the time of the last completion use
//! the system's own timestamps (the order's `createdAt`, the view's
//! `deliveredAt`, `updatedAt` and `projectedAt`, all taken on this
//! machine's clock), so they do not depend on how often the bench polls.
//! Placement latency is the client's round trip.
//!
//! Two ways to load: closed loop (default) — every client places its next
//! order as soon as the last is answered (or, turned away with 503, after
//! its `Retry-After`), so the system runs flat out and placement latency is
//! mostly queueing (by Little's law, about clients ÷ rate); open loop
//! (`rate`) — orders are due at a fixed rate whatever the system does,
//! and placement latency counts from when each was due, not
//! from when a free client got to send it. A stalled system then shows its
//! stall in every order that waited behind it (no coordinated omission, as
//! in wrk2), so "p99 at 3,000 orders/s" means what it says.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use restaurant_contract::OrderLine;
use restaurant_platform::parse_rfc3339;
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Clone, Debug)]
pub struct BenchArgs {
    pub url: String,
    pub duration: Duration,
    pub concurrency: usize,
    pub max_orders: u64,
    /// Offered orders per second (open loop); `None` places as fast as the
    /// clients are answered (closed loop). The clients then bound how many
    /// placements are in flight at once.
    pub rate: Option<f64>,
    /// How long to wait, after placing stops, for orders to finish.
    pub drain: Duration,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub orders_placed: u64,
    pub orders_completed: u64,
    pub completed_per_sec: f64,
    pub place_latency_ms: Percentiles,
    pub end_to_end_latency_ms: Percentiles,
    pub mypage_lag_ms: Percentiles,
    pub errors: BTreeMap<String, u64>,
    pub duration_secs: f64,
    pub concurrency: usize,
    /// The open-loop rate, or `None` for a closed-loop run.
    pub offered_per_sec: Option<f64>,
    /// The slowest placement due in each second of the run (ms), so that a
    /// p99 over its bound can be told apart: a stall of a second or two
    /// stands out, a system slow throughout does not.
    pub place_max_ms_by_second: Vec<f64>,
    /// How busy the whole machine was while orders were placed, the bench
    /// and the system included, and how much of it a hypervisor took
    /// (`None` where `/proc/stat` cannot be read). A tail over its bound on
    /// a machine near saturation, or one whose steal is high, is the
    /// machine's as much as the system's.
    pub host: Option<HostLoad>,
    /// The machine's load in each second of the run, as `host` is for the
    /// whole: a slow second whose steal or I/O wait is high was the
    /// machine's, one at the usual load was the system's.
    pub host_by_second: Vec<HostLoad>,
    /// How long after the bench saw every order final on MyPage the order
    /// service showed each client's last order final too (ms; about one
    /// read when it already did). `None` when nothing was placed.
    pub order_service_behind_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostLoad {
    pub cores: usize,
    /// Of all CPU time of the machine: not idle, not waiting for I/O
    /// (time stolen counts as busy: the machine wanted to run then).
    pub busy_percent: f64,
    /// Of all CPU time: taken by the hypervisor for other guests.
    pub steal_percent: f64,
    /// Of all CPU time: idle with I/O outstanding (a disk slow to answer,
    /// an fsync).
    pub io_wait_percent: f64,
}

/// The machine's CPU time so far (`/proc/stat`'s first line), in ticks.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuTimes {
    total: u64,
    idle: u64,
    io_wait: u64,
    steal: u64,
}

impl CpuTimes {
    fn parse(stat: &str) -> Option<CpuTimes> {
        let mut fields = stat.lines().next()?.split_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        // user nice system idle iowait irq softirq steal (guest time is
        // already counted in user and nice)
        let t: Vec<u64> = fields
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        if t.len() < 8 {
            return None;
        }
        Some(CpuTimes {
            total: t.iter().sum(),
            idle: t[3] + t[4],
            io_wait: t[4],
            steal: t[7],
        })
    }

    fn now() -> Option<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    fn until(self, later: CpuTimes) -> Option<HostLoad> {
        let total = later.total.checked_sub(self.total).filter(|&t| t > 0)?;
        let pct = |ticks: u64| (ticks as f64 / total as f64 * 1000.0).round() / 10.0;
        Some(HostLoad {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            busy_percent: pct(total.saturating_sub(later.idle.saturating_sub(self.idle))),
            steal_percent: pct(later.steal.saturating_sub(self.steal)),
            io_wait_percent: pct(later.io_wait.saturating_sub(self.io_wait)),
        })
    }
}

/// Microsecond histograms up to an hour, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid")
}

fn percentiles_ms(h: &Histogram<u64>) -> Percentiles {
    let ms = |us: u64| (us as f64 / 1000.0 * 100.0).round() / 100.0;
    if h.is_empty() {
        return Percentiles {
            p50: 0.0,
            p95: 0.0,
            p99: 0.0,
            max: 0.0,
        };
    }
    Percentiles {
        p50: ms(h.value_at_quantile(0.50)),
        p95: ms(h.value_at_quantile(0.95)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    }
}

/// Refuses anything but loopback: the bench is a load generator.
fn check_loopback(url: &str) -> anyhow::Result<()> {
    let host = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split(['/', '?']).next())
        .map(|authority| match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => h,
            _ => authority,
        })
        .unwrap_or_default();
    anyhow::ensure!(
        matches!(host, "127.0.0.1" | "localhost" | "[::1]"),
        "the bench only targets this machine (127.0.0.1, localhost, [::1]), not {host:?}"
    );
    Ok(())
}

/// An order on its way.
struct Pending {
    created_at: i64,
    /// When the bench had its answer.
    answered: Instant,
}

#[derive(Default)]
struct Shared {
    /// customer → (order id → pending)
    pending: Mutex<HashMap<String, HashMap<String, Pending>>>,
    errors: Mutex<BTreeMap<String, u64>>,
    e2e: Mutex<Option<Histogram<u64>>>,
    lag: Mutex<Option<Histogram<u64>>>,
    placed: AtomicU64,
    completed: AtomicU64,
    last_completion_us: AtomicU64,
}

impl Shared {
    fn error(&self, kind: &str) {
        *self
            .errors
            .lock()
            .unwrap()
            .entry(kind.to_owned())
            .or_default() += 1;
    }
}

fn error_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "transport"
    }
}

/// How long a closed-loop client pauses after a 503 that does not say.
const REFUSED_PAUSE: Duration = Duration::from_secs(1);

/// A `Retry-After` in seconds (an HTTP date is not expected from this
/// system and counts as absent), at most a minute.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(60)))
}

/// A placement's body, written without building a `serde_json::Value`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PlaceOrder<'a> {
    customer_id: &'a str,
    restaurant_id: &'a str,
    items: &'a [OrderLine],
    address: &'a str,
}

/// What the bench reads of a MyPage view (every field optional, as
/// `Value` lookups were: a server older than a field still answers).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ViewRead {
    order_id: Option<String>,
    order_status: Option<String>,
    updated_at: Option<String>,
    projected_at: Option<String>,
    delivered_at: Option<String>,
}

/// What the bench reads of a placement's answer.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Placed {
    id: String,
    #[serde(default)]
    created_at: Option<String>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<Report> {
    check_loopback(&args.url)?;
    if let Some(r) = args.rate {
        anyhow::ensure!(
            r.is_finite() && r > 0.0,
            "the rate must be a positive number of orders per second, not {r}"
        );
    }
    let url = args.url.trim_end_matches('/').to_owned();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(args.concurrency + 8)
        .build()?;
    let run_id = restaurant_contract::new_id();
    let restaurant = format!("bench-{run_id}");
    for menu in ["bibimbap", "bulgogi"] {
        let res = client
            .put(format!("{url}/menus/{restaurant}/{menu}"))
            .json(&json!({"name": menu, "price": 10_000, "stock": 1_000_000_000}))
            .send()
            .await
            .with_context(|| format!("setting up the menu at {url}"))?;
        anyhow::ensure!(res.status().is_success(), "menu setup: {}", res.status());
    }

    let shared = Arc::new(Shared {
        e2e: Mutex::new(Some(histogram())),
        lag: Mutex::new(Some(histogram())),
        ..Default::default()
    });
    let started = Instant::now();
    let started_ms = restaurant_contract::now_ms();
    let cpu_before = CpuTimes::now();
    let deadline = started + args.duration;
    let placing = Arc::new(AtomicBool::new(true));
    let budget = Arc::new(AtomicU64::new(args.max_orders));
    let schedule = args.rate.map(|per_sec| Schedule {
        start: started,
        per_sec,
        next: Arc::new(AtomicU64::new(0)),
    });

    // Parsed once: the load generator shares the machine with the system it
    // measures, and what it spends per order the system does not get.
    let orders_url = reqwest::Url::parse(&format!("{url}/orders"))?;
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let (client, orders_url, restaurant, shared, budget) = (
            client.clone(),
            orders_url.clone(),
            restaurant.clone(),
            shared.clone(),
            budget.clone(),
        );
        let run_id = run_id.clone();
        let schedule = schedule.clone();
        workers.push(tokio::spawn(async move {
            let mut place = histogram();
            let mut max_by_second = Vec::<u64>::new();
            let items = ["bibimbap", "bulgogi"].map(|menu| OrderLine {
                menu_id: menu.into(),
                qty: 1,
            });
            let mut n = 0u64;
            let mut last_placed = None;
            while Instant::now() < deadline
                && budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                    .is_ok()
            {
                let due = match &schedule {
                    Some(s) => match s.take(deadline) {
                        Some(due) => {
                            tokio::time::sleep_until(due.into()).await;
                            due
                        }
                        None => break,
                    },
                    None => Instant::now(),
                };
                // A new customer every 20 orders keeps each MyPage listing
                // the follower reads short. The follower is the instrument,
                // not the load: with 200 orders per customer its listings
                // averaged ~100 views, and reading them (SQLite, JSON both
                // ways) took more than a quarter of a core from the system
                // under test (sqlx::query log, embedded shape).
                let customer = format!("bench-{run_id}-w{w}-{}", n / 20);
                n += 1;
                let body = PlaceOrder {
                    customer_id: &customer,
                    restaurant_id: &restaurant,
                    items: &items,
                    address: "1 Jongno, Seoul",
                };
                match client.post(orders_url.clone()).json(&body).send().await {
                    Ok(res) if res.status() == 201 => {
                        let placed = match res.json::<Placed>().await {
                            Ok(placed) => placed,
                            Err(_) => {
                                shared.error("bad_response");
                                continue;
                            }
                        };
                        let took = due.elapsed().as_micros().max(1) as u64;
                        let _ = place.record(took);
                        slowest_in_second(&mut max_by_second, due - started, took);
                        shared.placed.fetch_add(1, Ordering::Relaxed);
                        let id = placed.id;
                        last_placed = Some(id.clone());
                        let created_at = placed
                            .created_at
                            .as_deref()
                            .and_then(parse_rfc3339)
                            .unwrap_or(0);
                        let answered = Instant::now();
                        shared
                            .pending
                            .lock()
                            .unwrap()
                            .entry(customer)
                            .or_default()
                            .insert(
                                id,
                                Pending {
                                    created_at,
                                    answered,
                                },
                            );
                    }
                    // Turned away on purpose (the gateway at capacity, the
                    // order service over its backlog limit), not failed.
                    Ok(res) if res.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                        shared.error("http_503");
                        // A closed-loop client waits as it is told, as a
                        // real one would: asking again at once measured the
                        // bench, not the system (on a fast host, 972,446
                        // refusals in a 60 s run, 16,000 a second taking the
                        // CPU the consumers needed to catch up). An open
                        // loop's orders come when they are due regardless.
                        if schedule.is_none() {
                            let wait = retry_after(res.headers()).unwrap_or(REFUSED_PAUSE);
                            tokio::time::sleep_until(deadline.min(Instant::now() + wait).into())
                                .await;
                        }
                    }
                    Ok(res) if res.status().is_server_error() => shared.error("http_5xx"),
                    Ok(_) => shared.error("http_4xx"),
                    Err(e) => shared.error(error_kind(&e)),
                }
            }
            (place, max_by_second, last_placed)
        }));
    }

    let follower = {
        let (client, url, shared, placing) =
            (client.clone(), url.clone(), shared.clone(), placing.clone());
        tokio::spawn(async move { follow(client, url, shared, placing, started_ms).await })
    };

    let bar = progress_bar(args.progress);
    let ticker = {
        let (shared, bar) = (shared.clone(), bar.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let secs = started.elapsed().as_secs_f64().max(0.001);
                let done = shared.completed.load(Ordering::Relaxed);
                bar.set_message(format!(
                    "placed {}  completed {}  ({:.0} completed/s)",
                    shared.placed.load(Ordering::Relaxed),
                    done,
                    done as f64 / secs
                ));
                bar.tick();
            }
        })
    };

    // One reading of /proc/stat a second, on the seconds of the run that
    // placeMaxMsBySecond counts in; the last one ends where the placements
    // end, so a run of 2 s has two, one cut short by its budget fewer.
    let stop_sampling = Arc::new(tokio::sync::Notify::new());
    let sampler = tokio::spawn({
        let stop = stop_sampling.clone();
        async move {
            let mut by_second = Vec::new();
            let mut last = cpu_before;
            let mut second = started;
            while last.is_some() && second < deadline {
                second += Duration::from_secs(1);
                let stopped = tokio::select! {
                    _ = tokio::time::sleep_until(second.into()) => false,
                    _ = stop.notified() => true,
                };
                let now = CpuTimes::now();
                by_second.extend(last.zip(now).and_then(|(a, b)| a.until(b)));
                if stopped {
                    break;
                }
                last = now;
            }
            by_second
        }
    });

    let mut place = histogram();
    let mut max_by_second = Vec::new();
    let mut last_placed = Vec::new();
    for w in workers {
        let (h, by_second, last) = w.await?;
        last_placed.extend(last);
        place.add(h).expect("same bounds");
        for (second, us) in by_second.into_iter().enumerate() {
            slowest_in_second(&mut max_by_second, Duration::from_secs(second as u64), us);
        }
    }
    let placed_for = started.elapsed();
    stop_sampling.notify_one();
    let host_by_second = sampler.await?;
    let host = cpu_before
        .zip(CpuTimes::now())
        .and_then(|(a, b)| a.until(b));
    // Drain: give the orders in flight time to finish.
    let drain_until = Instant::now() + args.drain;
    while Instant::now() < drain_until {
        let left: usize = shared
            .pending
            .lock()
            .unwrap()
            .values()
            .map(HashMap::len)
            .sum();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    placing.store(false, Ordering::Relaxed);
    follower.await?;
    let order_service_behind = settle_at_order_service(
        &client,
        &url,
        &last_placed,
        drain_until.max(Instant::now() + MIN_SETTLE),
        &shared,
    )
    .await;
    ticker.abort();
    bar.finish_and_clear();

    let unfinished: u64 = shared
        .pending
        .lock()
        .unwrap()
        .values()
        .map(|m| m.len() as u64)
        .sum();
    if unfinished > 0 {
        *shared
            .errors
            .lock()
            .unwrap()
            .entry("not_final".into())
            .or_default() += unfinished;
    }
    let completed = shared.completed.load(Ordering::Relaxed);
    let last = Duration::from_micros(shared.last_completion_us.load(Ordering::Relaxed));
    let window = last.max(placed_for).as_secs_f64().max(0.001);
    let e2e = shared.e2e.lock().unwrap().take().expect("once");
    let lag = shared.lag.lock().unwrap().take().expect("once");
    let errors = std::mem::take(&mut *shared.errors.lock().unwrap());
    Ok(Report {
        orders_placed: shared.placed.load(Ordering::Relaxed),
        orders_completed: completed,
        completed_per_sec: (completed as f64 / window * 10.0).round() / 10.0,
        place_latency_ms: percentiles_ms(&place),
        end_to_end_latency_ms: percentiles_ms(&e2e),
        mypage_lag_ms: percentiles_ms(&lag),
        errors,
        duration_secs: (placed_for.as_secs_f64() * 100.0).round() / 100.0,
        concurrency: args.concurrency,
        offered_per_sec: args.rate,
        place_max_ms_by_second: max_by_second
            .into_iter()
            .map(|us| us as f64 / 1000.0)
            .collect(),
        host,
        host_by_second,
        order_service_behind_ms: order_service_behind
            .map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0),
    })
}

/// The states an order never leaves.
const FINAL: [&str; 3] = ["DELIVERED", "REJECTED", "CANCELLED"];

/// The least time the order service gets to show the last orders final
/// once MyPage does, however little of the drain is left.
const MIN_SETTLE: Duration = Duration::from_secs(5);

/// How long after MyPage showed every order final the order service
/// showed the last order of each client final too (`None`: none placed).
/// MyPage projects the kitchen's and the couriers' events itself, so a
/// consumer of the order service's that trails shows nowhere else: the
/// order consumer once did 5,120 of the 12,000 events a second that 3,000
/// orders a second bring, and no number of the bench moved. Each order
/// not final by `until` counts as the error `order_service_not_final`.
async fn settle_at_order_service(
    client: &reqwest::Client,
    url: &str,
    ids: &[String],
    until: Instant,
    shared: &Shared,
) -> Option<Duration> {
    #[derive(Deserialize)]
    struct Status {
        status: String,
    }
    if ids.is_empty() {
        return None;
    }
    let from = Instant::now();
    let mut left: Vec<&String> = ids.iter().collect();
    loop {
        let mut still = Vec::new();
        for id in left {
            let status = match client.get(format!("{url}/orders/{id}")).send().await {
                Ok(res) => res.json::<Status>().await.ok().map(|s| s.status),
                Err(_) => None,
            };
            if !status.is_some_and(|s| FINAL.contains(&s.as_str())) {
                still.push(id);
            }
        }
        left = still;
        if left.is_empty() {
            return Some(from.elapsed());
        }
        if Instant::now() >= until {
            *shared
                .errors
                .lock()
                .unwrap()
                .entry("order_service_not_final".into())
                .or_default() += left.len() as u64;
            return Some(from.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Keeps in `by_second[s]` the largest `us` of those due in second `s` of
/// the run.
fn slowest_in_second(by_second: &mut Vec<u64>, due: Duration, us: u64) {
    let s = due.as_secs() as usize;
    if by_second.len() <= s {
        by_second.resize(s + 1, 0);
    }
    by_second[s] = by_second[s].max(us);
}

/// The open-loop timetable: order `i` is due `i / per_sec` after the start.
#[derive(Clone)]
struct Schedule {
    start: Instant,
    per_sec: f64,
    next: Arc<AtomicU64>,
}

impl Schedule {
    /// Claims the next order's due time, or `None` once it falls past the
    /// deadline. A due time already past is returned as it is: the order is
    /// late because every client was busy, and its latency says so. (Tokio's
    /// timer wakes on millisecond ticks, so an order may also leave up to a
    /// millisecond after it was due; that too counts against the system,
    /// which overstates latency slightly, never understates it.)
    fn take(&self, deadline: Instant) -> Option<Instant> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let due = self.start + Duration::from_nanos((i as f64 * 1e9 / self.per_sec).round() as u64);
        (due < deadline).then_some(due)
    }
}

fn progress_bar(show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .expect("static template"),
    );
    bar
}

/// Polls MyPage for customers with unfinished orders until told to stop.
///
/// A customer is read once its newest order is [`SETTLE`] old, so that one
/// listing finds most of its orders final: a client places twenty orders
/// per customer, and reading each customer every 100 ms while it is being
/// ordered for read 0.10-0.13 listings per order, a load on the system
/// measured. What is measured does not depend on when the bench reads (the
/// module's doc), so reading later changes no number but the load.
async fn follow(
    client: reqwest::Client,
    url: String,
    shared: Arc<Shared>,
    placing: Arc<AtomicBool>,
    started_ms: i64,
) {
    const SETTLE: Duration = Duration::from_millis(200);
    loop {
        let keep_going = placing.load(Ordering::Relaxed);
        let customers: Vec<String> = shared
            .pending
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| {
                m.values()
                    .map(|p| p.answered.elapsed())
                    .min()
                    .is_some_and(|newest| newest >= SETTLE)
            })
            .map(|(c, _)| c.clone())
            .collect();
        for customer in customers {
            let res = client
                .get(format!("{url}/mypages?customerId={customer}"))
                .send()
                .await;
            let Ok(res) = res else { continue };
            let Ok(views) = res.json::<Vec<ViewRead>>().await else {
                continue;
            };
            for v in views {
                let status = v.order_status.as_deref().unwrap_or_default();
                if !FINAL.contains(&status) {
                    continue;
                }
                let id = v.order_id.as_deref().unwrap_or_default();
                let Some(p) = shared
                    .pending
                    .lock()
                    .unwrap()
                    .get_mut(&customer)
                    .and_then(|m| m.remove(id))
                else {
                    continue;
                };
                if status != "DELIVERED" {
                    shared.error(&format!("order_{}", status.to_lowercase()));
                    continue;
                }
                shared.completed.fetch_add(1, Ordering::Relaxed);
                let updated = v.updated_at.as_deref().and_then(parse_rfc3339);
                let projected = v.projected_at.as_deref().and_then(parse_rfc3339);
                // A server without `deliveredAt` (older than the field):
                // the view's last event, which is up to a relay pass later.
                let delivered = v
                    .delivered_at
                    .as_deref()
                    .and_then(parse_rfc3339)
                    .or(updated);
                if let Some(d) = delivered {
                    let e2e_us = ((d - p.created_at).max(0) as u64 * 1000).max(1);
                    let _ = shared.e2e.lock().unwrap().as_mut().unwrap().record(e2e_us);
                    shared
                        .last_completion_us
                        .fetch_max((d - started_ms).max(0) as u64 * 1000, Ordering::Relaxed);
                }
                if let (Some(u), Some(pr)) = (updated, projected) {
                    let lag_us = ((pr - u).max(0) as u64 * 1000).max(1);
                    let _ = shared.lag.lock().unwrap().as_mut().unwrap().record(lag_us);
                }
            }
        }
        if !keep_going {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Report {
    pub fn human(&self) -> String {
        let p = |x: &Percentiles| {
            format!(
                "p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
                x.p50, x.p95, x.p99, x.max
            )
        };
        let errors = if self.errors.is_empty() {
            "none".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "orders placed:          {}\n\
             orders completed:       {} (reached DELIVERED on MyPage)\n\
             completed orders/s:     {:.1} (completed / time from the first placement to the last completion)\n\
             placement latency ms:   {}\n\
             slowest second:         {}\n\
             placed→delivered ms:    p50 {:.2}  p99 {:.2}\n\
             MyPage staleness ms:    p50 {:.2}  p99 {:.2}\n\
             order service behind:   {} (each client's last order final there after MyPage showed all)\n\
             errors:                 {errors}\n\
             host while placing:     {}\n\
             ({} clients for {:.1} s, {})",
            self.orders_placed,
            self.orders_completed,
            self.completed_per_sec,
            p(&self.place_latency_ms),
            match self
                .place_max_ms_by_second
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
            {
                Some((second, ms)) => format!(
                    "{second} s in, its slowest placement {ms:.2} ms{}",
                    match self.host_by_second.get(second) {
                        Some(h) => format!(
                            " (that second {:.0}% busy, {:.1}% stolen, {:.1}% waiting for I/O)",
                            h.busy_percent, h.steal_percent, h.io_wait_percent
                        ),
                        None => String::new(),
                    }
                ),
                None => "none placed".to_owned(),
            },
            self.end_to_end_latency_ms.p50,
            self.end_to_end_latency_ms.p99,
            self.mypage_lag_ms.p50,
            self.mypage_lag_ms.p99,
            match self.order_service_behind_ms {
                Some(ms) => format!("{ms:.1} ms"),
                None => "none placed".to_owned(),
            },
            match &self.host {
                Some(h) => format!(
                    "{:.1}% of {} cores busy, the bench included; {:.1}% stolen by the hypervisor; \
                     {:.1}% waiting for I/O",
                    h.busy_percent, h.cores, h.steal_percent, h.io_wait_percent
                ),
                None => "unknown (no /proc/stat)".to_owned(),
            },
            self.concurrency,
            self.duration_secs,
            match self.offered_per_sec {
                Some(r) => format!(
                    "open loop at {r} orders/s; placement latency from each order's due time"
                ),
                None => "closed loop".to_owned(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers every `GET /orders/{id}` with `status`,
    /// PLACED for ids starting "stuck", DELIVERED for the rest.
    async fn order_service_stub() -> String {
        use axum::{extract::Path, routing::get};
        let app = axum::Router::new().route(
            "/orders/{id}",
            get(|Path(id): Path<String>| async move {
                let status = if id.starts_with("stuck") {
                    "PLACED"
                } else {
                    "DELIVERED"
                };
                axum::Json(serde_json::json!({ "status": status }))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    /// Orders the order service shows final settle at once; one it never
    /// does is counted as `order_service_not_final` once the time is up.
    #[tokio::test]
    async fn the_order_service_is_read_until_it_shows_the_last_orders_final() {
        let url = order_service_stub().await;
        let client = reqwest::Client::new();
        let shared = Shared::default();
        let ids = ["a".to_owned(), "b".to_owned()];
        let until = Instant::now() + Duration::from_secs(5);
        let behind = settle_at_order_service(&client, &url, &ids, until, &shared).await;
        assert!(
            behind.is_some_and(|d| d < Duration::from_secs(5)),
            "{behind:?}"
        );
        assert!(shared.errors.lock().unwrap().is_empty());

        let ids = ["a".to_owned(), "stuck-1".to_owned(), "stuck-2".to_owned()];
        let until = Instant::now() + Duration::from_millis(300);
        let behind = settle_at_order_service(&client, &url, &ids, until, &shared).await;
        assert!(
            behind.is_some_and(|d| d >= Duration::from_millis(300)),
            "{behind:?}"
        );
        assert_eq!(
            *shared.errors.lock().unwrap(),
            BTreeMap::from([("order_service_not_final".to_owned(), 2)])
        );
        assert_eq!(
            settle_at_order_service(&client, &url, &[], until, &shared).await,
            None
        );
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_bounded() {
        use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_static(v));
            h
        };
        assert_eq!(retry_after(&with("1")), Some(Duration::from_secs(1)));
        assert_eq!(retry_after(&with(" 3 ")), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(&with("86400")), Some(Duration::from_secs(60)));
        assert_eq!(retry_after(&with("Wed, 21 Oct 2015 07:28:00 GMT")), None);
        assert_eq!(retry_after(&with("-1")), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn only_loopback_is_a_target() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:8080/",
            "http://127.0.0.1",
        ] {
            assert!(check_loopback(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8080",
            "http://example.com",
            "http://127.0.0.2.nip.io",
        ] {
            assert!(check_loopback(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn percentiles_are_ordered_and_in_milliseconds() {
        let mut h = histogram();
        for us in 1..=1000u64 {
            h.record(us * 10).unwrap();
        }
        let p = percentiles_ms(&h);
        assert!(p.p50 <= p.p95 && p.p95 <= p.p99 && p.p99 <= p.max);
        assert!((p.p50 - 5.0).abs() < 0.05, "{p:?}");
        assert!((p.max - 10.0).abs() < 0.05, "{p:?}");
        assert_eq!(percentiles_ms(&histogram()).max, 0.0);
    }

    #[test]
    fn an_open_loop_schedule_is_due_at_its_rate_and_ends_at_the_deadline() {
        let start = Instant::now();
        let s = Schedule {
            start,
            per_sec: 1_000.0,
            next: Arc::new(AtomicU64::new(0)),
        };
        let deadline = start + Duration::from_millis(10);
        let due: Vec<Duration> = std::iter::from_fn(|| s.take(deadline))
            .map(|d| d - start)
            .collect();
        assert_eq!(due.len(), 10, "{due:?}");
        for (i, d) in due.iter().enumerate() {
            assert_eq!(*d, Duration::from_millis(i as u64));
        }
        // Exhausted for every client, not only the one that saw the end.
        assert_eq!(s.take(deadline), None);
    }

    #[test]
    fn host_load_is_the_share_of_cpu_time_between_two_readings() {
        let at = |user: u64, idle: u64, iowait: u64, steal: u64| {
            CpuTimes::parse(&format!(
                "cpu  {user} 0 0 {idle} {iowait} 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
            ))
            .unwrap()
        };
        let before = at(1_000, 5_000, 100, 10);
        // 1,000 ticks pass: 700 of work, 200 idle, 50 waiting for I/O, 50 stolen.
        let load = before.until(at(1_700, 5_200, 150, 60)).unwrap();
        assert_eq!(
            load.busy_percent, 75.0,
            "work and steal: neither idle nor I/O wait"
        );
        assert_eq!(load.steal_percent, 5.0);
        assert_eq!(load.io_wait_percent, 5.0);
        assert!(load.cores >= 1);
        assert_eq!(before.until(before), None, "no time passed");
        assert_eq!(CpuTimes::parse("intr 1 2 3"), None);
        assert_eq!(CpuTimes::parse("cpu 1 2 3"), None, "too few fields");
    }
}
