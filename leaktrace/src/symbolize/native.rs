//! Native frames: stack addresses turned into functions, files and lines with blazesym.
//!
//! Addresses are normalized against our own snapshot of the target's
//! executable mappings and symbolized per object file by file offset, so a
//! stack can still be named after the target exited (the snapshot and the
//! files outlive it). Results are cached per address; new stacks are resolved
//! in batches as they appear, while the target is alive.

use std::path::PathBuf;

use blazesym::symbolize::{
    CodeInfo, Input, Symbolized, Symbolizer,
    source::{Elf, Source},
};
use leaktrace_common::{STACK_CFI, STACK_SYSCALL, STACK_TRUNCATED, StackTrace};
use rustc_hash::FxHashMap;

use crate::{
    process::procfs::{self, MapEntry},
    symbolize::{Frame, FrameKind, Stack},
};

/// An address to symbolize and whether it is a return address (looked up at `addr - 1`).
type Key = (u64, bool);

/// Stack symbolizer for one target process.
pub struct Symbols {
    pid: u32,
    exec_maps: Vec<MapEntry>,
    symbolizer: Symbolizer,
    cache: FxHashMap<Key, Vec<Frame>>,
}

impl std::fmt::Debug for Symbols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Symbols")
            .field("pid", &self.pid)
            .field("cached_addresses", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl Symbols {
    /// A symbolizer for `pid`, with an initial snapshot of its mappings.
    pub fn new(pid: u32) -> Self {
        let mut s = Self {
            pid,
            exec_maps: Vec::new(),
            symbolizer: Symbolizer::builder()
                .enable_code_info(true)
                .enable_inlined_fns(true)
                .enable_demangling(true)
                .build(),
            cache: FxHashMap::default(),
        };
        s.refresh_maps();
        s
    }

    /// Re-reads the target's mappings; keeps the old snapshot if it is gone.
    pub fn refresh_maps(&mut self) -> bool {
        match procfs::read_maps(self.pid) {
            Ok(m) => {
                let fresh: Vec<MapEntry> = m
                    .into_iter()
                    .filter(|m| m.is_exec() && m.is_file())
                    .collect();
                // Keep mappings that went away (dlclose) for stacks recorded earlier.
                for old in std::mem::take(&mut self.exec_maps) {
                    if !fresh.iter().any(|f| f.start < old.end && old.start < f.end) {
                        self.exec_maps.push(old);
                    }
                }
                self.exec_maps.extend(fresh);
                self.exec_maps.sort_by_key(|m| m.start);
                log::debug!(
                    "mappings snapshot of pid {}: {} executable mappings",
                    self.pid,
                    self.exec_maps.len()
                );
                true
            }
            Err(e) => {
                log::debug!("mappings of pid {} unreadable: {e}", self.pid);
                false
            }
        }
    }

    fn mapping(&self, addr: u64) -> Option<&MapEntry> {
        let i = self.exec_maps.partition_point(|m| m.start <= addr);
        let m = self.exec_maps.get(i.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }

    /// Whether every frame of a raw stack (but a syscall stack's guessed second
    /// frame) lies in a known executable mapping.
    pub fn covers(&self, st: &StackTrace) -> bool {
        let n = (st.len as usize).min(st.frames.len());
        let syscall = st.flags & STACK_SYSCALL != 0 && st.flags & STACK_CFI == 0;
        st.frames[..n]
            .iter()
            .enumerate()
            .all(|(i, &a)| (syscall && i == 1) || self.mapping(a).is_some())
    }

    /// Resolves raw stacks (id, trace) in one batch.
    pub fn resolve(&mut self, raw: &[(i64, StackTrace)]) -> Vec<(i64, Stack)> {
        // Addresses to look up: (address, is_return_address).
        let mut wanted: Vec<Key> = Vec::new();
        // (stack id, its addresses, truncated, span)
        let mut plans: Vec<(i64, Vec<Key>, bool, u64)> = Vec::new();
        let mut refreshed = false;
        for (id, st) in raw {
            let n = (st.len as usize).min(st.frames.len());
            let mut addrs: Vec<Key> = Vec::with_capacity(n);
            for (i, &a) in st.frames[..n].iter().enumerate() {
                let syscall = st.flags & STACK_SYSCALL != 0;
                let is_ret = !(syscall && i == 0);
                // A frame-pointer walk guesses a syscall stack's second frame; CFI does not.
                let guessed = syscall && i == 1 && st.flags & STACK_CFI == 0;
                if self.mapping(a).is_none() && !refreshed {
                    refreshed = true;
                    self.refresh_maps();
                }
                // The syscall stack's second frame is a guess from [sp]: keep it only if it is code.
                if guessed && self.mapping(a).is_none() {
                    continue;
                }
                addrs.push((a, is_ret));
            }
            for &k in &addrs {
                if !self.cache.contains_key(&k) {
                    wanted.push(k);
                }
            }
            plans.push((*id, addrs, st.flags & STACK_TRUNCATED != 0, st.span));
        }
        wanted.sort_unstable();
        wanted.dedup();
        self.symbolize(&wanted);
        plans
            .into_iter()
            .map(|(id, addrs, truncated, span)| {
                let frames = addrs
                    .iter()
                    .flat_map(|k| self.cache.get(k).cloned().unwrap_or_default())
                    .collect();
                (
                    id,
                    Stack {
                        frames,
                        truncated,
                        span,
                    },
                )
            })
            .collect()
    }

    fn symbolize(&mut self, wanted: &[Key]) {
        // Group by object: (host path, module name) → [(key, file offset)].
        let mut by_obj: FxHashMap<(PathBuf, String), Vec<(Key, u64)>> = FxHashMap::default();
        for &(addr, is_ret) in wanted {
            let Some(m) = self.mapping(addr) else {
                self.cache.insert((addr, is_ret), vec![unknown(addr, None)]);
                continue;
            };
            // A return address points after the call; look up the call itself.
            let lookup = if is_ret { addr.saturating_sub(1) } else { addr };
            let off = lookup - m.start + m.offset;
            let host = procfs::mapped_file(self.pid, m.start, m.end);
            by_obj
                .entry((host, m.path.clone()))
                .or_default()
                .push(((addr, is_ret), off));
        }
        for ((host, module), items) in by_obj {
            let offsets: Vec<u64> = items.iter().map(|(_, o)| *o).collect();
            // After the target exits (or unmaps the object) its map_files entry is gone;
            // the file is usually still at the same path in our namespace.
            let path = if host.exists() {
                host
            } else {
                PathBuf::from(&module)
            };
            let src = Source::Elf(Elf::new(path));
            let results = self.symbolizer.symbolize(&src, Input::FileOffset(&offsets));
            for (i, (key, _)) in items.iter().enumerate() {
                let frames = match results.as_ref().ok().and_then(|r| r.get(i)) {
                    Some(Symbolized::Sym(sym)) => {
                        let mut frames = Vec::with_capacity(1 + sym.inlined.len());
                        // blazesym lists inlined calls outermost first; we want innermost first.
                        let named =
                            |name: &str, code: Option<&CodeInfo<'_>>, inlined: bool| Frame {
                                function: Some(name.to_owned()),
                                file: code.map(|c| c.to_path().display().to_string()),
                                line: code.and_then(|c| c.line),
                                module: Some(module.clone()),
                                kind: FrameKind::Native,
                                address: format!("{:#x}", key.0),
                                inlined,
                            };
                        for f in sym.inlined.iter().rev() {
                            frames.push(named(&f.name, f.code_info.as_ref(), true));
                        }
                        frames.push(named(&sym.name, sym.code_info.as_deref(), false));
                        frames
                    }
                    _ => vec![unknown(key.0, Some(module.clone()))],
                };
                self.cache.insert(*key, frames);
            }
        }
    }
}

fn unknown(addr: u64, module: Option<String>) -> Frame {
    Frame {
        function: None,
        file: None,
        line: None,
        module,
        kind: FrameKind::Native,
        address: format!("{addr:#x}"),
        inlined: false,
    }
}
