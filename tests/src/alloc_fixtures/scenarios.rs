//! The scenarios of the Rust allocator fixtures (`alloc_rjem`, `alloc_mimalloc`), each
//! built with another global allocator linked statically (see tests/tests/allocators.rs):
//! - `exact` (the default): exact expected outstanding allocations per function;
//! - `fragment`: four threads each fill 24 MiB in 16 KiB blocks and free all but every
//!   256th, then wait: the allocator holds freed memory the live heap does not explain.
//!
//! The handshake is the C fixtures': print "ready <pid>", wait for a line on stdin, run,
//! print "done", wait for stdin to close; each later line asks for the allocator's own
//! counts, printed as one line where the fixture has them (jemalloc's `mallctl`). Nothing here allocates outside the scenario's
//! functions: stdin is read unbuffered, into a stack buffer.

use std::{
    alloc::{Layout, alloc, alloc_zeroed, dealloc, realloc},
    hint::black_box,
    io::{Read as _, Write as _},
};

/// Five blocks of 100 bytes (the allocator's plain malloc).
#[inline(never)]
fn leak_small() {
    for _ in 0..5 {
        // SAFETY: a non-zero size.
        black_box(unsafe { alloc(Layout::from_size_align(100, 1).unwrap()) });
    }
}

/// One block of 1000 bytes aligned to 64 (jemalloc's mallocx, mimalloc's aligned malloc).
#[inline(never)]
fn leak_aligned() {
    // SAFETY: a non-zero size.
    black_box(unsafe { alloc(Layout::from_size_align(1000, 64).unwrap()) });
}

/// Three zeroed blocks of 300 bytes (calloc, or a zeroing aligned malloc).
#[inline(never)]
fn leak_zeroed() {
    for _ in 0..3 {
        // SAFETY: a non-zero size.
        black_box(unsafe { alloc_zeroed(Layout::from_size_align(300, 8).unwrap()) });
    }
}

/// A block grown from 80 to 8000 bytes, and one shrunk from 4000 to 40.
#[inline(never)]
fn leak_reallocated() {
    let l = Layout::from_size_align(80, 8).unwrap();
    // SAFETY: sizes are non-zero, the pointers come from the calls before.
    unsafe {
        let p = alloc(l);
        black_box(realloc(p, l, 8000));
        let l = Layout::from_size_align(4000, 8).unwrap();
        let q = alloc(l);
        black_box(realloc(q, l, 40));
    }
}

/// A page-aligned block of three pages.
#[inline(never)]
fn leak_page_aligned() {
    // SAFETY: a non-zero size.
    black_box(unsafe { alloc(Layout::from_size_align(3 * 4096, 4096).unwrap()) });
}

/// Allocates and frees (sized frees), reallocating some: nothing outstanding.
#[inline(never)]
fn churn() {
    for i in 0..1000usize {
        let l = Layout::from_size_align(16 + i, if i % 2 == 0 { 8 } else { 64 }).unwrap();
        // SAFETY: non-zero sizes; each block is freed with the layout it has.
        unsafe {
            let p = black_box(alloc(l));
            if i % 10 == 0 {
                let q = realloc(p, l, 2 * l.size());
                dealloc(q, Layout::from_size_align(2 * l.size(), l.align()).unwrap());
            } else {
                dealloc(p, l);
            }
        }
    }
}

/// One thread's part of `fragment`: 24 MiB in 16 KiB blocks, all but every 256th freed.
#[inline(never)]
fn fill_and_free() -> Vec<usize> {
    let l = Layout::from_size_align(16 << 10, 8).unwrap();
    let blocks: Vec<*mut u8> = (0..1536)
        .map(|_| {
            // SAFETY: a non-zero size; the block is written within its length.
            unsafe {
                let p = alloc(l);
                std::ptr::write_bytes(p, 5, l.size());
                p
            }
        })
        .collect();
    let mut kept = Vec::new();
    for (i, p) in blocks.into_iter().enumerate() {
        if i % 256 == 255 {
            kept.push(p as usize);
        } else {
            // SAFETY: allocated above with this layout.
            unsafe { dealloc(p, l) };
        }
    }
    kept
}

/// `fragment`: four threads fill and free, then stay (their caches with them).
fn fragment() {
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..4 {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let kept = fill_and_free();
            tx.send(()).unwrap();
            black_box(&kept);
            std::thread::park();
        });
    }
    for _ in 0..4 {
        rx.recv().unwrap();
    }
    // Time for the trace to see the held memory as held, not as a fill in progress.
    std::thread::sleep(std::time::Duration::from_secs(3));
}

fn wait_line(stdin: &mut std::fs::File) -> bool {
    read_line(stdin).is_some()
}

/// The next line (its first 64 bytes), read unbuffered a byte at a time into a stack
/// buffer, up to its newline: a line written in pieces is still one line (`None` at
/// the end).
fn read_line(stdin: &mut std::fs::File) -> Option<[u8; 64]> {
    let mut buf = [0u8; 64];
    let mut n = 0;
    let mut byte = [0u8; 1];
    loop {
        match stdin.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => return Some(buf),
            Ok(1) => {
                if n < buf.len() {
                    buf[n] = byte[0];
                    n += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            _ => return (n > 0).then_some(buf),
        }
    }
}

/// Runs the handshake around the scenario; `counts` answers each later line (its
/// first word: `counts`, `release`) with the allocator's own counts.
pub fn run(counts: fn(&str) -> String) {
    use std::os::fd::FromRawFd as _;
    // SAFETY: fd 0 is open for the process's life; the File is never dropped.
    let mut stdin = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(0) });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready {}", std::process::id());
    let _ = out.flush();
    if !wait_line(&mut stdin) {
        std::process::exit(3);
    }
    if std::env::args().nth(1).as_deref() == Some("fragment") {
        fragment();
    } else {
        leak_small();
        leak_aligned();
        leak_zeroed();
        leak_reallocated();
        leak_page_aligned();
        churn();
    }
    let _ = writeln!(out, "done");
    let _ = out.flush();
    while let Some(line) = read_line(&mut stdin) {
        let text = std::str::from_utf8(&line)
            .unwrap_or("")
            .trim_end_matches('\0');
        let word = text.split_whitespace().next().unwrap_or("");
        let _ = writeln!(out, "{}", counts(word));
        let _ = out.flush();
    }
}
