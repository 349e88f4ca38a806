//! Logs and metrics. Tracing goes to stderr (JSON with `RESTAURANT_LOG_JSON=1`);
//! metrics go to one process-wide Prometheus recorder that every service in
//! the process shares, each series labelled with its service.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Bucket edges, in seconds, of every histogram but the batch sizes.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
];

/// Installs the tracing subscriber; `RUST_LOG` overrides `default_filter`.
pub fn init_tracing(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: try_init fails and we keep the first.
    let _ = builder.try_init();
}

/// The process's Prometheus handle, installing the recorder on first use.
pub fn metrics_handle() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            // Finer between 5 and 25 ms, where the placement tail lies, with
            // its 20 ms bound (docs/benchmarks.md) as an edge: the share of
            // requests within it reads straight off /metrics.
            .set_buckets(&LATENCY_BUCKETS)
            .expect("static buckets are valid")
            // Sizes, not seconds: with the latency buckets every batch
            // above five events fell into +Inf.
            .set_buckets_for_metric(
                Matcher::Suffix("_batch_size".into()),
                &[
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ],
            )
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed (a test harness);
        // then this handle renders nothing, which is acceptable there.
        let _ = metrics::set_global_recorder(recorder);
        spawn_upkeep(handle.clone());
        handle
    })
}

/// How often histogram samples are folded into their buckets when nobody
/// scrapes `/metrics`.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A histogram keeps every sample recorded until it is folded into its
/// buckets, which rendering does, and so does `run_upkeep`; a recorder
/// built with `build_recorder` (ours: it is served on our own routes)
/// gets no task that calls it. Unscraped, the embedded process grew by
/// ~0.8 MiB a second at 3,000 orders/s (101 MiB after 30 s, 317 MiB after
/// 270 s; twenty-fifth session), and every service process would have
/// passed 30 MB in time. A thread, not a task: the handle is made before
/// any runtime, and some callers have none.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no metrics upkeep thread: histograms grow until scraped");
    }
}

pub fn render_metrics() -> String {
    metrics_handle().render()
}

/// The value of one series as [`render_metrics`] shows it, named with its
/// labels as rendered (`name_count{db="order"}`); `None` while it has none.
/// The first call installs the recorder, which only then keeps what is
/// recorded.
#[cfg(test)]
pub(crate) fn rendered(series: &str) -> Option<f64> {
    render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[cfg(test)]
mod tests {
    /// Histograms are folded into their buckets by a thread of their own,
    /// whether or not anyone scrapes.
    #[cfg(target_os = "linux")]
    #[test]
    fn histograms_have_one_upkeep_thread() {
        super::metrics_handle();
        super::metrics_handle();
        let upkeep_threads = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim() == "metrics-upkeep")
                .count()
        };
        // A thread names itself once it runs, a moment after its spawn.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut upkeep = upkeep_threads();
        while upkeep == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            upkeep = upkeep_threads();
        }
        assert_eq!(
            upkeep, 1,
            "one upkeep thread, however often the handle is taken"
        );
    }

    /// A latency lands in the bucket its edges say, 20 ms among them.
    #[test]
    fn latencies_are_bucketed_around_the_placement_bound() {
        super::metrics_handle();
        metrics::histogram!("telemetry_test_seconds").record(0.018);
        let bucket =
            |le: &str| super::rendered(&format!("telemetry_test_seconds_bucket{{le=\"{le}\"}}"));
        let text = super::render_metrics();
        assert_eq!(bucket("0.015"), Some(0.0), "{text}");
        assert_eq!(bucket("0.02"), Some(1.0), "{text}");
        assert_eq!(bucket("0.0075"), Some(0.0), "{text}");
    }
}
