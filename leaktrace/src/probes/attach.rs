//! Attaching the loaded programs: the allocator probes (uprobes, uretprobes, and
//! uprobe sessions for malloc and calloc when sampling) and the syscall tracepoints.

use std::num::NonZeroU32;

use aya::{
    Ebpf,
    programs::{TracePoint, UProbe, uprobe::UProbeScope},
};
use leaktrace_common::AllocFn;
use serde::Serialize;

use crate::{
    error::Error,
    probes::{
        allocators::ProbeSite,
        load::BPF_OBJECT,
        uprobe_session::{SessionError, SessionLink, SessionProgram},
    },
};

/// The syscall tracepoints, each attached at its enter and exit.
pub const SYSCALLS: [&str; 6] = ["mmap", "munmap", "mremap", "brk", "mprotect", "madvise"];

/// How a probed function's return is seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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
#[derive(Clone, Debug, Serialize)]
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
) -> Result<Attached, Error> {
    let mut links = Vec::new();
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
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(Error::NoSuchProcess { pid })?);
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
        if !loaded.contains(&name) {
            uprobe(ebpf, name)?;
            loaded.push(name);
        }
        let link = attach_one(ebpf, name, site, site.offset, "probe", scope)?;
        links.push((name, link));
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
    if !dry_run {
        let name = "sched_process_exec";
        let prog = ebpf
            .program_mut(name)
            .ok_or(Error::Missing("the exec tracepoint program"))?;
        let tp: &mut TracePoint = prog.try_into().map_err(attach_err(name.into()))?;
        tp.load().map_err(attach_err(name.into()))?;
        tp.attach("sched", name)
            .map_err(attach_err(format!("tracepoint sched:{name}")))?;
    }
    Ok(Attached {
        probes: infos,
        heap_links: Some(HeapLinks {
            uprobes: links,
            sessions: session_links,
        }),
        session_program: session_prog,
    })
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
    p.attach(offset, &site.host_path, scope)
        .map_err(attach_err(format!(
            "{what} on {} in {}",
            site.name,
            site.object
        )))
}

/// Detaches the heap probes (the syscall tracepoints stay).
pub fn detach_heap(ebpf: &mut Ebpf, links: HeapLinks) {
    // Closing a session's link detaches it.
    drop(links.sessions);
    for (name, link) in links.uprobes {
        if let Some(p) = ebpf.program_mut(name)
            && let Ok(p) = <&mut UProbe>::try_from(p)
            && let Err(e) = p.detach(link)
        {
            log::warn!("failed to detach {name}: {e}");
        }
    }
}
