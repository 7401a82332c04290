//! An object's `.eh_frame` reduced to compact rows BPF can search (see the module docs).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, LittleEndian, RegisterRule, UnwindContext,
    UnwindSection, X86_64,
};
use leaktrace_common::{
    UNWIND_CFA_RBP, UNWIND_CFA_RSP, UNWIND_END, UNWIND_GAP, UNWIND_INVALID, UNWIND_PAGE_SHIFT,
    UNWIND_PLT, UNWIND_SEARCH_STEPS, UnwindRow,
};
use object::{Object, ObjectSection};

/// One FDE's range and its rows: (start, end, (address, row) pairs).
type FdeSpan = (u64, u64, Vec<(u64, UnwindRow)>);

/// An object's compact unwind table.
#[derive(Debug, Default, Clone)]
pub struct Table {
    /// Rows sorted by `pc`, with no two consecutive rows alike.
    pub rows: Vec<UnwindRow>,
    /// FDEs read.
    pub fdes: usize,
    /// Rows whose rules BPF cannot evaluate (kept as [`UNWIND_INVALID`]).
    pub unsupported: usize,
    /// FDEs whose instructions gimli could not evaluate: left out, their range a gap.
    pub bad_fdes: usize,
}

impl Table {
    /// Object-relative address of the first indexed page.
    pub fn base(&self) -> u64 {
        self.rows
            .first()
            .map_or(0, |r| u64::from(r.pc) & !((1u64 << UNWIND_PAGE_SHIFT) - 1))
    }

    /// Page index: for each page from [`Table::base`], the index of the row in effect
    /// at the page's start (0 before the first row), plus one closing entry.
    pub fn pages(&self) -> Vec<u32> {
        let Some(last) = self.rows.last() else {
            return Vec::new();
        };
        let base = self.base();
        let n = ((u64::from(last.pc) - base) >> UNWIND_PAGE_SHIFT) as usize + 2;
        let mut pages = Vec::with_capacity(n);
        let mut i = 0usize;
        for p in 0..n {
            let start = base + ((p as u64) << UNWIND_PAGE_SHIFT);
            while i + 1 < self.rows.len() && u64::from(self.rows[i + 1].pc) <= start {
                i += 1;
            }
            pages.push(i as u32);
        }
        pages
    }

    /// The row in effect at object-relative address `pc`, searched as BPF does.
    pub fn lookup(&self, pc: u64) -> Option<UnwindRow> {
        self.lookup_in(&self.pages(), pc)
    }

    /// [`Table::lookup`] with the page index computed once.
    pub fn lookup_in(&self, pages: &[u32], pc: u64) -> Option<UnwindRow> {
        let base = self.base();
        if self.rows.is_empty() || pc < base {
            return None;
        }
        let p = ((pc - base) >> UNWIND_PAGE_SHIFT) as usize;
        let (mut lo, mut hi) = if p + 1 < pages.len() {
            (pages[p] as usize, pages[p + 1] as usize)
        } else {
            (self.rows.len() - 1, self.rows.len() - 1)
        };
        for _ in 0..UNWIND_SEARCH_STEPS {
            if lo >= hi {
                break;
            }
            let mid = (lo + hi).div_ceil(2);
            if u64::from(self.rows[mid].pc) <= pc {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let row = self.rows[lo];
        (u64::from(row.pc) <= pc).then_some(row)
    }
}

/// Why an object has no table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// Not an ELF file we can parse.
    #[error("not a readable ELF object: {0}")]
    Elf(#[from] object::Error),
    /// No `.eh_frame` section.
    #[error("no .eh_frame section")]
    NoEhFrame,
    /// Malformed CFI.
    #[error("malformed .eh_frame: {0}")]
    Dwarf(#[from] gimli::Error),
    /// Addresses beyond what a row's 32-bit `pc` holds.
    #[error("code above 4 GiB")]
    TooHigh,
}

/// The PLT stubs' CFA expression, `rsp + 8 + ((rip & 15) >= N) << 3`, with N at byte 6.
const PLT_EXPR: [u8; 11] = [
    0x77, 0x08, // DW_OP_breg7 (rsp) 8
    0x80, 0x00, // DW_OP_breg16 (rip) 0
    0x3f, // DW_OP_lit15
    0x1a, // DW_OP_and
    0x00, // DW_OP_lit10 or DW_OP_lit11 (checked apart)
    0x2a, // DW_OP_ge
    0x33, // DW_OP_lit3
    0x24, // DW_OP_shl
    0x22, // DW_OP_plus
];

fn plt_threshold(expr: &[u8]) -> Option<i16> {
    if expr.len() != PLT_EXPR.len() {
        return None;
    }
    let same = expr
        .iter()
        .zip(PLT_EXPR)
        .enumerate()
        .all(|(i, (&a, b))| i == 6 || a == b);
    // DW_OP_lit0 is 0x30.
    (same && (0x30..=0x4f).contains(&expr[6])).then(|| i16::from(expr[6] - 0x30))
}

/// The address ranges (link-time) of an object's FDEs: the functions, and the
/// parts of functions, its `.eh_frame` describes.
pub fn fde_ranges(data: &[u8]) -> Result<Vec<(u64, u64)>, TableError> {
    let file = object::File::parse(data)?;
    let section = file
        .section_by_name(".eh_frame")
        .ok_or(TableError::NoEhFrame)?;
    // .eh_frame is loaded code's own table: never compressed.
    let eh_data = crate::process::elf::section_bytes(&section, 0).ok_or(TableError::NoEhFrame)?;
    let eh = EhFrame::new(&eh_data, LittleEndian);
    let mut bases = BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    let mut out = Vec::new();
    let mut entries = eh.entries(&bases);
    while let Some(entry) = entries.next()? {
        if let CieOrFde::Fde(partial) = entry
            && let Ok(fde) = partial.parse(EhFrame::cie_from_offset)
            && fde.len() > 0
        {
            // A hostile FDE's range may run past the address space: cut at its end.
            out.push((
                fde.initial_address(),
                fde.initial_address().saturating_add(fde.len()),
            ));
        }
    }
    Ok(out)
}

/// Builds the compact table of an ELF object's `.eh_frame`.
pub fn build(data: &[u8]) -> Result<Table, TableError> {
    let file = object::File::parse(data)?;
    let section = file
        .section_by_name(".eh_frame")
        .ok_or(TableError::NoEhFrame)?;
    // .eh_frame is loaded code's own table: never compressed.
    let eh_data = crate::process::elf::section_bytes(&section, 0).ok_or(TableError::NoEhFrame)?;
    let eh = EhFrame::new(&eh_data, LittleEndian);
    let mut bases = BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = file.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }
    let mut ctx = Box::new(UnwindContext::new());
    // (start, end, rows of the FDE)
    let mut spans: Vec<FdeSpan> = Vec::new();
    let mut table = Table::default();
    let mut entries = eh.entries(&bases);
    while let Some(entry) = entries.next()? {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(EhFrame::cie_from_offset) else {
            continue;
        };
        if fde.len() == 0 {
            continue;
        }
        table.fdes += 1;
        let mut rows = Vec::new();
        let mut unsupported = 0;
        let read = (|| -> gimli::Result<()> {
            let mut it = fde.rows(&eh, &bases, &mut ctx)?;
            while let Some(row) = it.next_row()? {
                let compact = compact(row, &eh, &mut unsupported);
                rows.push((row.start_address(), compact));
            }
            Ok(())
        })();
        if read.is_err() {
            // One malformed FDE costs its own function's stacks, not the object's.
            table.bad_fdes += 1;
            continue;
        }
        table.unsupported += unsupported;
        spans.push((fde.initial_address(), fde.end_address(), rows));
    }
    spans.sort_by_key(|s| s.0);
    let mut out: Vec<UnwindRow> = Vec::new();
    let mut push = |pc: u64, row: UnwindRow| -> Result<(), TableError> {
        let pc = u32::try_from(pc).map_err(|_| TableError::TooHigh)?;
        let row = UnwindRow { pc, ..row };
        match out.last_mut() {
            // Overlapping FDEs (seen in hand-written assembly): the earlier-starting
            // one was clipped at the later one's start; keep the rows sorted.
            Some(last) if pc < last.pc => {}
            // A later FDE starting where an earlier one's rows ended replaces its gap.
            Some(last) if last.pc == pc => *last = row,
            Some(last)
                if (last.cfa_off, last.kind, last.rbp) == (row.cfa_off, row.kind, row.rbp) => {}
            _ => out.push(row),
        }
        Ok(())
    };
    let gap = UnwindRow {
        kind: UNWIND_GAP,
        ..UnwindRow::default()
    };
    for (i, (_, end, rows)) in spans.iter().enumerate() {
        let next = spans.get(i + 1).map(|s| s.0);
        for &(pc, row) in rows {
            if next.is_some_and(|n| pc >= n) {
                break;
            }
            push(pc, row)?;
        }
        if next.is_none_or(|n| n > *end) {
            push(*end, gap)?;
        }
    }
    table.rows = out;
    Ok(table)
}

fn compact<R: gimli::Reader<Offset = usize>>(
    row: &gimli::UnwindTableRow<usize>,
    eh: &EhFrame<R>,
    unsupported: &mut usize,
) -> UnwindRow {
    let invalid = |unsupported: &mut usize| {
        *unsupported += 1;
        UnwindRow {
            kind: UNWIND_INVALID,
            ..UnwindRow::default()
        }
    };
    match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => {
            return UnwindRow {
                kind: UNWIND_END,
                ..UnwindRow::default()
            };
        }
        Some(RegisterRule::Offset(-8)) | None => {}
        Some(_) => return invalid(unsupported),
    }
    let (kind, cfa_off) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let Ok(off) = i16::try_from(*offset) else {
                return invalid(unsupported);
            };
            match *register {
                X86_64::RSP => (UNWIND_CFA_RSP, off),
                X86_64::RBP => (UNWIND_CFA_RBP, off),
                _ => return invalid(unsupported),
            }
        }
        CfaRule::Expression(e) => {
            let bytes = e
                .get(eh)
                .ok()
                .and_then(|x| x.0.to_slice().ok().map(|c| c.to_vec()));
            match bytes.as_deref().and_then(plt_threshold) {
                Some(t) => (UNWIND_PLT, t),
                None => return invalid(unsupported),
            }
        }
    };
    let rbp = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue | RegisterRule::Undefined) => 0,
        Some(RegisterRule::Offset(o)) if o % 8 == 0 && (-1016..0).contains(&o) => (o / 8) as i8,
        Some(_) => return invalid(unsupported),
    };
    UnwindRow {
        pc: 0,
        cfa_off,
        kind,
        rbp,
    }
}

/// Why an object's table could not be built from its file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("failed to read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Its `.eh_frame` could not be made a table.
    #[error("failed to build the unwind table")]
    Table(#[from] TableError),
}

/// Reads one object and returns its table and how long building took.
pub fn build_file(path: &Path) -> Result<(Table, Duration), FileError> {
    let data = crate::process::procfs::read_object(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let t0 = Instant::now();
    let t = build(&data)?;
    Ok((t, t0.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every FDE row of the system's libc, looked up through the compact table the
    /// way BPF searches it, gives the rules gimli evaluates for that address.
    #[test]
    fn compact_table_agrees_with_gimli_on_libc() {
        let path = "/lib/x86_64-linux-gnu/libc.so.6";
        let data = std::fs::read(path).expect("libc");
        let table = build(&data).expect("table");
        let pages = table.pages();
        let file = object::File::parse(&*data).unwrap();
        let section = file.section_by_name(".eh_frame").unwrap();
        let eh_data = section.uncompressed_data().unwrap();
        let eh = EhFrame::new(&eh_data, LittleEndian);
        let bases = BaseAddresses::default()
            .set_eh_frame(section.address())
            .set_text(file.section_by_name(".text").unwrap().address());
        let mut ctx = Box::new(UnwindContext::new());
        let mut entries = eh.entries(&bases);
        let (mut checked, mut unsupported) = (0, 0);
        while let Some(entry) = entries.next().unwrap() {
            let CieOrFde::Fde(partial) = entry else {
                continue;
            };
            let fde = partial.parse(EhFrame::cie_from_offset).unwrap();
            let mut rows = fde.rows(&eh, &bases, &mut ctx).unwrap();
            while let Some(row) = rows.next_row().unwrap() {
                let want = compact(row, &eh, &mut unsupported);
                for pc in [row.start_address(), row.end_address() - 1] {
                    let got = table.lookup_in(&pages, pc).expect("a row");
                    assert_eq!(
                        (got.kind, got.cfa_off, got.rbp),
                        (want.kind, want.cfa_off, want.rbp),
                        "{path} at {pc:#x}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 50_000, "checked {checked} addresses");
        // Past the end of an FDE not followed by another: a gap, walked with rbp.
        let last = table.rows.last().unwrap();
        assert_eq!(last.kind, UNWIND_GAP);
    }

    #[test]
    fn plt_expression_is_recognised() {
        let mut e = PLT_EXPR;
        e[6] = 0x3b;
        assert_eq!(plt_threshold(&e), Some(11));
        e[6] = 0x3a;
        assert_eq!(plt_threshold(&e), Some(10));
        e[0] = 0x78;
        assert_eq!(plt_threshold(&e), None);
    }
}
