//! Where to put an entry uprobe so the kernel emulates, rather than
//! single-steps, the probed instruction.
//!
//! A uprobe on an instruction the kernel can emulate (push, nop, relative
//! branches) costs about 1.3 µs here; one it must single-step out of line costs
//! 15–19 µs (../shared/docs/performance.md §2). glibc's `free` starts with
//! `test %rdi,%rdi`, a single-stepped instruction, and reaches `push %rbp` at +9
//! on every non-NULL call. This module decodes a prologue and moves the probe to
//! the first emulated instruction only when it can prove that every path that
//! matters passes it with the argument still in its register:
//!
//! * the instructions before it are straight-line code that does not write the
//!   argument register (an `endbr64`, a copy of the argument elsewhere, a test);
//! * the only branches allowed are `je`/`jz` right after the argument was tested
//!   against zero — they leave only for a NULL argument, which changes nothing
//!   for `free`.
//!
//! Anything else (a `jne`, a call, a write to the argument, no emulated
//! instruction within reach) keeps the probe at the entry. Only `free` is moved:
//! its probe reads the argument and, when frees are marked for the syscall walk
//! (`CONFIG_FREE_MARK`), the return address at `[sp]` — still in place, since the
//! probe stops at the first emulated instruction, before any `push` has run. The
//! other allocators' entry probes stay at the entry, where their stack walk and
//! their return probe start.

use iced_x86::{
    ConditionCode, Decoder, DecoderOptions, Formatter as _, GasFormatter, Instruction,
    InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
};

/// Prologue instructions examined at most.
const MAX_INSNS: usize = 8;

/// Where to place a probe, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Offset from the function's first byte.
    pub offset: u64,
    /// Why, for reports and logs.
    pub reason: String,
    /// Whether the kernel emulates the instruction at `offset` (else it single-steps it).
    pub emulated: bool,
}

/// Whether the first instruction of `code` is one the kernel emulates.
pub fn first_is_emulated(code: &[u8]) -> bool {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    decoder.can_decode() && {
        let i = decoder.decode();
        !i.is_invalid() && emulated(&i)
    }
}

/// The probe stays at the entry (for probes that read more than the argument).
pub fn at_entry(code: &[u8], why: &str) -> Placement {
    Placement {
        offset: 0,
        reason: format!("entry: {why}"),
        emulated: first_is_emulated(code),
    }
}

/// Whether the kernel emulates this instruction when a uprobe sits on it
/// (x86 `arch_uprobe_analyze_insn`: push of a register, nops, relative branches).
fn emulated(i: &Instruction) -> bool {
    match i.mnemonic() {
        Mnemonic::Push => i.op0_kind() == OpKind::Register && i.op0_register().size() == 8,
        Mnemonic::Nop => true,
        Mnemonic::Jmp | Mnemonic::Call => matches!(i.op0_kind(), OpKind::NearBranch64),
        _ => i.is_jcc_short_or_near(),
    }
}

fn text(i: &Instruction) -> String {
    let mut s = String::new();
    GasFormatter::new().format(i, &mut s);
    s
}

/// Whether `i` tests `arg` against zero (`test %arg,%arg` or `cmp $0,%arg`).
fn tests_zero(i: &Instruction, arg: Register) -> bool {
    let is = |r: Register| r.full_register() == arg.full_register() && r.size() == 8;
    match i.mnemonic() {
        Mnemonic::Test => {
            i.op0_kind() == OpKind::Register
                && i.op1_kind() == OpKind::Register
                && is(i.op0_register())
                && is(i.op1_register())
        }
        Mnemonic::Cmp => {
            i.op0_kind() == OpKind::Register
                && is(i.op0_register())
                && matches!(
                    i.op1_kind(),
                    OpKind::Immediate8to64 | OpKind::Immediate32to64
                )
                && i.immediate(1) == 0
        }
        _ => false,
    }
}

/// Chooses the probe offset in `code` (the function's first bytes) for a probe
/// that only reads the argument in register `arg`.
pub fn place(code: &[u8], arg: Register) -> Placement {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut null_tested = false;
    let mut prefix: Vec<String> = Vec::new();
    // The NULL-exit branch itself: emulated and reached by every path with the
    // argument intact, so it is the fallback when nothing after it qualifies.
    let mut exit_branch: Option<(u64, String)> = None;
    let give_up = |why: String, exit_branch: &Option<(u64, String)>| match exit_branch {
        Some((off, insn)) => Placement {
            offset: *off,
            reason: format!("branch: `{insn}` at +{off}, the NULL check's exit ({why})"),
            emulated: true,
        },
        None => Placement {
            offset: 0,
            reason: format!("refused: {why}"),
            emulated: first_is_emulated(code),
        },
    };
    for n in 0..MAX_INSNS {
        if !decoder.can_decode() {
            break;
        }
        let i = decoder.decode();
        if i.is_invalid() {
            return give_up(format!("undecodable byte at +{}", i.ip()), &exit_branch);
        }
        if n == 0 && emulated(&i) {
            return Placement {
                offset: 0,
                reason: format!("already-emulated: `{}` at the entry", text(&i)),
                emulated: true,
            };
        }
        if i.is_jcc_short_or_near() {
            if null_tested && i.condition_code() == ConditionCode::e {
                // Leaves only when the argument is NULL.
                exit_branch = Some((i.ip(), text(&i)));
                prefix.push(text(&i));
                null_tested = false;
                continue;
            }
            return give_up(
                format!(
                    "`{}` at +{} may take a path that matters elsewhere",
                    text(&i),
                    i.ip()
                ),
                &exit_branch,
            );
        }
        if emulated(&i) {
            let how = if exit_branch.is_some() {
                "null-check"
            } else {
                "straight"
            };
            return Placement {
                offset: i.ip(),
                reason: format!(
                    "{how}: `{}` at +{} follows only {}",
                    text(&i),
                    i.ip(),
                    prefix.join("; ")
                ),
                emulated: true,
            };
        }
        if i.flow_control() != iced_x86::FlowControl::Next {
            return give_up(
                format!("`{}` at +{} leaves the straight path", text(&i), i.ip()),
                &exit_branch,
            );
        }
        let writes_arg = info.info(&i).used_registers().iter().any(|u| {
            u.register().full_register() == arg.full_register()
                && matches!(
                    u.access(),
                    OpAccess::Write
                        | OpAccess::ReadWrite
                        | OpAccess::CondWrite
                        | OpAccess::ReadCondWrite
                )
        });
        if writes_arg {
            return give_up(
                format!("`{}` at +{} writes the argument register", text(&i), i.ip()),
                &exit_branch,
            );
        }
        null_tested = tests_zero(&i, arg);
        prefix.push(text(&i));
    }
    give_up(
        format!("no emulated instruction in the first {MAX_INSNS} instructions"),
        &exit_branch,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every prologue in testdata/prologues.txt (real ones from Debian packages of glibc,
    /// musl, jemalloc, tcmalloc and mimalloc, and synthetic ones) gets its expected offset.
    #[test]
    fn places_probes_on_known_prologues() {
        let data = include_str!("../testdata/prologues.txt");
        let mut n = 0;
        for line in data
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        {
            let cols: Vec<&str> = line.split('|').map(str::trim).collect();
            let [name, reg, offset, keyword, hex] = cols[..] else {
                panic!("bad line {line:?}")
            };
            assert_eq!(reg, "rdi", "only rdi cases so far");
            let bytes: Vec<u8> = hex
                .split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).expect("hex"))
                .collect();
            let p = place(&bytes, Register::RDI);
            assert_eq!(
                p.offset,
                offset.parse::<u64>().unwrap(),
                "{name}: {}",
                p.reason
            );
            assert!(
                p.reason.starts_with(keyword),
                "{name}: reason {:?} should start with {keyword:?}",
                p.reason
            );
            n += 1;
        }
        assert!(n >= 15, "all cases read");
    }
}
