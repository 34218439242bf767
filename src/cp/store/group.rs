//! What the commands of one group carry through the writer's transaction:
//! the group's time, the rollouts to plan before the commit, and the
//! long-poll board changes to apply after it.

use std::collections::BTreeSet;

use time::OffsetDateTime;

use crate::ids::{Hostname, RolloutId};
use crate::wire::Dispatch;

/// A change to the long-poll board, applied only after the commit.
pub(super) enum BoardChange {
    Offer(Hostname, Dispatch),
    Withdraw(Hostname, RolloutId),
}

/// What the commands of one group leave for the planner (before the
/// commit) and for the board (after it).
pub(super) struct Group {
    /// The CP's time for the whole group (receive times, `issued_at`).
    pub now: OffsetDateTime,
    /// Rollouts the planner looks at before the commit.
    pub dirty: BTreeSet<RolloutId>,
    pub board: Vec<BoardChange>,
}
