//! Loading the BPF object: its load-time configuration, map sizes, the sampler's
//! draws, and the switch that turns the attached programs on.

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData},
};
use leaktrace_common::{
    CONFIG_CAPTURE_STACKS, CONFIG_GLOBAL, Config as BpfConfig, ReturnOffsets, SignalOffsets, maps,
};

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
    /// Follow the target's descendants ([`leaktrace_common::CONFIG_FOLLOW_FORKS`]).
    pub follow_forks: bool,
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

/// Loads the BPF object, on a kernel that has what its programs use.
pub fn load(o: &LoadOptions) -> Result<Ebpf, Error> {
    check_kernel()?;
    let m = o.modes;
    let flag = |on: bool, bit: u32| if on { bit } else { 0 };
    let mut bpf_config = BpfConfig {
        tgid: o.pid,
        flags: flag(m.capture_stacks, CONFIG_CAPTURE_STACKS)
            | flag(m.count_only, leaktrace_common::CONFIG_COUNT_ONLY)
            | flag(m.fp_stacks, leaktrace_common::CONFIG_FP_STACKS)
            | flag(m.copy_stacks, leaktrace_common::CONFIG_COPY_STACKS)
            | flag(m.free_mark, leaktrace_common::CONFIG_FREE_MARK)
            | flag(
                m.stop_on_exec_map,
                leaktrace_common::CONFIG_STOP_ON_EXEC_MAP,
            )
            | flag(m.follow_forks, leaktrace_common::CONFIG_FOLLOW_FORKS),
        // A quarter of the ring: the consumer is woken long before it could fill,
        // and otherwise drains every few milliseconds.
        wakeup_bytes: o.ring_bytes / 4,
        sample_bytes: o.sample_rate,
        returns: ReturnOffsets::default(),
        signals: if m.stop_on_exec_map {
            signal_offsets()
        } else {
            SignalOffsets::default()
        },
    };
    if let Some(r) = return_offsets() {
        bpf_config.returns = r;
        bpf_config.flags |= leaktrace_common::CONFIG_RETURN_FIXUP;
    }
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

/// Offset of `root.member` in the kernel's BTF, when it fits the u16 BPF is given.
fn small_offset(btf: &super::btf::Btf, root: &str, member: &str) -> Option<u16> {
    btf.member_offset(root, &[member])
        .and_then(|o| u16::try_from(o).ok())
}

/// Where the running kernel keeps the return addresses its return probes replaced
/// (see [`ReturnOffsets`]), from its BTF; `None` when any member is missing, and stack
/// walks then end at a hijacked return.
pub fn return_offsets() -> Option<ReturnOffsets> {
    let btf = super::btf::Btf::kernel()?;
    let small = |root: &str, member: &str| small_offset(btf, root, member);
    Some(ReturnOffsets {
        utask: small("task_struct", "utask")?,
        instances: small("uprobe_task", "return_instances")?,
        stack: small("return_instance", "stack")?,
        orig: small("return_instance", "orig_ret_vaddr")?,
        next: small("return_instance", "next")?,
        _pad: [0; 3],
    })
}

/// Where the running kernel keeps a thread's signal handlers and mask (see
/// [`SignalOffsets`]), from its BTF; all zero when any is missing (a launched command
/// is then never held with a signal).
pub fn signal_offsets() -> SignalOffsets {
    let find = || {
        let btf = super::btf::Btf::kernel()?;
        let small = |root: &str, member: &str| small_offset(btf, root, member);
        Some(SignalOffsets {
            sighand: small("task_struct", "sighand")?,
            action: small("sighand_struct", "action")?,
            k_sigaction: btf
                .struct_size("k_sigaction")
                .and_then(|s| u16::try_from(s).ok())?,
            blocked: small("task_struct", "blocked")?,
        })
    };
    find().unwrap_or_default()
}

/// Refuses, before anything is loaded, a kernel without `bpf_loop` (Linux 5.17), which
/// the stack walks (CFI unwinding, the CPython frame walk) are built on. Older kernels
/// otherwise fail later with a verifier message that names no feature (5.10: "number of
/// funcs in func_info doesn't match number of subprogs", as it does not know the
/// callback's instruction either). Without the privilege to load programs at all, this
/// says nothing and [`load`] reports that.
pub fn check_kernel() -> Result<(), Error> {
    match probe_bpf_loop() {
        Err(e) if e.raw_os_error() != Some(libc::EPERM) => Err(Error::KernelLacks {
            release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown release".into(), |r| r.trim().to_owned()),
            feature: "bpf_loop (Linux 5.17+)",
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Loads (and drops) a kprobe-type program that calls `bpf_loop` once with an empty
/// callback. The kernel takes a callback only from a program with BTF function info
/// that marks it static, so a three-type BTF goes with it.
fn probe_bpf_loop() -> std::io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

    use aya_obj::generated::{bpf_attr, bpf_cmd};

    /// One instruction: opcode, destination and source registers, offset, immediate.
    const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        let off = off as u16 as u64;
        let imm = imm as u32 as u64;
        code as u64 | ((dst as u64 | (src as u64) << 4) << 8) | off << 16 | imm << 32
    }
    const MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_DW | BPF_IMM
    const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    const PSEUDO_FUNC: u8 = 4; // BPF_PSEUDO_FUNC: the immediate is a subprogram's offset
    const FUNC_LOOP: i32 = 181; // BPF_FUNC_loop
    const PROG_TYPE_KPROBE: u32 = 2;
    const CALLBACK: u32 = 8;
    let insns: [u64; 10] = [
        insn(MOV64_IMM, 1, 0, 0, 1), // r1 = 1 iteration
        // r2 = the callback (its offset counts from the instruction after this one).
        insn(LD_IMM64, 2, PSEUDO_FUNC, 0, CALLBACK as i32 - 2),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_IMM, 3, 0, 0, 0), // r3 = no context
        insn(MOV64_IMM, 4, 0, 0, 0), // r4 = no flags
        insn(CALL, 0, 0, 0, FUNC_LOOP),
        insn(MOV64_IMM, 0, 0, 0, 0),
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV64_IMM, 0, 0, 0, 0), // the callback: return 0 (go on)
        insn(EXIT, 0, 0, 0, 0),
    ];
    // BTF (include/uapi/linux/btf.h): 1 = FUNC_PROTO returning void, 2 = FUNC "probe"
    // (global), 3 = FUNC "cb" (static); one func_info record per function.
    let strings = b"\0probe\0cb\0";
    // (name offset, kind << 24 | vlen or linkage, return type or proto)
    let types: [[u32; 3]; 3] = [
        [0, 13 << 24, 0],     // FUNC_PROTO, no parameters, void
        [1, 12 << 24 | 1, 1], // FUNC probe, global, proto 1
        [7, 12 << 24, 1],     // FUNC cb, static, proto 1
    ];
    let type_len = (types.len() * 12) as u32;
    let mut btf = Vec::with_capacity(24 + type_len as usize + strings.len());
    btf.extend_from_slice(&0xeb9f_u16.to_le_bytes());
    btf.extend_from_slice(&[1, 0]); // version, flags
    for field in [24, 0, type_len, type_len, strings.len() as u32] {
        btf.extend_from_slice(&field.to_le_bytes()); // hdr_len, type_off, type_len, str_off, str_len
    }
    for t in types.as_flattened() {
        btf.extend_from_slice(&t.to_le_bytes());
    }
    btf.extend_from_slice(strings);
    let func_info: [u32; 4] = [0, 2, CALLBACK, 3]; // (instruction, FUNC type id)

    let sys_bpf = |cmd: bpf_cmd, attr: &mut bpf_attr| {
        // SAFETY: `attr` is a zeroed bpf_attr filled for `cmd`, whose pointers refer to
        // buffers that outlive the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd as libc::c_long,
                std::ptr::from_mut(attr),
                size_of::<bpf_attr>(),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: these commands return a new descriptor we now own (dropping it unloads).
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    // SAFETY: plain old data; zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the BPF_BTF_LOAD member of the union.
    unsafe {
        let u = &mut attr.__bindgen_anon_7;
        u.btf = btf.as_ptr() as u64;
        u.btf_size = btf.len() as u32;
    }
    let btf_fd = sys_bpf(bpf_cmd::BPF_BTF_LOAD, &mut attr)?;
    let license = c"GPL";
    // SAFETY: plain old data; zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the BPF_PROG_LOAD member of the union.
    unsafe {
        let u = &mut attr.__bindgen_anon_3;
        u.prog_type = PROG_TYPE_KPROBE;
        u.insns = insns.as_ptr() as u64;
        u.insn_cnt = insns.len() as u32;
        u.license = license.as_ptr() as u64;
        u.prog_btf_fd = btf_fd.as_raw_fd() as u32;
        u.func_info = func_info.as_ptr() as u64;
        u.func_info_cnt = 2;
        u.func_info_rec_size = 8;
    }
    sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr).map(drop)
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

/// Starts window `n` of the heap probes: allocator entries of earlier windows are no
/// longer in flight.
pub fn set_window(ebpf: &mut Ebpf, n: u32) -> Result<(), Error> {
    let map = ebpf
        .map_mut(maps::ENABLED)
        .ok_or(Error::Missing("ENABLED map"))?;
    let mut a: Array<&mut MapData, u32> = Array::try_from(map).map_err(|source| Error::Map {
        name: maps::ENABLED,
        source,
    })?;
    a.set(1, n, 0).map_err(|source| Error::Map {
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
