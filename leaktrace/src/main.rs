//! `leaktrace`: the command line. Parses flags into a [`leaktrace::Config`] and runs it.

use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration};

use clap::{ArgGroup, Parser, ValueEnum};
use leaktrace::{Config, Format, Target};

const EXAMPLES: &str = "\
EXAMPLES:
    Trace a running process until Ctrl-C, then print what it still holds:
        sudo leaktrace --pid $(pidof mydaemon)

    Report every 10 s for a minute, top 5 stacks:
        sudo leaktrace --pid 1234 --interval 10 --duration 60 --top 5

    Launch a command under trace (probes are in place before it runs):
        sudo leaktrace -- ./myprog --its-flags

    One JSON document at the end, to a file:
        sudo leaktrace --pid 1234 --duration 30 --format json -o report.json

    A pprof heap profile (go tool pprof, Pyroscope, Parca) and a flamegraph:
        sudo leaktrace --pid 1234 --duration 30 --format pprof -o heap.pb.gz --flamegraph heap.svg

    Watch it live in the terminal (q quits and prints the final report):
        sudo leaktrace --pid 1234 --live

    Left running beside a service, with metrics for Prometheus:
        sudo leaktrace --pid 1234 --continuous --prometheus 127.0.0.1:9464 -o report.txt

    Record a capture while tracing; later, elsewhere, without root, redo the analysis:
        sudo leaktrace --pid 1234 --duration 600 --record run.ltcap
        leaktrace --replay run.ltcap --format pprof -o heap.pb.gz

    Later, without root: a JSON report as pprof or folded stacks, two reports compared:
        leaktrace --convert report.json --format folded
        leaktrace --diff before.json after.json";

/// Attach to a live process and account its outstanding memory by call stack.
///
/// leaktrace probes the allocator functions the target has mapped (malloc, calloc,
/// realloc, reallocarray, posix_memalign, aligned_alloc, memalign, valloc, pvalloc,
/// free) and traces its mmap/munmap/mremap/brk/mprotect/madvise syscalls, with eBPF.
/// Nothing is injected into the target and it is not restarted.
#[derive(Debug, Parser)]
#[command(version, after_long_help = EXAMPLES, allow_negative_numbers = true, group(ArgGroup::new("what").required(true).args(["pid", "command", "convert", "diff", "replay"])))]
struct Opts {
    /// Process to attach to.
    #[arg(short, long, value_name = "PID", value_parser = parse_pid)]
    pid: Option<u32>,

    /// Stop after this many seconds (default: until Ctrl-C, SIGTERM or the target exits).
    #[arg(short, long, value_name = "S", value_parser = parse_seconds)]
    duration: Option<Duration>,

    /// Print a report every S seconds (at least 0.1); with --format json, one JSON
    /// document per line (JSON Lines), the final report last.
    #[arg(short, long, value_name = "S", value_parser = parse_interval)]
    interval: Option<Duration>,

    /// Stacks to show in each section.
    #[arg(short = 'n', long, value_name = "N", default_value_t = Config::default().top)]
    top: usize,

    /// Frames to show per stack in text reports.
    #[arg(long, value_name = "N", default_value_t = Config::default().max_frames)]
    max_frames: usize,

    /// Trace the target's descendants too: those alive now that run its program and
    /// those it forks while traced (pre-fork servers: PostgreSQL, nginx, gunicorn),
    /// each with its own section and the totals. A descendant that execs another
    /// program, or exits, is noted and no longer followed.
    #[arg(long, conflicts_with_all = ["dry_run", "sample_rate"])]
    follow_forks: bool,

    /// Print Python stacks whole: by default the interpreter's own frames between
    /// Python frames are folded into one line each (JSON always has every frame).
    #[arg(long)]
    full_stacks: bool,

    /// Report format.
    #[arg(short, long, value_enum, default_value_t = FormatArg::Text)]
    format: FormatArg,

    /// Write reports to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,

    /// Also draw the final report's live heap by stack as a flamegraph (SVG) in FILE.
    #[arg(long, value_name = "FILE")]
    flamegraph: Option<PathBuf>,

    /// With --interval: also write a pprof heap profile of every stack into DIR at each
    /// report and at the end (leaktrace-PID-UNIXMS.pb.gz), for continuous profilers.
    #[arg(long, value_name = "DIR", requires = "interval", value_parser = parse_dir)]
    pprof_dir: Option<PathBuf>,

    /// Profiles --pprof-dir keeps (the oldest of this run are removed).
    #[arg(long, value_name = "N", default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..))]
    pprof_keep: u32,

    /// Trace nothing: read a JSON report (or the last of a JSON Lines file) and write
    /// it as --format pprof or folded, and --flamegraph FILE if given.
    #[arg(long, value_name = "REPORT", conflicts_with_all = ["pid", "command", "diff", "replay"])]
    convert: Option<PathBuf>,

    /// Trace nothing: compare two JSON reports or captures stack by stack (grown,
    /// shrunk, new, gone), in text or --format json.
    #[arg(long, num_args = 2, value_names = ["BASE", "NEW"], conflicts_with_all = ["pid", "command", "convert", "replay"])]
    diff: Option<Vec<PathBuf>>,

    /// While tracing, also record a capture in FILE: the events, the stacks named, the
    /// RSS samples and what each report read from the target. --replay redoes the
    /// analysis from it; a capture cut short reads up to its last complete record.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["dry_run", "follow_forks"])]
    record: Option<PathBuf>,

    /// Serve Prometheus metrics on ADDR:PORT (`/metrics`, OpenMetrics text): the
    /// target's RSS and live heap, where RSS goes, the top stacks' live bytes and
    /// growth, the verdict, lost events, leaktrace's own CPU and RSS. Refreshed at each
    /// --interval, else every 15 s (the books' figures every 250 ms).
    #[arg(long, value_name = "ADDR:PORT", conflicts_with_all = ["convert", "diff", "replay", "dry_run"])]
    prometheus: Option<std::net::SocketAddr>,

    /// Left running for days (a service): sampling at 512 KiB by default (the duty
    /// cycle keeps the probes' cost under --max-overhead, 1%), growth over the last hour,
    /// stacks with nothing live and no event for 10 minutes forgotten; ends with
    /// the final report when the target exits. See docs/leaktrace.service.
    #[arg(long, conflicts_with_all = ["dry_run", "follow_forks", "convert", "diff", "replay"])]
    continuous: bool,

    /// With --continuous: seconds a stack with nothing live and no allocation is kept
    /// (default 600).
    #[arg(long, value_name = "S", requires = "continuous", value_parser = parse_seconds, hide = true)]
    age_after: Option<Duration>,

    /// Show the run in a terminal view, redrawn every second: the verdict, where RSS
    /// goes, the stacks fastest-growing first (↑↓ select, Enter expands, s sorts, q quits
    /// and prints the final report).
    #[arg(long, conflicts_with_all = ["interval", "dry_run", "convert", "diff", "replay"])]
    live: bool,

    /// Stacks with series in the metrics (the top N by live bytes; a stack that leaves
    /// the top loses its series, so cardinality stays bounded).
    #[arg(long, value_name = "N", default_value_t = 10, requires = "prometheus", value_parser = clap::value_parser!(u32).range(1..=1000))]
    prometheus_top: u32,

    /// Trace nothing: redo the analysis of a capture made with --record, without root
    /// or the target, and write its final report in --format (and --flamegraph FILE).
    #[arg(long, value_name = "CAPTURE", conflicts_with_all = ["pid", "command", "convert", "diff", "record"])]
    replay: Option<PathBuf>,

    /// Ring-buffer size in KiB (power of two, at least 4).
    #[arg(long, value_name = "KIB", default_value_t = Config::default().ring_bytes / 1024, value_parser = parse_ring_kib)]
    ring_kib: u32,

    /// Distinct stacks the kernel can hold.
    #[arg(long, value_name = "N", default_value_t = Config::default().stack_capacity, value_parser = clap::value_parser!(u32).range(1..))]
    stack_capacity: u32,

    /// Threads that can be inside an allocator call or a traced syscall at once.
    #[arg(long, value_name = "N", default_value_t = Config::default().inflight_capacity, value_parser = clap::value_parser!(u32).range(1..))]
    inflight_capacity: u32,

    /// Sample heap allocations: one per BYTES allocated on average (suffixes K, M, G),
    /// byte-weighted as in jemalloc and tcmalloc; reports show unbiased estimates with
    /// their 95% error. Unsampled calls skip the stack walk and send nothing. The heap
    /// probes are attached only for windows, few enough to keep their cost under
    /// --max-overhead (default 1%) of the target's CPU time as modelled: a call outside
    /// a window does not trap at all.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    sample_rate: Option<u32>,

    /// With --sample-rate: keep the heap probes attached all the time (every call
    /// traps; unsampled calls only skip the stack walk).
    #[arg(long, requires = "sample_rate")]
    no_duty_cycle: bool,

    /// Sampled live blocks the kernel can track (with --sample-rate).
    #[arg(long, value_name = "N", default_value_t = Config::default().sampled_capacity, value_parser = clap::value_parser!(u32).range(1..))]
    sampled_capacity: u32,

    /// Only count allocator calls for --duration (default 5 s), then print their rates
    /// and the projected cost of tracing them. Nothing else is recorded.
    #[arg(long)]
    dry_run: bool,

    /// Detach the heap probes if their projected cost exceeds PCT percent of the
    /// target's own CPU time (checked every second); mappings stay traced. With
    /// --sample-rate: the cost the duty cycle keeps to (default 1).
    #[arg(long, value_name = "PCT", value_parser = parse_pct)]
    max_overhead: Option<f64>,

    /// Do not capture stacks (totals only).
    #[arg(long)]
    no_stacks: bool,

    /// Leave heap blocks younger than S seconds out of the stack tables, so that
    /// long-lived outstanding memory is ranked without the churn of temporaries.
    #[arg(long, value_name = "S", value_parser = parse_seconds)]
    min_age: Option<Duration>,

    /// Benchmark only: attach every probe but do no work in them.
    #[arg(long, hide = true, conflicts_with_all = ["dry_run", "sample_rate"])]
    bare_probes: bool,

    /// How to walk native stacks: `cfi` follows each object's unwind tables
    /// (.eh_frame), right on code built without frame pointers; `fp` follows frame
    /// pointers only (cheaper, but stacks through code without them are junk).
    #[arg(long, value_enum, default_value = "cfi")]
    unwind: UnwindArg,

    /// Benchmark only: with --sample-rate, probe malloc and calloc with an entry and a
    /// return probe even where uprobe sessions would let unsampled calls skip the return.
    #[arg(long, hide = true)]
    no_uprobe_sessions: bool,

    /// Benchmark only: copy 8 KiB of stack per event instead of unwinding in BPF.
    #[arg(long, hide = true, conflicts_with_all = ["dry_run", "bare_probes"])]
    copy_stacks: bool,

    /// Do not walk CPython frames (in a Python target, stacks are then native only).
    #[arg(long)]
    no_python: bool,

    /// Do not read glibc's heaps through /proc/PID/mem (arena figures, the
    /// malloc_trim estimate and fragmentation remedies then go missing).
    #[arg(long)]
    no_heap_walk: bool,

    /// Do not take the census of the live heap by type (Python objects, C++ objects
    /// by vtable): each census reads every live block, about 0.7 s per GiB.
    #[arg(long)]
    no_census: bool,

    /// Do not scan for who keeps the heap alive at the end (two conservative scans
    /// from the roots through glibc's in-use blocks, within 5 s each).
    #[arg(long)]
    no_reachability: bool,

    /// A directory of debug files (a /usr/lib/debug-style tree: .build-id/xx/….debug,
    /// or files named by .gnu_debuglink), searched before the target's and ours;
    /// repeatable. The report lists objects whose frames had no names.
    #[arg(long, value_name = "DIR", value_parser = parse_dir)]
    debug_dir: Vec<PathBuf>,

    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Command to launch under trace, after `--`.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum UnwindArg {
    Cfi,
    Fp,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    Text,
    Json,
    /// A gzipped pprof heap profile.
    Pprof,
    /// Folded stacks (`outermost;…;innermost bytes`).
    Folded,
}

fn parse_pid(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) | Err(_) => Err(format!(
            "'{s}' is not a process id (a positive integer, e.g. from `pidof NAME`)"
        )),
        Ok(p) => Ok(p),
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v < 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

/// Shortest `--interval`: each report is a heap walk and a render; more often than
/// this it would be most of what leaktrace does.
const MIN_INTERVAL_S: f64 = 0.1;

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_seconds(s)?;
    if d.as_secs_f64() < MIN_INTERVAL_S {
        return Err(format!(
            "an interval of '{s}' s is shorter than {MIN_INTERVAL_S} s"
        ));
    }
    Ok(d)
}

/// `--continuous`'s sampling interval unless --sample-rate says otherwise.
const CONTINUOUS_SAMPLE_RATE: u32 = 512 << 10;

/// Largest ring buffer, KiB (1 GiB: its size in bytes must fit the kernel's u32).
const MAX_RING_KIB: u32 = 1 << 20;

fn parse_dir(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if p.is_dir() {
        Ok(p)
    } else {
        Err(format!("{s} is not a directory"))
    }
}

fn parse_ring_kib(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(v) if v >= 4 && v.is_power_of_two() && v <= MAX_RING_KIB => Ok(v),
        Ok(v) => Err(format!(
            "{v} KiB is not a power of two between 4 and {MAX_RING_KIB}; use {} or {}",
            v.checked_next_power_of_two()
                .map_or(MAX_RING_KIB, |p| p / 2)
                .clamp(4, MAX_RING_KIB),
            v.checked_next_power_of_two()
                .unwrap_or(MAX_RING_KIB)
                .clamp(4, MAX_RING_KIB)
        )),
        Err(_) => Err(format!("'{s}' is not a size in KiB")),
    }
}

fn parse_pct(s: &str) -> Result<f64, String> {
    match s.trim_end_matches('%').parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("'{s}' is not a positive percentage")),
    }
}

fn parse_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (
            &t[..i],
            match t[i..].to_ascii_uppercase().trim_end_matches(['B', 'I']) {
                "K" => 1u64 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "" => 1,
                _ => return Err(format!("'{s}' is not a size (use e.g. 524288, 512K or 2M)")),
            },
        ),
        None => (t, 1),
    };
    let v = num
        .parse::<u64>()
        .map_err(|_| format!("'{s}' is not a size (use e.g. 524288, 512K or 2M)"))?
        .saturating_mul(mul);
    if v == 0 || v > u64::from(u32::MAX) {
        return Err(format!("'{s}' must be between 1 byte and 4 GiB"));
    }
    Ok(v as u32)
}

fn config(opts: Opts) -> Config {
    let target = match opts.pid {
        Some(pid) => Target::Pid(pid),
        None => Target::Command(opts.command),
    };
    Config {
        target,
        duration: opts.duration,
        interval: opts.interval,
        top: opts.top,
        max_frames: opts.max_frames,
        full_stacks: opts.full_stacks,
        follow_forks: opts.follow_forks,
        format: match opts.format {
            FormatArg::Text => Format::Text,
            FormatArg::Json => Format::Json,
            FormatArg::Pprof => Format::Pprof,
            FormatArg::Folded => Format::Folded,
        },
        output: opts.output,
        flamegraph: opts.flamegraph,
        pprof_dir: opts.pprof_dir.map(|d| (d, opts.pprof_keep as usize)),
        record: opts.record,
        prometheus: opts.prometheus,
        prometheus_top: opts.prometheus_top as usize,
        live: opts.live,
        continuous: opts.continuous,
        age_after: opts.age_after.unwrap_or(Config::default().age_after),
        ring_bytes: opts.ring_kib * 1024,
        stack_capacity: opts.stack_capacity,
        inflight_capacity: opts.inflight_capacity,
        capture_stacks: !opts.no_stacks,
        announce: true,
        sample_rate: opts.sample_rate.unwrap_or(0),
        sampled_capacity: opts.sampled_capacity,
        dry_run: opts.dry_run,
        // With the duty cycle, --max-overhead is its budget, not a reason to detach.
        max_overhead_pct: opts
            .max_overhead
            .filter(|_| opts.sample_rate.is_none() || opts.no_duty_cycle),
        min_age: opts.min_age,
        walk_heaps: !opts.no_heap_walk,
        census: !opts.no_census && !opts.no_heap_walk,
        reachability: !opts.no_reachability && !opts.no_heap_walk,
        debug_dirs: opts.debug_dir,
        python_stacks: !opts.no_python,
        bare_probes: opts.bare_probes,
        fp_stacks: opts.unwind == UnwindArg::Fp,
        copy_stacks: opts.copy_stacks,
        uprobe_sessions: !opts.no_uprobe_sessions,
        duty_budget_pct: (opts.sample_rate.is_some() && !opts.no_duty_cycle && !opts.dry_run).then(
            || {
                opts.max_overhead
                    .unwrap_or(leaktrace::session::DEFAULT_DUTY_BUDGET_PCT)
            },
        ),
    }
}

fn main() -> ExitCode {
    let opts = match Opts::try_parse() {
        Ok(o) => o,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            if code == 2 {
                // One clear line, not clap's multi-line usage block.
                let msg = e.render().to_string();
                // clap's message up to its usage block, on one line.
                let first = msg
                    .lines()
                    .take_while(|l| !l.trim().is_empty())
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ");
                let first = first.trim_start_matches("error: ");
                if e.kind() == clap::error::ErrorKind::MissingRequiredArgument
                    && first.contains("<PID>")
                {
                    eprintln!(
                        "leaktrace: say what to trace: --pid PID, or a command after -- (see --help)"
                    );
                } else {
                    eprintln!("leaktrace: {first} (see --help)");
                }
            } else {
                let _ = e.print();
            }
            return ExitCode::from(code);
        }
    };
    if opts.dry_run && (opts.sample_rate.is_some() || opts.max_overhead.is_some()) {
        eprintln!("leaktrace: --dry-run only counts calls; drop --sample-rate and --max-overhead");
        return ExitCode::from(2);
    }
    if matches!(opts.format, FormatArg::Pprof | FormatArg::Folded) && opts.interval.is_some() {
        eprintln!(
            "leaktrace: --format pprof and folded write one document at the end; drop --interval"
        );
        return ExitCode::from(2);
    }
    if let Some(report) = &opts.convert {
        return offline(convert(report, &opts));
    }
    if let Some(files) = &opts.diff {
        return offline(diff(&files[0], &files[1], &opts));
    }
    if let Some(capture) = &opts.replay {
        return offline(replay(capture, &opts));
    }
    let mut opts = opts;
    if opts.continuous && opts.sample_rate.is_none() {
        opts.sample_rate = Some(CONTINUOUS_SAMPLE_RATE);
    }
    if opts.dry_run && opts.duration.is_none() {
        opts.duration = Some(Duration::from_secs(5));
    }
    let level = match opts.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_env("LEAKTRACE_LOG")
        .init();
    // From here on Ctrl-C and SIGTERM stop leaktrace in an orderly way, whatever phase.
    leaktrace::session::stop::install();
    match leaktrace::run(&config(opts)) {
        Ok(outcome) if outcome.interrupted => ExitCode::from(130),
        Ok(_) => ExitCode::SUCCESS,
        Err(e @ leaktrace::error::Error::Stopped { signal }) => {
            eprintln!("leaktrace: {}", leaktrace::error::chain(&e));
            ExitCode::from(if signal == libc::SIGINT { 130 } else { 143 })
        }
        Err(e) => {
            eprintln!("leaktrace: {}", leaktrace::error::chain(&e));
            ExitCode::from(2)
        }
    }
}

/// The exit of a mode that traces nothing: one line on stderr when it failed.
fn offline(r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("leaktrace: {why}");
            ExitCode::from(2)
        }
    }
}

/// Where an offline mode writes.
fn out(opts: &Opts) -> Result<leaktrace::session::output::Output, String> {
    use leaktrace::session::output::Output;
    match &opts.output {
        Some(p) => Output::file(p).map_err(|e| leaktrace::error::chain(&e)),
        None => Ok(Output::stdout()),
    }
}

/// `--convert`: a JSON report in another format.
fn convert(report: &std::path::Path, opts: &Opts) -> Result<(), String> {
    use leaktrace::report::{diff, pprof};
    if matches!(opts.format, FormatArg::Json | FormatArg::Text) && opts.flamegraph.is_none() {
        return Err("--convert writes --format pprof or folded (or --flamegraph FILE)".into());
    }
    let heaps = diff::load(report)?;
    let mut o = out(opts)?;
    let written = match opts.format {
        FormatArg::Pprof => o.write_bytes(&pprof::encode(&heaps)),
        FormatArg::Folded => o.write(&pprof::folded(&heaps, false)),
        FormatArg::Json | FormatArg::Text => Ok(()),
    };
    written.map_err(|e| leaktrace::error::chain(&e))?;
    if let Some(svg) = &opts.flamegraph {
        leaktrace::session::write_flamegraph(svg, &heaps)
            .map_err(|e| leaktrace::error::chain(&e))?;
    }
    Ok(())
}

/// `--replay`: a capture's analysis redone, its final report written.
fn replay(path: &std::path::Path, opts: &Opts) -> Result<(), String> {
    use leaktrace::report::pprof::{self, Heaps};
    let r = leaktrace::capture::Replay::load(path)?;
    let shown = path.display();
    eprintln!(
        "leaktrace: replaying {shown}: pid {} ({}), {} events, recorded by leaktrace {}",
        r.start.pid,
        leaktrace::units::printable(&r.start.command),
        r.events,
        r.start.version
    );
    if let Some(cut) = &r.cut {
        eprintln!("leaktrace: {shown} is cut short {cut}: replayed up to there");
    } else if !r.complete {
        eprintln!(
            "leaktrace: {shown} has no final report (copied while recording, or leaktrace was killed): replayed to its last sample"
        );
    }
    let every = matches!(opts.format, FormatArg::Pprof | FormatArg::Folded);
    let report = r.report(if every { usize::MAX } else { opts.top });
    let mut o = out(opts)?;
    let written = match opts.format {
        FormatArg::Text => o.write(&leaktrace::report::render_text(
            &report,
            leaktrace::report::Frames {
                max: opts.max_frames,
                fold_python: !opts.full_stacks,
            },
        )),
        FormatArg::Json => {
            o.write(&(serde_json::to_string_pretty(&report).map_err(|e| e.to_string())? + "\n"))
        }
        FormatArg::Pprof => {
            let mut h = Heaps::from(&report);
            h.build_ids = r.build_ids.clone();
            o.write_bytes(&pprof::encode(&h))
        }
        FormatArg::Folded => o.write(&pprof::folded(&Heaps::from(&report), false)),
    };
    written.map_err(|e| leaktrace::error::chain(&e))?;
    if let Some(svg) = &opts.flamegraph {
        let all = if every {
            Heaps::from(&report)
        } else {
            Heaps::from(&r.report(usize::MAX))
        };
        leaktrace::session::write_flamegraph(svg, &all).map_err(|e| leaktrace::error::chain(&e))?;
    }
    Ok(())
}

/// `--diff`: two JSON reports compared.
fn diff(base: &std::path::Path, new: &std::path::Path, opts: &Opts) -> Result<(), String> {
    use leaktrace::report::diff;
    let d = diff::compare(&diff::load(base)?, &diff::load(new)?);
    let text = match opts.format {
        FormatArg::Text => {
            diff::render(&d, &base.display().to_string(), &new.display().to_string())
        }
        FormatArg::Json => serde_json::to_string_pretty(&d).map_err(|e| e.to_string())? + "\n",
        FormatArg::Pprof | FormatArg::Folded => {
            return Err(
                "--diff writes text or --format json (for pprof, use go tool pprof -diff_base)"
                    .into(),
            );
        }
    };
    out(opts)?
        .write(&text)
        .map_err(|e| leaktrace::error::chain(&e))
}
