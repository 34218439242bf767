//! The ONE writer: commands in over a bounded channel, applied in groups of
//! one transaction each (group commit), answered only after the commit;
//! the long-poll board and the counters change after the commit too. What
//! each command does inside the transaction is in [`super::publish`],
//! [`super::ingest`], [`super::heartbeat`] and [`super::plan`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::group::{BoardChange, Group};
use super::operator::{ActionOutcome, OperatorRequest};
use super::publish::PublishOutcome;
use super::state::CpState;
use super::{heartbeat, ingest, load_state, open, operator, plan, publish, Db, StoreError};
use crate::clock::ClockHandle;
use crate::cp::longpoll::Board;
use crate::ids::{Hostname, RolloutId};
use crate::sdnotify::Watchdog;
use crate::wire::{BatchItem, EventResult, Heartbeat, Manifest, ResultStatus};

/// Commands waiting for the writer. Handlers `send().await`, so a full
/// channel back-pressures requests instead of failing them; 1024 covers a
/// burst of one request from each of 1024 agents while a commit is flushing.
pub const WRITER_CHANNEL_CAPACITY: usize = 1024;
/// Events applied in one transaction at most: bounds the time callers wait
/// for a commit and the size of the WAL frame written at once. The first
/// command of a group is always taken, so one full batch (256) always fits.
pub const MAX_GROUP_EVENTS: usize = 4096;
/// A group slower than this is logged as a warning: agents wait for it.
pub const SLOW_GROUP_MS: u128 = 250;

/// Counters shared by the writer (which bumps them after a commit, so they
/// count only durable work) and the metrics route.
#[derive(Debug, Default)]
pub struct Counters {
    pub commits: AtomicU64,
    pub commit_failures: AtomicU64,
    pub events_applied: AtomicU64,
    pub events_duplicate: AtomicU64,
    pub events_rejected: AtomicU64,
    pub events_retry: AtomicU64,
    pub events_gap: AtomicU64,
    /// Each committed group, from its first command to the commit.
    pub commit_seconds: crate::cp::histogram::Histogram,
}

impl Counters {
    fn count_results(&self, results: &[EventResult]) {
        for r in results {
            let counter = match r.status {
                ResultStatus::Applied => &self.events_applied,
                ResultStatus::Duplicate => &self.events_duplicate,
                ResultStatus::Rejected => &self.events_rejected,
                ResultStatus::Retry => &self.events_retry,
                ResultStatus::Gap => &self.events_gap,
            };
            counter.fetch_add(1, Relaxed);
        }
    }
}

/// Work for the writer. Each carries its reply channel.
#[derive(Debug)]
pub enum Command {
    Publish {
        envelope: Vec<u8>,
        payload: Vec<u8>,
        manifest: Box<Manifest>,
        reply: oneshot::Sender<Reply<PublishOutcome>>,
    },
    Ingest {
        hostname: Hostname,
        items: Vec<BatchItem>,
        reply: oneshot::Sender<Reply<Vec<EventResult>>>,
    },
    /// Answers `None` for a host no published manifest names (nothing stored).
    Heartbeat {
        heartbeat: Heartbeat,
        reply: oneshot::Sender<Reply<Option<BTreeMap<RolloutId, u64>>>>,
    },
    /// `cp resume` / `cp cancel` / `cp unquarantine` (`super::operator`).
    Operator {
        request: OperatorRequest,
        reply: oneshot::Sender<Reply<ActionOutcome>>,
    },
    /// Re-plan every rollout (safety net; the planner also runs on change).
    Tick,
}

/// What the writer answers: the commit failed → `Err` (callers answer 503).
pub type Reply<T> = Result<T, Arc<StoreError>>;

impl Command {
    /// Answers the error without applying the command.
    fn refuse(self, err: &Arc<StoreError>) {
        match self {
            Command::Publish { reply, .. } => drop(reply.send(Err(err.clone()))),
            Command::Ingest { reply, .. } => drop(reply.send(Err(err.clone()))),
            Command::Heartbeat { reply, .. } => drop(reply.send(Err(err.clone()))),
            Command::Operator { reply, .. } => drop(reply.send(Err(err.clone()))),
            Command::Tick => {}
        }
    }

    fn n_events(&self) -> usize {
        match self {
            Command::Ingest { items, .. } => items.len(),
            _ => 1,
        }
    }
}

/// A reply held back until the group's commit.
enum HeldReply {
    Publish(oneshot::Sender<Reply<PublishOutcome>>, PublishOutcome),
    Ingest(oneshot::Sender<Reply<Vec<EventResult>>>, Vec<EventResult>),
    Heartbeat(oneshot::Sender<Reply<Option<BTreeMap<RolloutId, u64>>>>, Option<BTreeMap<RolloutId, u64>>),
    Operator(oneshot::Sender<Reply<ActionOutcome>>, ActionOutcome),
}

impl HeldReply {
    fn send_ok(self) {
        // A caller that went away (client disconnected) needs no answer.
        match self {
            HeldReply::Publish(tx, v) => drop(tx.send(Ok(v))),
            HeldReply::Ingest(tx, v) => drop(tx.send(Ok(v))),
            HeldReply::Heartbeat(tx, v) => drop(tx.send(Ok(v))),
            HeldReply::Operator(tx, v) => drop(tx.send(Ok(v))),
        }
    }

    fn send_err(self, err: &Arc<StoreError>) {
        match self {
            HeldReply::Publish(tx, _) => drop(tx.send(Err(err.clone()))),
            HeldReply::Ingest(tx, _) => drop(tx.send(Err(err.clone()))),
            HeldReply::Heartbeat(tx, _) => drop(tx.send(Err(err.clone()))),
            HeldReply::Operator(tx, _) => drop(tx.send(Err(err.clone()))),
        }
    }
}

/// The single writer: owns the write connection and the in-memory state.
pub struct Writer {
    conn: Connection,
    path: PathBuf,
    state: CpState,
    clock: ClockHandle,
    board: Arc<Board>,
    counters: Arc<Counters>,
    /// `None` (the daemon): every group commits before it answers.
    committer: Option<Committer>,
}

/// For `nixfleet sim` only ([`Writer::commit_on_another_thread`]): a
/// thread that runs each group's `COMMIT` while the simulator goes on,
/// joined before the writer touches the database again. The simulator's
/// clock does not move while it runs, and every later use of the database
/// (the next group, a read, a crash) waits for it, so nothing can tell the
/// difference from committing before answering; the machine's second core
/// does the WAL writes and checkpoints.
struct Committer {
    /// The connection and the SQL that ends its transaction (`COMMIT`).
    to: std::sync::mpsc::Sender<(Connection, &'static str)>,
    back: std::sync::mpsc::Receiver<(Connection, rusqlite::Result<()>)>,
    /// Stands in for the write connection while the real one commits.
    spare: Option<Connection>,
    /// `COMMIT`; tests make it fail (`Writer::fail_next_commit`).
    end_sql: &'static str,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("path", &self.path).finish()
    }
}

/// Statistics of the writer's life, logged at shutdown.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriterStats {
    pub n_commits: u64,
    pub n_commands: u64,
    pub n_events_applied: u64,
}

/// A committed group: what to answer, what to show, how long it took.
struct Committed {
    replies: Vec<HeldReply>,
    board: Vec<BoardChange>,
    n_applied: u64,
    /// Elapsed at the end of: applying the commands, planning, commit.
    phases: [Duration; 3],
}

impl Writer {
    /// Opens the database, loads the state and publishes the standing
    /// dispatches on the board (they survive restarts).
    pub fn open(
        path: &Path,
        clock: ClockHandle,
        board: Arc<Board>,
        counters: Arc<Counters>,
    ) -> Result<Writer, StoreError> {
        let conn = open(path)?;
        let state = load_state(&conn, path)?;
        for rollout in state.rollouts.values() {
            for (host, d) in &rollout.dispatched {
                board.offer(host, d.clone());
            }
        }
        Ok(Writer { conn, path: path.to_owned(), state, clock, board, counters, committer: None })
    }

    /// From now on each group's `COMMIT` runs on a thread of its own
    /// (`Committer`); `nixfleet sim` only.
    #[allow(dead_code)] // used by `nixfleet sim`
    pub(crate) fn commit_on_another_thread(&mut self) -> Result<(), StoreError> {
        let spare = Connection::open_in_memory().map_err(super::db::sql_error(&self.path, "open a spare"))?;
        let (to, jobs) = std::sync::mpsc::channel::<(Connection, &'static str)>();
        let (done, back) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("nixfleet-commit".into())
            .spawn(move || {
                for (conn, end_sql) in jobs {
                    let result = conn.execute_batch(end_sql);
                    if done.send((conn, result)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| StoreError::Corrupt { path: self.path.clone(), what: format!("no committer thread: {e}") })?;
        self.committer = Some(Committer { to, back, spare: Some(spare), end_sql: "COMMIT" });
        Ok(())
    }

    /// The next commit on the committer fails as a lost write would: its
    /// transaction is rolled back and `COMMIT` then finds none to commit.
    #[cfg(test)]
    pub(crate) fn fail_next_commit(&mut self) {
        if let Some(c) = self.committer.as_mut() {
            c.end_sql = "ROLLBACK; COMMIT";
        }
    }

    /// Hands the open transaction's connection to the committer.
    fn hand_off_commit(&mut self) {
        let Some(c) = self.committer.as_mut() else { return };
        let Some(spare) = c.spare.take() else { return };
        let conn = std::mem::replace(&mut self.conn, spare);
        let end_sql = std::mem::replace(&mut c.end_sql, "COMMIT");
        if let Err(std::sync::mpsc::SendError((conn, _))) = c.to.send((conn, end_sql)) {
            // No committer: commit here.
            c.spare = Some(std::mem::replace(&mut self.conn, conn));
            if let Err(e) = self.conn.execute_batch("COMMIT") {
                tracing::error!(db = %self.path.display(), error = %e, "commit failed after the answers");
            }
        }
    }

    /// Waits for the commit the committer runs, if any, and takes the
    /// connection back; its failure (the transaction is rolled back).
    pub(crate) fn join_commit(&mut self) -> Result<(), StoreError> {
        let Some(c) = self.committer.as_mut() else { return Ok(()) };
        if c.spare.is_some() {
            return Ok(());
        }
        let (conn, result) = c.back.recv().map_err(|_| StoreError::Corrupt {
            path: self.path.clone(),
            what: "the committer thread stopped with the write connection".into(),
        })?;
        c.spare = Some(std::mem::replace(&mut self.conn, conn));
        result.map_err(|e| {
            let _ = self.conn.execute_batch("ROLLBACK");
            super::db::sql_error(&self.path, "commit")(e)
        })
    }

    /// The writer's in-memory projection of the database (read-only), for
    /// checks that compare it with the database.
    #[allow(dead_code)] // used by `nixfleet sim`
    pub(crate) fn state(&self) -> &CpState {
        &self.state
    }

    /// Per rollout, the hosts changed since the last call
    /// (`LiveRollout::take_touched`: `None` for a rollout not asked before).
    #[allow(dead_code)] // used by `nixfleet sim`
    pub(crate) fn take_touched(&mut self) -> BTreeMap<RolloutId, Option<Vec<Hostname>>> {
        self.state.rollouts.iter_mut().map(|(id, r)| (id.clone(), r.take_touched())).collect()
    }

    /// Lowers (or raises) the number of events of one (host, rollout)
    /// applied between two record checkpoints
    /// (`checkpoint::MAX_EVENTS_SINCE_CHECKPOINT`): tests cross it with a
    /// few events. Kept across a reload after a failed commit.
    pub fn set_checkpoint_bound(&mut self, bound: u64) {
        self.state.checkpoints.bound = bound;
    }

    /// Runs until every sender is dropped, then checkpoints the WAL. Every
    /// turn pings `watchdog` (throttled): a wedged writer stops the pings.
    pub fn run(mut self, mut rx: mpsc::Receiver<Command>, mut watchdog: Watchdog) -> WriterStats {
        let mut stats = WriterStats::default();
        // Plan once at start: a tick may have been lost in a crash.
        let mut group = vec![Command::Tick];
        loop {
            let mut n_events: usize = group.iter().map(Command::n_events).sum();
            while n_events < MAX_GROUP_EVENTS {
                match rx.try_recv() {
                    Ok(cmd) => {
                        n_events += cmd.n_events();
                        group.push(cmd);
                    }
                    Err(_) => break,
                }
            }
            stats.n_commands += group.len() as u64;
            stats.n_events_applied += self.run_group(std::mem::take(&mut group));
            stats.n_commits += 1;
            watchdog.ping();
            match rx.blocking_recv() {
                Some(cmd) => group.push(cmd),
                None => break,
            }
        }
        if let Err(e) = self.join_commit() {
            tracing::error!(db = %self.path.display(), error = %e, "the last commit failed");
        }
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
            tracing::warn!(db = %self.path.display(), error = %e, "WAL checkpoint at shutdown failed");
        }
        stats
    }

    /// Applies a group of commands in one transaction; answers after commit.
    /// `pub(crate)` for `nixfleet sim`, which drives the writer
    /// synchronously (one group per simulated instant) instead of from its
    /// thread; the replies arrive on the commands' oneshots as usual.
    pub(crate) fn run_group(&mut self, group: Vec<Command>) -> u64 {
        let started = Instant::now();
        let n_commands = group.len();
        let mut replies = Vec::with_capacity(group.len());
        if let Err(e) = self.join_commit() {
            // The last group's commit failed: this group is refused too,
            // and memory is reloaded from what was committed.
            let err = Arc::new(e);
            for cmd in group {
                cmd.refuse(&err);
            }
            self.after_failure(err, Vec::new());
            return 0;
        }
        match self.apply_group(group, &mut replies, started) {
            Ok((board, n_applied, phases)) => {
                self.after_commit(Committed { replies, board, n_applied, phases }, n_commands, started);
                self.hand_off_commit();
                n_applied
            }
            Err(e) => {
                self.after_failure(Arc::new(e), replies);
                0
            }
        }
    }

    /// The transaction: every command, then the planner, then the commit.
    fn apply_group(
        &mut self,
        commands: Vec<Command>,
        replies: &mut Vec<HeldReply>,
        started: Instant,
    ) -> Result<(Vec<BoardChange>, u64, [Duration; 3]), StoreError> {
        let mut phases = [Duration::ZERO; 3];
        let mut n_applied = 0u64;
        let mut group = Group { now: self.clock.now(), dirty: BTreeSet::new(), board: Vec::new() };
        let tx = self.conn.transaction().map_err(super::db::sql_error(&self.path, "begin"))?;
        let db = Db::new(&tx, &self.path);
        let state = &mut self.state;
        for cmd in commands {
            match cmd {
                Command::Publish { envelope, payload, manifest, reply } => {
                    let outcome = publish::publish(db, state, &mut group, &envelope, &payload, *manifest)?;
                    replies.push(HeldReply::Publish(reply, outcome));
                }
                Command::Ingest { hostname, items, reply } => {
                    let results = ingest::ingest(db, state, &mut group, &hostname, &items)?;
                    n_applied += results.iter().filter(|r| r.status == ResultStatus::Applied).count() as u64;
                    replies.push(HeldReply::Ingest(reply, results));
                }
                Command::Heartbeat { heartbeat, reply } => {
                    let replay = heartbeat::heartbeat(db, state, &heartbeat, group.now)?;
                    replies.push(HeldReply::Heartbeat(reply, replay));
                }
                Command::Operator { request, reply } => {
                    let outcome = operator::apply(db, state, &mut group, &request)?;
                    replies.push(HeldReply::Operator(reply, outcome));
                }
                Command::Tick => group.dirty.extend(state.rollouts.keys().cloned()),
            }
        }
        phases[0] = started.elapsed();
        plan::run_planner(db, state, &mut group)?;
        phases[1] = started.elapsed();
        if self.committer.is_some() {
            // Left open: `hand_off_commit` commits it on the committer.
            let mut tx = tx;
            tx.set_drop_behavior(rusqlite::DropBehavior::Ignore);
        } else {
            tx.commit().map_err(super::db::sql_error(&self.path, "commit"))?;
        }
        phases[2] = started.elapsed();
        Ok((group.board, n_applied, phases))
    }

    /// Counters, then the board (waking long-polls), then the answers.
    fn after_commit(&self, done: Committed, n_commands: usize, started: Instant) {
        self.counters.commits.fetch_add(1, Relaxed);
        self.counters.commit_seconds.observe(done.phases[2]);
        for reply in &done.replies {
            if let HeldReply::Ingest(_, results) = reply {
                self.counters.count_results(results);
            }
        }
        let mut offers = Vec::new();
        let mut withdrawals = Vec::new();
        for change in done.board {
            match change {
                BoardChange::Offer(host, d) => offers.push((host, d)),
                BoardChange::Withdraw(host, id) => withdrawals.push((host, id)),
            }
        }
        let n_offers = offers.len();
        self.board.apply(offers, withdrawals);
        for reply in done.replies {
            reply.send_ok();
        }
        let ms = started.elapsed().as_millis();
        let [applied, planned, committed] = done.phases.map(|d| d.as_millis());
        let n_applied = done.n_applied;
        let text = format!(
            "{n_commands} commands, {n_applied} events applied, {n_offers} dispatches offered in {ms} ms \
             (commands {applied} ms, planned by {planned} ms, committed by {committed} ms)"
        );
        if ms > SLOW_GROUP_MS {
            tracing::warn!("slow commit: {text}");
        } else {
            tracing::debug!("commit: {text}");
        }
    }

    /// Every caller gets the error (503); memory is reloaded from the disk
    /// so it never runs ahead of what was committed.
    fn after_failure(&mut self, err: Arc<StoreError>, replies: Vec<HeldReply>) {
        tracing::error!(error = %err, "transaction failed; answering 503 and reloading state from the database");
        self.counters.commit_failures.fetch_add(1, Relaxed);
        for reply in replies {
            reply.send_err(&err);
        }
        match load_state(&self.conn, &self.path) {
            Ok(mut state) => {
                state.checkpoints.bound = self.state.checkpoints.bound;
                self.state = state;
            }
            Err(e) => tracing::error!(error = %e, "reloading state failed; keeping the previous state"),
        }
    }
}
