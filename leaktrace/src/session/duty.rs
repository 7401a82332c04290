//! Sampled mode's duty cycle: when attaching the heap probes all the time would cost
//! the target more than its budget, they are attached only for windows.
//!
//! Every probed call traps into the kernel, sampled or not, so sampling alone cannot
//! bring the cost below the trap floor (on a busy redis, count-only probes already
//! halve its throughput). Outside a window there is no probe, so no trap at all.
//!
//! Time is cut into periods; each period into `k` slots of equal length, one of which,
//! drawn at random, is the window. Every moment is thus inside a window with
//! probability exactly 1/k, whatever the workload's own rhythm, and an allocation
//! recorded in a window stands for k of them (the ledger weighs each block by the duty
//! in effect when it was made). `k` is chosen at the end of each window from the cost
//! the probes were measured to have while attached (relative to the target's CPU time,
//! or to one core if it used less): the smallest that keeps the average within the
//! budget, at most [`MAX_SLOTS`]. A period lasts [`PERIOD`], or
//! longer where `k` needs windows shorter than [`MIN_WINDOW`]. A target cheap enough to
//! trace all the time gets `k = 1`: probes always attached, exact as without the duty
//! cycle.
//!
//! Frees made while the probes are detached are not seen; a block recorded in a window
//! stays live until its free falls in a window, its address is handed out again in a
//! window (the kernel checks every allocation against the sampled blocks), or the
//! memory under it is unmapped.

use std::time::Duration;

use tokio::time::Instant;

/// Length of a period, at least.
pub const PERIOD: Duration = Duration::from_secs(1);
/// The first window, attached from the start, which measures the cost.
pub const FIRST_WINDOW: Duration = Duration::from_millis(50);
/// Windows are at least this long (attaching the probes takes about a millisecond):
/// slots per period of [`PERIOD`] at most 50; beyond, periods get longer.
pub const MIN_WINDOW: Duration = Duration::from_millis(20);
/// While the probes are attached all the time (one slot), how often their cost is
/// measured again.
pub const RECHECK: Duration = Duration::from_millis(100);
/// Slots per period at most: a duty of 0.2%.
pub const MAX_SLOTS: u32 = 500;

/// Where the cycle stands.
#[derive(Debug)]
pub struct DutyCycle {
    /// Cost budget, percent of the target's own CPU time.
    pub budget_pct: f64,
    /// Slots in the current period (the duty is 1/slots).
    pub slots: u32,
    /// Whether the probes are attached.
    pub on: bool,
    /// Window number (the kernel's entries of earlier windows are not in flight).
    pub window: u32,
    /// When the current period started.
    period_start: Instant,
    /// When the probes are next attached or detached.
    pub next: Instant,
    rng: u64,
    /// Time attached so far, and windows so far.
    pub attached: Duration,
    /// Windows opened so far (the first included).
    pub windows: u64,
    /// When the current window opened.
    opened: Instant,
    /// The last cost measured while attached, percent of the target's own CPU time.
    pub cost_on_pct: Option<f64>,
    /// Whether the free-like probes come and go with the windows (decided at the end of
    /// each window until they do: they stay attached while they alone cost at most half
    /// the budget).
    pub frees_windowed: Option<bool>,
}

impl DutyCycle {
    /// A cycle whose first window opens at `now` (the probes are attached).
    pub fn new(budget_pct: f64, now: Instant) -> Self {
        // Seeded from the clock: windows must not follow any rhythm of the target's.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9E37_79B9, |d| d.as_nanos() as u64)
            | 1;
        Self {
            budget_pct,
            slots: 1,
            on: true,
            window: 0,
            period_start: now,
            next: now + FIRST_WINDOW,
            rng: seed,
            attached: Duration::ZERO,
            windows: 1,
            opened: now,
            cost_on_pct: None,
            frees_windowed: None,
        }
    }

    /// Time attached so far, the open window counting up to `now`.
    pub fn attached_until(&self, now: Instant) -> Duration {
        if self.on {
            self.attached + now.saturating_duration_since(self.opened)
        } else {
            self.attached
        }
    }

    /// The share of the time the probes are attached now.
    pub fn duty(&self) -> f64 {
        1.0 / f64::from(self.slots)
    }

    /// The current period's length: [`PERIOD`], or `slots` windows of [`MIN_WINDOW`].
    pub fn period(&self) -> Duration {
        PERIOD.max(MIN_WINDOW * self.slots)
    }

    /// Slots per period that keep `cost_on_pct` (the probes' cost while attached)
    /// within the budget on average.
    pub fn slots_for(&self, cost_on_pct: f64) -> u32 {
        if cost_on_pct <= self.budget_pct || !cost_on_pct.is_finite() {
            return 1;
        }
        ((cost_on_pct / self.budget_pct).ceil() as u32).clamp(1, MAX_SLOTS)
    }

    fn random_slot(&mut self) -> u32 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as u32 % self.slots
    }

    /// Whether the free-like probes come and go with the windows from now on, from their
    /// share `frees_pct` of the target's own CPU time: they stay attached while they cost
    /// at most half the budget, and once windowed they stay so. Returns the decision.
    pub fn decide_frees(&mut self, frees_pct: f64) -> bool {
        let windowed = self.frees_windowed == Some(true) || frees_pct > self.budget_pct / 2.0;
        self.frees_windowed = Some(windowed);
        windowed
    }

    /// The window ends at `now` with the probes' cost while attached measured: returns
    /// whether they stay attached (one slot per period: always on). Otherwise they are
    /// to be detached, and `next` is when they come back.
    pub fn close(&mut self, now: Instant, cost_on_pct: Option<f64>) -> bool {
        self.attached += now.saturating_duration_since(self.opened);
        if let Some(c) = cost_on_pct {
            self.cost_on_pct = Some(c);
            self.slots = self.slots_for(c);
        }
        // The period this window belonged to is over once its slot is: the next one
        // starts where it ends (the first window is a period of its own).
        let period = self.period();
        let slot_len = period / self.slots;
        if self.slots == 1 {
            // Attached all the time, and measured again soon: a target idle at attach may
            // get busy, and each [`RECHECK`] at full cost is what that would cost.
            self.period_start = now;
            self.next = now + RECHECK;
            self.opened = now;
            return true;
        }
        self.period_start = self.period_start.max(now);
        let j = self.random_slot();
        let mut start = self.period_start + slot_len * j;
        if start < now {
            start = now;
        }
        self.on = false;
        self.next = start;
        self.period_start += period;
        false
    }

    /// The probes are attached at `now` for the window.
    pub fn open(&mut self, now: Instant) {
        self.on = true;
        self.window = self.window.wrapping_add(1);
        self.windows += 1;
        self.opened = now;
        self.next = now + self.period() / self.slots;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget sets the slots: a cost within budget keeps the probes attached, one
    /// 40× over it cuts the period in 40, and no period is cut finer than the floor.
    #[test]
    fn slots_follow_the_cost() {
        let d = DutyCycle::new(3.0, Instant::now());
        for (cost, want) in [(1.0, 1), (3.0, 1), (3.1, 2), (120.0, 40), (1e6, MAX_SLOTS)] {
            assert_eq!(d.slots_for(cost), want, "cost {cost}%");
        }
        // 40 slots fit a second; 300 need periods of 6 s, of 20 ms windows.
        let mut d = d;
        d.slots = 40;
        assert_eq!(d.period(), PERIOD);
        d.slots = 300;
        assert_eq!(
            (d.period(), d.period() / d.slots),
            (Duration::from_secs(6), MIN_WINDOW)
        );
    }

    /// Over many periods each window lies in its period and lasts 1/k of it, and the
    /// slots drawn are spread over all k.
    #[test]
    fn windows_are_one_random_slot_per_period() {
        let t0 = Instant::now();
        let mut d = DutyCycle::new(3.0, t0);
        let mut now = d.next;
        assert!(!d.close(now, Some(30.0)), "10 slots: detached");
        assert_eq!(d.slots, 10);
        let mut seen = [0u32; 10];
        for _ in 0..400 {
            let period_start = d.period_start - PERIOD;
            assert!(d.next >= period_start && d.next < period_start + PERIOD);
            let slot = (d.next - period_start).as_nanos() / (PERIOD / 10).as_nanos();
            seen[slot as usize] += 1;
            now = d.next;
            d.open(now);
            assert_eq!(d.next - now, PERIOD / 10);
            now = d.next;
            assert!(!d.close(now, Some(30.0)));
        }
        assert!(seen.iter().all(|&n| n > 15), "{seen:?}");
        assert_eq!(d.windows, 401);
    }
}
