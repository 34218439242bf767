//! The reducer's side of the write-ahead journal: the trait the agent's
//! queue (`agent::journal::SharedQueue`) and the simulator implement, and
//! which events may wait when it is full.

use crate::agent::channels::ChannelHistory;
use crate::ids::RolloutId;
use crate::machine::EventBody;
use crate::wire::OutboundEvent;

/// Why an append did not make the event durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// The queue holds as many pending events as it takes for this kind
    /// (`queue::QueueError::Full`): nothing was written. For a visibility
    /// event the reducer drops the attempt and tries again with the next
    /// observation; a decisive event is retried until it fits (the queue
    /// keeps a reserve for decisive events past its soft cap).
    #[error("{0}")]
    Full(String),
    /// Anything else (disk full, I/O error): retried with backoff.
    #[error("{0}")]
    Failed(String),
}

impl From<String> for JournalError {
    fn from(message: String) -> JournalError {
        JournalError::Failed(message)
    }
}

/// Where the reducer makes an event durable. The agent's queue implements
/// it (its fsyncs run on the blocking pool, off the reactor); tests use an
/// in-memory journal that can be told to fail.
pub trait Journal: Send + std::fmt::Debug + 'static {
    /// Resolves only once the event is durable.
    fn append(
        &mut self,
        rollout_id: &RolloutId,
        event: &OutboundEvent,
    ) -> impl std::future::Future<Output = Result<(), JournalError>> + Send;

    /// Makes the no-downgrade history durable (before the DispatchAck that
    /// accepts a rollout). Default: [`ChannelHistory::save`] on the
    /// blocking pool, the daemon's file. Seam for `nixfleet sim`, whose
    /// agents keep the history in memory and have no blocking pool.
    fn save_channels(
        &mut self,
        channels: &ChannelHistory,
    ) -> impl std::future::Future<Output = Result<std::io::Result<()>, tokio::task::JoinError>> + Send {
        let copy = channels.clone();
        tokio::task::spawn_blocking(move || copy.save())
    }
}

/// Events that only make the host visible, never decide anything: under a
/// full queue they are not retried in a loop (that would block every
/// decision behind them) but attempted again later. The same list is the
/// queue's "not decisive" set for its reserve.
pub(crate) fn deferrable(body: &EventBody) -> bool {
    matches!(
        body,
        EventBody::ProbeResult { .. }
            | EventBody::ProbeObservedFirst { .. }
            | EventBody::ActivationStarted { .. }
            | EventBody::ProbeTopologyDeclared { .. }
    )
}
