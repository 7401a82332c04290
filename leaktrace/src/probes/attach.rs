//! Attaching the loaded programs: the allocator probes (uprobes, uretprobes, and
//! uprobe sessions for malloc and calloc when sampling) and the syscall tracepoints.

use std::num::NonZeroU32;

use aya::{
    Ebpf,
    programs::{TracePoint, UProbe, trace_point::TracePointLinkId, uprobe::UProbeScope},
};
use leaktrace_common::AllocFn;
use serde::{Deserialize, Serialize};

use crate::{
    error::Error,
    probes::{
        allocators::ProbeSite,
        load::BPF_OBJECT,
        uprobe_session::{SessionError, SessionLink, SessionProgram},
    },
    session::stop,
};

/// The syscall tracepoints, each attached at its enter and exit.
pub const SYSCALLS: [&str; 6] = ["mmap", "munmap", "mremap", "brk", "mprotect", "madvise"];

/// How a probed function's return is seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReturnProbe {
    /// A return probe on every call.
    Uretprobe,
    /// A uprobe session: the return runs only for sampled calls.
    Session,
    /// Not seen (free, and every function in a dry run).
    None,
}

/// A probe leaktrace attached.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeInfo {
    /// Function name.
    pub function: String,
    /// Object as the target names it.
    pub object: String,
    /// File offset of the probe.
    pub offset: u64,
    /// Offset of the probe from the function's first instruction.
    pub offset_in_function: u64,
    /// Why the probe sits there.
    pub placement: String,
    /// How the return is seen.
    pub return_probe: ReturnProbe,
}

/// The heap probes' links, so they can be detached on their own: aya's uprobes by
/// program name, and the uprobe sessions' links (made without aya).
#[derive(Debug)]
pub struct HeapLinks {
    /// aya's uprobe links, with the program each belongs to.
    pub uprobes: Vec<(&'static str, aya::programs::uprobe::UProbeLinkId)>,
    /// Uprobe session links (closing one detaches it).
    pub sessions: Vec<SessionLink>,
}

/// What [`attach`] attached.
#[derive(Debug)]
pub struct Attached {
    /// Every allocator probe, for the report.
    pub probes: Vec<ProbeInfo>,
    /// The heap probes' links while attached (taken when the budget detaches them).
    pub heap_links: Option<HeapLinks>,
    /// The uprobe session program, when attached (outside aya, so measured on its own).
    pub session_program: Option<SessionProgram>,
    /// The heap programs loaded for `uprobe_multi` links, when the duty cycle attaches
    /// and detaches the heap probes (Linux 6.6+).
    pub multi: Option<MultiPrograms>,
    /// The free-like functions' probes under the duty cycle, kept apart: they stay
    /// attached between windows when they are cheap enough (a free is then seen whenever
    /// it comes, so a block recorded in a window is counted live until it really is
    /// freed); otherwise they are detached with the rest (None).
    pub persistent: Option<Vec<SessionLink>>,
    /// The tracepoints' links, with the program each belongs to.
    pub tracepoints: Vec<(String, TracePointLinkId)>,
    /// The tracepoints loaded but not attached yet: (category, program name).
    pub tracepoints_wanted: Vec<(&'static str, String)>,
}

/// The heap's entry and return programs loaded for `uprobe_multi` links: one link per
/// object for all its probes, so detaching them waits for one RCU grace period, not
/// one per probe (~90 ms each on Linux 6.18 under load, one after another).
#[derive(Debug)]
pub struct MultiPrograms {
    enter: SessionProgram,
    exit: SessionProgram,
}

impl MultiPrograms {
    /// Loads them (before the maps are taken out of `ebpf`).
    pub fn load(ebpf: &Ebpf) -> Result<Self, SessionError> {
        Ok(Self {
            enter: SessionProgram::load_multi(BPF_OBJECT, ebpf, "heap_enter", false)?,
            exit: SessionProgram::load_multi(BPF_OBJECT, ebpf, "alloc_exit", true)?,
        })
    }

    /// The kernel's run statistics of both: (run time ns, runs).
    pub fn run_stats(&self) -> (u64, u64) {
        let (a, b) = (
            self.enter.run_stats().unwrap_or((0, 0)),
            self.exit.run_stats().unwrap_or((0, 0)),
        );
        (a.0 + b.0, a.1 + b.1)
    }

    /// Attaches the heap probes at `sites` of the free-like functions (`frees`) or of
    /// the others, but those in `skip` (covered by the session program): per object, one
    /// link for the entries and one for the returns.
    fn attach(
        &self,
        pid: u32,
        sites: &[ProbeSite],
        skip: &[usize],
        frees: bool,
        returns: bool,
    ) -> Result<Vec<SessionLink>, SessionError> {
        let mut by_object: std::collections::BTreeMap<&std::path::Path, Vec<usize>> =
            Default::default();
        for (i, s) in sites.iter().enumerate() {
            if !skip.contains(&i) && s.func.frees() == frees {
                by_object.entry(s.host_path.as_path()).or_default().push(i);
            }
        }
        let mut links = Vec::new();
        for (path, idx) in by_object {
            let offsets: Vec<u64> = idx.iter().map(|&i| sites[i].offset).collect();
            let cookies: Vec<u64> = idx.iter().map(|&i| sites[i].func as u64).collect();
            // The returns first: a process already running (a child followed as it
            // forks) may call between the two attaches, and a return without its
            // entry is only counted, while an entry without its return stays in
            // flight and makes the thread's later calls look nested in it.
            let returns: Vec<usize> = idx
                .iter()
                .copied()
                .filter(|&i| returns && sites[i].func.return_program().is_some())
                .collect();
            if !returns.is_empty() {
                let offsets: Vec<u64> = returns.iter().map(|&i| sites[i].offset).collect();
                let cookies: Vec<u64> = returns.iter().map(|&i| sites[i].func as u64).collect();
                links.push(self.exit.attach(path, &offsets, &cookies, pid)?);
            }
            links.push(self.enter.attach(path, &offsets, &cookies, pid)?);
        }
        Ok(links)
    }
}

impl Attached {
    /// Functions probed by uprobe sessions.
    pub fn session_functions(&self) -> Vec<AllocFn> {
        self.probes
            .iter()
            .filter(|p| p.return_probe == ReturnProbe::Session)
            .filter_map(|p| {
                AllocFn::ALL
                    .iter()
                    .copied()
                    .find(|f| f.symbol() == p.function)
            })
            .collect()
    }
}

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
) -> Result<(SessionProgram, Vec<SessionLink>, Vec<usize>), SessionError> {
    let program = SessionProgram::load(BPF_OBJECT, ebpf, "alloc_session")?;
    let mut by_object: std::collections::BTreeMap<&std::path::Path, Vec<usize>> =
        Default::default();
    for (i, s) in sites.iter().enumerate() {
        if session_capable(s.func) {
            by_object.entry(s.host_path.as_path()).or_default().push(i);
        }
    }
    let (mut links, mut covered) = (Vec::new(), Vec::new());
    for (path, idx) in by_object {
        // At the placed site, before any push: the return is hijacked through the
        // return address at [sp], and entry and return share the trap.
        let offsets: Vec<u64> = idx.iter().map(|&i| sites[i].offset).collect();
        let cookies: Vec<u64> = idx.iter().map(|&i| sites[i].func as u64).collect();
        links.push(program.attach(path, &offsets, &cookies, pid)?);
        covered.extend(idx);
    }
    Ok((program, links, covered))
}

/// Attaches the heap probes at `sites` (entries only in a dry run; malloc and calloc
/// as uprobe sessions when `sessions`, falling back to return probes) and the
/// syscall tracepoints (none in a dry run). The programs stay idle until [`enable`].
///
/// [`enable`]: super::load::enable
pub fn attach(
    ebpf: &mut Ebpf,
    pid: u32,
    sites: &[ProbeSite],
    dry_run: bool,
    sessions: bool,
    duty_cycle: bool,
    follow_forks: bool,
) -> Result<Attached, Error> {
    let mut links = Vec::new();
    // The heap probes go through uprobe_multi links where the kernel has them (Linux
    // 6.6+): one link per object for the entries and one for the returns, attached in
    // one call and detached waiting for one RCU grace period. Detaching ~30 of aya's
    // perf uprobes waited for one each (~90 ms apiece on 6.18 under load): seconds
    // at every exit, and a duty cycle could not work. Before 6.6, one by one.
    // The kernel's BTF says whether it has them (loading the programs for nothing costs
    // two verifier runs, seconds under emulation).
    let has_multi =
        super::btf::Btf::kernel().is_some_and(|b| b.has_struct("bpf_uprobe_multi_link"));
    stop::check()?;
    let multi = match has_multi.then(|| MultiPrograms::load(ebpf)) {
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => {
            log::info!(
                "uprobe_multi links unavailable ({}): probes attached one by one",
                crate::error::chain(&e)
            );
            None
        }
        None => {
            log::info!("this kernel has no uprobe_multi links (6.6+): probes attached one by one");
            None
        }
    };
    stop::check()?;
    // Before aya's own probes, so a failure leaves nothing half attached.
    let (session_prog, session_links, in_session) = match sessions
        .then(|| attach_sessions(ebpf, pid, sites))
    {
        Some(Ok((p, l, covered))) => (Some(p), l, covered),
        Some(Err(e)) => {
            eprintln!(
                "leaktrace: uprobe sessions unavailable ({}): unsampled allocations still pay the return probe",
                crate::error::chain(&e)
            );
            (None, Vec::new(), Vec::new())
        }
        None => (None, Vec::new(), Vec::new()),
    };
    // The multi links first: a kernel that loads their programs but has no such links
    // (6.1 takes the attach type and refuses the link) falls back to aya's uprobes.
    let mut multi_links = Vec::new();
    let mut persistent = None;
    let multi = match multi {
        Some(m) => {
            let all = m
                .attach(pid, sites, &in_session, false, !dry_run)
                .and_then(|a| Ok((a, m.attach(pid, sites, &in_session, true, !dry_run)?)));
            match all {
                Ok((allocs, frees)) => {
                    multi_links = allocs;
                    // Under the duty cycle the frees are kept apart (they may stay
                    // attached between windows).
                    if duty_cycle && !dry_run {
                        persistent = Some(frees);
                    } else {
                        multi_links.extend(frees);
                    }
                    Some(m)
                }
                Err(e) => {
                    log::info!(
                        "uprobe_multi links refused ({}): probes attached one by one",
                        crate::error::chain(&e)
                    );
                    None
                }
            }
        }
        None => None,
    };
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(Error::NoSuchProcess { pid })?);
    let uprobe = |ebpf: &mut Ebpf, name: &'static str| -> Result<(), Error> {
        stop::check()?;
        let p: &mut UProbe = ebpf
            .program_mut(name)
            .ok_or(Error::Missing(name))?
            .try_into()
            .map_err(attach_err(name.into()))?;
        p.load().map_err(attach_err(name.into()))
    };
    // The programs stay idle until `enable` flips the ENABLED flag, so the order
    // of attachment does not matter for pairing. With uprobe_multi links, aya's own
    // copies of the heap programs are not needed (each costs a verifier run).
    if multi.is_none() {
        uprobe(ebpf, "alloc_exit")?;
    }
    // A dry run counts calls at the entries only.
    for (_, site) in sites.iter().enumerate().filter(|(i, s)| {
        s.func.return_program().is_some() && !dry_run && !in_session.contains(i) && multi.is_none()
    }) {
        // A return probe hijacks the return address at [sp]: at the placed site, before
        // any push, where the entry probe is (one trap serves both).
        let link = attach_one(ebpf, "alloc_exit", site, site.offset, "return probe", scope)?;
        links.push(("alloc_exit", link));
    }
    let mut infos = Vec::new();
    let mut loaded: Vec<&'static str> = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        if in_session.contains(&i) {
            log::info!("uprobe session on {} in {}", site.name, site.object);
            infos.push(ProbeInfo {
                function: site.name.into(),
                object: site.object.clone(),
                offset: site.offset,
                offset_in_function: site.placement.offset,
                placement: format!(
                    "a uprobe session, whose return runs only for sampled calls; {}",
                    site.placement.reason
                ),
                return_probe: ReturnProbe::Session,
            });
            continue;
        }
        let name = site.func.entry_program();
        // Several objects may define one function (an interposed allocator and libc).
        if !loaded.contains(&name) && multi.is_none() {
            uprobe(ebpf, name)?;
            loaded.push(name);
        }
        if multi.is_none() {
            let link = attach_one(ebpf, name, site, site.offset, "probe", scope)?;
            links.push((name, link));
        }
        log::info!(
            "probe on {} in {} at +{}: {}",
            site.name,
            site.object,
            site.placement.offset,
            site.placement.reason
        );
        infos.push(ProbeInfo {
            function: site.name.into(),
            object: site.object.clone(),
            offset: site.offset,
            offset_in_function: site.placement.offset,
            placement: site.placement.reason.clone(),
            return_probe: if site.func.return_program().is_some() && !dry_run {
                ReturnProbe::Uretprobe
            } else {
                ReturnProbe::None
            },
        });
    }
    // The tracepoints' programs are loaded now (the verifier runs are the slow part);
    // they are attached by [`attach_tracepoints`] just before tracing starts, so a stop
    // while starting has none to take out (the kernel closes them one after another,
    // ~50 ms each).
    let mut wanted: Vec<(&'static str, String)> = Vec::new();
    if !dry_run {
        for phase in ["enter", "exit"] {
            for sc in SYSCALLS {
                wanted.push(("syscalls", format!("sys_{phase}_{sc}")));
            }
        }
        wanted.push(("sched", "sched_process_exec".into()));
        if follow_forks {
            // The family's forks and exits (`--follow-forks`).
            wanted.push(("task", "task_newtask".into()));
            wanted.push(("sched", "sched_process_exit".into()));
        }
    }
    for (_, name) in &wanted {
        let prog = ebpf
            .program_mut(name)
            .ok_or(Error::Missing("a tracepoint program"))?;
        let tp: &mut TracePoint = prog.try_into().map_err(attach_err(name.clone()))?;
        stop::check()?;
        tp.load().map_err(attach_err(name.clone()))?;
    }
    let mut session_links = session_links;
    session_links.extend(multi_links);
    Ok(Attached {
        probes: infos,
        heap_links: Some(HeapLinks {
            uprobes: links,
            sessions: session_links,
        }),
        session_program: session_prog,
        multi,
        persistent,
        tracepoints: Vec::new(),
        tracepoints_wanted: wanted,
    })
}

/// Attaches the tracepoints [`attach`] loaded (idle until [`enable`]).
///
/// [`enable`]: super::load::enable
pub fn attach_tracepoints(ebpf: &mut Ebpf, attached: &mut Attached) -> Result<(), Error> {
    for (category, name) in std::mem::take(&mut attached.tracepoints_wanted) {
        let prog = ebpf
            .program_mut(&name)
            .ok_or(Error::Missing("a tracepoint program"))?;
        let tp: &mut TracePoint = prog.try_into().map_err(attach_err(name.clone()))?;
        let link = tp
            .attach(category, &name)
            .map_err(attach_err(format!("tracepoint {category}:{name}")))?;
        attached.tracepoints.push((name, link));
    }
    Ok(())
}

/// Attaches the heap probes at `sites` again (their programs are loaded already): the
/// duty cycle of sampled mode attaches them only for windows. The same sites as the
/// first time, entry and return probes alike, malloc and calloc through the session
/// program when there is one; idle until [`enable`](super::load::enable).
pub fn reattach_heap(
    ebpf: &mut Ebpf,
    pid: u32,
    sites: &[ProbeSite],
    session: Option<&SessionProgram>,
    multi: Option<&MultiPrograms>,
    with_frees: bool,
) -> Result<HeapLinks, Error> {
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(Error::NoSuchProcess { pid })?);
    let mut sessions = Vec::new();
    let mut in_session = Vec::new();
    if let Some(program) = session {
        let mut by_object: std::collections::BTreeMap<&std::path::Path, Vec<usize>> =
            Default::default();
        for (i, s) in sites.iter().enumerate() {
            if session_capable(s.func) {
                by_object.entry(s.host_path.as_path()).or_default().push(i);
            }
        }
        for (path, idx) in by_object {
            let offsets: Vec<u64> = idx.iter().map(|&i| sites[i].offset).collect();
            let cookies: Vec<u64> = idx.iter().map(|&i| sites[i].func as u64).collect();
            let link = program.attach(path, &offsets, &cookies, pid).map_err(|e| {
                Error::Worker(format!("uprobe session: {}", crate::error::chain(&e)))
            })?;
            sessions.push(link);
            in_session.extend(idx);
        }
    }
    if let Some(m) = multi {
        let multi_err =
            |e: SessionError| Error::Worker(format!("uprobe_multi: {}", crate::error::chain(&e)));
        // The frees first: a process already running (a child followed as it forks)
        // may allocate and free between the attaches, and a free of a block never seen
        // is only counted, while a block whose free was missed stays live in the books
        // until its address comes back (`alloc_over_live`, a loss).
        if with_frees {
            sessions.extend(
                m.attach(pid, sites, &in_session, true, true)
                    .map_err(multi_err)?,
            );
        }
        sessions.extend(
            m.attach(pid, sites, &in_session, false, true)
                .map_err(multi_err)?,
        );
        return Ok(HeapLinks {
            uprobes: Vec::new(),
            sessions,
        });
    }
    let mut uprobes = Vec::new();
    // The frees first, as above.
    let frees_first = sites
        .iter()
        .enumerate()
        .filter(|(_, s)| s.func.frees())
        .chain(sites.iter().enumerate().filter(|(_, s)| !s.func.frees()));
    for (i, site) in frees_first {
        if in_session.contains(&i) {
            continue;
        }
        if site.func.return_program().is_some() {
            let link = attach_one(ebpf, "alloc_exit", site, site.offset, "return probe", scope)?;
            uprobes.push(("alloc_exit", link));
        }
        let name = site.func.entry_program();
        let link = attach_one(ebpf, name, site, site.offset, "probe", scope)?;
        uprobes.push((name, link));
    }
    Ok(HeapLinks { uprobes, sessions })
}

/// Maps an attach failure to "not privileged" when the kernel said EPERM.
fn attach_err(what: String) -> impl FnOnce(aya::programs::ProgramError) -> Error {
    move |source| {
        if Error::is_permission(&source) {
            Error::NotPrivileged
        } else {
            Error::Attach { what, source }
        }
    }
}

/// Attaches the loaded uprobe program `name` at `offset` of `site`'s object.
fn attach_one(
    ebpf: &mut Ebpf,
    name: &'static str,
    site: &ProbeSite,
    offset: u64,
    what: &str,
    scope: UProbeScope,
) -> Result<aya::programs::uprobe::UProbeLinkId, Error> {
    let p: &mut UProbe = ebpf
        .program_mut(name)
        .ok_or(Error::Missing(name))?
        .try_into()
        .map_err(attach_err(name.into()))?;
    // The entry program reads the function from the cookie.
    let point = aya::programs::uprobe::UProbeAttachPoint {
        location: offset.into(),
        cookie: matches!(p.kind(), aya::programs::ProbeKind::Entry).then_some(site.func as u64),
    };
    p.attach(point, &site.host_path, scope)
        .map_err(attach_err(format!(
            "{what} on {} in {}",
            site.name, site.object
        )))
}

/// Starts detaching every probe and tracepoint at the end of a run, all at once: each
/// link is closed on a thread of its own, while the last events are drained and the
/// final report is made; [`Detaching::wait`] joins them before leaktrace exits.
/// Closing a tracepoint waits for RCU grace periods under the kernel's event mutex
/// (~40–55 ms each on Linux 6.18 with the target busy, one after another), a uprobe
/// for one more: when `Ebpf` was dropped, thirteen tracepoints and the heap's links
/// held leaktrace's exit for about a second after the report.
pub fn start_detach(ebpf: &mut Ebpf, attached: &mut Attached, more: Vec<HeapLinks>) -> Detaching {
    let mut closers: Vec<Closer> = Vec::new();
    for (name, link) in std::mem::take(&mut attached.tracepoints) {
        match ebpf
            .program_mut(&name)
            .and_then(|p| <&mut TracePoint>::try_from(p).ok())
            .map(|p| p.take_link(link))
        {
            Some(Ok(l)) => closers.push(Box::new(move || drop(l))),
            Some(Err(e)) => log::warn!("failed to detach {name}: {e}"),
            None => log::warn!("failed to detach {name}: no such program"),
        }
    }
    for links in attached.heap_links.take().into_iter().chain(more) {
        heap_closers(ebpf, links, &mut closers);
    }
    for l in attached.persistent.take().into_iter().flatten() {
        closers.push(Box::new(move || drop(l)));
    }
    let threads = close_on_threads(closers);
    Detaching {
        threads,
        started: std::time::Instant::now(),
    }
}

/// The links being closed by [`start_detach`].
#[derive(Debug)]
pub struct Detaching {
    threads: Vec<std::thread::JoinHandle<()>>,
    started: std::time::Instant,
}

impl Detaching {
    /// Waits until every link is closed.
    pub fn wait(self) {
        let n = self.threads.len();
        for t in self.threads {
            let _ = t.join();
        }
        log::debug!(
            "{n} links detached in {:.1} ms",
            self.started.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// Detaches the heap probes (the syscall tracepoints stay), without waiting: each
/// link is closed on a thread of its own. Closing a uprobe takes its breakpoint out at
/// once but then waits for an RCU grace period (Linux 6.12+: ~0.1–0.2 s under load),
/// so closing ~30 one after another held the event loop for seconds and left the
/// later breakpoints in place meanwhile.
pub fn detach_heap(ebpf: &mut Ebpf, links: HeapLinks) {
    let mut closers = Vec::new();
    heap_closers(ebpf, links, &mut closers);
    // Not joined: the event loop goes on while they close.
    drop(close_on_threads(closers));
}

/// Something that closes one link when called.
type Closer = Box<dyn FnOnce() + Send>;

/// Takes the heap probes' links out of their programs, each into a [`Closer`].
fn heap_closers(ebpf: &mut Ebpf, links: HeapLinks, closers: &mut Vec<Closer>) {
    for (name, link) in links.uprobes {
        match ebpf
            .program_mut(name)
            .and_then(|p| <&mut UProbe>::try_from(p).ok())
            .map(|p| p.take_link(link))
        {
            Some(Ok(l)) => closers.push(Box::new(move || drop(l))),
            Some(Err(e)) => log::warn!("failed to detach {name}: {e}"),
            None => log::warn!("failed to detach {name}: no such program"),
        }
    }
    for l in links.sessions {
        closers.push(Box::new(move || drop(l)));
    }
}

/// Runs each closer on a thread of its own: links closed together wait for their
/// grace periods together.
fn close_on_threads(closers: Vec<Closer>) -> Vec<std::thread::JoinHandle<()>> {
    closers
        .into_iter()
        .filter_map(|close| {
            std::thread::Builder::new()
                .name("leaktrace-detach".into())
                .spawn(close)
                // The closure went with the failed spawn: its link was closed here.
                .inspect_err(|e| log::warn!("failed to detach a probe on a thread of its own: {e}"))
                .ok()
        })
        .collect()
}
