//! What a trap costs on this machine, measured at startup.
//!
//! Uprobe costs differ by an order of magnitude between machines (bare metal vs a
//! cloud VM) and between instructions (one the kernel emulates vs one it must
//! single-step out of line), so no constant from the development VM is used.
//! leaktrace attaches a probe that does nothing ([`PROGRAM`]) to two functions of its
//! own — one starting with `nop` (emulated), one with `cmp` (single-stepped) — and
//! times calls with and without it, the fastest of a few rounds: the difference is
//! the cost of one trap as the target will pay it (the kernel's part; the programs'
//! own run time is measured separately by the kernel's BPF statistics).

use std::{hint::black_box, num::NonZeroU32, time::Instant};

use aya::{
    Ebpf,
    programs::{UProbe, uprobe::UProbeScope},
};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The BPF program attached for calibration.
pub const PROGRAM: &str = "calibrate";

/// Measured costs, µs per hit.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrapCosts {
    /// An entry probe on an instruction the kernel emulates.
    pub emulated_us: f64,
    /// An entry probe on an instruction the kernel single-steps.
    pub single_stepped_us: f64,
    /// A return probe (the trampoline's trap), on top of its entry probe.
    pub return_us: f64,
    /// Whether these were measured here (else: the development VM's figures).
    pub measured: bool,
}

impl TrapCosts {
    /// The development VM's figures (../shared/docs/performance.md §10), used only when
    /// calibration fails.
    pub const FALLBACK: Self = Self {
        emulated_us: 0.73,
        single_stepped_us: 10.4,
        return_us: 0.68,
        measured: false,
    };
}

// The functions probed: their first instruction decides how the kernel handles the trap.
// SAFETY (both): leaf functions of two instructions that touch no memory and return.
#[unsafe(naked)]
extern "C" fn calibration_emulated(_x: u64) -> u64 {
    core::arch::naked_asm!("nop", "mov rax, rdi", "ret")
}

#[unsafe(naked)]
extern "C" fn calibration_stepped(_x: u64) -> u64 {
    core::arch::naked_asm!("cmp rdi, 0x1000", "mov rax, rdi", "ret")
}

/// Nanoseconds per call of `f`, the fastest of `rounds` rounds of `n` calls (noise
/// from other work only ever adds time).
fn per_call_ns(f: extern "C" fn(u64) -> u64, n: u32, rounds: usize) -> f64 {
    let f = black_box(f);
    let v: Vec<f64> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            let mut acc = 0u64;
            for i in 0..n {
                acc = acc.wrapping_add(f(black_box(u64::from(i))));
            }
            black_box(acc);
            t.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .collect();
    v.into_iter().fold(f64::INFINITY, f64::min)
}

/// File offset of a function of this process's executable.
fn own_offset(f: extern "C" fn(u64) -> u64) -> Option<(std::path::PathBuf, u64)> {
    let addr = f as usize as u64;
    let maps = crate::process::procfs::read_maps(std::process::id()).ok()?;
    let m = maps
        .iter()
        .find(|m| m.start <= addr && addr < m.end && m.is_file())?;
    Some((m.path.clone().into(), addr - m.start + m.offset))
}

/// Measures the trap costs by probing leaktrace's own functions for a moment
/// (about 60 ms). The probes are gone when this returns.
pub fn calibrate(ebpf: &mut Ebpf) -> Result<TrapCosts, Error> {
    let missing = || Error::Missing(PROGRAM);
    let (exe, emulated_at) = own_offset(calibration_emulated).ok_or_else(missing)?;
    let (_, stepped_at) = own_offset(calibration_stepped).ok_or_else(missing)?;
    let me = NonZeroU32::new(std::process::id()).ok_or_else(missing)?;
    let p: &mut UProbe = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(missing)?
        .try_into()
        .map_err(|source| Error::Attach {
            what: PROGRAM.into(),
            source,
        })?;
    crate::session::stop::check()?;
    if p.fd().is_err() {
        p.load().map_err(|source| Error::Attach {
            what: PROGRAM.into(),
            source,
        })?;
    }
    let attach = |p: &mut UProbe, offset: u64| {
        p.attach(offset, &exe, UProbeScope::OneProcess(me))
            .map_err(|source| Error::Attach {
                what: format!("calibration probe at {offset:#x} of {}", exe.display()),
                source,
            })
    };
    const N_FAST: u32 = 10_000;
    const N_SLOW: u32 = 1_000;
    const ROUNDS: usize = 5;
    let bare_emulated = per_call_ns(calibration_emulated, N_FAST, ROUNDS);
    let bare_stepped = per_call_ns(calibration_stepped, N_SLOW, ROUNDS);
    let link = attach(p, emulated_at)?;
    let emulated = per_call_ns(calibration_emulated, N_FAST, ROUNDS);
    p.detach(link).ok();
    crate::session::stop::check()?;
    let link = attach(p, stepped_at)?;
    let stepped = per_call_ns(calibration_stepped, N_SLOW, ROUNDS);
    p.detach(link).ok();
    crate::session::stop::check()?;
    Ok(TrapCosts {
        emulated_us: ((emulated - bare_emulated) / 1e3).max(0.0),
        single_stepped_us: ((stepped - bare_stepped) / 1e3).max(0.0),
        return_us: calibrate_return(ebpf, &exe, emulated_at, me, emulated)?,
        measured: true,
    })
}

/// The return probe's extra cost: the same function with an entry and a return probe.
fn calibrate_return(
    ebpf: &mut Ebpf,
    exe: &std::path::Path,
    offset: u64,
    me: NonZeroU32,
    entry_only_ns: f64,
) -> Result<f64, Error> {
    // aya's UProbe is an entry or a return probe by the section it was loaded from; the
    // trampoline's trap is measured through the return probe program the heap probes use.
    let name = "alloc_exit";
    let p: &mut UProbe = ebpf
        .program_mut(name)
        .ok_or(Error::Missing(name))?
        .try_into()
        .map_err(|source| Error::Attach {
            what: name.into(),
            source,
        })?;
    crate::session::stop::check()?;
    if p.fd().is_err() {
        p.load().map_err(|source| Error::Attach {
            what: name.into(),
            source,
        })?;
    }
    let link = p
        .attach(offset, exe, UProbeScope::OneProcess(me))
        .map_err(|source| Error::Attach {
            what: "calibration return probe".into(),
            source,
        })?;
    let both = per_call_ns(calibration_emulated, 10_000, 5);
    p.detach(link).ok();
    crate::session::stop::check()?;
    // alloc_exit returns at once for a process that is not the target.
    Ok(((both - entry_only_ns) / 1e3).max(0.0))
}
