//! Just enough of the kernel's BTF to find a struct member's offset, so BPF can
//! read `task_struct.thread.fsbase` without CO-RE relocations (which aya-ebpf 0.2
//! cannot emit for us).

use std::io;

const MAGIC: u16 = 0xeb9f;

/// A struct member: (name offset in the string section, type id, offset in bits).
type Member = (u32, u32, u32);

/// Parsed types: for each id, its kind, name offset, and members for structs/unions.
pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id − 1: (kind, name_off, size_or_type, members).
    types: Vec<(u32, u32, u32, Vec<Member>)>,
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys() -> io::Result<Self> {
        Self::parse(&std::fs::read("/sys/kernel/btf/vmlinux")?)
    }

    /// The running kernel's BTF, read and parsed once per process (several megabytes:
    /// the loader, the attach and the Python setup each ask it something).
    pub fn kernel() -> Option<&'static Self> {
        static KERNEL: std::sync::OnceLock<Option<Btf>> = std::sync::OnceLock::new();
        KERNEL.get_or_init(|| Self::from_sys().ok()).as_ref()
    }

    /// Parses raw BTF (little-endian).
    pub fn parse(data: &[u8]) -> io::Result<Self> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("BTF: {what}"));
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |o: usize| {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if u16_at(0) != Some(MAGIC) {
            return Err(bad("bad magic"));
        }
        let hdr_len = u32_at(4).ok_or_else(|| bad("short header"))? as usize;
        let (type_off, type_len, str_off, str_len) = (
            u32_at(8).ok_or_else(|| bad("short header"))? as usize,
            u32_at(12).ok_or_else(|| bad("short header"))? as usize,
            u32_at(16).ok_or_else(|| bad("short header"))? as usize,
            u32_at(20).ok_or_else(|| bad("short header"))? as usize,
        );
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| bad("strings out of range"))?
            .to_vec();
        let mut types = Vec::new();
        let (mut o, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
        while o + 12 <= end {
            let (name, info, size) = (
                u32_at(o).unwrap_or(0),
                u32_at(o + 4).unwrap_or(0),
                u32_at(o + 8).unwrap_or(0),
            );
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            o += 12;
            let mut members = Vec::new();
            // Bytes following the common header, by kind (include/uapi/linux/btf.h).
            let extra = match kind {
                1 => 4,  // INT
                3 => 12, // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    let kflag = info >> 31;
                    for m in 0..vlen {
                        let b = o + m * 12;
                        let off = u32_at(b + 8).unwrap_or(0);
                        // With kind_flag, the low 24 bits are the bit offset.
                        let bits = if kflag == 1 { off & 0xff_ffff } else { off };
                        members.push((u32_at(b).unwrap_or(0), u32_at(b + 4).unwrap_or(0), bits));
                    }
                    vlen * 12
                }
                6 => vlen * 8,                               // ENUM
                13 => vlen * 8,                              // FUNC_PROTO
                14 => 4,                                     // VAR
                15 => vlen * 12,                             // DATASEC
                17 => 4,                                     // DECL_TAG
                19 => vlen * 12,                             // ENUM64
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0, // PTR FWD TYPEDEF VOLATILE CONST RESTRICT FUNC FLOAT TYPE_TAG
                k => return Err(bad(&format!("unknown kind {k}"))),
            };
            o += extra;
            types.push((kind, name, size, members));
        }
        Ok(Self { strings, types })
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    fn struct_id(&self, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.0 == KIND_STRUCT && self.name(t.1) == name)
            .map(|i| i as u32 + 1)
    }

    /// Whether the kernel defines struct `name` (a feature's own structure: the kernel
    /// has `uprobe_multi` links if it has `bpf_uprobe_multi_link`).
    pub fn has_struct(&self, name: &str) -> bool {
        self.struct_id(name).is_some()
    }

    /// Size in bytes of struct `name`.
    pub fn struct_size(&self, name: &str) -> Option<u64> {
        let id = self.struct_id(name)?;
        self.types.get(id as usize - 1).map(|t| u64::from(t.2))
    }

    /// Byte offset of `path` (member names, e.g. `["thread", "fsbase"]`) inside struct `root`.
    pub fn member_offset(&self, root: &str, path: &[&str]) -> Option<u64> {
        let mut id = self.struct_id(root)?;
        let mut bits = 0u64;
        for (i, want) in path.iter().enumerate() {
            let t = self.types.get(id as usize - 1)?;
            let &(_, ty, off) = t.3.iter().find(|m| self.name(m.0) == *want)?;
            bits += u64::from(off);
            if i + 1 < path.len() {
                id = self.resolve(ty)?;
            }
        }
        Some(bits / 8)
    }

    /// Follows typedefs and qualifiers to a struct or union id.
    fn resolve(&self, mut id: u32) -> Option<u32> {
        for _ in 0..16 {
            let t = self.types.get(id as usize - 1)?;
            match t.0 {
                KIND_STRUCT | KIND_UNION => return Some(id),
                8..=11 | 18 => id = t.2,
                _ => return None,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's `task_struct.thread.fsbase` is found, inside task_struct.
    /// The running kernel's signal layout: handlers and mask are found, and a
    /// `k_sigaction` is x86-64's `struct sigaction` (handler, flags, restorer, mask).
    #[test]
    fn finds_signal_offsets_in_kernel_btf() {
        let o = crate::probes::load::signal_offsets();
        assert_ne!(o.sighand, 0, "{o:?}");
        assert_ne!(o.blocked, 0, "{o:?}");
        assert_eq!(o.k_sigaction, 32, "{o:?}");
    }

    #[test]
    fn finds_fsbase_in_kernel_btf() {
        let Ok(btf) = Btf::from_sys() else {
            panic!("/sys/kernel/btf/vmlinux is required (the kernel must have BTF)");
        };
        let thread = btf
            .member_offset("task_struct", &["thread"])
            .expect("task_struct.thread");
        let fsbase = btf
            .member_offset("task_struct", &["thread", "fsbase"])
            .expect("thread.fsbase");
        assert!(
            fsbase > thread && fsbase < thread + 256,
            "thread at {thread}, fsbase at {fsbase}"
        );
    }
}
