//! Counters per app, rendered in the Prometheus text format on `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

/// A cumulative histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// What one app counts.
#[derive(Debug, Default)]
pub struct AppMetrics {
    /// Connections accepted.
    pub requests: AtomicU64,
    /// Connections dropped (no instance within the deadline).
    pub failed: AtomicU64,
    /// Instances restored from the snapshot.
    pub restores: AtomicU64,
    /// Instances stopped for idleness or removal.
    pub kills: AtomicU64,
    /// Instances found dead (crashed or killed from outside).
    pub crashes: AtomicU64,
    /// Of those, killed by the OOM killer at their cgroup's memory limit.
    pub oom_kills: AtomicU64,
    /// Of those, killed by their seccomp filter.
    pub seccomp_kills: AtomicU64,
    /// Idle instances of apps with volumes suspended to disk.
    pub suspends: AtomicU64,
    /// Snapshots taken again by a cold boot, because the app's volumes
    /// had moved on since the last one.
    pub cold_boots: AtomicU64,
    /// Why the last one died.
    pub last_death: std::sync::Mutex<Option<String>>,
    /// How the last instance started (restored, or booted cold).
    pub last_start: std::sync::Mutex<Option<String>>,
    /// Connection accepted → handed to a freshly restored instance.
    pub wake_latency: Histogram,
    /// The VMM's `restore` command → its vCPUs running, as it reports it.
    pub restore_latency: Histogram,
    /// vCPUs running → the guest agent applied `RESTORED` (clock, RNG).
    pub resume_ack_latency: Histogram,
}

impl AppMetrics {
    /// Counts a restored instance and its restore's timings.
    pub fn restored(&self, instance: &crate::instance::Instance) {
        self.restores.fetch_add(1, Ordering::Relaxed);
        self.restore_latency.observe(instance.restored_in);
        self.resume_ack_latency.observe(instance.resumed_in);
    }
}

/// A histogram's name, help text and getter.
type Histo = (&'static str, &'static str, fn(&AppMetrics) -> &Histogram);

/// A counter's name, help text and getter.
type Counter = (&'static str, &'static str, fn(&AppMetrics) -> u64);

/// One app's line set: name, counters, running instances.
pub struct Sample<'a> {
    /// The app.
    pub app: &'a str,
    /// Its counters.
    pub metrics: &'a AppMetrics,
    /// Instances running now.
    pub instances: usize,
}

/// The Prometheus text exposition of `samples`.
///
/// ```
/// use platform::metrics::{render, AppMetrics, Sample};
/// let m = AppMetrics::default();
/// m.wake_latency.observe(std::time::Duration::from_millis(3));
/// let text = render(&[Sample { app: "web", metrics: &m, instances: 1 }]);
/// assert!(text.contains("little_instances{app=\"web\"} 1"));
/// assert!(text.contains("little_wake_seconds_bucket{app=\"web\",le=\"0.005\"} 1"));
/// ```
pub fn render(samples: &[Sample<'_>]) -> String {
    let mut out = String::new();
    let counters: [Counter; 9] = [
        ("little_requests_total", "Connections accepted.", |m| {
            m.requests.load(Ordering::Relaxed)
        }),
        (
            "little_failed_total",
            "Connections dropped without an instance.",
            |m| m.failed.load(Ordering::Relaxed),
        ),
        (
            "little_restores_total",
            "Instances restored from the snapshot.",
            |m| m.restores.load(Ordering::Relaxed),
        ),
        (
            "little_kills_total",
            "Instances stopped (idle or removed).",
            |m| m.kills.load(Ordering::Relaxed),
        ),
        ("little_crashes_total", "Instances found dead.", |m| {
            m.crashes.load(Ordering::Relaxed)
        }),
        (
            "little_oom_kills_total",
            "Instances killed at their cgroup's memory limit.",
            |m| m.oom_kills.load(Ordering::Relaxed),
        ),
        (
            "little_suspends_total",
            "Idle instances of apps with volumes suspended to disk.",
            |m| m.suspends.load(Ordering::Relaxed),
        ),
        (
            "little_cold_boots_total",
            "Cold boots of an app whose volumes moved on since its snapshot.",
            |m| m.cold_boots.load(Ordering::Relaxed),
        ),
        (
            "little_seccomp_kills_total",
            "Instances killed by their seccomp filter.",
            |m| m.seccomp_kills.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for s in samples {
            let _ = writeln!(out, "{name}{{app=\"{}\"}} {}", s.app, get(s.metrics));
        }
    }
    let _ = writeln!(
        out,
        "# HELP little_instances Instances running.\n# TYPE little_instances gauge"
    );
    for s in samples {
        let _ = writeln!(out, "little_instances{{app=\"{}\"}} {}", s.app, s.instances);
    }
    let histograms: [Histo; 3] = [
        (
            "little_wake_seconds",
            "Connection accepted to handed to a restored instance.",
            |m| &m.wake_latency,
        ),
        (
            "little_restore_seconds",
            "The VMM's restore command to its vCPUs running.",
            |m| &m.restore_latency,
        ),
        (
            "little_agent_resumed_seconds",
            "A restored instance's vCPUs running to its guest agent having set the clock and reseeded the RNG (before its first connection).",
            |m| &m.resume_ack_latency,
        ),
    ];
    for (name, help, get) in histograms {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for s in samples {
            render_histogram(&mut out, name, s.app, get(s.metrics));
        }
    }
    out
}

/// One app's series of histogram `name`.
fn render_histogram(out: &mut String, name: &str, app: &str, h: &Histogram) {
    for (bound, count) in LATENCY_BUCKETS.iter().zip(&h.counts) {
        let _ = writeln!(
            out,
            "{name}_bucket{{app=\"{app}\",le=\"{bound}\"}} {}",
            count.load(Ordering::Relaxed)
        );
    }
    let count = h.count.load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{{app=\"{app}\",le=\"+Inf\"}} {count}");
    // Microseconds to seconds for display only.
    #[allow(clippy::cast_precision_loss)]
    let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
    let _ = writeln!(out, "{name}_sum{{app=\"{app}\"}} {sum}");
    let _ = writeln!(out, "{name}_count{{app=\"{app}\"}} {count}");
}
