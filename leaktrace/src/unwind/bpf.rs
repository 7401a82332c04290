//! The unwind tables' BPF maps: rows and pages written through shared mappings,
//! objects found by address in an LPM trie.

use leaktrace_common::{UnwindObject, UnwindRow};

/// The kernel-side writer the unwinder feeds (the BPF maps, or a test double in memory).
pub trait TableSink {
    /// Writes `rows` at index `at` of the row array.
    fn write_rows(&mut self, at: u32, rows: &[UnwindRow]) -> Result<(), UnwindError>;
    /// Writes `pages` at index `at` of the page array.
    fn write_pages(&mut self, at: u32, pages: &[u32]) -> Result<(), UnwindError>;
    /// Maps the address prefix to the object.
    fn insert_prefix(&mut self, addr: u64, len: u32, obj: UnwindObject) -> Result<(), UnwindError>;
    /// Forgets the address prefix.
    fn remove_prefix(&mut self, addr: u64, len: u32) -> Result<(), UnwindError>;
}

/// An array map of `T` mapped into our memory (`BPF_F_MMAPABLE`): rows are
/// written with a copy instead of one syscall each (1.4 M rows for libLLVM).
struct Mapped<T> {
    ptr: *mut T,
    len: usize,
    bytes: usize,
    _map: aya::maps::MapData,
}

impl<T: Copy> Mapped<T> {
    fn new(map: aya::maps::Map, len: usize, name: &str) -> Result<Self, UnwindError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let aya::maps::Map::Array(data) = map else {
            return Err(UnwindError::NotArray(name.to_owned()));
        };
        let bytes = (len * size_of::<T>()).div_ceil(4096) * 4096;
        // SAFETY: maps an mmapable BPF array of `bytes` bytes, shared with the kernel.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(UnwindError::Mmap {
                name: name.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
            bytes,
            _map: data,
        })
    }

    fn write(&mut self, at: u32, items: &[T]) -> Result<(), UnwindError> {
        let at = at as usize;
        if at + items.len() > self.len {
            return Err(UnwindError::PastEnd);
        }
        // SAFETY: the range is inside the mapping, which lives as long as `self`; BPF
        // reads these slots only once the object's trie entry points at them.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), items.len()) }
            .copy_from_slice(items);
        Ok(())
    }
}

// SAFETY: the mapping belongs to this value alone (it is unmapped on drop), so it may
// move to another thread with it, as the map it views does.
unsafe impl<T: Send> Send for Mapped<T> {}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}

/// The unwinder's BPF maps.
pub struct BpfTables {
    rows: Mapped<UnwindRow>,
    /// u64 slots: array maps stride elements by 8 bytes, which the mapping exposes.
    pages: Mapped<u64>,
    objects: aya::maps::lpm_trie::LpmTrie<aya::maps::MapData, [u8; 8], UnwindObject>,
    /// Bumped after every change to `objects`: the walk's object cache follows it.
    generation: aya::maps::Array<aya::maps::MapData, u64>,
    bumps: u64,
}

impl BpfTables {
    fn bump(&mut self) -> Result<(), UnwindError> {
        self.bumps += 1;
        self.generation.set(0, self.bumps, 0)?;
        Ok(())
    }
}

impl BpfTables {
    /// Takes the unwind maps out of the loaded programs (created with these capacities).
    pub fn take(ebpf: &mut aya::Ebpf, capacity: Capacity) -> Result<Self, UnwindError> {
        let Capacity { rows, pages } = capacity;
        use leaktrace_common::maps;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| UnwindError::MapMissing(name.to_owned()))
        };
        Ok(Self {
            rows: Mapped::new(take(maps::UNWIND_ROWS)?, rows as usize, maps::UNWIND_ROWS)?,
            pages: Mapped::new(
                take(maps::UNWIND_PAGES)?,
                pages as usize,
                maps::UNWIND_PAGES,
            )?,
            objects: aya::maps::lpm_trie::LpmTrie::try_from(take(maps::UNWIND_OBJECTS)?)?,
            generation: aya::maps::Array::try_from(take(maps::UNWIND_GEN)?)?,
            bumps: 0,
        })
    }
}

impl TableSink for BpfTables {
    fn write_rows(&mut self, at: u32, rows: &[UnwindRow]) -> Result<(), UnwindError> {
        self.rows.write(at, rows)
    }

    fn write_pages(&mut self, at: u32, pages: &[u32]) -> Result<(), UnwindError> {
        let wide: Vec<u64> = pages.iter().map(|&p| u64::from(p)).collect();
        self.pages.write(at, &wide)
    }

    fn insert_prefix(&mut self, addr: u64, len: u32, obj: UnwindObject) -> Result<(), UnwindError> {
        let key = aya::maps::lpm_trie::Key::new(len, addr.to_be_bytes());
        self.objects.insert(&key, obj, 0)?;
        self.bump()
    }

    fn remove_prefix(&mut self, addr: u64, len: u32) -> Result<(), UnwindError> {
        let key = aya::maps::lpm_trie::Key::new(len, addr.to_be_bytes());
        self.objects.remove(&key)?;
        self.bump()
    }
}

/// Sizes of the kernel's unwind arrays, in entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Rows (all objects' tables, back to back).
    pub rows: u32,
    /// Page index entries.
    pub pages: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            rows: leaktrace_common::DEFAULT_UNWIND_ROWS,
            pages: leaktrace_common::DEFAULT_UNWIND_PAGES,
        }
    }
}

impl Capacity {
    /// Capacities for tables needing `rows` and `pages`: room for a quarter more
    /// (libraries loaded later), never below the defaults.
    pub fn for_tables(rows: usize, pages: usize) -> Self {
        let grow = |need: usize, floor: u32| -> u32 {
            u32::try_from(need + need / 4)
                .unwrap_or(u32::MAX)
                .max(floor)
        };
        let d = Self::default();
        Self {
            rows: grow(rows, d.rows),
            pages: grow(pages, d.pages),
        }
    }
}

/// Why the unwind tables could not reach the kernel.
#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    /// The loaded object has no such map.
    #[error("map {0} missing")]
    MapMissing(String),
    /// The map is not an array.
    #[error("map {0} is not an array")]
    NotArray(String),
    /// Mapping the array into our memory failed.
    #[error("mmap of map {name}")]
    Mmap {
        /// The map.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A write past the array's end (a placement bug).
    #[error("array write past its end")]
    PastEnd,
    /// A map operation failed.
    #[error("BPF map")]
    Map(#[from] aya::maps::MapError),
}

/// LPM-trie prefixes `(address, prefix length)` covering `[start, end)` exactly.
pub fn prefixes(mut start: u64, end: u64) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    while start < end {
        let mut size_log = if start == 0 {
            63
        } else {
            start.trailing_zeros().min(63)
        };
        while size_log > 0 && (1u64 << size_log) > end - start {
            size_log -= 1;
        }
        out.push((start, 64 - size_log));
        start += 1u64 << size_log;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_cover_ranges_exactly() {
        for (s, e) in [
            (0x1000u64, 0x2000u64),
            (0x7f00_1234_5000, 0x7f00_1239_a000),
            (0x55_5555_4000, 0x55_5555_5000),
        ] {
            let ps = prefixes(s, e);
            let mut at = s;
            for &(a, len) in &ps {
                assert_eq!(a, at);
                let size = 1u64 << (64 - len);
                assert_eq!(a % size, 0, "aligned");
                at += size;
            }
            assert_eq!(at, e);
        }
    }
}
