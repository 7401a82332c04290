//! Left running as a service: `--prometheus` scraped by a real Prometheus (Debian's
//! package, installed by `cargo xtask setup`), its figures read back through
//! Prometheus's HTTP API and checked against leaktrace's own report.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use leaktrace_tests::{Fixture, Tracer, require_root, temp_path};
use serde_json::Value;

/// A loopback port free now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` on 127.0.0.1:port (HTTP/1.0): the status code and the body.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// Percent-encodes a query for a URL.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prometheus's instant query: the series' labels and values.
fn query(port: u16, q: &str) -> Vec<(Value, f64)> {
    let Some((200, body)) = get(port, &format!("/api/v1/query?query={}", encode(q))) else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["data"]["result"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|s| {
                    let value = s["value"][1].as_str()?.parse().ok()?;
                    Some((s["metric"].clone(), value))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `q` until `ok` holds for its result (30 s at most).
#[track_caller]
fn until(port: u16, q: &str, ok: impl Fn(&[(Value, f64)]) -> bool) -> Vec<(Value, f64)> {
    let t = Instant::now();
    loop {
        let r = query(port, q);
        if ok(&r) {
            return r;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{q}: {r:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Prometheus {
    child: Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second, its API on a port of its own.
    fn start(target: u16) -> Self {
        let bin = Path::new("/usr/bin/prometheus");
        assert!(
            bin.exists(),
            "Prometheus is missing (cargo xtask setup installs it)"
        );
        let dir = temp_path("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: leaktrace\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        let p = Self { child, dir, port };
        let t = Instant::now();
        while !matches!(get(port, "/-/ready"), Some((200, _))) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "Prometheus never got ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// heap_ops `basic` leaves 500 bytes from leak_malloc and 900 from leak_calloc. A real
/// Prometheus scraping `--prometheus` has those exact bytes per function, the live heap
/// and RSS leaktrace's report states, one verdict kind at 1 (the report's), every loss
/// reason at 0, where RSS goes by kind, and leaktrace's own CPU and RSS.
#[test]
fn root_prometheus_scrapes_the_metrics() {
    require_root();
    let mut fx = Fixture::spawn("heap_ops", &["basic"]);
    let pid = fx.pid.to_string();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let tracer = Tracer::start(&["--pid", &pid, "--prometheus", &addr, "--interval", "0.5"]);
    fx.run_scenario();
    // The endpoint itself: OpenMetrics text, 404 elsewhere.
    let (code, text) = get(port, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200);
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(
        text.contains("# TYPE leaktrace_heap_live_bytes gauge"),
        "{text}"
    );
    assert_eq!(get(port, "/nothing").map(|r| r.0), Some(404));

    let prom = Prometheus::start(port);
    let p = prom.port;
    let by_function = |f: &str, want: f64| {
        until(
            p,
            &format!("leaktrace_stack_live_bytes{{function=\"{f}\"}}"),
            |r| r.len() == 1 && r[0].1 == want,
        )
    };
    let calloc = by_function("leak_calloc", 900.0);
    assert!(
        calloc[0].0["stack"]
            .as_str()
            .is_some_and(|s| s.starts_with("leak_calloc ← main")),
        "{calloc:?}"
    );
    by_function("leak_malloc", 500.0);
    // Bounded: the top 10 stacks at most.
    let stacks = query(p, "leaktrace_stack_live_bytes");
    assert!(!stacks.is_empty() && stacks.len() <= 10, "{stacks:?}");
    assert_eq!(
        query(p, "leaktrace_stack_growth_bytes_per_second").len(),
        stacks.len()
    );
    let losses = until(p, "leaktrace_lost_events_total", |r| !r.is_empty());
    assert!(
        losses.iter().all(|(_, v)| *v == 0.0)
            && losses.iter().any(|(m, _)| m["reason"] == "ringbuf_full"),
        "{losses:?}"
    );
    let verdict = until(p, "leaktrace_verdict == 1", |r| r.len() == 1);
    let file = until(p, "leaktrace_memory_bytes{kind=\"file\"}", |r| r.len() == 1);
    assert!(file[0].1 > 0.0, "{file:?}");
    let cpu = until(p, "leaktrace_cpu_seconds_total", |r| r.len() == 1);
    assert!(cpu[0].1 > 0.0, "{cpu:?}");
    let own = until(p, "leaktrace_resident_bytes", |r| r.len() == 1);
    assert!(own[0].1 > 1e6, "{own:?}");
    // The figures are the report's: the fixture is idle now.
    let live = until(p, "leaktrace_heap_live_bytes", |r| r.len() == 1)[0].1;
    let rss = until(p, "leaktrace_rss_bytes", |r| r.len() == 1)[0].1;
    drop(prom);
    let all = String::from_utf8(tracer.finish_bytes()).expect("JSON Lines");
    let report: Value =
        serde_json::from_str(all.lines().last().expect("a final report")).expect("JSON");
    assert_eq!(live, report["heap"]["live_bytes"].as_f64().unwrap());
    assert!(live >= 1400.0, "{live}");
    assert_eq!(verdict[0].0["kind"], report["verdict"]["kind"]);
    let reported_rss = report["rss"]["rss_bytes"].as_f64().unwrap();
    assert!(
        (rss - reported_rss).abs() <= reported_rss * 0.05,
        "RSS {rss} scraped, {reported_rss} reported"
    );
}

/// tmux's view of a session's pane.
fn pane(session: &str) -> String {
    let out = Command::new("tmux")
        .args(["capture-pane", "-p", "-t", session])
        .output()
        .expect("tmux runs (cargo xtask setup installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the pane shows all of `needles` (60 s at most).
#[track_caller]
fn until_pane(session: &str, needles: &[&str]) -> String {
    let t = Instant::now();
    loop {
        let p = pane(session);
        if needles.iter().all(|n| p.contains(n)) {
            return p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{needles:?} not shown:\n{p}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `--live` in a terminal (tmux), as a user runs it, on a CPython daemon that leaks
/// (Debian's 3.11): the view shows the verdict LEAK and the growing stack by its Python
/// frames; `s` re-sorts, Enter expands the stack to its frames, `q` gives the terminal
/// back, detaches and writes the final report.
#[test]
fn root_live_view_shows_a_growing_leak_and_quits() {
    require_root();
    let mut fx = leaktrace_tests::spawn_debian_python("py_verdict.py", &["leak", "600"]);
    fx.send("go");
    let report = temp_path("live-report.txt");
    let session = format!("leaktrace-live-{}", std::process::id());
    let status = Command::new("tmux")
        .args(["new-session", "-d", "-s", &session, "-x", "160", "-y", "40"])
        .arg(format!(
            "{} --pid {} --live -o {}; echo leaktrace-exit=$?; sleep 60",
            leaktrace_tests::leaktrace_bin().display(),
            fx.pid,
            report.display()
        ))
        .status()
        .expect("tmux runs (cargo xtask setup installs it)");
    assert!(status.success());
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .args(["kill-session", "-t", &self.0])
                .status();
        }
    }
    let _kill = Kill(session.clone());
    let shown = until_pane(
        &session,
        &[
            "VERDICT: LEAK",
            "remember (py_verdict.py:25) ← handle (py_verdict.py:30)",
            "fastest-growing first",
        ],
    );
    assert!(shown.contains("Where RSS goes"), "{shown}");
    Command::new("tmux")
        .args(["send-keys", "-t", &session, "s"])
        .status()
        .unwrap();
    until_pane(&session, &["most live bytes first"]);
    Command::new("tmux")
        .args(["send-keys", "-t", &session, "Enter"])
        .status()
        .unwrap();
    until_pane(&session, &["Stack: ", "leak_worker (py_verdict.py:36)"]);
    Command::new("tmux")
        .args(["send-keys", "-t", &session, "q"])
        .status()
        .unwrap();
    let after = until_pane(&session, &["leaktrace-exit=0"]);
    assert!(
        !after.contains("VERDICT: LEAK  "),
        "the view is gone: {after}"
    );
    let text = std::fs::read_to_string(&report).expect("the final report");
    assert!(text.contains("(quit from the live view)"), "{text}");
    assert!(text.contains("VERDICT: LEAK"), "{text}");
    assert!(fx.alive(), "the target lives on");
    let _ = std::fs::remove_file(&report);
}

/// `--continuous` forgets the stacks that stopped mattering: heap_ops `basic` churns
/// blocks from stacks whose blocks are all freed, which age out (after 1 s here); the
/// leaks' stacks stay with their exact bytes. When the target exits, leaktrace says so
/// and writes the final report.
#[test]
fn root_continuous_ages_out_stacks_and_ends_with_the_target() {
    require_root();
    let mut fx = Fixture::spawn("heap_ops", &["basic"]);
    let pid = fx.pid.to_string();
    let mut tracer = Tracer::start(&[
        "--pid",
        &pid,
        "--continuous",
        "--sample-rate",
        "1",
        "--no-duty-cycle",
        "--age-after",
        "1",
    ]);
    fx.run_scenario();
    // Aging runs every 0.5 s here: the churned stacks are idle for 1 s after the
    // scenario, so 2.5 s covers it.
    std::thread::sleep(Duration::from_millis(2500));
    drop(fx);
    tracer.wait_stderr("target exited");
    let r = tracer.wait_report(0);
    assert!(
        r["end_reason"]
            .as_str()
            .is_some_and(|s| s.starts_with("target exited")),
        "{}",
        r["end_reason"]
    );
    let aged = r["counters"]["stacks_aged_out"].as_u64().unwrap();
    assert!(aged >= 1, "{:#}", r["counters"]);
    assert_eq!(leaktrace_tests::live_bytes_of(&r, "leak_malloc"), Some(500));
    assert_eq!(leaktrace_tests::live_bytes_of(&r, "leak_calloc"), Some(900));
    assert_eq!(r["heap"]["sample_rate_bytes"], 1);
}

/// A metrics address already in use, or a live view without a terminal, is one line
/// on stderr and exit status 2, before anything is attached.
#[test]
fn root_service_options_refuse_bad_input() {
    require_root();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for (args, said) in [
        (
            vec!["--pid", "1", "--prometheus", addr.as_str()],
            format!(
                "leaktrace: cannot serve metrics on {addr}: Address already in use (os error 98)\n"
            ),
        ),
        (
            vec!["--pid", "1", "--live"],
            "leaktrace: --live cannot start: it needs a terminal on stdin and stdout\n".to_owned(),
        ),
    ] {
        let out = Command::new(leaktrace_tests::leaktrace_bin())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), said, "{args:?}");
    }
}
