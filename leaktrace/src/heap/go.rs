//! The Go runtime's heap statistics, read from outside: what `runtime.ReadMemStats`
//! would say of the heap, without stopping the world or running anything in the
//! target. The runtime keeps them as it goes (`runtime.gcController`, Go 1.19's
//! `src/runtime/mgcpacer.go`):
//!
//! ```text
//!   heapInUse     bytes in spans in use             MemStats.HeapInuse
//!   heapFree      free spans not returned to the OS  (HeapIdle − HeapReleased)
//!   heapReleased  free spans returned to the OS      MemStats.HeapReleased
//!   totalAlloc, totalFree (atomic.Uint64)            HeapAlloc = their difference
//! ```
//!
//! and goroutine stacks in `runtime.memstats.heapStats`, three generations of deltas
//! whose sum is the total (`consistentHeapStats.unsafeRead`). Member offsets come from
//! the binary's DWARF (`go build` keeps it; `-ldflags=-w` or a distribution's strip
//! removes it, and then nothing is read): a version whose runtime names these
//! differently is said not to be read, never guessed.

use serde::{Deserialize, Serialize};

use crate::process::{dwarf, memory::Memory};

/// Bytes a figure may hold before it is taken as garbage (128 TiB).
const MAX_BYTES: u64 = 1 << 47;

/// Where the statistics lie, once found.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Link-time address of `runtime.gcController`.
    controller: u64,
    /// Offsets in it: heapInUse, heapFree, heapReleased, totalAlloc, totalFree.
    fields: [u64; 5],
    /// Link-time address of `runtime.memstats.heapStats.stats` and each entry's size.
    deltas: u64,
    delta_size: u64,
    /// `inStacks` in an entry.
    in_stacks: u64,
}

impl Layout {
    /// Finds the layout in a Go binary with its symbol table and DWARF.
    pub fn find(data: &[u8]) -> Result<Self, String> {
        let (controller, _) = crate::process::elf::data_symbol(data, &["runtime.gcController"])
            .ok_or("no symbol runtime.gcController (stripped)")?;
        let (memstats, _) = crate::process::elf::data_symbol(data, &["runtime.memstats"])
            .ok_or("no symbol runtime.memstats (stripped)")?;
        let c = "runtime.gcControllerState";
        let m = dwarf::resolve(
            data,
            &[
                (c, "heapInUse"),
                (c, "heapFree"),
                (c, "heapReleased"),
                (c, "totalAlloc.value"),
                (c, "totalFree.value"),
                ("runtime.mstats", "heapStats.stats"),
                ("runtime.heapStatsDelta", ""),
                ("runtime.heapStatsDelta", "inStacks"),
            ],
            dwarf::Language::Go,
        )
        .map_err(|e| format!("{e} (a Go version whose runtime leaktrace does not read)"))?;
        if m[..5].iter().any(|f| f.size != 8) || m[7].size != 8 || m[6].size == 0 {
            return Err("its runtime's counters are not the sizes Go 1.19 has".into());
        }
        if m[6].size.checked_mul(3) != Some(m[5].size) || m[7].offset >= m[6].size {
            return Err("its runtime keeps other than three generations of heap statistics".into());
        }
        Ok(Self {
            controller,
            fields: [
                m[0].offset,
                m[1].offset,
                m[2].offset,
                m[3].offset,
                m[4].offset,
            ],
            deltas: memstats
                .checked_add(m[5].offset)
                .ok_or("runtime.memstats's address overflows")?,
            delta_size: m[6].size,
            in_stacks: m[7].offset,
        })
    }
}

/// The Go runtime's heap, as it counts it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoHeap {
    /// The program (as the target names it).
    pub object: String,
    /// Bytes in spans in use (`HeapInuse`).
    pub in_use_bytes: u64,
    /// Bytes of live and not yet swept objects (`HeapAlloc`, without the flush of the
    /// per-P caches `ReadMemStats` makes first: it may differ by what their spans
    /// account, some KiB).
    pub alloc_bytes: u64,
    /// Free spans kept, not returned to the system: resident (`HeapIdle − HeapReleased`).
    pub free_bytes: u64,
    /// Free spans returned to the system (`HeapReleased`): address space only.
    pub released_bytes: u64,
    /// Goroutine stacks (`StackInuse`).
    pub stacks_bytes: u64,
}

/// Reads the statistics through `mem`; `bias` maps link-time addresses to the target's.
pub fn read(mem: &impl Memory, layout: &Layout, bias: u64, object: &str) -> Result<GoHeap, String> {
    let word = |addr: u64| -> Result<u64, String> {
        let mut w = [0u8; 8];
        mem.read(addr.wrapping_add(bias), &mut w)
            .map_err(|e| format!("reading the runtime's statistics: {e}"))?;
        Ok(u64::from_le_bytes(w))
    };
    let f: Vec<u64> = layout
        .fields
        .iter()
        .map(|&o| word(layout.controller.wrapping_add(o)))
        .collect::<Result<_, _>>()?;
    // Addresses wrap rather than panic: a wrapped one just fails to read.
    let mut stacks: i64 = 0;
    for g in 0..3u64 {
        let at = layout
            .deltas
            .wrapping_add(g.wrapping_mul(layout.delta_size))
            .wrapping_add(layout.in_stacks);
        stacks = stacks.wrapping_add(word(at)? as i64);
    }
    let alloc = f[3].wrapping_sub(f[4]);
    let h = GoHeap {
        object: object.to_owned(),
        in_use_bytes: f[0],
        free_bytes: f[1],
        released_bytes: f[2],
        alloc_bytes: alloc,
        stacks_bytes: u64::try_from(stacks).unwrap_or(u64::MAX),
    };
    let all = [
        h.in_use_bytes,
        h.free_bytes,
        h.released_bytes,
        h.alloc_bytes,
        h.stacks_bytes,
    ];
    if all.iter().any(|&b| b > MAX_BYTES) {
        return Err(format!(
            "its statistics read as no Go heap has them ({all:?})"
        ));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::memory::Laid;

    fn layout() -> Layout {
        Layout {
            controller: 0x1000,
            fields: [0, 8, 16, 32, 48],
            deltas: 0x2000,
            delta_size: 64,
            in_stacks: 24,
        }
    }

    #[test]
    fn statistics_are_read_and_summed() {
        let mut m = Laid::new(0x10_0000, 0x1_0000);
        let bias = 0x10_0000;
        m.put(bias + 0x1000, 40 << 20);
        m.put(bias + 0x1008, 1 << 20);
        m.put(bias + 0x1010, 30 << 20);
        m.put(bias + 0x1020, 100 << 20);
        m.put(bias + 0x1030, 61 << 20);
        // Stacks: +512 KiB, −64 KiB, +32 KiB over the three generations.
        m.put(bias + 0x2000 + 24, 512 << 10);
        m.put(bias + 0x2040 + 24, (-(64i64 << 10)) as u64);
        m.put(bias + 0x2080 + 24, 32 << 10);
        let h = read(&m, &layout(), bias, "prog").expect("read");
        assert_eq!(
            h,
            GoHeap {
                object: "prog".into(),
                in_use_bytes: 40 << 20,
                alloc_bytes: 39 << 20,
                free_bytes: 1 << 20,
                released_bytes: 30 << 20,
                stacks_bytes: 480 << 10,
            }
        );
    }

    #[test]
    fn garbage_is_refused() {
        let mut m = Laid::new(0, 0x1_0000);
        // totalFree above totalAlloc: a difference past any heap.
        m.put(0x1020, 1);
        m.put(0x1030, 2);
        assert!(read(&m, &layout(), 0, "prog").is_err());
        // Outside the target's memory.
        assert!(read(&m, &layout(), 0x100_0000, "prog").is_err());
    }
}
