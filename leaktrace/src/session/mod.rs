//! A tracing session, as a pipeline: [`prepare`] (resolve the target, find its
//! allocator, build the unwind tables, load and attach the programs), then the
//! [`event_loop`] (drain events into the books, dispatch timers and signals), with
//! the slow work on a [`worker`] thread, and the final report.

mod duty;
mod event_loop;
pub mod follow;
pub mod live;
pub mod metrics;
mod notice;
pub mod output;
pub use event_loop::write_flamegraph;
pub mod prepare;
pub mod stop;
pub mod worker;

use std::{ffi::OsString, path::PathBuf, time::Duration};

use leaktrace_common::{DEFAULT_INFLIGHT_CAPACITY, DEFAULT_RING_BYTES, DEFAULT_STACK_CAPACITY};

use crate::{error::Error, process::target, report::Report};

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
    /// A gzipped pprof heap profile at the end (Go's heap-profile convention).
    Pprof,
    /// Folded stacks of live bytes at the end (`outermost;…;innermost bytes`).
    Folded,
}

impl Format {
    /// Whether the format is one document with every heap stack, written at the end.
    pub fn every_stack(self) -> bool {
        matches!(self, Self::Pprof | Self::Folded)
    }
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
    /// Print Python stacks whole, the interpreter's frames between Python frames
    /// included (they are folded by default; JSON always has every frame).
    pub full_stacks: bool,
    /// Trace the target's descendants too, those alive and those it forks later,
    /// each with its own books and report section.
    pub follow_forks: bool,
    /// Output format.
    pub format: Format,
    /// Write reports here instead of stdout.
    pub output: Option<PathBuf>,
    /// Also draw the final report's live heap as a flamegraph (SVG) in this file.
    pub flamegraph: Option<PathBuf>,
    /// Also write a pprof heap profile into this directory at each interval report
    /// and at the end, keeping the newest this many (for continuous profilers).
    pub pprof_dir: Option<(PathBuf, usize)>,
    /// Record a capture here (`--replay` redoes the analysis from it).
    pub record: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`/metrics`).
    pub prometheus: Option<std::net::SocketAddr>,
    /// Stacks with series in the metrics.
    pub prometheus_top: usize,
    /// Show the run in a terminal view (`--live`).
    pub live: bool,
    /// Left running for days (`--continuous`): the timeline keeps its last hour, stacks
    /// with nothing live and no event for 10 minutes are forgotten.
    pub continuous: bool,
    /// With `continuous`: how long a stack with nothing live and no allocation is kept.
    pub age_after: Duration,
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
    /// Take the census of the live heap by type (at attach and with each report).
    pub census: bool,
    /// Scan for who keeps the heap alive at the final report.
    pub reachability: bool,
    /// Directories searched for debug information before the target's and ours.
    pub debug_dirs: Vec<std::path::PathBuf>,
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
    /// When sampling: keep the heap probes' cost under this share of the target's own
    /// CPU time, in percent, by attaching them only for windows (a duty cycle chosen
    /// from the cost they are measured to have while attached). `None`: attached all
    /// the time.
    pub duty_budget_pct: Option<f64>,
}

/// The duty cycle's default cost budget, percent of the target's own CPU time.
pub const DEFAULT_DUTY_BUDGET_PCT: f64 = 1.0;

impl Config {
    /// How text reports print stacks.
    pub fn frames(&self) -> crate::report::Frames {
        crate::report::Frames {
            max: self.max_frames,
            fold_python: !self.full_stacks,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            target: Target::Pid(0),
            duration: None,
            interval: None,
            top: 10,
            max_frames: 16,
            full_stacks: false,
            follow_forks: false,
            format: Format::Text,
            output: None,
            flamegraph: None,
            pprof_dir: None,
            record: None,
            prometheus: None,
            prometheus_top: 10,
            live: false,
            continuous: false,
            age_after: Duration::from_secs(600),
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
            census: true,
            reachability: true,
            debug_dirs: Vec::new(),
            uprobe_sessions: true,
            python_stacks: true,
            bare_probes: false,
            fp_stacks: false,
            copy_stacks: false,
            duty_budget_pct: None,
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
    let out = match &config.output {
        Some(p) => output::Output::file(p)?,
        None => output::Output::stdout(),
    };
    let recorder = match &config.record {
        Some(p) => Some(crate::capture::Recorder::create(p)?),
        None => None,
    };
    // So is a live view without a terminal.
    if config.live {
        use std::io::IsTerminal as _;
        if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
            return Err(Error::Live(
                "it needs a terminal on stdin and stdout".into(),
            ));
        }
    }
    // An address that cannot be listened on is refused before anything is attached.
    let listener = match config.prometheus {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| Error::Listen {
                    addr: addr.to_string(),
                    source,
                })?;
            Some(l)
        }
        None => None,
    };
    // A kernel leaktrace cannot run on is said in one line, before anything else.
    crate::probes::load::check_kernel()?;
    let attaching = notice::Notice::after(
        config.announce,
        notice::AFTER,
        "leaktrace: attaching: loading the BPF programs, reading the target's unwind tables, symbols and interpreter…".into(),
    );
    let prepared = prepare::prepare(config)?;
    // Asked to stop while attaching: nothing was traced yet (the probes go with
    // `prepared`, a launched command with its pipe).
    if let Some(sig) = stop::requested() {
        return Err(Error::Stopped { signal: sig });
    }
    event_loop::run(config, prepared, out, recorder, listener, attaching)
}
