//! How many events per second one core of the engine applies.
//!
//! Replays a synthetic stream shaped like a busy process (mixed malloc, calloc,
//! realloc and free across 64 stacks, about 100,000 live blocks, occasional mmap
//! and munmap) through the same decode-and-apply path the ring-buffer consumer
//! runs: each event is read from a byte buffer as the ring buffer hands it over,
//! then applied to the [`Ledger`].

use std::time::Instant;

use leaktrace::accounting::ledger::Ledger;
use leaktrace_common::{AllocFn, Event, kind};

/// xorshift64*: deterministic, fast, good enough for a workload generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn stream(n: usize) -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut live: Vec<u64> = Vec::with_capacity(200_000);
    let mut next_addr = 0x5555_0000_0000u64;
    let mut out = Vec::with_capacity(n * size_of::<Event>());
    for i in 0..n {
        let r = rng.next();
        let ts = i as u64 * 100;
        let ev = if live.len() > 100_000 && r.is_multiple_of(2)
            || live.len() > 1000 && r.is_multiple_of(5)
        {
            let idx = (rng.next() as usize) % live.len();
            let addr = live.swap_remove(idx);
            Event {
                kind: kind::FREE,
                addr,
                ts_ns: ts,
                func: AllocFn::Free as u32,
                ..Event::default()
            }
        } else if r.is_multiple_of(997) {
            Event {
                kind: kind::MMAP,
                addr: 0x7f00_0000_0000 + (i as u64) * 0x10_0000,
                size: 1 << 20,
                aux: 0x22 << 32,
                ts_ns: ts,
                stack_id: (r % 64) as i64,
                ..Event::default()
            }
        } else {
            next_addr += 64;
            live.push(next_addr);
            let func = [
                AllocFn::Malloc,
                AllocFn::Malloc,
                AllocFn::Calloc,
                AllocFn::Realloc,
            ][(r >> 8) as usize % 4];
            Event {
                kind: kind::ALLOC,
                addr: next_addr,
                size: 16 + (r >> 16) % 4000,
                ts_ns: ts,
                aux2: ts,
                stack_id: (r % 64) as i64,
                func: func as u32,
                ..Event::default()
            }
        };
        // SAFETY: Event is a repr(C) Pod; viewing it as bytes is sound.
        out.extend_from_slice(unsafe {
            std::slice::from_raw_parts((&raw const ev).cast::<u8>(), size_of::<Event>())
        });
    }
    out
}

fn main() {
    const N: usize = 10_000_000;
    let bytes = stream(N);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut ledger = Ledger::new(None, None);
        let t = Instant::now();
        for chunk in bytes.chunks_exact(size_of::<Event>()) {
            // SAFETY: each chunk holds one Event; read_unaligned copes with alignment.
            let ev: Event = unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) };
            ledger.apply(&ev);
        }
        best = best.min(t.elapsed().as_secs_f64());
        assert!(ledger.live_allocations() > 0);
    }
    println!(
        "consumer: {N} events in {best:.3} s on one core = {:.1} M events/s (best of 3)",
        N as f64 / best / 1e6
    );
    drop(bytes);

    // Engine memory per live block: one million live blocks over 1,000 stacks.
    let before = rss_kib();
    let mut ledger = Ledger::new(None, None);
    for i in 0..1_000_000u64 {
        let ev = Event {
            kind: kind::ALLOC,
            addr: 0x5555_0000_0000 + i * 64,
            size: 48,
            stack_id: (i % 1000) as i64,
            func: AllocFn::Malloc as u32,
            ..Event::default()
        };
        ledger.apply(&ev);
    }
    let after = rss_kib();
    assert_eq!(ledger.live_allocations(), 1_000_000);
    println!(
        "engine memory: {:.1} MiB per million live blocks ({} bytes each)",
        (after - before) as f64 / 1024.0,
        (after - before) * 1024 / 1_000_000
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}
