//! What the probes cost the target, projected from call rates.
//!
//! Every probed call traps into the kernel; the trap, not the BPF program, is
//! most of the cost. Per-hit costs were measured on the development VM
//! (../shared/docs/performance.md §2 and docs/bench.md): an entry probe on an
//! instruction the kernel emulates ≈ 1.3 µs, one it single-steps ≈ 17 µs, a
//! return probe's trampoline ≈ 1.8 µs. Other machines trap faster (published
//! figures are 5–10× lower), so projections here err on the high side.

use leaktrace_common::AllocFn;

use crate::probes::allocators::ProbeSite;

/// Entry probe on an emulated instruction, µs.
pub const EMULATED_ENTRY_US: f64 = 1.3;
/// Entry probe on a single-stepped instruction, µs.
pub const SINGLE_STEPPED_ENTRY_US: f64 = 17.0;
/// Return probe (trampoline trap), µs.
pub const RETURN_US: f64 = 1.8;

/// Projected cost of one traced call of a probe site, µs.
pub fn cost_per_call_us(site: &ProbeSite) -> f64 {
    let entry = if site.placement.emulated {
        EMULATED_ENTRY_US
    } else {
        SINGLE_STEPPED_ENTRY_US
    };
    entry
        + if site.func.return_program().is_some() {
            RETURN_US
        } else {
            0.0
        }
}

/// Projected cost per call of `func`, the most expensive of its sites.
pub fn cost_for(sites: &[ProbeSite], func: AllocFn) -> f64 {
    sites
        .iter()
        .filter(|s| s.func == func)
        .map(cost_per_call_us)
        .fold(0.0, f64::max)
}

/// Projected CPU seconds per second the probes add, from calls per second per function.
pub fn projected_cpu(sites: &[ProbeSite], rates: &[(AllocFn, f64)]) -> f64 {
    rates
        .iter()
        .map(|&(f, r)| r * cost_for(sites, f) / 1e6)
        .sum()
}

/// CPU seconds per second of the entry traps alone (a dry run's counting probes).
pub fn entry_only_cpu(sites: &[ProbeSite], rates: &[(AllocFn, f64)]) -> f64 {
    rates
        .iter()
        .map(|&(f, r)| {
            let entry = sites
                .iter()
                .filter(|s| s.func == f)
                .map(|s| {
                    if s.placement.emulated {
                        EMULATED_ENTRY_US
                    } else {
                        SINGLE_STEPPED_ENTRY_US
                    }
                })
                .fold(0.0, f64::max);
            r * entry / 1e6
        })
        .sum()
}

/// The probes' projected cost as a percentage of the target's own CPU time
/// (what the kernel charged it, less what the probes attached now cost; never
/// taken below a millisecond per second, so an idle target gives a large but finite figure).
pub fn overhead_pct(projected: f64, own_cpu: f64) -> f64 {
    projected / own_cpu.max(1e-3) * 100.0
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
            assert!((cost_for(&sites, f) - want).abs() < 1e-9, "{f:?}");
        }
        let rates = [
            (AllocFn::Malloc, 100_000.0),
            (AllocFn::Free, 100_000.0),
            (AllocFn::PosixMemalign, 1_000.0),
        ];
        let cpu = projected_cpu(&sites, &rates);
        assert!((cpu - 0.4588).abs() < 1e-9, "{cpu}");
        // The target was charged 0.9588 CPU-s/s, of which 0.4588 were the probes.
        assert!((overhead_pct(cpu, 0.9588 - cpu) - 91.76).abs() < 1e-6);
        // A dry run's counting probes cost the entry traps only.
        assert!((entry_only_cpu(&sites, &rates) - (0.13 + 0.13 + 0.017)).abs() < 1e-9);
    }
}
