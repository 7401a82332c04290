//! Uprobe sessions (Linux 6.13+): one program at a function's entry and return,
//! where the entry decides whether the return runs; and plain `uprobe_multi` links
//! (Linux 6.6+), many probes of one object under one link, entries or returns.
//!
//! aya 0.14 cannot load a program with these attach types or create a
//! `uprobe_multi` link, so this module does both itself: it takes the object aya
//! loaded, relocates one program's instructions against aya's maps with `aya-obj`
//! (the relocation code aya itself uses), loads it with `BPF_PROG_LOAD` and
//! `expected_attach_type = BPF_TRACE_UPROBE_SESSION`, and attaches it with
//! `BPF_LINK_CREATE`. A kernel without sessions refuses the load, and the caller
//! falls back to entry and return probes.

use std::{
    collections::HashSet,
    ffi::CString,
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use aya_obj::generated::{bpf_attr, bpf_cmd};

/// `BPF_TRACE_UPROBE_SESSION` (enum bpf_attach_type, Linux 6.13); newer than aya-obj's bindings.
pub const BPF_TRACE_UPROBE_SESSION: u32 = 57;
/// `BPF_TRACE_UPROBE_MULTI` (enum bpf_attach_type, Linux 6.6).
pub const BPF_TRACE_UPROBE_MULTI: u32 = 48;
/// `BPF_F_UPROBE_MULTI_RETURN`: the link's probes are return probes.
const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;
/// `BPF_PROG_TYPE_KPROBE`: uprobes are kprobe-type programs.
const BPF_PROG_TYPE_KPROBE: u32 = 2;

/// A session (or `uprobe_multi`) program loaded into the kernel, ready to attach.
#[derive(Debug)]
pub struct SessionProgram {
    fd: OwnedFd,
    /// Keeps the program's BTF alive while the program is.
    _btf: Option<OwnedFd>,
    /// Its attach type.
    attach_type: u32,
    /// Link flags (`BPF_F_UPROBE_MULTI_RETURN` for return probes).
    flags: u32,
}

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-initialised bpf_attr filled for `cmd`; pointers in it
    // refer to buffers the caller keeps alive across the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// [`bpf`] for the commands that return a new file descriptor.
fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: these commands return a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The file descriptor of one of aya's maps.
fn map_fd(map: &aya::maps::Map) -> Option<RawFd> {
    use aya::maps::Map;
    let data = match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::RingBuf(d)
        | Map::LpmTrie(d)
        | Map::PerCpuLruHashMap(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}

impl SessionProgram {
    /// Loads program `name` of the object `elf` (the bytes aya loaded as `ebpf`,
    /// whose maps it shares) with the session attach type. Call before taking maps
    /// out of `ebpf`.
    pub fn load(elf: &[u8], ebpf: &aya::Ebpf, name: &str) -> Result<Self, SessionError> {
        Self::load_as(elf, ebpf, name, BPF_TRACE_UPROBE_SESSION, 0)
    }

    /// Loads program `name` for `uprobe_multi` links of entry probes, or of return
    /// probes when `returns`.
    pub fn load_multi(
        elf: &[u8],
        ebpf: &aya::Ebpf,
        name: &str,
        returns: bool,
    ) -> Result<Self, SessionError> {
        let flags = if returns {
            BPF_F_UPROBE_MULTI_RETURN
        } else {
            0
        };
        Self::load_as(elf, ebpf, name, BPF_TRACE_UPROBE_MULTI, flags)
    }

    fn load_as(
        elf: &[u8],
        ebpf: &aya::Ebpf,
        name: &str,
        attach_type: u32,
        flags: u32,
    ) -> Result<Self, SessionError> {
        let mut obj = aya_obj::Object::parse(elf).map_err(SessionError::Parse)?;
        // No CO-RE step here: refuse an object that would need one rather than load it
        // unrelocated.
        if obj.has_btf_relocations() {
            return Err(SessionError::CoRe);
        }
        let features = aya::features();
        let btf = match features.btf() {
            Some(f) => match obj.fixup_and_sanitize_btf(f).map_err(SessionError::Btf)? {
                Some(btf) => {
                    let bytes = btf.to_bytes();
                    // SAFETY: plain old data; zero is a valid bpf_attr.
                    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
                    // SAFETY: writing the BPF_BTF_LOAD member of the union.
                    unsafe {
                        let u = &mut attr.__bindgen_anon_7;
                        u.btf = bytes.as_ptr() as u64;
                        u.btf_size = bytes.len() as u32;
                    }
                    Some(sys_bpf(bpf_cmd::BPF_BTF_LOAD, &mut attr).map_err(SessionError::BtfLoad)?)
                }
                None => None,
            },
            None => None,
        };
        let maps: Vec<(String, RawFd, aya_obj::Map)> = obj
            .maps
            .iter()
            .map(|(n, m)| {
                let fd = ebpf
                    .map(n)
                    .and_then(map_fd)
                    .ok_or_else(|| SessionError::MapUnavailable(n.clone()))?;
                Ok((n.clone(), fd, m.clone()))
            })
            .collect::<Result<_, SessionError>>()?;
        let text: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
        obj.relocate_maps(maps.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)), &text)
            .map_err(SessionError::Relocate)?;
        obj.relocate_calls(&text).map_err(SessionError::Relocate)?;
        obj.sanitize_functions(features);
        let program = obj
            .programs
            .get(name)
            .ok_or_else(|| SessionError::NoProgram(name.to_owned()))?;
        let function = obj
            .functions
            .get(&program.function_key())
            .ok_or_else(|| SessionError::NoCode(name.to_owned()))?;
        let license = CString::new("GPL").expect("no NUL");
        let func_info = function.func_info.func_info_bytes();
        let line_info = function.line_info.line_info_bytes();
        let mut log = vec![0u8; 1 << 20];
        let attempt = |log: &mut [u8]| {
            // SAFETY: plain old data; zero is a valid bpf_attr.
            let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
            // SAFETY: writing the BPF_PROG_LOAD member of the union; the buffers
            // outlive the call.
            unsafe {
                let u = &mut attr.__bindgen_anon_3;
                u.prog_type = BPF_PROG_TYPE_KPROBE;
                u.expected_attach_type = attach_type;
                u.insns = function.instructions.as_ptr() as u64;
                u.insn_cnt = function.instructions.len() as u32;
                u.license = license.as_ptr() as u64;
                for (d, s) in u.prog_name.iter_mut().zip(name.bytes().take(15)) {
                    *d = s as libc::c_char;
                }
                if let Some(b) = &btf {
                    u.prog_btf_fd = b.as_raw_fd() as u32;
                    if function.func_info_rec_size > 0 {
                        u.func_info = func_info.as_ptr() as u64;
                        u.func_info_cnt = function.func_info.num_info;
                        u.func_info_rec_size = function.func_info_rec_size as u32;
                    }
                    if function.line_info_rec_size > 0 {
                        u.line_info = line_info.as_ptr() as u64;
                        u.line_info_cnt = function.line_info.num_info;
                        u.line_info_rec_size = function.line_info_rec_size as u32;
                    }
                }
                if !log.is_empty() {
                    u.log_level = 1;
                    u.log_buf = log.as_mut_ptr() as u64;
                    u.log_size = log.len() as u32;
                }
            }
            sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
        };
        let fd = match attempt(&mut []) {
            Ok(fd) => fd,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EINVAL)) => {
                // The verifier (or the attach type's checks) refused it: load again for its log.
                let _ = attempt(&mut log);
                let text = String::from_utf8_lossy(&log);
                let tail: Vec<&str> = text.trim_end_matches('\0').lines().rev().take(8).collect();
                return Err(SessionError::Refused {
                    name: name.to_owned(),
                    why: e,
                    log: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
                });
            }
            Err(source) => {
                return Err(SessionError::Load {
                    name: name.to_owned(),
                    source,
                });
            }
        };
        Ok(Self {
            fd,
            _btf: btf,
            attach_type,
            flags,
        })
    }

    /// The kernel's run statistics for the program: (total run time ns, runs); zero
    /// unless BPF statistics are on.
    pub fn run_stats(&self) -> io::Result<(u64, u64)> {
        // SAFETY: plain old data; zero is valid for both.
        let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.info.bpf_fd = self.fd.as_raw_fd() as u32;
        attr.info.info = std::ptr::from_mut(&mut info) as u64;
        attr.info.info_len = size_of_val(&info) as u32;
        // BPF_OBJ_GET_INFO_BY_FD fills `info`, which outlives the call.
        bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        Ok((info.run_time_ns, info.run_cnt))
    }

    /// Attaches the program at `offsets` in `path` for process `pid`, with one cookie
    /// per offset (the program reads it with `bpf_get_attach_cookie`).
    pub fn attach(
        &self,
        path: &Path,
        offsets: &[u64],
        cookies: &[u64],
        pid: u32,
    ) -> Result<SessionLink, SessionError> {
        if offsets.len() != cookies.len() || offsets.is_empty() {
            return Err(SessionError::Cookies);
        }
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| SessionError::NulPath(path.display().to_string()))?;
        // SAFETY: plain old data; zero is a valid bpf_attr.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the BPF_LINK_CREATE member of the union; the buffers outlive the call.
        unsafe {
            let l = &mut attr.link_create;
            l.__bindgen_anon_1.prog_fd = self.fd.as_raw_fd() as u32;
            l.attach_type = self.attach_type;
            let u = &mut l.__bindgen_anon_3.uprobe_multi;
            u.flags = self.flags;
            u.path = c_path.as_ptr() as u64;
            u.offsets = offsets.as_ptr() as u64;
            u.cookies = cookies.as_ptr() as u64;
            u.cnt = offsets.len() as u32;
            u.pid = pid;
        }
        let fd = sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map_err(|source| {
            SessionError::Attach {
                path: path.display().to_string(),
                source,
            }
        })?;
        Ok(SessionLink { _fd: fd })
    }
}

/// Why a uprobe session could not be loaded or attached.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The BPF object did not parse.
    #[error("parsing the BPF object")]
    Parse(#[source] aya_obj::ParseError),
    /// The object needs CO-RE relocations, which this loader does not apply.
    #[error("the BPF object has CO-RE relocations, which this loader does not apply")]
    CoRe,
    /// The object's BTF could not be prepared for this kernel.
    #[error("preparing the BTF")]
    Btf(#[source] aya_obj::btf::BtfError),
    /// The kernel refused the BTF.
    #[error("loading BTF")]
    BtfLoad(#[source] io::Error),
    /// A map the program uses is not among aya's.
    #[error("map {0} is not available")]
    MapUnavailable(String),
    /// Relocating the program's maps or calls failed.
    #[error("relocating the program")]
    Relocate(#[source] aya_obj::relocation::EbpfRelocationError),
    /// No program of that name.
    #[error("no program {0}")]
    NoProgram(String),
    /// The program has no code.
    #[error("no code for {0}")]
    NoCode(String),
    /// The verifier (or the attach type's checks) refused the program.
    #[error("the kernel refused {name} ({why}): {log}")]
    Refused {
        /// The program.
        name: String,
        /// The error of the load.
        why: io::Error,
        /// The end of the verifier's log.
        log: String,
    },
    /// Loading failed otherwise.
    #[error("loading {name} as a uprobe session")]
    Load {
        /// The program.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Offsets and cookies do not pair up.
    #[error("one cookie per offset, at least one offset")]
    Cookies,
    /// The object's path holds a NUL byte.
    #[error("path with a NUL byte: {0}")]
    NulPath(String),
    /// Creating the link failed.
    #[error("attaching a uprobe session in {path}")]
    Attach {
        /// The object.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// An attached session; closing it detaches the probes.
#[derive(Debug)]
pub struct SessionLink {
    _fd: OwnedFd,
}
