//! The first stage: resolve the target, find its allocator, build the unwind tables
//! that size the kernel maps, load the BPF object and attach it. Nothing here runs
//! once events flow.

use std::path::PathBuf;

use aya::Ebpf;
use leaktrace_common::AllocFn;

use crate::{
    error::Error,
    probes::{
        allocators::{self, ProbeSite},
        attach::{self, Attached},
        load::{self, LoadOptions, Modes},
    },
    process::{launch, procfs, target},
    session::{Config, Target},
    unwind::{Capacity, Unwinder},
};

/// Everything the event loop starts from.
pub struct Prepared {
    /// The traced process.
    pub pid: u32,
    /// The objects mapped at attach (or that a launched command will map): path in
    /// the target, host path.
    pub objects: Vec<(String, PathBuf)>,
    /// A launched command, not yet released to exec.
    pub blocked: Option<launch::Blocked>,
    /// The allocator functions found.
    pub sites: Vec<ProbeSite>,
    /// The allocators they belong to (and a Go runtime), the one serving `malloc` marked.
    pub allocators: Vec<allocators::Found>,
    /// Why the heap is not traced (no allocator recognized), if it is not.
    pub heap_not_traced: Option<String>,
    /// The CFI unwinder with its tables built, when stacks are unwound with CFI.
    pub unwinder: Option<Unwinder>,
    /// The loaded programs.
    pub ebpf: Ebpf,
    /// The probes attached.
    pub attached: Attached,
    /// The heap's break at attach: the start of the brk heap and its end (none for a
    /// launched command, whose heap starts empty).
    pub start_brk: Option<u64>,
    /// See `start_brk`.
    pub brk: Option<u64>,
    /// What a trap costs on this machine, measured after attaching (or why not).
    pub calibrated: Result<crate::probes::calibrate::TrapCosts, Error>,
}

/// Whether native stacks are unwound with CFI tables (the default).
pub fn cfi_enabled(config: &Config) -> bool {
    config.capture_stacks
        && !config.fp_stacks
        && !config.copy_stacks
        && !config.dry_run
        && !config.bare_probes
}

/// Resolves the target, loads and attaches. A launched child is killed on failure.
pub fn prepare(config: &Config) -> Result<Prepared, Error> {
    let (pid, objects, blocked) = resolve(config)?;
    // Loading and attaching run on a thread of their own, with SIGINT and SIGTERM
    // blocked there (a verifier run a signal interrupts is given up and loaded again).
    // This thread waits and answers a signal at once: leaktrace exits, and the kernel
    // ends a verifier run in progress and closes whatever was attached. One verifier
    // run takes most of a second here, several on a loaded machine.
    let (tx, rx) = std::sync::mpsc::channel();
    let (cfg, objs) = (config.clone(), objects.clone());
    std::thread::Builder::new()
        .name("leaktrace-attach".into())
        .spawn(move || {
            let _shield = super::stop::Shield::new();
            let r = load_and_attach(&cfg, pid, objs.as_slice()).map(|mut l| {
                let traps = crate::probes::calibrate::calibrate(&mut l.4);
                (l, traps)
            });
            let _ = tx.send(r);
        })
        .map_err(|e| Error::Worker(format!("cannot start the attach thread: {e}")))?;
    let loaded = loop {
        match rx.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(r) => break r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Err(e) = super::stop::check() {
                    // Never joined: the process exits with the attach thread in it.
                    break Err(e);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err(Error::Worker("the attach thread died".into()));
            }
        }
    };
    match loaded {
        Ok(((sites, found, heap_not_traced, unwinder, ebpf, attached), calibrated)) => {
            // A stop asked during the calibration.
            let calibrated = match calibrated {
                Err(e @ Error::Stopped { .. }) => {
                    if let Some(b) = blocked {
                        launch::kill_blocked(b);
                    }
                    return Err(e);
                }
                c => c,
            };
            let launched = blocked.is_some();
            let start_brk = (!launched).then(|| procfs::read_start_brk(pid)).flatten();
            let brk = if launched {
                None
            } else {
                // The end of the brk heap, which may be several mappings end to end.
                procfs::read_maps(pid)
                    .ok()
                    .and_then(|m| crate::heap::glibc::find_sites(&m, start_brk, None).main)
                    .map(|(_, end)| end)
                    .or(start_brk)
            };
            Ok(Prepared {
                pid,
                objects,
                blocked,
                sites,
                allocators: found,
                heap_not_traced,
                unwinder,
                ebpf,
                attached,
                start_brk,
                brk,
                calibrated,
            })
        }
        Err(e) => {
            if let Some(b) = blocked {
                launch::kill_blocked(b);
            }
            Err(e)
        }
    }
}

/// A target's pid, its objects (path in the target, host path), and the launched
/// child held before exec.
type Resolved = (u32, Vec<(String, PathBuf)>, Option<launch::Blocked>);

/// The pid and its objects: a running process's mappings, or the objects a command
/// will map (its program, interpreter and libraries), with the child forked and held.
fn resolve(config: &Config) -> Result<Resolved, Error> {
    Ok(match &config.target {
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
            // `env LD_PRELOAD=… PROGRAM`: what runs, and on which allocator, is the
            // program's; env itself only execs it.
            let (runs, env) =
                launch::through_env(&path, argv).unwrap_or((path.clone(), Default::default()));
            let elf = launch::effective_elf(&runs)?;
            let objs: Vec<(String, PathBuf)> = launch::objects_for(&elf, &env)
                .into_iter()
                .map(|p| (p.display().to_string(), p))
                .collect();
            let blocked = launch::spawn_blocked(&path, argv)?;
            (blocked.pid, objs, Some(blocked))
        }
    })
}

/// What loading and attaching made: the probe sites, the allocators found, why the
/// heap is not traced (if not), the unwinder, the programs and the probes.
type Loaded = (
    Vec<ProbeSite>,
    Vec<allocators::Found>,
    Option<String>,
    Option<Unwinder>,
    Ebpf,
    Attached,
);

/// Finds the allocator, sizes and loads the programs, attaches them.
fn load_and_attach(
    config: &Config,
    pid: u32,
    objects: &[(String, PathBuf)],
) -> Result<Loaded, Error> {
    // Ctrl-C between the steps ends here (each step is well under a second).
    let stopped = || match super::stop::requested() {
        Some(signal) => Err(Error::Stopped { signal }),
        None => Ok(()),
    };
    let mut search = allocators::search(objects.iter().map(|(t, h)| (t.as_str(), h.clone())));
    let has = |f: AllocFn| search.sites.iter().any(|s| s.func == f);
    let mut heap_not_traced = None;
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
        let e = Error::NoAllocator {
            pid,
            looked_for,
            searched,
        };
        // A dry run only counts allocator calls: with none to probe it has nothing to do.
        if config.dry_run || config.bare_probes {
            return Err(e);
        }
        // A static binary or an allocator leaktrace does not know: its mappings, brk
        // and RSS are still worth tracing.
        let mut why = e.to_string();
        if let Some(go) = search
            .allocators
            .iter()
            .find(|f| f.allocator == allocators::Allocator::Go)
        {
            why.push_str(&format!(
                " ({} program: its heap is the Go runtime's own, which has no malloc to probe)",
                go.version.as_deref().unwrap_or("a Go")
            ));
        }
        eprintln!("leaktrace: {why}; tracing its mappings, brk and RSS only");
        heap_not_traced = Some(why);
        search.sites.clear();
        for f in &mut search.allocators {
            f.probes = 0;
        }
    }

    // Unwind tables of the code mapped now (or about to be, for a launched command)
    // are built before loading, so the kernel arrays are created large enough.
    let mut unwinder = cfi_enabled(config).then(|| Unwinder::new(pid));
    // Whether a syscall's own walk can tell it runs inside free, malloc or calloc: then
    // frees need no mark, and malloc and calloc may skip unsampled returns (sessions).
    let mut walk_sees_allocators = false;
    let unwind = match &mut unwinder {
        Some(u) => {
            let hosts: Vec<PathBuf> = objects.iter().map(|(_, h)| h.clone()).collect();
            let caps = u.prepare(&hosts);
            walk_sees_allocators = u.set_allocator_functions(
                [AllocFn::Free, AllocFn::Malloc, AllocFn::Calloc]
                    .iter()
                    .flat_map(|f| search.sites.iter().filter(move |s| s.func == *f))
                    .map(|s| (s.host_path.as_path(), s.symbol.0, s.symbol.1)),
            );
            caps
        }
        None => Capacity::default(),
    };
    stopped()?;
    let t = std::time::Instant::now();
    let mut ebpf = load::load(&LoadOptions {
        pid,
        modes: Modes {
            capture_stacks: config.capture_stacks,
            count_only: config.dry_run || config.bare_probes,
            fp_stacks: config.fp_stacks,
            copy_stacks: config.copy_stacks,
            free_mark: !walk_sees_allocators,
            stop_on_exec_map: matches!(config.target, Target::Command(_)) && cfi_enabled(config),
            follow_forks: config.follow_forks,
        },
        ring_bytes: config.ring_bytes,
        stack_capacity: config.stack_capacity,
        inflight_capacity: config.inflight_capacity,
        sampled_capacity: config.sampled_capacity,
        sample_rate: config.sample_rate,
        unwind,
    })?;
    log::debug!(
        "BPF object loaded in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    stopped()?;
    // Sessions leave an unsampled call no record in flight: only the walk of a syscall it
    // makes can then tell that syscall is the allocator's.
    let sessions = config.uprobe_sessions
        && walk_sees_allocators
        && config.sample_rate > 0
        && !config.dry_run
        && !config.bare_probes;
    let t = std::time::Instant::now();
    let attached = attach::attach(
        &mut ebpf,
        pid,
        &search.sites,
        config.dry_run,
        sessions,
        config.duty_budget_pct.is_some(),
        config.follow_forks,
    )?;
    log::debug!(
        "programs loaded and attached in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    // Each allocator's probe count is what was placed for it in its object.
    Ok((
        search.sites,
        search.allocators,
        heap_not_traced,
        unwinder,
        ebpf,
        attached,
    ))
}
