//! A line on stderr when a phase the user waits through (attaching, the final report)
//! takes more than a second, so a silent terminal never means a hang.

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

/// How long a phase may run before the user is told.
pub const AFTER: Duration = Duration::from_secs(1);

/// Prints its line once `after` has passed, unless dropped first. Dropping it after
/// the line was printed prints how long the phase took.
#[derive(Debug)]
pub struct Notice {
    done: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Notice {
    /// Starts the clock for `line` (printed as is, on stderr), if `on`.
    pub fn after(on: bool, after: Duration, line: String) -> Self {
        Self::to(on, after, line, |s| {
            #[expect(clippy::print_stderr, reason = "a progress line for the user")]
            {
                eprintln!("{s}");
            }
        })
    }

    fn to(on: bool, after: Duration, line: String, print: fn(&str)) -> Self {
        if !on {
            return Self {
                done: None,
                thread: None,
            };
        }
        let (done, rx) = mpsc::channel::<()>();
        let started = Instant::now();
        let thread = std::thread::Builder::new()
            .name("leaktrace-notice".into())
            .spawn(move || {
                if rx.recv_timeout(after) != Err(mpsc::RecvTimeoutError::Timeout) {
                    return;
                }
                print(&line);
                // Told to wait: say when the wait is over.
                let _ = rx.recv();
                print(&format!(
                    "leaktrace: … done in {:.1} s",
                    started.elapsed().as_secs_f64()
                ));
            })
            .ok();
        Self {
            done: Some(done),
            thread,
        }
    }
}

impl Drop for Notice {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    static PRINTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

    fn record(s: &str) {
        PRINTED.lock().unwrap().push(s.to_owned());
    }

    /// A phase shorter than the delay prints nothing; a longer one prints its line,
    /// then how long it took.
    #[test]
    fn prints_only_when_the_phase_is_slow() {
        drop(Notice::to(
            true,
            Duration::from_secs(60),
            "fast".into(),
            record,
        ));
        assert!(PRINTED.lock().unwrap().is_empty());
        let n = Notice::to(true, Duration::ZERO, "slow".into(), record);
        while PRINTED.lock().unwrap().is_empty() {
            std::thread::yield_now();
        }
        drop(n);
        let p = PRINTED.lock().unwrap();
        assert_eq!(p[0], "slow");
        assert!(p[1].starts_with("leaktrace: … done in "), "{p:?}");
        assert_eq!(p.len(), 2);
    }
}
