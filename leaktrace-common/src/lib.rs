//! The contract between leaktrace's BPF programs and its userspace engine.
//!
//! Everything that crosses the kernel/user boundary is defined here once: the
//! fixed-size records sent through the ring buffer, the per-thread entry state,
//! the stack map's value type, the load-time configuration, map and program
//! names, capacities and counter ids. Types are `repr(C)` with fixed-width
//! fields and explicit padding; their sizes are checked at compile time.
#![no_std]

use core::mem::size_of;

/// Deepest user stack captured, in frames (perf's default limit).
pub const MAX_STACK_DEPTH: usize = 127;

/// Default number of distinct stacks the kernel can hold.
pub const DEFAULT_STACK_CAPACITY: u32 = 16_384;
/// Default ring-buffer size in bytes (a power of two, multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 16 << 20;
/// Default number of threads that can be inside an allocator call or a syscall at once.
pub const DEFAULT_INFLIGHT_CAPACITY: u32 = 65_536;

/// Map names, shared by the BPF `#[map]` statics and the loader.
pub mod maps {
    /// Ring buffer carrying [`crate::Event`] records.
    pub const EVENTS: &str = "EVENTS";
    /// Hash map: pid (u32) → 1 for each descendant followed besides
    /// [`crate::Config::tgid`] ([`crate::CONFIG_FOLLOW_FORKS`]).
    pub const TARGETS: &str = "TARGETS";
    /// Per-CPU array of u64 loss and activity counters, indexed by [`crate::counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Hash map: stack id (i64) → [`crate::StackTrace`].
    pub const STACKS: &str = "STACKS";
    /// Per-CPU scratch slot for building a [`crate::StackTrace`].
    pub const STACK_SCRATCH: &str = "STACK_SCRATCH";
    /// Hash map: thread id → [`crate::AllocEntry`] for allocator calls in flight.
    pub const ALLOC_INFLIGHT: &str = "ALLOC_INFLIGHT";
    /// Per-CPU `[tid, sp]` of the last allocator return consumed, to recognise the
    /// second return handler of a tail call (both run at the same stack pointer).
    pub const LAST_RETURN: &str = "LAST_RETURN";
    /// Per-CPU array of u64: entry-probe hits per [`crate::AllocFn`] discriminant
    /// (index 0 unused), for call rates and the overhead projection.
    pub const HITS: &str = "HITS";
    /// Entries of [`HITS`], indexed by [`crate::AllocFn`].
    pub const HIT_SLOTS: u32 = 16;
    /// Array of two u32: `ENABLE_*` bits, set once every program is attached (until then
    /// the programs do nothing, so the attach sequence cannot pair half-attached
    /// probes), and the heap probes' window number (sampled mode attaches them for
    /// windows; an allocator entry of an earlier window is not in flight).
    pub const ENABLED: &str = "ENABLED";
    /// LRU hash: thread id → bytes (i64) left until the thread's next sample.
    pub const SAMPLE_COUNTDOWN: &str = "SAMPLE_COUNTDOWN";
    /// Array of [`crate::EXP_DRAWS`] exponential draws (u64, mean = the sampling
    /// interval) filled by userspace: BPF has no floating point.
    pub const EXP_DRAWS: &str = "EXP_DRAWS";
    /// Hash map: address → 1 for sampled live blocks, so frees of unsampled
    /// blocks cost one lookup and send nothing.
    pub const SAMPLED: &str = "SAMPLED";
    /// Hash map: thread id → [`crate::SyscallEntry`] for syscalls in flight.
    pub const SYSCALL_INFLIGHT: &str = "SYSCALL_INFLIGHT";
    /// LRU hash: thread id → [`crate::FreeMark`] of the thread's latest `free` call.
    pub const FREE_MARK: &str = "FREE_MARK";
    /// Array of one [`crate::PyConfig`]: where to find CPython's frames (zero: not Python).
    pub const PY_CONFIG: &str = "PY_CONFIG";
    /// Hash map: Python stack id (i64) → [`crate::PyStack`].
    pub const PY_STACKS: &str = "PY_STACKS";
    /// Per-CPU scratch slot for building a [`crate::PyStack`].
    pub const PY_SCRATCH: &str = "PY_SCRATCH";
    /// LRU hash: thread id → `PyThreadState*` found by a search of the interpreter's
    /// thread list ([`crate::PY_TSTATE_LIST`]), checked against the thread before use.
    pub const PY_TSTATES: &str = "PY_TSTATES";
    /// LPM trie: user address range → [`crate::UnwindObject`] of the executable
    /// mapping holding it (keys are big-endian addresses).
    pub const UNWIND_OBJECTS: &str = "UNWIND_OBJECTS";
    /// One-element array: a generation number userspace bumps after every change to
    /// [`UNWIND_OBJECTS`], so the walk's per-CPU object cache knows to drop its entries.
    pub const UNWIND_GEN: &str = "UNWIND_GEN";
    /// Array of [`crate::UnwindRow`]: every object's compact unwind table, one
    /// contiguous run per object, sorted by address within it.
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    /// Array of u64 (mmapable; u32 values in 8-byte slots): per object and per
    /// [`crate::UNWIND_PAGE_SHIFT`]-sized page of its code, the index of the row in
    /// effect at the page's start.
    pub const UNWIND_PAGES: &str = "UNWIND_PAGES";
    /// Ring buffer of raw stack copies (benchmark of the copy-and-unwind-in-userspace
    /// design; one page unless [`crate::CONFIG_COPY_STACKS`] is set).
    pub const STACK_COPIES: &str = "STACK_COPIES";
}

/// One row of a compact unwind table, derived by userspace from an object's
/// `.eh_frame`: from `pc` (relative to the object's link-time addresses) until the
/// next row, how to find the caller's frame. The return address is always at
/// CFA − 8 (x86-64); only rows whose rules fit this form are kept.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    /// First address the row applies to, relative to the object.
    pub pc: u32,
    /// CFA offset from the register named by `kind` (for [`UNWIND_PLT`], the
    /// threshold of the PLT expression).
    pub cfa_off: i16,
    /// One of the `UNWIND_*` kinds.
    pub kind: u8,
    /// Where the caller's rbp was saved, in 8-byte words from the CFA (−2: CFA−16);
    /// 0: rbp is unchanged in this frame.
    pub rbp: i8,
}
const _: () = assert!(size_of::<UnwindRow>() == 8);

/// [`UnwindRow::kind`]: CFA = rsp + `cfa_off`.
pub const UNWIND_CFA_RSP: u8 = 0;
/// [`UnwindRow::kind`]: CFA = rbp + `cfa_off`.
pub const UNWIND_CFA_RBP: u8 = 1;
/// [`UnwindRow::kind`]: a PLT stub: CFA = rsp + 8, + 8 more when `(pc & 15) >= cfa_off`
/// (the linker-generated DWARF expression, recognised by its bytes).
pub const UNWIND_PLT: u8 = 2;
/// [`UnwindRow::kind`]: the return address is undefined: the outermost frame
/// (`_start`, `clone3`). The walk ends here, complete.
pub const UNWIND_END: u8 = 3;
/// [`UnwindRow::kind`]: the rules here are outside what BPF evaluates (a DWARF
/// expression other than the PLT one, a CFA in another register). The walk ends,
/// truncated.
pub const UNWIND_INVALID: u8 = 4;
/// [`UnwindRow::kind`]: no FDE covers this address: the frame pointer is followed.
pub const UNWIND_GAP: u8 = 5;

/// Pages of the per-object index in [`maps::UNWIND_PAGES`] are `1 << UNWIND_PAGE_SHIFT` bytes.
pub const UNWIND_PAGE_SHIFT: u32 = 10;
/// Rows searched within one page at most: the binary search takes this many halvings.
pub const UNWIND_SEARCH_STEPS: u32 = 16;

/// Where one executable mapping's unwind table lives, the value of
/// [`maps::UNWIND_OBJECTS`]. `rows_count == 0`: the object has no usable table and
/// its frames are walked through frame pointers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindObject {
    /// Runtime address minus object-relative address.
    pub bias: u64,
    /// Object-relative address of the first indexed page (page-aligned).
    pub base: u64,
    /// First row of the object in [`maps::UNWIND_ROWS`].
    pub rows_start: u32,
    /// Number of rows.
    pub rows_count: u32,
    /// First entry of the object in [`maps::UNWIND_PAGES`].
    pub pages_start: u32,
    /// Number of page entries (one more than the pages covered, closing the last).
    pub pages_count: u32,
    /// The mapping's first address, so the walk can reuse the object for the next
    /// frame without another trie lookup.
    pub start: u64,
    /// One past the mapping's last address.
    pub end: u64,
    /// Object-relative address ranges `[lo, hi)` of the allocator functions whose calls
    /// may leave no record in flight (`free`; malloc and calloc under uprobe sessions,
    /// whose unsampled calls have no return probe), `[0, 0)` when unused, for
    /// [`STACK_IN_ALLOCATOR`].
    pub alloc_ranges: [[u32; 2]; ALLOC_RANGES],
}
/// Allocator function ranges per [`UnwindObject`].
pub const ALLOC_RANGES: usize = 3;
const _: () = assert!(size_of::<UnwindObject>() == 72);

/// Key of [`maps::UNWIND_OBJECTS`]: an LPM-trie key over big-endian addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindKey {
    /// Significant leading bits of `addr`.
    pub prefix_len: u32,
    /// The address, big-endian.
    pub addr: [u8; 8],
}

/// Python frames recorded per stack at most.
pub const MAX_PY_FRAMES: usize = 64;

/// How BPF finds the calling thread's CPython frames; filled by userspace from the
/// interpreter's version, symbols and type introspection. All offsets in bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyConfig {
    /// Nonzero once filled in: the target is CPython and frames are walked.
    pub enabled: u32,
    /// How a frame marks the edge of one run of the eval loop: [`PY_EDGE_NONE`],
    /// [`PY_EDGE_IS_ENTRY`] or [`PY_EDGE_SHIM`].
    pub edge_kind: u32,
    /// `offsetof(task_struct, thread.fsbase)`, from kernel BTF.
    pub fsbase_offset: u64,
    /// From fsbase to the pthread TSD slot holding the thread's `PyThreadState*`
    /// (glibc: `0x310 + key * 16 + 8`).
    pub tss_slot_offset: u64,
    /// PyThreadState → top frame (3.9/3.10 `frame`, 3.11/3.12 `cframe`, 3.13 `current_frame`).
    pub tstate_frame: u32,
    /// With a cframe (3.11/3.12): `_PyCFrame.current_frame`; `u32::MAX` otherwise.
    pub cframe_frame: u32,
    /// Frame → code object (`f_code` / `f_executable`).
    pub frame_code: u32,
    /// Frame → calling frame (`f_back` / `previous`).
    pub frame_previous: u32,
    /// Frame → instruction (`f_lasti` int on ≤3.10, `prev_instr`/`instr_ptr` pointer on 3.11+).
    pub frame_instr: u32,
    /// 1 when `frame_instr` is a 4-byte int (≤3.10), 0 for a pointer.
    pub instr_is_int: u32,
    /// Offset of the `is_entry` (3.11) or `owner` (3.12+) byte.
    pub frame_edge: u32,
    /// Bytes of a frame to read (at most 128): past the largest offset used.
    pub frame_read: u32,
    /// `&_Py_NoneStruct` on 3.13+ (a C-entry frame's `f_executable`), else 0.
    pub none_addr: u64,
    /// How the calling thread's `PyThreadState` is found: [`PY_TSTATE_TSS`] or
    /// [`PY_TSTATE_LIST`].
    pub tstate_lookup: u32,
    /// [`PY_TSTATE_LIST`]: `PyThreadState.next`.
    pub tstate_next: u32,
    /// [`PY_TSTATE_LIST`]: `PyThreadState.thread_id` (the thread's `pthread_self()`,
    /// which on glibc x86-64 is its fsbase).
    pub tstate_thread_id: u32,
    /// [`PY_TSTATE_LIST`]: `PyInterpreterState.tstate_head`.
    pub interp_tstate_head: u32,
    /// [`PY_TSTATE_LIST`]: address of the variable holding the first
    /// `PyInterpreterState*` (2.7's `interp_head`).
    pub interp_head: u64,
    /// Code object → `co_name`, whose cached string hash (at offset 24 in 2.7's
    /// `str` and 3.x's `str` alike; names are interned, so it is computed) tags each
    /// frame: see [`PY_FRAME_TAG_SHIFT`]. 0: frames are not tagged.
    pub code_name: u32,
    /// Padding.
    pub _pad: u32,
}
const _: () = assert!(size_of::<PyConfig>() == 96);

/// A frame's [`PyFrame::instr`] carries a 15-bit tag of its code object's name in
/// bits 48..63 (an instruction is a 32-bit offset on ≤3.10 and a user address below
/// 2^47 on 3.11+): a code object freed and another allocated at its address (with
/// another name) makes another stack in BPF, and userspace checks the tag against
/// the code object it reads before trusting its name.
pub const PY_FRAME_TAG_SHIFT: u32 = 48;
/// Mask of the tag once shifted down.
pub const PY_FRAME_TAG_MASK: u64 = 0x7fff;

/// The 15-bit tag of a name's string hash, as BPF and userspace compute it.
#[inline(always)]
pub fn py_name_tag(hash: u64) -> u64 {
    (hash ^ (hash >> 15) ^ (hash >> 30) ^ (hash >> 45) ^ (hash >> 60)) & PY_FRAME_TAG_MASK
}

/// [`PyConfig::tstate_lookup`]: the thread's pthread TSD slot holds its
/// `PyThreadState*` (`fsbase + tss_slot_offset`; CPython 3.7+, `autoTSSkey`).
pub const PY_TSTATE_TSS: u32 = 0;
/// [`PyConfig::tstate_lookup`]: the interpreter's list of thread states is searched
/// for the one whose `thread_id` is the caller's `pthread_self()` (CPython 2.7, whose
/// TLS is its own linked list; found once per thread, then cached).
pub const PY_TSTATE_LIST: u32 = 1;
/// Thread states searched per lookup at most ([`PY_TSTATE_LIST`]).
pub const MAX_PY_THREADS: u32 = 1024;
/// Thread id → `PyThreadState*` found by a [`PY_TSTATE_LIST`] search.
pub const DEFAULT_PY_TSTATE_CAPACITY: u32 = 4096;

/// [`PyConfig::edge_kind`]: every frame is its own run of the eval loop (≤3.10).
pub const PY_EDGE_NONE: u32 = 0;
/// [`PyConfig::edge_kind`]: a nonzero `is_entry` byte marks the first frame of a run (3.11).
pub const PY_EDGE_IS_ENTRY: u32 = 1;
/// [`PyConfig::edge_kind`]: `owner >= 3` marks a frame pushed where C entered the eval
/// loop, which is skipped: `FRAME_OWNED_BY_CSTACK` (3) on 3.12 and 3.13;
/// `FRAME_OWNED_BY_INTERPRETER` (3) and `FRAME_OWNED_BY_CSTACK` (4) on 3.14.
pub const PY_EDGE_SHIM: u32 = 2;
/// Set in [`PyFrame::instr`] on the first (outermost) frame of a run of the eval loop:
/// one native `_PyEval_EvalFrameDefault` frame stands for the Python frames down to it.
pub const PY_FRAME_EDGE: u64 = 1 << 63;

/// One Python frame as recorded in BPF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyFrame {
    /// Address of the code object.
    pub code: u64,
    /// Instruction: `f_lasti` (≤3.10) or the instruction pointer (3.11+), with [`PY_FRAME_EDGE`].
    pub instr: u64,
}

/// A Python stack, innermost frame first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PyStack {
    /// Second hash, to detect id collisions.
    pub check: u64,
    /// Number of valid frames.
    pub len: u32,
    /// `STACK_TRUNCATED` when more frames were left.
    pub flags: u32,
    /// Frames.
    pub frames: [PyFrame; MAX_PY_FRAMES],
}
const _: () = assert!(size_of::<PyStack>() == 16 + 16 * MAX_PY_FRAMES);

/// Where a thread's latest `free` call sits on its stack. `free` has no return
/// probe (it would cost a trap per call), so a syscall is known to come from inside
/// it when the thread's stack pointer is below `sp` and the slot at `sp` still holds
/// `ret`: once `free` has returned, the caller's next call overwrites that slot with
/// another return address. glibc creates arenas (tcache_init), unmaps mmapped
/// chunks and shrinks heaps from inside `free`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreeMark {
    /// Stack pointer at free's probe (the slot of its return address).
    pub sp: u64,
    /// free's return address.
    pub ret: u64,
}

/// Name of the read-only global holding [`Config`].
pub const CONFIG_GLOBAL: &str = "CONFIG";

/// Load-time configuration, placed in read-only data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Thread-group id (process id) being traced; events of other processes are ignored.
    pub tgid: u32,
    /// Bit set of `CONFIG_*` flags.
    pub flags: u32,
    /// Wake the consumer only once this many bytes wait in the ring buffer; it
    /// also drains on a short timer. Waking it on every event cost ~5 µs per
    /// malloc+free pair on the development VM.
    pub wakeup_bytes: u32,
    /// Mean sampling interval in bytes for heap allocations (0: trace every call).
    pub sample_bytes: u32,
    /// Where the kernel keeps the return addresses its return probes replaced, for
    /// [`CONFIG_RETURN_FIXUP`].
    pub returns: ReturnOffsets,
    /// Where the kernel keeps a thread's signal handlers and mask, for
    /// [`CONFIG_STOP_ON_EXEC_MAP`].
    pub signals: SignalOffsets,
}
const _: () = assert!(size_of::<Config>() == 40);

/// Byte offsets and sizes, from the running kernel's BTF, of what tells whether a
/// SIGURG would be noticed by the thread it is sent to: `task_struct.sighand`,
/// `sighand_struct.action` (an array of `struct k_sigaction`, whose first word is the
/// handler) and `task_struct.blocked`. A launched command is held with SIGURG only
/// when its handler is the default (ignore) or SIG_IGN and it is not blocked: should
/// leaktrace die during the hold, the kernel delivers the signal, and it must do
/// nothing the target can see. All zero: unknown, and the command is never held.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SignalOffsets {
    /// `task_struct.sighand`.
    pub sighand: u16,
    /// `sighand_struct.action`.
    pub action: u16,
    /// `sizeof(struct k_sigaction)`.
    pub k_sigaction: u16,
    /// `task_struct.blocked`.
    pub blocked: u16,
}

/// Byte offsets, from the running kernel's BTF, of what a stack walk reads to undo
/// return probes. A return probe (a uretprobe, ours or anyone's on the same file)
/// replaces the return address of every call it catches with the address of a
/// trampoline page, `[uprobes]`, and keeps the original in a per-thread list of
/// `struct return_instance` (newest first) until the call returns. Another tool's
/// probes on the same library hijack the calls of every process that has one of that
/// library's breakpoints (the kernel prepares the return of all consumers before
/// their filters run), so a walk meets trampolines it did not cause.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReturnOffsets {
    /// `task_struct.utask` (a `struct uprobe_task *`).
    pub utask: u16,
    /// `uprobe_task.return_instances` (the newest `struct return_instance *`).
    pub instances: u16,
    /// `return_instance.stack`: the stack pointer at the hijack, the return address's slot.
    pub stack: u16,
    /// `return_instance.orig_ret_vaddr`: the return address replaced.
    pub orig: u16,
    /// `return_instance.next`. (A tail call from a probed function into another
    /// leaves two instances on one slot; the kernel copies the original address into
    /// the newer one, so a walk takes the first and skips the second.)
    pub next: u16,
    /// Padding.
    pub _pad: [u16; 3],
}

/// [`Config::flags`]: count allocator calls per function and do nothing else (dry run).
pub const CONFIG_COUNT_ONLY: u32 = 2;
/// [`Config::flags`]: walk stacks through frame pointers only, ignoring unwind
/// tables (`--unwind fp`: cheaper, wrong on code built without frame pointers).
pub const CONFIG_FP_STACKS: u32 = 4;

/// [`Config::flags`]: benchmark only: instead of walking, copy [`STACK_COPY_BYTES`]
/// of the user stack and the registers into [`maps::STACK_COPIES`], as a userspace
/// unwinder (perf's `--call-graph dwarf`) needs; events carry no stack.
pub const CONFIG_COPY_STACKS: u32 = 8;
/// Bytes of user stack copied per event with [`CONFIG_COPY_STACKS`] (perf's default).
pub const STACK_COPY_BYTES: usize = 8192;

/// [`Config::flags`]: a launched command is ptraced by leaktrace: when its main
/// thread maps a file with PROT_EXEC (the dynamic linker loading a library), stop it
/// with SIGURG on the way back to user mode, so that userspace loads the library's
/// unwind tables before any of its code runs; leaktrace then resumes it, dropping
/// the signal.
pub const CONFIG_STOP_ON_EXEC_MAP: u32 = 16;
/// [`Config::flags`]: the free probe records a [`FreeMark`] for syscalls to check.
/// Set when stacks are not unwound with CFI tables; with them, a syscall's own walk
/// tells whether it runs inside `free` ([`STACK_IN_ALLOCATOR`]), and frees cost nothing extra.
pub const CONFIG_FREE_MARK: u32 = 32;
/// [`Config::flags`]: [`Config::returns`] is filled in: stack walks put back the return
/// addresses return probes replaced.
pub const CONFIG_RETURN_FIXUP: u32 = 64;
/// [`Config::flags`]: trace the processes in [`maps::TARGETS`] besides [`Config::tgid`],
/// and add those they fork.
pub const CONFIG_FOLLOW_FORKS: u32 = 128;
/// Capacity of [`maps::TARGETS`].
pub const MAX_TARGETS: u32 = 4096;

/// Default capacity of [`maps::UNWIND_ROWS`] (8 bytes each).
pub const DEFAULT_UNWIND_ROWS: u32 = 1 << 20;
/// Default capacity of [`maps::UNWIND_PAGES`] (8 bytes each).
pub const DEFAULT_UNWIND_PAGES: u32 = 1 << 18;
/// Default capacity of [`maps::UNWIND_OBJECTS`], in address prefixes.
pub const DEFAULT_UNWIND_PREFIXES: u32 = 1 << 16;

/// [`maps::ENABLED`] bit: the heap probes run.
pub const ENABLE_HEAP: u32 = 1;
/// [`maps::ENABLED`] bit: the syscall tracepoints run.
pub const ENABLE_SYSCALLS: u32 = 2;
/// `ENABLED` bit: the free-like probes run (they stay on between sampled mode's
/// windows, while [`ENABLE_HEAP`] is off).
pub const ENABLE_FREES: u32 = 4;
/// Every program on: the heap probes, the frees and the syscall tracepoints.
pub const ENABLE_ALL: u32 = ENABLE_HEAP | ENABLE_SYSCALLS | ENABLE_FREES;

/// Number of exponential draws in [`maps::EXP_DRAWS`].
pub const EXP_DRAWS: u32 = 4096;
/// Default capacity of [`maps::SAMPLED`].
pub const DEFAULT_SAMPLED_CAPACITY: u32 = 262_144;

/// [`AllocEntry::func`] bit: this call was not sampled (the return only cleans up).
pub const ENTRY_UNSAMPLED: u32 = 1 << 31;

/// [`Config::flags`]: capture user stacks (off: every stack id is [`STACK_NONE`]).
pub const CONFIG_CAPTURE_STACKS: u32 = 1;

/// Stack id meaning "no stack was requested".
pub const STACK_NONE: i64 = -1_000_000;

/// Allocator functions, each with the semantics the probes implement. One variant
/// may stand for several symbols with the same arguments and semantics
/// ([`AllocFn::symbols`]: `operator new` and `new[]`, their nothrow and aligned forms).
///
/// The discriminant travels in [`Event::func`] and [`AllocEntry::func`]; it indexes
/// [`maps::HITS`], so it stays below [`maps::HIT_SLOTS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AllocFn {
    /// `void *malloc(size_t size)`
    Malloc = 1,
    /// `void *calloc(size_t nmemb, size_t size)`
    Calloc = 2,
    /// `void *realloc(void *ptr, size_t size)`
    Realloc = 3,
    /// `void *reallocarray(void *ptr, size_t nmemb, size_t size)`
    Reallocarray = 4,
    /// `int posix_memalign(void **memptr, size_t alignment, size_t size)`
    PosixMemalign = 5,
    /// `void *aligned_alloc(size_t alignment, size_t size)`
    AlignedAlloc = 6,
    /// `void *memalign(size_t alignment, size_t size)`
    Memalign = 7,
    /// `void *valloc(size_t size)`
    Valloc = 8,
    /// `void *pvalloc(size_t size)`
    Pvalloc = 9,
    /// `void free(void *ptr)`
    Free = 10,
    /// C++ `operator new(size_t, …)` and `new[]`, plain, nothrow and aligned: the size
    /// is the first argument; probed where the allocator defines them itself (jemalloc,
    /// tcmalloc and mimalloc inline their fast path there, calling no `malloc`).
    OperatorNew = 11,
    /// C++ `operator delete(void *, …)` and `delete[]`, plain, sized, nothrow and
    /// aligned: the pointer is the first argument.
    OperatorDelete = 12,
    /// jemalloc's `void *mallocx(size_t size, int flags)`.
    Mallocx = 13,
    /// jemalloc's `void *rallocx(void *ptr, size_t size, int flags)`: a realloc that
    /// never frees.
    Rallocx = 14,
    /// Frees that take a size or flags after the pointer: jemalloc's `dallocx(ptr,
    /// flags)` and `sdallocx(ptr, size, flags)`, C23's `free_sized(ptr, size)` and
    /// `free_aligned_sized(ptr, alignment, size)`.
    SizedFree = 15,
}

impl AllocFn {
    /// Every allocator function leaktrace probes, in a stable order.
    pub const ALL: [Self; 15] = [
        Self::Malloc,
        Self::Calloc,
        Self::Realloc,
        Self::Reallocarray,
        Self::PosixMemalign,
        Self::AlignedAlloc,
        Self::Memalign,
        Self::Valloc,
        Self::Pvalloc,
        Self::Free,
        Self::OperatorNew,
        Self::OperatorDelete,
        Self::Mallocx,
        Self::Rallocx,
        Self::SizedFree,
    ];

    /// The name reports use: the C symbol, or the C++ operator.
    pub const fn symbol(self) -> &'static str {
        match self {
            Self::Malloc => "malloc",
            Self::Calloc => "calloc",
            Self::Realloc => "realloc",
            Self::Reallocarray => "reallocarray",
            Self::PosixMemalign => "posix_memalign",
            Self::AlignedAlloc => "aligned_alloc",
            Self::Memalign => "memalign",
            Self::Valloc => "valloc",
            Self::Pvalloc => "pvalloc",
            Self::Free => "free",
            Self::OperatorNew => "operator new",
            Self::OperatorDelete => "operator delete",
            Self::Mallocx => "mallocx",
            Self::Rallocx => "rallocx",
            Self::SizedFree => "sdallocx",
        }
    }

    /// The (mangled) symbols this function is defined under.
    pub const fn symbols(self) -> &'static [&'static str] {
        match self {
            Self::OperatorNew => &[
                "_Znwm",
                "_Znam",
                "_ZnwmRKSt9nothrow_t",
                "_ZnamRKSt9nothrow_t",
                "_ZnwmSt11align_val_t",
                "_ZnamSt11align_val_t",
                "_ZnwmSt11align_val_tRKSt9nothrow_t",
                "_ZnamSt11align_val_tRKSt9nothrow_t",
            ],
            Self::OperatorDelete => &[
                "_ZdlPv",
                "_ZdaPv",
                "_ZdlPvm",
                "_ZdaPvm",
                "_ZdlPvRKSt9nothrow_t",
                "_ZdaPvRKSt9nothrow_t",
                "_ZdlPvSt11align_val_t",
                "_ZdaPvSt11align_val_t",
                "_ZdlPvmSt11align_val_t",
                "_ZdaPvmSt11align_val_t",
                "_ZdlPvSt11align_val_tRKSt9nothrow_t",
                "_ZdaPvSt11align_val_tRKSt9nothrow_t",
            ],
            Self::SizedFree => &["sdallocx", "dallocx", "free_sized", "free_aligned_sized"],
            Self::Malloc => &["malloc"],
            Self::Calloc => &["calloc"],
            Self::Realloc => &["realloc"],
            Self::Reallocarray => &["reallocarray"],
            Self::PosixMemalign => &["posix_memalign"],
            Self::AlignedAlloc => &["aligned_alloc"],
            Self::Memalign => &["memalign"],
            Self::Valloc => &["valloc"],
            Self::Pvalloc => &["pvalloc"],
            Self::Free => &["free"],
            Self::Mallocx => &["mallocx"],
            Self::Rallocx => &["rallocx"],
        }
    }

    /// Whether the function frees its first argument (and has no return probe).
    pub const fn frees(self) -> bool {
        matches!(self, Self::Free | Self::OperatorDelete | Self::SizedFree)
    }

    /// Whether the function moves or resizes a block (its old pointer is the first
    /// argument).
    pub const fn reallocates(self) -> bool {
        matches!(self, Self::Realloc | Self::Reallocarray | Self::Rallocx)
    }

    /// Decodes a discriminant sent by the kernel.
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Malloc,
            2 => Self::Calloc,
            3 => Self::Realloc,
            4 => Self::Reallocarray,
            5 => Self::PosixMemalign,
            6 => Self::AlignedAlloc,
            7 => Self::Memalign,
            8 => Self::Valloc,
            9 => Self::Pvalloc,
            10 => Self::Free,
            11 => Self::OperatorNew,
            12 => Self::OperatorDelete,
            13 => Self::Mallocx,
            14 => Self::Rallocx,
            15 => Self::SizedFree,
            _ => return None,
        })
    }

    /// BPF program name of the entry probe: one for every function, which reads the
    /// function from its attach cookie.
    pub const fn entry_program(self) -> &'static str {
        "heap_enter"
    }

    /// BPF program name of the return probe, if the function needs one.
    pub const fn return_program(self) -> Option<&'static str> {
        if self.frees() {
            None
        } else {
            Some("alloc_exit")
        }
    }
}
const _: () = assert!((AllocFn::SizedFree as u32) < maps::HIT_SLOTS);

/// Event kinds carried in [`Event::kind`]. Ids are stable; retired ids are never reused.
pub mod kind {
    /// A block was returned by an allocator: `addr` the block, `size` the requested
    /// size, `func` the [`crate::AllocFn`]; for realloc/reallocarray `aux` is the old
    /// pointer (0 for none) and `aux2` the entry timestamp (0 for the others). `addr` is 0 when the
    /// call failed.
    pub const ALLOC: u32 = 1;
    /// `free(addr)` with a non-NULL `addr`.
    pub const FREE: u32 = 2;
    /// `mmap` returned `addr` for `size` bytes; `aux` = prot | flags << 32; `aux2` = fd.
    pub const MMAP: u32 = 10;
    /// `munmap(addr, size)` succeeded.
    pub const MUNMAP: u32 = 11;
    /// `mremap(aux, aux2 bytes → size bytes)` succeeded with the result `addr`.
    pub const MREMAP: u32 = 12;
    /// `brk` moved the break: `addr` is the new break, `aux` the requested one.
    pub const BRK: u32 = 13;
    /// `mprotect(addr, size, aux)` succeeded.
    pub const MPROTECT: u32 = 14;
    /// `madvise(addr, size, aux)` with MADV_DONTNEED or MADV_FREE succeeded.
    pub const MADVISE: u32 = 15;
    /// The process exec'd a new program (`sched:sched_process_exec`): every block and
    /// mapping of the old one is gone. A followed descendant that execs is no longer
    /// traced (its program is another one).
    pub const EXEC: u32 = 16;
    /// A traced process forked a new process (`task:task_newtask` without
    /// `CLONE_THREAD`, [`crate::CONFIG_FOLLOW_FORKS`] only): `addr` is the child's pid,
    /// already in [`crate::maps::TARGETS`]; sent before the child runs.
    pub const FORK: u32 = 17;
    /// A followed descendant exited (its thread group leader, `sched:sched_process_exit`),
    /// and left [`crate::maps::TARGETS`]. `aux` is the exit code as `wait` reports it.
    pub const EXIT: u32 = 18;
}

/// One record in the ring buffer. Meaning of the fields per [`kind`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// One of [`kind`].
    pub kind: u32,
    /// Kernel thread id of the caller.
    pub tid: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the call returned.
    pub ts_ns: u64,
    /// Primary address (see [`kind`]).
    pub addr: u64,
    /// Requested size or length.
    pub size: u64,
    /// Kind-specific.
    pub aux: u64,
    /// Kind-specific.
    pub aux2: u64,
    /// Stack id in [`maps::STACKS`]; negative: an errno from capture, or [`STACK_NONE`].
    pub stack_id: i64,
    /// [`AllocFn`] for heap events, the syscall number for address-space events.
    pub func: u32,
    /// Bit set of `EVENT_*` flags.
    pub flags: u32,
    /// Process (thread group) of the caller: the traced process, or with
    /// [`CONFIG_FOLLOW_FORKS`] one of its descendants. Set by `emit`.
    pub tgid: u32,
    /// Padding.
    pub _pad: u32,
}
const _: () = assert!(size_of::<Event>() == 72);

/// [`Event::flags`]: the syscall was made from inside a probed allocator call.
pub const EVENT_IN_ALLOCATOR: u32 = 1;
/// [`Event::flags`] of an [`kind::ALLOC`] by a realloc-like call: the block was resized
/// in place (`addr` is the old pointer) and keeps the stack that allocated it; no stack
/// was walked ([`Event::stack_id`] is [`STACK_NONE`]).
pub const EVENT_IN_PLACE: u32 = 2;

/// [`Event::flags`] of a [`kind::FREE`] that no free call was seen for: the allocator
/// handed the address out again, so the sampled block recorded there is gone (its
/// free came while sampled mode's probes were detached).
pub const EVENT_REUSED: u32 = 4;

/// [`AllocEntry::stack_id`] of a realloc-like call whose stack is walked at its return,
/// and only if it moved its block.
pub const STACK_AT_RETURN: i64 = -1_000_001;

/// Per-thread state saved at an allocator's entry and consumed at its return.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocEntry {
    /// Requested size (nmemb × size for calloc/reallocarray, saturating).
    pub size: u64,
    /// realloc: old pointer; posix_memalign: the `memptr` out-pointer.
    pub aux: u64,
    /// User stack pointer at entry, to pair the return and detect nesting.
    pub sp: u64,
    /// Entry timestamp (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    /// Captured stack id (see [`Event::stack_id`]).
    pub stack_id: i64,
    /// [`AllocFn`] discriminant.
    pub func: u32,
    /// While the call is in flight, the heap probes' window number plus one (see
    /// [`maps::ENABLED`]); 0 once it returned. A thread's entry stays in the map
    /// between calls and is rewritten in place: cheaper than insert and delete.
    pub active: u32,
}
const _: () = assert!(size_of::<AllocEntry>() == 48);

/// Per-thread state saved at a syscall's entry and consumed at its exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallEntry {
    /// The syscall's arguments as the tracepoint gives them.
    pub args: [u64; 5],
    /// Stack id of the calling code (or of the allocator call that issued it).
    pub stack_id: i64,
    /// Syscall number.
    pub nr: u32,
    /// `EVENT_*` flags to send with the event.
    pub flags: u32,
}
const _: () = assert!(size_of::<SyscallEntry>() == 56);

/// A user stack as captured in the kernel, innermost frame first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StackTrace {
    /// A second, independent hash of the frames, to detect id collisions.
    pub check: u64,
    /// Number of valid frames.
    pub len: u32,
    /// Bit set of `STACK_*` flags.
    pub flags: u32,
    /// Return addresses (the first may be the interrupted instruction pointer).
    pub frames: [u64; MAX_STACK_DEPTH],
    /// The Python stack of the same moment in [`maps::PY_STACKS`], or [`STACK_NONE`].
    pub py_stack: i64,
    /// Bytes of stack between the stack pointer at capture and the outermost frame
    /// reached (its CFA): what a copy of the stack would need to hold for a
    /// userspace unwinder to find the same frames.
    pub span: u64,
}
const _: () = assert!(size_of::<StackTrace>() == 32 + 8 * MAX_STACK_DEPTH);

/// [`StackTrace::flags`]: the walk stopped at [`MAX_STACK_DEPTH`] or at a frame it
/// could not follow, before reaching the outermost frame.
pub const STACK_TRUNCATED: u32 = 1;
/// [`StackTrace::flags`]: frames\[0\] is the interrupted instruction pointer inside a
/// syscall wrapper and frames\[1\] a return address guessed from the stack pointer.
pub const STACK_SYSCALL: u32 = 2;
/// [`StackTrace::flags`]: the frames were unwound with the objects' CFI tables, so
/// none is a guess (the second frame of a [`STACK_SYSCALL`] stack included).
pub const STACK_CFI: u32 = 4;
/// [`StackTrace::flags`]: at least one frame was found by following rbp through
/// code without unwind tables.
pub const STACK_FP_FALLBACK: u32 = 8;
/// [`StackTrace::flags`]: a frame inside one of [`UnwindObject::alloc_ranges`] (a
/// return address, or a syscall's own instruction): the CFI walk passed through a
/// `free`, or a malloc/calloc without a return probe, so a syscall with this stack
/// is the allocator's. Set on syscall walks only.
pub const STACK_IN_ALLOCATOR: u32 = 16;

/// Kernel-side counters, indexed into [`maps::COUNTERS`]. Ids are stable data.
pub mod counter {
    /// Declares the counters in order: each gets the next id, and its name in
    /// [`NAMES`] is its identifier in lower case, so ids and names cannot drift apart.
    macro_rules! counters {
        (@next $n:expr;) => {
            /// Number of counters.
            pub const COUNT: u32 = $n;
        };
        (@next $n:expr; $(#[$doc:meta])* $id:ident = $name:literal, $($rest:tt)*) => {
            $(#[$doc])*
            pub const $id: u32 = $n;
            counters!(@next $n + 1; $($rest)*);
        };
        ($($(#[$doc:meta])* $id:ident = $name:literal,)*) => {
            counters!(@next 0; $($(#[$doc])* $id = $name,)*);
            /// Stable name of each counter, as shown in reports and JSON.
            pub const NAMES: [&str; COUNT as usize] = [$($name),*];
        };
    }

    counters! {
        /// Ring-buffer reservations that failed: the event was lost.
        RINGBUF_FULL = "ringbuf_full",
        /// Inserts into the in-flight allocator map that failed: the call was lost.
        ALLOC_INFLIGHT_FULL = "alloc_inflight_full",
        /// Inserts into the in-flight syscall map that failed: the call was lost.
        SYSCALL_INFLIGHT_FULL = "syscall_inflight_full",
        /// Stack-map inserts that failed for lack of room: the event has no stack.
        STACK_MAP_FULL = "stack_map_full",
        /// Two different stacks hashed to one id: the event has no stack.
        STACK_COLLISION = "stack_collision",
        /// The stack could not be read at all: the event has no stack.
        STACK_ERROR = "stack_error",
        /// Allocator returns with no matching entry: calls in flight when the probes were
        /// attached (at attach, and at each window of sampled mode's duty cycle). Not a
        /// loss: the call began before tracing did, like a free of a block from before.
        RETURN_WITHOUT_ENTRY = "return_without_entry",
        /// An entry was replaced before its return was seen (a lost return).
        STALE_ENTRY = "stale_entry",
        /// Allocator calls made from inside another probed allocator call, or tail-called
        /// by one (glibc's `realloc(NULL, n)` jumps to `malloc`): counted once, as the outer call.
        NESTED_CALL = "nested_call",
        /// Syscall exits with no matching entry.
        SYSCALL_WITHOUT_ENTRY = "syscall_without_entry",
        /// Events successfully sent.
        EVENTS_SENT = "events_sent",
        /// Stacks cut short at the depth limit or an unreadable frame.
        STACK_TRUNCATED = "stack_truncated",
        /// Sampled blocks that did not fit in the sampled-address map: their frees will be missed.
        SAMPLED_FULL = "sampled_full",
        /// Heap calls skipped by sampling (no stack walk, no event).
        UNSAMPLED = "unsampled",
        /// Python stacks that did not fit in their map: the event has native frames only.
        PY_STACK_MAP_FULL = "py_stack_map_full",
        /// Python stacks cut at [`crate::MAX_PY_FRAMES`] or at an unreadable frame.
        PY_TRUNCATED = "py_truncated",
        /// Two different Python stacks hashed to one id: the event has native frames only.
        PY_COLLISION = "py_collision",
        /// Stack walks that reached an address outside every object with an unwind
        /// table (code mapped after the tables were loaded, or a corrupt frame): the
        /// stack ends there, truncated.
        UNWIND_UNKNOWN_PC = "unwind_unknown_pc",
        /// Stack walks that reached a frame whose CFI rules BPF does not evaluate.
        UNWIND_UNSUPPORTED = "unwind_unsupported",
        /// Frames found by following rbp through code without unwind tables.
        UNWIND_FP_FRAMES = "unwind_fp_frames",
        /// Stops of a launched command's main thread after it mapped code (see
        /// [`crate::CONFIG_STOP_ON_EXEC_MAP`]).
        EXEC_MAP_STOPS = "exec_map_stops",
        /// Code mappings of a launched command not held for their unwind tables: its
        /// SIGURG handler is set or the signal blocked (a stop signal it could see,
        /// should leaktrace die during the hold). Stacks through that code may be cut
        /// until the tables are loaded, a few milliseconds later.
        EXEC_MAP_NOT_HELD = "exec_map_not_held",
        /// Return addresses a return probe had replaced with its trampoline, put back
        /// by a stack walk from the kernel's list of the thread's pending returns.
        RETURNS_RESTORED = "returns_restored",
        /// Processes forked by a followed process that did not fit in
        /// [`crate::maps::TARGETS`]: not followed.
        FORKS_NOT_FOLLOWED = "forks_not_followed",
    }

    /// Whether a nonzero value of this counter means data was lost.
    pub const fn is_loss(id: u32) -> bool {
        matches!(
            id,
            RINGBUF_FULL
                | ALLOC_INFLIGHT_FULL
                | SYSCALL_INFLIGHT_FULL
                | STACK_MAP_FULL
                | STACK_COLLISION
                | STACK_ERROR
                | FORKS_NOT_FOLLOWED
                | STALE_ENTRY
                | SYSCALL_WITHOUT_ENTRY
                | SAMPLED_FULL
                | PY_STACK_MAP_FULL
                | PY_COLLISION
        )
    }
}

/// x86-64 syscall numbers leaktrace traces.
pub mod nr {
    /// mmap
    pub const MMAP: u32 = 9;
    /// mprotect
    pub const MPROTECT: u32 = 10;
    /// munmap
    pub const MUNMAP: u32 = 11;
    /// brk
    pub const BRK: u32 = 12;
    /// mremap
    pub const MREMAP: u32 = 25;
    /// madvise
    pub const MADVISE: u32 = 28;
}

#[cfg(feature = "user")]
mod user {
    use super::{
        AllocEntry, Config, Event, PyConfig, PyStack, StackTrace, SyscallEntry, UnwindKey,
        UnwindObject, UnwindRow,
    };

    // SAFETY: all of these are repr(C), contain only integers, and have no implicit
    // padding (sizes are asserted above to equal the sum of their fields).
    unsafe impl aya::Pod for Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AllocEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SyscallEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for StackTrace {}
    // SAFETY: plain old data, repr(C), no padding.
    unsafe impl aya::Pod for PyConfig {}
    // SAFETY: plain old data, repr(C), no padding.
    unsafe impl aya::Pod for PyStack {}
    // SAFETY: as above.
    unsafe impl aya::Pod for UnwindRow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for UnwindObject {}
    // SAFETY: as above.
    unsafe impl aya::Pod for UnwindKey {}
}

/// `/proc/PID/stat`, parsed one way for the engine and for xtask's benchmarks.
pub mod stat {
    /// Field `n` of a `/proc/PID/stat` line, numbered from 1 as in proc(5), for
    /// `n >= 3`: the command name (field 2) may hold spaces and parentheses, so the
    /// fields resume after its last `)`.
    pub fn field(stat: &str, n: usize) -> Option<&str> {
        let rest = stat.get(stat.rfind(')')? + 2..)?;
        rest.split_ascii_whitespace().nth(n.checked_sub(3)?)
    }

    /// utime + stime (fields 14 and 15), in clock ticks (`sysconf(_SC_CLK_TCK)` per second).
    pub fn cpu_ticks(stat: &str) -> Option<u64> {
        let utime: u64 = field(stat, 14)?.parse().ok()?;
        let stime: u64 = field(stat, 15)?.parse().ok()?;
        utime.checked_add(stime)
    }
}

#[cfg(test)]
mod contract_tests {
    #[test]
    fn counter_ids_index_their_names() {
        use super::counter::*;
        assert_eq!(COUNT as usize, NAMES.len());
        assert_eq!(NAMES[RINGBUF_FULL as usize], "ringbuf_full");
        assert_eq!(NAMES[UNSAMPLED as usize], "unsampled");
        assert_eq!(NAMES[EXEC_MAP_STOPS as usize], "exec_map_stops");
        assert_eq!(NAMES[RETURNS_RESTORED as usize], "returns_restored");
        assert_eq!(NAMES[FORKS_NOT_FOLLOWED as usize], "forks_not_followed");
        assert_eq!(FORKS_NOT_FOLLOWED, COUNT - 1);
    }

    #[test]
    fn stat_fields_after_a_hostile_command_name() {
        // A command name may contain ") " and digits: fields resume after the last ')'.
        let line = "4242 (evil) 1 2 3) S 1 4242 4242 0 -1 4194560 10 0 0 0 250 75 0 0 20 0 3 0 100";
        assert_eq!(super::stat::field(line, 3), Some("S"));
        assert_eq!(super::stat::field(line, 9), Some("4194560"));
        assert_eq!(super::stat::cpu_ticks(line), Some(325));
        assert_eq!(super::stat::field(line, 2), None);
        assert_eq!(super::stat::field("no parenthesis", 3), None);
    }
}
