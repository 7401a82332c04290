//! leaktrace against real servers from Debian's packages (`cargo xtask setup` installs
//! them): what a user points it at in production.

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use leaktrace_tests::{Tracer, check_shape, require_root, temp_path};

/// A throwaway PostgreSQL cluster owned by the `postgres` user, in a directory of its
/// own, on a port of its own; stopped and removed on drop.
struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl Cluster {
    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path().join("bin"))
                    .find(|b| b.join("initdb").exists())
            })
            .expect("PostgreSQL is required (cargo xtask setup installs Debian's postgresql)");
        let dir = temp_path("pg");
        std::fs::create_dir_all(&dir).unwrap();
        let chown = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(chown.success());
        // Ports 20000–29999, one per cluster of this run (the tests run side by side).
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (20_000 + (std::process::id() * 4 + n) % 10_000) as u16;
        let c = Self { dir, bin, port };
        let initdb = c
            .as_postgres(&c.bin.join("initdb"))
            .args(["-A", "trust", "-D"])
            .arg(c.dir.join("data"))
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(initdb.status.success(), "initdb: {initdb:?}");
        let start = c
            .as_postgres(&c.bin.join("pg_ctl"))
            .arg("-D")
            .arg(c.dir.join("data"))
            .arg("-o")
            .arg(format!("-p {} -k {}", c.port, c.dir.display()))
            .arg("-l")
            .arg(c.dir.join("log"))
            .args(["-w", "start"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(
            start.success(),
            "pg_ctl start: {}",
            std::fs::read_to_string(c.dir.join("log")).unwrap_or_default()
        );
        c
    }

    fn as_postgres(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    }

    /// A psql session; its backend's pid comes first.
    fn session(&self) -> Session {
        let mut child = self
            .as_postgres(&self.bin.join("psql"))
            .args(["-X", "-At", "-d", "postgres", "-h"])
            .arg(&self.dir)
            .args(["-p", &self.port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut s = Session {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
            backend: 0,
        };
        s.backend = s.query("select pg_backend_pid();").parse().unwrap();
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    backend: u32,
}

impl Session {
    /// Runs one statement that returns one row of one column.
    fn query(&mut self, sql: &str) -> String {
        writeln!(self.stdin, "{sql}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The brk heap as /proc/PID/maps shows it: its mappings, end to end from the first.
fn heap_mappings(pid: u32) -> Vec<(u64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for l in maps.lines().filter(|l| l.ends_with("[heap]")) {
        let range = l.split_whitespace().next().unwrap();
        let (s, e) = range.split_once('-').unwrap();
        let (s, e) = (
            u64::from_str_radix(s, 16).unwrap(),
            u64::from_str_radix(e, 16).unwrap(),
        );
        if out.last().is_none_or(|&(_, end)| end == s) {
            out.push((s, e));
        }
    }
    out
}

/// A PostgreSQL backend's brk heap is two mappings: the part inherited from the
/// postmaster and what it grew since the fork (the kernel cannot merge them). The glibc
/// heap walk stopped at the first one's end and reported the heap as "changed too fast
/// to walk" (now "could not be walked"), on every backend. It walks the whole heap now, chunk by chunk to its end.
#[test]
fn root_postgres_backend_heap_is_walked_across_its_mappings() {
    require_root();
    let cluster = Cluster::start();
    let mut session = cluster.session();
    // Work that allocates: a sort and a few catalog lookups.
    assert_eq!(
        session.query(
            "select count(*) from (select g from generate_series(1, 50000) g order by g desc) s;"
        ),
        "50000"
    );
    let pid = session.backend;
    let heap = heap_mappings(pid);
    assert!(
        heap.len() >= 2,
        "a backend's heap is more than one mapping: {heap:x?}"
    );
    let start_brk: u64 = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(47 - 3)
        .unwrap()
        .parse()
        .unwrap();
    let end = heap.last().unwrap().1;
    let r = Tracer::start(&["--pid", &pid.to_string(), "--duration", "1"]).wait_report(0);
    check_shape(&r);
    let g = &r["allocator"]["glibc_heaps"];
    assert_eq!(g["unwalkable"], serde_json::json!([]), "{g:#}");
    let main = g["arenas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "main")
        .unwrap_or_else(|| panic!("no main arena: {g:#}"));
    // The walk covered the heap from its start to the break, across the seam.
    assert_eq!(
        main["extent_bytes"].as_u64(),
        Some(end - start_brk),
        "{main:#}"
    );
    assert!(main["in_use_chunks"].as_u64().unwrap() > 1000, "{main:#}");
    let text = r["verdict"].to_string();
    assert!(!text.contains("could not be walked"), "{text}");
    drop(session);
}

/// Debian's redis-server in the foreground on a port of its own (from `base` up),
/// nothing saved; ready once it says so; killed on drop.
struct Redis {
    child: Child,
    port: String,
}

impl Redis {
    fn start(base: u32) -> Self {
        let server = std::path::Path::new("/usr/bin/redis-server");
        assert!(
            server.exists(),
            "redis is required (cargo xtask setup installs Debian's redis-server)"
        );
        let port = (base + std::process::id() % 10_000).to_string();
        let mut child = Command::new(server)
            .args(["--port", &port, "--save", "", "--appendonly", "no"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("Ready to accept connections") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "redis exited");
        }
        Self { child, port }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's redis (on jemalloc): `/usr/bin/redis-server` is a link to `redis-check-rdb`,
/// and the frames said "in redis-check-rdb", a program the user never ran. They name
/// redis-server now, and objects with unnamed frames are listed once, with the file's
/// real name, its build id and its package.
#[test]
fn root_redis_frames_name_the_program_as_started() {
    require_root();
    let redis = Redis::start(30_000);
    let port = redis.port.clone();
    let pid = redis.child.id().to_string();
    let mut tracer = Tracer::start(&["--pid", &pid, "--duration", "3", "--top", "5"]);
    let bench = Command::new("redis-benchmark")
        .args([
            "-p", &port, "-t", "set", "-n", "20000", "-r", "100000", "-d", "64", "-q",
        ])
        .output()
        .unwrap();
    assert!(bench.status.success(), "{bench:?}");
    let r = tracer.wait_report(0);
    drop(redis);
    check_shape(&r);
    let modules: Vec<&str> = r["heap"]["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["frames"].as_array().unwrap())
        .filter_map(|f| f["module"].as_str())
        .collect();
    assert!(
        modules.contains(&"/usr/bin/redis-server"),
        "frames in redis-server: {modules:?}"
    );
    assert!(
        !modules.iter().any(|m| m.ends_with("redis-check-rdb")),
        "{modules:?}"
    );
    // Named in redis's own code: the stacks of the keys just set run through its reader.
    let functions: Vec<&str> = r["heap"]["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["frames"].as_array().unwrap())
        .filter_map(|f| f["function"].as_str())
        .collect();
    assert!(functions.contains(&"readQueryFromClient"), "{functions:?}");
    for u in r["stacks"]["unnamed_objects"].as_array().unwrap() {
        if u["object"] == "/usr/bin/redis-check-rdb" {
            assert_eq!(u["run_as"], "/usr/bin/redis-server", "{u}");
            assert_eq!(u["package"], "redis-tools", "{u}");
            assert_eq!(u["build_id"].as_str().map(str::len), Some(40), "{u}");
        }
    }
}

/// `--follow-forks` on the postmaster: its background processes are followed from
/// attach, a backend forked for a new connection is followed from its fork (its
/// queries' allocations in its own section, not the postmaster's), and its exit when
/// the connection closes is noted.
#[test]
fn root_postgres_backends_are_followed_from_the_postmaster() {
    require_root();
    let cluster = Cluster::start();
    let postmaster: u32 = std::fs::read_to_string(cluster.dir.join("data/postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let at_attach = leaktrace_tests::children(postmaster);
    assert!(!at_attach.is_empty(), "the postmaster has children");
    let mut tracer = Tracer::start(&[
        "--pid",
        &postmaster.to_string(),
        "--follow-forks",
        "--duration",
        "6",
    ]);
    let mut session = cluster.session();
    let backend = session.backend;
    tracer.wait_stderr(&format!("following pid {backend} (forked by {postmaster})"));
    assert_eq!(
        session.query("select count(*) from (select g, md5(g::text) from generate_series(1, 20000) g order by 2) s;"),
        "20000"
    );
    drop(session);
    // The backend exits when its client goes.
    while std::path::Path::new(&format!("/proc/{backend}")).exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let r = tracer.wait_report(0);
    check_shape(&r);
    let f = &r["follow"];
    let procs = f["processes"].as_array().unwrap();
    for pid in &at_attach {
        let p = procs
            .iter()
            .find(|p| p["pid"] == *pid)
            .unwrap_or_else(|| panic!("background process {pid} followed: {f:#}"));
        assert_eq!(p["forked_while_traced"], false, "{p}");
        assert!(
            p["command"].as_str().unwrap().starts_with("postgres: "),
            "{p}"
        );
    }
    let b = procs
        .iter()
        .find(|p| p["pid"] == backend)
        .unwrap_or_else(|| panic!("the backend is followed: {f:#}"));
    assert_eq!(b["forked_while_traced"], true);
    assert_eq!(b["parent"], postmaster);
    assert_eq!(b["ended"], "exited", "{b}");
    // A sort of 20000 rows: thousands of its own allocations (when its entry probes
    // were attached before its return probes, one call in between left an entry in
    // flight, and every later call looked nested in it: 0 allocations, all its frees).
    assert!(
        b["activity"]["allocs"].as_u64().unwrap() >= 1000,
        "its query's allocations are its own: {}",
        b["activity"]
    );
    assert_eq!(r["lost_total"], 0, "{:#}", r["lost"]);
    assert_eq!(f["not_followed"], serde_json::json!([]), "{f:#}");
    assert_eq!(
        f["totals"]["processes"].as_u64(),
        Some(1 + procs.len() as u64)
    );
    drop(cluster);
}

/// The requests per second `redis-benchmark` reports for SETs against `port`.
fn redis_set_rps(port: &str) -> f64 {
    let out = Command::new("redis-benchmark")
        .args([
            "-p", port, "-t", "set", "-n", "60000", "-r", "1000000", "-d", "64", "-c", "20",
            "--csv",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps",…  then  "SET","81234.56",…
    text.lines()
        .find(|l| l.starts_with("\"SET\""))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no SET rate in {text}"))
}

/// The probe cost leaktrace reports on a busy redis is the one the server pays: the
/// report said 70089% while redis ran 10× slower (1015%). Measured side by side: the
/// same benchmark untraced, then traced; the reported cost must be within a factor of
/// three of the slowdown measured (the benchmark alone varies by ±20% here).
#[test]
fn root_redis_cost_is_the_measured_one() {
    require_root();
    let redis = Redis::start(40_000);
    let port = redis.port.clone();
    let untraced = redis_set_rps(&port);
    let mut tracer = Tracer::start(&["--pid", &redis.child.id().to_string(), "--duration", "5"]);
    let traced = redis_set_rps(&port);
    let r = tracer.wait_report(0);
    drop(redis);
    let measured = (untraced / traced - 1.0) * 100.0;
    let o = &r["overhead"];
    let reported = o["projected_pct"].as_f64().unwrap();
    eprintln!(
        "redis SET: {untraced:.0} req/s untraced, {traced:.0} traced: {measured:.0}% slower; reported {reported:.0}%"
    );
    assert!(
        measured > 10.0,
        "tracing every call costs redis something: {untraced} vs {traced}"
    );
    assert!(
        reported > measured / 3.0 && reported < measured * 3.0,
        "reported {reported:.0}% against {measured:.0}% measured: {o:#}"
    );
}

/// memcached filling its slabs (1 MiB pages, mapped by malloc) in the first seconds and
/// then holding: the verdict's figures agree with each other and with the timeline. The
/// report said "anonymous RSS +121.5 MiB over 12.0 s (1.0 MiB → 153.2 MiB)" (growth
/// measured from the median of the first tenth, amid the fill), and earlier runs said
/// the live heap failed to explain growth it explained, or counted bytes twice.
#[test]
fn root_memcached_fill_then_hold_figures_agree() {
    require_root();
    let server = std::path::Path::new("/usr/bin/memcached");
    assert!(
        server.exists(),
        "memcached is required (cargo xtask setup installs Debian's memcached)"
    );
    let port = (50_000 + std::process::id() % 10_000).to_string();
    let mut mc = Command::new(server)
        .args([
            "-u",
            "nobody",
            "-m",
            "512",
            "-p",
            &port,
            "-U",
            "0",
            "-t",
            "2",
            "-l",
            "127.0.0.1",
        ])
        .spawn()
        .unwrap();
    // Ready when it accepts connections.
    let addr = format!("127.0.0.1:{port}");
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            t0.elapsed().as_secs() < 20,
            "memcached never listened on {addr}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut tracer = Tracer::start(&["--pid", &mc.id().to_string(), "--duration", "10"]);
    let slap = Command::new("memcslap")
        .args(["-s", &addr, "-t", "set", "-c", "4", "-e", "50000"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(slap.success());
    let r = tracer.wait_report(0);
    let _ = mc.kill();
    let _ = mc.wait();
    check_shape(&r);
    let v = &r["verdict"];
    let evidence = |metric: &str| {
        v["evidence"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["metric"] == metric)
            .and_then(|e| e["value"].as_f64())
            .unwrap_or_else(|| panic!("no {metric} in {v:#}"))
    };
    let tl = r["timeline"].as_array().unwrap();
    let anon = |p: &serde_json::Value| p["rss"]["anon_bytes"].as_f64().unwrap();
    let seen = anon(tl.last().unwrap()) - anon(&tl[0]);
    let rss_growth = evidence("rss_anon_growth_bytes");
    let heap_growth = evidence("live_heap_growth_bytes");
    assert!(seen > 100e6, "the slabs filled: {seen}");
    assert!(
        (rss_growth - seen).abs() <= 0.05 * seen,
        "the growth reported ({rss_growth}) is the growth the timeline shows ({seen})"
    );
    let live = r["heap"]["live_bytes"].as_f64().unwrap();
    assert!(
        (heap_growth - live).abs() <= 0.05 * live,
        "the heap grew by what is live since attach: {heap_growth} vs {live}"
    );
    assert!(heap_growth >= 0.9 * rss_growth, "{v:#}");
    assert_eq!(v["kind"], "no-growth", "filled early, then held: {v:#}");
    let summary = v["summary"].as_str().unwrap();
    assert!(!summary.contains("neither"), "{summary}");
    let suspects: f64 = v["suspects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["bytes"].as_f64().unwrap())
        .sum();
    assert!(
        suspects <= 1.05 * rss_growth,
        "each byte once among the suspects: {suspects} of {rss_growth}"
    );
}
