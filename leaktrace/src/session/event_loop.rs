//! The event loop: drains the ring buffer into the books and dispatches timers,
//! signals, the launched child's stops and the worker's replies. Every arm is
//! short; whatever takes long (symbols, heap walks, Python, unwind tables) is a
//! [`Job`] for the worker thread, so the ring is drained while it runs.

use std::{
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
};
use leaktrace_common::{Event, counter, maps};
use rustc_hash::FxHashMap;
use tokio::{io::unix::AsyncFd, sync::mpsc::UnboundedReceiver};

use crate::{
    accounting::{ledger::Ledger, timeline::Timeline},
    analysis::verdict::{self, Facts},
    error::Error,
    probes::{
        allocators::{Allocator, ProbeSite},
        attach::{self, Attached},
        load::{self, monotonic_ns},
        meter::{self, HeapDetached, Meter, Overhead},
    },
    process::{launch, procfs},
    report::{self, Report, RunFacts, Unwinder},
    session::{
        Config, Format, Outcome,
        output::Output,
        prepare::Prepared,
        worker::{self, Job, Reply, Snapshot, Then},
    },
    symbolize::StackStore,
    unwind::BpfTables,
};

/// How often new stacks are symbolized and RSS is sampled.
const TICK: Duration = Duration::from_millis(250);
/// How often probe hit rates and the target's CPU time are measured.
const BUDGET_EVERY: Duration = Duration::from_secs(1);
/// How often the ring buffer is drained without a wakeup from the kernel.
const DRAIN_EVERY: Duration = Duration::from_millis(10);
/// `--continuous`: the timeline's window (growth is the last hour's).
const CONTINUOUS_WINDOW: Duration = Duration::from_secs(3600);
/// `--continuous`: how often stacks are aged, at most (a stack with nothing live and
/// no event for `Config::age_after` is forgotten).
const AGE_EVERY: Duration = Duration::from_secs(60);
/// `PROT_EXEC` in an mmap event's protection bits.
const PROT_EXEC: u64 = 4;

/// The launched command, as its tracer sees it.
#[derive(Debug, Default)]
struct Child {
    /// SIGURGs sent after it mapped code, already handled.
    exec_stops_seen: u64,
    /// It is stopped until the worker replies (tables loading, or its exit read).
    waiting: bool,
    /// How it ended.
    exit_status: Option<String>,
}

/// The state the event loop keeps on its own thread.
struct Session<'a> {
    config: &'a Config,
    /// Reports list every heap stack (a flamegraph beside a text or JSON report).
    every_stack: bool,
    /// The profiles `--pprof-dir` holds of this run, oldest first.
    pprof_written: Vec<std::path::PathBuf>,
    pid: u32,
    launched: bool,
    /// The books: live blocks and the address space.
    ledger: Ledger,
    /// Totals and per-stack bytes over time.
    timeline: Timeline,
    /// Stacks resolved by the worker.
    stacks: StackStore,
    /// Stack ids seen in events so far.
    /// Stack ids seen in events so far, with the last event's time (CLOCK_MONOTONIC):
    /// `--continuous` forgets those not seen for a while.
    known_stacks: FxHashMap<i64, u64>,
    rss: procfs::Rss,
    /// Threads in the target at the last sample.
    threads: u64,
    attached: Attached,
    sites: Vec<ProbeSite>,
    /// The allocators found, the one serving `malloc` marked.
    allocators: Vec<crate::probes::allocators::Found>,
    /// Why the heap is not traced at all (no allocator recognized).
    heap_not_traced: Option<String>,
    /// Why and when the heap probes were detached by the overhead budget.
    heap_detached: Option<HeapDetached>,
    /// The probes being detached once the run ended.
    detaching: Option<attach::Detaching>,
    /// Tells the user attaching is under way, if it takes a while.
    attaching: Option<super::notice::Notice>,
    /// The followed descendants (`--follow-forks`).
    family: Option<super::follow::Family>,
    /// The target's execs while traced (its books restarted at each).
    execs: Vec<report::ExecNote>,
    /// The trap costs measured while attaching.
    calibrated: Option<Result<crate::probes::calibrate::TrapCosts, Error>>,
    /// The kernel's set of followed pids.
    targets: Option<BpfHashMap<MapData, u32, u32>>,
    /// Latest overhead measurement.
    overhead: Option<Overhead>,
    /// Sampled mode's duty cycle, when the heap probes are attached only for windows.
    duty: Option<super::duty::DutyCycle>,
    unwinder: Unwinder,
    child: Child,
    target_exited: bool,
    started: Instant,
    worker: worker::Handle,
    replies: UnboundedReceiver<Reply>,
    out: Output,
    /// `--record`: the capture being written.
    recorder: Option<crate::capture::Recorder>,
    /// `--prometheus`: the metrics served.
    metrics: Option<super::metrics::Metrics>,
    /// `--live`: the terminal view, and the last snapshot it shows.
    live: Option<super::live::Live>,
    live_snap: Option<(Box<Snapshot>, Instant)>,
}

/// Takes a map out of the loaded object.
fn take_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    what: &'static str,
    make: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, Error> {
    make(ebpf.take_map(name).ok_or(Error::Missing(what))?)
        .map_err(|source| Error::Map { name, source })
}

/// Runs the prepared session to its end.
pub fn run(
    config: &Config,
    p: Prepared,
    out: Output,
    mut recorder: Option<crate::capture::Recorder>,
    listener: Option<std::net::TcpListener>,
    attaching: super::notice::Notice,
) -> Result<Outcome, Error> {
    let Prepared {
        pid,
        objects,
        blocked,
        sites,
        allocators,
        heap_not_traced,
        unwinder,
        mut ebpf,
        attached,
        start_brk,
        brk,
        calibrated,
    } = p;
    // Open the exit notifier before releasing a launched child, so its exit can't be missed.
    let pidfd = open_pidfd(pid);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let unwind = match unwinder {
        Some(u) => {
            let tables = BpfTables::take(&mut ebpf, u.capacity()).map_err(Error::Unwind)?;
            Some((u, tables))
        }
        None => None,
    };
    let unwinder_kind = if !config.capture_stacks {
        Unwinder::Off
    } else if config.copy_stacks {
        Unwinder::StackCopy
    } else if unwind.is_some() {
        Unwinder::Cfi
    } else {
        Unwinder::FramePointers
    };
    let setup = worker::Setup {
        pid,
        launched: blocked.is_some(),
        objects,
        stacks: take_map(&mut ebpf, maps::STACKS, "STACKS map", BpfHashMap::try_from)?,
        py_stacks: take_map(
            &mut ebpf,
            maps::PY_STACKS,
            "PY_STACKS map",
            BpfHashMap::try_from,
        )?,
        py_config: take_map(&mut ebpf, maps::PY_CONFIG, "PY_CONFIG map", Array::try_from)?,
        python_stacks: config.python_stacks,
        unwind,
        announce: config.announce,
        // An allocator leaktrace does not recognize has no heap it can walk. When
        // another allocator serves malloc, glibc's heaps still hold what glibc allocated
        // itself (jemalloc and mimalloc leave the brk heap to it); a brk heap that is
        // the other allocator's (tcmalloc's) does not chain as glibc's and is reported
        // unwalkable.
        walk_heaps: config.walk_heaps && heap_not_traced.is_none(),
        census: config.census,
        reachability: config.reachability,
        heap_owner: allocators
            .iter()
            .find(|f| f.serves_malloc && f.allocator != Allocator::Glibc)
            .map(|f| f.allocator),
        go: allocators.iter().any(|f| f.allocator == Allocator::Go),
        allocators: allocators.clone(),
        debug_dirs: config.debug_dirs.clone(),
    };
    let targets = if config.follow_forks {
        Some(take_map(
            &mut ebpf,
            maps::TARGETS,
            "TARGETS map",
            BpfHashMap::try_from,
        )?)
    } else {
        None
    };
    if let Some(r) = recorder.as_mut() {
        r.start(&crate::capture::Start {
            version: env!("CARGO_PKG_VERSION").into(),
            pid,
            command: match &config.target {
                // Not exec'd yet: its /proc/PID/cmdline is still leaktrace's.
                super::Target::Command(args) => args
                    .iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
                super::Target::Pid(_) => super::follow::command_line(pid),
            },
            unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            start_brk,
            brk,
            sample_rate: u64::from(config.sample_rate),
            launched: blocked.is_some(),
            window_s: config.continuous.then_some(CONTINUOUS_WINDOW.as_secs_f64()),
        });
    }
    let (reply_tx, replies) = tokio::sync::mpsc::unbounded_channel();
    let worker = worker::Handle::start(setup, reply_tx)
        .map_err(|e| Error::Worker(format!("cannot start it: {e}")))?;
    let mut s = Session {
        config,
        every_stack: false,
        pprof_written: Vec::new(),
        pid,
        launched: blocked.is_some(),
        ledger: Ledger::new(start_brk, brk).with_sampling(u64::from(config.sample_rate)),
        timeline: Timeline::with_window(
            config.continuous.then_some(CONTINUOUS_WINDOW.as_secs_f64()),
        ),
        stacks: StackStore::default(),
        known_stacks: FxHashMap::default(),
        rss: procfs::read_status(pid).map(|s| s.rss).unwrap_or_default(),
        threads: 0,
        attached,
        sites,
        allocators,
        heap_not_traced,
        heap_detached: None,
        detaching: None,
        attaching: Some(attaching),
        family: config.follow_forks.then(super::follow::Family::default),
        calibrated: Some(calibrated),
        execs: Vec::new(),
        targets,
        overhead: None,
        duty: None,
        unwinder: unwinder_kind,
        child: Child::default(),
        target_exited: false,
        started: Instant::now(),
        worker,
        replies,
        out,
        recorder,
        metrics: None,
        live: None,
        live_snap: None,
    };
    if let Some(l) = listener {
        let m = super::metrics::Metrics::new(config.prometheus_top, pid);
        let body = m.body();
        s.metrics = Some(m);
        let _guard = rt.enter();
        let l = tokio::net::TcpListener::from_std(l).map_err(Error::Runtime)?;
        rt.spawn(super::metrics::serve(l, body));
    }
    let outcome = rt.block_on(s.event_loop(&mut ebpf, pidfd, blocked));
    match &outcome {
        Ok(_) => s.worker.stop(),
        // A stop while starting: the worker may be reading the target's tables.
        Err(_) => s.worker.abandon(),
    }
    // Ended early (a signal while starting, an error): the probes come out all at once
    // here too, not one by one as `ebpf` is dropped.
    let detaching = match s.detaching.take() {
        Some(d) => d,
        None => {
            let followers: Vec<_> = s
                .family
                .iter_mut()
                .flat_map(|f| f.followers.values_mut())
                .filter_map(|f| f.links.take())
                .collect();
            attach::start_detach(&mut ebpf, &mut s.attached, followers)
        }
    };
    detaching.wait();
    outcome
}

/// The maps the event loop reads itself.
/// Events applied per drain at most (a few milliseconds of work): see [`Session::drain`].
const DRAIN_BUDGET: u32 = 32_768;

struct Maps {
    ring: AsyncFd<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    hits: PerCpuArray<MapData, u64>,
    /// Benchmark of the copy design: the copies are drained and dropped.
    copies: Option<RingBuf<MapData>>,
}

impl Maps {
    fn take(ebpf: &mut Ebpf, copy_stacks: bool) -> Result<Self, Error> {
        let ring = take_map(ebpf, maps::EVENTS, "EVENTS map", RingBuf::try_from)?;
        Ok(Self {
            ring: async_fd(ring)?,
            counters: take_map(ebpf, maps::COUNTERS, "COUNTERS map", PerCpuArray::try_from)?,
            hits: take_map(ebpf, maps::HITS, "HITS map", PerCpuArray::try_from)?,
            copies: if copy_stacks {
                Some(take_map(
                    ebpf,
                    maps::STACK_COPIES,
                    "STACK_COPIES map",
                    RingBuf::try_from,
                )?)
            } else {
                None
            },
        })
    }

    /// The kernel's counters, indexed by `counter::*`.
    fn kernel_counters(&self) -> Vec<u64> {
        (0..counter::COUNT)
            .map(|i| {
                self.counters
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0)
            })
            .collect()
    }
}

impl Session<'_> {
    async fn event_loop(
        &mut self,
        ebpf: &mut Ebpf,
        pidfd: Option<OwnedFd>,
        blocked: Option<launch::Blocked>,
    ) -> Result<Outcome, Error> {
        let mut m = Maps::take(ebpf, self.config.copy_stacks)?;
        // What a trap costs on this machine, measured while attaching (probes on
        // functions of our own).
        let traps = match self
            .calibrated
            .take()
            .unwrap_or_else(|| Err(Error::Worker("trap costs were not measured".into())))
        {
            Ok(t) => {
                log::info!(
                    "trap costs here: {:.2} µs emulated, {:.2} µs single-stepped, {:.2} µs per return",
                    t.emulated_us,
                    t.single_stepped_us,
                    t.return_us
                );
                t
            }
            Err(e @ Error::Stopped { .. }) => return Err(e),
            Err(e) => {
                log::warn!(
                    "trap costs could not be measured here ({}); using the development VM's",
                    crate::error::chain(&e)
                );
                crate::probes::calibrate::TrapCosts::FALLBACK
            }
        };
        let mut meter = Meter::new(
            self.pid,
            self.config.dry_run,
            self.attached.session_functions(),
            traps,
        );
        // The programs' own run time is measured by the kernel (BPF statistics, on while
        // this descriptor is open; ~20–40 ns per program run).
        let stats = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::warn!("BPF run-time statistics unavailable ({e}); costs count traps only");
                None
            }
        };
        let stats_on = stats.is_some();
        meter.start_bpf(meter::bpf_run_ns(ebpf, &self.attached, stats_on));
        let mut budget_ticks = 0u64;
        let mut budget_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + BUDGET_EVERY, BUDGET_EVERY);
        budget_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let pidfd = match pidfd {
            Some(fd) => Some(async_fd(fd)?),
            None => None,
        };
        let signal = |kind| tokio::signal::unix::signal(kind).map_err(Error::Runtime);
        use tokio::signal::unix::SignalKind;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigchld = signal(SignalKind::child())?;
        let mut drain_tick = tokio::time::interval(DRAIN_EVERY);
        drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let far = Duration::from_secs(100 * 365 * 24 * 3600);
        // The live view's snapshot at once, then as often as it or the metrics need.
        let refresh_every = if self.config.live {
            super::live::SNAPSHOT_EVERY
        } else {
            super::metrics::METRICS_EVERY
        };
        let mut refresh_tick = tokio::time::interval_at(
            tokio::time::Instant::now()
                + if self.config.live {
                    Duration::ZERO
                } else {
                    refresh_every
                },
            refresh_every,
        );
        refresh_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let age_every = AGE_EVERY
            .min(self.config.age_after / 2)
            .max(Duration::from_millis(250));
        let mut age_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + age_every, age_every);
        age_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut live_tick = tokio::time::interval(super::live::REDRAW_EVERY);
        live_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut report_tick = tokio::time::interval_at(
            tokio::time::Instant::now() + self.config.interval.unwrap_or(far),
            self.config.interval.unwrap_or(far),
        );
        // The worker loads the attach-time unwind tables and finds the interpreter
        // before the probes are enabled, so the first events already have both.
        // A signal meanwhile stops leaktrace before anything is traced.
        let mut stop_poll = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                reply = self.replies.recv() => match reply {
                    Some(Reply::Ready) => break,
                    Some(r @ Reply::Interpreter(_)) => {
                        self.on_reply(r, &mut m);
                    }
                    other => return Err(Error::Worker(format!("no start-up answer ({other:?})"))),
                },
                _ = sigint.recv() => return Err(Error::Stopped { signal: libc::SIGINT }),
                _ = sigterm.recv() => return Err(Error::Stopped { signal: libc::SIGTERM }),
                _ = stop_poll.tick() => {
                    if let Some(signal) = super::stop::requested() {
                        return Err(Error::Stopped { signal });
                    }
                }
            }
        }
        attach::attach_tracepoints(ebpf, &mut self.attached)?;
        if self.config.follow_forks && !self.config.dry_run {
            self.follow_existing(ebpf)?;
        }
        load::enable(ebpf, leaktrace_common::ENABLE_ALL)?;
        // Said before the attach line, if attaching took long enough to be mentioned.
        drop(self.attaching.take());
        self.started = go(self.config, self.pid, self.attached.probes.len(), blocked)?;
        self.record_facts(&m);
        let mut live_keys = None;
        if self.config.live {
            let (live, keys) = super::live::Live::start()?;
            self.live = Some(live);
            live_keys = Some(keys);
        }
        if self.config.duty_budget_pct.is_some()
            && self.attached.multi.is_none()
            && !self.config.dry_run
        {
            log::warn!(
                "no duty cycle: it needs uprobe_multi links (Linux 6.6+); the heap probes stay attached"
            );
        }
        if let Some(budget) = self
            .config
            .duty_budget_pct
            .filter(|_| !self.config.dry_run && self.attached.multi.is_some())
        {
            // The first window measures what the probes cost while attached.
            meter.window(
                &m.hits,
                &m.counters,
                meter::bpf_run_ns(ebpf, &self.attached, stats_on),
                &self.sites,
            );
            self.duty = Some(super::duty::DutyCycle::new(
                budget,
                tokio::time::Instant::now(),
            ));
        }
        let deadline = tokio::time::sleep(self.config.duration.unwrap_or(far));
        // An interval report due this close to the end is the final report.
        let ends_at = self.config.duration.map(|d| Instant::now() + d);
        tokio::pin!(deadline);

        let (reason, interrupted) = loop {
            let duty_at = self.duty.as_ref().map(|d| d.next);
            tokio::select! {
                () = async {
                    match duty_at {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let bpf_ns = meter::bpf_run_ns(ebpf, &self.attached, stats_on);
                    self.on_duty(ebpf, &mut m, &mut meter, bpf_ns)?;
                }
                guard = m.ring.readable_mut() => {
                    let mut guard = guard.map_err(Error::Runtime)?;
                    self.drain(guard.get_inner_mut());
                    guard.clear_ready();
                    self.follow_pending(ebpf, true);
                }
                _ = drain_tick.tick() => {
                    self.drain(m.ring.get_mut());
                    self.follow_pending(ebpf, true);
                    if let Some(c) = &mut m.copies {
                        while let Some(item) = c.next() {
                            std::hint::black_box(item.len());
                        }
                    }
                }
                _ = tick.tick() => {
                    self.sample_rss();
                    self.sample_timeline(&m);
                    if let Some(mx) = self.metrics.as_mut() {
                        mx.tick(self.timeline.points().last());
                    }
                    self.sample_followers();
                    self.worker.send(Job::Resolve);
                }
                _ = budget_tick.tick() => {
                    // The duty cycle measures its windows itself.
                    if self.heap_detached.is_none() && self.duty.is_none()
                        && let Some(window) = meter.window(&m.hits, &m.counters, meter::bpf_run_ns(ebpf, &self.attached, stats_on), &self.sites)
                    {
                        self.check_budget(ebpf, &window);
                        self.overhead = Some(window);
                    }
                    budget_ticks += 1;
                    if budget_ticks.is_multiple_of(10) {
                        self.record_facts(&m);
                    }
                }
                _ = refresh_tick.tick(), if self.live.is_some() || (self.metrics.is_some() && self.config.interval.is_none()) => {
                    self.ask_snapshot(Then::Refresh);
                }
                _ = live_tick.tick(), if self.live.is_some() => self.draw_live(&m),
                _ = age_tick.tick(), if self.config.continuous => {
                    // Events in the ring name stacks too: read them first.
                    self.drain(m.ring.get_mut());
                    self.age_stacks();
                }
                key = async { match live_keys.as_mut() { Some(k) => k.recv().await, None => std::future::pending().await } } => {
                    let quit = match (key, self.live.as_mut()) {
                        (Some(k), Some(l)) => l.key(k),
                        _ => true,
                    };
                    if quit {
                        break ("quit from the live view".to_owned(), false);
                    }
                }
                _ = report_tick.tick() => {
                    let last = match (ends_at, self.config.interval) {
                        (Some(end), Some(every)) => end.saturating_duration_since(Instant::now()) < every / 2,
                        _ => false,
                    };
                    if !last {
                        self.ask_snapshot(Then::IntervalReport);
                    }
                }
                reply = self.replies.recv() => {
                    let Some(reply) = reply else {
                        return Err(Error::Worker("it stopped".into()));
                    };
                    let got = self.on_reply(reply, &mut m);
                    if let Some((Then::Refresh, snap)) = got {
                        let facts = self.facts(&m, false, None);
                        self.update_metrics(&snap, &facts);
                        if self.live.is_some() {
                            self.live_snap = Some((snap, Instant::now()));
                            self.draw_live(&m);
                            if let Some(l) = self.live.as_mut() {
                                l.repaint();
                            }
                        }
                        continue;
                    }
                    if let Some((Then::IntervalReport, snap)) = got {
                        let facts = self.facts(&m, false, None);
                        self.record_report(&facts, &snap);
                        self.update_metrics(&snap, &facts);
                        let r = self.report(&snap, &facts);
                        match self.config.format {
                            Format::Text => self.out.write(&report::render_text(&r, self.config.frames()))?,
                            // JSON Lines: one document per line, the final one last.
                            Format::Json => self.out.write(&(serde_json::to_string(&r).expect("report serializes") + "\n"))?,
                            // One document, at the end (main refuses --interval with them).
                            Format::Pprof | Format::Folded => {}
                        }
                        if self.config.pprof_dir.is_some() {
                            let all = self.every_report(&snap, &facts);
                            self.write_pprof_dir(&all)?;
                        }
                    }
                }
                _ = sigchld.recv(), if self.launched => self.on_child_event(&mut m),
                _ = sigint.recv() => break ("interrupted".to_owned(), true),
                _ = sigterm.recv() => break ("terminated".to_owned(), false),
                // A signal noted before the loop's own handlers were in place.
                () = async {}, if super::stop::requested().is_some() => {
                    let sig = super::stop::requested();
                    break if sig == Some(libc::SIGINT) {
                        ("interrupted".to_owned(), true)
                    } else {
                        ("terminated".to_owned(), false)
                    };
                }
                () = &mut deadline => break ("duration elapsed".to_owned(), false),
                r = async { match &pidfd { Some(fd) => fd.readable().await.map(|mut g| g.clear_ready()), None => std::future::pending().await } } => {
                    let _ = r;
                    self.target_exited = true;
                    self.reap();
                    break (format!("target exited{}", self.child.exit_status.as_deref().map(|s| format!(", {s}")).unwrap_or_default()), false);
                }
            }
        };
        // The terminal is given back before anything else is said.
        drop(self.live.take());
        drop(live_keys);
        if self.target_exited && self.config.announce {
            #[expect(clippy::print_stderr, reason = "a closing line for the user")]
            {
                eprintln!(
                    "leaktrace: pid {}: {reason}; making the final report",
                    self.pid
                );
            }
        }
        // Whatever is still in the ring buffer belongs in the final report: the programs
        // stop first, so a target that keeps allocating cannot keep the drain going.
        let ending = Instant::now();
        let _finishing = super::notice::Notice::after(
            self.config.announce,
            super::notice::AFTER,
            "leaktrace: making the final report: the last events, the heap walk, naming the stacks…".into(),
        );
        if let Err(e) = load::enable(ebpf, 0) {
            log::warn!("failed to stop the programs before the last drain: {e}");
        }
        // Nothing from here on needs the probes: they come out while the rest is done.
        let followers_links: Vec<_> = self
            .family
            .iter_mut()
            .flat_map(|f| f.followers.values_mut())
            .filter_map(|f| f.links.take())
            .collect();
        self.detaching = Some(attach::start_detach(
            ebpf,
            &mut self.attached,
            followers_links,
        ));
        while self.drain(m.ring.get_mut()) {}
        self.follow_pending(ebpf, false);
        let drained = ending.elapsed();
        if !self.target_exited {
            self.sample_rss();
        }
        self.sample_timeline(&m);
        self.sample_followers();
        self.ask_snapshot(Then::FinalReport);
        // The whole run's figures, unless the budget stopped the heap probes: then
        // the window that tripped it is the one to show.
        if self.heap_detached.is_none()
            && let Some(whole) = meter.whole_run(
                &m.hits,
                &m.counters,
                meter::bpf_run_ns(ebpf, &self.attached, stats_on),
                &self.sites,
            )
        {
            self.overhead = Some(whole);
        }
        if stats.is_some()
            && let Some(o) = self.overhead.as_mut()
        {
            o.bpf_programs = meter::program_costs(ebpf, &self.attached);
        }
        let snap = loop {
            let Some(reply) = self.replies.recv().await else {
                return Err(Error::Worker("it stopped before the final report".into()));
            };
            if let Some((Then::FinalReport, snap)) = self.on_reply(reply, &mut m) {
                break snap;
            }
        };
        let snapped = ending.elapsed();
        if self.config.dry_run {
            let o = self.overhead.clone().unwrap_or_default();
            let text = match self.config.format {
                Format::Text | Format::Pprof | Format::Folded => report::render_dry_run(self.pid, self.started.elapsed().as_secs_f64(), &o, &reason),
                Format::Json => serde_json::to_string_pretty(&serde_json::json!({
                    "pid": self.pid, "dry_run": true, "duration_s": self.started.elapsed().as_secs_f64(),
                    "end_reason": reason, "overhead": o,
                })).expect("serializes") + "\n",
            };
            self.out.write(&text)?;
            let report = self.report(&snap, &self.facts(&m, true, Some(reason)));
            return Ok(Outcome {
                report,
                interrupted,
            });
        }
        let facts = self.facts(&m, true, Some(reason));
        self.record_report(&facts, &snap);
        let report = self.report(&snap, &facts);
        let heaps = || report::pprof::Heaps::from(&report);
        match self.config.format {
            Format::Text => self
                .out
                .write(&report::render_text(&report, self.config.frames()))?,
            Format::Json if self.config.interval.is_some() => self
                .out
                .write(&(serde_json::to_string(&report).expect("report serializes") + "\n"))?,
            Format::Json => self.out.write(
                &(serde_json::to_string_pretty(&report).expect("report serializes") + "\n"),
            )?,
            Format::Pprof => {
                let mut h = heaps();
                if !self.target_exited {
                    h.read_build_ids(self.pid);
                }
                self.out.write_bytes(&report::pprof::encode(&h))?;
            }
            Format::Folded => self.out.write(&report::pprof::folded(&heaps(), false))?,
        }
        // Every stack, for --pprof-dir and the flamegraph: the report itself when its
        // format took every stack, else built once more for both.
        if self.config.pprof_dir.is_some() || self.config.flamegraph.is_some() {
            let every =
                (!self.config.format.every_stack()).then(|| self.every_report(&snap, &facts));
            let all = every.as_ref().unwrap_or(&report);
            self.write_pprof_dir(all)?;
            if let Some(path) = &self.config.flamegraph {
                write_flamegraph(path, &report::pprof::Heaps::from(all))?;
            }
        }
        if let Some(r) = self.recorder.as_mut() {
            r.finish();
            if let Some(why) = &r.failed {
                log::warn!(
                    "the capture {} stopped after {} events ({why}): it replays up to there",
                    r.path(),
                    r.events_total
                );
            } else if self.config.announce {
                #[expect(clippy::print_stderr, reason = "a closing line for the user")]
                {
                    eprintln!(
                        "leaktrace: recorded {} events in {path} ({}): leaktrace --replay {path}",
                        r.events_total,
                        crate::units::bytes(r.bytes_total),
                        path = r.path(),
                    );
                }
            }
        }
        log::info!(
            "final report: drained in {:.0} ms, worker's snapshot by {:.0} ms, written by {:.0} ms",
            drained.as_secs_f64() * 1e3,
            snapped.as_secs_f64() * 1e3,
            ending.elapsed().as_secs_f64() * 1e3
        );
        Ok(Outcome {
            report,
            interrupted,
        })
    }

    /// Applies what the worker sends; returns a snapshot for the caller to report on.
    fn on_reply(&mut self, reply: Reply, m: &mut Maps) -> Option<(Then, Box<Snapshot>)> {
        match reply {
            Reply::Ready => {}
            Reply::Stacks { stacks, unreadable } => {
                if let Some(r) = self.recorder.as_mut() {
                    r.stacks(&stacks, unreadable);
                }
                self.stacks.extend(stacks);
                self.ledger.counters.stack_unreadable += unreadable;
            }
            Reply::Done(Then::Resume) => {
                self.child.waiting = false;
                launch::resume(self.pid);
                // Stops that came while it waited are collected now.
                self.on_child_event(m);
            }
            Reply::Done(Then::Detach) => {
                self.child.waiting = false;
                launch::detach(self.pid);
            }
            Reply::Done(_) => {}
            Reply::Interpreter(version) => {
                if let Some(r) = self.recorder.as_mut() {
                    r.interpreter(version);
                }
                self.ledger
                    .set_pymalloc_arena(crate::capture::pymalloc_arena(version));
            }
            Reply::Snapshot(then, snap) => return Some((then, snap)),
        }
        None
    }

    /// Asks the worker for what a report needs (it symbolizes pending stacks first).
    fn ask_snapshot(&self, then: Then) {
        self.worker.send(Job::Snapshot {
            then,
            brk: self.ledger.brk(),
            walk: !self.target_exited,
        });
    }

    /// The launched child's ptrace stops (SIGCHLD).
    fn on_child_event(&mut self, m: &mut Maps) {
        if self.child.waiting {
            return;
        }
        let sent = m
            .counters
            .get(&counter::EXEC_MAP_STOPS, 0)
            .map(|v| v.iter().sum::<u64>())
            .unwrap_or(0);
        let mut ours = sent.saturating_sub(self.child.exec_stops_seen);
        let before = ours;
        let stop = launch::poll_child(self.pid, &mut ours);
        self.child.exec_stops_seen += before - ours;
        match stop {
            launch::ChildStop::MappedCode => {
                // It stays stopped until its new code's tables are loaded. What it did
                // before goes to the worker first: stacks recorded before this mapping
                // are named from the mappings as they were.
                self.drain(m.ring.get_mut());
                self.child.waiting = true;
                self.worker.send(Job::SyncUnwind(Then::Resume));
            }
            launch::ChildStop::Exiting => {
                // Its mappings are still there: take everything we need from them now.
                self.drain(m.ring.get_mut());
                self.sample_rss();
                self.child.waiting = true;
                self.worker.send(Job::Exiting {
                    then: Then::Detach,
                    brk: self.ledger.brk(),
                });
            }
            launch::ChildStop::Exited(exit) => self.child.exit_status = Some(exit.to_string()),
            launch::ChildStop::None => {}
        }
    }

    /// Applies every event waiting in the ring buffer; tells the worker about stack
    /// ids not seen before and about mapped code (a library loaded: read it while it
    /// is surely there).
    /// At most [`DRAIN_BUDGET`] events per call, so that timers, signals and the duty
    /// cycle are not starved by a target that refills the ring as fast as it is read
    /// (the ring then fills, and what does not fit is counted as lost). Returns
    /// whether events may remain.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> bool {
        let mut exec_mapped = false;
        let mut new_stacks = Vec::new();
        let mut budget = DRAIN_BUDGET;
        let mut more = false;
        while budget > 0 {
            budget -= 1;
            let Some(item) = ring.next() else {
                break;
            };
            more = budget == 0;
            if item.len() < size_of::<Event>() {
                self.ledger.counters.bad_events += 1;
                if let Some(r) = self.recorder.as_mut() {
                    r.bad_events(1);
                }
                continue;
            }
            // SAFETY: the buffer holds at least one Event, a Pod written by our BPF program;
            // read_unaligned copes with any alignment.
            let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            if ev.stack_id >= 0 {
                match self.known_stacks.entry(ev.stack_id) {
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(ev.ts_ns);
                        new_stacks.push(ev.stack_id);
                    }
                    std::collections::hash_map::Entry::Occupied(mut e) => {
                        let t = e.get_mut();
                        *t = (*t).max(ev.ts_ns);
                    }
                }
            }
            if self.family.is_some() && self.route(&ev) {
                continue;
            }
            if let Some(r) = self.recorder.as_mut() {
                r.event(&ev);
            }
            self.ledger.apply(&ev);
            if ev.kind == leaktrace_common::kind::MMAP && ev.aux & PROT_EXEC != 0 {
                // Stacks seen before this mapping are named from the mappings as they
                // were (code mapped where other code was replaces it): the worker
                // gets them first.
                if !new_stacks.is_empty() {
                    self.worker
                        .send(Job::NewStacks(std::mem::take(&mut new_stacks)));
                }
                exec_mapped = true;
            }
            if ev.kind == leaktrace_common::kind::EXEC {
                // Stacks and mappings seen so far belong to the old program.
                if !new_stacks.is_empty() {
                    self.worker
                        .send(Job::NewStacks(std::mem::take(&mut new_stacks)));
                }
                self.worker.send(Job::Exec);
                exec_mapped = false;
                // The old program's samples go with its books. A launched command's
                // first exec is the launch itself.
                self.timeline.reset();
                if !(self.launched && self.ledger.activity.execs == 1) {
                    let program = std::fs::read_link(format!("/proc/{}/exe", self.pid))
                        .map(|p| crate::units::printable(&p.display().to_string()))
                        .unwrap_or_else(|_| "?".into());
                    self.execs.push(report::ExecNote {
                        at_s: self.started.elapsed().as_secs_f64(),
                        program,
                    });
                }
            }
        }
        if exec_mapped {
            // Before the new stacks: their addresses may lie in the code just mapped.
            self.worker.send(Job::CodeMapped);
        }
        if !new_stacks.is_empty() {
            self.worker.send(Job::NewStacks(new_stacks));
        }
        more
    }

    /// With `--follow-forks`: takes a fork, a descendant's exit or exec, or a
    /// descendant's event to its books. Returns whether the event was taken (the
    /// target's own events but its forks go to the target's books).
    fn route(&mut self, ev: &Event) -> bool {
        use super::follow::Pending;
        use leaktrace_common::kind;
        let at_s = self.started.elapsed().as_secs_f64();
        let Some(fam) = self.family.as_mut() else {
            return false;
        };
        if ev.kind == kind::FORK {
            // Its books now: its own events may follow in this very drain.
            let child = ev.addr as u32;
            fam.followers
                .entry(child)
                .or_insert_with(|| super::follow::Follower::new(child, ev.tgid, at_s, true));
            fam.pending.push(Pending::Fork {
                child: ev.addr as u32,
                parent: ev.tgid,
                at_s,
            });
            return true;
        }
        if ev.tgid == self.pid {
            return false;
        }
        match ev.kind {
            kind::EXIT => fam.pending.push(Pending::Ended {
                pid: ev.tgid,
                at_s,
                ts_ns: ev.ts_ns,
                why: "exited".into(),
            }),
            kind::EXEC => {
                let program = std::fs::read_link(format!("/proc/{}/exe", ev.tgid))
                    .map(|p| format!(" ({})", crate::units::printable(&p.display().to_string())))
                    .unwrap_or_default();
                fam.pending.push(Pending::Ended {
                    pid: ev.tgid,
                    at_s,
                    ts_ns: ev.ts_ns,
                    why: format!("exec'd another program{program}; no longer followed"),
                });
            }
            _ => match fam.followers.get_mut(&ev.tgid) {
                Some(f) => f.ledger.apply(ev),
                // Sent between a fork and its FORK event's turn: cannot happen (the
                // fork's event is reserved before the child runs); counted if it does.
                None => self.ledger.counters.bad_events += 1,
            },
        }
        true
    }

    /// Applies what [`Session::route`] learned: attaches the heap probes to new
    /// children (unless `attach` is off: the run is ending), detaches those of
    /// descendants that exited or exec'd.
    fn follow_pending(&mut self, ebpf: &mut Ebpf, attach: bool) {
        use super::follow::Pending;
        let Some(fam) = self.family.as_mut() else {
            return;
        };
        for p in std::mem::take(&mut fam.pending) {
            match p {
                Pending::Fork {
                    child,
                    parent,
                    at_s,
                } => {
                    self.follow(ebpf, child, parent, at_s, true, attach);
                }
                Pending::Ended {
                    pid,
                    at_s,
                    ts_ns,
                    why,
                } => {
                    let fam = self.family.as_mut().expect("following");
                    if let Some(f) = fam.followers.get_mut(&pid) {
                        // Its last sample: the books as it left them.
                        f.timeline.sample(at_s, &f.ledger, f.rss, f.threads);
                        f.end = Some((at_s, why));
                        f.end_ns = Some(ts_ns);
                        if let Some(links) = f.links.take() {
                            attach::detach_heap(ebpf, links);
                        }
                    }
                }
            }
        }
    }

    /// Starts following `pid`: its books (unless made already), and its heap probes
    /// if `attach`.
    fn follow(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        parent: u32,
        at_s: f64,
        forked: bool,
        attach: bool,
    ) {
        // Its books may exist already: made when its fork was read.
        let Some(fam) = self.family.as_mut() else {
            return;
        };
        let mut f = fam
            .followers
            .remove(&pid)
            .unwrap_or_else(|| super::follow::Follower::new(pid, parent, at_s, forked));
        if attach {
            match attach::reattach_heap(
                ebpf,
                pid,
                &self.sites,
                self.attached.session_program.as_ref(),
                self.attached.multi.as_ref(),
                true,
            ) {
                Ok(l) => f.links = Some(l),
                // Short-lived: gone before its fork was heard of (its exit follows).
                Err(_) if !std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                    f.attach_error = Some("it exited before its probes could be attached".into());
                }
                Err(e) => {
                    let why = crate::error::chain(&e);
                    log::warn!("pid {pid}: its heap probes could not be attached: {why}");
                    f.attach_error = Some(why);
                }
            }
        } else {
            f.attach_error = Some("forked as tracing ended".into());
        }
        if self.config.announce && f.links.is_some() {
            #[expect(clippy::print_stderr, reason = "a progress line for the user")]
            {
                eprintln!(
                    "leaktrace: following pid {pid} ({} {parent}): {}",
                    if forked { "forked by" } else { "child of" },
                    f.command
                );
            }
        }
        if let Some(fam) = self.family.as_mut() {
            fam.followers.insert(pid, f);
        }
    }

    /// At attach: follows the target's descendants alive now that run its program
    /// (in TARGETS before the probes are enabled); notes the others.
    fn follow_existing(&mut self, ebpf: &mut Ebpf) -> Result<(), Error> {
        let Some(targets) = self.targets.as_mut() else {
            return Ok(());
        };
        let mut follow = Vec::new();
        for (pid, parent) in
            super::follow::descendants(self.pid, leaktrace_common::MAX_TARGETS as usize)
        {
            if super::follow::same_program(self.pid, pid) {
                targets
                    .insert(pid, 1, 0)
                    .map_err(|e| Error::Worker(format!("cannot follow pid {pid}: {e}")))?;
                follow.push((pid, parent));
            } else if let Some(fam) = self.family.as_mut() {
                let program = std::fs::read_link(format!("/proc/{pid}/exe"))
                    .map(|p| crate::units::printable(&p.display().to_string()))
                    .unwrap_or_else(|_| super::follow::command_line(pid));
                fam.not_followed.push((pid, program));
            }
        }
        for (pid, parent) in follow {
            self.follow(ebpf, pid, parent, 0.0, false, true);
        }
        Ok(())
    }

    /// Samples each followed process's RSS and books.
    fn sample_followers(&mut self) {
        let t = self.started.elapsed().as_secs_f64();
        if let Some(fam) = self.family.as_mut() {
            for (&pid, f) in fam.followers.iter_mut().filter(|(_, f)| f.end.is_none()) {
                f.sample_rss(pid);
                f.timeline.sample(t, &f.ledger, f.rss, f.threads);
            }
        }
    }

    /// Sampled mode's duty cycle: a window ends (the probes' cost while attached is
    /// measured, the next windows sized to the budget, the probes detached unless they
    /// stay) or opens (the probes attached again).
    fn on_duty(
        &mut self,
        ebpf: &mut Ebpf,
        m: &mut Maps,
        meter: &mut Meter,
        bpf_ns: Option<u64>,
    ) -> Result<(), Error> {
        let now = tokio::time::Instant::now();
        if self.duty.as_ref().is_some_and(|d| !d.on) {
            // The events before the window are counted with the duty they were made under.
            self.drain(m.ring.get_mut());
        }
        let Some(d) = self.duty.as_mut() else {
            return Ok(());
        };
        if d.on {
            let w = meter.window(&m.hits, &m.counters, bpf_ns, &self.sites);
            // A window too short to measure (it opened late) keeps the last figure. The
            // budget is a share of the target's CPU time, or of one core if it used less:
            // a target that mostly sleeps is not slowed by a few traps per second.
            let cost = w.as_ref().filter(|w| w.window_s >= 0.01).map(|w| {
                let own = (w.target_cpu_per_s - w.projected_cpu_per_s).max(1.0);
                w.projected_cpu_per_s / own * 100.0
            });
            log::debug!(
                "duty cycle: window {} ends after {:.3} s, cost while attached {cost:?}%",
                d.window,
                w.as_ref().map_or(0.0, |w| w.window_s)
            );
            // What the frees alone cost: they may stay attached between windows.
            let frees_pct = w.as_ref().map_or(0.0, |w| {
                let frees: f64 = ["free", "operator delete", "sdallocx"]
                    .iter()
                    .map(|f| {
                        w.calls_per_s.get(*f).copied().unwrap_or(0.0)
                            * (w.cost_per_call_us.get(*f).copied().unwrap_or(0.0)
                                + w.bpf_us_per_call.unwrap_or(0.0))
                            / 1e6
                    })
                    .sum();
                frees / (w.target_cpu_per_s - w.projected_cpu_per_s).max(1.0) * 100.0
            });
            if let Some(w) = w {
                self.overhead = Some(w);
            }
            let was_windowed = d.frees_windowed == Some(true);
            let frees_windowed = d.decide_frees(frees_pct);
            if !was_windowed && frees_windowed {
                // The frees come and go with the windows from now on.
                if let (Some(p), Some(links)) = (
                    self.attached.persistent.take(),
                    self.attached.heap_links.as_mut(),
                ) {
                    links.sessions.extend(p);
                }
                log::debug!("duty cycle: the frees alone cost {frees_pct:.1}%: windowed too");
            }
            // Frees that stay attached cost the budget too: the windows get what is left.
            let cost = if frees_windowed {
                cost
            } else {
                cost.map(|c| {
                    (c - frees_pct).max(0.0) * d.budget_pct
                        / (d.budget_pct - frees_pct).max(d.budget_pct / 2.0)
                })
            };
            if d.close(now, cost) {
                return Ok(());
            }
            // Allocations off; frees stay seen unless they too are windowed.
            load::enable(
                ebpf,
                if frees_windowed {
                    leaktrace_common::ENABLE_SYSCALLS
                } else {
                    leaktrace_common::ENABLE_FREES | leaktrace_common::ENABLE_SYSCALLS
                },
            )?;
            if let Some(links) = self.attached.heap_links.take() {
                attach::detach_heap(ebpf, links);
            }
            log::debug!(
                "duty cycle: detached; 1 window in {} per period (cost while attached {:?}%)",
                d.slots,
                cost
            );
            // The window's events are counted with the duty they were recorded under.
            self.drain(m.ring.get_mut());
        } else {
            load::set_window(ebpf, d.window.wrapping_add(1))?;
            let t = std::time::Instant::now();
            let links = attach::reattach_heap(
                ebpf,
                self.pid,
                &self.sites,
                self.attached.session_program.as_ref(),
                self.attached.multi.as_ref(),
                d.frees_windowed == Some(true),
            )?;
            self.attached.heap_links = Some(links);
            // The window is timed from when its probes are in place.
            d.open(tokio::time::Instant::now());
            self.ledger.set_duty(d.duty());
            if let Some(r) = self.recorder.as_mut() {
                r.duty(d.duty());
            }
            load::enable(ebpf, leaktrace_common::ENABLE_ALL)?;
            log::debug!(
                "duty cycle: window {} attached in {:.2} ms",
                d.window,
                t.elapsed().as_secs_f64() * 1e3
            );
            // The window's cost is measured from now.
            meter.window(&m.hits, &m.counters, bpf_ns, &self.sites);
        }
        Ok(())
    }

    /// How the duty cycle went, for the report.
    fn duty_report(&self) -> Option<report::DutyReport> {
        let d = self.duty.as_ref()?;
        let traced = self.started.elapsed().as_secs_f64().max(1e-9);
        let attached = d.attached_until(tokio::time::Instant::now()).as_secs_f64();
        Some(report::DutyReport {
            budget_pct: d.budget_pct,
            attached_share: (attached / traced).min(1.0),
            windows: d.windows,
            duty_now: d.duty(),
            cost_when_attached_pct: d.cost_on_pct,
            frees_always_attached: d.frees_windowed != Some(true),
        })
    }

    /// Detaches the heap probes if their projected cost is over the budget.
    fn check_budget(&mut self, ebpf: &mut Ebpf, window: &Overhead) {
        let Some(max) = self.config.max_overhead_pct else {
            return;
        };
        if window.projected_pct <= max || self.config.dry_run {
            return;
        }
        let Some(links) = self.attached.heap_links.take() else {
            return;
        };
        // Stop every heap program at once, then take the probes out.
        if let Err(e) = load::enable(ebpf, leaktrace_common::ENABLE_SYSCALLS) {
            log::warn!("failed to stop the heap probes: {e}");
        }
        attach::detach_heap(ebpf, links);
        let after_s = self.started.elapsed().as_secs_f64();
        let reason = format!(
            "projected probe cost {:.1}% of the target's CPU time exceeded --max-overhead {max}% ({:.0} allocator calls/s)",
            window.projected_pct,
            window.calls_per_s.values().sum::<f64>()
        );
        log::warn!("heap probes detached after {after_s:.1} s: {reason}");
        self.heap_detached = Some(HeapDetached { after_s, reason });
    }

    fn sample_rss(&mut self) {
        if let Ok(st) = procfs::read_status(self.pid)
            && st.has_mm
        {
            self.rss = st.rss;
            self.threads = st.threads;
        }
    }

    fn reap(&mut self) {
        if !self.launched || self.child.exit_status.is_some() {
            return;
        }
        if let Some(exit) = launch::try_reap(self.pid) {
            self.child.exit_status = Some(exit.to_string());
        }
    }

    /// The allocator whose memory the verdict measures besides glibc's: the one serving
    /// malloc when it is not glibc's, else one called through its own prefixed API (a
    /// Rust program's jemalloc or mimalloc), whose probes were placed.
    fn other_allocator(&self) -> Option<&crate::probes::allocators::Found> {
        crate::analysis::other_allocator(&self.allocators)
    }

    /// With `--pprof-dir`: a pprof profile of `every` (a report of every heap stack), as
    /// `leaktrace-PID-UNIXMS.pb.gz`, and the oldest of this run's beyond the kept count
    /// removed.
    fn write_pprof_dir(&mut self, every: &Report) -> Result<(), Error> {
        let Some((dir, keep)) = self.config.pprof_dir.clone() else {
            return Ok(());
        };
        let mut h = report::pprof::Heaps::from(every);
        if !self.target_exited {
            h.read_build_ids(self.pid);
        }
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let prefix = format!("leaktrace-{}-", self.pid);
        let path = dir.join(format!("{prefix}{ms}.pb.gz"));
        Output::file(&path)?.write_bytes(&report::pprof::encode(&h))?;
        self.pprof_written.push(path);
        while self.pprof_written.len() > keep.max(1) {
            let old = self.pprof_written.remove(0);
            if let Err(e) = std::fs::remove_file(&old) {
                log::warn!("removing {}: {e}", old.display());
            }
        }
        Ok(())
    }

    /// Takes an RSS sample into the timeline (and the capture).
    fn sample_timeline(&mut self, m: &Maps) {
        let t = self.started.elapsed().as_secs_f64();
        self.timeline
            .sample(t, &self.ledger, self.rss, self.threads);
        if let Some(r) = self.recorder.as_mut() {
            r.sample(
                t,
                self.rss,
                self.threads,
                &m.kernel_counters(),
                monotonic_ns(),
            );
            r.flush();
        }
    }

    /// Records the run's facts as they are now (what a capture cut short reports).
    fn record_facts(&mut self, m: &Maps) {
        if self.recorder.is_none() {
            return;
        }
        let facts = self.facts(m, false, None);
        if let Some(r) = self.recorder.as_mut() {
            r.facts(&facts);
        }
    }

    /// Records a report's inputs, with the build ids of the objects in the stacks
    /// (read now, while the target's files are surely there).
    fn record_report(&mut self, facts: &RunFacts, snap: &Snapshot) {
        if self.recorder.is_none() {
            return;
        }
        let build_ids = if self.target_exited {
            Default::default()
        } else {
            report::pprof::read_build_ids(
                self.pid,
                self.stacks
                    .iter()
                    .flat_map(|(_, s)| &s.frames)
                    .filter_map(|f| f.module.as_deref()),
            )
        };
        if let Some(r) = self.recorder.as_mut() {
            r.report(facts, snap, &build_ids);
        }
    }

    /// `--continuous`: forgets the stacks with nothing live and no event for
    /// `Config::age_after`, here, in the capture and in the kernel's maps.
    fn age_stacks(&mut self) {
        let before = monotonic_ns().saturating_sub(self.config.age_after.as_nanos() as u64);
        // Every event of any kind counts as use (a stack that only frees, or maps,
        // matters as much as one that allocates).
        let ids = self.ledger.idle_stacks(
            self.stacks
                .iter()
                .map(|(id, _)| (id, self.known_stacks.get(&id).copied().unwrap_or(0))),
            before,
        );
        if ids.is_empty() {
            return;
        }
        log::debug!("{} stacks aged out", ids.len());
        self.ledger.forget_stacks(&ids);
        self.timeline.forget(&ids);
        self.stacks.forget(&ids);
        for id in &ids {
            self.known_stacks.remove(id);
        }
        if let Some(r) = self.recorder.as_mut() {
            r.forget(&ids);
        }
        self.worker.send(Job::Forget(ids));
    }

    /// Redraws the live view from the books and its last snapshot.
    fn draw_live(&mut self, m: &Maps) {
        if self.live.is_none() {
            return;
        }
        let facts = self.facts(m, false, None);
        let books = crate::analysis::Books {
            ledger: &self.ledger,
            timeline: &self.timeline,
            stacks: &self.stacks,
        };
        let empty = Snapshot::default();
        let snap = self.live_snap.as_ref().map_or(&empty, |(s, _)| s);
        let r = crate::analysis::analyse(books, snap, &facts, super::live::STACKS);
        let age = self
            .live_snap
            .as_ref()
            .map(|(_, at)| at.elapsed().as_secs_f64());
        if let Some(l) = self.live.as_mut() {
            l.show(r, age);
        }
    }

    /// Refreshes the metrics from a report of their top stacks.
    fn update_metrics(&mut self, snap: &Snapshot, facts: &RunFacts) {
        let Some(top) = self.metrics.as_ref().map(|m| m.top) else {
            return;
        };
        let books = crate::analysis::Books {
            ledger: &self.ledger,
            timeline: &self.timeline,
            stacks: &self.stacks,
        };
        let r = crate::analysis::analyse(books, snap, facts, top);
        if let Some(m) = self.metrics.as_mut() {
            m.report(&r);
        }
    }

    /// The run's facts for a report made now.
    fn facts(&self, m: &Maps, final_report: bool, reason: Option<String>) -> RunFacts {
        RunFacts {
            pid: self.pid,
            kernel_counters: m.kernel_counters(),
            rss: self.rss,
            duration_s: self.started.elapsed().as_secs_f64(),
            now_ns: monotonic_ns(),
            final_report,
            end_reason: reason,
            target_exited: self.target_exited,
            probes: self.attached.probes.clone(),
            allocators: self.allocators.clone(),
            overhead: self.overhead.clone(),
            heap_detached: self.heap_detached.clone(),
            duty: self.duty_report(),
            heap_not_traced: self.heap_not_traced.clone(),
            min_age_s: self.config.min_age.map_or(0.0, |d| d.as_secs_f64()),
            unwinder: self.unwinder,
            execs: self.execs.clone(),
        }
    }

    /// The report with every heap stack (for pprof files and flamegraphs).
    fn every_report(&mut self, snap: &Snapshot, f: &RunFacts) -> Report {
        self.every_stack = true;
        let r = self.report(snap, f);
        self.every_stack = false;
        r
    }

    /// The verdict, then the report, from the books, the worker's snapshot and the
    /// run's facts (taken once per snapshot: every report made of it states the same).
    fn report(&self, snap: &Snapshot, f: &RunFacts) -> Report {
        let books = crate::analysis::Books {
            ledger: &self.ledger,
            timeline: &self.timeline,
            stacks: &self.stacks,
        };
        let top = if self.every_stack || self.config.format.every_stack() {
            usize::MAX
        } else {
            self.config.top
        };
        let mut r = crate::analysis::analyse(books, snap, f, top);
        let (kernel, now_ns, final_report) = (&f.kernel_counters, f.now_ns, f.final_report);
        if let Some(fam) = &self.family {
            let f = self.followed(fam, &r, snap, kernel, now_ns, final_report);
            // Every loss is the report's: the followed processes' books' too.
            for (name, v) in f.processes.iter().flat_map(|p| &p.lost) {
                *r.lost.entry(name.clone()).or_default() += v;
                r.lost_total += v;
            }
            r.follow = Some(f);
        }
        r
    }

    /// The followed descendants' sections: each built like the target's report from
    /// its own books (no heap walk: the target's stands for the family's allocator).
    fn followed(
        &self,
        fam: &super::follow::Family,
        own: &Report,
        snap: &Snapshot,
        kernel: &[u64],
        now_ns: u64,
        final_report: bool,
    ) -> report::Followed {
        let now_s = self.started.elapsed().as_secs_f64();
        let no_names = rustc_hash::FxHashMap::default();
        let processes: Vec<report::FollowedProcess> = fam
            .followers
            .iter()
            .map(|(&pid, f)| {
                let until = f.end.as_ref().map_or(now_s, |(t, _)| *t);
                // A process that ended is reported as it was then.
                let now_ns = f.end_ns.unwrap_or(now_ns);
                let verdict = verdict::decide(&Facts {
                    points: f.timeline.points(),
                    candidates: verdict::candidates(&f.ledger, &f.timeline, &self.stacks, now_ns),
                    walk: None,
                    arena_limit: None,
                    mmap_threshold_raised_to: f.ledger.mmap_threshold_raised_to(),
                    malloc_env: snap.malloc_env.clone(),
                    heap_detached: false,
                    frees_windowed: false,
                    heap_untraced: self.heap_not_traced.is_some() || f.attach_error.is_some(),
                    lost_total: 0,
                    python: snap.python.is_some(),
                    pymalloc: None,
                    allocator: self.other_allocator(),
                    jemalloc: &[],
                    mimalloc: &[],
                    tcmalloc: &[],
                    census: None,
                    reach: None,
                    pygc: None,
                });
                let r = report::build(&report::Inputs {
                    pid,
                    ledger: &f.ledger,
                    stacks: &self.stacks,
                    kernel_counters: kernel,
                    rss: f.rss,
                    duration_s: until - f.since_s,
                    now_ns,
                    top: self.config.top,
                    final_report,
                    end_reason: None,
                    target_exited: f.end.is_some(),
                    probes: &[],
                    allocators: &self.allocators,
                    overhead: None,
                    heap_detached: None,
                    duty: None,
                    heap_not_traced: self.heap_not_traced.clone(),
                    timeline: &f.timeline,
                    verdict,
                    memory: crate::analysis::memory::MemoryMap::default(),
                    min_age_s: self.config.min_age.map_or(0.0, |d| d.as_secs_f64()),
                    walk: None,
                    pymalloc: None,
                    other: None,
                    census: None,
                    reach: None,
                    arena_limit: None,
                    malloc_env: Vec::new(),
                    python: None,
                    thread_names: &no_names,
                    unwinder: self.unwinder,
                    unwind: None,
                    unnamed: &[],
                });
                report::FollowedProcess {
                    pid,
                    parent: f.parent,
                    command: f.command.clone(),
                    forked_while_traced: f.forked_while_traced,
                    since_s: f.since_s,
                    followed_s: until - f.since_s,
                    ended: f.end.as_ref().map(|(_, why)| why.clone()),
                    attach_error: f.attach_error.clone(),
                    rss: f.rss,
                    heap: r.heap,
                    mappings: r.mappings,
                    activity: r.activity,
                    verdict: r.verdict,
                    // Its books' own losses (the kernel's are the family's, counted once
                    // in the report).
                    lost: crate::accounting::losses::Losses::tally(&[], &f.ledger.counters)
                        .lost
                        .into_iter()
                        .filter(|&(_, v)| v > 0)
                        .collect(),
                }
            })
            .collect();
        let alive: Vec<&report::FollowedProcess> =
            processes.iter().filter(|p| p.ended.is_none()).collect();
        let totals = report::FamilyTotals {
            processes: 1 + processes.len(),
            alive: usize::from(!self.target_exited) + alive.len(),
            // What exited or exec'd holds nothing any more.
            live_bytes: own.heap.live_bytes + alive.iter().map(|p| p.heap.live_bytes).sum::<u64>(),
            live_allocations: own.heap.live_allocations
                + alive.iter().map(|p| p.heap.live_allocations).sum::<u64>(),
            rss_bytes: own.rss.rss_bytes + alive.iter().map(|p| p.rss.rss_bytes).sum::<u64>(),
            anon_rss_bytes: own.rss.anon_bytes
                + alive.iter().map(|p| p.rss.anon_bytes).sum::<u64>(),
        };
        report::Followed {
            processes,
            not_followed: fam
                .not_followed
                .iter()
                .map(|(pid, program)| report::NotFollowed {
                    pid: *pid,
                    program: program.clone(),
                })
                .collect(),
            totals,
        }
    }
}

/// Starts the clock, releases a launched child, and tells the user we are tracing.
/// Called once signal handlers are in place, so a Ctrl-C from then on gets a report.
fn go(
    config: &Config,
    pid: u32,
    probes: usize,
    blocked: Option<launch::Blocked>,
) -> Result<Instant, Error> {
    let started = Instant::now();
    if let Some(b) = blocked {
        b.release().map_err(|source| Error::Launch {
            program: format!("{:?}", config.target),
            source,
        })?;
    }
    if config.announce {
        #[expect(
            clippy::print_stderr,
            reason = "the one status line users and tests wait for"
        )]
        {
            if config.dry_run {
                eprintln!(
                    "leaktrace: tracing pid {pid} in a dry run: only counting calls at {probes} allocator entries; Ctrl-C to stop"
                );
            } else {
                eprintln!(
                    "leaktrace: tracing pid {pid} ({probes} allocator probes, {} tracepoints); Ctrl-C to stop",
                    attach::SYSCALLS.len() * 2 + 1
                );
            }
        }
    }
    Ok(started)
}

fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative return is a descriptor we now own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn async_fd<T: AsRawFd>(inner: T) -> Result<AsyncFd<T>, Error> {
    // SAFETY: `inner` owns its descriptor, which stays open as long as the AsyncFd holds it.
    unsafe { AsyncFd::register(inner) }.map_err(|e| Error::Runtime(e.into()))
}

/// Draws `heaps`' live bytes by stack as a flamegraph in `path` (replaced whole, never
/// through a link planted there).
pub fn write_flamegraph(path: &std::path::Path, heaps: &report::pprof::Heaps) -> Result<(), Error> {
    let folded = report::pprof::folded(heaps, false);
    if folded.is_empty() {
        // Nothing live to draw is a finding, not a failure of the run.
        eprintln!(
            "leaktrace: no heap stack holds live bytes: no flamegraph written to {}",
            path.display()
        );
        return Ok(());
    }
    let title = format!("leaktrace: live heap of pid {} by stack", heaps.pid);
    let svg = report::pprof::flamegraph(&folded, &title).map_err(|why| Error::Output {
        path: path.display().to_string(),
        source: std::io::Error::other(why),
    })?;
    Output::file(path)?.write_bytes(&svg)
}
