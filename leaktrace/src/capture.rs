//! Captures: `--record FILE` writes, while tracing, what the analysis needs, so that
//! `--replay FILE` redoes it later, elsewhere, without root and without the target.
//!
//! A capture holds the books' inputs in the order the event loop applied them: the
//! events read from the ring buffer, the stacks as the worker named them, the RSS
//! samples, and at each report the worker's snapshot (maps, heap walks, census,
//! Python's state) with the run's facts (counters, overhead, why it ended). Replaying
//! applies them to new books in the same order and builds the report from them as the
//! live run did.
//!
//! The file: [`MAGIC`], then records, each `kind: u8, length: u32 LE, crc32: u32 LE`
//! and `length` bytes of deflated payload. Kind [`EVENTS`] holds [`Event`]s as the
//! kernel wrote them (72 bytes each, little-endian); kind [`RECORD`] holds one
//! [`Record`] as JSON. Records are written whole and flushed at least every quarter of
//! a second, so a capture cut short (leaktrace killed, a disk full) reads up to its
//! last complete record.

use std::io::{Read, Write};
use std::path::Path;

use leaktrace_common::Event;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::session::output::Output;

/// The first bytes of a capture: the name, and the format's version.
pub const MAGIC: &[u8; 24] = b"leaktrace capture v1\n\0\0\0";
/// A record of events.
pub const EVENTS: u8 = 1;
/// A [`Record`], as JSON.
pub const RECORD: u8 = 2;
/// Events per record, at most.
const EVENTS_PER_RECORD: usize = 8192;
/// A record's payload, inflated, at most (a snapshot of a huge heap is the largest).
const MAX_RECORD: u64 = 1 << 30;

thread_local! {
    /// Set while a record is serialized: state the JSON report leaves out goes in.
    static CAPTURING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// For `skip_serializing_if`: a field the JSON report leaves out but a capture needs
/// (the replayed report is built from it).
pub fn outside<T>(_: &T) -> bool {
    !CAPTURING.with(std::cell::Cell::get)
}

/// Serializes `r` with the fields only captures hold.
fn capture_json<T: Serialize>(r: &T) -> serde_json::Result<Vec<u8>> {
    CAPTURING.with(|c| c.set(true));
    let json = serde_json::to_vec(r);
    CAPTURING.with(|c| c.set(false));
    json
}

/// The end of user address space (x86-64 with 5-level paging; aarch64's is lower).
const USER_END: u64 = 1 << 56;

/// Whether an event read from a capture could have come from the kernel: its
/// addresses and lengths lie in user address space. A capture is a file anyone may
/// have written; an event that is not is counted as bad and not applied.
pub fn plausible(ev: &Event) -> bool {
    use leaktrace_common::kind;
    let span = |a: u64, len: u64| a.checked_add(len).is_some_and(|e| e <= USER_END);
    match ev.kind {
        // A failed call has no block; its requested size may be anything.
        kind::ALLOC if ev.addr == 0 => ev.aux < USER_END,
        kind::ALLOC => span(ev.addr, ev.size) && ev.aux < USER_END,
        kind::FREE => ev.addr < USER_END,
        kind::MMAP | kind::MUNMAP | kind::MPROTECT | kind::MADVISE => span(ev.addr, ev.size),
        kind::MREMAP => span(ev.addr, ev.size) && span(ev.aux, ev.aux2),
        kind::BRK => ev.addr < USER_END && ev.aux < USER_END,
        _ => true,
    }
}

/// pymalloc's arena size for a CPython version: 1 MiB since 3.10, 256 KiB before.
pub fn pymalloc_arena(version: Option<(u32, u32)>) -> Option<u64> {
    version.map(|v| if v >= (3, 10) { 1 << 20 } else { 256 << 10 })
}

/// What a capture holds besides events.
#[derive(Debug, Serialize, Deserialize)]
pub enum Record {
    /// The start: what the books are made with.
    Start(Box<Start>),
    /// Stacks the worker named, by stack id, and how many it could not read.
    Stacks {
        /// The stacks.
        stacks: Vec<(i64, crate::symbolize::stacks::Stack)>,
        /// Stacks that could not be read.
        unreadable: u64,
    },
    /// An RSS sample, taken into the timeline.
    Sample {
        /// Seconds since tracing began.
        t: f64,
        /// The target's RSS.
        rss: crate::process::procfs::Rss,
        /// Its threads.
        threads: u64,
        /// The kernel's counters at that moment, indexed by `counter::*`.
        kernel: Vec<u64>,
        /// CLOCK_MONOTONIC at that moment.
        now_ns: u64,
    },
    /// The interpreter was identified (pymalloc's arena size follows from it).
    Interpreter(Option<(u32, u32)>),
    /// Sampled mode's duty changed (events from now on are weighed by it).
    Duty(f64),
    /// Ring buffer items too short to be events.
    BadEvents(u64),
    /// Stacks aged out (`--continuous`).
    Forget(Vec<i64>),
    /// The run's facts as they were (what a capture cut short reports with): once
    /// tracing began, then every 10 s.
    Facts(Box<crate::report::RunFacts>),
    /// A report: the worker's snapshot and the run's facts at that moment.
    Report(Box<ReportInputs>),
}

/// What the books are made with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Start {
    /// leaktrace's version that recorded it.
    pub version: String,
    /// The traced process.
    pub pid: u32,
    /// Its command line, for the reader.
    pub command: String,
    /// When recording began, Unix seconds.
    pub unix_s: u64,
    /// The heap's start at attach.
    pub start_brk: Option<u64>,
    /// The heap's end at attach.
    pub brk: Option<u64>,
    /// Mean sampling interval in bytes (0: exact).
    pub sample_rate: u64,
    /// leaktrace launched the target.
    pub launched: bool,
    /// The timeline's window, seconds (`--continuous`).
    #[serde(default)]
    pub window_s: Option<f64>,
}

/// A report's inputs besides the books.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReportInputs {
    /// The run's facts.
    pub facts: crate::report::RunFacts,
    /// What the worker read from the target.
    pub snapshot: crate::session::worker::Snapshot,
    /// Build ids of the objects in the stacks, by path (read while the target lived).
    pub build_ids: rustc_hash::FxHashMap<String, String>,
}

/// [`Record`] as written: borrowed where the event loop owns the data.
#[derive(Serialize)]
enum RecordRef<'a> {
    Start(&'a Start),
    Stacks {
        stacks: &'a [(i64, crate::symbolize::stacks::Stack)],
        unreadable: u64,
    },
    Sample {
        t: f64,
        rss: crate::process::procfs::Rss,
        threads: u64,
        kernel: &'a [u64],
        now_ns: u64,
    },
    Interpreter(Option<(u32, u32)>),
    Duty(f64),
    BadEvents(u64),
    Forget(&'a [i64]),
    Facts(&'a crate::report::RunFacts),
    Report(ReportRef<'a>),
}

#[derive(Serialize)]
struct ReportRef<'a> {
    facts: &'a crate::report::RunFacts,
    snapshot: &'a crate::session::worker::Snapshot,
    build_ids: &'a rustc_hash::FxHashMap<String, String>,
}

/// Writes a capture while tracing. A write that fails stops the recording (said once,
/// and at the end); tracing goes on.
pub struct Recorder {
    out: Option<Output>,
    path: String,
    /// Records not yet written.
    pending: Vec<u8>,
    /// Events not yet in a record.
    events: Vec<u8>,
    events_in: usize,
    /// Events written so far.
    pub events_total: u64,
    /// Bytes written so far.
    pub bytes_total: u64,
    /// Why recording stopped early.
    pub failed: Option<String>,
}

impl Recorder {
    /// Creates the capture (in place from the first flush).
    pub fn create(path: &Path) -> Result<Self, Error> {
        let out = Output::file(path)?;
        Ok(Self {
            out: Some(out),
            path: path.display().to_string(),
            pending: MAGIC.to_vec(),
            events: Vec::with_capacity(EVENTS_PER_RECORD * size_of::<Event>()),
            events_in: 0,
            events_total: 0,
            bytes_total: 0,
            failed: None,
        })
    }

    /// The capture's path, as given.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Adds an event applied to the books.
    pub fn event(&mut self, ev: &Event) {
        if self.out.is_none() {
            return;
        }
        // SAFETY: Event is a repr(C) Pod of integers with explicit padding; its bytes
        // are what the kernel wrote.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(ev).cast::<u8>(), size_of::<Event>())
        };
        self.events.extend_from_slice(bytes);
        self.events_in += 1;
        if self.events_in >= EVENTS_PER_RECORD {
            self.seal_events();
        }
    }

    fn seal_events(&mut self) {
        if self.events_in == 0 {
            return;
        }
        let events = std::mem::take(&mut self.events);
        self.frame(EVENTS, &events);
        self.events_total += self.events_in as u64;
        self.events = events;
        self.events.clear();
        self.events_in = 0;
    }

    fn frame(&mut self, kind: u8, payload: &[u8]) {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        let packed = z.write_all(payload).and_then(|()| z.finish());
        let packed = match packed {
            Ok(p) => p,
            Err(e) => return self.fail(&e.to_string()),
        };
        let Ok(len) = u32::try_from(packed.len()) else {
            return self.fail("a record over 4 GiB");
        };
        self.pending.push(kind);
        self.pending.extend_from_slice(&len.to_le_bytes());
        self.pending
            .extend_from_slice(&crc32fast::hash(&packed).to_le_bytes());
        self.pending.extend_from_slice(&packed);
    }

    fn record(&mut self, r: &RecordRef<'_>) {
        if self.out.is_none() {
            return;
        }
        // Events before it were applied before it.
        self.seal_events();
        match capture_json(r) {
            Ok(json) => self.frame(RECORD, &json),
            Err(e) => self.fail(&e.to_string()),
        }
    }

    /// The start.
    pub fn start(&mut self, s: &Start) {
        self.record(&RecordRef::Start(s));
        self.flush();
    }

    /// Stacks the worker named.
    pub fn stacks(&mut self, stacks: &[(i64, crate::symbolize::stacks::Stack)], unreadable: u64) {
        self.record(&RecordRef::Stacks { stacks, unreadable });
    }

    /// An RSS sample taken into the timeline.
    pub fn sample(
        &mut self,
        t: f64,
        rss: crate::process::procfs::Rss,
        threads: u64,
        kernel: &[u64],
        now_ns: u64,
    ) {
        self.record(&RecordRef::Sample {
            t,
            rss,
            threads,
            kernel,
            now_ns,
        });
    }

    /// The interpreter identified.
    pub fn interpreter(&mut self, v: Option<(u32, u32)>) {
        self.record(&RecordRef::Interpreter(v));
    }

    /// The duty changed.
    pub fn duty(&mut self, d: f64) {
        self.record(&RecordRef::Duty(d));
    }

    /// Items too short to be events.
    pub fn bad_events(&mut self, n: u64) {
        self.record(&RecordRef::BadEvents(n));
    }

    /// Stacks aged out.
    pub fn forget(&mut self, ids: &[i64]) {
        self.record(&RecordRef::Forget(ids));
    }

    /// The run's facts as they are.
    pub fn facts(&mut self, f: &crate::report::RunFacts) {
        self.record(&RecordRef::Facts(f));
    }

    /// A report's inputs; written at once.
    pub fn report(
        &mut self,
        facts: &crate::report::RunFacts,
        snapshot: &crate::session::worker::Snapshot,
        build_ids: &rustc_hash::FxHashMap<String, String>,
    ) {
        self.record(&RecordRef::Report(ReportRef {
            facts,
            snapshot,
            build_ids,
        }));
        self.flush();
    }

    /// Writes what is pending (records whole; events waiting for a record stay).
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let Some(out) = self.out.as_mut() else {
            return;
        };
        match out.write_bytes(&self.pending) {
            Ok(()) => {
                self.bytes_total += self.pending.len() as u64;
                self.pending.clear();
            }
            Err(e) => self.fail(&crate::error::chain(&e)),
        }
    }

    /// Seals the last events and writes everything.
    pub fn finish(&mut self) {
        self.seal_events();
        self.flush();
    }

    fn fail(&mut self, why: &str) {
        if self.out.take().is_some() {
            log::warn!(
                "recording to {} stopped after {} events: {why}",
                self.path,
                self.events_total
            );
            self.failed = Some(why.to_owned());
        }
        self.pending.clear();
        self.events.clear();
        self.events_in = 0;
    }
}

/// One item read back from a capture.
pub enum Item {
    /// Events, in the order they were applied.
    Events(Vec<Event>),
    /// Anything else.
    Record(Record),
}

/// Reads a capture's records in order. A record cut short or damaged ends the reading:
/// [`Reader::cut`] says where and why.
pub struct Reader<R> {
    input: R,
    /// Records read so far.
    pub records: u64,
    /// Why reading stopped before the end of the file, if it did.
    pub cut: Option<String>,
    done: bool,
    /// A record's payload, inflated, at most.
    max_record: u64,
}

impl<R: Read> Reader<R> {
    /// Reads the magic.
    pub fn new(mut input: R) -> Result<Self, String> {
        let mut magic = [0u8; MAGIC.len()];
        input
            .read_exact(&mut magic)
            .map_err(|_| "not a leaktrace capture (too short)".to_owned())?;
        if &magic != MAGIC {
            if magic.starts_with(b"leaktrace capture ") {
                return Err("a leaktrace capture of another format version".into());
            }
            return Err("not a leaktrace capture".into());
        }
        Ok(Self {
            input,
            records: 0,
            cut: None,
            done: false,
            max_record: MAX_RECORD,
        })
    }

    /// The next item; `None` at the end, or at the first record cut short or damaged.
    pub fn next_item(&mut self) -> Option<Item> {
        if self.done {
            return None;
        }
        let item = self.read_item();
        match item {
            Ok(Some(i)) => {
                self.records += 1;
                Some(i)
            }
            Ok(None) => {
                self.done = true;
                None
            }
            Err(why) => {
                self.done = true;
                self.cut = Some(format!("after record {}: {why}", self.records));
                None
            }
        }
    }

    fn read_item(&mut self) -> Result<Option<Item>, String> {
        let mut head = [0u8; 9];
        // The end of the file between records is the normal end.
        let mut got = 0;
        while got < head.len() {
            match self.input.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err("the file ends inside a record's header".into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        let kind = head[0];
        let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(head[5..9].try_into().expect("4 bytes"));
        let mut packed = Vec::new();
        (&mut self.input)
            .take(u64::from(len))
            .read_to_end(&mut packed)
            .map_err(|e| e.to_string())?;
        if packed.len() != len as usize {
            return Err(format!(
                "the file ends inside a record ({} of its {len} bytes)",
                packed.len()
            ));
        }
        if crc32fast::hash(&packed) != crc {
            return Err("a record's checksum does not match (damaged)".into());
        }
        let mut payload = Vec::new();
        flate2::read::DeflateDecoder::new(&packed[..])
            .take(self.max_record + 1)
            .read_to_end(&mut payload)
            .map_err(|e| format!("a record does not inflate: {e}"))?;
        if payload.len() as u64 > self.max_record {
            return Err(format!(
                "a record inflates beyond {} MiB",
                self.max_record >> 20
            ));
        }
        match kind {
            EVENTS => {
                if payload.len() % size_of::<Event>() != 0 {
                    return Err("an events record is not a whole number of events".into());
                }
                let events = payload
                    .chunks_exact(size_of::<Event>())
                    // SAFETY: each chunk holds one Event's bytes; Event is a Pod of
                    // integers, valid for any bytes; read_unaligned copes with alignment.
                    .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<Event>()) })
                    .collect();
                Ok(Some(Item::Events(events)))
            }
            RECORD => serde_json::from_slice(&payload)
                .map(|r| Some(Item::Record(r)))
                .map_err(|e| format!("a record does not parse: {e}")),
            k => Err(format!("a record of unknown kind {k}")),
        }
    }
}

/// A capture read back: the books rebuilt from its events and records, with the last
/// snapshot and facts, ready to report on as the live run did.
pub struct Replay {
    /// How the capture began.
    pub start: Start,
    ledger: crate::accounting::ledger::Ledger,
    timeline: crate::accounting::timeline::Timeline,
    stacks: crate::symbolize::stacks::StackStore,
    snapshot: crate::session::worker::Snapshot,
    facts: crate::report::RunFacts,
    /// Build ids recorded with the last report.
    pub build_ids: rustc_hash::FxHashMap<String, String>,
    /// Events applied.
    pub events: u64,
    /// Records read.
    pub records: u64,
    /// Why reading stopped before the end of the file, if it did.
    pub cut: Option<String>,
    /// The capture holds the final report's inputs, and nothing after them.
    pub complete: bool,
}

impl Replay {
    /// Reads a capture file and rebuilds its books.
    pub fn load(path: &Path) -> Result<Self, String> {
        let shown = path.display().to_string();
        let f = std::fs::File::open(path).map_err(|e| format!("{shown}: {e}"))?;
        Self::read(std::io::BufReader::new(f)).map_err(|e| format!("{shown}: {e}"))
    }

    /// Reads a capture and rebuilds its books.
    pub fn read(input: impl Read) -> Result<Self, String> {
        let mut rd = Reader::new(input)?;
        let start = match rd.next_item() {
            Some(Item::Record(Record::Start(s))) => *s,
            Some(_) => {
                return Err("a capture that does not begin with its start".into());
            }
            None => {
                return Err(format!(
                    "nothing readable ({})",
                    rd.cut.as_deref().unwrap_or("no records")
                ));
            }
        };
        let mut ledger = crate::accounting::ledger::Ledger::new(start.start_brk, start.brk)
            .with_sampling(start.sample_rate);
        let mut timeline = crate::accounting::timeline::Timeline::with_window(start.window_s);
        let mut stacks = crate::symbolize::stacks::StackStore::default();
        let mut facts = None;
        let mut snapshot = None;
        let mut build_ids = rustc_hash::FxHashMap::default();
        let mut events = 0u64;
        let mut complete = false;
        // The last sample: what a capture cut short reports with.
        let mut last: Option<(f64, crate::process::procfs::Rss, Vec<u64>, u64)> = None;
        while let Some(item) = rd.next_item() {
            complete = false;
            match item {
                Item::Events(evs) => {
                    for ev in &evs {
                        if !plausible(ev) {
                            ledger.counters.bad_events += 1;
                            continue;
                        }
                        ledger.apply(ev);
                        // As the event loop does: the old program's samples go with it.
                        if ev.kind == leaktrace_common::kind::EXEC {
                            timeline.reset();
                        }
                    }
                    events += evs.len() as u64;
                }
                Item::Record(Record::Start(_)) => {
                    rd.cut = Some(format!("after record {}: a second start", rd.records));
                    break;
                }
                Item::Record(Record::Stacks {
                    stacks: s,
                    unreadable,
                }) => {
                    stacks.extend(s);
                    ledger.counters.stack_unreadable += unreadable;
                }
                Item::Record(Record::Sample {
                    t,
                    rss,
                    threads,
                    kernel,
                    now_ns,
                }) => {
                    timeline.sample(t, &ledger, rss, threads);
                    last = Some((t, rss, kernel, now_ns));
                }
                Item::Record(Record::Interpreter(v)) => {
                    ledger.set_pymalloc_arena(pymalloc_arena(v))
                }
                Item::Record(Record::Duty(d)) => ledger.set_duty(d),
                Item::Record(Record::BadEvents(n)) => ledger.counters.bad_events += n,
                Item::Record(Record::Forget(ids)) => {
                    ledger.forget_stacks(&ids);
                    timeline.forget(&ids);
                    stacks.forget(&ids);
                }
                Item::Record(Record::Facts(f)) => facts = Some(*f),
                Item::Record(Record::Report(r)) => {
                    let ReportInputs {
                        facts: f,
                        snapshot: snap,
                        build_ids: ids,
                    } = *r;
                    complete = f.final_report;
                    facts = Some(f);
                    snapshot = Some(snap);
                    build_ids = ids;
                }
            }
        }
        let mut facts = facts.unwrap_or_else(|| crate::report::RunFacts::unknown(start.pid));
        if !complete {
            // Cut short: reported as it stood at the last sample, with the last
            // snapshot (if any) of the target.
            if let Some((t, rss, kernel, now_ns)) = last {
                facts.duration_s = t;
                facts.rss = rss;
                facts.kernel_counters = kernel;
                facts.now_ns = now_ns;
            }
            facts.final_report = true;
            facts.end_reason = Some(match &rd.cut {
                Some(why) => format!("the capture is cut short {why}"),
                None => "the capture ends before its final report (copied while recording, or leaktrace was killed)".into(),
            });
        }
        Ok(Self {
            start,
            ledger,
            timeline,
            stacks,
            snapshot: snapshot.unwrap_or_default(),
            facts,
            build_ids,
            events,
            records: rd.records,
            cut: rd.cut,
            complete,
        })
    }

    /// The report, with its `top` stacks, as the live run made it.
    pub fn report(&self, top: usize) -> crate::report::Report {
        crate::analysis::analyse(
            crate::analysis::Books {
                ledger: &self.ledger,
                timeline: &self.timeline,
                stacks: &self.stacks,
            },
            &self.snapshot,
            &self.facts,
            top,
        )
    }
}

/// Whether a file begins as a capture does.
pub fn is_capture(path: &Path) -> bool {
    let mut magic = [0u8; MAGIC.len()];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| magic.starts_with(b"leaktrace capture "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let p =
            std::env::temp_dir().join(format!("leaktrace-capture-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn ev(i: u64) -> Event {
        Event {
            kind: leaktrace_common::kind::ALLOC,
            tid: 7,
            ts_ns: 1000 + i,
            addr: 0x1000 * i,
            size: i,
            stack_id: i as i64,
            tgid: 7,
            ..Event::default()
        }
    }

    fn read_all(bytes: &[u8]) -> (Vec<Event>, Vec<Record>, Option<String>) {
        read_limited(bytes, MAX_RECORD)
    }

    fn read_limited(bytes: &[u8], max: u64) -> (Vec<Event>, Vec<Record>, Option<String>) {
        let mut r = Reader::new(bytes).expect("magic");
        r.max_record = max;
        let (mut evs, mut recs) = (Vec::new(), Vec::new());
        while let Some(i) = r.next_item() {
            match i {
                Item::Events(e) => evs.extend(e),
                Item::Record(x) => recs.push(x),
            }
        }
        (evs, recs, r.cut)
    }

    #[test]
    fn events_and_records_read_back_in_order_and_a_cut_capture_reads_to_its_last_whole_record() {
        let path = scratch("order");
        let mut w = Recorder::create(&path).expect("create");
        for i in 0..10_000 {
            w.event(&ev(i));
        }
        w.bad_events(3);
        w.event(&ev(10_000));
        w.duty(0.5);
        w.event(&ev(10_001));
        w.finish();
        let bytes = std::fs::read(&path).expect("read");
        let (evs, recs, cut) = read_all(&bytes);
        assert_eq!(evs.len(), 10_002);
        assert_eq!(evs[9_999], ev(9_999));
        assert_eq!(evs[10_001], ev(10_001));
        assert!(matches!(recs[..], [Record::BadEvents(3), Record::Duty(d)] if d == 0.5));
        assert_eq!(cut, None);
        assert_eq!(w.events_total, 10_002);
        // Cut anywhere inside the last record: the records before it all read, and the
        // reader says where it stopped.
        let last_start = bytes.len() - {
            // The last record is the final events record (one event).
            let mut r = Reader::new(&bytes[..]).expect("magic");
            let mut sizes = Vec::new();
            let mut before = bytes.len() - MAGIC.len();
            while r.next_item().is_some() {
                let left = r.input.len();
                sizes.push(before - left);
                before = left;
            }
            *sizes.last().expect("records")
        };
        for cut_at in [last_start + 1, last_start + 9, bytes.len() - 1] {
            let (evs, recs, cut) = read_all(&bytes[..cut_at]);
            assert_eq!(evs.len(), 10_001, "cut at {cut_at}");
            assert_eq!(recs.len(), 2);
            assert!(
                cut.expect("cut")
                    .starts_with("after record 5: the file ends inside")
            );
        }
        // A flipped byte is caught by the checksum.
        let mut bad = bytes.clone();
        bad[last_start + 12] ^= 0x40;
        let (evs, _, cut) = read_all(&bad);
        assert_eq!(evs.len(), 10_001);
        assert!(cut.expect("cut").contains("checksum"));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn other_files_are_refused_in_one_line() {
        assert_eq!(
            Reader::new(&b"{\"pid\": 1}"[..]).err().as_deref(),
            Some("not a leaktrace capture (too short)")
        );
        assert_eq!(
            Reader::new(&b"leaktrace capture v9\n\0\0\0....."[..])
                .err()
                .as_deref(),
            Some("a leaktrace capture of another format version")
        );
    }

    #[test]
    fn a_record_that_inflates_past_the_bound_is_refused() {
        // 4 MiB of zeros deflate to a few KiB: read with a bound of 1 MiB.
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&vec![0u8; 4 << 20]).expect("deflate");
        let packed = z.finish().expect("deflate");
        let mut bytes = MAGIC.to_vec();
        bytes.push(EVENTS);
        bytes.extend_from_slice(&(packed.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&packed).to_le_bytes());
        bytes.extend_from_slice(&packed);
        let (evs, _, cut) = read_limited(&bytes, 1 << 20);
        assert!(evs.is_empty());
        assert!(cut.expect("cut").contains("beyond 1 MiB"));
    }
}
