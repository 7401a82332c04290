//! `--prometheus ADDR:PORT`: the run's figures as Prometheus metrics, in the OpenMetrics
//! text format (prometheus-client), served on `/metrics` by hyper.
//!
//! What the books say is refreshed at every tick (the target's RSS, its live heap,
//! leaktrace's own CPU and RSS); what needs the worker's snapshot (where RSS goes, the
//! top stacks, the verdict, the losses) at every report made for the metrics: each
//! `--interval`, else every [`METRICS_EVERY`]. Only the top `--prometheus-top` stacks
//! have series, and a stack that leaves the top loses its series: the cardinality
//! stays bounded however long the run.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{accounting::timeline::Point, analysis::verdict::VerdictKind, report::Report};

/// How often the metrics that need a snapshot are refreshed without `--interval`.
pub const METRICS_EVERY: Duration = Duration::from_secs(15);
/// Connections served at once; more wait in the kernel's backlog.
const CONNECTIONS: usize = 8;
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames named in a stack's `stack` label.
const STACK_FRAMES: usize = 8;
/// A label value's length at most (a hostile target names its own functions).
const LABEL_MAX: usize = 512;

type Labels = Vec<(String, String)>;

/// The metrics, and the text served.
pub struct Metrics {
    registry: Registry,
    rss: Gauge,
    heap_live: Gauge,
    memory: Family<Labels, Gauge>,
    stack_live: Family<Labels, Gauge>,
    stack_growth: Family<Labels, Gauge<f64, AtomicU64>>,
    verdict: Family<Labels, Gauge>,
    lost: Family<Labels, Counter>,
    /// The losses already counted, by reason.
    lost_seen: BTreeMap<String, u64>,
    cpu: Counter<f64, AtomicU64>,
    cpu_seen: f64,
    own_rss: Gauge,
    reports: Counter,
    /// Stacks with series.
    pub top: usize,
    body: Arc<Mutex<String>>,
}

impl Metrics {
    /// Registers the metrics of a run tracing `pid`.
    pub fn new(top: usize, pid: u32) -> Self {
        let mut registry = Registry::default();
        let rss = Gauge::default();
        registry.register(
            "leaktrace_rss_bytes",
            "The traced process's resident memory (RES)",
            rss.clone(),
        );
        let heap_live = Gauge::default();
        registry.register(
            "leaktrace_heap_live_bytes",
            "Heap bytes allocated since attach and not freed (an estimate when sampling)",
            heap_live.clone(),
        );
        let memory = Family::<Labels, Gauge>::default();
        registry.register(
            "leaktrace_memory_bytes",
            "Where the resident memory goes, by kind (smaps, the heaps walked)",
            memory.clone(),
        );
        let stack_live = Family::<Labels, Gauge>::default();
        registry.register(
            "leaktrace_stack_live_bytes",
            "Live heap bytes of the top stacks (function: the innermost named frame)",
            stack_live.clone(),
        );
        let stack_growth = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "leaktrace_stack_growth_bytes_per_second",
            "Growth of the top stacks' live bytes (Theil-Sen slope over the run)",
            stack_growth.clone(),
        );
        let verdict = Family::<Labels, Gauge>::default();
        registry.register(
            "leaktrace_verdict",
            "The verdict: 1 for the current kind, 0 for the others",
            verdict.clone(),
        );
        let lost = Family::<Labels, Counter>::default();
        registry.register(
            "leaktrace_lost_events",
            "Events lost or not attributed, by reason",
            lost.clone(),
        );
        let cpu = Counter::<f64, AtomicU64>::default();
        registry.register(
            "leaktrace_cpu_seconds",
            "leaktrace's own CPU time (user and system)",
            cpu.clone(),
        );
        let own_rss = Gauge::default();
        registry.register(
            "leaktrace_resident_bytes",
            "leaktrace's own resident memory",
            own_rss.clone(),
        );
        let reports = Counter::default();
        registry.register(
            "leaktrace_reports",
            "Reports made for these metrics (each refreshes where RSS goes, the stacks and the verdict)",
            reports.clone(),
        );
        let target = Family::<Labels, Gauge>::default();
        registry.register(
            "leaktrace_target",
            "The traced process (always 1)",
            target.clone(),
        );
        target
            .get_or_create(&vec![("pid".into(), pid.to_string())])
            .set(1);
        let mut m = Self {
            registry,
            rss,
            heap_live,
            memory,
            stack_live,
            stack_growth,
            verdict,
            lost,
            lost_seen: BTreeMap::new(),
            cpu,
            cpu_seen: 0.0,
            own_rss,
            reports,
            top,
            body: Arc::new(Mutex::new(String::new())),
        };
        m.own();
        m.encode();
        m
    }

    /// The text served, shared with the server.
    pub fn body(&self) -> Arc<Mutex<String>> {
        Arc::clone(&self.body)
    }

    /// At each tick: the books' latest sample, and leaktrace's own figures.
    pub fn tick(&mut self, last: Option<&Point>) {
        if let Some(p) = last {
            self.rss.set(gauge(p.rss.rss_bytes));
            self.heap_live.set(gauge(p.live_bytes));
        }
        self.own();
        self.encode();
    }

    /// At each report made for the metrics.
    pub fn report(&mut self, r: &Report) {
        self.rss.set(gauge(r.rss.rss_bytes));
        self.heap_live.set(gauge(r.heap.live_bytes));
        self.memory.clear();
        let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
        for p in &r.memory.parts {
            *by_kind.entry(p.kind.as_str()).or_default() += p.bytes;
        }
        if r.memory.unexplained_bytes > 0 {
            by_kind.insert("unexplained", r.memory.unexplained_bytes);
        }
        for (kind, bytes) in by_kind {
            self.memory
                .get_or_create(&vec![("kind".into(), kind.into())])
                .set(gauge(bytes));
        }
        // The top stacks only: one that left the top loses its series.
        self.stack_live.clear();
        self.stack_growth.clear();
        for s in r
            .heap
            .stacks
            .iter()
            .filter(|s| s.live_bytes > 0)
            .take(self.top)
        {
            let labels = stack_labels(s.stack_id, &s.frames);
            self.stack_live
                .get_or_create(&labels)
                .set(gauge(s.live_bytes));
            self.stack_growth
                .get_or_create(&labels)
                .set(s.growth.as_ref().map_or(0.0, |g| g.bytes_per_s));
        }
        for k in [
            VerdictKind::Leak,
            VerdictKind::Fragmentation,
            VerdictKind::NonHeapGrowth,
            VerdictKind::NoGrowth,
            VerdictKind::Inconclusive,
        ] {
            self.verdict
                .get_or_create(&vec![("kind".into(), k.as_str().into())])
                .set(i64::from(r.verdict.kind == k));
        }
        for (reason, &n) in &r.lost {
            let seen = self.lost_seen.entry(reason.clone()).or_default();
            let c = self
                .lost
                .get_or_create(&vec![("reason".into(), reason.clone())]);
            c.inc_by(n.saturating_sub(*seen));
            *seen = (*seen).max(n);
        }
        self.reports.inc();
        self.own();
        self.encode();
    }

    /// leaktrace's own CPU time and RSS.
    fn own(&mut self) {
        let me = std::process::id();
        if let Some(cpu) = crate::process::procfs::cpu_seconds(me)
            && cpu > self.cpu_seen
        {
            self.cpu.inc_by(cpu - self.cpu_seen);
            self.cpu_seen = cpu;
        }
        if let Ok(st) = crate::process::procfs::read_status(me) {
            self.own_rss.set(gauge(st.rss.rss_bytes));
        }
    }

    fn encode(&self) {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_ok()
            && let Ok(mut b) = self.body.lock()
        {
            *b = text;
        }
    }
}

/// A gauge's value from bytes (saturating: a gauge is an i64).
fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stack's labels: `function`, the frame the verdict names as its suspect (the
/// innermost Python function in a Python stack, else the first named frame outside
/// the allocator), and `stack`, its first frames joined, outermost last; the stack id
/// keeps two stacks with the same names apart.
fn stack_labels(id: i64, frames: &[crate::symbolize::stacks::Frame]) -> Labels {
    let name = |f: &crate::symbolize::stacks::Frame| {
        f.function.clone().unwrap_or_else(|| f.address.clone())
    };
    let function = crate::analysis::verdict::suspect_name(frames);
    let stack = frames
        .iter()
        .take(STACK_FRAMES)
        .map(name)
        .collect::<Vec<_>>()
        .join(" ← ");
    vec![
        ("function".into(), label(&function)),
        ("stack".into(), label(&stack)),
        ("stack_id".into(), id.to_string()),
    ]
}

/// A label value: printable, bounded.
fn label(s: &str) -> String {
    let mut p = crate::units::printable(s);
    if p.len() > LABEL_MAX {
        let mut end = LABEL_MAX;
        while !p.is_char_boundary(end) {
            end -= 1;
        }
        p.truncate(end);
        p.push('…');
    }
    p
}

/// Serves `/metrics` on `listener` until the runtime ends: at most [`CONNECTIONS`] at
/// once, each request's headers within [`HEADER_TIMEOUT`].
pub async fn serve(listener: tokio::net::TcpListener, body: Arc<Mutex<String>>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::debug!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let body = Arc::clone(&body);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| answer(req, Arc::clone(&body)));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            // A whole exchange is bounded too: a client that reads slowly is dropped.
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
            drop(permit);
        });
    }
}

/// One request: `GET /metrics`, or a short page, or an error status.
async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    body: Arc<Mutex<String>>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, Infallible> {
    use hyper::{Method, StatusCode, header};
    let reply = |status: StatusCode, kind: &'static str, text: String| {
        let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(text)));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET /metrics\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            let text = body.lock().map(|b| b.clone()).unwrap_or_default();
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        }
        "/" => reply(
            StatusCode::OK,
            "text/plain",
            "leaktrace: metrics at /metrics\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}
