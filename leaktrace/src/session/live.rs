//! `--live`: a terminal view of the run (ratatui on crossterm), redrawn every second:
//! the verdict, where RSS goes, and the stacks, fastest-growing first. Keys: ↑/↓ (or
//! k/j) select a stack, Enter expands it, `s` sorts by growth or by live bytes, `q`
//! (or Esc, Ctrl-C) quits: the probes are detached and the final report printed as
//! usual, once the terminal is given back.
//!
//! The books are read every second; the worker's snapshot (where RSS goes, the heap
//! walks) every [`SNAPSHOT_EVERY`], the last one standing in between.

use std::{io::Stdout, time::Duration};

use ratatui::{
    Terminal,
    backend::CrosstermBackend,
    crossterm::{
        event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
        execute,
        terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
    },
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Paragraph, Row, Table, TableState, Wrap},
};
use tokio::sync::mpsc;

use crate::{error::Error, report::Report, symbolize::stacks::FrameKind, units::bytes};

/// How often the live view asks the worker for a new snapshot.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(5);
/// How often it is redrawn from the books.
pub const REDRAW_EVERY: Duration = Duration::from_secs(1);
/// Stacks the view lists (the report is built with this many).
pub const STACKS: usize = 50;

/// A key the view acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// Select the stack above.
    Up,
    /// Select the stack below.
    Down,
    /// Expand or fold the selected stack.
    Expand,
    /// Sort by growth, or by live bytes.
    Sort,
    /// Quit.
    Quit,
    /// The terminal was resized.
    Resize,
}

/// How the stacks are sorted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sort {
    Growth,
    Live,
}

/// The view: the terminal, the keys read on a thread of their own, and what is shown.
pub struct Live {
    terminal: Terminal<CrosstermBackend<Stdout>>,
    sort: Sort,
    table: TableState,
    expanded: bool,
    last: Option<Report>,
    /// When the snapshot behind "where RSS goes" was read, seconds before the report.
    snap_age_s: Option<f64>,
}

impl Live {
    /// Takes the terminal (raw mode, the alternate screen); returns the view and the
    /// keys, read by a thread of their own (it ends once the receiver is dropped).
    pub fn start() -> Result<(Self, mpsc::UnboundedReceiver<Key>), Error> {
        use std::io::IsTerminal as _;
        if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
            return Err(Error::Live(
                "it needs a terminal on stdin and stdout".into(),
            ));
        }
        enable_raw_mode().map_err(|e| Error::Live(e.to_string()))?;
        let mut out = std::io::stdout();
        if let Err(e) = execute!(out, EnterAlternateScreen) {
            let _ = disable_raw_mode();
            return Err(Error::Live(e.to_string()));
        }
        let terminal = match Terminal::new(CrosstermBackend::new(out)) {
            Ok(t) => t,
            Err(e) => {
                restore();
                return Err(Error::Live(e.to_string()));
            }
        };
        let (tx, keys) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("leaktrace-keys".into())
            .spawn(move || read_keys(&tx))
            .map_err(|e| Error::Live(e.to_string()))?;
        let mut table = TableState::default();
        table.select(Some(0));
        Ok((
            Self {
                terminal,
                sort: Sort::Growth,
                table,
                expanded: false,
                last: None,
                snap_age_s: None,
            },
            keys,
        ))
    }

    /// Acts on a key; returns whether to quit.
    pub fn key(&mut self, k: Key) -> bool {
        let n = self.last.as_ref().map_or(0, |r| shown(r).len());
        let at = self.table.selected().unwrap_or(0);
        match k {
            Key::Quit => return true,
            Key::Up => self.table.select(Some(at.saturating_sub(1))),
            Key::Down => self.table.select(Some((at + 1).min(n.saturating_sub(1)))),
            Key::Expand => self.expanded = !self.expanded,
            Key::Sort => {
                self.sort = match self.sort {
                    Sort::Growth => Sort::Live,
                    Sort::Live => Sort::Growth,
                };
            }
            Key::Resize => {
                let _ = self.terminal.clear();
            }
        }
        self.redraw();
        false
    }

    /// Shows a new report; its snapshot was read `snap_age_s` before (None: none yet).
    pub fn show(&mut self, r: Report, snap_age_s: Option<f64>) {
        self.last = Some(r);
        self.snap_age_s = snap_age_s;
        self.redraw();
    }

    /// Repaints the whole screen (a stray line on stderr is painted over).
    pub fn repaint(&mut self) {
        let _ = self.terminal.clear();
        self.redraw();
    }

    fn redraw(&mut self) {
        let Some(r) = self.last.as_ref() else {
            return;
        };
        let sort = self.sort;
        let expanded = self.expanded;
        let age = self.snap_age_s;
        let table = &mut self.table;
        let _ = self
            .terminal
            .draw(|f| draw(f, r, sort, expanded, age, table));
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let _ = self.terminal.show_cursor();
        restore();
    }
}

/// Leaves the alternate screen and raw mode.
fn restore() {
    let _ = execute!(std::io::stdout(), LeaveAlternateScreen);
    let _ = disable_raw_mode();
}

/// Reads keys until the view is gone.
fn read_keys(tx: &mpsc::UnboundedSender<Key>) {
    loop {
        if tx.is_closed() {
            return;
        }
        match event::poll(Duration::from_millis(100)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => return,
        }
        let key = match event::read() {
            Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => match k.code {
                KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Key::Quit,
                KeyCode::Char('q') | KeyCode::Esc => Key::Quit,
                KeyCode::Up | KeyCode::Char('k') => Key::Up,
                KeyCode::Down | KeyCode::Char('j') => Key::Down,
                KeyCode::Enter | KeyCode::Char(' ') => Key::Expand,
                KeyCode::Char('s') => Key::Sort,
                _ => continue,
            },
            Ok(Event::Resize(..)) => Key::Resize,
            Ok(_) => continue,
            Err(_) => return,
        };
        if tx.send(key).is_err() {
            return;
        }
    }
}

/// The stacks with live bytes, in the order the view shows them.
fn shown(r: &Report) -> Vec<&crate::report::HeapStack> {
    let mut v: Vec<_> = r.heap.stacks.iter().filter(|s| s.live_bytes > 0).collect();
    v.sort_by(|a, b| {
        let g = |s: &crate::report::HeapStack| s.growth.as_ref().map_or(0.0, |g| g.bytes_per_s);
        g(b).total_cmp(&g(a)).then(b.live_bytes.cmp(&a.live_bytes))
    });
    v
}

/// A frame's name as the view prints it.
fn frame_name(f: &crate::symbolize::stacks::Frame) -> String {
    let name = f.function.as_deref().unwrap_or(&f.address);
    let mut s = crate::units::printable(name);
    if let (Some(file), Some(line)) = (&f.file, f.line) {
        let file = file.rsplit('/').next().unwrap_or(file);
        s.push_str(&format!(" ({}:{line})", crate::units::printable(file)));
    }
    s
}

fn draw(
    f: &mut ratatui::Frame<'_>,
    r: &Report,
    sort: Sort,
    expanded: bool,
    snap_age_s: Option<f64>,
    table: &mut TableState,
) {
    let mut stacks = shown(r);
    if sort == Sort::Live {
        stacks.sort_by_key(|s| std::cmp::Reverse(s.live_bytes));
    }
    let parts = &r.memory.parts;
    let mut kinds: Vec<(&str, u64)> = Vec::new();
    for p in parts {
        match kinds.iter_mut().find(|(k, _)| *k == p.kind.as_str()) {
            Some(k) => k.1 += p.bytes,
            None => kinds.push((p.kind.as_str(), p.bytes)),
        }
    }
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    let detail = if expanded { 12 } else { 0 };
    let rows = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(kinds.len().min(8) as u16 + 2),
        Constraint::Min(5),
        Constraint::Length(detail),
        Constraint::Length(1),
    ])
    .split(f.area());

    let lost: u64 = r.lost_total;
    let head = vec![
        Line::from(vec![
            Span::styled(
                format!("leaktrace — pid {}", r.pid),
                Style::default().add_modifier(Modifier::BOLD),
            ),
            Span::raw(format!(
                "   traced {:.0} s   RSS {}   live heap {} in {} blocks   lost events {lost}",
                r.duration_s,
                bytes(r.rss.rss_bytes),
                bytes(r.heap.live_bytes),
                r.heap.live_allocations
            )),
        ]),
        Line::from(vec![
            Span::styled(
                format!("VERDICT: {}", r.verdict.kind.as_str().to_uppercase()),
                Style::default().add_modifier(Modifier::BOLD | Modifier::REVERSED),
            ),
            Span::raw(format!("  {}", r.verdict.summary)),
        ]),
    ];
    f.render_widget(Paragraph::new(head).wrap(Wrap { trim: true }), rows[0]);

    let total = r.memory.rss_bytes.max(1);
    let mem_rows: Vec<Row<'_>> = kinds
        .iter()
        .take(8)
        .map(|(k, b)| {
            let share = *b as f64 / total as f64;
            Row::new(vec![
                (*k).to_owned(),
                bytes(*b),
                format!("{:5.1}%", share * 100.0),
                "█".repeat((share * 40.0).round() as usize),
            ])
        })
        .collect();
    f.render_widget(
        Table::new(
            mem_rows,
            [
                Constraint::Length(18),
                Constraint::Length(11),
                Constraint::Length(7),
                Constraint::Min(10),
            ],
        )
        .block(Block::bordered().title(match snap_age_s {
            Some(age) => format!(
                " Where RSS goes ({} when read, {age:.0} s ago) ",
                bytes(r.memory.rss_bytes)
            ),
            None => " Where RSS goes (not read yet) ".to_owned(),
        })),
        rows[1],
    );

    let stack_rows: Vec<Row<'_>> = stacks
        .iter()
        .map(|s| {
            let growth = s.growth.as_ref().map_or(0.0, |g| g.bytes_per_s);
            // A Python stack by its Python frames (after the allocating frame): the
            // interpreter's own frames between them say little.
            let python = s.frames.iter().any(|f| f.kind == FrameKind::Python);
            let top = s
                .frames
                .iter()
                .enumerate()
                .filter(|(i, f)| !python || *i == 0 || f.kind == FrameKind::Python)
                .take(5)
                .map(|(_, f)| frame_name(f))
                .collect::<Vec<_>>()
                .join(" ← ");
            Row::new(vec![
                bytes(s.live_bytes),
                format!("{}/s", crate::units::signed_bytes(growth)),
                s.live_allocations.to_string(),
                top,
            ])
        })
        .collect();
    let title = match sort {
        Sort::Growth => " Heap stacks, fastest-growing first (s: by live bytes) ",
        Sort::Live => " Heap stacks, most live bytes first (s: by growth) ",
    };
    // The table drops the selection while it has no rows: the first stack is
    // selected again once there is one.
    match table.selected() {
        None if !stacks.is_empty() => table.select(Some(0)),
        Some(i) if i >= stacks.len() => table.select(Some(stacks.len().saturating_sub(1))),
        _ => {}
    }
    f.render_stateful_widget(
        Table::new(
            stack_rows,
            [
                Constraint::Length(11),
                Constraint::Length(13),
                Constraint::Length(9),
                Constraint::Min(20),
            ],
        )
        .header(
            Row::new(vec!["live", "growth", "blocks", "stack (innermost first)"])
                .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
        .block(Block::bordered().title(title)),
        rows[2],
        table,
    );

    if expanded && let Some(s) = table.selected().and_then(|i| stacks.get(i)) {
        let lines: Vec<Line<'_>> = s
            .frames
            .iter()
            .map(|fr| {
                Line::from(format!(
                    "  {}{}",
                    frame_name(fr),
                    fr.module
                        .as_deref()
                        .map(|m| format!(
                            "  in {}",
                            crate::units::printable(m.rsplit('/').next().unwrap_or(m))
                        ))
                        .unwrap_or_default()
                ))
            })
            .collect();
        f.render_widget(
            Paragraph::new(lines).block(Block::bordered().title(format!(
                " Stack: {} live in {} blocks ",
                bytes(s.live_bytes),
                s.live_allocations
            ))),
            rows[3],
        );
    }
    f.render_widget(
        Paragraph::new(
            "↑↓ select   ⏎ expand   s sort   q quit (detaches, prints the final report)",
        ),
        rows[4],
    );
}
