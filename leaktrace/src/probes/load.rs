//! Loading the BPF object: its load-time configuration, map sizes, the sampler's
//! draws, and the switch that turns the attached programs on.

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData},
};
use leaktrace_common::{CONFIG_CAPTURE_STACKS, CONFIG_GLOBAL, Config as BpfConfig, maps};

use crate::{error::Error, unwind::Capacity};

/// The BPF object, as built by build.rs.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace"));

/// What the programs do, fixed at load time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Modes {
    /// Walk and store stacks.
    pub capture_stacks: bool,
    /// Count calls only (a dry run, or the benchmark's bare probes).
    pub count_only: bool,
    /// Walk with frame pointers only, not the unwind tables.
    pub fp_stacks: bool,
    /// Benchmark only: copy 8 KiB of stack per event instead of walking.
    pub copy_stacks: bool,
    /// Mark frees in flight (needed when a syscall's walk cannot see it runs inside free).
    pub free_mark: bool,
    /// Stop a launched command's main thread after it maps code, so its unwind
    /// tables are loaded before it runs that code.
    pub stop_on_exec_map: bool,
}

/// Sizes and settings the BPF object is loaded with.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// The process the programs follow (its tgid).
    pub pid: u32,
    /// What the programs do.
    pub modes: Modes,
    /// Ring-buffer bytes (a power of two).
    pub ring_bytes: u32,
    /// Stack map entries (native and Python).
    pub stack_capacity: u32,
    /// In-flight call map entries (threads).
    pub inflight_capacity: u32,
    /// Sampled-address map entries.
    pub sampled_capacity: u32,
    /// Mean sampling interval in bytes (0: every call).
    pub sample_rate: u32,
    /// Unwind table arrays.
    pub unwind: Capacity,
}

/// Loads the BPF object.
pub fn load(o: &LoadOptions) -> Result<Ebpf, Error> {
    let m = o.modes;
    let flag = |on: bool, bit: u32| if on { bit } else { 0 };
    let bpf_config = BpfConfig {
        tgid: o.pid,
        flags: flag(m.capture_stacks, CONFIG_CAPTURE_STACKS)
            | flag(m.count_only, leaktrace_common::CONFIG_COUNT_ONLY)
            | flag(m.fp_stacks, leaktrace_common::CONFIG_FP_STACKS)
            | flag(m.copy_stacks, leaktrace_common::CONFIG_COPY_STACKS)
            | flag(m.free_mark, leaktrace_common::CONFIG_FREE_MARK)
            | flag(
                m.stop_on_exec_map,
                leaktrace_common::CONFIG_STOP_ON_EXEC_MAP,
            ),
        // A quarter of the ring: the consumer is woken long before it could fill,
        // and otherwise drains every few milliseconds.
        wakeup_bytes: o.ring_bytes / 4,
        sample_bytes: o.sample_rate,
    };
    let mut loader = EbpfLoader::new();
    loader
        .override_global(CONFIG_GLOBAL, &bpf_config, true)
        .map_max_entries(maps::EVENTS, o.ring_bytes)
        .map_max_entries(maps::STACKS, o.stack_capacity)
        .map_max_entries(maps::ALLOC_INFLIGHT, o.inflight_capacity)
        .map_max_entries(maps::SYSCALL_INFLIGHT, o.inflight_capacity)
        .map_max_entries(maps::SAMPLE_COUNTDOWN, o.inflight_capacity)
        .map_max_entries(maps::FREE_MARK, o.inflight_capacity)
        .map_max_entries(maps::PY_STACKS, o.stack_capacity)
        .map_max_entries(maps::SAMPLED, o.sampled_capacity)
        .map_max_entries(maps::UNWIND_ROWS, o.unwind.rows)
        .map_max_entries(maps::UNWIND_PAGES, o.unwind.pages);
    if m.copy_stacks {
        loader.map_max_entries(maps::STACK_COPIES, 64 << 20);
    }
    // The verifier rejects programs with EACCES, so only EPERM means "not allowed".
    let mut ebpf = loader.load(BPF_OBJECT).map_err(|e| {
        if Error::is_permission(&e) {
            Error::NotPrivileged
        } else {
            Error::Load(e)
        }
    })?;
    if o.sample_rate > 0 {
        fill_exp_draws(&mut ebpf, o.sample_rate)?;
    }
    Ok(ebpf)
}

/// Fills the table of exponential draws (mean `rate` bytes) the BPF sampler picks from.
fn fill_exp_draws(ebpf: &mut Ebpf, rate: u32) -> Result<(), Error> {
    let map = ebpf
        .map_mut(maps::EXP_DRAWS)
        .ok_or(Error::Missing("EXP_DRAWS map"))?;
    let mut draws: Array<&mut MapData, u64> =
        Array::try_from(map).map_err(|source| Error::Map {
            name: maps::EXP_DRAWS,
            source,
        })?;
    // xorshift64*, seeded from the clock: the draws need to be independent, not secret.
    let mut x = monotonic_ns() | 1;
    for i in 0..leaktrace_common::EXP_DRAWS {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let u = ((x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let draw = (-(u.ln()) * f64::from(rate)).round().max(1.0) as u64;
        draws.set(i, draw, 0).map_err(|source| Error::Map {
            name: maps::EXP_DRAWS,
            source,
        })?;
    }
    Ok(())
}

/// Turns the attached programs on (or some off), all at once.
pub fn enable(ebpf: &mut Ebpf, bits: u32) -> Result<(), Error> {
    let map = ebpf
        .map_mut(maps::ENABLED)
        .ok_or(Error::Missing("ENABLED map"))?;
    let mut flag: Array<&mut MapData, u32> = Array::try_from(map).map_err(|source| Error::Map {
        name: maps::ENABLED,
        source,
    })?;
    flag.set(0, bits, 0).map_err(|source| Error::Map {
        name: maps::ENABLED,
        source,
    })
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns` (the events' timestamps).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
