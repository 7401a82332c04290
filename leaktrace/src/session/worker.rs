//! The session's worker thread: the slow work the event loop must not wait for.
//!
//! It owns everything that reads the target at length or parses files: the stack
//! maps (new stacks are read as soon as their ids appear), the native symbolizer
//! and CPython's code objects, the unwind tables of code mapped after attach,
//! finding the interpreter (retried every 20 ms while a launched one starts, with
//! the kernel's BTF parsed once), the heap walks, and what a report reads from
//! `/proc`. The event loop sends [`Job`]s and receives [`Reply`]s in the same order;
//! it never blocks on one while events flow.

use std::{
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use leaktrace_common::{PY_FRAME_EDGE, PyConfig, PyStack, STACK_TRUNCATED, StackTrace};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::mpsc::UnboundedSender;

use crate::{
    analysis::memory::{self, MemoryMap},
    heap::{
        NotRead, OtherState,
        census::{self, Census},
        glibc::{self, ArenaLimit, HeapWalk},
        go, jemalloc, mimalloc, pygc,
        pymalloc::{self, PymallocWalk},
        reach, tcmalloc,
    },
    probes::{
        allocators::{Allocator, Found},
        btf::Btf,
    },
    process::{Memory as _, ProcMemory, procfs},
    report::PythonInfo,
    symbolize::{
        Frame, Stack,
        native::{Symbols, Unnamed},
        python::{self, Interpreter, PySymbols, PyTarget},
    },
    unwind::{BpfTables, UnwindStats, Unwinder},
};

/// How often a launched command is looked at for a started interpreter.
const PY_RETRY: Duration = Duration::from_millis(20);
/// Attempts before a launched command is taken not to start Python (~20 s).
const PY_ATTEMPTS: u32 = 1000;

/// What the worker starts with.
pub struct Setup {
    /// The traced process.
    pub pid: u32,
    /// A command leaktrace launched (its objects appear only once it has exec'd).
    pub launched: bool,
    /// Objects mapped at attach: path in the target, host path.
    pub objects: Vec<(String, PathBuf)>,
    /// The kernel's native stacks.
    pub stacks: BpfHashMap<MapData, i64, StackTrace>,
    /// The kernel's Python stacks.
    pub py_stacks: BpfHashMap<MapData, i64, PyStack>,
    /// Where the Python walk is told where the interpreter is.
    pub py_config: Array<MapData, PyConfig>,
    /// Walk Python frames (else the interpreter is only reported).
    pub python_stacks: bool,
    /// The CFI unwinder and its maps.
    pub unwind: Option<(Unwinder, BpfTables)>,
    /// Say on stderr when tables are loaded for code mapped after attach.
    pub announce: bool,
    /// Walk glibc's heaps for reports.
    pub walk_heaps: bool,
    /// Take the census of the live heap by type.
    pub census: bool,
    /// Scan for who keeps the heap alive at the final report.
    pub reachability: bool,
    /// The allocator serving `malloc` when it is not glibc's: the brk heap and the
    /// anonymous mappings are then its, which leaktrace does not walk.
    pub heap_owner: Option<Allocator>,
    /// The target is a Go program: its heap arenas are classified by address.
    pub go: bool,
    /// The allocators found: those whose state leaktrace reads are read with each
    /// reading of where RSS goes.
    pub allocators: Vec<Found>,
    /// Directories searched for debug information first.
    pub debug_dirs: Vec<PathBuf>,
}

/// What the event loop asks for.
#[derive(Debug)]
pub enum Job {
    /// Stack ids seen in events for the first time: read them from the kernel now.
    NewStacks(Vec<i64>),
    /// Stacks aged out: their entries leave the kernel's maps, which stay roomy for
    /// the stacks that matter in a run of days (one that recurs is stored again).
    Forget(Vec<i64>),
    /// An executable mapping appeared: snapshot the mappings, load its unwind table.
    CodeMapped,
    /// A launched command stopped after mapping code: load the tables, then reply
    /// [`Reply::Done`] so it is resumed.
    SyncUnwind(Then),
    /// The target exec'd a new program: its interpreter, if any, is looked for again.
    Exec,
    /// Symbolize the stacks read so far.
    Resolve,
    /// Everything a report needs from the target, after symbolizing what is pending;
    /// walk the heaps if `walk` (the heap's break is `brk`).
    Snapshot {
        /// What the reply is for.
        then: Then,
        /// The brk heap's end, from the ledger.
        brk: Option<u64>,
        /// Walk the heaps (the target is alive and walks are on).
        walk: bool,
    },
    /// A launched command is about to exit, its mappings still there: take what
    /// later reports need from them (mappings, stacks, heaps), then reply.
    Exiting {
        /// What the reply is for.
        then: Then,
        /// The brk heap's end, from the ledger.
        brk: Option<u64>,
    },
}

/// What the event loop does with a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Resume the stopped child.
    Resume,
    /// Let the child finish exiting.
    Detach,
    /// Print an interval report.
    IntervalReport,
    /// Build the final report.
    FinalReport,
    /// Refresh the live view's and the metrics' snapshot.
    Refresh,
}

/// The worker's answers.
#[derive(Debug)]
pub enum Reply {
    /// Set up: the unwind tables of the code mapped at attach are loaded and the
    /// interpreter looked for; the probes may be enabled.
    Ready,
    /// Newly resolved stacks, and stacks the kernel no longer had.
    Stacks {
        /// Resolved stacks, Python frames interleaved.
        stacks: Vec<(i64, Stack)>,
        /// Stack ids whose stack could not be read (a loss to show).
        unreadable: u64,
    },
    /// The job is done.
    Done(Then),
    /// The target's CPython interpreter was identified (its frames may come later):
    /// (major, minor), or `None` once an exec replaced it.
    Interpreter(Option<(u32, u32)>),
    /// What a report needs from the target.
    Snapshot(Then, Box<Snapshot>),
}

/// What a report reads from the target, besides the books.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// The latest walk of glibc's heaps (kept from an earlier report once the target
    /// is gone).
    pub walk: Option<HeapWalk>,
    /// glibc's arena limit, when its heaps were walked.
    pub arena_limit: Option<ArenaLimit>,
    /// malloc settings in the target's environment (`NAME=value`).
    pub malloc_env: Vec<String>,
    /// The target's thread names, by thread id.
    pub thread_names: FxHashMap<u32, String>,
    /// The interpreter, if the target is CPython.
    pub python: Option<PythonInfo>,
    /// The unwind tables loaded, with CFI.
    pub unwind: Option<UnwindStats>,
    /// Where RSS goes (read now, or the last reading once the target is gone).
    pub memory: MemoryMap,
    /// The latest walk of pymalloc's arenas, if the target is CPython.
    pub pymalloc: Option<PymallocWalk>,
    /// Other allocators' own state (the latest reading).
    pub other: OtherState,
    /// The live heap by type (the latest census, ranked against the one at attach).
    pub census: Option<Census>,
    /// Objects in which some of the stacks' addresses had no symbol.
    pub unnamed: Vec<Unnamed>,
    /// Who keeps the heap alive (the final report's, where glibc's heap was walked).
    pub reach: Option<reach::Reachability>,
}

/// The event loop's end of the worker.
pub struct Handle {
    jobs: mpsc::Sender<Job>,
    thread: std::thread::JoinHandle<()>,
}

impl Handle {
    /// Starts the worker; its replies go to `replies`.
    pub fn start(setup: Setup, replies: UnboundedSender<Reply>) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("leaktrace-worker".into())
            .spawn(move || Worker::new(setup, replies).run(&rx))?;
        Ok(Self { jobs, thread })
    }

    /// Queues a job (ignored if the worker has stopped: its replies say so by not coming).
    pub fn send(&self, job: Job) {
        let _ = self.jobs.send(job);
    }

    /// Lets the worker go without waiting for it: leaktrace is ending early (a signal
    /// while starting) and exits with the worker in whatever it was doing.
    pub fn abandon(self) {
        drop(self.jobs);
    }

    /// Stops the worker once its queue is done, and waits for it.
    pub fn stop(self) {
        let Self { jobs, thread } = self;
        drop(jobs);
        let _ = thread.join();
    }
}

/// Sets the time of the next attempt when an attempt ends.
struct RetryAfter<'a>(&'a mut Instant);

impl Drop for RetryAfter<'_> {
    fn drop(&mut self) {
        *self.0 = Instant::now() + PY_RETRY;
    }
}

/// Whether Python frames are walked.
#[derive(Debug)]
enum PyState {
    /// No interpreter among the objects mapped so far (looked for again when code is
    /// mapped or the target execs).
    Absent,
    /// An interpreter was found; its runtime is not ready to read yet (what its file
    /// says, once read; attempts so far).
    Pending(Box<Interpreter>, Option<Box<python::Loaded>>, u32),
    /// Frames are walked.
    Ready(Box<Interpreter>, Box<PyTarget>),
    /// An interpreter whose frames cannot be walked, and why.
    Unavailable(Box<Interpreter>, String),
    /// An interpreter whose frames were turned off with --no-python.
    Off(Box<Interpreter>),
}

impl PyState {
    fn interpreter(&self) -> Option<&Interpreter> {
        match self {
            Self::Absent => None,
            Self::Pending(i, ..) | Self::Ready(i, _) | Self::Unavailable(i, _) | Self::Off(i) => {
                Some(i)
            }
        }
    }
}

/// Everything about the target's Python frames.
struct Python {
    state: PyState,
    /// Python stacks read with their native stack, by native stack id, until symbolized.
    raw: FxHashMap<i64, PyStack>,
    /// Code objects read so far.
    symbols: PySymbols,
    /// `task_struct.thread.fsbase`'s offset from the kernel's BTF, parsed once.
    fsbase: Option<Option<u64>>,
    /// When a pending interpreter is looked for next.
    next_try: Instant,
    /// Objects (by device and inode) already found not to be an interpreter.
    not_python: FxHashSet<(u64, u64)>,
    /// Looks for an interpreter while none was found.
    absent_tries: u32,
}

/// The heaps' address ranges: the brk heap and each arena heap's mapping.
fn heap_ranges(maps: &[procfs::MapEntry], sites: &glibc::HeapSites) -> Vec<(u64, u64)> {
    maps.iter()
        .filter(|m| sites.thread_heaps.contains(&m.start))
        .map(|m| (m.start, m.end))
        .chain(sites.main)
        .collect()
}

/// A reachability pass's time budget.
const REACH_BUDGET: Duration = Duration::from_secs(5);
/// Bytes a reachability pass reads at most.
const REACH_MAX_BYTES: u64 = 16 << 30;
/// Holders named in a report.
const REACH_TOP: usize = 10;

/// The roots of a reachability scan: every readable, writable mapping that is not one
/// of glibc's heaps; a thread's stack from its stack pointer up (less the red zone
/// below it), a loaded object's data and `.bss` (the anonymous mapping right after
/// it) named after the object.
fn reach_roots(
    maps: &[procfs::MapEntry],
    heap_ranges: &[(u64, u64)],
    stack_pointers: &[(u32, u64)],
    pid: u32,
) -> Vec<reach::Root> {
    let mut roots = Vec::new();
    let mut prev: Option<&procfs::MapEntry> = None;
    for m in maps {
        let last = prev.replace(m);
        if &m.perms[..2] != b"rw"
            || m.path.starts_with("[v")
            || heap_ranges.iter().any(|&(s, e)| s < m.end && m.start < e)
        {
            continue;
        }
        let memory = |start: u64| reach::Source::Memory { start, end: m.end };
        if let Some(&(tid, sp)) = stack_pointers
            .iter()
            .find(|&&(_, sp)| (m.start..m.end).contains(&sp))
        {
            roots.push(reach::Root {
                name: if tid == pid {
                    "the main thread's stack".into()
                } else {
                    format!("thread {tid}'s stack")
                },
                kind: reach::RootKind::Stack,
                object: None,
                source: memory(sp.saturating_sub(128).max(m.start)),
            });
            continue;
        }
        let object = if m.path.starts_with('/') {
            Some(m.path.clone())
        } else {
            last.filter(|l| m.path.is_empty() && l.end == m.start && l.path.starts_with('/'))
                .map(|l| l.path.clone())
        };
        let (name, kind) = match &object {
            Some(o) => (
                format!("{} data", o.rsplit('/').next().unwrap_or(o)),
                reach::RootKind::Data,
            ),
            None if m.path == "[stack]" => {
                ("the main thread's stack".into(), reach::RootKind::Stack)
            }
            None => (
                format!("anonymous mapping at {:#x}", m.start),
                reach::RootKind::Mapping,
            ),
        };
        roots.push(reach::Root {
            name,
            kind,
            object,
            source: memory(m.start),
        });
    }
    roots
}

/// Anonymous read-write mappings outside the heaps and the threads' stacks: where
/// pymalloc's arenas and chunks malloc mapped on their own lie.
fn anon_regions(
    maps: &[procfs::MapEntry],
    heap_ranges: &[(u64, u64)],
    stack_pointers: &[(u32, u64)],
) -> Vec<(u64, u64)> {
    maps.iter()
        .filter(|m| m.path.is_empty() && &m.perms[..2] == b"rw")
        .filter(|m| !heap_ranges.iter().any(|&(s, e)| s < m.end && m.start < e))
        .filter(|m| {
            !stack_pointers
                .iter()
                .any(|&(_, sp)| (m.start..m.end).contains(&sp))
        })
        .map(|m| (m.start, m.end))
        .collect()
}

/// Where `object`'s first mapping starts (0: not mapped): a layout found in it holds
/// while it stays there.
fn first_mapping(maps: &[procfs::MapEntry], object: &str) -> u64 {
    maps.iter()
        .filter(|m| m.path == object)
        .map(|m| m.start)
        .min()
        .unwrap_or(0)
}

/// An allocator's layout found in an object, with the object's load bias, or why not.
type Located<L> = Result<(L, u64), String>;

struct Worker {
    setup: Setup,
    replies: UnboundedSender<Reply>,
    /// Created on first use (in launch mode only once the command has exec'd, so its
    /// first snapshot of the mappings is of the right program).
    symbols: Option<Symbols>,
    /// Stacks read from the kernel, waiting to be symbolized.
    fetched: Vec<(i64, StackTrace)>,
    /// Stack ids the kernel did not have, since the last reply.
    unreadable: u64,
    py: Python,
    /// The latest walk of glibc's heaps.
    walk: Option<HeapWalk>,
    /// The latest reading of where RSS goes.
    memory: MemoryMap,
    /// The latest walk of pymalloc's arenas (made with the reading of where RSS goes).
    pymalloc: Option<PymallocWalk>,
    /// Each allocator's layout and load bias, per object (and where it is mapped), or
    /// why not: found once.
    layouts: Layouts,
    /// Other allocators' state, read with where RSS goes.
    other: OtherState,
    /// Where Python objects start in their blocks, for the census (found once), or why not.
    census_layout: Option<Result<census::Layout, String>>,
    /// The snapshot being taken skips the census (the live view's and the metrics'
    /// refreshes: a census reads every live block, ~0.7 s per GiB, and they show none).
    no_census: bool,
    /// The census taken at attach (or when the interpreter was first found) and the latest.
    census_first: Option<Census>,
    census_last: Option<Census>,
    /// C++ classes by vtable, read from the objects mapped at the first census.
    vtables: Option<census::Vtables>,
    /// When the worker started (attach).
    started: Instant,
}

/// Allocators' layouts per (object, where it is mapped).
#[derive(Default)]
struct Layouts {
    jemalloc: FxHashMap<(String, u64), Located<jemalloc::Layout>>,
    mimalloc: FxHashMap<(String, u64), Located<mimalloc::Layout>>,
    tcmalloc: FxHashMap<(String, u64), Located<tcmalloc::Layout>>,
    go: FxHashMap<(String, u64), Located<go::Layout>>,
}

/// Reads an allocator's state in `object` with its layout, found the first time (in
/// the object, else in its debug file) and kept in `cache`.
fn read_located<L, S>(
    cache: &mut FxHashMap<(String, u64), Located<L>>,
    (pid, dirs, maps, object): (u32, &[std::path::PathBuf], &[procfs::MapEntry], &str),
    find: impl Fn(&[u8]) -> Result<L, String>,
    read: impl FnOnce(&L, u64) -> Result<S, String>,
) -> Result<S, String> {
    let start = first_mapping(maps, object);
    let found = cache.entry((object.to_owned(), start)).or_insert_with(|| {
        let t = Instant::now();
        let r = crate::heap::locate(pid, maps, object, dirs, find);
        log::debug!(
            "{} layout in {object} in {:.1} ms: {}",
            std::any::type_name::<L>(),
            t.elapsed().as_secs_f64() * 1e3,
            r.as_ref().map_or_else(Clone::clone, |_| "found".into())
        );
        r
    });
    match found {
        Ok((layout, bias)) => read(layout, *bias),
        Err(why) => Err(why.clone()),
    }
}

impl Worker {
    fn new(setup: Setup, replies: UnboundedSender<Reply>) -> Self {
        let py = Python {
            state: PyState::Absent,
            raw: FxHashMap::default(),
            symbols: PySymbols::default(),
            fsbase: None,
            next_try: Instant::now(),
            not_python: FxHashSet::default(),
            absent_tries: 0,
        };
        Self {
            setup,
            replies,
            symbols: None,
            fetched: Vec::new(),
            unreadable: 0,
            py,
            walk: None,
            memory: MemoryMap::default(),
            pymalloc: None,
            layouts: Layouts::default(),
            other: OtherState::default(),
            census_layout: None,
            no_census: false,
            census_first: None,
            census_last: None,
            vtables: None,
            started: Instant::now(),
        }
    }

    fn reply(&self, r: Reply) {
        let _ = self.replies.send(r);
    }

    fn run(mut self, jobs: &mpsc::Receiver<Job>) {
        self.load_attach_tables();
        self.find_python();
        // What the heap holds at attach, before the trace starts: what grows is
        // measured from here.
        self.census_now();
        self.reply(Reply::Ready);
        loop {
            let job = if self.python_pending() {
                // Jobs first: a launched command may be stopped until one is answered.
                match jobs.try_recv() {
                    Ok(j) => {
                        self.handle(j);
                        continue;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => break,
                    Err(mpsc::TryRecvError::Empty) => {}
                }
                let now = Instant::now();
                if now >= self.py.next_try {
                    self.find_python();
                    continue;
                }
                match jobs.recv_timeout(self.py.next_try - now) {
                    Ok(j) => j,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            };
            self.handle(job);
        }
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::NewStacks(ids) => self.fetch(&ids),
            Job::Forget(ids) => {
                for id in ids {
                    if let Ok(st) = self.setup.stacks.get(&id, 0)
                        && st.py_stack >= 0
                    {
                        let _ = self.setup.py_stacks.remove(&st.py_stack);
                    }
                    let _ = self.setup.stacks.remove(&id);
                }
            }
            Job::CodeMapped => {
                // Stacks recorded before the new code was mapped are named from the
                // mappings as they were, before the new code can replace them.
                if !self.fetched.is_empty() {
                    self.resolve();
                }
                self.symbols().refresh_maps();
                self.sync_unwind();
                if matches!(self.py.state, PyState::Absent) {
                    self.find_python();
                }
            }
            Job::SyncUnwind(then) => {
                // Held: the code just mapped is there to be seen (it may be gone, or
                // replaced, by the time its stacks are named).
                if !self.fetched.is_empty() {
                    self.resolve();
                }
                self.symbols().refresh_maps();
                self.sync_unwind();
                if matches!(self.py.state, PyState::Absent) {
                    self.find_python();
                }
                self.reply(Reply::Done(then));
            }
            Job::Exec => {
                // The old image's interpreter (and code objects) are gone.
                if self.py.state.interpreter().is_some() {
                    if let Err(e) = self.setup.py_config.set(0, PyConfig::default(), 0) {
                        log::warn!("failed to turn the Python walk off after exec: {e}");
                    }
                    self.py.state = PyState::Absent;
                    self.py.symbols = PySymbols::default();
                    self.py.raw.clear();
                    self.reply(Reply::Interpreter(None));
                }
                // So are its allocators' layouts and its heap's types: the census
                // restarts with the new image, like the books.
                self.census_layout = None;
                self.census_first = None;
                self.census_last = None;
                self.vtables = None;
                self.layouts = Layouts::default();
                self.other = OtherState::default();
                self.symbols().refresh_maps();
                self.find_python();
            }
            Job::Resolve => self.resolve(),
            Job::Snapshot { then, brk, walk } => {
                self.resolve();
                if walk {
                    self.no_census = then == Then::Refresh;
                    self.walk_heaps(brk);
                    self.no_census = false;
                    self.read_memory(brk);
                }
                let reach = (walk && then == Then::FinalReport && self.setup.reachability)
                    .then(|| self.reachability(brk))
                    .flatten();
                let gc = (walk && then == Then::FinalReport && self.setup.reachability)
                    .then(|| self.python_gc())
                    .flatten();
                let mut snap = self.snapshot();
                snap.reach = reach;
                if let (Some(p), Some(gc)) = (snap.python.as_mut(), gc) {
                    match gc {
                        Ok(gc) => p.gc = Some(gc),
                        Err(why) => p.gc_not_read = Some(why),
                    }
                }
                self.reply(Reply::Snapshot(then, Box::new(snap)));
            }
            Job::Exiting { then, brk } => {
                self.walk_heaps(brk);
                self.symbols().refresh_maps();
                self.resolve();
                self.reply(Reply::Done(then));
            }
        }
    }

    fn symbols(&mut self) -> &mut Symbols {
        let pid = self.setup.pid;
        let dirs = &self.setup.debug_dirs;
        self.symbols.get_or_insert_with(|| Symbols::new(pid, dirs))
    }

    /// Loads the unwind tables of the code mapped at attach (a launched command's
    /// are loaded at its first stop, once it has exec'd).
    fn load_attach_tables(&mut self) {
        if self.setup.launched {
            return;
        }
        if let Some((u, t)) = &mut self.setup.unwind {
            u.sync(t);
            log::info!(
                "unwind tables: {} objects, {} rows, {} KiB, {:.0} ms",
                u.stats.objects,
                u.stats.rows,
                u.stats.table_bytes / 1024,
                u.stats.build_ms
            );
            u.set_attached();
        }
    }

    /// Loads the tables of code mapped since the last sync.
    fn sync_unwind(&mut self) {
        let Some((u, t)) = &mut self.setup.unwind else {
            return;
        };
        let before = u.stats.loaded_after_attach.len();
        u.sync(t);
        if self.setup.announce {
            for o in &u.stats.loaded_after_attach[before..] {
                #[expect(
                    clippy::print_stderr,
                    reason = "progress line, shown with the attach line"
                )]
                {
                    eprintln!("leaktrace: unwind tables loaded for {o} (mapped after attach)");
                }
            }
        }
    }

    /// Reads new stacks from the kernel as soon as they appear and, if one points
    /// outside the mappings snapshot (an object mapped since), takes a new snapshot
    /// now, while the target is surely alive: symbolization comes later and must
    /// work even if the target has exited by then.
    fn fetch(&mut self, ids: &[i64]) {
        let mut uncovered = false;
        let mut fetched = Vec::with_capacity(ids.len());
        for &id in ids {
            match self.setup.stacks.get(&id, 0) {
                Ok(st) => {
                    if st.py_stack >= 0 {
                        match self.setup.py_stacks.get(&st.py_stack, 0) {
                            Ok(ps) => {
                                self.py.raw.insert(id, ps);
                            }
                            Err(_) => self.unreadable += 1,
                        }
                    }
                    fetched.push((id, st));
                }
                // The kernel stores a stack before sending its id, so this is a loss to show.
                Err(_) => self.unreadable += 1,
            }
        }
        let symbols = self.symbols();
        for (_, st) in &fetched {
            uncovered |= !symbols.covers(st);
        }
        if uncovered {
            symbols.refresh_maps();
        }
        self.fetched.extend(fetched);
    }

    /// Symbolizes the fetched stacks and sends them.
    fn resolve(&mut self) {
        if self.fetched.is_empty() {
            if self.unreadable > 0 {
                let unreadable = std::mem::take(&mut self.unreadable);
                self.reply(Reply::Stacks {
                    stacks: Vec::new(),
                    unreadable,
                });
            }
            return;
        }
        let fetched = std::mem::take(&mut self.fetched);
        let mut stacks = self.symbols().resolve(&fetched);
        self.merge_python(&mut stacks);
        let unreadable = std::mem::take(&mut self.unreadable);
        self.reply(Reply::Stacks { stacks, unreadable });
    }

    /// Interleaves the Python frames of newly resolved stacks into their native frames.
    fn merge_python(&mut self, stacks: &mut [(i64, Stack)]) {
        if self.py.raw.is_empty() {
            return;
        }
        let PyState::Ready(_, t) = &self.py.state else {
            self.py.raw.clear();
            return;
        };
        let Ok(mem) = ProcMemory::open(self.setup.pid) else {
            return;
        };
        for (id, stack) in stacks {
            let Some(ps) = self.py.raw.remove(id) else {
                continue;
            };
            let n = (ps.len as usize).min(ps.frames.len());
            let py: Vec<(Frame, bool)> = ps.frames[..n]
                .iter()
                .map(|&f| {
                    (
                        self.py.symbols.frame(&mem, t, f),
                        f.instr & PY_FRAME_EDGE != 0,
                    )
                })
                .collect();
            let native = std::mem::take(&mut stack.frames);
            stack.frames = t.interleave(native, py);
            stack.truncated |= ps.flags & STACK_TRUNCATED != 0;
        }
    }

    /// Whether an interpreter is looked for on a timer: found but not ready yet, or
    /// (launch mode) not found while the command may still map it.
    fn python_pending(&self) -> bool {
        match &self.py.state {
            PyState::Pending(..) => true,
            PyState::Absent => self.setup.launched && self.py.absent_tries < PY_ATTEMPTS,
            _ => false,
        }
    }

    /// Looks for an interpreter among the objects the target maps now (by their
    /// symbols: a symlinked, renamed or embedding program is found too) and, once
    /// found, tells BPF where its frames are (retried while its runtime is not
    /// initialized yet).
    fn find_python(&mut self) {
        let pid = self.setup.pid;
        let Ok(maps) = procfs::read_maps(pid) else {
            return;
        };
        if matches!(self.py.state, PyState::Absent) {
            self.py.absent_tries += 1;
            let mut objects: Vec<(String, PathBuf)> = Vec::new();
            for m in maps.iter().filter(|m| m.is_file()) {
                let host = procfs::mapped_file(pid, m.start, m.end);
                let id = procfs::file_identity(&host);
                if objects.iter().any(|(p, _)| *p == m.path)
                    || id.is_some_and(|id| self.py.not_python.contains(&id))
                {
                    continue;
                }
                match python::identify::identify(&m.path, &host) {
                    Some(i) => {
                        log::info!(
                            "CPython {}.{} in {} (version from {})",
                            i.version.0,
                            i.version.1,
                            i.object,
                            i.version_from
                        );
                        self.reply(Reply::Interpreter(Some(i.version)));
                        self.py.state = if self.setup.python_stacks {
                            PyState::Pending(Box::new(i), None, 0)
                        } else {
                            PyState::Off(Box::new(i))
                        };
                        break;
                    }
                    None => {
                        if let Some(id) = id {
                            self.py.not_python.insert(id);
                        }
                    }
                }
                objects.push((m.path.clone(), host));
            }
        }
        // The next attempt waits PY_RETRY after this one ends (reading the interpreter's
        // file takes longer than that).
        let _retry = RetryAfter(&mut self.py.next_try);
        let PyState::Pending(interp, loaded, tries) = &mut self.py.state else {
            return;
        };
        let tries = *tries;
        if loaded.is_none() {
            match python::load(interp, &maps) {
                Ok(l) => *loaded = Some(Box::new(l)),
                Err(why) => {
                    let interp = interp.clone();
                    self.py.state = PyState::Unavailable(interp, why);
                    if let PyState::Unavailable(_, why) = &self.py.state {
                        log::warn!("no Python frames: {why}");
                    }
                    return;
                }
            }
        }
        let Some(loaded) = loaded.clone() else {
            return;
        };
        let fsbase = *self.py.fsbase.get_or_insert_with(|| {
            Btf::kernel().and_then(|b| b.member_offset("task_struct", &["thread", "fsbase"]))
        });
        let PyState::Pending(interp, ..) = &self.py.state else {
            return;
        };
        let found = match ProcMemory::open(pid) {
            Ok(mem) => python::configure(&mem, interp, &loaded, &maps, fsbase),
            Err(e) => Err(format!("cannot read the target: {e}")),
        };
        let interp = interp.clone();
        self.py.state = match found {
            Ok(t) => match self.setup.py_config.set(0, t.config, 0) {
                Ok(()) => {
                    log::info!(
                        "CPython {}.{} in {}: Python frames on",
                        t.version.0,
                        t.version.1,
                        t.object
                    );
                    PyState::Ready(interp, Box::new(t))
                }
                Err(e) => PyState::Unavailable(
                    interp,
                    format!("failed to configure the Python walk: {e}"),
                ),
            },
            // Still initializing (a launched command, or one that just started): retry a while.
            Err(_) if tries < PY_ATTEMPTS && self.setup.launched => {
                PyState::Pending(interp, Some(loaded), tries + 1)
            }
            Err(why) => PyState::Unavailable(interp, why),
        };
        if let PyState::Unavailable(_, why) = &self.py.state {
            log::warn!("no Python frames: {why}");
        }
    }

    /// Walks glibc's heaps in the target's memory, if walks are on (kept for later
    /// reports: the target may be gone by then).
    fn walk_heaps(&mut self, brk: Option<u64>) {
        if !self.setup.walk_heaps {
            return;
        }
        let pid = self.setup.pid;
        let (Ok(maps), Ok(mem)) = (procfs::read_maps(pid), ProcMemory::open(pid)) else {
            return;
        };
        let t = Instant::now();
        let sites = self.heap_sites(&maps, brk);
        let w = glibc::walk_heaps(&mem, &sites);
        log::debug!(
            "walked glibc heaps in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        if !w.arenas.is_empty() || !w.unwalkable.is_empty() {
            self.walk = Some(w);
        }
    }

    /// glibc's candidate heaps. Go's first heap arena reservation is 64 MiB at a
    /// 64 MiB-aligned address, like a glibc arena heap: in a Go program, mappings in
    /// Go's arena space are not glibc's.
    fn heap_sites(&self, maps: &[procfs::MapEntry], brk: Option<u64>) -> glibc::HeapSites {
        let mut sites = glibc::find_sites(maps, procfs::read_start_brk(self.setup.pid), brk);
        if self.setup.go {
            sites
                .thread_heaps
                .retain(|&h| !memory::in_go_arena_space(h));
        }
        // gperftools' tcmalloc, serving malloc, takes the brk heap for its own page heap
        // (sbrk first): it is not glibc's, and tcmalloc's state says what it holds.
        if self.setup.heap_owner == Some(Allocator::Tcmalloc) {
            sites.main = None;
        }
        sites
    }

    fn snapshot(&self) -> Snapshot {
        let pid = self.setup.pid;
        let environ = procfs::read_environ(pid);
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
            .map(|_| glibc::arena_limit(&environ, procfs::online_cpus()));
        Snapshot {
            walk: self.walk.clone(),
            arena_limit,
            malloc_env,
            thread_names: procfs::thread_names(pid),
            python: self.python_info(),
            unwind: self.setup.unwind.as_ref().map(|(u, _)| u.stats.clone()),
            memory: self.memory.clone(),
            pymalloc: self.pymalloc.clone(),
            other: self.other.clone(),
            census: self.census_last.clone().map(|mut c| {
                c.rank(self.census_first.as_ref().filter(|f| f.at_s < c.at_s));
                c
            }),
            reach: None,
            unnamed: self
                .symbols
                .as_ref()
                .map(Symbols::unnamed)
                .unwrap_or_default(),
        }
    }

    /// Reads where RSS goes: smaps, the threads' stack pointers, malloc's own
    /// mappings, and the heap walk just made.
    fn read_memory(&mut self, brk: Option<u64>) {
        let pid = self.setup.pid;
        let (Ok(smaps), Ok(mem), Ok(status)) = (
            procfs::read_smaps(pid),
            ProcMemory::open(pid),
            procfs::read_status(pid),
        ) else {
            return;
        };
        let maps: Vec<procfs::MapEntry> = smaps.iter().map(|e| e.map.clone()).collect();
        let mut sites = self.heap_sites(&maps, brk);
        if self.beside_other_allocator() {
            // Beside another allocator, a 64 MiB-aligned mapping is glibc's arena heap
            // only if the walk found one there (mimalloc's and tcmalloc's own mappings
            // are aligned alike); the rest is that allocator's anonymous memory.
            let walked: Vec<String> = self
                .walk
                .iter()
                .flat_map(|w| &w.arenas)
                .flat_map(|a| a.heaps.iter().cloned())
                .collect();
            sites
                .thread_heaps
                .retain(|h| walked.contains(&format!("{h:#x}")));
        }
        let heap_ranges = heap_ranges(&maps, &sites);
        let stack_pointers = procfs::thread_stack_pointers(pid);
        // Anonymous read-write mappings outside the heaps and stacks may hold chunks
        // malloc mapped on its own.
        let candidates = anon_regions(&maps, &heap_ranges, &stack_pointers);
        // CPython's small-object arenas live in the same kind of mappings.
        let layout = self
            .py
            .state
            .interpreter()
            .and_then(|i| pymalloc::Layout::for_version(i.version.0, i.version.1));
        if let Some(layout) = layout {
            let t = Instant::now();
            let w = match self.census_layout(&maps) {
                Some(cl) => {
                    let (w, c) = self.census_walk(&mem, &layout, cl, &candidates);
                    self.record_census(c);
                    w
                }
                None => pymalloc::walk(&mem, &layout, &candidates),
            };
            log::debug!(
                "walked {} pymalloc arenas in {:.1} ms",
                w.arena_count,
                t.elapsed().as_secs_f64() * 1e3
            );
            self.pymalloc = Some(w);
        }
        if self.py.state.interpreter().is_none()
            && !self.no_census
            && let Some(c) = self.cxx_census(&maps, &mem)
        {
            self.record_census(c);
        }
        let py_spans: Vec<(u64, u64, u64)> = self
            .pymalloc
            .iter()
            .flat_map(|w| &w.spans)
            .map(|&(start, _, in_use, free)| (start, in_use, free))
            .collect();
        // Another allocator's mappings are not glibc's chunks, whatever their first words say.
        let glibc_candidates = if self.setup.heap_owner.is_some() {
            &[][..]
        } else {
            &candidates[..]
        };
        let mmapped: Vec<(u64, u64, u64)> = glibc::mmapped_chunks(&mem, glibc_candidates)
            .into_iter()
            .map(|(s, e)| {
                // A mapping of any extent (a target can fake a chunk header on a
                // terabyte of untouched address space): read as runs.
                let resident = mem.residency(s, e).map(|r| r.total()).unwrap_or(0);
                (s, e, resident)
            })
            .collect();
        self.read_other_allocators(&maps, &mem);
        self.memory = memory::compose(&memory::State {
            smaps: &smaps,
            vmrss_bytes: status.rss.rss_bytes,
            glibc: self.walk.as_ref(),
            heap_ranges: &heap_ranges,
            mmapped: &mmapped,
            pymalloc: &py_spans,
            stack_pointers: &stack_pointers,
            heap_owner: self.setup.heap_owner.map(Allocator::as_str),
            go: self.setup.go,
            jemalloc: &self.other.jemalloc,
            mimalloc: &self.other.mimalloc,
            tcmalloc: &self.other.tcmalloc,
            go_heap: self.other.go.as_ref(),
        });
    }

    /// Whether another allocator than glibc's is traced (serving malloc, or called
    /// through its own API): its mappings may look like glibc's.
    fn beside_other_allocator(&self) -> bool {
        self.setup.heap_owner.is_some()
            || self.setup.allocators.iter().any(|f| {
                f.probes > 0
                    && matches!(
                        f.allocator,
                        Allocator::Jemalloc | Allocator::Tcmalloc | Allocator::Mimalloc
                    )
            })
    }

    /// Reads the state of the allocators whose layout is known (jemalloc's, mimalloc's,
    /// tcmalloc's and the Go runtime's, from their debug information), and says why not
    /// for the others.
    fn read_other_allocators(&mut self, maps: &[procfs::MapEntry], mem: &ProcMemory) {
        let mut other = OtherState::default();
        let (pid, dirs) = (self.setup.pid, &self.setup.debug_dirs);
        for f in &self.setup.allocators {
            let read = match f.allocator {
                Allocator::Jemalloc => {
                    let prefix = f.prefix.clone();
                    read_located(
                        &mut self.layouts.jemalloc,
                        (pid, dirs, maps, &f.object),
                        |d| jemalloc::Layout::find(d, d, &prefix),
                        |l, bias| jemalloc::read(mem, l, bias, &f.object),
                    )
                    .map(|s| other.jemalloc.push(s))
                }
                // mimalloc 1 and 2 keep segments, laid out otherwise: not guessed at.
                Allocator::Mimalloc
                    if f.version
                        .as_deref()
                        .is_some_and(|v| v.starts_with("1.") || v.starts_with("2.")) =>
                {
                    Err(format!(
                        "leaktrace reads mimalloc 3's arenas and pages; {} keeps segments, whose layout it does not read",
                        f.version.as_deref().unwrap_or_default()
                    ))
                }
                Allocator::Mimalloc => read_located(
                    &mut self.layouts.mimalloc,
                    (pid, dirs, maps, &f.object),
                    mimalloc::Layout::find,
                    |l, bias| mimalloc::read(mem, l, bias, &f.object),
                )
                .map(|s| other.mimalloc.push(s)),
                Allocator::Tcmalloc => read_located(
                    &mut self.layouts.tcmalloc,
                    (pid, dirs, maps, &f.object),
                    tcmalloc::Layout::find,
                    |l, bias| tcmalloc::read(mem, l, bias, &f.object),
                )
                .map(|s| other.tcmalloc.push(s)),
                Allocator::Go => read_located(
                    &mut self.layouts.go,
                    (pid, dirs, maps, &f.object),
                    go::Layout::find,
                    |l, bias| go::read(mem, l, bias, &f.object),
                )
                .map(|h| other.go = Some(h)),
                _ => continue,
            };
            if let Err(why) = read {
                other.not_read.push(NotRead {
                    allocator: f.allocator.as_str().into(),
                    object: f.object.clone(),
                    why,
                });
            }
        }
        self.other = other;
    }

    /// Who keeps the heap alive: two conservative scans from the roots through glibc's
    /// in-use blocks (the second confirms what the first found unreferenced), within
    /// [`REACH_BUDGET`] each. Only where glibc serves malloc and its heap was walked.
    fn reachability(&mut self, brk: Option<u64>) -> Option<reach::Reachability> {
        if self.setup.heap_owner.is_some() {
            return None;
        }
        let pid = self.setup.pid;
        let t = Instant::now();
        let first_pass_ns = crate::probes::load::monotonic_ns();
        let mut passes = Vec::new();
        let mut stats = reach::ScanStats::default();
        let mut maps = Vec::new();
        for _ in 0..2 {
            let tw = Instant::now();
            self.walk_heaps(brk);
            let w = self.walk.as_ref()?;
            let walked_ms = tw.elapsed().as_secs_f64() * 1e3;
            let (Ok(m), Ok(mem)) = (procfs::read_maps(pid), ProcMemory::open(pid)) else {
                return None;
            };
            let deadline = Instant::now() + REACH_BUDGET;
            let mut blocks = Vec::new();
            let mut tcaches = Vec::new();
            let complete = glibc::each_in_use(&mem, &w.chains, deadline, &mut |u, n, _| {
                // The user part: from the user address to the next chunk's size field.
                blocks.push((u, n.saturating_sub(8)));
                if n == reach::TCACHE_CHUNK {
                    tcaches.push(u);
                }
            });
            // Chunks parked in the threads' tcaches are free, though they look in use.
            let listed = reach::Blocks::new(blocks);
            let cached = reach::tcache_cached(&mem, &tcaches, |a| listed.contains(a));
            let blocks = if cached.is_empty() {
                listed
            } else {
                reach::Blocks::new(
                    (0..listed.len())
                        .map(|i| listed.get(i))
                        .filter(|(a, _)| !cached.contains(a))
                        .collect(),
                )
            };
            let sites = self.heap_sites(&m, brk);
            let ranges = heap_ranges(&m, &sites);
            let roots = reach_roots(&m, &ranges, &procfs::thread_stack_pointers(pid), pid);
            // Blocks are read where their pages are resident.
            let mut resident: Vec<(u64, u64)> = Vec::new();
            for &(s, e) in &ranges {
                match mem.residency(s & !0xfff, e.next_multiple_of(0x1000)) {
                    Ok(r) => resident.extend_from_slice(r.runs()),
                    Err(_) => resident.push((s, e)),
                }
            }
            resident.sort_unstable();
            let listed_ms = tw.elapsed().as_secs_f64() * 1e3 - walked_ms;
            let ts = Instant::now();
            let mut scan = reach::scan(
                &mem,
                &blocks,
                Some(&resident),
                &roots,
                deadline,
                REACH_MAX_BYTES,
            );
            log::debug!(
                "reachability pass: heap walk {walked_ms:.0} ms, blocks listed {listed_ms:.0} ms, scan {:.0} ms ({} MiB)",
                ts.elapsed().as_secs_f64() * 1e3,
                scan.bytes_scanned >> 20
            );
            let swapped = procfs::read_status(pid).map_or(0, |s| s.swap_bytes);
            if swapped > 0 {
                // A pointer may sit in a page swapped out, which is not read in.
                scan.incomplete = Some(format!(
                    "did not read the {} the target has swapped out",
                    crate::units::bytes(swapped)
                ));
            } else if let Some(u) = w.unwalkable.first() {
                // Its blocks are not listed: they would be neither scanned nor judged.
                scan.incomplete = Some(format!(
                    "could not list the blocks of the heap at {} ({})",
                    u.heap, u.reason
                ));
            } else if !complete && scan.incomplete.is_none() {
                scan.incomplete = Some("the heap changed while its blocks were listed".into());
            }
            stats.bytes_scanned += scan.bytes_scanned;
            stats.passes += 1;
            stats.blocks = blocks.len() as u64;
            stats.roots = roots.len() as u64;
            stats.incomplete = stats.incomplete.or(scan.incomplete.clone());
            let cut = scan.incomplete.is_some();
            passes.push((blocks, scan, roots));
            maps = m;
            if cut {
                // Nothing will be called unreferenced: a second pass would only cost.
                break;
            }
        }
        let (b2, s2, roots) = passes.pop()?;
        let unreferenced = match passes.pop() {
            Some((b1, s1, _)) if stats.incomplete.is_none() => {
                reach::confirmed((&b1, &s1), (&b2, &s2))
            }
            _ => Vec::new(),
        };
        // Globals are named by their symbol in the object that holds them: each
        // object's data symbols read once (as the allocator layouts are found).
        type Table = Vec<(u64, u64, String)>;
        let mut objects: FxHashMap<String, Result<(Table, u64), String>> = FxHashMap::default();
        let dirs = self.setup.debug_dirs.clone();
        let held = reach::held_by(
            &b2,
            &s2,
            &roots,
            |root, at| {
                let Some(object) = root.object.as_deref() else {
                    return root.name.clone();
                };
                let found = objects.entry(object.to_owned()).or_insert_with(|| {
                    crate::heap::locate(pid, &maps, object, &dirs, |d| {
                        Ok(crate::process::elf::data_symbol_table(d))
                    })
                });
                let base = object.rsplit('/').next().unwrap_or(object);
                found
                    .as_ref()
                    .ok()
                    .and_then(|(table, bias)| {
                        crate::process::elf::symbol_containing(table, at.wrapping_sub(*bias))
                    })
                    .map_or_else(|| root.name.clone(), |sym| format!("{sym} in {base}"))
            },
            REACH_TOP,
        );
        stats.ms = t.elapsed().as_millis() as u64;
        log::debug!(
            "reachability: {} blocks, {} roots, {} MiB read in {} ms, {} unreferenced",
            stats.blocks,
            stats.roots,
            stats.bytes_scanned >> 20,
            stats.ms,
            unreferenced.len()
        );
        Some(reach::Reachability {
            unreferenced_blocks: unreferenced.len() as u64,
            unreferenced_bytes: unreferenced.iter().map(|b| b.1).sum(),
            unreferenced: unreferenced.into_iter().take(reach::MAX_LISTED).collect(),
            held_by: held.top,
            reached: held.blocks,
            holder_names: held.names,
            scan: stats,
            first_pass_ns,
        })
    }

    /// Where Python objects start, from the interpreter's version and `PyType_Type`'s
    /// address in the target (found once).
    fn census_layout(&mut self, maps: &[procfs::MapEntry]) -> Option<census::Layout> {
        if !self.setup.census || self.no_census {
            return None;
        }
        let interp = self.py.state.interpreter()?;
        if self.census_layout.is_none() {
            let (major, minor) = interp.version;
            let found = (|| {
                let at = interp
                    .symbols
                    .type_type
                    .ok_or("the interpreter exports no PyType_Type")?;
                let data = procfs::read_object(&interp.host)
                    .map_err(|e| format!("reading {}: {e}", interp.object))?;
                let bias = maps
                    .iter()
                    .find(|m| m.path == interp.object)
                    .and_then(|m| {
                        crate::process::elf::load_bias(&data, m.start, m.offset, m.is_exec())
                    })
                    .ok_or_else(|| format!("{} is not mapped where its ELF says", interp.object))?;
                census::Layout::for_version(major, minor, at.wrapping_add(bias))
                    .ok_or_else(|| format!("CPython {major}.{minor}'s object layout is not known"))
            })();
            if let Err(why) = &found {
                log::info!("no heap census: {why}");
            }
            self.census_layout = Some(found);
        }
        self.census_layout.clone()?.ok()
    }

    /// Walks pymalloc's arenas with a census of their live blocks by type.
    fn census_walk(
        &self,
        mem: &ProcMemory,
        layout: &pymalloc::Layout,
        cl: census::Layout,
        regions: &[(u64, u64)],
    ) -> (PymallocWalk, Census) {
        let t = Instant::now();
        let mut c = census::PyCensus::new(mem, cl);
        let w = pymalloc::walk_with_census(mem, layout, regions, census::BUDGET, &mut |a, b| {
            c.block(a, b)
        });
        // Objects larger than pymalloc's blocks are malloc's chunks.
        let chunks_complete = self.walk.as_ref().is_none_or(|g| {
            glibc::each_in_use(mem, &g.chains, t + census::BUDGET, &mut |u, n, h| {
                c.chunk(u, n, h)
            })
        });
        let incomplete = w
            .incomplete
            .clone()
            .or_else(|| {
                (w.census_torn_pools > 0).then(|| {
                    format!(
                        "{} pool(s) changed while read and were skipped",
                        w.census_torn_pools
                    )
                })
            })
            .or_else(|| {
                (!chunks_complete).then(|| {
                    "malloc's heaps changed while read or took over the time budget".to_owned()
                })
            });
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let mut census = c.finish(ms, self.started.elapsed().as_secs_f64(), incomplete);
        census.cut_short = w.incomplete.is_some() || !chunks_complete;
        log::debug!(
            "census: {} objects, {} of {} bytes attributed, in {ms:.1} ms",
            census.objects,
            census.attributed_bytes,
            census.heap_in_use_bytes
        );
        (w, census)
    }

    /// C++ objects in malloc's chunks, by the class their vtable pointer names (the
    /// classes of the objects mapped when first called).
    fn cxx_census(&mut self, maps: &[procfs::MapEntry], mem: &ProcMemory) -> Option<Census> {
        if !self.setup.census {
            return None;
        }
        let walk = self.walk.as_ref()?;
        // A C++ program links its runtime (statically linked ones are not looked at).
        let cxx = maps
            .iter()
            .any(|m| m.path.contains("/libstdc++.so") || m.path.contains("/libc++.so"));
        if self.vtables.is_none() && !cxx {
            self.vtables = Some(census::Vtables::default());
        }
        if self.vtables.is_none() {
            let t = Instant::now();
            let mut v = census::Vtables::default();
            let mut seen: Vec<&str> = Vec::new();
            for m in maps.iter().filter(|m| m.is_file() && m.offset == 0) {
                if seen.contains(&m.path.as_str()) {
                    continue;
                }
                if t.elapsed() > census::BUDGET {
                    v.partial = true;
                    break;
                }
                seen.push(&m.path);
                let host = procfs::mapped_file(self.setup.pid, m.start, m.end);
                let Ok(data) = procfs::read_object(&host) else {
                    continue;
                };
                if let Some(bias) =
                    crate::process::elf::load_bias(&data, m.start, m.offset, m.is_exec())
                {
                    v.add_object(&data, bias);
                }
            }
            log::debug!(
                "{} C++ classes with vtables in {:.1} ms",
                v.len(),
                t.elapsed().as_secs_f64() * 1e3
            );
            self.vtables = Some(v);
        }
        let v = self.vtables.as_ref().filter(|v| !v.is_empty())?;
        let t = Instant::now();
        let mut c = census::CxxCensus::new(v);
        let complete = glibc::each_in_use(mem, &walk.chains, t + census::BUDGET, &mut |u, n, h| {
            c.chunk(u, n, h)
        });
        let incomplete = if !complete {
            Some("malloc's heaps changed while read or took over the time budget".into())
        } else if v.partial {
            Some("classes read from some of the objects only (time budget)".into())
        } else {
            None
        };
        let mut census = c.finish(
            t.elapsed().as_secs_f64() * 1e3,
            self.started.elapsed().as_secs_f64(),
            incomplete,
        );
        census.cut_short = !complete || v.partial;
        Some(census)
    }

    fn record_census(&mut self, c: Census) {
        // The first of its kind: a C++ census taken before the interpreter was found
        // is no baseline for Python's.
        if self.census_first.as_ref().is_none_or(|f| f.kind != c.kind) {
            self.census_first = Some(c.clone());
        }
        self.census_last = Some(c);
    }

    /// A census now: the one at attach.
    fn census_now(&mut self) {
        let pid = self.setup.pid;
        if self.census_first.is_some() || !self.setup.census {
            return;
        }
        self.walk_heaps(None);
        let (Ok(maps), Ok(mem)) = (procfs::read_maps(pid), ProcMemory::open(pid)) else {
            return;
        };
        if self.py.state.interpreter().is_none() {
            if let Some(c) = self.cxx_census(&maps, &mem) {
                self.record_census(c);
            }
            return;
        }
        let Some(cl) = self.census_layout(&maps) else {
            return;
        };
        let Some(layout) = self
            .py
            .state
            .interpreter()
            .and_then(|i| pymalloc::Layout::for_version(i.version.0, i.version.1))
        else {
            return;
        };
        // The regions later censuses walk (read_memory's): outside the heaps and stacks.
        let sites = self.heap_sites(&maps, None);
        let heap_ranges = heap_ranges(&maps, &sites);
        let regions = anon_regions(&maps, &heap_ranges, &procfs::thread_stack_pointers(pid));
        let (_, c) = self.census_walk(&mem, &layout, cl, &regions);
        self.record_census(c);
    }

    /// CPython's collector, read from outside: its state, the cyclic garbage waiting
    /// for it, `gc.garbage`, and who holds the program's objects.
    fn python_gc(&mut self) -> Option<Result<pygc::PyGc, String>> {
        let interp = self.py.state.interpreter()?.clone();
        let pid = self.setup.pid;
        let (major, minor) = interp.version;
        Some((|| {
            let layout = pygc::Layout::for_version(major, minor).ok_or_else(|| {
                format!("CPython {major}.{minor}'s collector layout is not known")
            })?;
            let maps = procfs::read_maps(pid).map_err(|e| format!("reading maps: {e}"))?;
            let (syms, bias) = crate::heap::locate(
                pid,
                &maps,
                &interp.object,
                &self.setup.debug_dirs,
                pygc_symbols,
            )?;
            let at = |a: Option<u64>| a.map(|a| a.wrapping_add(bias));
            let mem = ProcMemory::open(pid).map_err(|e| format!("opening its memory: {e}"))?;
            let statics = pygc::Statics {
                generations: at(syms.statics[0]),
                enabled: at(syms.statics[1]),
                garbage: at(syms.statics[2]),
                collecting: at(syms.statics[3]),
                stats: at(syms.statics[4]),
            };
            let place = layout.place(&mem, at(syms.runtime), &statics)?;
            let types = pygc::Types::from_addresses(
                &syms.types.map(|a| a.map_or(0, |a| a.wrapping_add(bias))),
            );
            if types.type_type == 0 || types.list == 0 || types.dict == 0 {
                return Err(
                    "the interpreter exports no PyType_Type, PyList_Type or PyDict_Type".into(),
                );
            }
            let t = Instant::now();
            let gc = pygc::read(&mem, &layout, &place, &types)?;
            log::info!(
                "python gc: {} tracked, {} unreachable ({} B), {} in gc.garbage, {:.0} ms",
                gc.tracked.iter().sum::<u64>(),
                gc.cyclic_unreachable.objects,
                gc.cyclic_unreachable.bytes,
                gc.garbage.objects,
                t.elapsed().as_secs_f64() * 1e3
            );
            Ok(gc)
        })())
    }

    /// What the report says about the interpreter.
    fn python_info(&self) -> Option<PythonInfo> {
        let interp = self.py.state.interpreter()?;
        let (major, minor) = interp.version;
        let arena = if (major, minor) >= (3, 10) {
            "1 MiB"
        } else {
            "256 KiB"
        };
        let limit = if major == 2 { 256 } else { 512 };
        let note = format!(
            "Objects of {limit} bytes or less come from pymalloc's {arena} arenas, not malloc: small-object growth shows as \
             pymalloc arenas under the mappings, charged to the Python stack that opened each arena. leaktrace does not \
             probe PyObject_Malloc (LTO builds inline it at hundreds of call sites, so a probe there would see a fraction)."
        );
        let (frames, unavailable) = match &self.py.state {
            PyState::Ready(..) => (true, None),
            PyState::Unavailable(_, why) => (false, Some(why.clone())),
            PyState::Pending(..) => (
                false,
                Some("the interpreter had not initialized yet".into()),
            ),
            PyState::Off(_) => (false, Some("turned off with --no-python".into())),
            PyState::Absent => return None,
        };
        Some(PythonInfo {
            version: format!("{major}.{minor}"),
            object: interp.object.clone(),
            frames,
            unavailable,
            note,
            frames_replaced: self.py.symbols.replaced,
            gc: None,
            gc_not_read: None,
        })
    }
}

/// What the collector's reader needs from the interpreter's symbols (link-time).
struct PygcSymbols {
    runtime: Option<u64>,
    types: [Option<u64>; 11],
    /// `generations`, `enabled`, `garbage`, `collecting`, `generation_stats`: static
    /// variables of `gcmodule.c` (2.7, 3.6), `.symtab` only.
    statics: [Option<u64>; 5],
}

/// Finds [`PygcSymbols`] in an interpreter's object. Static variables have common
/// names (`enabled`): of several, the one nearest `generations` is gcmodule.c's.
fn pygc_symbols(data: &[u8]) -> Result<PygcSymbols, String> {
    use object::{Object as _, ObjectSymbol as _};
    let file = object::File::parse(data).map_err(|e| format!("parsing: {e}"))?;
    const STATICS: [&str; 5] = [
        "generations",
        "enabled",
        "garbage",
        "collecting",
        "generation_stats",
    ];
    let mut runtime = None;
    let mut types = [None; 11];
    let mut statics: [Vec<u64>; 5] = Default::default();
    for s in file.symbols().chain(file.dynamic_symbols()) {
        let Ok(n) = s.name() else { continue };
        if !s.is_definition() {
            continue;
        }
        if n == "_PyRuntime" {
            runtime.get_or_insert(s.address());
        } else if let Some(i) = pygc::Types::SYMBOLS.iter().position(|w| *w == n) {
            types[i].get_or_insert(s.address());
        } else if let Some(i) = STATICS.iter().position(|w| *w == n)
            && s.kind() == object::SymbolKind::Data
        {
            statics[i].push(s.address());
        }
    }
    let generations = statics[0].first().copied();
    let nearest = |v: &[u64]| -> Option<u64> {
        let g = generations?;
        v.iter().copied().min_by_key(|&a| a.abs_diff(g))
    };
    Ok(PygcSymbols {
        runtime,
        types,
        statics: [
            generations,
            nearest(&statics[1]),
            nearest(&statics[2]),
            nearest(&statics[3]),
            nearest(&statics[4]),
        ],
    })
}
