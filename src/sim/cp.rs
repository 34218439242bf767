//! The simulated control plane process: the REAL `cp::store::Writer` on a
//! real SQLite file, driven one group at a time (the real writer thread
//! takes whatever commands are waiting; the sim groups every request that
//! reached the CP by the same simulated instant). The real long-poll
//! `Board` holds standing dispatches; only the parking of requests is
//! modelled here, because the real `Board::poll` waits on tokio timers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::clock::ClockHandle;
use crate::cp::longpoll::Board;
use crate::cp::store::Counters;
use crate::cp::store::{self, ActionOutcome, Command, CpState, OperatorRequest, PublishOutcome, Writer};
use crate::ids::{Hostname, RolloutId};
use crate::sign::{self, PublicKey};
use crate::sim::check::Violation;
use crate::wire::{BatchItem, Dispatch, EventResult, Heartbeat, Manifest};

/// Events of a (host, rollout) between two record checkpoints in the
/// simulated CP: far below the daemon's 10,000, so the probe events of
/// simulated soaks are compacted under every fault (crashes, database loss)
/// while the invariants (agreement, replay, acked-not-lost) are checked.
const SIM_CHECKPOINT_EVENTS: u64 = 4;

/// What a group's commands answered.
#[derive(Debug)]
pub enum Answer {
    Events(Vec<EventResult>),
    Heartbeat(BTreeMap<RolloutId, u64>),
    Published(PublishOutcome),
    /// An operator action's answer: the stored row, or the refusal.
    Action(ActionOutcome),
    /// The commit failed (503): the caller retries.
    Unavailable,
}

/// One request waiting for the writer.
#[derive(Debug)]
pub enum Work {
    Ingest(Hostname, Vec<BatchItem>),
    Heartbeat(Box<Heartbeat>),
    Publish(Vec<u8>),
    /// `cp resume` / `cp cancel`, as `POST /v1/rollouts/{id}/{action}`
    /// hands them to the writer.
    Operator(OperatorRequest),
    Tick,
}

enum Reply {
    Events(oneshot::Receiver<store::Reply<Vec<EventResult>>>),
    Heartbeat(oneshot::Receiver<store::Reply<Option<BTreeMap<RolloutId, u64>>>>),
    Publish(oneshot::Receiver<store::Reply<PublishOutcome>>),
    Action(oneshot::Receiver<store::Reply<ActionOutcome>>),
    Refused,
    None,
}

/// An envelope as `GET /v1/rollouts/{id}/manifest` serves it, shared by
/// every simulated agent that fetched it (a 10,000-host envelope is about
/// 1.2 MB: one copy per rollout, not per host), with its SHA-256 so the
/// sim's shared signature check can be keyed without comparing megabytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedEnvelope {
    pub bytes: Arc<[u8]>,
    pub digest: [u8; 32],
}

#[derive(Debug)]
pub struct SimCp {
    pub db: PathBuf,
    clock: ClockHandle,
    writer: Option<Writer>,
    board: Arc<Board>,
    reader: Option<rusqlite::Connection>,
    /// Envelopes read from the database (the real read, once per rollout
    /// per process; a publish, crash or database loss empties it).
    envelopes: BTreeMap<RolloutId, Option<SharedEnvelope>>,
    pub trust_keys: Vec<PublicKey>,
    commit_error: Option<String>,
}

impl SimCp {
    pub fn new(dir: &Path, clock: ClockHandle, trust_keys: Vec<PublicKey>) -> SimCp {
        SimCp {
            db: dir.join("cp.db"),
            clock,
            writer: None,
            board: Arc::new(Board::default()),
            reader: None,
            envelopes: BTreeMap::new(),
            trust_keys,
            commit_error: None,
        }
    }

    pub fn is_up(&self) -> bool {
        self.writer.is_some()
    }

    /// Starts (or restarts) the process: the writer reopens the database
    /// and loads its state exactly as `cp serve` does at start.
    pub fn start(&mut self) -> Result<(), String> {
        self.board = Arc::new(Board::default());
        self.board.log_wakes();
        let mut writer = Writer::open(&self.db, self.clock.clone(), self.board.clone(), Arc::new(Counters::default()))
            .map_err(|e| e.to_string())?;
        writer.set_checkpoint_bound(SIM_CHECKPOINT_EVENTS);
        // Each group's COMMIT runs on the machine's other core; every later
        // use of the database waits for it (`settle`).
        writer.commit_on_another_thread().map_err(|e| e.to_string())?;
        self.writer = Some(writer);
        self.reader = Some(store::open_reader(&self.db).map_err(|e| e.to_string())?);
        // The real writer plans once at start, before any request is
        // parked: nobody is woken.
        self.run(vec![Work::Tick]);
        drop(self.board.take_woken());
        Ok(())
    }

    /// Waits for the last group's commit (the writer commits on another
    /// thread; see `Writer::commit_on_another_thread`): before the next
    /// group, before the database is read, and before the process dies,
    /// since in the real writer the commit came before the answers. A
    /// commit that failed after its group was answered leaves memory and
    /// the long-poll board ahead of the database, which the daemon's
    /// writer never allows: the process is stopped (as by a crash), and
    /// the error kept for `check_committed` (the sim's `cp-commit`).
    pub fn settle(&mut self) {
        let Some(w) = self.writer.as_mut() else { return };
        if let Err(e) = w.join_commit() {
            self.commit_error.get_or_insert(e.to_string());
            self.writer = None;
            self.reader = None;
            self.envelopes.clear();
        }
    }

    /// The next commit fails (`Writer::fail_next_commit`).
    #[cfg(test)]
    pub fn fail_next_commit(&mut self) {
        if let Some(w) = self.writer.as_mut() {
            w.fail_next_commit();
        }
    }

    /// `cp-commit`: no commit failed after its group was answered (each
    /// failure is reported once).
    pub fn check_committed(&mut self) -> Result<(), Violation> {
        match self.commit_error.take() {
            Some(e) => Err(Violation::new("cp-commit", format!("a commit failed after its group was answered: {e}"))),
            None => Ok(()),
        }
    }

    /// `kill -9`: nothing uncommitted survives; parked requests are cut.
    pub fn crash(&mut self) {
        self.settle();
        self.writer = None;
        self.reader = None;
        self.envelopes.clear();
    }

    /// The run is over: the writer and the reader close the database.
    pub fn close(&mut self) {
        self.crash();
    }

    /// The database file and its WAL are gone (disk replaced, no backup).
    pub fn lose_database(&mut self) {
        self.crash();
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.db.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
    }

    pub fn state(&self) -> Option<&CpState> {
        self.writer.as_ref().map(Writer::state)
    }

    /// Per rollout, the hosts the writer changed since the last call
    /// (`None`: not known, look at every host).
    pub fn take_touched(&mut self) -> BTreeMap<RolloutId, Option<Vec<Hostname>>> {
        self.writer.as_mut().map(Writer::take_touched).unwrap_or_default()
    }

    /// The hosts the last groups' offers woke (the board's `Notify`).
    pub fn take_woken(&self) -> Vec<Hostname> {
        self.board.take_woken()
    }

    pub fn dispatch_for(&self, host: &Hostname) -> Option<Dispatch> {
        self.writer.as_ref()?;
        self.board.current(host)
    }

    /// `store::envelope`, the read the manifest endpoint makes; the bytes
    /// are kept per rollout (they never change for a rollout id while its
    /// row exists) so a fleet of fetches shares one copy.
    pub fn envelope(&mut self, id: &RolloutId) -> Option<SharedEnvelope> {
        use sha2::Digest as _;
        if let Some(e) = self.envelopes.get(id) {
            return e.clone();
        }
        self.settle();
        let reader = self.reader.as_ref()?;
        let read = store::envelope(reader, &self.db, id)
            .ok()
            .flatten()
            .map(|bytes| SharedEnvelope { digest: sha2::Sha256::digest(&bytes).into(), bytes: Arc::from(bytes) });
        // Only a found envelope is kept: a rollout published later is found then.
        if read.is_some() {
            self.envelopes.insert(id.clone(), read.clone());
        }
        read
    }

    /// The read connection; call `settle` first (the last commit).
    pub fn reader(&self) -> Option<&rusqlite::Connection> {
        self.reader.as_ref()
    }

    /// Runs one group through the real writer; one answer per work item.
    pub fn run(&mut self, work: Vec<Work>) -> Vec<Answer> {
        self.settle();
        let Some(writer) = self.writer.as_mut() else {
            return work.iter().map(|_| Answer::Unavailable).collect();
        };
        if work.iter().any(|w| matches!(w, Work::Publish(_))) {
            self.envelopes.clear();
        }
        let mut group = Vec::with_capacity(work.len());
        let mut replies = Vec::with_capacity(work.len());
        for w in work {
            match w {
                Work::Ingest(hostname, items) => {
                    let (reply, rx) = oneshot::channel();
                    group.push(Command::Ingest { hostname, items, reply });
                    replies.push(Reply::Events(rx));
                }
                Work::Heartbeat(heartbeat) => {
                    let (reply, rx) = oneshot::channel();
                    group.push(Command::Heartbeat { heartbeat: *heartbeat, reply });
                    replies.push(Reply::Heartbeat(rx));
                }
                Work::Publish(envelope) => match verify(&envelope, &self.trust_keys) {
                    Some((payload, manifest)) => {
                        let (reply, rx) = oneshot::channel();
                        group.push(Command::Publish { envelope, payload, manifest: Box::new(manifest), reply });
                        replies.push(Reply::Publish(rx));
                    }
                    None => replies.push(Reply::Refused),
                },
                Work::Operator(request) => {
                    let (reply, rx) = oneshot::channel();
                    group.push(Command::Operator { request, reply });
                    replies.push(Reply::Action(rx));
                }
                Work::Tick => {
                    group.push(Command::Tick);
                    replies.push(Reply::None);
                }
            }
        }
        writer.run_group(group);
        replies
            .into_iter()
            .map(|r| match r {
                Reply::Events(mut rx) => match rx.try_recv() {
                    Ok(Ok(v)) => Answer::Events(v),
                    _ => Answer::Unavailable,
                },
                Reply::Heartbeat(mut rx) => match rx.try_recv() {
                    // A host no manifest names gets no record and no replay.
                    Ok(Ok(v)) => Answer::Heartbeat(v.unwrap_or_default()),
                    _ => Answer::Unavailable,
                },
                Reply::Publish(mut rx) => match rx.try_recv() {
                    Ok(Ok(v)) => Answer::Published(v),
                    _ => Answer::Unavailable,
                },
                Reply::Action(mut rx) => match rx.try_recv() {
                    Ok(Ok(v)) => Answer::Action(v),
                    _ => Answer::Unavailable,
                },
                Reply::Refused | Reply::None => Answer::Unavailable,
            })
            .collect()
    }
}

/// What `POST /v1/rollouts` checks before the writer sees a manifest.
fn verify(envelope: &[u8], trust_keys: &[PublicKey]) -> Option<(Vec<u8>, Manifest)> {
    let env = sign::parse_envelope(envelope).ok()?;
    let payload = sign::verify_envelope(&env, trust_keys).ok()?;
    let manifest = Manifest::parse(&payload).ok()?;
    Some((payload, manifest))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit that fails on the commit thread stops the simulated CP
    /// process (memory and the board had run ahead of the database) and
    /// is kept for the run's `cp-commit`; a restart reads the database.
    #[test]
    fn a_failed_commit_stops_the_simulated_cp() {
        let dir = crate::sim::tempfile_dir(9).expect("temp dir");
        let mut cp = SimCp::new(&dir, ClockHandle::manual(crate::sim::T0), Vec::new());
        cp.start().expect("starts");
        cp.fail_next_commit();
        let answers = cp.run(vec![Work::Tick]);
        assert_eq!(answers.len(), 1);
        assert!(cp.is_up(), "answered before the commit ran");
        cp.settle();
        assert!(!cp.is_up(), "stopped");
        let v = cp.check_committed().expect_err("reported");
        assert!(v.invariant == "cp-commit" && v.message.contains("commit"), "{v}");
        assert!(cp.check_committed().is_ok(), "reported once");
        cp.start().expect("restarts");
        assert!(cp.is_up());
        cp.close();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
