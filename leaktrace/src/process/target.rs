//! Choosing and checking the process to trace, and the environment we need.

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use crate::{error::Error, process::procfs};

/// CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF bit numbers (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Checks up front that we may load BPF and attach probes.
pub fn check_privileges() -> Result<(), Error> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |c: u32| eff & (1 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(Error::NotPrivileged)
    }
}

/// Makes sure tracefs is mounted where aya looks for it.
pub fn ensure_tracefs() -> Result<(), Error> {
    if Path::new("/sys/kernel/tracing/events").exists()
        || Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return Ok(());
    }
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (src, dst, ty) = (c("tracefs"), c("/sys/kernel/tracing"), c("tracefs"));
    // SAFETY: all pointers are valid NUL-terminated strings; data may be NULL.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Tracefs(std::io::Error::last_os_error()))
    }
}

/// A validated process to attach to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Process {
    /// Thread-group id.
    pub pid: u32,
}

/// Validates that `pid` is a live user process; a thread id resolves to its process.
pub fn validate_pid(pid: u32) -> Result<Process, Error> {
    if pid == 0 {
        return Err(Error::NoSuchProcess { pid });
    }
    let st = match procfs::read_status(pid) {
        Ok(st) => st,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NoSuchProcess { pid });
        }
        Err(source) => {
            return Err(Error::Read {
                path: format!("/proc/{pid}/status").into(),
                source,
            });
        }
    };
    if procfs::is_kernel_thread(pid) {
        return Err(Error::KernelThread { pid });
    }
    if st.state == 'Z' || st.state == 'X' {
        return Err(Error::Zombie { pid });
    }
    if !st.has_mm {
        return Err(Error::KernelThread { pid });
    }
    if st.tgid != 0 && st.tgid != pid {
        log::warn!(
            "{pid} is a thread of process {}; tracing the whole process",
            st.tgid
        );
        return Ok(Process { pid: st.tgid });
    }
    Ok(Process { pid })
}

/// Executable file-backed objects mapped by a live process: (target path, host path).
pub fn mapped_objects(pid: u32) -> Result<Vec<(String, PathBuf)>, Error> {
    let maps = procfs::read_maps(pid).map_err(|source| Error::Read {
        path: format!("/proc/{pid}/maps").into(),
        source,
    })?;
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for m in maps.iter().filter(|m| m.is_exec() && m.is_file()) {
        if !out.iter().any(|(p, _)| *p == m.path) {
            out.push((m.path.clone(), procfs::mapped_file(pid, m.start, m.end)));
        }
    }
    Ok(out)
}
