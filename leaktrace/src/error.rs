//! Errors the engine reports to its caller.

use std::path::PathBuf;

/// Why leaktrace could not trace the target.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A signal asked leaktrace to stop before it had attached.
    #[error("stopped by signal {signal} while attaching; nothing was traced")]
    Stopped {
        /// The signal.
        signal: i32,
    },
    /// No process with that pid.
    #[error("no process with pid {pid}")]
    NoSuchProcess {
        /// The pid.
        pid: u32,
    },
    /// The pid is a kernel thread.
    #[error("pid {pid} is a kernel thread; leaktrace traces user processes")]
    KernelThread {
        /// The pid.
        pid: u32,
    },
    /// The process has exited and not been reaped.
    #[error(
        "pid {pid} is a zombie: it has exited and only waits for its parent to reap it, so there is nothing to trace"
    )]
    Zombie {
        /// The pid.
        pid: u32,
    },
    /// Missing privileges.
    #[error(
        "leaktrace needs root, or the CAP_BPF and CAP_PERFMON capabilities (and CAP_SYS_PTRACE to read another user's process): run it with sudo"
    )]
    NotPrivileged,
    /// No allocator function found in the target.
    #[error(
        "pid {pid} has no allocator leaktrace recognizes: looked for {looked_for} in {searched}"
    )]
    NoAllocator {
        /// The pid.
        pid: u32,
        /// Functions searched for.
        looked_for: String,
        /// Objects searched.
        searched: String,
    },
    /// The command to launch was not found.
    #[error("cannot run `{program}`: {why}")]
    BadCommand {
        /// The command.
        program: String,
        /// Why.
        why: String,
    },
    /// Launching failed.
    #[error("failed to launch `{program}`")]
    Launch {
        /// The command.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading /proc or a file failed.
    #[error("failed to read {path}")]
    Read {
        /// What was read.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// tracefs is not available.
    #[error("tracefs is not mounted at /sys/kernel/tracing and mounting it failed")]
    Tracefs(#[source] std::io::Error),
    /// The kernel lacks a BPF feature leaktrace's programs use (found by loading a test
    /// program before anything else).
    #[error(
        "this kernel ({release}) lacks {feature}, which leaktrace's stack walks need (a test program calling it was refused)"
    )]
    KernelLacks {
        /// The kernel's release (`uname -r`).
        release: String,
        /// What it lacks, with the Linux version that brought it.
        feature: &'static str,
        /// The kernel's answer to the test program.
        #[source]
        source: std::io::Error,
    },
    /// Loading the BPF object failed.
    #[error("failed to load the BPF programs")]
    Load(#[source] aya::EbpfError),
    /// A program or map was missing from the BPF object.
    #[error("the BPF object has no {0}")]
    Missing(&'static str),
    /// Loading or attaching one program failed.
    #[error("failed to attach {what}")]
    Attach {
        /// What was being attached.
        what: String,
        /// The cause.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("failed to use BPF map {name}")]
    Map {
        /// The map.
        name: &'static str,
        /// The cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// The live view cannot take the terminal.
    #[error("--live cannot start: {0}")]
    Live(String),
    /// `--prometheus`'s address cannot be listened on.
    #[error("cannot serve metrics on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the report failed.
    #[error("failed to write the report to {path}")]
    Output {
        /// Where.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Runtime setup failed.
    #[error("failed to set up the event loop")]
    Runtime(#[source] std::io::Error),
    /// The unwind tables' maps could not be set up.
    #[error("failed to set up the unwind tables")]
    Unwind(#[source] crate::unwind::UnwindError),
    /// The worker thread could not be started, or stopped answering.
    #[error("the session's worker thread failed: {0}")]
    Worker(String),
}

/// An error and its sources, joined by ": " (what `{:#}` prints for anyhow).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Error {
    /// Whether an error from the kernel means "not permitted" (EPERM; EACCES is
    /// also what the verifier answers for a rejected program, so it does not count).
    pub fn is_permission(source: &(dyn std::error::Error + 'static)) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && matches!(io.raw_os_error(), Some(libc::EPERM))
            {
                return true;
            }
            cur = e.source();
        }
        false
    }
}
