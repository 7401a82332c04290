//! What the probes cost the target, from call rates and the trap costs measured on
//! this machine at startup ([`super::calibrate`]).
//!
//! Every probed call traps into the kernel; the trap, not the BPF program, is most
//! of the cost: an entry probe on an instruction the kernel emulates, one it
//! single-steps (about 14× more on the development VM), and a return probe's
//! trampoline. The programs' own run time is measured by the kernel's BPF
//! statistics and added by the meter.

use leaktrace_common::AllocFn;

use crate::probes::{allocators::ProbeSite, calibrate::TrapCosts};

/// Cost of one traced call of a probe site, µs: its entry trap and, where there is
/// one, its return trap.
pub fn cost_per_call_us(site: &ProbeSite, t: &TrapCosts) -> f64 {
    entry_us(site, t)
        + if site.func.return_program().is_some() {
            t.return_us
        } else {
            0.0
        }
}

/// Cost of a site's entry trap, µs.
pub fn entry_us(site: &ProbeSite, t: &TrapCosts) -> f64 {
    if site.placement.emulated {
        t.emulated_us
    } else {
        t.single_stepped_us
    }
}

/// Cost per call of `func`, the most expensive of its sites.
pub fn cost_for(sites: &[ProbeSite], func: AllocFn, t: &TrapCosts) -> f64 {
    sites
        .iter()
        .filter(|s| s.func == func)
        .map(|s| cost_per_call_us(s, t))
        .fold(0.0, f64::max)
}

/// CPU seconds per second the traps add, from calls per second per function.
pub fn projected_cpu(sites: &[ProbeSite], rates: &[(AllocFn, f64)], t: &TrapCosts) -> f64 {
    rates
        .iter()
        .map(|&(f, r)| r * cost_for(sites, f, t) / 1e6)
        .sum()
}

/// CPU seconds per second of the entry traps alone (a dry run's counting probes).
pub fn entry_only_cpu(sites: &[ProbeSite], rates: &[(AllocFn, f64)], t: &TrapCosts) -> f64 {
    rates
        .iter()
        .map(|&(f, r)| {
            let entry = sites
                .iter()
                .filter(|s| s.func == f)
                .map(|s| entry_us(s, t))
                .fold(0.0, f64::max);
            r * entry / 1e6
        })
        .sum()
}

/// The probes' cost as a percentage of the target's own CPU time (what the kernel
/// charged it, `target`, less what the probes attached now cost, `current`). The own
/// time is never taken below a tenth of what the kernel charged (a model that says
/// more than was charged cannot divide by nothing) nor below [`MIN_OWN_CPU`]: a target
/// that sleeps most of the time is not slowed by a few traps, and a percentage of its
/// nearly nothing would read like a disaster.
pub fn overhead_pct(projected: f64, target: f64, current: f64) -> f64 {
    let own = (target - current).max(target * 0.1).max(MIN_OWN_CPU);
    projected / own * 100.0
}

/// CPU seconds per second below which a target's own time is taken as this much
/// (a tenth of a core).
pub const MIN_OWN_CPU: f64 = 0.1;

/// The share of its untraced speed a CPU-bound target keeps under `pct` (from
/// [`overhead_pct`]): its own work plus the probes' in the time its own took.
pub fn throughput_share(pct: f64) -> f64 {
    1.0 / (1.0 + pct / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::placement::Placement;

    fn site(func: AllocFn, emulated: bool) -> ProbeSite {
        ProbeSite {
            func,
            name: func.symbol(),
            object: "libc".into(),
            host_path: "/libc".into(),
            offset: 0,
            entry_offset: 0,
            symbol: (0, 0),
            placement: Placement {
                offset: 0,
                reason: String::new(),
                emulated,
            },
        }
    }

    const T: TrapCosts = TrapCosts {
        emulated_us: 1.3,
        single_stepped_us: 17.0,
        return_us: 1.8,
        measured: true,
    };

    /// Projection: rates × per-call costs; overhead relative to the target's own time.
    #[test]
    fn projects_cost() {
        let sites = [
            site(AllocFn::Malloc, true),
            site(AllocFn::Free, true),
            site(AllocFn::PosixMemalign, false),
        ];
        // (function, cost per call in µs): entry + return where there is one.
        for (f, want) in [
            (AllocFn::Malloc, 3.1),
            (AllocFn::Free, 1.3),
            (AllocFn::PosixMemalign, 18.8),
            (AllocFn::Calloc, 0.0),
        ] {
            assert!((cost_for(&sites, f, &T) - want).abs() < 1e-9, "{f:?}");
        }
        let rates = [
            (AllocFn::Malloc, 100_000.0),
            (AllocFn::Free, 100_000.0),
            (AllocFn::PosixMemalign, 1_000.0),
        ];
        let cpu = projected_cpu(&sites, &rates, &T);
        assert!((cpu - 0.4588).abs() < 1e-9, "{cpu}");
        // The target was charged 0.9588 CPU-s/s, of which 0.4588 were the probes.
        assert!((overhead_pct(cpu, 0.9588, cpu) - 91.76).abs() < 1e-6);
        assert!((throughput_share(91.76) - 0.5215).abs() < 1e-4);
        // A model that says more than the kernel charged is capped, not divided by zero:
        // the own time is taken as a tenth of a core at least.
        assert!((overhead_pct(cpu, 0.3, cpu) - 458.8).abs() < 0.01);
        // A nearly idle target: a few traps against a tenth of a core.
        assert!((overhead_pct(0.0005, 0.002, 0.0005) - 0.5).abs() < 1e-9);
        // A dry run's counting probes cost the entry traps only.
        assert!((entry_only_cpu(&sites, &rates, &T) - (0.13 + 0.13 + 0.017)).abs() < 1e-9);
    }
}
