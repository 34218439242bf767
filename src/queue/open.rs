//! Opening the queue: the process lock, then start-up recovery (crash
//! cases 1, 8, 9, 10 and 11 of the module doc), which reads the truth back
//! from disk: the index of pending, acked and dead events, and the numbers
//! to continue from.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

use super::high_water::HighWater;
use super::record::{self, DeadCause, DeadReason, QueuedEvent};
use super::{
    io_err, storage, DeadEntry, Queue, QueueConfig, QueueError, RealStorage, RecordCheckError, RecoveryReport, Storage,
    ACKED_DIR, DEAD_DIR, HIGH_WATER_FILE, LOCK_FILE, MAX_QSEQ, QUEUE_DIR,
};
use crate::clock::ClockHandle;
use crate::ids::{Hostname, RolloutId};
use crate::wire::MAX_SEQ;

/// The queue's folders, in the order recovery scans them: `dead/` and
/// `acked/` before the pending folder, so that a pending copy of an event
/// that had moved is recognised (crash case 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Folder {
    Dead,
    Acked,
    Pending,
}

/// What the folder scan of recovery gathers besides the index.
#[derive(Debug, Default)]
struct Scan {
    /// The highest qseq seen within [`MAX_QSEQ`] (names, records and the
    /// high-water mark).
    max_qseq: u64,
    /// Event files in `dead/`.
    dead_names: BTreeSet<String>,
    /// Events with a `.reason` sidecar in `dead/`.
    reason_names: BTreeSet<String>,
    /// Events with a `.revived` note in `acked/`.
    revived_notes: Vec<String>,
    /// (rollout, seq) of every record accepted so far: a second record
    /// with the same pair is refused.
    live_seqs: HashSet<(RolloutId, u64)>,
}

impl Scan {
    fn count_qseq(&mut self, qseq: u64) {
        self.max_qseq = self.max_qseq.max(qseq);
    }

    /// A file of `dead/`: its qseq counts by name (a bounded one); the
    /// events and their reasons are read after the scan.
    fn note_dead_file(&mut self, name: String) {
        if let Some(qseq) = bounded_qseq_of_name(&name) {
            self.count_qseq(qseq);
        }
        match name.strip_suffix(record::REASON_SUFFIX) {
            Some(event_name) => {
                self.reason_names.insert(event_name.to_owned());
            }
            None => {
                self.dead_names.insert(name);
            }
        }
    }
}

impl Queue {
    /// Opens the queue of `state_dir` on the real file system: creates the
    /// folders, takes the exclusive lock, and runs start-up recovery.
    pub fn open(
        state_dir: &Path,
        hostname: Hostname,
        config: QueueConfig,
        clock: ClockHandle,
    ) -> Result<Queue, QueueError> {
        let root = state_dir.join(QUEUE_DIR);
        std::fs::create_dir_all(&root).map_err(io_err("create directory", &root))?;
        let lock_path = root.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err("open lock file", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(QueueError::Locked { path: lock_path }),
            Err(TryLockError::Error(source)) => return Err(QueueError::Io { op: "lock", path: lock_path, source }),
        }
        let mut queue = Queue::open_with_storage(Box::new(RealStorage), state_dir, hostname, config, clock)?;
        queue._lock = Some(lock);
        Ok(queue)
    }

    /// Opens with any storage and without the process lock: for tests
    /// through the storage seam, and for callers that lock on their own.
    pub fn open_with_storage(
        storage: Box<dyn Storage>,
        state_dir: &Path,
        hostname: Hostname,
        config: QueueConfig,
        clock: ClockHandle,
    ) -> Result<Queue, QueueError> {
        let root = state_dir.join(QUEUE_DIR);
        let mut queue = Queue {
            storage,
            state_dir: state_dir.to_owned(),
            acked_dir: root.join(ACKED_DIR),
            dead_dir: root.join(DEAD_DIR),
            root,
            hostname,
            config,
            clock,
            next_qseq: 1,
            pending: BTreeMap::new(),
            acked: BTreeMap::new(),
            dead_rollouts: BTreeSet::new(),
            dead: BTreeMap::new(),
            revived: BTreeSet::new(),
            last_seq: BTreeMap::new(),
            high_water: HighWater::default(),
            poisoned: None,
            recovery: RecoveryReport::default(),
            _lock: None,
        };
        queue.recover()?;
        Ok(queue)
    }

    /// Start-up recovery (crash cases 1, 8, 9, 10, 11): create folders,
    /// drop `.tmp` files, move unreadable files to `dead/`, load the index
    /// and the numbers to continue from.
    fn recover(&mut self) -> Result<(), QueueError> {
        self.create_folders()?;
        self.load_high_water()?;
        let mut scan = Scan { max_qseq: self.high_water.qseq, ..Scan::default() };
        self.last_seq = self.high_water.seqs.clone();
        for folder in [Folder::Dead, Folder::Acked, Folder::Pending] {
            self.scan_folder(folder, &mut scan)?;
        }
        self.index_dead_letters(&mut scan);
        let max_qseq = scan.max_qseq;
        self.remove_leftovers(scan)?;
        // max_qseq <= MAX_QSEQ (every source is bounded), so this cannot
        // overflow.
        self.next_qseq = max_qseq + 1;
        self.recovery.pending = self.pending.len();
        self.recovery.acked = self.acked.len();
        if !self.recovery.moved_to_dead.is_empty() || self.recovery.tmp_removed > 0 {
            tracing::warn!(
                tmp_removed = self.recovery.tmp_removed,
                moved_to_dead = self.recovery.moved_to_dead.len(),
                "queue recovery cleaned up"
            );
        }
        Ok(())
    }

    /// Creates the folders and makes them durable (cheap, once per start).
    fn create_folders(&self) -> Result<(), QueueError> {
        for dir in [&self.root, &self.acked_dir, &self.dead_dir] {
            self.storage.create_dir(dir).map_err(io_err("create directory", dir))?;
        }
        for dir in [&self.state_dir, &self.root] {
            self.storage.fsync_dir(dir).map_err(io_err("fsync directory", dir))?;
        }
        Ok(())
    }

    /// Reads `high-water.json` when there is one. A damaged one stops the
    /// open: numbering without it could hand out a pruned number again.
    fn load_high_water(&mut self) -> Result<(), QueueError> {
        let path = self.root.join(HIGH_WATER_FILE);
        if self.storage.exists(&path).map_err(io_err("stat", &path))? {
            let bytes = self.storage.read_file(&path).map_err(io_err("read", &path))?;
            self.high_water =
                HighWater::decode(&bytes).map_err(|source| QueueError::HighWaterCorrupt { path, source })?;
        }
        Ok(())
    }

    fn folder_dir(&self, folder: Folder) -> PathBuf {
        match folder {
            Folder::Dead => self.dead_dir.clone(),
            Folder::Acked => self.acked_dir.clone(),
            Folder::Pending => self.root.clone(),
        }
    }

    /// Every file of one folder, in name order: a `.tmp` is removed (crash
    /// case 1), a file of `dead/` or a revived note noted for later, an
    /// event file recovered.
    fn scan_folder(&mut self, folder: Folder, scan: &mut Scan) -> Result<(), QueueError> {
        let dir = self.folder_dir(folder);
        let mut names = self.storage.list_files(&dir).map_err(io_err("list", &dir))?;
        names.sort();
        for name in names {
            if name.ends_with(record::TMP_SUFFIX) {
                if self.remove_if_present(&dir.join(&name))? {
                    self.recovery.tmp_removed += 1;
                }
                continue;
            }
            match folder {
                Folder::Dead => scan.note_dead_file(name),
                Folder::Pending if name == LOCK_FILE || name == HIGH_WATER_FILE => {}
                Folder::Acked if name.ends_with(record::REVIVED_SUFFIX) => {
                    scan.revived_notes.extend(name.strip_suffix(record::REVIVED_SUFFIX).map(str::to_owned));
                }
                Folder::Acked | Folder::Pending => self.recover_event_file(folder, &dir, name, scan)?,
            }
        }
        Ok(())
    }

    /// One file of `acked/` or the pending folder: indexed; or removed from
    /// pending when its move had happened (crash case 8); or set aside in
    /// `dead/` when it does not read as this queue's event.
    fn recover_event_file(
        &mut self,
        folder: Folder,
        dir: &Path,
        name: String,
        scan: &mut Scan,
    ) -> Result<(), QueueError> {
        if !name.ends_with(record::EVENT_SUFFIX) {
            tracing::warn!(dir = %dir.display(), %name, "ignoring a file that is not a queue event");
            return Ok(());
        }
        if let Some(qseq) = bounded_qseq_of_name(&name) {
            scan.count_qseq(qseq);
        }
        let path = dir.join(&name);
        let moved_already =
            scan.dead_names.contains(&name) || record::qseq_of_name(&name).is_some_and(|q| self.acked.contains_key(&q));
        if folder == Folder::Pending && moved_already {
            // Crash case 8: the move to acked/ or dead/ had happened.
            self.storage.remove_file(&path).map_err(io_err("remove", &path))?;
            self.storage.fsync_dir(dir).map_err(io_err("fsync directory", dir))?;
            return Ok(());
        }
        let bytes = match self.storage.read_file(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // Too large (or not a regular file): never read into memory,
            // moved aside like any unreadable record.
            Err(e) if storage::unsafe_file(&e).is_some() => {
                return self.set_aside(dir, name, format!("unreadable: {e}"));
            }
            Err(source) => return Err(QueueError::Io { op: "read", path, source }),
        };
        match self.check_record(&name, &bytes, &mut scan.live_seqs) {
            Ok(queued) => {
                scan.count_qseq(queued.qseq);
                let seq = self.last_seq.entry(queued.rollout_id.clone()).or_insert(0);
                *seq = (*seq).max(queued.seq());
                if folder == Folder::Pending {
                    self.pending.insert(queued.qseq, queued);
                } else {
                    self.acked.insert(queued.qseq, queued);
                }
                Ok(())
            }
            Err(refused) => {
                // Its seq, if the header still reads (and is in bounds),
                // must not come back either (it may have reached the CP).
                self.fold_header_numbers(&bytes, &mut scan.max_qseq);
                self.set_aside(dir, name, refused.to_string())
            }
        }
    }

    /// Crash case 8: an unreadable file goes to `dead/` with the reason,
    /// and into the recovery report.
    fn set_aside(&mut self, dir: &Path, name: String, reason: String) -> Result<(), QueueError> {
        let dead_reason = DeadReason::new(DeadCause::Corrupt, &reason, self.clock.now());
        let dead_dir = self.dead_dir.clone();
        self.write_dead_reason(&name, &dead_reason)?;
        self.move_durably(dir, &dead_dir, &name)?;
        self.recovery.moved_to_dead.push((name, reason));
        Ok(())
    }

    /// Dead events still hold seqs that must not come back; unreadable
    /// ones only their qseq (by name, in the scan). Those the CP refused (a
    /// `rejected` reason beside a readable record of this host) are part
    /// of their rollout's history: indexed for re-sends.
    fn index_dead_letters(&mut self, scan: &mut Scan) {
        let dead_dir = self.dead_dir.clone();
        for name in &scan.dead_names {
            let Ok(bytes) = self.storage.read_file(&dead_dir.join(name)) else { continue };
            if let Some(rollout_id) = self.fold_header_numbers(&bytes, &mut scan.max_qseq) {
                self.dead_rollouts.insert(rollout_id);
            }
            if !scan.reason_names.contains(name) || !self.rejected_by_the_cp(name) {
                continue;
            }
            let mut no_dupes = HashSet::new();
            if let Ok(queued) = self.check_record(name, &bytes, &mut no_dupes) {
                let entry = DeadEntry { rollout_id: queued.rollout_id.clone(), seq: queued.seq(), name: name.clone() };
                self.dead.insert(queued.qseq, entry);
            }
        }
    }

    /// Whether the reason beside a dead event says the CP rejected it.
    fn rejected_by_the_cp(&self, name: &str) -> bool {
        let reason_path = self.dead_dir.join(format!("{name}{}", record::REASON_SUFFIX));
        self.storage
            .read_file(&reason_path)
            .ok()
            .and_then(|b| DeadReason::decode(&b).ok())
            .is_some_and(|r| r.cause == DeadCause::Rejected)
    }

    /// Crash cases 6 and 10: a reason without its dead event, or a revived
    /// note without its acked event, is a leftover and removed; a note with
    /// its event marks that event revived.
    fn remove_leftovers(&mut self, scan: Scan) -> Result<(), QueueError> {
        let (acked_dir, dead_dir) = (self.acked_dir.clone(), self.dead_dir.clone());
        let orphan_reasons: Vec<PathBuf> = scan
            .reason_names
            .iter()
            .filter(|n| !scan.dead_names.contains(*n))
            .map(|n| dead_dir.join(format!("{n}{}", record::REASON_SUFFIX)))
            .collect();
        let mut orphan_notes = Vec::new();
        for event_name in scan.revived_notes {
            match record::qseq_of_name(&event_name).filter(|q| self.acked.contains_key(q)) {
                Some(qseq) => {
                    self.revived.insert(qseq);
                }
                None => orphan_notes.push(acked_dir.join(format!("{event_name}{}", record::REVIVED_SUFFIX))),
            }
        }
        for (dir, orphans) in [(&dead_dir, orphan_reasons), (&acked_dir, orphan_notes)] {
            if orphans.is_empty() {
                continue;
            }
            for path in orphans {
                self.remove_if_present(&path)?;
            }
            self.storage.fsync_dir(dir).map_err(io_err("fsync directory", dir))?;
        }
        Ok(())
    }

    /// Folds the qseq and seq of a record whose header still reads into
    /// the numbering, when they are within bounds; returns its rollout.
    fn fold_header_numbers(&mut self, bytes: &[u8], max_qseq: &mut u64) -> Option<RolloutId> {
        let header = record::decode_header(bytes).ok()?;
        if header.qseq <= MAX_QSEQ {
            *max_qseq = (*max_qseq).max(header.qseq);
        }
        let rollout_id = RolloutId::parse(&header.rollout_id).ok()?;
        if header.seq <= MAX_SEQ {
            let seq = self.last_seq.entry(rollout_id.clone()).or_insert(0);
            *seq = (*seq).max(header.seq);
        }
        Some(rollout_id)
    }

    /// Decodes a record and checks it belongs here under this name.
    /// `live_seqs` holds the (rollout, seq) of the records accepted so far.
    fn check_record(
        &self,
        name: &str,
        bytes: &[u8],
        live_seqs: &mut HashSet<(RolloutId, u64)>,
    ) -> Result<QueuedEvent, RecordCheckError> {
        let queued = record::decode(bytes)?;
        if queued.hostname != self.hostname {
            return Err(RecordCheckError::OtherHost { found: queued.hostname, queue: self.hostname.clone() });
        }
        if queued.qseq > MAX_QSEQ {
            return Err(RecordCheckError::QseqBeyondBound(queued.qseq));
        }
        if queued.seq() == 0 || queued.seq() > MAX_SEQ {
            return Err(RecordCheckError::SeqOutOfRange(queued.seq()));
        }
        if queued.file_name() != name {
            return Err(RecordCheckError::NameMismatch(queued.qseq));
        }
        if !live_seqs.insert((queued.rollout_id.clone(), queued.seq())) {
            return Err(RecordCheckError::SecondSeq { rollout_id: queued.rollout_id.clone(), seq: queued.seq() });
        }
        Ok(queued)
    }
}

/// The qseq a file name starts with, if it has the event-name shape and is
/// within [`MAX_QSEQ`]; a larger one is never used for numbering.
fn bounded_qseq_of_name(name: &str) -> Option<u64> {
    record::qseq_of_name(name).filter(|q| *q <= MAX_QSEQ)
}
