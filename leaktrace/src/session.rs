//! A tracing session: load and attach the BPF programs, consume events, report.

use std::{
    ffi::OsString,
    io::Write as _,
    num::NonZeroU32,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{TracePoint, UProbe, uprobe::UProbeScope},
};
use leaktrace_common::{
    AllocFn, CONFIG_CAPTURE_STACKS, CONFIG_GLOBAL, Config as BpfConfig, DEFAULT_INFLIGHT_CAPACITY,
    DEFAULT_RING_BYTES, DEFAULT_STACK_CAPACITY, Event, StackTrace, counter, maps,
};
use tokio::io::unix::AsyncFd;

use crate::{
    allocators::{self, ProbeSite},
    error::Error,
    launch,
    ledger::Ledger,
    procfs::{self, Rss},
    report::{self, ProbeInfo, Report},
    symbols::Symbols,
    target,
};

/// What to trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A running process.
    Pid(u32),
    /// A command to launch under trace: program and its arguments (argv\[0\] first).
    Command(Vec<OsString>),
}

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Text reports at each interval and at the end.
    #[default]
    Text,
    /// One JSON document at the end.
    Json,
}

/// A validated session configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// What to trace.
    pub target: Target,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Print a report this often.
    pub interval: Option<Duration>,
    /// Stacks per report section.
    pub top: usize,
    /// Frames shown per stack in text reports.
    pub max_frames: usize,
    /// Output format.
    pub format: Format,
    /// Write reports here instead of stdout.
    pub output: Option<PathBuf>,
    /// Ring-buffer size in bytes (power of two).
    pub ring_bytes: u32,
    /// Stack map capacity.
    pub stack_capacity: u32,
    /// In-flight call map capacity (threads).
    pub inflight_capacity: u32,
    /// Capture stacks.
    pub capture_stacks: bool,
    /// Print one line on stderr once the probes are attached.
    pub announce: bool,
    /// Mean heap sampling interval in bytes (0: trace every call).
    pub sample_rate: u32,
    /// Capacity of the sampled-address map.
    pub sampled_capacity: u32,
    /// Count allocator calls only, and report rates and the projected cost.
    pub dry_run: bool,
    /// Detach the heap probes when their projected cost exceeds this share of the
    /// target's own CPU time, in percent.
    pub max_overhead_pct: Option<f64>,
    /// Leave blocks younger than this out of the heap stacks.
    pub min_age: Option<Duration>,
    /// Walk glibc's heaps through /proc/PID/mem for each report.
    pub walk_heaps: bool,
    /// Walk CPython frames when the target is a Python interpreter.
    pub python_stacks: bool,
    /// Benchmark only: attach every probe as usual, but let the programs do
    /// nothing beyond counting the hit (the bare trap cost of the same sites).
    pub bare_probes: bool,
    /// Walk native stacks with frame pointers only, not the objects' unwind tables.
    pub fp_stacks: bool,
    /// Benchmark only: copy 8 KiB of stack per event for a userspace unwinder
    /// (discarded), instead of walking in the kernel; events carry no stack.
    pub copy_stacks: bool,
    /// When sampling, probe malloc and calloc with uprobe sessions where the kernel
    /// has them, so unsampled calls skip the return trap.
    pub uprobe_sessions: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            target: Target::Pid(0),
            duration: None,
            interval: None,
            top: 10,
            max_frames: 16,
            format: Format::Text,
            output: None,
            ring_bytes: DEFAULT_RING_BYTES,
            stack_capacity: DEFAULT_STACK_CAPACITY,
            inflight_capacity: DEFAULT_INFLIGHT_CAPACITY,
            capture_stacks: true,
            announce: false,
            sample_rate: 0,
            sampled_capacity: leaktrace_common::DEFAULT_SAMPLED_CAPACITY,
            dry_run: false,
            max_overhead_pct: None,
            min_age: None,
            walk_heaps: true,
            uprobe_sessions: true,
            python_stacks: true,
            bare_probes: false,
            fp_stacks: false,
            copy_stacks: false,
        }
    }
}

/// How a session ended.
#[derive(Debug)]
pub struct Outcome {
    /// The final report.
    pub report: Report,
    /// Ended by SIGINT.
    pub interrupted: bool,
}

/// Runs a session to its end and returns the final report (already written to the output).
pub fn run(config: &Config) -> Result<Outcome, Error> {
    target::check_privileges()?;
    target::ensure_tracefs()?;
    // A bad output path is refused before anything is attached.
    let out = open_output(config)?;

    // Resolve the target and the objects to probe.
    let (pid, objects, blocked) = match &config.target {
        Target::Pid(pid) => {
            let p = target::validate_pid(*pid)?;
            (p.pid, target::mapped_objects(p.pid)?, None)
        }
        Target::Command(argv) => {
            let program = argv.first().ok_or_else(|| Error::BadCommand {
                program: String::new(),
                why: "empty command".into(),
            })?;
            let path = launch::resolve_program(program)?;
            let elf = launch::effective_elf(&path)?;
            let objs: Vec<(String, PathBuf)> = launch::objects_for(&elf)
                .into_iter()
                .map(|p| (p.display().to_string(), p))
                .collect();
            let blocked = launch::spawn_blocked(&path, argv)?;
            (blocked.pid, objs, Some(blocked))
        }
    };

    let search = allocators::search(objects.iter().map(|(t, h)| (t.as_str(), h.clone())));
    let has = |f: AllocFn| search.sites.iter().any(|s| s.func == f);
    if !has(AllocFn::Malloc) || !has(AllocFn::Free) {
        let looked_for = AllocFn::ALL
            .iter()
            .map(|f| f.symbol())
            .collect::<Vec<_>>()
            .join(", ");
        let mut searched = search.searched.join(", ");
        if searched.is_empty() {
            searched = "no executable file mappings".into();
        }
        if !search.unreadable.is_empty() {
            searched.push_str(&format!(" (unreadable: {})", search.unreadable.join("; ")));
        }
        if let Some(b) = blocked {
            kill_blocked(b);
        }
        return Err(Error::NoAllocator {
            pid,
            looked_for,
            searched,
        });
    }

    // Unwind tables of the code mapped now (or about to be, for a launched command)
    // are built before loading, so the kernel arrays are created large enough.
    let mut unwinder = cfi_enabled(config).then(|| crate::unwind::Unwinder::new(pid, 0, 0));
    // Whether a syscall's own walk can tell it runs inside free, malloc or calloc: then
    // frees need no mark, and malloc and calloc may skip unsampled returns (sessions).
    let mut walk_sees_allocators = false;
    let unwind_caps = match &mut unwinder {
        Some(u) => {
            let hosts: Vec<PathBuf> = objects.iter().map(|(_, h)| h.clone()).collect();
            let (rows, pages) = u.prepare(&hosts);
            let caps = crate::unwind::capacities(rows, pages);
            u.set_capacity(caps.0, caps.1);
            walk_sees_allocators = u.set_allocator_functions(
                [AllocFn::Free, AllocFn::Malloc, AllocFn::Calloc]
                    .iter()
                    .flat_map(|f| search.sites.iter().filter(move |s| s.func == *f))
                    .map(|s| (s.host_path.as_path(), s.symbol.0, s.symbol.1)),
            );
            caps
        }
        None => (
            leaktrace_common::DEFAULT_UNWIND_ROWS,
            leaktrace_common::DEFAULT_UNWIND_PAGES,
        ),
    };
    let mut ebpf = match load(config, pid, unwind_caps, !walk_sees_allocators) {
        Ok(e) => e,
        Err(e) => {
            if let Some(b) = blocked {
                kill_blocked(b);
            }
            return Err(e);
        }
    };
    // Sessions leave an unsampled call no record in flight: only the walk of a syscall it
    // makes can then tell that syscall is the allocator's.
    let sessions = config.uprobe_sessions
        && walk_sees_allocators
        && config.sample_rate > 0
        && !config.dry_run
        && !config.bare_probes;
    let (probes, heap_links, session_prog) =
        match attach(&mut ebpf, pid, &search.sites, config.dry_run, sessions) {
            Ok(p) => p,
            Err(e) => {
                if let Some(b) = blocked {
                    kill_blocked(b);
                }
                return Err(e);
            }
        };
    let launched = blocked.is_some();
    let start_brk = if launched {
        None
    } else {
        procfs::read_start_brk(pid)
    };
    let brk = if launched {
        None
    } else {
        procfs::read_maps(pid)
            .ok()
            .and_then(|m| m.iter().find(|e| e.path == "[heap]").map(|e| e.end))
            .or(start_brk)
    };
    // Open the exit notifier before releasing a launched child, so its exit can't be missed.
    let pidfd = open_pidfd(pid);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let python = python_version(objects.iter().map(|(t, _)| t.as_str()));
    // pymalloc maps 1 MiB arenas since CPython 3.10, 256 KiB ones before.
    let pymalloc_arena = python.map(|(_, minor)| if minor >= 10 { 1 << 20 } else { 256 << 10 });
    let mut s = Session {
        config,
        pid,
        launched,
        ledger: Ledger::new(start_brk, brk)
            .with_sampling(u64::from(config.sample_rate))
            .with_pymalloc_arena(pymalloc_arena),
        python,
        py: if python.is_some() && config.python_stacks {
            PyState::Pending(0)
        } else {
            PyState::Off
        },
        py_raw: rustc_hash::FxHashMap::default(),
        py_symbols: crate::python::PySymbols::default(),
        objects: objects.clone(),
        py_stacks: None,
        threads: 0,
        walk: None,
        symbols: None,
        unwind: None,
        unwinder,
        exec_stops_seen: 0,
        timeline: crate::timeline::Timeline::default(),
        known_stacks: rustc_hash::FxHashSet::default(),
        pending_stacks: Vec::new(),
        fetched_stacks: Vec::new(),
        rss: procfs::read_status(pid).map(|s| s.rss).unwrap_or_default(),
        probes,
        sites: search.sites.clone(),
        heap_links: Some(heap_links),
        session_prog,
        heap_detached: None,
        overhead: None,
        started: Instant::now(),
        target_exited: false,
        exit_status: None,
        out,
    };
    rt.block_on(s.event_loop(&mut ebpf, pidfd, blocked))
}

/// The session's symbolizer, created on first use (in launch mode only once the
/// command has been exec'd, so its first snapshot is of the right program).
fn symbols_for(slot: &mut Option<Symbols>, pid: u32) -> &mut Symbols {
    slot.get_or_insert_with(|| Symbols::new(pid))
}

/// Turns the attached programs on (or some off), all at once.
fn enable(ebpf: &mut Ebpf, bits: u32) -> Result<(), Error> {
    let map = ebpf
        .map_mut(maps::ENABLED)
        .ok_or(Error::Missing("ENABLED map"))?;
    let mut flag: Array<&mut MapData, u32> = Array::try_from(map).map_err(|source| Error::Map {
        name: maps::ENABLED,
        source,
    })?;
    flag.set(0, bits, 0).map_err(|source| Error::Map {
        name: maps::ENABLED,
        source,
    })
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
            eprintln!(
                "leaktrace: tracing pid {pid} ({probes} allocator probes, {} syscall tracepoints); Ctrl-C to stop",
                SYSCALLS.len() * 2
            );
        }
    }
    Ok(started)
}

fn kill_blocked(b: launch::Blocked) {
    let pid = b.pid as i32;
    drop(b); // closing the pipe makes the child exit without exec
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
}

fn open_output(config: &Config) -> Result<Box<dyn std::io::Write>, Error> {
    Ok(match &config.output {
        Some(p) => Box::new(std::fs::File::create(p).map_err(|source| Error::Output {
            path: p.display().to_string(),
            source,
        })?),
        None => Box::new(std::io::stdout()),
    })
}

fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative return is a descriptor we now own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether native stacks are unwound with CFI tables (the default).
fn cfi_enabled(config: &Config) -> bool {
    config.capture_stacks
        && !config.fp_stacks
        && !config.copy_stacks
        && !config.dry_run
        && !config.bare_probes
}

fn load(
    config: &Config,
    pid: u32,
    unwind_caps: (u32, u32),
    free_mark: bool,
) -> Result<Ebpf, Error> {
    let bpf_config = BpfConfig {
        tgid: pid,
        flags: if config.capture_stacks {
            CONFIG_CAPTURE_STACKS
        } else {
            0
        } | if config.dry_run || config.bare_probes {
            leaktrace_common::CONFIG_COUNT_ONLY
        } else {
            0
        } | if config.fp_stacks {
            leaktrace_common::CONFIG_FP_STACKS
        } else {
            0
        } | if config.copy_stacks {
            leaktrace_common::CONFIG_COPY_STACKS
        } else {
            0
        } | if free_mark {
            leaktrace_common::CONFIG_FREE_MARK
        } else {
            0
        } | if matches!(config.target, Target::Command(_))
            && config.capture_stacks
            && !config.fp_stacks
            && !config.copy_stacks
            && !config.dry_run
            && !config.bare_probes
        {
            leaktrace_common::CONFIG_STOP_ON_EXEC_MAP
        } else {
            0
        },
        // A quarter of the ring: the consumer is woken long before it could fill,
        // and otherwise drains every DRAIN_EVERY.
        wakeup_bytes: config.ring_bytes / 4,
        sample_bytes: config.sample_rate,
    };
    let mut loader = EbpfLoader::new();
    loader
        .override_global(CONFIG_GLOBAL, &bpf_config, true)
        .map_max_entries(maps::EVENTS, config.ring_bytes)
        .map_max_entries(maps::STACKS, config.stack_capacity)
        .map_max_entries(maps::ALLOC_INFLIGHT, config.inflight_capacity)
        .map_max_entries(maps::SYSCALL_INFLIGHT, config.inflight_capacity)
        .map_max_entries(maps::SAMPLE_COUNTDOWN, config.inflight_capacity)
        .map_max_entries(maps::FREE_MARK, config.inflight_capacity)
        .map_max_entries(maps::PY_STACKS, config.stack_capacity)
        .map_max_entries(maps::SAMPLED, config.sampled_capacity)
        .map_max_entries(maps::UNWIND_ROWS, unwind_caps.0)
        .map_max_entries(maps::UNWIND_PAGES, unwind_caps.1);
    if config.copy_stacks {
        loader.map_max_entries(maps::STACK_COPIES, 64 << 20);
    }
    // The verifier rejects programs with EACCES, so only EPERM means "not allowed".
    let mut ebpf = loader.load(BPF_OBJECT).map_err(|e| {
        if Error::is_permission(&e) {
            Error::NotPrivileged
        } else {
            Error::Load(e)
        }
    })?;
    if config.sample_rate > 0 {
        fill_exp_draws(&mut ebpf, config.sample_rate)?;
    }
    Ok(ebpf)
}

/// Fills the table of exponential draws (mean `rate` bytes) the BPF sampler picks from.
fn fill_exp_draws(ebpf: &mut Ebpf, rate: u32) -> Result<(), Error> {
    let map = ebpf
        .map_mut(maps::EXP_DRAWS)
        .ok_or(Error::Missing("EXP_DRAWS map"))?;
    let mut draws: Array<&mut MapData, u64> =
        Array::try_from(map).map_err(|source| Error::Map {
            name: maps::EXP_DRAWS,
            source,
        })?;
    // xorshift64*, seeded from the clock: the draws need to be independent, not secret.
    let mut x = monotonic_ns() | 1;
    for i in 0..leaktrace_common::EXP_DRAWS {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let u = ((x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let draw = (-(u.ln()) * f64::from(rate)).round().max(1.0) as u64;
        draws.set(i, draw, 0).map_err(|source| Error::Map {
            name: maps::EXP_DRAWS,
            source,
        })?;
    }
    Ok(())
}

/// The syscall tracepoints.
const SYSCALLS: [&str; 6] = ["mmap", "munmap", "mremap", "brk", "mprotect", "madvise"];

/// Attached heap probes, by program name, so they can be detached on their own.
/// The heap probes' links: aya's uprobes, and uprobe sessions made without aya.
type HeapLinks = (
    Vec<(&'static str, aya::programs::uprobe::UProbeLinkId)>,
    Vec<crate::uprobe_session::SessionLink>,
);

/// The uprobe session program, when attached (outside aya, so measured on its own).
type SessionProg = Option<crate::uprobe_session::SessionProgram>;

/// The BPF object, as built by build.rs.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace"));

/// Functions a uprobe session can cover: an unsampled call needs nothing at its return.
fn session_capable(f: AllocFn) -> bool {
    matches!(f, AllocFn::Malloc | AllocFn::Calloc)
}

/// Attaches malloc and calloc as uprobe sessions: the program, its links, and the
/// indices of the sites covered. Links made before a failure close when dropped.
fn attach_sessions(
    ebpf: &Ebpf,
    pid: u32,
    sites: &[ProbeSite],
) -> anyhow::Result<(
    crate::uprobe_session::SessionProgram,
    Vec<crate::uprobe_session::SessionLink>,
    Vec<usize>,
)> {
    let program = crate::uprobe_session::SessionProgram::load(BPF_OBJECT, ebpf, "alloc_session")?;
    let mut by_object: std::collections::BTreeMap<&std::path::Path, Vec<usize>> =
        Default::default();
    for (i, s) in sites.iter().enumerate() {
        if session_capable(s.func) {
            by_object.entry(s.host_path.as_path()).or_default().push(i);
        }
    }
    let (mut links, mut covered) = (Vec::new(), Vec::new());
    for (path, idx) in by_object {
        // At the entry: the return is hijacked through the return address at [sp].
        let offsets: Vec<u64> = idx.iter().map(|&i| sites[i].entry_offset).collect();
        let cookies: Vec<u64> = idx.iter().map(|&i| sites[i].func as u64).collect();
        links.push(program.attach(path, &offsets, &cookies, pid)?);
        covered.extend(idx);
    }
    Ok((program, links, covered))
}

fn attach(
    ebpf: &mut Ebpf,
    pid: u32,
    sites: &[ProbeSite],
    dry_run: bool,
    sessions: bool,
) -> Result<(Vec<ProbeInfo>, HeapLinks, SessionProg), Error> {
    let mut links = Vec::new();
    // Before aya's own probes, so a failure leaves nothing half attached.
    let (session_prog, session_links, in_session) = match sessions
        .then(|| attach_sessions(ebpf, pid, sites))
    {
        Some(Ok((p, l, covered))) => (Some(p), l, covered),
        Some(Err(e)) => {
            eprintln!(
                "leaktrace: uprobe sessions unavailable ({e:#}): unsampled allocations still pay the return probe"
            );
            (None, Vec::new(), Vec::new())
        }
        None => (None, Vec::new(), Vec::new()),
    };
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(Error::NoSuchProcess { pid })?);
    let attach_err = |what: String| {
        move |source| {
            if Error::is_permission(&source) {
                Error::NotPrivileged
            } else {
                Error::Attach { what, source }
            }
        }
    };
    let uprobe = |ebpf: &mut Ebpf, name: &'static str| -> Result<(), Error> {
        let p: &mut UProbe = ebpf
            .program_mut(name)
            .ok_or(Error::Missing(name))?
            .try_into()
            .map_err(attach_err(name.into()))?;
        p.load().map_err(attach_err(name.into()))
    };
    // The programs stay idle until `enable` flips the ENABLED flag, so the order
    // of attachment does not matter for pairing.
    uprobe(ebpf, "alloc_exit")?;
    // A dry run counts calls at the entries only.
    for (_, site) in sites
        .iter()
        .enumerate()
        .filter(|(i, s)| s.func.return_program().is_some() && !dry_run && !in_session.contains(i))
    {
        let p: &mut UProbe = ebpf
            .program_mut("alloc_exit")
            .ok_or(Error::Missing("alloc_exit"))?
            .try_into()
            .map_err(attach_err("alloc_exit".into()))?;
        // A return probe hijacks the return address at [sp], so it stays at the entry.
        let link = p
            .attach(site.entry_offset, &site.host_path, scope)
            .map_err(attach_err(format!(
                "return probe on {} in {}",
                site.func.symbol(),
                site.object
            )))?;
        links.push(("alloc_exit", link));
    }
    let mut infos = Vec::new();
    let mut loaded: Vec<&'static str> = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        if in_session.contains(&i) {
            log::info!(
                "uprobe session on {} in {}",
                site.func.symbol(),
                site.object
            );
            infos.push(ProbeInfo {
                function: site.func.symbol().into(),
                object: site.object.clone(),
                offset: site.entry_offset,
                offset_in_function: 0,
                placement:
                    "function entry: a uprobe session, whose return runs only for sampled calls"
                        .into(),
                return_probe: "session".into(),
            });
            continue;
        }
        let name = site.func.entry_program();
        // Several objects may define one function (an interposed allocator and libc).
        if !loaded.contains(&name) {
            uprobe(ebpf, name)?;
            loaded.push(name);
        }
        let p: &mut UProbe = ebpf
            .program_mut(name)
            .ok_or(Error::Missing(name))?
            .try_into()
            .map_err(attach_err(name.into()))?;
        let link = p
            .attach(site.offset, &site.host_path, scope)
            .map_err(attach_err(format!(
                "probe on {} in {}",
                site.func.symbol(),
                site.object
            )))?;
        links.push((name, link));
        log::info!(
            "probe on {} in {} at +{}: {}",
            site.func.symbol(),
            site.object,
            site.placement.offset,
            site.placement.reason
        );
        infos.push(ProbeInfo {
            function: site.func.symbol().into(),
            object: site.object.clone(),
            offset: site.offset,
            offset_in_function: site.placement.offset,
            placement: site.placement.reason.clone(),
            return_probe: if site.func.return_program().is_some() && !dry_run {
                "uretprobe"
            } else {
                "none"
            }
            .into(),
        });
    }
    for phase in ["enter", "exit"] {
        for sc in SYSCALLS.iter().filter(|_| !dry_run) {
            let name = format!("sys_{phase}_{sc}");
            let prog = ebpf
                .program_mut(&name)
                .ok_or(Error::Missing("a syscall tracepoint program"))?;
            let tp: &mut TracePoint = prog.try_into().map_err(attach_err(name.clone()))?;
            tp.load().map_err(attach_err(name.clone()))?;
            tp.attach("syscalls", &name)
                .map_err(attach_err(format!("tracepoint syscalls:{name}")))?;
        }
    }
    Ok((infos, (links, session_links), session_prog))
}

/// Detaches the heap probes (the syscall tracepoints stay).
fn detach_heap(ebpf: &mut Ebpf, (links, sessions): HeapLinks) {
    // Closing a session's link detaches it.
    drop(sessions);
    for (name, link) in links {
        if let Some(p) = ebpf.program_mut(name)
            && let Ok(p) = <&mut UProbe>::try_from(p)
            && let Err(e) = p.detach(link)
        {
            log::warn!("failed to detach {name}: {e}");
        }
    }
}

/// Whether Python frames are walked.
#[derive(Debug)]
enum PyState {
    /// Not a Python target, or turned off.
    Off,
    /// A Python target whose interpreter was not found yet (attempts so far).
    Pending(u32),
    /// Frames are walked.
    Ready(Box<crate::python::PyTarget>),
    /// A Python target whose frames cannot be walked, and why.
    Unavailable(String),
}

struct Session<'a> {
    config: &'a Config,
    /// SIGURGs sent after a launched command mapped code, already handled.
    exec_stops_seen: u64,
    /// CFI unwind tables and the maps they are loaded into (off with `--unwind fp`).
    unwind: Option<(crate::unwind::Unwinder, crate::unwind::BpfTables)>,
    /// The unwinder with its tables built, until the maps are taken.
    unwinder: Option<crate::unwind::Unwinder>,
    pid: u32,
    launched: bool,
    ledger: Ledger,
    /// CPython (major, minor) if the target is a Python interpreter.
    python: Option<(u32, u32)>,
    /// Python frames: the interpreter found, or why not (yet).
    py: PyState,
    /// Python stacks read with their native stack, by native stack id, until symbolized.
    py_raw: rustc_hash::FxHashMap<i64, leaktrace_common::PyStack>,
    /// Code objects read so far.
    py_symbols: crate::python::PySymbols,
    /// The kernel's Python stacks.
    py_stacks: Option<BpfHashMap<MapData, i64, leaktrace_common::PyStack>>,
    /// The objects mapped at attach: (path in target, host path).
    objects: Vec<(String, PathBuf)>,
    /// Threads in the target at the last sample.
    threads: u64,
    /// The latest walk of glibc's heaps.
    walk: Option<crate::glibc_heap::HeapWalk>,
    symbols: Option<Symbols>,
    /// Totals and per-stack bytes over time.
    timeline: crate::timeline::Timeline,
    /// Stack ids seen in events so far.
    known_stacks: rustc_hash::FxHashSet<i64>,
    /// Stack ids seen but not yet symbolized.
    pending_stacks: Vec<i64>,
    /// New stacks read from the kernel, waiting to be symbolized.
    fetched_stacks: Vec<(i64, StackTrace)>,
    rss: Rss,
    probes: Vec<ProbeInfo>,
    sites: Vec<ProbeSite>,
    /// Heap probe links while attached.
    heap_links: Option<HeapLinks>,
    /// The uprobe session program, if one was attached.
    session_prog: SessionProg,
    /// Why and when the heap probes were detached by the overhead budget.
    heap_detached: Option<report::HeapDetached>,
    /// Latest overhead measurement.
    overhead: Option<report::Overhead>,
    started: Instant,
    target_exited: bool,
    exit_status: Option<String>,
    out: Box<dyn std::io::Write>,
}

/// How often new stacks are symbolized and RSS is sampled.
const TICK: Duration = Duration::from_millis(250);
/// How often probe hit rates and the target's CPU time are measured.
const BUDGET_EVERY: Duration = Duration::from_secs(1);
/// How often the ring buffer is drained without a wakeup from the kernel.
const DRAIN_EVERY: Duration = Duration::from_millis(10);

impl Session<'_> {
    async fn event_loop(
        &mut self,
        ebpf: &mut Ebpf,
        pidfd: Option<OwnedFd>,
        blocked: Option<launch::Blocked>,
    ) -> Result<Outcome, Error> {
        let ring = RingBuf::try_from(
            ebpf.take_map(maps::EVENTS)
                .ok_or(Error::Missing("EVENTS map"))?,
        )
        .map_err(|source| Error::Map {
            name: maps::EVENTS,
            source,
        })?;
        let mut ring = async_fd(ring)?;
        let py_stacks: BpfHashMap<MapData, i64, leaktrace_common::PyStack> = BpfHashMap::try_from(
            ebpf.take_map(maps::PY_STACKS)
                .ok_or(Error::Missing("PY_STACKS map"))?,
        )
        .map_err(|source| Error::Map {
            name: maps::PY_STACKS,
            source,
        })?;
        self.py_stacks = Some(py_stacks);
        let stacks: BpfHashMap<MapData, i64, StackTrace> = BpfHashMap::try_from(
            ebpf.take_map(maps::STACKS)
                .ok_or(Error::Missing("STACKS map"))?,
        )
        .map_err(|source| Error::Map {
            name: maps::STACKS,
            source,
        })?;
        let counters: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
            ebpf.take_map(maps::COUNTERS)
                .ok_or(Error::Missing("COUNTERS map"))?,
        )
        .map_err(|source| Error::Map {
            name: maps::COUNTERS,
            source,
        })?;
        let hits: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
            ebpf.take_map(maps::HITS)
                .ok_or(Error::Missing("HITS map"))?,
        )
        .map_err(|source| Error::Map {
            name: maps::HITS,
            source,
        })?;
        // Benchmark of the copy design: the copies are drained and dropped.
        let mut copies = match self.config.copy_stacks {
            true => Some(
                RingBuf::try_from(
                    ebpf.take_map(maps::STACK_COPIES)
                        .ok_or(Error::Missing("STACK_COPIES map"))?,
                )
                .map_err(|source| Error::Map {
                    name: maps::STACK_COPIES,
                    source,
                })?,
            ),
            false => None,
        };
        let session_funcs: Vec<AllocFn> = self
            .probes
            .iter()
            .filter(|p| p.return_probe == "session")
            .filter_map(|p| {
                AllocFn::ALL
                    .iter()
                    .copied()
                    .find(|f| f.symbol() == p.function)
            })
            .collect();
        let mut meter = Meter::new(self.pid, self.config.dry_run, session_funcs);
        // With a budget, the programs' own run time is measured by the kernel (BPF
        // statistics, on while this descriptor is open; ~20–40 ns per program run).
        let stats = if self.config.max_overhead_pct.is_some() {
            match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    log::warn!(
                        "BPF run-time statistics unavailable ({e}); the budget counts traps only"
                    );
                    None
                }
            }
        } else {
            None
        };
        meter.start_bpf(bpf_run_ns(ebpf, &self.session_prog, stats.is_some()));
        let mut budget_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + BUDGET_EVERY, BUDGET_EVERY);
        budget_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let pidfd = match pidfd {
            Some(fd) => Some(async_fd(fd)?),
            None => None,
        };
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(Error::Runtime)?;
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(Error::Runtime)?;
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
            .map_err(Error::Runtime)?;
        let mut drain_tick = tokio::time::interval(DRAIN_EVERY);
        drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let far = Duration::from_secs(100 * 365 * 24 * 3600);
        let mut report_tick = tokio::time::interval_at(
            tokio::time::Instant::now() + self.config.interval.unwrap_or(far),
            self.config.interval.unwrap_or(far),
        );
        self.setup_python(ebpf);
        self.setup_unwind(ebpf)?;
        enable(
            ebpf,
            leaktrace_common::ENABLE_HEAP | leaktrace_common::ENABLE_SYSCALLS,
        )?;
        self.started = go(self.config, self.pid, self.probes.len(), blocked)?;
        let deadline = tokio::time::sleep(self.config.duration.unwrap_or(far));
        tokio::pin!(deadline);

        let (reason, interrupted) = loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard.map_err(Error::Runtime)?;
                    self.consume(guard.get_inner_mut(), &stacks);
                    guard.clear_ready();
                }
                _ = drain_tick.tick() => {
                    // A launched interpreter is caught as soon as it has initialized.
                    if matches!(self.py, PyState::Pending(n) if n % 2 == 0 || !self.launched) {
                        self.setup_python(ebpf);
                    } else if let PyState::Pending(n) = &mut self.py {
                        *n += 1;
                    }
                    self.consume(ring.get_mut(), &stacks);
                    if let Some(c) = &mut copies {
                        while let Some(item) = c.next() {
                            std::hint::black_box(item.len());
                        }
                    }
                }
                _ = tick.tick() => {
                    self.sample_rss();
                    self.timeline.sample(self.started.elapsed().as_secs_f64(), &self.ledger, self.rss, self.threads);
                    self.resolve_stacks(&stacks);
                }
                _ = budget_tick.tick() => {
                    if self.heap_detached.is_none()
                        && let Some(window) = meter.window(&hits, &counters, bpf_run_ns(ebpf, &self.session_prog, stats.is_some()), &self.sites)
                    {
                        self.check_budget(ebpf, &window);
                        self.overhead = Some(window);
                    }
                }
                _ = report_tick.tick() => {
                    if self.config.format == Format::Text {
                        let r = self.report(&counters, false, None);
                        self.write(&report::render_text(&r, self.config.max_frames))?;
                    }
                }
                _ = sigchld.recv(), if self.launched => {
                    loop {
                    let sent = counters
                        .get(&counter::EXEC_MAP_STOPS, 0)
                        .map(|v| v.iter().sum::<u64>())
                        .unwrap_or(0);
                    let mut ours = sent - self.exec_stops_seen;
                    let before = ours;
                    let stop = launch::poll_child(self.pid, &mut ours);
                    self.exec_stops_seen += before - ours;
                    match stop {
                        launch::ChildStop::MappedCode => {
                            if let Some((u, t)) = &mut self.unwind {
                                u.sync(t);
                            }
                            launch::resume(self.pid);
                            continue;
                        }
                        launch::ChildStop::Exiting => {
                            // Its mappings are still there: take everything we need from them now.
                            self.consume(ring.get_mut(), &stacks);
                            self.sample_rss();
                            self.walk_heaps();
                            symbols_for(&mut self.symbols, self.pid).refresh_maps();
                            self.resolve_stacks(&stacks);
                            launch::detach(self.pid);
                        }
                        launch::ChildStop::Exited(how, code) => self.exit_status = Some(format!("{how} {code}")),
                        launch::ChildStop::None => {}
                    }
                    break;
                    }
                }
                _ = sigint.recv() => break ("interrupted".to_owned(), true),
                _ = sigterm.recv() => break ("terminated".to_owned(), false),
                () = &mut deadline => break ("duration elapsed".to_owned(), false),
                r = async { match &pidfd { Some(fd) => fd.readable().await.map(|mut g| g.clear_ready()), None => std::future::pending().await } } => {
                    let _ = r;
                    self.target_exited = true;
                    self.reap();
                    break (format!("target exited{}", self.exit_status.as_deref().map(|s| format!(", {s}")).unwrap_or_default()), false);
                }
            }
        };
        // Whatever is still in the ring buffer belongs in the final report.
        drain(
            ring.get_mut(),
            &mut self.ledger,
            &mut self.known_stacks,
            &mut self.pending_stacks,
            &mut false,
        );
        if !self.target_exited {
            self.sample_rss();
        }
        self.timeline.sample(
            self.started.elapsed().as_secs_f64(),
            &self.ledger,
            self.rss,
            self.threads,
        );
        self.resolve_stacks(&stacks);
        // The whole run's figures, unless the budget stopped the heap probes: then
        // the window that tripped it is the one to show.
        if self.heap_detached.is_none()
            && let Some(whole) = meter.whole_run(
                &hits,
                &counters,
                bpf_run_ns(ebpf, &self.session_prog, stats.is_some()),
                &self.sites,
            )
        {
            self.overhead = Some(whole);
        }
        if stats.is_some()
            && let Some(o) = self.overhead.as_mut()
        {
            o.bpf_programs = program_costs(ebpf, &self.session_prog);
        }
        if self.config.dry_run {
            let o = self.overhead.clone().unwrap_or_default();
            let text = match self.config.format {
                Format::Text => report::render_dry_run(self.pid, self.started.elapsed().as_secs_f64(), &o, &reason),
                Format::Json => serde_json::to_string_pretty(&serde_json::json!({
                    "pid": self.pid, "dry_run": true, "duration_s": self.started.elapsed().as_secs_f64(),
                    "end_reason": reason, "overhead": o,
                })).expect("serializes") + "\n",
            };
            self.write(&text)?;
            let report = self.report(&counters, true, Some(reason));
            return Ok(Outcome {
                report,
                interrupted,
            });
        }
        let report = self.report(&counters, true, Some(reason));
        let text = match self.config.format {
            Format::Text => report::render_text(&report, self.config.max_frames),
            Format::Json => {
                serde_json::to_string_pretty(&report).expect("report serializes") + "\n"
            }
        };
        self.write(&text)?;
        Ok(Outcome {
            report,
            interrupted,
        })
    }

    /// Applies the waiting events, snapshots the mappings if code was mapped (a
    /// library loaded: read it while it is surely there), and fetches new stacks.
    fn consume(
        &mut self,
        ring: &mut RingBuf<MapData>,
        stacks: &BpfHashMap<MapData, i64, StackTrace>,
    ) {
        let mut exec_mapped = false;
        drain(
            ring,
            &mut self.ledger,
            &mut self.known_stacks,
            &mut self.pending_stacks,
            &mut exec_mapped,
        );
        if exec_mapped {
            symbols_for(&mut self.symbols, self.pid).refresh_maps();
            if let Some((u, t)) = &mut self.unwind {
                let before = u.stats.loaded_after_attach.len();
                u.sync(t);
                if self.config.announce {
                    for o in &u.stats.loaded_after_attach[before..] {
                        eprintln!("leaktrace: unwind tables loaded for {o} (mapped after attach)");
                    }
                }
            }
        }
        self.fetch_new_stacks(stacks);
    }

    /// Loads the unwind tables of the target's code before the probes are enabled
    /// (a launched command's, once it has exec'd and mapped its libraries).
    fn setup_unwind(&mut self, ebpf: &mut Ebpf) -> Result<(), Error> {
        let Some(mut u) = self.unwinder.take() else {
            return Ok(());
        };
        let (rows, pages) = u.capacity();
        let mut tables = crate::unwind::BpfTables::take(ebpf, rows, pages)
            .map_err(|e| Error::Runtime(std::io::Error::other(format!("{e:#}"))))?;
        if !self.launched {
            u.sync(&mut tables);
            log::info!(
                "unwind tables: {} objects, {} rows, {} KiB, {:.0} ms",
                u.stats.objects,
                u.stats.rows,
                u.stats.table_bytes / 1024,
                u.stats.build_ms
            );
            u.set_attached();
        }
        self.unwind = Some((u, tables));
        Ok(())
    }

    /// Detaches the heap probes if their projected cost is over the budget.
    fn check_budget(&mut self, ebpf: &mut Ebpf, window: &report::Overhead) {
        let Some(max) = self.config.max_overhead_pct else {
            return;
        };
        if window.projected_pct <= max || self.config.dry_run {
            return;
        }
        let Some(links) = self.heap_links.take() else {
            return;
        };
        // Stop every heap program at once, then take the probes out.
        if let Err(e) = enable(ebpf, leaktrace_common::ENABLE_SYSCALLS) {
            log::warn!("failed to stop the heap probes: {e}");
        }
        detach_heap(ebpf, links);
        let after_s = self.started.elapsed().as_secs_f64();
        let reason = format!(
            "projected probe cost {:.1}% of the target's CPU time exceeded --max-overhead {max}% ({:.0} allocator calls/s)",
            window.projected_pct,
            window.calls_per_s.values().sum::<f64>()
        );
        log::warn!("heap probes detached after {after_s:.1} s: {reason}");
        self.heap_detached = Some(report::HeapDetached { after_s, reason });
    }

    fn write(&mut self, s: &str) -> Result<(), Error> {
        let path = self
            .config
            .output
            .as_ref()
            .map_or("stdout".into(), |p| p.display().to_string());
        self.out
            .write_all(s.as_bytes())
            .and_then(|()| self.out.flush())
            .map_err(|source| Error::Output { path, source })
    }

    fn sample_rss(&mut self) {
        if let Ok(st) = procfs::read_status(self.pid)
            && st.has_mm
        {
            self.rss = st.rss;
            self.threads = st.threads;
        }
    }

    /// Walks glibc's heaps in the target's memory, if it is alive (kept for later reports).
    fn walk_heaps(&mut self) {
        if !self.config.walk_heaps || self.target_exited {
            return;
        }
        let (Ok(maps), Ok(mem)) = (
            procfs::read_maps(self.pid),
            crate::glibc_heap::ProcMemory::open(self.pid),
        ) else {
            return;
        };
        let t = Instant::now();
        let sites = crate::glibc_heap::find_sites(
            &maps,
            procfs::read_start_brk(self.pid),
            self.ledger.brk(),
        );
        let w = crate::glibc_heap::walk_heaps(&mem, &sites);
        log::debug!(
            "walked glibc heaps in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        if !w.arenas.is_empty() || !w.unwalkable.is_empty() {
            self.walk = Some(w);
        }
    }

    fn reap(&mut self) {
        if !self.launched || self.exit_status.is_some() {
            return;
        }
        let mut status = 0;
        // SAFETY: reaping our own launched child.
        let r = unsafe { libc::waitpid(self.pid as i32, &raw mut status, libc::WNOHANG) };
        if r == self.pid as i32 {
            self.exit_status = Some(if libc::WIFEXITED(status) {
                format!("exit status {}", libc::WEXITSTATUS(status))
            } else if libc::WIFSIGNALED(status) {
                format!("killed by signal {}", libc::WTERMSIG(status))
            } else {
                "stopped".to_owned()
            });
        }
    }

    /// Reads new stacks from the kernel as soon as they appear and, if one points
    /// outside the mappings snapshot (an object mapped since), takes a new snapshot
    /// now, while the target is surely alive: symbolization comes later and must
    /// work even if the target has exited by then.
    fn fetch_new_stacks(&mut self, stacks: &BpfHashMap<MapData, i64, StackTrace>) {
        if self.pending_stacks.is_empty() {
            return;
        }
        let symbols = symbols_for(&mut self.symbols, self.pid);
        let mut uncovered = false;
        for id in self.pending_stacks.drain(..) {
            match stacks.get(&id, 0) {
                Ok(st) => {
                    uncovered |= !symbols.covers(&st);
                    if st.py_stack >= 0
                        && let Some(py) = &self.py_stacks
                    {
                        match py.get(&st.py_stack, 0) {
                            Ok(ps) => {
                                self.py_raw.insert(id, ps);
                            }
                            Err(_) => self.ledger.counters.stack_unreadable += 1,
                        }
                    }
                    self.fetched_stacks.push((id, st));
                }
                // The kernel stores a stack before sending its id, so this is a loss to show.
                Err(_) => self.ledger.counters.stack_unreadable += 1,
            }
        }
        if uncovered {
            symbols.refresh_maps();
        }
    }

    fn resolve_stacks(&mut self, stacks: &BpfHashMap<MapData, i64, StackTrace>) {
        self.fetch_new_stacks(stacks);
        if self.fetched_stacks.is_empty() {
            return;
        }
        symbols_for(&mut self.symbols, self.pid).resolve(&self.fetched_stacks);
        self.merge_python();
        self.fetched_stacks.clear();
    }

    /// Finds the interpreter and tells BPF where its frames are (retried while a
    /// launched command has not yet started Python).
    fn setup_python(&mut self, ebpf: &mut Ebpf) {
        let PyState::Pending(tries) = self.py else {
            return;
        };
        let fsbase = crate::btf::Btf::from_sys()
            .ok()
            .and_then(|b| b.member_offset("task_struct", &["thread", "fsbase"]));
        let found = match (
            procfs::read_maps(self.pid),
            crate::glibc_heap::ProcMemory::open(self.pid),
        ) {
            (Ok(maps), Ok(mem)) => {
                // In launch mode the objects come from the program's file; map them by name.
                let objects: Vec<(String, PathBuf)> = if self.launched {
                    maps.iter()
                        .filter(|m| m.is_file())
                        .map(|m| (m.path.clone(), procfs::path_in_target(self.pid, &m.path)))
                        .collect()
                } else {
                    self.objects.clone()
                };
                crate::python::detect(&mem, &maps, &objects, fsbase)
            }
            (Err(e), _) | (_, Err(e)) => Err(format!("cannot read the target: {e}")),
        };
        self.py = match found {
            Ok(Some(t)) => match ebpf
                .map_mut(maps::PY_CONFIG)
                .map(Array::<_, leaktrace_common::PyConfig>::try_from)
            {
                Some(Ok(mut a)) => match a.set(0, t.config, 0) {
                    Ok(()) => {
                        log::info!(
                            "CPython 3.{} in {}: Python frames on",
                            t.version.1,
                            t.object
                        );
                        PyState::Ready(Box::new(t))
                    }
                    Err(e) => {
                        PyState::Unavailable(format!("failed to configure the Python walk: {e}"))
                    }
                },
                _ => PyState::Unavailable("PY_CONFIG map missing".into()),
            },
            // Not started yet (launch mode) or still initializing: retry for ~10 s.
            Ok(None) | Err(_) if tries < 1000 && self.launched => PyState::Pending(tries + 1),
            Ok(None) => PyState::Unavailable("no object defining _PyRuntime is mapped".into()),
            Err(why) => PyState::Unavailable(why),
        };
        if let PyState::Unavailable(why) = &self.py {
            log::warn!("no Python frames: {why}");
        }
    }

    /// What the report says about the interpreter.
    fn python_info(&self) -> Option<report::PythonInfo> {
        let (major, minor) = self.python?;
        let arena = if minor >= 10 { "1 MiB" } else { "256 KiB" };
        let note = format!(
            "Objects of 512 bytes or less come from pymalloc's {arena} arenas, not malloc: small-object growth shows as \
             pymalloc arenas under the mappings, charged to the Python stack that opened each arena. leaktrace does not \
             probe PyObject_Malloc (LTO builds inline it at hundreds of call sites, so a probe there would see a fraction)."
        );
        let (frames, unavailable, object) = match &self.py {
            PyState::Ready(t) => (true, None, t.object.clone()),
            PyState::Unavailable(why) => (false, Some(why.clone()), String::new()),
            PyState::Pending(_) => (
                false,
                Some("the interpreter had not initialized yet".into()),
                String::new(),
            ),
            PyState::Off => (
                false,
                Some("turned off with --no-python".into()),
                String::new(),
            ),
        };
        let object = if object.is_empty() {
            self.objects
                .iter()
                .map(|(t, _)| t.as_str())
                .find(|t| crate::python::version_from_name(t).is_some())
                .unwrap_or("?")
                .to_owned()
        } else {
            object
        };
        Some(report::PythonInfo {
            version: format!("{major}.{minor}"),
            object,
            frames,
            unavailable,
            note,
        })
    }

    /// Interleaves the Python frames of newly resolved stacks into their native frames.
    fn merge_python(&mut self) {
        if self.py_raw.is_empty() {
            return;
        }
        let PyState::Ready(t) = &self.py else {
            self.py_raw.clear();
            return;
        };
        let Ok(mem) = crate::glibc_heap::ProcMemory::open(self.pid) else {
            return;
        };
        let symbols = symbols_for(&mut self.symbols, self.pid);
        for (id, _) in &self.fetched_stacks {
            let Some(ps) = self.py_raw.remove(id) else {
                continue;
            };
            let n = (ps.len as usize).min(ps.frames.len());
            let py: Vec<(crate::symbols::Frame, bool)> = ps.frames[..n]
                .iter()
                .map(|&f| {
                    (
                        self.py_symbols.frame(&mem, t, f),
                        f.instr & leaktrace_common::PY_FRAME_EDGE != 0,
                    )
                })
                .collect();
            if let Some(stack) = symbols.stack_mut(*id) {
                let native = std::mem::take(&mut stack.frames);
                stack.frames = crate::python::interleave(native, py, t.version.1 <= 10);
                stack.truncated |= ps.flags & leaktrace_common::STACK_TRUNCATED != 0;
            }
        }
    }

    fn report(
        &mut self,
        counters: &PerCpuArray<MapData, u64>,
        final_report: bool,
        reason: Option<String>,
    ) -> Report {
        if !self.target_exited {
            self.walk_heaps();
        }
        let environ = crate::glibc_heap::read_environ(self.pid);
        let malloc_env: Vec<String> = environ
            .iter()
            .filter(|(k, _)| {
                k.starts_with("MALLOC_")
                    || k == "GLIBC_TUNABLES"
                    || k == "LD_PRELOAD"
                    || k.starts_with("PYTHONMALLOC")
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let arena_limit = self
            .walk
            .as_ref()
            .map(|_| crate::glibc_heap::arena_limit(&environ, crate::glibc_heap::online_cpus()));
        let thread_names = thread_names(self.pid);
        let kernel: Vec<u64> = (0..counter::COUNT)
            .map(|i| counters.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0))
            .collect();
        let now_ns = monotonic_ns();
        let python_info = self.python_info();
        let symbols = symbols_for(&mut self.symbols, self.pid);
        report::build(&report::Inputs {
            pid: self.pid,
            ledger: &self.ledger,
            symbols,
            kernel_counters: &kernel,
            rss: self.rss,
            duration_s: self.started.elapsed().as_secs_f64(),
            now_ns,
            top: self.config.top,
            final_report,
            end_reason: reason,
            target_exited: self.target_exited,
            probes: &self.probes,
            overhead: self.overhead.clone(),
            heap_detached: self.heap_detached.clone(),
            timeline: &self.timeline,
            min_age_s: self.config.min_age.map_or(0.0, |d| d.as_secs_f64()),
            walk: self.walk.as_ref(),
            arena_limit,
            malloc_env,
            python: python_info,
            thread_names: &thread_names,
            unwinder: if !self.config.capture_stacks {
                "off"
            } else if self.config.copy_stacks {
                "stack-copy (benchmark)"
            } else if self.unwind.is_some() {
                "cfi"
            } else {
                "frame-pointers"
            },
            unwind: self.unwind.as_ref().map(|(u, _)| &u.stats),
        })
    }
}

const PROT_EXEC: u64 = 4;

/// Names of a process's threads, by thread id.
fn thread_names(pid: u32) -> rustc_hash::FxHashMap<u32, String> {
    let mut m = rustc_hash::FxHashMap::default();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok())
            && let Ok(comm) = std::fs::read_to_string(e.path().join("comm"))
        {
            m.insert(tid, comm.trim().to_owned());
        }
    }
    m
}

/// CPython's (major, minor) if one of the objects is a Python interpreter or libpython.
pub fn python_version<'a>(objects: impl Iterator<Item = &'a str>) -> Option<(u32, u32)> {
    objects
        .filter_map(|o| {
            let base = o.rsplit('/').next()?;
            let rest = base
                .strip_prefix("libpython")
                .or_else(|| base.strip_prefix("python"))?;
            let (major, rest) = rest.split_once('.')?;
            let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .find(|&(major, _)| major == 3)
}

/// Measures allocator call rates (from the kernel's hit counters) and the target's CPU time.
struct Meter {
    pid: u32,
    dry_run: bool,
    /// Functions probed by uprobe sessions (their unsampled calls skip the return trap).
    session_funcs: Vec<AllocFn>,
    start: (Instant, Vec<u64>, Option<f64>),
    last: (Instant, Vec<u64>, Option<f64>),
    /// Time spent in our BPF programs (kernel BPF statistics) at `start` and `last`,
    /// when the statistics are on.
    bpf_ns: (Option<u64>, Option<u64>),
}

/// (name, total run time ns, runs) of each of our programs, the session program
/// included, from the kernel's BPF statistics (zero while they are off).
fn program_times<'a>(
    ebpf: &'a Ebpf,
    session: &'a SessionProg,
) -> impl Iterator<Item = (&'a str, u64, u64)> + 'a {
    ebpf.programs()
        .filter_map(|(name, p)| {
            let i = p.info().ok()?;
            Some((name, i.run_time().as_nanos() as u64, i.run_count()))
        })
        .chain(session.iter().filter_map(|p| {
            let (ns, runs) = p.run_stats().ok()?;
            Some(("alloc_session", ns, runs))
        }))
}

/// Each program that ran: runs and mean run time.
fn program_costs(
    ebpf: &Ebpf,
    session: &SessionProg,
) -> std::collections::BTreeMap<String, report::ProgramCost> {
    program_times(ebpf, session)
        .filter(|&(_, _, runs)| runs > 0)
        .map(|(name, ns, runs)| {
            (
                name.to_owned(),
                report::ProgramCost {
                    runs,
                    ns_per_run: ns as f64 / runs as f64,
                },
            )
        })
        .collect()
}

/// Nanoseconds the kernel has spent in our programs since they were loaded; `None`
/// unless BPF run-time statistics are on (`BPF_ENABLE_STATS`).
fn bpf_run_ns(ebpf: &Ebpf, session: &SessionProg, stats_on: bool) -> Option<u64> {
    stats_on.then(|| program_times(ebpf, session).map(|(_, ns, _)| ns).sum())
}

impl Meter {
    fn new(pid: u32, dry_run: bool, session_funcs: Vec<AllocFn>) -> Self {
        let now = (Instant::now(), vec![0; 17], procfs::cpu_seconds(pid));
        Self {
            pid,
            dry_run,
            session_funcs,
            start: now.clone(),
            last: now,
            bpf_ns: (None, None),
        }
    }

    /// Hits per function (indices 0..16), then the unsampled-call counter (index 16).
    fn read(
        &self,
        hits: &PerCpuArray<MapData, u64>,
        counters: &PerCpuArray<MapData, u64>,
    ) -> (Instant, Vec<u64>, Option<f64>) {
        let sum = |m: &PerCpuArray<MapData, u64>, i: u32| {
            m.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0)
        };
        let mut counts: Vec<u64> = (0..16u32).map(|i| sum(hits, i)).collect();
        counts.push(sum(counters, leaktrace_common::counter::UNSAMPLED));
        (Instant::now(), counts, procfs::cpu_seconds(self.pid))
    }

    fn between(
        from: &(Instant, Vec<u64>, Option<f64>),
        to: &(Instant, Vec<u64>, Option<f64>),
        bpf_ns: (Option<u64>, Option<u64>),
        sites: &[ProbeSite],
        dry_run: bool,
        session_funcs: &[AllocFn],
    ) -> Option<report::Overhead> {
        let secs = to.0.duration_since(from.0).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let rates: Vec<(AllocFn, f64)> = AllocFn::ALL
            .iter()
            .map(|&f| {
                (
                    f,
                    to.1[f as usize].saturating_sub(from.1[f as usize]) as f64 / secs,
                )
            })
            .filter(|&(_, r)| r > 0.0)
            .collect();
        // The traps, from the per-trap model; the programs' own time, measured when the
        // kernel's BPF statistics are on (it grows with stack depth, which no model knows).
        let bpf_cpu = match bpf_ns {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e9 / secs),
            _ => None,
        };
        let calls: f64 = rates.iter().map(|(_, r)| r).sum();
        // Under uprobe sessions an unsampled malloc or calloc skips its return trap. The
        // unsampled counter covers every function, so it is capped by the sessions' calls.
        let session_rate: f64 = rates
            .iter()
            .filter(|(f, _)| session_funcs.contains(f))
            .map(|(_, r)| r)
            .sum();
        let unsampled = to.1[16].saturating_sub(from.1[16]) as f64 / secs;
        let skipped_share = if session_rate > 0.0 {
            (unsampled / session_rate).min(1.0)
        } else {
            0.0
        };
        let saved_cpu = session_rate * skipped_share * crate::overhead::RETURN_US / 1e6;
        let projected =
            crate::overhead::projected_cpu(sites, &rates) - saved_cpu + bpf_cpu.unwrap_or(0.0);
        let target = match (from.2, to.2) {
            (Some(a), Some(b)) => (b - a) / secs,
            _ => 0.0,
        };
        // What the probes attached now cost the target (in a dry run, only the entry traps).
        let current = if dry_run {
            crate::overhead::entry_only_cpu(sites, &rates)
        } else {
            projected
        };
        Some(report::Overhead {
            window_s: secs,
            calls_per_s: rates
                .iter()
                .map(|(f, r)| (f.symbol().to_owned(), *r))
                .collect(),
            cost_per_call_us: rates
                .iter()
                .map(|(f, _)| {
                    let skipped = if session_funcs.contains(f) {
                        skipped_share * crate::overhead::RETURN_US
                    } else {
                        0.0
                    };
                    (
                        f.symbol().to_owned(),
                        crate::overhead::cost_for(sites, *f) - skipped,
                    )
                })
                .collect(),
            projected_cpu_per_s: projected,
            bpf_cpu_per_s: bpf_cpu,
            bpf_us_per_call: bpf_cpu.filter(|_| calls > 0.0).map(|c| c * 1e6 / calls),
            bpf_programs: Default::default(),
            target_cpu_per_s: target,
            projected_pct: crate::overhead::overhead_pct(projected, target - current),
        })
    }

    /// The last window (since the previous call).
    fn window(
        &mut self,
        hits: &PerCpuArray<MapData, u64>,
        counters: &PerCpuArray<MapData, u64>,
        bpf_ns: Option<u64>,
        sites: &[ProbeSite],
    ) -> Option<report::Overhead> {
        let now = self.read(hits, counters);
        let w = Self::between(
            &self.last,
            &now,
            (self.bpf_ns.1, bpf_ns),
            sites,
            self.dry_run,
            &self.session_funcs,
        );
        self.last = now;
        self.bpf_ns.1 = bpf_ns;
        w
    }

    /// Sets the BPF run time at the start (statistics just turned on).
    fn start_bpf(&mut self, bpf_ns: Option<u64>) {
        self.bpf_ns = (bpf_ns, bpf_ns);
    }

    /// The whole run.
    fn whole_run(
        &self,
        hits: &PerCpuArray<MapData, u64>,
        counters: &PerCpuArray<MapData, u64>,
        bpf_ns: Option<u64>,
        sites: &[ProbeSite],
    ) -> Option<report::Overhead> {
        Self::between(
            &self.start,
            &self.read(hits, counters),
            (self.bpf_ns.0, bpf_ns),
            sites,
            self.dry_run,
            &self.session_funcs,
        )
    }
}

/// Applies every event waiting in the ring buffer, noting stack ids not seen before
/// and whether code was mapped.
fn drain(
    ring: &mut RingBuf<aya::maps::MapData>,
    ledger: &mut Ledger,
    known: &mut rustc_hash::FxHashSet<i64>,
    pending: &mut Vec<i64>,
    exec_mapped: &mut bool,
) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        n += 1;
        if item.len() < size_of::<Event>() {
            ledger.counters.bad_events += 1;
            continue;
        }
        // SAFETY: the buffer holds at least one Event, a Pod written by our BPF program;
        // read_unaligned copes with any alignment.
        let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        ledger.apply(&ev);
        if ev.stack_id >= 0 && known.insert(ev.stack_id) {
            pending.push(ev.stack_id);
        }
        if ev.kind == leaktrace_common::kind::MMAP && ev.aux & PROT_EXEC != 0 {
            *exec_mapped = true;
        }
    }
    n
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn async_fd<T: AsRawFd>(inner: T) -> Result<AsyncFd<T>, Error> {
    // SAFETY: `inner` owns its descriptor, which stays open as long as the AsyncFd holds it.
    unsafe { AsyncFd::register(inner) }.map_err(|e| Error::Runtime(e.into()))
}
