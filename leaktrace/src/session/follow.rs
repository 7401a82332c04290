//! `--follow-forks`: the target's descendants, traced each with its own books.
//!
//! A pre-fork server (PostgreSQL, nginx, gunicorn, uwsgi) does its work in children
//! forked from one master. The kernel side keeps the followed pids in `TARGETS`: a
//! process a traced one forks joins it before it first runs (`task:task_newtask`),
//! and leaves it when it exits or execs another program. Userspace attaches the heap
//! probes to each child as it hears of the fork (uprobes are per process; the ones
//! a child inherits in its copy of the parent's code are removed by the kernel at
//! their first hit), so a child's allocations in the first milliseconds after its
//! fork are not seen; its mappings, brk and RSS are, from the start.
//!
//! Children share the master's program and, until they map new code, its address
//! layout: one set of unwind tables, one symbolizer and the interpreter's layout
//! serve them all. A descendant found at attach that runs another program is not
//! followed, and says so.

use std::collections::BTreeMap;

use crate::{
    accounting::{ledger::Ledger, timeline::Timeline},
    probes::attach::HeapLinks,
    process::procfs::{self, Rss},
};

/// A followed descendant and its books.
#[derive(Debug)]
pub struct Follower {
    /// Its parent, as seen at the fork (or at attach).
    pub parent: u32,
    /// Its command line, read when it was first followed.
    pub command: String,
    /// Seconds after the start of tracing when it was first followed (0: at attach).
    pub since_s: f64,
    /// Whether it was forked while traced (not found at attach).
    pub forked_while_traced: bool,
    /// Its books.
    pub ledger: Ledger,
    /// Its samples over time.
    pub timeline: Timeline,
    /// Its last RSS reading.
    pub rss: Rss,
    /// Its last thread count.
    pub threads: u64,
    /// How it stopped being followed (exited, exec'd another program), and when
    /// (seconds after the start of tracing).
    pub end: Option<(f64, String)>,
    /// When it stopped, on the events' clock (ages of its blocks stop there).
    pub end_ns: Option<u64>,
    /// Its heap probes while attached.
    pub links: Option<HeapLinks>,
    /// Why its heap probes could not be attached.
    pub attach_error: Option<String>,
}

impl Follower {
    /// A follower with empty books, its break read now.
    pub fn new(pid: u32, parent: u32, since_s: f64, forked_while_traced: bool) -> Self {
        let start_brk = procfs::read_start_brk(pid);
        let brk = procfs::read_maps(pid)
            .ok()
            .and_then(|m| crate::heap::glibc::find_sites(&m, start_brk, None).main)
            .map(|(_, end)| end)
            .or(start_brk);
        Self {
            parent,
            command: command_line(pid),
            since_s,
            forked_while_traced,
            ledger: Ledger::new(start_brk, brk),
            timeline: Timeline::default(),
            rss: procfs::read_status(pid).map(|s| s.rss).unwrap_or_default(),
            threads: 0,
            end: None,
            end_ns: None,
            links: None,
            attach_error: None,
        }
    }

    /// Reads RSS and the thread count, while the process lives.
    pub fn sample_rss(&mut self, pid: u32) {
        if self.end.is_none()
            && let Ok(st) = procfs::read_status(pid)
            && st.has_mm
        {
            self.rss = st.rss;
            self.threads = st.threads;
        }
    }
}

/// Something the event loop must do with the probes, learned from the ring.
#[derive(Debug)]
pub enum Pending {
    /// `parent` forked `child`: follow it.
    Fork {
        /// The new process.
        child: u32,
        /// Its parent.
        parent: u32,
        /// Seconds after the start of tracing.
        at_s: f64,
    },
    /// `pid` stopped being followed: detach its probes.
    Ended {
        /// The process.
        pid: u32,
        /// Seconds after the start of tracing.
        at_s: f64,
        /// When, on the events' clock.
        ts_ns: u64,
        /// What happened.
        why: String,
    },
}

/// The followed family: every descendant followed, and those found at attach that
/// were not.
#[derive(Debug, Default)]
pub struct Family {
    /// Followed descendants by pid.
    pub followers: BTreeMap<u32, Follower>,
    /// Descendants found at attach running another program: (pid, program).
    pub not_followed: Vec<(u32, String)>,
    /// Work for the event loop, in ring order.
    pub pending: Vec<Pending>,
}

/// A process's command line, NULs as spaces, bounded (the target writes it).
pub fn command_line(pid: u32) -> String {
    const MAX: usize = 256;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut s: String = String::from_utf8_lossy(&raw[..raw.len().min(MAX)])
        .replace('\0', " ")
        .trim_end()
        .to_owned();
    if raw.len() > MAX {
        s.push('…');
    }
    if s.is_empty() {
        // Kernel threads and processes that cleared their arguments: the name.
        s = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| format!("[{}]", c.trim()))
            .unwrap_or_default();
    }
    crate::units::printable(&s)
}

/// The descendants of `root` alive now, parents before children, each with its
/// parent: from every thread's `children` list (the kernel's, so no scan of /proc).
/// Bounded to `max` processes.
pub fn descendants(root: u32, max: usize) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut queue = vec![root];
    while let Some(p) = queue.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(list) = std::fs::read_to_string(t.path().join("children")) else {
                continue;
            };
            for c in list
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                if out.len() >= max {
                    return out;
                }
                if c != root && !out.iter().any(|&(q, _)| q == c) {
                    out.push((c, p));
                    queue.push(c);
                }
            }
        }
    }
    out
}

/// Whether `pid` runs the same program file as `root` (a fork that did not exec).
pub fn same_program(root: u32, pid: u32) -> bool {
    let id = |p: u32| procfs::file_identity(std::path::Path::new(&format!("/proc/{p}/exe")));
    matches!((id(root), id(pid)), (Some(a), Some(b)) if a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test's own child is found, with its parent; a sleeping `sleep` runs
    /// another program than the test binary.
    #[test]
    fn finds_children_and_tells_programs_apart() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let me = std::process::id();
        let found = descendants(me, 1000);
        assert!(found.contains(&(child.id(), me)), "{found:?}");
        assert!(!same_program(me, child.id()));
        assert!(same_program(me, me));
        // Until the exec has set up the new arguments, the name stands in for them.
        let mut line = command_line(child.id());
        for _ in 0..10_000 {
            if line.starts_with("sleep 30") {
                break;
            }
            std::thread::yield_now();
            line = command_line(child.id());
        }
        assert!(line.starts_with("sleep 30"), "{line}");
        let _ = child.kill();
        let _ = child.wait();
    }
}
