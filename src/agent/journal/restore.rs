//! The start-up rebuild of every rollout from the queue, before any worker
//! runs: pending + acked + rejected events, each rollout under the policy of
//! its cached manifest, lost records repaired by `agent::rebuild` or
//! reported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::manifests::{verify_cached, CachedManifestError, ManifestCache};
use crate::agent::admission::{verified_manifest, Refusal};
use crate::agent::channels::{ChannelHistory, ChannelsError};
use crate::agent::rebuild::{history, lost_records, History, Kept, LostRecord, Repair, Verdict};
use crate::agent::rollouts::Rollouts;
use crate::ids::{Hostname, RolloutId};
use crate::machine::{Event, HostState, Policy, ProbeDecl};
use crate::queue::{DeadCause, EntryState, Queue, QueueView, QueuedEvent, ViewError};
use crate::sign::PublicKey;
use crate::wire::{Manifest, OutboundEvent};

/// A replay parameter, never a decision policy: the policy a rollout is
/// rebuilt under when no cached manifest proves its own AND the rollout can
/// never decide again (never accepted, or over; see `restore`). A rollout
/// that can still act is never given it.
pub const FALLBACK_POLICY: Policy =
    Policy { on_health_failure: crate::machine::OnHealthFailure::Halt, sustained_failure_secs: 60 };

/// Why [`restore`] cannot rebuild the agent's state (the agent does not
/// start).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The queue's `dead/` folder cannot be listed or read.
    #[error("cannot read the rejected events of the queue in {}: {source}", state_dir.display())]
    ReadQueue { state_dir: PathBuf, source: ViewError },
    /// The accepted-channels file (no downgrade) cannot be read.
    #[error(transparent)]
    Channels(#[from] ChannelsError),
    /// A rollout that can still decide has no manifest that proves its
    /// policy; guessing one could make the agent act on the wrong policy.
    #[error(
        "rollout {rollout_id} is still under way on this host but its manifest cannot be proven ({why}; file {}): refusing to guess its policy. Restore the trust key that accepted it, or finish the rollout by hand and remove its events from {}",
        file.display(),
        queue_dir.display()
    )]
    Unproven { rollout_id: RolloutId, why: Box<CachedManifestError>, file: PathBuf, queue_dir: PathBuf },
    /// A rollout that may still act on the host (accepted, and no readable
    /// event ends it) lost records that cannot be rebuilt: carrying on
    /// without it would leave the host unsupervised without saying so.
    #[error(
        "rollout {rollout_id} may still be under way on this host, but its history cannot be rebuilt ({why}); the agent does not start rather than leave the host unsupervised: check what the host runs (/run/current-system), finish or roll back the rollout by hand, then move its records out of {}",
        queue_dir.display()
    )]
    Lost { rollout_id: RolloutId, why: String, queue_dir: PathBuf },
    /// A rebuilt record could not be written back to the queue (the CP
    /// would never receive its seq): the agent does not start, and the
    /// next start rebuilds it again.
    #[error("seq {seq} of rollout {rollout_id} was rebuilt but cannot be written back to the queue: {source}")]
    WriteBack { rollout_id: RolloutId, seq: u64, source: crate::queue::QueueError },
}

/// What the start-up rebuild did, for the log and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub restored: Vec<RolloutId>,
    /// Rollouts whose first events were pruned by retention (old, finished
    /// history): known only by their last seq.
    pub pruned: Vec<RolloutId>,
    /// Rebuilt although no cached manifest verifies, because the rollout
    /// can never decide anything again (never accepted, or over): its
    /// policy is a replay parameter only ([`FALLBACK_POLICY`]), with why.
    pub without_manifest: Vec<(RolloutId, String)>,
    /// Rebuilt under the manifest verified when the dispatch was accepted,
    /// whose key this host no longer trusts: (rollout, keyid).
    pub untrusted_key: Vec<(RolloutId, String)>,
    /// Rollouts rebuilt although records of theirs were lost (see
    /// `agent::rebuild`), with what was rebuilt or bridged; logged at ERROR.
    pub rebuilt: Vec<(RolloutId, String)>,
    /// Rebuilt events written back to the queue as pending records under
    /// the rotted record's qseq, so the CP receives them: (rollout, seq).
    pub written_back: Vec<(RolloutId, u64)>,
    /// Rollouts that could not be rebuilt and no longer act on the host (a
    /// corrupt or missing record, a history that does not replay), with the
    /// reason; logged at ERROR and counted as a problem by `nixfleet replay
    /// --state-dir`. A rollout that may still act is a [`RestoreError::Lost`].
    pub skipped: Vec<(RolloutId, String)>,
}

/// Rebuilds every rollout from the queue: pending + acked events, plus
/// events the CP rejected (the agent applied them before sending, so they
/// are part of its history), each rollout under the policy of its cached
/// manifest, re-verified.
///
/// Trust-key rotation (decision): a rollout whose envelope no longer
/// verifies with the current trust keys but does with the key recorded when
/// it was accepted is FINISHED under that manifest, with a WARN naming the
/// rollout and the key. The host already runs its closure; refusing to
/// finish would leave it unsupervised (no gate, no rollback, the CP
/// Soaking forever), and inventing a policy is what made the CP refuse the
/// agent's Failed event. Rotation stops NEW manifests signed by the old key
/// (admission uses the current keys only). A live rollout whose manifest
/// cannot be proven at all (missing, corrupt, or cached without its key by
/// an older agent) is an error that stops the agent, naming the rollout and
/// the file: it cannot be finished without a policy and must not be guessed.
pub fn restore(
    queue: &Queue,
    state_dir: &Path,
    hostname: &Hostname,
    trust_keys: &[PublicKey],
) -> Result<(Rollouts, RestoreReport), RestoreError> {
    let (rollouts, report, write_back) = rebuild_all(queue, &StateDirFiles::new(state_dir), hostname, trust_keys)?;
    for (rollout_id, _, event) in &write_back {
        tracing::error!(%rollout_id, seq = event.seq, "a rebuilt record is not written back (this caller holds the queue read-only); the CP will not receive its seq");
    }
    Ok((rollouts, report))
}

/// [`restore`], and every rebuilt record ([`Repair::Rebuilt`]) is written
/// back to the queue as a pending record under the rotted record's qseq
/// ([`Queue::write_back`]), before any worker runs, so the drainer delivers
/// it in seq order (`docs/decisions.md` 29). A write-back that fails stops
/// the start ([`RestoreError::WriteBack`]); the next start rebuilds again.
/// `health_checks` is the agent's health-checks file (what a lost
/// `ProbeTopologyDeclared` is rebuilt from).
pub fn restore_and_write_back(
    queue: &mut Queue,
    state_dir: &Path,
    health_checks: &Path,
    hostname: &Hostname,
    trust_keys: &[PublicKey],
) -> Result<(Rollouts, RestoreReport), RestoreError> {
    restore_from(queue, &StateDirFiles::new(state_dir).with_health_checks(health_checks), hostname, trust_keys)
}

/// What the restart rebuild reads besides the open queue: the agent's
/// files next to it. [`StateDirFiles`] reads them from the state dir (the
/// daemon); `nixfleet sim` keeps them in memory (one shared copy of each
/// envelope for thousands of simulated hosts). Every decision stays in
/// [`restore_from`].
pub trait RestoreSource {
    /// The events of `dead/` the CP rejected (see [`recorded_events`]).
    fn dead_letters(&self) -> Result<Vec<QueuedEvent>, RestoreError>;
    /// (file name, reason) of the records of `dead/` that are not rejected
    /// events (see [`corrupt_records`]).
    fn corrupt_records(&self) -> Result<Vec<(String, String)>, RestoreError>;
    /// The no-downgrade history (`accepted-channels.json`).
    fn channel_history(&self) -> Result<ChannelHistory, RestoreError>;
    /// The cached envelope of a rollout ([`CachedManifestError::Missing`]:
    /// none cached).
    fn cached_envelope(&self, rollout_id: &RolloutId) -> Result<Arc<[u8]>, CachedManifestError>;
    /// The key recorded when the rollout was accepted (see
    /// [`ManifestCache::accepted_key`]).
    fn accepted_key(&self, rollout_id: &RolloutId) -> Result<Option<PublicKey>, CachedManifestError>;
    /// Where the cached envelope is, for messages.
    fn manifest_path(&self, rollout_id: &RolloutId) -> PathBuf;
    /// The signature check of a cached envelope (default:
    /// [`verified_manifest`]). Seam for `nixfleet sim`, which checks each
    /// (envelope, keys) once for all its hosts.
    fn verify_envelope(&self, trust_keys: &[PublicKey], envelope: &[u8]) -> Result<Arc<Manifest>, Refusal> {
        verified_manifest(trust_keys, envelope).map(Arc::new)
    }
    /// Keeps, durably, what was rebuilt before a write-back removes the
    /// rotted copy from `dead/`, so `nixfleet replay --state-dir` still
    /// reports the loss afterwards (default: nothing to keep).
    fn record_rebuilt(&self, _rebuilt: &[(RolloutId, String)]) -> std::io::Result<()> {
        Ok(())
    }
    /// The probe topology the agent declares for the system it runs now
    /// (`workers::probes::declared_topology` of its health-checks file),
    /// what a lost `ProbeTopologyDeclared` of a soaking rollout declared:
    /// the file follows `/run/current-system` and is part of the immutable
    /// closure. `None` (default): unknown, such a loss stays bridged.
    fn probe_topology(&self) -> Option<Vec<ProbeDecl>> {
        None
    }
}

/// `{state_dir}/rebuilt-records.log`: one line per rebuilt record, written
/// (and fsynced) before the write-back removes the evidence from `dead/`.
pub const REBUILT_LOG: &str = "rebuilt-records.log";

/// The lines of [`REBUILT_LOG`] (none when the file does not exist).
pub fn rebuilt_log(state_dir: &Path) -> std::io::Result<Vec<String>> {
    match std::fs::read_to_string(state_dir.join(REBUILT_LOG)) {
        Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The daemon's [`RestoreSource`]: the files of the state dir.
#[derive(Debug, Clone)]
pub struct StateDirFiles<'a> {
    state_dir: &'a Path,
    cache: ManifestCache,
    health_checks: Option<&'a Path>,
}

impl<'a> StateDirFiles<'a> {
    pub fn new(state_dir: &'a Path) -> StateDirFiles<'a> {
        StateDirFiles { state_dir, cache: ManifestCache::new(state_dir), health_checks: None }
    }

    /// The agent's health-checks file, for [`RestoreSource::probe_topology`].
    pub fn with_health_checks(self, path: &'a Path) -> StateDirFiles<'a> {
        StateDirFiles { health_checks: Some(path), ..self }
    }

    fn read_dead(&self, source: ViewError) -> RestoreError {
        RestoreError::ReadQueue { state_dir: self.state_dir.to_owned(), source }
    }
}

impl RestoreSource for StateDirFiles<'_> {
    fn dead_letters(&self) -> Result<Vec<QueuedEvent>, RestoreError> {
        recorded_events(self.state_dir, &[EntryState::Dead]).map_err(|e| self.read_dead(e))
    }

    fn corrupt_records(&self) -> Result<Vec<(String, String)>, RestoreError> {
        corrupt_records(self.state_dir).map_err(|e| self.read_dead(e))
    }

    fn channel_history(&self) -> Result<ChannelHistory, RestoreError> {
        Ok(ChannelHistory::load(self.state_dir)?)
    }

    fn cached_envelope(&self, rollout_id: &RolloutId) -> Result<Arc<[u8]>, CachedManifestError> {
        let path = self.cache.path(rollout_id);
        let bytes = self
            .cache
            .load(rollout_id)
            .map_err(|source| CachedManifestError::Read { path: path.clone(), source })?
            .ok_or(CachedManifestError::Missing { path })?;
        Ok(Arc::from(bytes))
    }

    fn accepted_key(&self, rollout_id: &RolloutId) -> Result<Option<PublicKey>, CachedManifestError> {
        self.cache.accepted_key(rollout_id)
    }

    fn manifest_path(&self, rollout_id: &RolloutId) -> PathBuf {
        self.cache.path(rollout_id)
    }
    fn probe_topology(&self) -> Option<Vec<ProbeDecl>> {
        self.health_checks.map(crate::agent::workers::probes::declared_topology)
    }

    fn record_rebuilt(&self, rebuilt: &[(RolloutId, String)]) -> std::io::Result<()> {
        use std::io::Write;
        let path = self.state_dir.join(REBUILT_LOG);
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        for (rollout_id, what) in rebuilt {
            writeln!(file, "{rollout_id}: {what}")?;
        }
        file.sync_all()?;
        if let Ok(dir) = std::fs::File::open(self.state_dir) {
            dir.sync_all()?;
        }
        Ok(())
    }
}

/// [`restore_and_write_back`] with the agent's files read through `source`.
pub fn restore_from(
    queue: &mut Queue,
    source: &dyn RestoreSource,
    hostname: &Hostname,
    trust_keys: &[PublicKey],
) -> Result<(Rollouts, RestoreReport), RestoreError> {
    let (rollouts, mut report, write_back) = rebuild_all(queue, source, hostname, trust_keys)?;
    if !write_back.is_empty() {
        source.record_rebuilt(&report.rebuilt).map_err(|io| RestoreError::WriteBack {
            rollout_id: write_back[0].0.clone(),
            seq: write_back[0].2.seq,
            source: crate::queue::QueueError::Io { op: "append", path: REBUILT_LOG.into(), source: io },
        })?;
    }
    for (rollout_id, qseq, event) in write_back {
        match queue.write_back(&rollout_id, qseq, &event) {
            Ok(_) => report.written_back.push((rollout_id, event.seq)),
            Err(source) => return Err(RestoreError::WriteBack { rollout_id, seq: event.seq, source }),
        }
    }
    Ok((rollouts, report))
}

/// A rebuilt event to write back: (rollout, the rotted record's qseq, event).
type WriteBack = (RolloutId, u64, OutboundEvent);

/// The rebuild itself, read-only on the queue.
fn rebuild_all(
    queue: &Queue,
    source: &dyn RestoreSource,
    hostname: &Hostname,
    trust_keys: &[PublicKey],
) -> Result<(Rollouts, RestoreReport, Vec<WriteBack>), RestoreError> {
    let mut journals: BTreeMap<RolloutId, Vec<(u64, OutboundEvent)>> = BTreeMap::new();
    for (rollout_id, _) in queue.rollouts() {
        let events = queue.events_after(&rollout_id, 0).into_iter().map(|q| (q.qseq, q.event));
        journals.entry(rollout_id).or_default().extend(events);
    }
    for q in source.dead_letters()? {
        journals.entry(q.rollout_id).or_default().push((q.qseq, q.event));
    }
    let corrupt = source.corrupt_records()?;
    let topology = if corrupt.is_empty() { None } else { source.probe_topology() };
    let with_pending: std::collections::BTreeSet<RolloutId> =
        queue.pending().into_iter().map(|q| q.rollout_id).collect();
    let mut rebuild = Rebuild {
        source,
        hostname,
        trust_keys,
        queue_dir: queue.dir(),
        rollouts: Rollouts::new(hostname.clone()),
        channels: source.channel_history()?,
        report: RestoreReport::default(),
        write_back: Vec::new(),
    };
    for (rollout_id, events) in journals {
        let lost = lost_records(&corrupt, hostname, &rollout_id);
        let pending = with_pending.contains(&rollout_id);
        let acceptance = rebuild.channels.dispatch_of(&rollout_id).cloned();
        let kept = Kept { acceptance: acceptance.as_ref(), topology: topology.as_deref() };
        match history(&rollout_id, events.clone(), &lost, pending, kept) {
            Verdict::Pruned => rebuild.report.pruned.push(rollout_id),
            Verdict::Lost(why) => rebuild.lost(rollout_id, &events, &lost, why)?,
            Verdict::Complete(history) => rebuild.one(rollout_id, history)?,
        }
    }
    let Rebuild { mut rollouts, channels, report, write_back, .. } = rebuild;
    rollouts.set_channels(channels);
    Ok((rollouts, report, write_back))
}

/// The state of one start-up rebuild, rollout by rollout.
struct Rebuild<'a> {
    source: &'a dyn RestoreSource,
    hostname: &'a Hostname,
    trust_keys: &'a [PublicKey],
    queue_dir: &'a Path,
    rollouts: Rollouts,
    channels: ChannelHistory,
    report: RestoreReport,
    write_back: Vec<WriteBack>,
}

impl Rebuild<'_> {
    /// A rollout whose history is complete (or repaired): its policy from
    /// the cached manifest, then the replay.
    fn one(&mut self, rollout_id: RolloutId, history: History) -> Result<(), RestoreError> {
        let journal = match history.events.iter().map(OutboundEvent::to_local).collect::<Result<Vec<Event>, _>>() {
            Ok(j) => j,
            Err(e) => {
                let why = format!("an event does not convert: {e}");
                tracing::error!(%rollout_id, %why, "rollout NOT rebuilt");
                self.report.skipped.push((rollout_id, why));
                return Ok(());
            }
        };
        let (policy, manifest) = self.policy(&rollout_id, &journal)?;
        let repaired = !history.repairs.is_empty();
        if repaired {
            if let Err(why) = check_rebuilt_ack(&history, manifest.as_deref(), self.hostname) {
                return self.not_rebuilt(rollout_id, &journal, why);
            }
        }
        match self.rollouts.restore_bridged(rollout_id.clone(), policy, &journal, &history.bridged) {
            Ok(()) if repaired => {
                let what: Vec<String> = history.repairs.iter().map(ToString::to_string).collect();
                let what = what.join("; ");
                tracing::error!(%rollout_id, repaired = %what, "part of the rollout's history was lost and is rebuilt; the rollout carries on under supervision");
                for repair in &history.repairs {
                    let Repair::Rebuilt { seq, qseq, .. } = repair else { continue };
                    if let Some(event) = history.events.iter().find(|e| e.seq == *seq) {
                        self.write_back.push((rollout_id.clone(), *qseq, event.clone()));
                    }
                }
                self.report.rebuilt.push((rollout_id.clone(), what));
                self.report.restored.push(rollout_id);
                Ok(())
            }
            Ok(()) => {
                self.report.restored.push(rollout_id);
                Ok(())
            }
            Err(e) => self.not_rebuilt(rollout_id, &journal, format!("its history does not replay: {e}")),
        }
    }

    /// The rollout's policy from its verified cached manifest (and the
    /// manifest), or the replay-only fallback for a rollout that can never
    /// decide again; an unproven live rollout stops the agent.
    fn policy(
        &mut self,
        rollout_id: &RolloutId,
        journal: &[Event],
    ) -> Result<(Policy, Option<Arc<Manifest>>), RestoreError> {
        let source = self.source;
        let cached = source.cached_envelope(rollout_id).and_then(|bytes| {
            let verify = |keys: &[PublicKey], bytes: &[u8]| source.verify_envelope(keys, bytes);
            verify_cached(
                &bytes,
                || source.accepted_key(rollout_id),
                rollout_id,
                self.hostname,
                self.trust_keys,
                &verify,
            )
        });
        match cached {
            Ok((manifest, no_longer_trusted)) => {
                if let Some(keyid) = &no_longer_trusted {
                    tracing::warn!(
                        %rollout_id, %keyid,
                        "the rollout's manifest was verified by key {keyid} when it was accepted; this host no longer trusts that key, and the rollout is finished under that manifest (new manifests need a trusted key)"
                    );
                    self.report.untrusted_key.push((rollout_id.clone(), keyid.clone()));
                }
                let accepted = journal.iter().any(|e| matches!(e.body, crate::machine::EventBody::Activate { .. }));
                if accepted {
                    let offered = crate::agent::channels::Accepted {
                        rollout_id: manifest.rollout_id.clone(),
                        issued_at: manifest.issued_at,
                        dispatch: None,
                    };
                    self.channels = self.channels.with(offered);
                }
                Ok((manifest.machine_policy(), Some(manifest)))
            }
            Err(why) => {
                // Only a rollout that can never decide again may be rebuilt
                // without its policy (the fallback is then a replay
                // parameter, never consulted for a decision).
                let mut probe = Rollouts::new(self.hostname.clone());
                let over = probe.restore(rollout_id.clone(), FALLBACK_POLICY, journal).is_ok()
                    && probe.get(rollout_id).is_some_and(|s| never_decides_again(s, journal));
                if !over {
                    return Err(RestoreError::Unproven {
                        file: source.manifest_path(rollout_id),
                        queue_dir: self.queue_dir.to_owned(),
                        rollout_id: rollout_id.clone(),
                        why: Box::new(why),
                    });
                }
                self.report.without_manifest.push((rollout_id.clone(), why.to_string()));
                Ok((FALLBACK_POLICY, None))
            }
        }
    }

    /// A history that cannot be rebuilt (`why`): a rollout that may still
    /// act on the host stops the agent; one that is over is skipped, loudly.
    fn lost(
        &mut self,
        rollout_id: RolloutId,
        events: &[(u64, OutboundEvent)],
        lost: &[LostRecord],
        why: String,
    ) -> Result<(), RestoreError> {
        let kinds = events.iter().map(|(_, e)| e.kind()).chain(lost.iter().map(|l| l.kind.as_str()));
        let over = events.iter().any(|(_, e)| ends_the_rollout(e));
        let accepted = kinds.into_iter().any(|k| k != "DispatchRejected");
        if accepted && !over {
            return Err(RestoreError::Lost { rollout_id, why, queue_dir: self.queue_dir.to_owned() });
        }
        tracing::error!(%rollout_id, %why, "rollout NOT rebuilt: part of its history is lost (it no longer acts on the host)");
        self.report.skipped.push((rollout_id, why));
        Ok(())
    }

    /// A repaired history that does not hold: as [`Rebuild::lost`].
    fn not_rebuilt(&mut self, rollout_id: RolloutId, journal: &[Event], why: String) -> Result<(), RestoreError> {
        let events: Vec<(u64, OutboundEvent)> =
            journal.iter().map(|e| (0, OutboundEvent::from_machine(e.seq, &e.body))).collect();
        self.lost(rollout_id, &events, &[], why)
    }
}

/// True for an event after which the rollout never acts on the host again
/// (converged, rolled back, a failed rollback, refused, halted).
fn ends_the_rollout(event: &OutboundEvent) -> bool {
    use crate::machine::{EventBody as B, OnHealthFailure, RejectCode};
    match event.to_body() {
        Ok(B::ConvergedReached { .. } | B::RollbackCompleted { .. } | B::RollbackFailed { .. }) => true,
        Ok(B::DispatchRejected { code, .. }) => code != RejectCode::Busy,
        Ok(B::SustainedFailureCrossed { policy_applied, .. }) => policy_applied == OnHealthFailure::Halt,
        _ => false,
    }
}

/// A rebuilt DispatchAck must be the one the verified manifest allows this
/// host: its target and its wave's soak.
fn check_rebuilt_ack(history: &History, manifest: Option<&Manifest>, hostname: &Hostname) -> Result<(), String> {
    use crate::machine::EventBody as B;
    let rebuilt: Vec<u64> = history
        .repairs
        .iter()
        .filter_map(|r| match r {
            Repair::Rebuilt { seq, kind, .. } if kind == "DispatchAck" => Some(*seq),
            _ => None,
        })
        .collect();
    for event in history.events.iter().filter(|e| rebuilt.contains(&e.seq)) {
        let Ok(B::Activate { target_closure, soak_secs, .. }) = event.to_body() else { continue };
        let Some(manifest) = manifest else {
            return Err("its DispatchAck is lost and no verified manifest confirms the kept acceptance".to_owned());
        };
        let entry = manifest.hosts.get(hostname);
        let soak = entry.and_then(|e| manifest.waves.get(e.wave)).map(|w| w.soak_secs);
        if entry.map(|e| &e.target_closure) != Some(&target_closure) || soak != Some(soak_secs) {
            return Err(format!(
                "the acceptance kept in accepted-channels.json ({target_closure}, soak {soak_secs} s) is not what the verified manifest gives this host"
            ));
        }
    }
    Ok(())
}

/// True when no decision of this rollout can follow: never accepted
/// (refused, stale, busy), or ended in a way that does not depend on the
/// policy (converged, reverted, a rollback that failed, halted by a
/// sustained failure whose event names the policy).
fn never_decides_again(slot: &crate::agent::rollouts::Slot, journal: &[Event]) -> bool {
    use crate::machine::{EventBody as B, OnHealthFailure};
    let accepted = journal.iter().any(|e| matches!(e.body, B::Activate { .. }));
    if !accepted {
        return true;
    }
    let r = &slot.record;
    match r.state {
        HostState::Converged | HostState::Reverted => true,
        HostState::Failed => {
            r.rollback_failure.is_some()
                || journal
                    .iter()
                    .any(|e| matches!(e.body, B::SustainedFailureCrossed { policy_applied: OnHealthFailure::Halt, .. }))
        }
        _ => false,
    }
}

/// The events of the given folders of an agent's queue, read lock-free:
/// every record in `pending/` and `acked/`, and in `dead/` only those the
/// CP rejected (an unreadable file is no event). For the restart rebuild
/// (rejected events only; the open queue holds the rest) and `replay`.
pub fn recorded_events(state_dir: &Path, folders: &[EntryState]) -> Result<Vec<QueuedEvent>, ViewError> {
    let view = QueueView::open(state_dir)?;
    let mut out = Vec::new();
    for entry in view.list(folders)? {
        let Ok(inspected) = view.inspect(entry.name()) else { continue };
        let corrupt = inspected.dead_reason.as_ref().is_some_and(|r| r.cause != DeadCause::Rejected);
        let unexplained_dead = entry.folder == EntryState::Dead && inspected.dead_reason.is_none();
        if let (false, false, Ok(record)) = (corrupt, unexplained_dead, inspected.record) {
            out.push(record);
        }
    }
    Ok(out)
}

/// (file name, reason) of every record in `dead/` that is not a rejected
/// event: unreadable at start-up (corrupt) or without its reason.
pub fn corrupt_records(state_dir: &Path) -> Result<Vec<(String, String)>, ViewError> {
    let view = QueueView::open(state_dir)?;
    let mut out = Vec::new();
    for entry in view.list(&[EntryState::Dead])? {
        let rejected =
            view.inspect(entry.name()).ok().and_then(|i| i.dead_reason).is_some_and(|r| r.cause == DeadCause::Rejected);
        if !rejected {
            let reason = entry.reason.clone().unwrap_or_else(|| "no reason recorded".to_owned());
            out.push((entry.name().to_owned(), reason));
        }
    }
    Ok(out)
}
