//! Where to put an allocator's uprobe so the kernel emulates, rather than
//! single-steps, the probed instruction.
//!
//! A uprobe on an instruction the kernel can emulate (push, nop, relative jumps,
//! calls and conditional branches) costs about 0.7–1.3 µs here; one it must
//! single-step out of line costs 10–19 µs (../shared/docs/performance.md §2, §10).
//! glibc's `free` starts with `test %rdi,%rdi`, jemalloc's `malloc` and
//! `operator new` with `cmp $0x1000,%rdi`, its `free` with nine `mov`/`shr`/`and`/
//! `add`s: all single-stepped. This module decodes a function and moves its probe —
//! the entry probe and the return probe alike, which then share one trap — to the
//! first emulated instruction when it can prove that every call reaches it with
//! what the probe reads intact:
//!
//! * the instructions before it are straight-line code that writes neither an
//!   argument register the probe reads nor the stack pointer (so `[sp]` is still
//!   the return address the return probe hijacks and the stack walk starts from);
//! * the site may be a conditional branch itself (every call executes it); for
//!   `free`-like functions a `je` right after the argument was tested against zero
//!   may be passed, since it leaves only for a NULL argument;
//! * no branch anywhere in the function lands inside the skipped prefix or on the
//!   site, which would let one call pass the site twice.
//!
//! Anything else (a call or `ret` in the prefix, a write to an argument or to
//! `rsp`, no emulated instruction within reach, an unknown function size) keeps
//! the probe at the entry.

use iced_x86::{
    ConditionCode, Decoder, DecoderOptions, Formatter as _, GasFormatter, Instruction,
    InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
};

/// Prologue instructions examined at most.
const MAX_INSNS: usize = 16;

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

/// Whether a function is only a jump elsewhere (after an optional `endbr64`): a thunk
/// whose target, if it is an allocator function, has a probe of its own.
pub fn is_thunk(code: &[u8]) -> bool {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    for i in decoder.iter().take(2) {
        match i.mnemonic() {
            Mnemonic::Endbr64 => continue,
            Mnemonic::Jmp => return true,
            _ => return false,
        }
    }
    false
}

/// Where a thunk at `ip` jumps (a direct `jmp`, after an optional `endbr64`); `None`
/// for an indirect one.
pub fn thunk_target(code: &[u8], ip: u64) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    for i in decoder.iter().take(2) {
        match i.mnemonic() {
            Mnemonic::Endbr64 => continue,
            Mnemonic::Jmp if matches!(i.op0_kind(), OpKind::NearBranch64) => {
                return Some(i.near_branch64());
            }
            _ => return None,
        }
    }
    None
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

/// What a probe reads at its site, which the instructions before the site must
/// leave intact.
#[derive(Clone, Copy, Debug)]
pub struct Needs<'a> {
    /// Argument registers the probe reads.
    pub args: &'a [Register],
    /// A `je` right after the first argument was tested against zero may be passed
    /// (`free`: a NULL argument changes nothing); else the probe stops at the first
    /// emulated instruction, a branch included.
    pub null_exit_ok: bool,
}

/// Chooses the probe offset in `code`, the function's bytes (all of them when
/// `whole`, else only its first bytes), for a probe that reads `needs.args` and
/// `[sp]` (the return address, for the return probe and the stack walk).
///
/// The site is the first instruction the kernel emulates that every call reaches
/// through straight-line code which writes neither an argument register nor the
/// stack pointer; the probe may sit on a conditional branch, which every call
/// executes. No branch in the function may land inside the skipped prefix or on
/// the site (a loop back would pass the site twice in one call), which can only be
/// checked on the whole function: with `whole` false the probe stays at the entry.
pub fn place(code: &[u8], whole: bool, needs: Needs<'_>) -> Placement {
    let chosen = scan(code, needs);
    if chosen.offset == 0 {
        return chosen;
    }
    if !whole {
        return Placement {
            offset: 0,
            reason: format!(
                "refused: the function's size is unknown, so a branch back into its first {} bytes can't be ruled out ({})",
                chosen.offset, chosen.reason
            ),
            emulated: first_is_emulated(code),
        };
    }
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    for i in decoder.iter() {
        if matches!(
            i.flow_control(),
            iced_x86::FlowControl::ConditionalBranch
                | iced_x86::FlowControl::UnconditionalBranch
                | iced_x86::FlowControl::Call
        ) && matches!(
            i.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        ) {
            let t = i.near_branch_target();
            if t > 0 && t <= chosen.offset {
                return Placement {
                    offset: 0,
                    reason: format!(
                        "refused: `{}` at +{} branches to +{t}, inside the prefix up to +{} ({})",
                        text(&i),
                        i.ip(),
                        chosen.offset,
                        chosen.reason
                    ),
                    emulated: first_is_emulated(code),
                };
            }
        }
    }
    chosen
}

/// The first-instruction scan of [`place`], without the branch-in check.
fn scan(code: &[u8], needs: Needs<'_>) -> Placement {
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
    let first_arg = needs.args.first().copied().unwrap_or(Register::RDI);
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
            if needs.null_exit_ok && null_tested && i.condition_code() == ConditionCode::e {
                // Leaves only when the argument is NULL.
                exit_branch = Some((i.ip(), text(&i)));
                prefix.push(text(&i));
                null_tested = false;
                continue;
            }
            // Every call executes this branch: the probe sits on it.
            return Placement {
                offset: i.ip(),
                reason: format!(
                    "branch: `{}` at +{} follows only {}",
                    text(&i),
                    i.ip(),
                    prefix.join("; ")
                ),
                emulated: true,
            };
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
        let written = info.info(&i).used_registers().iter().find_map(|u| {
            let r = u.register().full_register();
            let writes = matches!(
                u.access(),
                OpAccess::Write
                    | OpAccess::ReadWrite
                    | OpAccess::CondWrite
                    | OpAccess::ReadCondWrite
            );
            (writes && (r == Register::RSP || needs.args.iter().any(|a| a.full_register() == r)))
                .then_some(r)
        });
        if let Some(r) = written {
            let what = if r == Register::RSP {
                "the stack pointer"
            } else {
                "an argument register"
            };
            return give_up(
                format!("`{}` at +{} writes {what}", text(&i), i.ip()),
                &exit_branch,
            );
        }
        null_tested = tests_zero(&i, first_arg);
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
            let [name, regs, offset, keyword, hex] = cols[..] else {
                panic!("bad line {line:?}")
            };
            let args: Vec<Register> = regs
                .split(',')
                .map(|r| match r.trim() {
                    "rdi" => Register::RDI,
                    "rsi" => Register::RSI,
                    "rdx" => Register::RDX,
                    other => panic!("{name}: register {other}"),
                })
                .collect();
            let bytes: Vec<u8> = hex
                .split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).expect("hex"))
                .collect();
            // The byte strings are whole functions' beginnings: no branch lands in them.
            let free_like = name.ends_with(" free") || name.contains("delete");
            let p = place(
                &bytes,
                true,
                Needs {
                    args: &args,
                    null_exit_ok: free_like,
                },
            );
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
