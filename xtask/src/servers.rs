//! Real servers in `cargo xtask bench`: redis on jemalloc (SET and GET), the CPython json
//! loop, and nginx on glibc malloc, each untraced, under leaktrace attached with `--pid`
//! (exact, and `--sample-rate 512K`), and under the naive bpftrace memleak script
//! (`bench/memleak.bt`) probing the allocator library the server has mapped.
//!
//! Each server is started once and measured over fixed windows, in interleaved rounds
//! (untraced, exact, sampled, bpftrace, repeat); each share is the median traced
//! throughput over the median untraced one of the same rounds. A tracer is attached
//! before its window (it printed `leaktrace: tracing pid`, or bpftrace its `attached`)
//! and stopped with SIGINT after it, as a user would; leaktrace writes its JSON report
//! with `-o`, which is checked for losses and read for the sampled mode's duty cycle.
//! Once per workload, `leaktrace --dry-run` counts the allocator calls per operation.
//! docs/bench.md has the method and the figures.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Rounds, window length, and whether the extras (warm-up window, dry runs, redis GET with
/// its pre-populated keyspace) run. `--quick` runs one short round, so the harness can't rot.
#[derive(Clone, Copy)]
struct Plan {
    rounds: usize,
    secs: u64,
    full: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Untraced,
    Exact,
    Sampled,
    Bpftrace,
    /// Count-only probes, once per workload, for the allocator call rates.
    DryRun,
}

impl Tool {
    fn label(self) -> &'static str {
        match self {
            Self::Untraced => "untraced",
            Self::Exact => "leaktrace --pid (exact)",
            Self::Sampled => "leaktrace --pid --sample-rate 512K",
            Self::Bpftrace => "bpftrace memleak.bt",
            Self::DryRun => "leaktrace --pid --dry-run",
        }
    }
}

/// Reads a pipe line by line on a thread, so it never fills, and lets the caller wait for
/// a line with a timeout.
struct Lines {
    rx: mpsc::Receiver<String>,
    recent: Vec<String>,
}

impl Lines {
    fn spawn<R: Read + Send + 'static>(r: R) -> Self {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            recent: Vec::new(),
        }
    }

    fn keep(&mut self, line: String) {
        if self.recent.len() == 20 {
            self.recent.remove(0);
        }
        self.recent.push(line);
    }

    /// The first line `want` accepts, within `timeout`.
    fn until(&mut self, timeout: Duration, want: impl Fn(&str) -> bool) -> Result<String> {
        let end = Instant::now() + timeout;
        loop {
            match self
                .rx
                .recv_timeout(end.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    let hit = want(&line);
                    self.keep(line.clone());
                    if hit {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "nothing expected within {timeout:?}; last lines: {}",
                        self.tail()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("the pipe closed first; last lines: {}", self.tail())
                }
            }
        }
    }

    fn tail(&mut self) -> String {
        while let Ok(line) = self.rx.try_recv() {
            self.keep(line);
        }
        if self.recent.is_empty() {
            "(none)".into()
        } else {
            self.recent.join(" | ")
        }
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= end {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid of our own child (or, negated, its process group).
    unsafe { libc::kill(pid as i32, sig) };
}

/// A server process we started, in a process group of its own, ended with that group
/// (nginx's workers too) when dropped: SIGTERM, then SIGKILL after 10 s.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .process_group(0)
            .spawn()
            .with_context(|| format!("failed to start {cmd:?}"))?;
        Ok(Self { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().is_ok_and(|s| s.is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let group = self.child.id() as i32;
        signal(-group as u32, libc::SIGTERM);
        if !matches!(
            wait_timeout(&mut self.child, Duration::from_secs(10)),
            Ok(Some(_))
        ) {
            signal(-group as u32, libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Perf events a process holds open (bpftrace attaches each uprobe through one).
fn perf_events(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.as_os_str() == "anon_inode:[perf_event]")
                })
                .count()
        })
        .unwrap_or(0)
}

/// Where a process that does not exit is: each thread's state, wait channel and the
/// top of its kernel stack.
fn where_stuck(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "gone".into();
    };
    let mut out = Vec::new();
    for t in tasks.filter_map(Result::ok) {
        let dir = t.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, r)| r.split_whitespace().next())
            .unwrap_or("?")
            .to_owned();
        let stack: Vec<String> = read("stack")
            .lines()
            .take(4)
            .map(|l| l.split_whitespace().nth(1).unwrap_or(l).to_owned())
            .collect();
        out.push(format!(
            "{} {} {state} wchan {} [{}]",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim(),
            stack.join(" < ")
        ));
    }
    out.join("; ")
}

/// A tracer attached to a running server.
struct Tracer {
    child: Child,
    lines: Lines,
    report: Option<PathBuf>,
    attach_s: f64,
    tool: Tool,
}

impl Tracer {
    /// Starts `tool` on `pid` and returns once it is attached.
    fn attach(tool: Tool, pid: u32, ctx: &Ctx, lib: &Path, report: &Path) -> Result<Self> {
        let t0 = Instant::now();
        let mut cmd;
        let report = match tool {
            Tool::Bpftrace => {
                // The same script with its filter set to the pid (`cpid` needs -c).
                let script = ctx.out.join(format!("memleak-{pid}.bt"));
                let text = std::fs::read_to_string(ctx.bench_dir.join("memleak.bt"))?;
                std::fs::write(&script, text.replace("cpid", &pid.to_string()))?;
                cmd = Command::new("bpftrace");
                cmd.arg("-p").arg(pid.to_string()).arg(&script).arg(lib);
                cmd.stdout(Stdio::piped()).stderr(Stdio::null());
                None
            }
            _ => {
                let _ = std::fs::remove_file(report);
                cmd = Command::new(&ctx.leaktrace);
                cmd.arg("--pid")
                    .arg(pid.to_string())
                    .args(["--format", "json", "-o"])
                    .arg(report);
                match tool {
                    Tool::Sampled => {
                        cmd.args(["--sample-rate", "512K"]);
                    }
                    // It counts until stopped (its default is 5 s).
                    Tool::DryRun => {
                        cmd.args(["--dry-run", "--duration", "3600"]);
                    }
                    _ => {}
                }
                cmd.stdout(Stdio::null()).stderr(Stdio::piped());
                Some(report.to_path_buf())
            }
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("failed to start {}", tool.label()))?;
        let pipe: Box<dyn Read + Send> = match child.stdout.take() {
            Some(out) => Box::new(out),
            None => Box::new(child.stderr.take().context("stderr")?),
        };
        let mut tracer = Self {
            child,
            lines: Lines::spawn(pipe),
            report,
            attach_s: 0.0,
            tool,
        };
        if tool == Tool::Bpftrace {
            // bpftrace runs BEGIN (the script's `attached`) before it has attached the
            // uprobes; they are all in place once it holds one perf event per probe.
            let line = tracer
                .lines
                .until(Duration::from_secs(180), |l| l.starts_with("Attaching "))
                .context("bpftrace did not start attaching")?;
            let probes: usize = line
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("no probe count in {line:?}"))?;
            let end = Instant::now() + Duration::from_secs(180);
            while perf_events(tracer.child.id()) < probes {
                if tracer.child.try_wait()?.is_some() || Instant::now() >= end {
                    bail!(
                        "bpftrace did not attach its {probes} probes; last lines: {}",
                        tracer.lines.tail()
                    );
                }
                thread::sleep(Duration::from_millis(20));
            }
        } else {
            tracer
                .lines
                .until(Duration::from_secs(180), |l| {
                    l.starts_with("leaktrace: tracing pid")
                })
                .with_context(|| format!("{} did not attach", tool.label()))?;
        }
        tracer.attach_s = t0.elapsed().as_secs_f64();
        Ok(tracer)
    }

    /// SIGINT, then the exit and the report. Returns the seconds it took to exit.
    fn stop(mut self) -> Result<(f64, Option<serde_json::Value>)> {
        let t0 = Instant::now();
        signal(self.child.id(), libc::SIGINT);
        let Some(status) = wait_timeout(&mut self.child, Duration::from_secs(120))? else {
            bail!(
                "{} still running 120 s after SIGINT ({}); last lines: {}",
                self.tool.label(),
                where_stuck(self.child.id()),
                self.lines.tail()
            );
        };
        let stop_s = t0.elapsed().as_secs_f64();
        // leaktrace exits 130 when interrupted (after writing its report), bpftrace 0.
        let ok = status.success() || (self.report.is_some() && status.code() == Some(130));
        if !ok {
            bail!(
                "{} exited with {status} after SIGINT; last lines: {}",
                self.tool.label(),
                self.lines.tail()
            );
        }
        let report = match &self.report {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("no report at {}", path.display()))?;
                Some(
                    serde_json::from_str(&text)
                        .with_context(|| format!("report {} is not JSON", path.display()))?,
                )
            }
            None => None,
        };
        Ok((stop_s, report))
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.child.id(), libc::SIGINT);
            if !matches!(
                wait_timeout(&mut self.child, Duration::from_secs(60)),
                Ok(Some(_))
            ) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// A throughput over one window: operations per second, and every operation the load
/// ran while the tracer was attached (for calls per operation).
struct Throughput {
    rate: f64,
    ops: f64,
}

/// A minimal RESP client: one command, one reply.
struct Redis {
    conn: BufReader<TcpStream>,
}

impl Redis {
    fn connect(port: u16) -> Result<Self> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Self {
            conn: BufReader::new(s),
        })
    }

    fn encode(args: &[&[u8]], buf: &mut Vec<u8>) {
        buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            buf.extend_from_slice(a);
            buf.extend_from_slice(b"\r\n");
        }
    }

    fn call(&mut self, args: &[&[u8]]) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        Self::encode(args, &mut buf);
        self.conn.get_mut().write_all(&buf)?;
        let mut line = String::new();
        self.conn.read_line(&mut line)?;
        let line = line.trim_end();
        match line.as_bytes().first() {
            Some(b'+' | b':') => Ok(line.as_bytes()[1..].to_vec()),
            Some(b'$') => {
                let n: usize = line[1..].parse().context("bulk length")?;
                let mut body = vec![0; n + 2];
                self.conn.read_exact(&mut body)?;
                body.truncate(n);
                Ok(body)
            }
            _ => bail!("redis answered {line:?}"),
        }
    }

    /// Calls of one command since the server started (`INFO commandstats`).
    fn calls(&mut self, command: &str) -> Result<f64> {
        let info = self.call(&[b"INFO", b"commandstats"])?;
        let info = String::from_utf8_lossy(&info);
        let prefix = format!("cmdstat_{command}:calls=");
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0.0))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    RedisSet,
    RedisGet,
    Json,
    Http,
}

/// A running server and how to load it.
enum Server {
    Redis {
        proc: Proc,
        port: u16,
        /// A private copy of libjemalloc for redis-benchmark: bpftrace's uprobes are
        /// placed in every process that maps the probed file, whatever its filter, and
        /// the client makes ~7 allocator calls per request of its own.
        client_libs: PathBuf,
    },
    Python {
        proc: Proc,
        stdin: ChildStdin,
        out: Lines,
    },
    Nginx {
        proc: Proc,
        worker: u32,
        port: u16,
        dir: PathBuf,
    },
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Self::Nginx { dir, .. } = self {
            let _ = std::fs::remove_dir_all(&*dir);
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, proc: &mut Proc) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if !proc.alive() {
            bail!("the server exited before listening on port {port}");
        }
        if Instant::now() >= end {
            bail!("nothing listens on port {port} after 30 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The file the process maps whose name contains `needle` (the allocator's library).
fn mapped(pid: u32, needle: &str) -> Result<PathBuf> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            Path::new(p)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().contains(needle))
        })
        .map(PathBuf::from)
        .with_context(|| format!("pid {pid} maps no {needle}"))
}

impl Server {
    fn start_redis(ctx: &Ctx, populate: bool) -> Result<Self> {
        let port = free_port()?;
        let log = std::fs::File::create(ctx.out.join("redis.log"))?;
        let mut proc = Proc::spawn(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        wait_port(port, &mut proc)?;
        let lib = mapped(proc.pid(), "libjemalloc")?;
        let client_libs = ctx.out.join("client-libs");
        std::fs::create_dir_all(&client_libs)?;
        let copy = client_libs.join(lib.file_name().context("library name")?);
        let _ = std::fs::remove_file(&copy);
        std::fs::copy(&lib, &copy)?;
        let mut r = Redis::connect(port)?;
        if populate {
            // Every key redis-benchmark's -r 1000000 names (key:%012d), 64-byte values: SET
            // then overwrites (a steady state) and GET hits.
            let t0 = Instant::now();
            let value = [b'x'; 64];
            for batch in 0..1000 {
                let keys: Vec<String> = (batch * 1000..(batch + 1) * 1000)
                    .map(|i| format!("key:{i:012}"))
                    .collect();
                let mut args: Vec<&[u8]> = vec![b"MSET"];
                for k in &keys {
                    args.push(k.as_bytes());
                    args.push(&value);
                }
                r.call(&args)?;
            }
            let n = r.call(&[b"DBSIZE"])?;
            println!(
                "  redis: {} keys of 64 bytes loaded in {:.1} s",
                String::from_utf8_lossy(&n),
                t0.elapsed().as_secs_f64()
            );
        }
        Ok(Self::Redis {
            proc,
            port,
            client_libs,
        })
    }

    fn start_python(ctx: &Ctx) -> Result<Self> {
        let mut proc = Proc::spawn(
            Command::new("/usr/bin/python3.11")
                .arg(ctx.bench_dir.join("py_json_loop.py"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        )?;
        let stdin = proc.child.stdin.take().context("stdin")?;
        let mut out = Lines::spawn(proc.child.stdout.take().context("stdout")?);
        out.until(Duration::from_secs(30), |l| l == "ready")
            .context("py_json_loop.py did not start")?;
        Ok(Self::Python { proc, stdin, out })
    }

    fn start_nginx() -> Result<Self> {
        let port = free_port()?;
        // Outside target/: the worker runs as nobody and must read the page.
        let dir =
            std::env::temp_dir().join(format!("leaktrace-bench-nginx-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("html"))?;
        // A 1 KiB page.
        let page: String = (0..16).map(|i| format!("{i:>63}\n")).collect();
        std::fs::write(dir.join("html/index.html"), page)?;
        let d = dir.display();
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "worker_processes 1;\n\
                 daemon off;\n\
                 pid {d}/nginx.pid;\n\
                 error_log {d}/error.log;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n\
                 \x20 access_log off;\n\
                 \x20 client_body_temp_path {d}/body;\n\
                 \x20 proxy_temp_path {d}/proxy;\n\
                 \x20 fastcgi_temp_path {d}/fastcgi;\n\
                 \x20 uwsgi_temp_path {d}/uwsgi;\n\
                 \x20 scgi_temp_path {d}/scgi;\n\
                 \x20 server {{ listen 127.0.0.1:{port}; root {d}/html; }}\n\
                 }}\n"
            ),
        )?;
        let mut proc = Proc::spawn(
            Command::new("nginx")
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        wait_port(port, &mut proc)?;
        // The worker (the master's one child) serves every request; it is the one traced.
        let master = proc.pid();
        let end = Instant::now() + Duration::from_secs(10);
        let worker = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
                    .unwrap_or_default();
            if let Some(w) = children
                .split_whitespace()
                .next()
                .and_then(|w| w.parse().ok())
            {
                break w;
            }
            if Instant::now() >= end {
                bail!("nginx started no worker");
            }
            thread::sleep(Duration::from_millis(50));
        };
        Ok(Self::Nginx {
            proc,
            worker,
            port,
            dir,
        })
    }

    /// The process the tracers attach to.
    fn traced(&self) -> u32 {
        match self {
            Self::Redis { proc, .. } | Self::Python { proc, .. } => proc.pid(),
            Self::Nginx { worker, .. } => *worker,
        }
    }

    /// The allocator library the bpftrace script probes: the one the server maps.
    fn allocator(&self) -> Result<PathBuf> {
        match self {
            Self::Redis { .. } => mapped(self.traced(), "libjemalloc"),
            _ => mapped(self.traced(), "libc.so"),
        }
    }

    fn alive(&mut self) -> bool {
        match self {
            Self::Redis { proc, .. } | Self::Python { proc, .. } | Self::Nginx { proc, .. } => {
                proc.alive()
            }
        }
    }

    /// Runs the load for `secs` and measures its throughput.
    fn measure(&mut self, load: Load, secs: u64) -> Result<Throughput> {
        match self {
            Self::Redis {
                port, client_libs, ..
            } => {
                let command = if load == Load::RedisGet { "get" } else { "set" };
                let mut r = Redis::connect(*port)?;
                let before = r.calls(command)?;
                let mut client = Command::new("redis-benchmark")
                    .args(["-p", &port.to_string(), "-t", command, "-n", "1000000000"])
                    .args(["-r", "1000000", "-d", "64", "-c", "20", "-q"])
                    .env("LD_LIBRARY_PATH", &*client_libs)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("failed to start redis-benchmark")?;
                // Connections made and the load running before the window opens.
                thread::sleep(Duration::from_millis(500));
                let window = (|| {
                    if client.try_wait()?.is_some() {
                        bail!("redis-benchmark exited early");
                    }
                    let maps = std::fs::read_to_string(format!("/proc/{}/maps", client.id()))?;
                    if !maps.contains(&*client_libs.to_string_lossy()) {
                        bail!("redis-benchmark does not map the private libjemalloc copy");
                    }
                    let c0 = r.calls(command)?;
                    let t0 = Instant::now();
                    thread::sleep(Duration::from_secs(secs));
                    let c1 = r.calls(command)?;
                    Ok((c1 - c0) / t0.elapsed().as_secs_f64())
                })();
                let _ = client.kill();
                let _ = client.wait();
                let rate = window?;
                let ops = r.calls(command)? - before;
                Ok(Throughput { rate, ops })
            }
            Self::Python { stdin, out, .. } => {
                writeln!(stdin, "run {secs}")?;
                stdin.flush()?;
                let line = out.until(Duration::from_secs(secs + 300), |l| {
                    l.starts_with("result ")
                })?;
                let field = |name: &str| -> Result<f64> {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .and_then(|v| v.parse().ok())
                        .with_context(|| format!("no {name} in {line:?}"))
                };
                let docs = field("docs=")?;
                Ok(Throughput {
                    rate: docs / field("secs=")?,
                    ops: docs,
                })
            }
            Self::Nginx { port, .. } => {
                let out = Command::new("wrk")
                    .args(["-t1", "-c20", &format!("-d{secs}s"), "--timeout", "10s"])
                    .arg(format!("http://127.0.0.1:{port}/index.html"))
                    .stdin(Stdio::null())
                    .output()
                    .context("failed to run wrk")?;
                let text = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() {
                    bail!("wrk failed: {}", text.trim());
                }
                if let Some(l) = text
                    .lines()
                    .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
                {
                    bail!("wrk: {}", l.trim());
                }
                let rate = text
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
                    .and_then(|v| v.trim().parse().ok())
                    .with_context(|| format!("no Requests/sec in wrk's output: {text}"))?;
                let ops = text
                    .lines()
                    .find(|l| l.contains(" requests in "))
                    .and_then(|l| l.split_whitespace().next()?.parse().ok())
                    .with_context(|| format!("no request count in wrk's output: {text}"))?;
                Ok(Throughput { rate, ops })
            }
        }
    }
}

/// What the bench needs besides the workspace.
struct Ctx {
    leaktrace: PathBuf,
    bench_dir: PathBuf,
    /// target/bench/servers: reports, logs, the bpftrace script copies.
    out: PathBuf,
    bpftrace: bool,
}

/// One measurement.
struct Sample {
    rate: f64,
    ops: f64,
    attach_s: Option<f64>,
    stop_s: Option<f64>,
    report: Option<serde_json::Value>,
}

fn measure(
    ctx: &Ctx,
    server: &mut Server,
    load: Load,
    tool: Tool,
    secs: u64,
    report: &Path,
) -> Result<Sample> {
    let tracer = match tool {
        Tool::Untraced => None,
        _ => Some(Tracer::attach(
            tool,
            server.traced(),
            ctx,
            &server.allocator()?,
            report,
        )?),
    };
    let tp = server.measure(load, secs)?;
    let (attach_s, stop_s, report) = match tracer {
        Some(t) => {
            let attach = t.attach_s;
            let (stop, report) = t.stop()?;
            (Some(attach), Some(stop), report)
        }
        None => (None, None, None),
    };
    if !server.alive() {
        bail!("the server died during the measurement");
    }
    Ok(Sample {
        rate: tp.rate,
        ops: tp.ops,
        attach_s,
        stop_s,
        report,
    })
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn si(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.2}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

fn range(v: &[f64], fmt: impl Fn(f64) -> String) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.is_empty() {
        "-".into()
    } else {
        format!("{}–{}", fmt(lo), fmt(hi))
    }
}

struct Workload {
    key: &'static str,
    name: String,
    load: Load,
    unit: &'static str,
    op: &'static str,
}

/// A workload's result, for the summary and the goals.
pub struct Summary {
    key: &'static str,
    unit: &'static str,
    rounds: usize,
    untraced: Option<(f64, String)>,
    shares: BTreeMap<&'static str, f64>,
}

/// Interleaved rounds of one workload on a running server; prints its block.
fn bench_workload(
    ctx: &Ctx,
    server: &mut Server,
    w: &Workload,
    plan: Plan,
    failures: &mut Vec<String>,
) -> Summary {
    let tools: Vec<Tool> = [Tool::Untraced, Tool::Exact, Tool::Sampled, Tool::Bpftrace]
        .into_iter()
        .filter(|&t| t != Tool::Bpftrace || ctx.bpftrace)
        .collect();
    println!();
    println!(
        "{} ({}; {} round{} of {} s per tool, interleaved)",
        w.name,
        w.unit,
        plan.rounds,
        if plan.rounds == 1 { "" } else { "s" },
        plan.secs
    );
    if plan.full {
        // A window the table does not count: caches, connections, the page cache.
        if let Err(e) = server.measure(w.load, plan.secs) {
            println!("  warm-up failed: {e:#}");
        }
    }
    // samples[tool][round]
    let mut samples: Vec<Vec<Option<Sample>>> = tools.iter().map(|_| Vec::new()).collect();
    for round in 0..plan.rounds {
        for (i, &tool) in tools.iter().enumerate() {
            let report = ctx
                .out
                .join(format!("{}-{:?}-{round}.json", w.key, tool).to_lowercase());
            match measure(ctx, server, w.load, tool, plan.secs, &report) {
                Ok(s) => samples[i].push(Some(s)),
                Err(e) => {
                    println!("  round {} {}: failed: {e:#}", round + 1, tool.label());
                    failures.push(format!(
                        "{} under {} (round {})",
                        w.name,
                        tool.label(),
                        round + 1
                    ));
                    samples[i].push(None);
                }
            }
            if !server.alive() {
                failures.push(format!("{}: the server died", w.name));
                println!("  the server died; the remaining rounds are skipped");
                break;
            }
        }
    }
    let rates = |i: usize| -> Vec<f64> { samples[i].iter().flatten().map(|s| s.rate).collect() };
    let base = median(&mut rates(0));
    println!(
        "  {:<38} {:>9} {:>17} {:>6} {:>11} {:>8} {:>8}",
        "tool", "median", "range", "share", "per round", "attach", "stop"
    );
    let mut shares = BTreeMap::new();
    for (i, &tool) in tools.iter().enumerate() {
        let v = rates(i);
        let Some(m) = median(&mut v.clone()) else {
            println!("  {:<38} no measurement", tool.label());
            continue;
        };
        let share = base.map(|b| m / b);
        if let Some(s) = share {
            shares.insert(tool.label(), s);
        }
        // Each round's traced rate over the same round's untraced one.
        let per_round: Vec<f64> = samples[i]
            .iter()
            .zip(&samples[0])
            .filter_map(|(t, u)| Some(t.as_ref()?.rate / u.as_ref()?.rate))
            .collect();
        let secs = |f: fn(&Sample) -> Option<f64>| {
            let mut v: Vec<f64> = samples[i].iter().flatten().filter_map(f).collect();
            median(&mut v).map_or("-".into(), |s| format!("{s:.1} s"))
        };
        println!(
            "  {:<38} {:>9} {:>17} {:>6} {:>11} {:>8} {:>8}",
            if tool == Tool::Bpftrace {
                format!(
                    "{} ({})",
                    tool.label(),
                    server
                        .allocator()
                        .ok()
                        .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
                        .unwrap_or_default()
                )
            } else {
                tool.label().to_owned()
            },
            si(m),
            range(&v, si),
            share.map_or("-".into(), |s| format!("{s:.2}")),
            if tool == Tool::Untraced {
                String::new()
            } else {
                range(&per_round, |r| format!("{r:.2}"))
            },
            secs(|s| s.attach_s),
            secs(|s| s.stop_s),
        );
    }
    for (i, &tool) in tools.iter().enumerate() {
        print_reports(tool, &samples[i], w.op);
    }
    if plan.full {
        let report = ctx.out.join(format!("{}-dryrun.json", w.key));
        match measure(ctx, server, w.load, Tool::DryRun, plan.secs, &report) {
            Ok(s) => print_call_rates(&s, w.op, base),
            Err(e) => {
                println!("  dry run failed: {e:#}");
                failures.push(format!("{} under {}", w.name, Tool::DryRun.label()));
            }
        }
    }
    let untraced = samples[0]
        .iter()
        .flatten()
        .map(|s| s.rate)
        .collect::<Vec<_>>();
    Summary {
        key: w.key,
        unit: w.unit,
        rounds: plan.rounds,
        untraced: base.map(|b| (b, range(&untraced, si))),
        shares,
    }
}

/// What leaktrace's reports over the rounds say: losses, what it recorded per operation,
/// and in sampled mode the duty cycle.
fn print_reports(tool: Tool, samples: &[Option<Sample>], op: &str) {
    let reports: Vec<(&serde_json::Value, f64)> = samples
        .iter()
        .flatten()
        .filter_map(|s| Some((s.report.as_ref()?, s.ops)))
        .collect();
    if reports.is_empty() {
        return;
    }
    let mut lost: BTreeMap<String, u64> = BTreeMap::new();
    let mut per_op = Vec::new();
    let mut nested = Vec::new();
    let mut detached = None;
    for (r, ops) in &reports {
        if let Some(m) = r["lost"].as_object() {
            for (k, v) in m {
                *lost.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
            }
        }
        let a = &r["activity"];
        let events = a["allocs"].as_f64().unwrap_or(0.0) + a["frees"].as_f64().unwrap_or(0.0);
        per_op.push(events / ops.max(1.0));
        nested.push(r["counters"]["nested_call"].as_f64().unwrap_or(0.0) / ops.max(1.0));
        if !r["heap_detached"].is_null() {
            detached = Some(r["heap_detached"].to_string());
        }
    }
    let lost_total: u64 = reports
        .iter()
        .map(|(r, _)| r["lost_total"].as_u64().unwrap_or(0))
        .sum();
    let lost_text = if lost_total == 0 {
        format!("lost_total 0 in all {} reports", reports.len())
    } else {
        let parts: Vec<String> = lost
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        format!(
            "LOSSES: lost_total {lost_total} over {} reports ({})",
            reports.len(),
            parts.join(", ")
        )
    };
    let fmt2 = |v: Option<f64>| v.map_or("-".into(), |m| format!("{m:.2}"));
    print!(
        "  {}: {lost_text}; allocs+frees recorded per {op}: {}",
        tool.label(),
        fmt2(median(&mut per_op))
    );
    if let Some(n) = median(&mut nested).filter(|n| *n >= 0.01) {
        print!(" (and {n:.2} allocator calls made inside another, counted as nested_call)");
    }
    let duty: Vec<&serde_json::Value> = reports
        .iter()
        .map(|(r, _)| &r["heap"]["duty_cycle"])
        .filter(|d| !d.is_null())
        .collect();
    if !duty.is_empty() {
        let f = |k: &str| -> Vec<f64> { duty.iter().filter_map(|d| d[k].as_f64()).collect() };
        let pct = |v: f64| format!("{:.1}%", v * 100.0);
        let always = duty
            .iter()
            .filter(|d| d["frees_always_attached"] == true)
            .count();
        print!(
            "\n    duty cycle: probes attached {} of the time (median {}), {} windows per report, duty now {}, cost while attached {} of the target's CPU, budget {}%; frees attached throughout in {} of {}",
            range(&f("attached_share"), pct),
            median(&mut f("attached_share")).map_or("-".into(), pct),
            range(&f("windows"), |v| format!("{v:.0}")),
            range(&f("duty_now"), |v| format!("{v:.3}")),
            range(&f("cost_when_attached_pct"), |v| format!("{v:.0}%")),
            f("budget_pct")
                .first()
                .map_or("-".into(), |v| format!("{v}")),
            always,
            duty.len()
        );
    } else if tool == Tool::Sampled {
        print!("\n    no duty cycle in the reports (the probes stayed attached)");
    }
    if let Some(d) = detached {
        print!("\n    heap probes detached: {d}");
    }
    println!();
}

/// The allocator call rate, from a dry run's count-only probes over one window.
fn print_call_rates(s: &Sample, op: &str, untraced: Option<f64>) {
    let r = s.report.clone().unwrap_or_default();
    let dur = r["duration_s"].as_f64().unwrap_or(0.0);
    let calls: Vec<(String, f64)> = r["overhead"]["calls_per_s"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_f64()? * dur / s.ops.max(1.0))))
                .filter(|(_, n)| *n >= 0.01)
                .collect()
        })
        .unwrap_or_default();
    let total: f64 = calls.iter().map(|(_, n)| n).sum();
    let parts: Vec<String> = calls.iter().map(|(k, n)| format!("{k} {n:.2}")).collect();
    println!(
        "  allocator calls per {op} (leaktrace --dry-run, count-only probes): {} = {total:.1}; at the untraced median, {} calls/s",
        parts.join(", "),
        untraced.map_or("-".into(), |b| si(b * total))
    );
}

fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let mut t = String::from_utf8_lossy(&o.stdout).into_owned();
            t.push_str(&String::from_utf8_lossy(&o.stderr));
            t.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_else(|| "?".into())
}

fn package_version(pkg: &str) -> String {
    version("dpkg-query", &["-W", "-f", "${Version}", pkg])
}

/// The Debian packages the server rows need, by the binary each provides, where missing.
pub fn missing_packages() -> Vec<&'static str> {
    [
        ("redis-server", "redis-server"),
        ("redis-benchmark", "redis-tools"),
        ("nginx", "nginx"),
        ("wrk", "wrk"),
    ]
    .into_iter()
    .filter(|(bin, _)| which::which(bin).is_err())
    .map(|(_, pkg)| pkg)
    .collect()
}

/// Runs every server workload; returns the summaries and the failures.
pub fn run(workspace: &Path, leaktrace: &Path, quick: bool) -> (Vec<Summary>, Vec<String>) {
    let plan = if quick {
        Plan {
            rounds: 1,
            secs: 1,
            full: false,
        }
    } else {
        Plan {
            rounds: 5,
            secs: 4,
            full: true,
        }
    };
    let mut failures = Vec::new();
    let mut summaries = Vec::new();
    let ctx = Ctx {
        leaktrace: leaktrace.to_path_buf(),
        bench_dir: workspace.join("bench"),
        out: workspace.join("target/bench/servers"),
        bpftrace: which::which("bpftrace").is_ok(),
    };
    if let Err(e) = std::fs::create_dir_all(&ctx.out) {
        return (
            summaries,
            vec![format!("cannot create {}: {e}", ctx.out.display())],
        );
    }
    println!();
    println!("Real servers on loopback, the tracers attached with --pid to the running server:");
    println!(
        "  {}; jemalloc {}; {}; {}; glibc {}; {}; {}",
        version("redis-server", &["--version"]),
        package_version("libjemalloc2"),
        version("nginx", &["-v"]),
        version("/usr/bin/python3.11", &["--version"]),
        package_version("libc6"),
        version("wrk", &["-v"]),
        if ctx.bpftrace {
            version("bpftrace", &["--version"])
        } else {
            "no bpftrace".into()
        }
    );
    if !ctx.bpftrace {
        println!(
            "  note: bpftrace is not installed, so its rows are missing (apt-get install bpftrace)"
        );
    }
    let missing = missing_packages();
    let skip = |what: &str, pkgs: &[&str], failures: &mut Vec<String>| -> bool {
        let gone: Vec<&str> = pkgs
            .iter()
            .copied()
            .filter(|p| missing.contains(p))
            .collect();
        if gone.is_empty() {
            return false;
        }
        println!(
            "  note: {what} rows skipped: {} not installed (the full `cargo xtask bench` installs them)",
            gone.join(" ")
        );
        if !quick {
            failures.push(format!("{what}: {} missing", gone.join(" ")));
        }
        true
    };
    // redis: SET, then GET on the same server and keyspace.
    if !skip("redis", &["redis-server", "redis-tools"], &mut failures) {
        match Server::start_redis(&ctx, plan.full) {
            Ok(mut server) => {
                let redis = version("redis-server", &["--version"]);
                let v = redis
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("v="))
                    .unwrap_or("?")
                    .to_owned();
                let mut loads = vec![("redis-set", "SET", Load::RedisSet)];
                if plan.full {
                    loads.push(("redis-get", "GET", Load::RedisGet));
                }
                for (key, cmd, load) in loads {
                    let w = Workload {
                        key,
                        name: format!(
                            "redis {v} {cmd} on jemalloc: redis-benchmark -t {} -r 1000000 -d 64 -c 20",
                            cmd.to_lowercase()
                        ),
                        load,
                        unit: "req/s",
                        op: "request",
                    };
                    summaries.push(bench_workload(&ctx, &mut server, &w, plan, &mut failures));
                }
            }
            Err(e) => {
                println!("  redis failed to start: {e:#}");
                failures.push(format!("redis: {e:#}"));
            }
        }
    }
    if Path::new("/usr/bin/python3.11").exists() {
        match Server::start_python(&ctx) {
            Ok(mut server) => {
                let w = Workload {
                    key: "python-json",
                    name: "CPython 3.11 (Debian) json.loads(json.dumps(doc)), 200-item doc".into(),
                    load: Load::Json,
                    unit: "docs/s",
                    op: "document",
                };
                summaries.push(bench_workload(&ctx, &mut server, &w, plan, &mut failures));
            }
            Err(e) => {
                println!("  py_json_loop.py failed to start: {e:#}");
                failures.push(format!("python: {e:#}"));
            }
        }
    } else {
        println!("  note: the CPython rows are skipped: no /usr/bin/python3.11");
    }
    if !skip("nginx", &["nginx", "wrk"], &mut failures) {
        match Server::start_nginx() {
            Ok(mut server) => {
                let w = Workload {
                    key: "nginx",
                    name: format!(
                        "{} on glibc malloc, 1 worker: wrk -t1 -c20, a 1 KiB static page, keep-alive",
                        version("nginx", &["-v"]).trim_start_matches("nginx version: ")
                    ),
                    load: Load::Http,
                    unit: "req/s",
                    op: "request",
                };
                summaries.push(bench_workload(&ctx, &mut server, &w, plan, &mut failures));
            }
            Err(e) => {
                println!("  nginx failed to start: {e:#}");
                failures.push(format!("nginx: {e:#}"));
            }
        }
    }
    println!();
    println!("  load average at the end: {}", loadavg());
    (summaries, failures)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The summary table and the issue's done-when figures.
pub fn print_summary(summaries: &[Summary], microbench_ratio: Option<f64>) {
    if summaries.is_empty() {
        return;
    }
    let exact = Tool::Exact.label();
    let sampled = Tool::Sampled.label();
    let bpftrace = Tool::Bpftrace.label();
    println!();
    println!(
        "Real servers: median throughput under each tool / median untraced, same interleaved rounds"
    );
    println!(
        "  {:<14} {:>7} {:>24} {:>7} {:>9} {:>9}",
        "workload", "rounds", "untraced median (range)", "exact", "sampled", "bpftrace"
    );
    let share = |s: &Summary, t: &str| s.shares.get(t).map_or("-".into(), |v| format!("{v:.2}"));
    for s in summaries {
        println!(
            "  {:<14} {:>7} {:>24} {:>7} {:>9} {:>9}",
            s.key,
            s.rounds,
            s.untraced
                .as_ref()
                .map_or("-".into(), |(m, r)| format!("{} ({r}) {}", si(*m), s.unit)),
            share(s, exact),
            share(s, sampled),
            share(s, bpftrace),
        );
    }
    println!("Done-when figures (issue 21):");
    let goal = |key: &str, tool: &str, what: &str, at_least: f64| {
        let got = summaries
            .iter()
            .find(|s| s.key == key)
            .and_then(|s| s.shares.get(tool).copied());
        match got {
            Some(v) => println!(
                "  {what} ≥ {at_least:.2} of untraced: {v:.2} ({})",
                if v >= at_least { "met" } else { "not met" }
            ),
            None => println!("  {what} ≥ {at_least:.2} of untraced: not measured"),
        }
    };
    goal("redis-set", exact, "redis SET under leaktrace", 0.30);
    goal(
        "redis-set",
        sampled,
        "redis SET under --sample-rate 512K",
        0.90,
    );
    goal(
        "python-json",
        exact,
        "CPython json loop under leaktrace",
        0.70,
    );
    goal(
        "python-json",
        sampled,
        "CPython json loop under --sample-rate 512K",
        0.90,
    );
    match microbench_ratio {
        Some(r) => println!(
            "  malloc/free, 1 thread: leaktrace's added cost / bpftrace's ≤ 0.30: {r:.2} ({})",
            if r <= 0.30 { "met" } else { "not met" }
        ),
        None => println!(
            "  malloc/free, 1 thread: leaktrace's added cost / bpftrace's ≤ 0.30: not measured"
        ),
    }
}
