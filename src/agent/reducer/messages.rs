//! What goes in and out of the reducer: the workers' [`Input`]s, and the
//! commands it issues on `watch` channels and a `Notify` (none can block it).

use std::sync::Arc;

use tokio::sync::{watch, Notify};

use crate::agent::activation::ActivationOutcome;
use crate::ids::{Closure, RolloutId};
use crate::machine::{Policy, ProbeDecl, ProbeMode, ProbeStatus, Timestamp};

/// What the workers tell the reducer.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A dispatch whose manifest verified against the agent's trust keys
    /// and whose target matches the manifest. `current_closure` is what
    /// `current-system` resolved to when it was accepted; `issued_at` is the
    /// verified manifest's (no downgrade, clock-skew bound). The reducer
    /// still decides: accept, or refuse `busy` / `stale` / future-dated.
    Dispatch {
        rollout_id: RolloutId,
        policy: Policy,
        target_closure: Closure,
        soak_secs: u64,
        current_closure: Closure,
        issued_at: Timestamp,
        at: Timestamp,
    },
    /// A dispatch the agent refuses (signature, mismatch, quarantine).
    RefuseDispatch {
        rollout_id: RolloutId,
        policy: Policy,
        target_closure: Closure,
        reason: String,
        at: Timestamp,
    },
    ActivationStarted {
        rollout_id: RolloutId,
        switch_method: String,
        at: Timestamp,
    },
    ActivationFinished {
        rollout_id: RolloutId,
        order: ActivationOrder,
        outcome: ActivationOutcome,
        at: Timestamp,
    },
    ProbeTopology {
        rollout_id: RolloutId,
        probes: Vec<ProbeDecl>,
        at: Timestamp,
    },
    ProbeRun {
        rollout_id: RolloutId,
        probe_name: String,
        mode: ProbeMode,
        status: ProbeStatus,
        reason: Option<String>,
        at: Timestamp,
    },
    Tick {
        now: Timestamp,
    },
}

/// The one activation (forward or rollback) the activation worker should
/// run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationOrder {
    pub rollout_id: RolloutId,
    pub closure: Closure,
    pub rollback: bool,
    /// Increases with every order (and probe plan), so a worker can tell a
    /// new order from a repeated one. Not a NixOS profile generation.
    pub number: u64,
    /// `Some(failed)`: not an activation. After a forward activation failed
    /// under `halt`, make `closure` (the pre-dispatch closure) the boot
    /// default again, while the profile still names `failed`; no live
    /// switch and no event (`activation::restore_boot_default`).
    pub restore_boot_from: Option<Closure>,
}

/// Which rollout's probes should run (the newly active system's).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbePlan {
    pub rollout_id: Option<RolloutId>,
    /// From the same counter as [`ActivationOrder::number`].
    pub number: u64,
}

/// The command side of the reducer; none of these can block it.
#[derive(Debug, Clone)]
pub struct Commands {
    pub activation: watch::Sender<Option<ActivationOrder>>,
    pub probes: watch::Sender<ProbePlan>,
    pub drain: Arc<Notify>,
}

/// The receiving ends, handed to the workers.
#[derive(Debug)]
pub struct CommandReceivers {
    pub activation: watch::Receiver<Option<ActivationOrder>>,
    pub probes: watch::Receiver<ProbePlan>,
    pub drain: Arc<Notify>,
}

pub fn commands() -> (Commands, CommandReceivers) {
    let (activation_tx, activation_rx) = watch::channel(None);
    let (probes_tx, probes_rx) = watch::channel(ProbePlan::default());
    let drain = Arc::new(Notify::new());
    (
        Commands { activation: activation_tx, probes: probes_tx, drain: drain.clone() },
        CommandReceivers { activation: activation_rx, probes: probes_rx, drain },
    )
}
