//! Every read of `/proc/PID` but its memory (see [`super::memory`]): the memory map,
//! smaps, status and RSS, `stat` (CPU time, the break, kernel threads), the environment,
//! thread names and stack pointers.

use std::{fs, io, path::PathBuf};

use leaktrace_common::stat;

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `rwxp`-style permissions.
    pub perms: [u8; 4],
    /// File offset of `start`.
    pub offset: u64,
    /// Inode (0 for anonymous mappings).
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`, `[stack]`, …); empty for anonymous mappings.
    pub path: String,
}

impl MapEntry {
    /// Whether the mapping is executable.
    pub fn is_exec(&self) -> bool {
        self.perms[2] == b'x'
    }

    /// Whether the mapping is backed by a file (not anonymous, not a pseudo-name).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }
}

/// Parses the text of `/proc/PID/maps`; malformed lines are skipped.
pub fn parse_maps(text: &str) -> Vec<MapEntry> {
    text.lines().filter_map(parse_map_line).collect()
}

fn parse_map_line(line: &str) -> Option<MapEntry> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let _dev = it.next()?;
    let inode = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim_start().to_owned();
    let (s, e) = range.split_once('-')?;
    Some(MapEntry {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        perms: perms.get(..4)?.try_into().ok()?,
        offset,
        inode,
        path,
    })
}

/// Reads and parses `/proc/PID/maps`.
pub fn read_maps(pid: u32) -> io::Result<Vec<MapEntry>> {
    Ok(parse_maps(&fs::read_to_string(format!(
        "/proc/{pid}/maps"
    ))?))
}

/// Path through which the file behind mapping `start..end` of `pid` opens: the
/// inode actually mapped (`/proc/PID/map_files/START-END`, root only), whatever the
/// target's root, mount namespace or overlay. The names in `/proc/PID/maps` are
/// resolved against the *reader's* root, so neither they nor `/proc/PID/root/NAME`
/// reach a file inside a chroot or a container's own mounts; a deleted or replaced
/// file still opens as the version the process runs.
pub fn mapped_file(pid: u32, start: u64, end: u64) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"))
}

/// Opens `path` only if it is a regular file, without blocking on a FIFO or device
/// a hostile root may have put there (or swapped in after a check).
pub fn open_regular(path: &std::path::Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// Up to `max` bytes of the regular file at `path` (see [`open_regular`]).
pub fn read_regular(path: &std::path::Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut buf = Vec::new();
    open_regular(path)?.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

/// The largest object file leaktrace reads (a statically linked server can be
/// hundreds of MiB; anything past this is not a program's code).
pub const MAX_OBJECT_BYTES: u64 = 2 << 30;

/// An object file the target maps (through its `map_files` entry), read whole: a
/// regular file only, at most [`MAX_OBJECT_BYTES`]. Read, not mapped: the target may
/// truncate its file while leaktrace parses it, which a mapping answers with SIGBUS;
/// a read just ends short. A device mapped executable (`/dev/zero`) is refused, where
/// reading it never ended.
pub fn read_object(path: &std::path::Path) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let f = open_regular(path)?;
    let len = f.metadata()?.len();
    if len > MAX_OBJECT_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes, more than the {MAX_OBJECT_BYTES} leaktrace reads"),
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(len).read_to_end(&mut buf)?;
    Ok(buf)
}

/// The path the process was started as: `execve`'s filename, which the kernel leaves
/// on the new stack and names in the auxiliary vector (`AT_EXECFN`). It names the
/// program as the user knows it where `/proc/PID/exe` resolves links (redis-server is
/// a link to redis-check-rdb). Read from the target's memory: bounded to `PATH_MAX`
/// and taken up to the first NUL, or `None`.
pub fn read_execfn(pid: u32) -> Option<String> {
    use std::os::unix::fs::FileExt;
    const AT_EXECFN: u64 = 31;
    const PATH_MAX: usize = 4096;
    let auxv = std::fs::read(format!("/proc/{pid}/auxv")).ok()?;
    let addr = auxv
        .chunks_exact(16)
        .map(|p| {
            let w = |i: usize| u64::from_ne_bytes(p[i..i + 8].try_into().expect("8 bytes"));
            (w(0), w(8))
        })
        .take_while(|&(k, _)| k != 0)
        .find(|&(k, _)| k == AT_EXECFN)?
        .1;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut buf = vec![0u8; PATH_MAX];
    // The string sits near the top of the stack: a read may stop at its end.
    let n = mem.read_at(&mut buf, addr).ok()?;
    let s = &buf[..n];
    let end = s.iter().position(|&b| b == 0)?;
    (end > 0).then(|| crate::units::printable(&String::from_utf8_lossy(&s[..end])))
}

/// A file's identity (device, inode), following links: the same object mapped
/// twice, or opened through different paths, has one.
pub fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

/// Memory figures from `/proc/PID/status`, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rss {
    /// VmRSS.
    pub rss_bytes: u64,
    /// RssAnon.
    pub anon_bytes: u64,
    /// RssFile.
    pub file_bytes: u64,
    /// RssShmem.
    pub shmem_bytes: u64,
}

/// What `/proc/PID/status` says about a process.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// Single-letter state (`R`, `S`, `Z`, …).
    pub state: char,
    /// Thread-group id.
    pub tgid: u32,
    /// Memory figures (all zero for kernel threads).
    pub rss: Rss,
    /// Whether the task has a user address space (kernel threads have none).
    pub has_mm: bool,
    /// Threads in the process.
    pub threads: u64,
    /// Bytes of its anonymous memory swapped out (`VmSwap`).
    pub swap_bytes: u64,
}

/// Parses the text of `/proc/PID/status`.
pub fn parse_status(text: &str) -> Status {
    let mut st = Status::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let kb = || {
            v.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
                .saturating_mul(1024)
        };
        match k {
            "State" => st.state = v.chars().next().unwrap_or('?'),
            "Tgid" => st.tgid = v.parse().unwrap_or(0),
            "VmRSS" => {
                st.rss.rss_bytes = kb();
                st.has_mm = true;
            }
            "RssAnon" => st.rss.anon_bytes = kb(),
            "RssFile" => st.rss.file_bytes = kb(),
            "RssShmem" => st.rss.shmem_bytes = kb(),
            "Threads" => st.threads = v.parse().unwrap_or(0),
            "VmSwap" => st.swap_bytes = kb(),
            _ => {}
        }
    }
    st
}

/// Reads `/proc/PID/status`.
pub fn read_status(pid: u32) -> io::Result<Status> {
    Ok(parse_status(&fs::read_to_string(format!(
        "/proc/{pid}/status"
    ))?))
}

/// One mapping of `/proc/PID/smaps` with the figures "Where RSS goes" needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmapsEntry {
    /// The mapping, as in `/proc/PID/maps`.
    pub map: MapEntry,
    /// Resident bytes.
    pub rss: u64,
    /// Of those, anonymous (private pages never backed by the file, or written since).
    pub anonymous: u64,
}

/// Parses the text of `/proc/PID/smaps`; mappings with malformed lines keep zeros.
pub fn parse_smaps(text: &str) -> Vec<SmapsEntry> {
    let mut out: Vec<SmapsEntry> = Vec::new();
    for line in text.lines() {
        // A mapping's header starts with its hex range; its fields with "Name:".
        if let Some(map) = line
            .split_once(' ')
            .filter(|(range, _)| range.contains('-') && !range.ends_with(':'))
            .and_then(|_| parse_map_line(line))
        {
            out.push(SmapsEntry {
                map,
                rss: 0,
                anonymous: 0,
            });
            continue;
        }
        let (Some(e), Some((key, rest))) = (out.last_mut(), line.split_once(':')) else {
            continue;
        };
        let kib = || -> u64 {
            rest.trim()
                .strip_suffix(" kB")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(0)
                .saturating_mul(1024)
        };
        match key {
            "Rss" => e.rss = kib(),
            "Anonymous" => e.anonymous = kib(),
            _ => {}
        }
    }
    out
}

/// Reads and parses `/proc/PID/smaps`.
pub fn read_smaps(pid: u32) -> io::Result<Vec<SmapsEntry>> {
    Ok(parse_smaps(&fs::read_to_string(format!(
        "/proc/{pid}/smaps"
    ))?))
}

/// Each thread's user stack pointer, from `/proc/PID/task/TID/syscall` (the
/// thread's state where it last entered the kernel: `nr args… sp pc`, or `-1 sp pc`
/// when it is not in a system call; `running` gives none).
pub fn thread_stack_pointers(pid: u32) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(sp) = fs::read_to_string(e.path().join("syscall"))
            .ok()
            .and_then(|t| parse_syscall_sp(&t))
        {
            out.push((tid, sp));
        }
    }
    out.sort_unstable();
    out
}

/// The stack pointer in a `/proc/PID/task/TID/syscall` line: the second-last field.
fn parse_syscall_sp(text: &str) -> Option<u64> {
    let f: Vec<&str> = text.split_whitespace().collect();
    if f.len() < 3 {
        return None;
    }
    let sp = f[f.len() - 2].strip_prefix("0x")?;
    u64::from_str_radix(sp, 16).ok().filter(|&v| v != 0)
}

/// `/proc/PID/stat`, whose fields [`leaktrace_common::stat::field`] reads.
pub fn read_stat(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// `start_brk` from `/proc/PID/stat` (field 47), if the kernel shows it.
pub fn read_start_brk(pid: u32) -> Option<u64> {
    let v: u64 = stat::field(&read_stat(pid)?, 47)?.parse().ok()?;
    (v != 0).then_some(v)
}

/// utime + stime (fields 14 and 15 of `/proc/PID/stat`), in seconds, all threads.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let ticks = stat::cpu_ticks(&read_stat(pid)?)?;
    Some(ticks as f64 / clock_ticks_per_second())
}

/// `sysconf(_SC_CLK_TCK)`: the unit of /proc's CPU times.
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// Kernel-thread flag in `/proc/PID/stat` field 9.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Whether `pid` is a kernel thread (flags, field 9).
pub fn is_kernel_thread(pid: u32) -> bool {
    read_stat(pid)
        .and_then(|s| stat::field(&s, 9)?.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// The target's initial environment (`/proc/PID/environ`).
pub fn read_environ(pid: u32) -> Vec<(String, String)> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let s = String::from_utf8_lossy(kv);
            let (k, v) = s.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// Online CPUs of this machine (the target's too).
pub fn online_cpus() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u64::try_from(n).unwrap_or(1).max(1)
}

/// Names of a process's threads (`/proc/PID/task/TID/comm`), by thread id.
pub fn thread_names(pid: u32) -> rustc_hash::FxHashMap<u32, String> {
    let mut m = rustc_hash::FxHashMap::default();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok())
            && let Ok(comm) = std::fs::read_to_string(e.path().join("comm"))
        {
            // A thread names itself (prctl): no control characters reach a report.
            m.insert(tid, crate::units::printable(comm.trim()));
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Maps lines with and without paths, pseudo-names and deleted files parse into fields.
    #[test]
    fn parses_maps_lines() {
        let text = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234                       /usr/bin/cat
55d0c0a01000-55d0c0a05000 r-xp 00001000 fe:01 1234                       /usr/bin/cat
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
7f0000200000-7f0000201000 r-xp 00002000 fe:01 99 /tmp/lib with space.so (deleted)
";
        let m = parse_maps(text);
        assert_eq!(m.len(), 5);
        assert_eq!(
            (m[1].start, m[1].end, m[1].offset, m[1].inode),
            (0x55d0c0a01000, 0x55d0c0a05000, 0x1000, 1234)
        );
        assert!(m[1].is_exec() && m[1].is_file());
        assert_eq!(m[2].path, "[heap]");
        assert!(!m[2].is_file());
        assert_eq!(m[3].path, "");
        assert_eq!(m[4].path, "/tmp/lib with space.so (deleted)");
    }

    /// smaps figures per mapping, in bytes, headers told apart from fields.
    #[test]
    fn parses_smaps() {
        let text = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234 /usr/bin/cat
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
Size:               1024 kB
Rss:                 512 kB
Pss:                 512 kB
Anonymous:           508 kB
";
        let m = parse_smaps(text);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].rss, m[0].anonymous), (4096, 0));
        assert_eq!(m[0].map.path, "/usr/bin/cat");
        assert_eq!((m[1].rss, m[1].anonymous), (512 << 10, 508 << 10));
        assert_eq!(m[1].map.start, 0x7f00_0000_0000);
    }

    /// The stack pointer is the second-last field, in or out of a system call.
    #[test]
    fn parses_syscall_stack_pointer() {
        assert_eq!(
            parse_syscall_sp("202 0x7f1 0x80 0x0 0x0 0x0 0x0 0x7ffd1230 0x7f0041\n"),
            Some(0x7ffd_1230)
        );
        assert_eq!(
            parse_syscall_sp("-1 0x7ffd1000 0x401000\n"),
            Some(0x7ffd_1000)
        );
        assert_eq!(parse_syscall_sp("running\n"), None);
        // Our own threads: the one running this test is "running"; a sleeping one has an sp.
        let own = thread_stack_pointers(std::process::id());
        assert!(own.iter().all(|&(_, sp)| sp != 0), "{own:?}");
    }

    /// Our own stat fields: state, kernel-thread flag, CPU time.
    #[test]
    fn reads_own_stat() {
        let me = std::process::id();
        let s = read_stat(me).expect("own stat");
        let state = stat::field(&s, 3).expect("field 3");
        assert!(["R", "S"].contains(&state), "field 3 is the state: {state}");
        assert!(!is_kernel_thread(me));
        assert!(is_kernel_thread(2), "pid 2 is kthreadd");
        assert!(cpu_seconds(me).expect("cpu") >= 0.0);
        assert!(
            read_start_brk(me).is_some(),
            "a glibc process has a brk heap"
        );
    }

    /// Status fields used for validation and RSS are read in bytes.
    /// Found by the fuzzer (fuzz/regressions/proc_text): a kB figure near u64::MAX
    /// overflowed when turned into bytes (a panic in debug builds).
    #[test]
    fn status_figures_saturate() {
        let st = parse_status("VmRSS:\t18446744073709551615 kB\nRssShmem: 44444444000000000 kB\n");
        assert_eq!((st.rss.rss_bytes, st.rss.shmem_bytes), (u64::MAX, u64::MAX));
    }

    #[test]
    fn parses_status() {
        let st = parse_status(
            "Name:\tx\nState:\tZ (zombie)\nTgid:\t42\nVmRSS:\t  100 kB\nRssAnon:\t 60 kB\nRssFile:\t 40 kB\nRssShmem:\t 0 kB\n",
        );
        assert_eq!(st.state, 'Z');
        assert_eq!(st.tgid, 42);
        assert!(st.has_mm);
        assert_eq!(
            st.rss,
            Rss {
                rss_bytes: 102_400,
                anon_bytes: 61_440,
                file_bytes: 40_960,
                shmem_bytes: 0
            }
        );
    }
}
