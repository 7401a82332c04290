//! `--follow-forks`: a pre-fork server's workers, those alive at attach and those
//! forked while traced, each with its own books; exits and execs noted.

use leaktrace_tests::{Fixture, Tracer, check_shape, functions, require_root};
use serde_json::Value;

/// The bytes and blocks on the stacks through `function` in `heap`.
fn at(heap: &Value, function: &str) -> (u64, u64) {
    heap["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| functions(s).iter().any(|f| f == function))
        .fold((0, 0), |(b, n), s| {
            (
                b + s["live_bytes"].as_u64().unwrap(),
                n + s["live_allocations"].as_u64().unwrap(),
            )
        })
}

fn pid_after(line: &str, prefix: &str) -> u32 {
    line.strip_prefix(prefix)
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("expected `{prefix}<pid>`, got {line:?}"))
}

/// The fixture's master, a worker forked before attach, and three forked while
/// traced: one that leaks, one that leaks and exits, one that execs `cat`. Each
/// process's section holds exactly its own blocks; the master's none of theirs.
#[test]
fn root_follow_forks_gives_each_worker_its_books() {
    require_root();
    let mut fx = Fixture::spawn("prefork", &[]);
    let first = leaktrace_tests::children(fx.pid);
    assert_eq!(first.len(), 1, "one worker before attach: {first:?}");
    let first = first[0];
    let mut tracer = Tracer::start(&["--pid", &fx.pid.to_string(), "--follow-forks", "--top", "5"]);
    tracer.wait_stderr(&format!("following pid {first} "));
    fx.send("go");
    fx.expect_line("leaked");

    fx.send("fork");
    let worker = pid_after(&fx.read_line(), "forked ");
    // Its probes are attached when leaktrace says so; only then may it allocate.
    tracer.wait_stderr(&format!("following pid {worker} "));
    fx.send(&format!("work {worker}"));
    fx.expect_line("worked");

    fx.send("fork");
    let leaver = pid_after(&fx.read_line(), "forked ");
    tracer.wait_stderr(&format!("following pid {leaver} "));
    fx.send(&format!("exit {leaver}"));
    fx.expect_line("exited");

    fx.send("exec");
    let execer = pid_after(&fx.read_line(), "exec ");
    // Followed before the tracer stops (else its fork is reported as "forked as
    // tracing ended", which is right, but not this test's case).
    tracer.wait_stderr(&format!("following pid {execer} "));
    // The exec is done when the process runs cat.
    while std::fs::read_link(format!("/proc/{execer}/exe")).map_or(true, |p| !p.ends_with("cat")) {
        std::thread::yield_now();
    }
    let r = tracer.finish();
    check_shape(&r);

    assert_eq!(at(&r["heap"], "master_leak"), (5000, 5), "{:#}", r["heap"]);
    assert_eq!(
        at(&r["heap"], "worker_leak"),
        (0, 0),
        "workers' blocks are theirs"
    );
    let f = &r["follow"];
    let procs = f["processes"].as_array().unwrap();
    let proc_ = |pid: u32| {
        procs
            .iter()
            .find(|p| p["pid"] == pid)
            .unwrap_or_else(|| panic!("pid {pid} followed: {f:#}"))
    };
    assert_eq!(procs.len(), 4, "{f:#}");

    let p = proc_(first);
    assert_eq!(p["forked_while_traced"], false);
    assert_eq!(p["parent"], fx.pid);
    assert_eq!(at(&p["heap"], "worker_leak"), (6000, 3), "{p:#}");
    assert_eq!(p["ended"], Value::Null);

    let p = proc_(worker);
    assert_eq!(p["forked_while_traced"], true);
    assert_eq!(at(&p["heap"], "worker_leak"), (8000, 4), "{p:#}");
    assert_eq!(p["ended"], Value::Null);

    let p = proc_(leaver);
    assert_eq!(at(&p["heap"], "worker_leak"), (2000, 1), "{p:#}");
    assert_eq!(p["ended"], "exited", "{p:#}");

    let p = proc_(execer);
    let ended = p["ended"].as_str().unwrap_or_else(|| panic!("{p:#}"));
    assert!(
        ended.starts_with("exec'd another program (") && ended.contains("cat"),
        "{ended}"
    );

    // Nothing lost, in any process's books or the kernel's.
    for p in procs {
        assert_eq!(p["lost"], serde_json::json!({}), "{p:#}");
    }
    assert_eq!(r["lost_total"], 0, "{:#}", r["lost"]);
    let t = &f["totals"];
    assert_eq!(t["processes"], 5, "{t}");
    assert_eq!(t["alive"], 3, "{t}");
    assert_eq!(t["live_bytes"], 5000 + 6000 + 8000, "{t}");
    drop(fx);
}
