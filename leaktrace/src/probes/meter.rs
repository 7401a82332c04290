//! Measuring what the probes cost: allocator call rates from the kernel's hit
//! counters, the target's CPU time, and (when on) the kernel's statistics of our
//! programs' own run time, turned into the [`Overhead`] the report and the budget read.

use std::time::Instant;

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use leaktrace_common::{AllocFn, maps::HIT_SLOTS};
use serde::{Deserialize, Serialize};

use crate::{
    probes::{allocators::ProbeSite, attach::Attached, calibrate::TrapCosts, cost},
    process::procfs,
};

/// Allocator call rates and what the probes cost, projected from them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Overhead {
    /// Seconds measured.
    pub window_s: f64,
    /// Calls per second per function (entry-probe hits).
    pub calls_per_s: std::collections::BTreeMap<String, f64>,
    /// Cost per traced call, µs (entry trap, plus the return trap where there is one),
    /// from the trap costs measured at startup (`traps`).
    pub cost_per_call_us: std::collections::BTreeMap<String, f64>,
    /// What one trap costs on this machine, measured at startup.
    pub traps: Option<TrapCosts>,
    /// Projected CPU seconds per second added by tracing every call: the traps from
    /// the per-trap model, plus `bpf_cpu_per_s` when measured.
    pub projected_cpu_per_s: f64,
    /// CPU seconds per second spent in leaktrace's BPF programs, measured by the
    /// kernel's BPF statistics (on with `--max-overhead`); null when not measured.
    pub bpf_cpu_per_s: Option<f64>,
    /// `bpf_cpu_per_s` per allocator call, µs (stack walks included).
    pub bpf_us_per_call: Option<f64>,
    /// Per BPF program, over the whole run while statistics were on: runs and mean
    /// nanoseconds per run (empty when not measured).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub bpf_programs: std::collections::BTreeMap<String, ProgramCost>,
    /// CPU seconds per second the kernel charged the target (traps included).
    pub target_cpu_per_s: f64,
    /// The projected cost as a percentage of the target's own CPU time.
    pub projected_pct: f64,
}

/// What one BPF program cost, measured by the kernel's BPF statistics.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProgramCost {
    /// Runs while the statistics were on.
    pub runs: u64,
    /// Mean run time, ns.
    pub ns_per_run: f64,
}

/// The overhead budget detached the heap probes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeapDetached {
    /// Seconds after attach.
    pub after_s: f64,
    /// Why.
    pub reason: String,
}

/// Measures allocator call rates (from the kernel's hit counters) and the target's CPU time.
pub struct Meter {
    pid: u32,
    dry_run: bool,
    /// Functions probed by uprobe sessions (their unsampled calls skip the return trap).
    session_funcs: Vec<AllocFn>,
    start: Reading,
    last: Reading,
    /// Time spent in our BPF programs (kernel BPF statistics) at `start` and `last`,
    /// when the statistics are on.
    bpf_ns: (Option<u64>, Option<u64>),
    /// What a trap costs here.
    traps: TrapCosts,
}

/// (name, total run time ns, runs) of each of our programs, those loaded outside aya
/// (the session program, the `uprobe_multi` ones) included, from the kernel's BPF
/// statistics (zero while they are off).
pub fn program_times<'a>(
    ebpf: &'a Ebpf,
    attached: &'a Attached,
) -> impl Iterator<Item = (&'a str, u64, u64)> + 'a {
    ebpf.programs()
        .filter_map(|(name, p)| {
            let i = p.info().ok()?;
            Some((name, i.run_time().as_nanos() as u64, i.run_count()))
        })
        .chain(attached.session_program.iter().filter_map(|p| {
            let (ns, runs) = p.run_stats().ok()?;
            Some(("alloc_session", ns, runs))
        }))
        .chain(attached.multi.iter().map(|m| {
            let (ns, runs) = m.run_stats();
            ("heap_multi", ns, runs)
        }))
}

/// Each program that ran: runs and mean run time.
pub fn program_costs(
    ebpf: &Ebpf,
    attached: &Attached,
) -> std::collections::BTreeMap<String, ProgramCost> {
    program_times(ebpf, attached)
        .filter(|&(_, _, runs)| runs > 0)
        .map(|(name, ns, runs)| {
            (
                name.to_owned(),
                ProgramCost {
                    runs,
                    ns_per_run: ns as f64 / runs as f64,
                },
            )
        })
        .collect()
}

/// Nanoseconds the kernel has spent in our programs since they were loaded; `None`
/// unless BPF run-time statistics are on (`BPF_ENABLE_STATS`).
pub fn bpf_run_ns(ebpf: &Ebpf, attached: &Attached, stats_on: bool) -> Option<u64> {
    stats_on.then(|| program_times(ebpf, attached).map(|(_, ns, _)| ns).sum())
}

/// The counters at one moment.
#[derive(Clone, Debug)]
struct Reading {
    at: Instant,
    /// Entry-probe hits per function, indexed by [`AllocFn`].
    hits: [u64; HIT_SLOTS as usize],
    /// Calls the sampler skipped (every function).
    unsampled: u64,
    /// The target's CPU time, seconds.
    cpu_s: Option<f64>,
}

impl Reading {
    fn hits(&self, f: AllocFn) -> u64 {
        self.hits[f as usize]
    }
}

impl Meter {
    /// A meter for `pid`, starting now.
    pub fn new(pid: u32, dry_run: bool, session_funcs: Vec<AllocFn>, traps: TrapCosts) -> Self {
        let now = Reading {
            at: Instant::now(),
            hits: [0; HIT_SLOTS as usize],
            unsampled: 0,
            cpu_s: procfs::cpu_seconds(pid),
        };
        Self {
            pid,
            dry_run,
            session_funcs,
            start: now.clone(),
            last: now,
            bpf_ns: (None, None),
            traps,
        }
    }

    fn read(
        &self,
        hits: &PerCpuArray<MapData, u64>,
        counters: &PerCpuArray<MapData, u64>,
    ) -> Reading {
        let sum = |m: &PerCpuArray<MapData, u64>, i: u32| {
            m.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0)
        };
        let mut r = Reading {
            at: Instant::now(),
            hits: [0; HIT_SLOTS as usize],
            unsampled: sum(counters, leaktrace_common::counter::UNSAMPLED),
            cpu_s: procfs::cpu_seconds(self.pid),
        };
        for f in AllocFn::ALL {
            r.hits[f as usize] = sum(hits, f as u32);
        }
        r
    }

    fn between(
        from: &Reading,
        to: &Reading,
        bpf_ns: (Option<u64>, Option<u64>),
        sites: &[ProbeSite],
        dry_run: bool,
        session_funcs: &[AllocFn],
        traps: &TrapCosts,
    ) -> Option<Overhead> {
        let secs = to.at.duration_since(from.at).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let rates: Vec<(AllocFn, f64)> = AllocFn::ALL
            .iter()
            .map(|&f| (f, to.hits(f).saturating_sub(from.hits(f)) as f64 / secs))
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
        let unsampled = to.unsampled.saturating_sub(from.unsampled) as f64 / secs;
        let skipped_share = if session_rate > 0.0 {
            (unsampled / session_rate).min(1.0)
        } else {
            0.0
        };
        let saved_cpu = session_rate * skipped_share * traps.return_us / 1e6;
        let projected =
            cost::projected_cpu(sites, &rates, traps) - saved_cpu + bpf_cpu.unwrap_or(0.0);
        let target = match (from.cpu_s, to.cpu_s) {
            (Some(a), Some(b)) => (b - a) / secs,
            _ => 0.0,
        };
        // What the probes attached now cost the target (in a dry run, only the entry traps).
        let current = if dry_run {
            cost::entry_only_cpu(sites, &rates, traps)
        } else {
            projected
        };
        Some(Overhead {
            window_s: secs,
            calls_per_s: rates
                .iter()
                .map(|(f, r)| (f.symbol().to_owned(), *r))
                .collect(),
            cost_per_call_us: rates
                .iter()
                .map(|(f, _)| {
                    let skipped = if session_funcs.contains(f) {
                        skipped_share * traps.return_us
                    } else {
                        0.0
                    };
                    (
                        f.symbol().to_owned(),
                        cost::cost_for(sites, *f, traps) - skipped,
                    )
                })
                .collect(),
            projected_cpu_per_s: projected,
            bpf_cpu_per_s: bpf_cpu,
            bpf_us_per_call: bpf_cpu.filter(|_| calls > 0.0).map(|c| c * 1e6 / calls),
            bpf_programs: Default::default(),
            traps: Some(*traps),
            target_cpu_per_s: target,
            projected_pct: cost::overhead_pct(projected, target, current),
        })
    }

    /// The last window (since the previous call).
    pub fn window(
        &mut self,
        hits: &PerCpuArray<MapData, u64>,
        counters: &PerCpuArray<MapData, u64>,
        bpf_ns: Option<u64>,
        sites: &[ProbeSite],
    ) -> Option<Overhead> {
        let now = self.read(hits, counters);
        let w = Self::between(
            &self.last,
            &now,
            (self.bpf_ns.1, bpf_ns),
            sites,
            self.dry_run,
            &self.session_funcs,
            &self.traps,
        );
        self.last = now;
        self.bpf_ns.1 = bpf_ns;
        w
    }

    /// Sets the BPF run time at the start (statistics just turned on).
    pub fn start_bpf(&mut self, bpf_ns: Option<u64>) {
        self.bpf_ns = (bpf_ns, bpf_ns);
    }

    /// The whole run.
    pub fn whole_run(
        &self,
        hits: &PerCpuArray<MapData, u64>,
        counters: &PerCpuArray<MapData, u64>,
        bpf_ns: Option<u64>,
        sites: &[ProbeSite],
    ) -> Option<Overhead> {
        Self::between(
            &self.start,
            &self.read(hits, counters),
            (self.bpf_ns.0, bpf_ns),
            sites,
            self.dry_run,
            &self.session_funcs,
            &self.traps,
        )
    }
}
