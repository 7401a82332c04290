//! The books kept from the event stream: live heap blocks and the address space
//! ([`ledger`], over the interval map of [`intervals`]), and their totals over
//! time ([`timeline`]).

pub mod intervals;
pub mod ledger;
pub mod losses;
pub mod timeline;
