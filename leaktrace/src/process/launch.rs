//! Launching a command under trace without racing the attach.
//!
//! The child is forked and blocks on a pipe before `execve`; probes are
//! attached to the objects the command *will* map (uprobes are bound to files,
//! so they apply as soon as the dynamic linker maps them), and only then is the
//! child released. If leaktrace dies before that, the pipe closes and the child
//! exits without running the command.

use std::{
    ffi::{CString, OsStr, OsString},
    fs,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use crate::error::Error;

/// A forked child waiting for the go signal.
#[derive(Debug)]
pub struct Blocked {
    /// Its pid.
    pub pid: u32,
    go: OwnedFd,
}

impl Blocked {
    /// Lets the child exec the command.
    pub fn release(self) -> std::io::Result<()> {
        let b = [b'g'];
        // SAFETY: writing one byte from a valid buffer to an open pipe.
        let n = unsafe { libc::write(self.go.as_raw_fd(), b.as_ptr().cast(), 1) };
        if n == 1 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// Resolves a command name through PATH, as execvp would.
pub fn resolve_program(program: &OsStr) -> Result<PathBuf, Error> {
    let bad = |why: &str| Error::BadCommand {
        program: program.to_string_lossy().into_owned(),
        why: why.to_owned(),
    };
    let candidates: Vec<PathBuf> = if program.as_bytes().contains(&b'/') {
        vec![PathBuf::from(program)]
    } else {
        let path = std::env::var_os("PATH")
            .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
        std::env::split_paths(&path)
            .map(|d| d.join(program))
            .collect()
    };
    let mut found_other = false;
    for c in &candidates {
        if let Ok(meta) = fs::metadata(c) {
            use std::os::unix::fs::PermissionsExt as _;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(c.clone());
            }
            found_other = true;
        }
    }
    Err(bad(match (candidates.len(), found_other) {
        (_, true) => "not an executable file",
        (1, false) => "no such file",
        _ => "not found in PATH",
    }))
}

/// The ELF file that will actually run: follows `#!` interpreters (and `/usr/bin/env NAME`).
pub fn effective_elf(path: &Path) -> Result<PathBuf, Error> {
    let mut cur = path.to_path_buf();
    for _ in 0..4 {
        let head =
            crate::process::procfs::read_regular(&cur, 256).map_err(|source| Error::Read {
                path: cur.clone(),
                source,
            })?;
        if !head.starts_with(b"#!") {
            return Ok(cur);
        }
        let line = head[2..].split(|&b| b == b'\n').next().unwrap_or(&[]);
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        let interp = words.next().unwrap_or("");
        cur = if interp.ends_with("/env") {
            match words.find(|w| !w.starts_with('-')) {
                Some(name) => resolve_program(OsStr::new(name))?,
                None => PathBuf::from(interp),
            }
        } else {
            PathBuf::from(interp)
        };
    }
    Ok(cur)
}

/// The objects the dynamic linker will load for `elf`, the executable first, found
/// by reading files ([`super::ldso`]): the command is not run before it is traced.
/// `env` holds the variables the command sets for itself (through `env NAME=VALUE`)
/// and whether it clears the rest.
pub fn objects_for(elf: &Path, env: &EnvChange) -> Vec<PathBuf> {
    let search = super::ldso::Search::from_env(|k| {
        env.set
            .iter()
            .rev()
            .find(|(n, _)| n.as_bytes() == k.as_bytes())
            .map(|(_, v)| v.clone())
            .or_else(|| (!env.clear).then(|| std::env::var_os(k)).flatten())
    });
    super::ldso::objects_for(elf, &search)
}

/// What a command run through `env` changes in its environment.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EnvChange {
    /// `NAME=VALUE` assignments, in order.
    pub set: Vec<(OsString, OsString)>,
    /// `env -i`: the inherited environment is dropped.
    pub clear: bool,
}

/// A command run through `env` (`env [-i] [-u NAME] [NAME=VALUE]... PROGRAM ARGS`):
/// the program env will exec, and what env changes in its environment (an
/// `LD_PRELOAD` there decides which allocator the program runs on). `None` when the
/// command is not `env`, or uses options whose effect is not followed here (`-C`,
/// `-S`), or names no program.
pub fn through_env(path: &Path, argv: &[OsString]) -> Option<(PathBuf, EnvChange)> {
    if path.file_name() != Some(OsStr::new("env")) {
        return None;
    }
    let mut change = EnvChange::default();
    let mut args = argv.iter().skip(1);
    let mut options = true;
    while let Some(a) = args.next() {
        let b = a.as_bytes();
        if options && b.first() == Some(&b'-') {
            match b {
                b"--" => options = false,
                b"-" | b"-i" | b"--ignore-environment" => change.clear = true,
                b"-0" | b"--null" => {}
                b"-u" | b"--unset" => {
                    args.next()?;
                }
                _ if b.starts_with(b"-u") || b.starts_with(b"--unset=") => {}
                _ => return None,
            }
            continue;
        }
        if let Some(eq) = b.iter().position(|&c| c == b'=') {
            change.set.push((
                OsStr::from_bytes(&b[..eq]).to_owned(),
                OsStr::from_bytes(&b[eq + 1..]).to_owned(),
            ));
            continue;
        }
        return resolve_program(a).ok().map(|p| (p, change));
    }
    None
}

/// Forks a child that will `execve(program, args)` once released.
pub fn spawn_blocked(program: &Path, args: &[OsString]) -> Result<Blocked, Error> {
    let name = program.display().to_string();
    let launch_err = |source| Error::Launch {
        program: name.clone(),
        source,
    };
    let cstr = |s: &OsStr| {
        CString::new(s.as_bytes()).map_err(|_| Error::BadCommand {
            program: name.clone(),
            why: "argument contains a NUL byte".into(),
        })
    };
    let path = cstr(program.as_os_str())?;
    let mut argv: Vec<CString> = Vec::with_capacity(args.len() + 1);
    argv.push(cstr(
        args.first().map_or(program.as_os_str(), |a| a.as_os_str()),
    )?);
    for a in args.iter().skip(1) {
        argv.push(cstr(a)?);
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let envs: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let mut env_ptrs: Vec<*const libc::c_char> = envs.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());

    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(launch_err(std::io::Error::last_os_error()));
    }
    // SAFETY: the descriptors were just created and are owned by us alone.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child only calls async-signal-safe functions (close, read, execve, _exit)
    // on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(launch_err(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above; this is the child and never returns.
        unsafe {
            libc::close(wr.as_raw_fd());
            let mut b = 0u8;
            loop {
                let n = libc::read(rd.as_raw_fd(), (&raw mut b).cast(), 1);
                if n == 1 {
                    break;
                }
                if n == 0 || *libc::__errno_location() != libc::EINTR {
                    // leaktrace went away before attaching: do not run untraced.
                    libc::_exit(126);
                }
            }
            libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr());
            libc::_exit(127);
        }
    }
    drop(rd);
    // SAFETY: seizing our own child, which is blocked in read(); no memory is passed.
    let seized = unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            (libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_TRACEEXEC) as usize as *mut libc::c_void,
        )
    };
    if seized != 0 {
        log::warn!(
            "could not watch pid {pid} for its exit ({}); a very short-lived command may lose symbols",
            std::io::Error::last_os_error()
        );
    }
    Ok(Blocked {
        pid: pid as u32,
        go: wr,
    })
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Status(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Exit {
    /// How the child ended, from a `waitpid` status; `None` if it has not.
    pub fn from_wait_status(status: i32) -> Option<Self> {
        if libc::WIFEXITED(status) {
            Some(Self::Status(libc::WEXITSTATUS(status)))
        } else if libc::WIFSIGNALED(status) {
            Some(Self::Signal(libc::WTERMSIG(status)))
        } else {
            None
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(n) => write!(f, "exit status {n}"),
            Self::Signal(n) => write!(f, "killed by signal {n}"),
        }
    }
}

/// Reaps the launched child if it has ended, without waiting.
pub fn try_reap(pid: u32) -> Option<Exit> {
    let mut status = 0;
    // SAFETY: reaping our own launched child.
    let r = unsafe { libc::waitpid(pid as i32, &raw mut status, libc::WNOHANG) };
    (r == pid as i32)
        .then(|| Exit::from_wait_status(status))
        .flatten()
}

/// Kills a child that was never released (it has not run the command yet) and reaps
/// it. It may be seized with exit stops: a plain wait would return at the stop and
/// leave it stopped and unreaped, so it is killed and waited for until it is gone.
pub fn kill_blocked(b: Blocked) {
    let pid = b.pid as i32;
    drop(b);
    // SAFETY: signalling and reaping our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    for _ in 0..64 {
        let mut status = 0;
        // SAFETY: as above.
        let r = unsafe { libc::waitpid(pid, &raw mut status, libc::__WALL) };
        if r != pid || libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            break;
        }
        // A ptrace stop (its exit stop, which SIGKILL does not end): let it go on.
        // SAFETY: our own seized child, stopped.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
    }
}

/// What a launched child reported to its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildStop {
    /// Nothing (more) to report now.
    None,
    /// It is about to exit; its memory map is still readable. Call [`detach`] after.
    Exiting,
    /// It has exited, so.
    Exited(Exit),
    /// It exec'd, or our BPF program stopped it after it mapped code (SIGURG, not
    /// delivered): load the code's unwind tables, then call [`resume`].
    MappedCode,
}

/// Collects the launched child's pending ptrace stops, resuming every one that is
/// not its exit (signals are re-delivered unchanged, group stops stay stopped).
/// `ours` counts the SIGURGs our BPF program sent and that were not seen yet: such
/// a stop is returned as [`ChildStop::MappedCode`], the child left stopped.
pub fn poll_child(pid: u32, ours: &mut u64) -> ChildStop {
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child without blocking.
        let r = unsafe { libc::waitpid(pid as i32, &raw mut status, libc::WNOHANG | libc::__WALL) };
        if r <= 0 {
            return ChildStop::None;
        }
        if let Some(exit) = Exit::from_wait_status(status) {
            return ChildStop::Exited(exit);
        }
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        let event = status >> 16;
        let sig = libc::WSTOPSIG(status);
        let null = std::ptr::null_mut::<libc::c_void>();
        // SAFETY: resuming our own stopped tracee; the data argument is a signal number.
        unsafe {
            match event {
                libc::PTRACE_EVENT_EXIT => return ChildStop::Exiting,
                libc::PTRACE_EVENT_STOP => {
                    libc::ptrace(libc::PTRACE_LISTEN, pid as i32, null, null);
                }
                // The new program and its dynamic linker are mapped, nothing has run:
                // a chance to load their unwind tables.
                libc::PTRACE_EVENT_EXEC => return ChildStop::MappedCode,
                0 if sig == libc::SIGURG && *ours > 0 => {
                    *ours -= 1;
                    return ChildStop::MappedCode;
                }
                _ => {
                    libc::ptrace(
                        libc::PTRACE_CONT,
                        pid as i32,
                        null,
                        sig as usize as *mut libc::c_void,
                    );
                }
            }
        }
    }
}

/// Resumes a child stopped by [`ChildStop::MappedCode`], dropping the signal.
pub fn resume(pid: u32) {
    // SAFETY: resuming our own stopped tracee without a signal.
    unsafe {
        libc::ptrace(
            libc::PTRACE_CONT,
            pid as i32,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
}

/// Lets a child stopped at its exit finish exiting.
pub fn detach(pid: u32) {
    // SAFETY: detaching our own tracee.
    unsafe {
        libc::ptrace(
            libc::PTRACE_DETACH,
            pid as i32,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `env` with assignments and the options it follows: the program it execs and
    /// the environment changes; options whose effect is not followed give up.
    #[test]
    fn commands_through_env() {
        let argv = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let env = Path::new("/usr/bin/env");
        let (p, c) = through_env(
            env,
            &argv(&[
                "env",
                "-u",
                "X",
                "LD_PRELOAD=/lib/libjemalloc.so.2",
                "A=1=2",
                "sh",
                "-c",
                "true",
            ]),
        )
        .expect("env runs sh");
        assert!(p.ends_with("sh"), "{p:?}");
        assert_eq!(
            c,
            EnvChange {
                set: vec![
                    ("LD_PRELOAD".into(), "/lib/libjemalloc.so.2".into()),
                    ("A".into(), "1=2".into())
                ],
                clear: false
            }
        );
        assert!(
            through_env(env, &argv(&["env", "-i", "--", "sh"]))
                .unwrap()
                .1
                .clear
        );
        assert_eq!(through_env(env, &argv(&["env", "-C", "/tmp", "sh"])), None);
        assert_eq!(through_env(env, &argv(&["env", "A=1"])), None);
        assert_eq!(
            through_env(Path::new("/bin/sh"), &argv(&["sh", "A=1", "ls"])),
            None
        );
        // The preload it sets is among the objects the program will map.
        let sh = resolve_program(OsStr::new("sh")).unwrap();
        let objs = objects_for(
            &effective_elf(&sh).unwrap(),
            &EnvChange {
                set: vec![(
                    "LD_PRELOAD".into(),
                    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2".into(),
                )],
                clear: false,
            },
        );
        assert!(
            objs.iter().any(|o| o.ends_with("libjemalloc.so.2")),
            "{objs:?}"
        );
    }
}
