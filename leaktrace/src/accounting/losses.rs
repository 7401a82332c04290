//! The loss tally every report shows: kernel counters that mean data was lost,
//! and the engine's own, apart from the counters that are only informative.

use std::collections::BTreeMap;

use leaktrace_common::counter;

use crate::accounting::ledger::UserCounters;

/// Counters split into losses and the rest, by stable name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Losses {
    /// Counters whose nonzero value means events, stacks or calls were lost.
    pub lost: BTreeMap<String, u64>,
    /// The other counters.
    pub counters: BTreeMap<String, u64>,
    /// Sum of `lost`.
    pub total: u64,
}

impl Losses {
    /// Tallies the kernel's counters (indexed by `counter::*`) and the engine's.
    pub fn tally(kernel: &[u64], user: &UserCounters) -> Self {
        let mut lost = std::collections::BTreeMap::new();
        let mut counters = std::collections::BTreeMap::new();
        for (id, name) in counter::NAMES.iter().enumerate() {
            let v = kernel.get(id).copied().unwrap_or(0);
            if counter::is_loss(id as u32) {
                lost.insert((*name).to_owned(), v);
            } else {
                counters.insert((*name).to_owned(), v);
            }
        }
        let UserCounters {
            free_unknown,
            realloc_unknown,
            alloc_over_live,
            failed_allocs,
            bad_events,
            untracked_unmapped_bytes,
            stack_unreadable,
            freed_unseen,
            stacks_aged_out,
        } = *user;
        lost.insert("bad_events".into(), bad_events);
        lost.insert("stack_unreadable".into(), stack_unreadable);
        lost.insert("alloc_over_live".into(), alloc_over_live);
        counters.insert("free_unknown".into(), free_unknown);
        counters.insert("realloc_unknown".into(), realloc_unknown);
        counters.insert("failed_allocs".into(), failed_allocs);
        counters.insert("untracked_unmapped_bytes".into(), untracked_unmapped_bytes);
        counters.insert("freed_unseen".into(), freed_unseen);
        counters.insert("stacks_aged_out".into(), stacks_aged_out);
        let lost_total = lost.values().sum();
        Self {
            lost,
            counters,
            total: lost_total,
        }
    }
}
