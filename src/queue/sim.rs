//! Test-only storage: an in-memory file system that fails any chosen
//! operation and, after any operation, enumerates every on-disk state a
//! crash could leave (the method of SQLite's crash tests and the
//! ALICE / CrashMonkey papers).
//!
//! The crash model is deliberately conservative:
//! - file data written but not fsynced may be lost, kept, or torn (a
//!   prefix, or a prefix padded with zeros to the full length);
//! - a create, rename or unlink not yet made durable by an fsync of its
//!   directory may or may not have happened, independently of the others
//!   (a rename is atomic: it happened or it did not);
//! - nothing reorders across a completed fsync: fsyncing a directory
//!   makes durable every pending operation that touches it, and every
//!   earlier one on the same names;
//! - directories themselves are durable once created (the queue creates
//!   them once and fsyncs their parents).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::storage::Storage;

/// How an injected failure looks to the caller.
pub const ENOSPC: i32 = 28;
pub const EIO: i32 = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Inode {
    data: Vec<u8>,
    synced: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MetaOp {
    Link { path: PathBuf, inode: usize },
    Unlink { path: PathBuf },
    Rename { from: PathBuf, to: PathBuf, inode: usize },
}

impl MetaOp {
    fn paths(&self) -> Vec<&Path> {
        match self {
            MetaOp::Link { path, .. } | MetaOp::Unlink { path } => vec![path],
            MetaOp::Rename { from, to, .. } => vec![from, to],
        }
    }

    fn touches_dir(&self, dir: &Path) -> bool {
        self.paths().iter().any(|p| p.parent() == Some(dir))
    }

    fn apply(&self, entries: &mut BTreeMap<PathBuf, usize>) {
        match self {
            MetaOp::Link { path, inode } => {
                entries.insert(path.clone(), *inode);
            }
            MetaOp::Unlink { path } => {
                entries.remove(path);
            }
            MetaOp::Rename { from, to, inode } => {
                entries.remove(from);
                entries.insert(to.clone(), *inode);
            }
        }
    }
}

/// One mutating call, as the log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpRecord {
    pub op: &'static str,
    pub path: PathBuf,
    pub failed: bool,
}

#[derive(Debug, Clone, Default)]
pub struct SimFs {
    dirs: BTreeSet<PathBuf>,
    /// What a process sees now.
    entries: BTreeMap<PathBuf, usize>,
    /// What survives a crash for sure.
    durable_entries: BTreeMap<PathBuf, usize>,
    inodes: Vec<Inode>,
    pending_meta: Vec<MetaOp>,
    /// Every mutating call, in order.
    pub log: Vec<OpRecord>,
    /// Mutating call number → errno to fail it with (doing nothing, except
    /// a failed write leaves half its bytes, as a full disk does).
    faults: BTreeMap<usize, i32>,
    /// From this mutating call on, nothing happens: the machine is down.
    crash_at: Option<usize>,
}

/// A shared handle on a [`SimFs`], given to the queue as its storage.
#[derive(Debug, Clone, Default)]
pub struct SimStorage {
    fs: Arc<Mutex<SimFs>>,
}

impl SimStorage {
    pub fn new(fs: SimFs) -> SimStorage {
        SimStorage { fs: Arc::new(Mutex::new(fs)) }
    }

    pub fn fs(&self) -> MutexGuard<'_, SimFs> {
        self.fs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SimFs {
    /// Fails mutating call number `at` (0-based, counted from now on the
    /// log) with `errno`.
    pub fn fail_at(&mut self, at: usize, errno: i32) {
        self.faults.insert(at, errno);
    }

    /// Stops the machine at mutating call number `at`.
    pub fn crash_at(&mut self, at: usize) {
        self.crash_at = Some(at);
    }

    pub fn n_ops(&self) -> usize {
        self.log.len()
    }

    /// The current content of a file, if it exists.
    pub fn file(&self, path: &Path) -> Option<&[u8]> {
        self.entries.get(path).map(|i| self.inodes[*i].data.as_slice())
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        self.entries.keys().cloned().collect()
    }

    /// Returns Err if this call must fail (fault or crash), logging it.
    fn begin(&mut self, op: &'static str, path: &Path) -> Result<Option<i32>, io::Error> {
        let idx = self.log.len();
        let crashed = self.crash_at.is_some_and(|at| idx >= at);
        let fault = self.faults.get(&idx).copied();
        self.log.push(OpRecord { op, path: path.to_owned(), failed: crashed || fault.is_some() });
        if crashed {
            return Err(io::Error::other("simulated crash: the machine is down"));
        }
        Ok(fault)
    }

    fn parent_exists(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(dir) if self.dirs.contains(dir) => Ok(()),
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn make_durable(&mut self, dir: &Path) {
        let n = self.pending_meta.len();
        let mut durable = vec![false; n];
        for i in (0..n).rev() {
            let later_durable_shares_a_name = (i + 1..n).any(|j| {
                durable[j] && self.pending_meta[j].paths().iter().any(|p| self.pending_meta[i].paths().contains(p))
            });
            durable[i] = self.pending_meta[i].touches_dir(dir) || later_durable_shares_a_name;
        }
        let mut still_pending = Vec::new();
        for (op, is_durable) in std::mem::take(&mut self.pending_meta).into_iter().zip(durable) {
            if is_durable {
                op.apply(&mut self.durable_entries);
            } else {
                still_pending.push(op);
            }
        }
        self.pending_meta = still_pending;
    }

    /// Every state the disk may be in if the machine lost power now, each
    /// as a fresh, fully durable file system. Identical states are merged.
    pub fn crash_states(&self) -> Vec<SimFs> {
        const MAX_PENDING_META: usize = 12;
        let n = self.pending_meta.len();
        assert!(n <= MAX_PENDING_META, "{n} un-synced metadata operations: the workload never fsyncs?");
        let mut seen = BTreeSet::new();
        let mut states = Vec::new();
        for mask in 0u32..(1 << n) {
            let mut entries = self.durable_entries.clone();
            for (i, op) in self.pending_meta.iter().enumerate() {
                if mask & (1 << i) != 0 {
                    op.apply(&mut entries);
                }
            }
            // Per visible file: the contents it may have.
            let choices: Vec<(PathBuf, Vec<Vec<u8>>)> = entries
                .iter()
                .map(|(path, inode)| (path.clone(), self.possible_contents(&self.inodes[*inode])))
                .collect();
            let mut combo = vec![0usize; choices.len()];
            loop {
                let files: BTreeMap<PathBuf, Vec<u8>> =
                    choices.iter().zip(&combo).map(|((p, opts), k)| (p.clone(), opts[*k].clone())).collect();
                if seen.insert(files.clone()) {
                    states.push(self.fresh_with(files));
                }
                // Next combination (odometer).
                let mut pos = 0;
                loop {
                    if pos == combo.len() {
                        break;
                    }
                    combo[pos] += 1;
                    if combo[pos] < choices[pos].1.len() {
                        break;
                    }
                    combo[pos] = 0;
                    pos += 1;
                }
                if pos == combo.len() {
                    break;
                }
            }
        }
        states
    }

    fn possible_contents(&self, inode: &Inode) -> Vec<Vec<u8>> {
        if inode.data == inode.synced {
            return vec![inode.data.clone()];
        }
        let half = inode.data.len() / 2;
        let mut torn_zeros = inode.data[..half].to_vec();
        torn_zeros.resize(inode.data.len(), 0);
        let mut options = vec![inode.synced.clone(), inode.data.clone(), inode.data[..half].to_vec(), torn_zeros];
        options.dedup();
        options
    }

    fn fresh_with(&self, files: BTreeMap<PathBuf, Vec<u8>>) -> SimFs {
        let mut fs = SimFs { dirs: self.dirs.clone(), ..SimFs::default() };
        for (path, data) in files {
            fs.inodes.push(Inode { data: data.clone(), synced: data });
            fs.entries.insert(path.clone(), fs.inodes.len() - 1);
        }
        fs.durable_entries = fs.entries.clone();
        fs
    }
}

fn fault(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

impl Storage for SimStorage {
    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        let mut fs = self.fs();
        if let Some(errno) = fs.begin("create_dir", dir)? {
            return Err(fault(errno));
        }
        for ancestor in dir.ancestors() {
            fs.dirs.insert(ancestor.to_owned());
        }
        Ok(())
    }

    fn write_file(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut fs = self.fs();
        let fault_errno = fs.begin("write_file", path)?;
        fs.parent_exists(path)?;
        // A failing write (full disk) still creates the file and leaves
        // part of the data.
        let written = if fault_errno.is_some() { &bytes[..bytes.len() / 2] } else { bytes };
        match fs.entries.get(path).copied() {
            Some(inode) => fs.inodes[inode].data = written.to_vec(),
            None => {
                fs.inodes.push(Inode { data: written.to_vec(), synced: Vec::new() });
                let inode = fs.inodes.len() - 1;
                fs.entries.insert(path.to_owned(), inode);
                fs.pending_meta.push(MetaOp::Link { path: path.to_owned(), inode });
            }
        }
        match fault_errno {
            Some(errno) => Err(fault(errno)),
            None => Ok(()),
        }
    }

    fn fsync_file(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.fs();
        if let Some(errno) = fs.begin("fsync_file", path)? {
            return Err(fault(errno));
        }
        let inode = *fs.entries.get(path).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        fs.inodes[inode].synced = fs.inodes[inode].data.clone();
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut fs = self.fs();
        if let Some(errno) = fs.begin("rename", from)? {
            return Err(fault(errno));
        }
        fs.parent_exists(to)?;
        let inode = fs.entries.remove(from).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        fs.entries.insert(to.to_owned(), inode);
        fs.pending_meta.push(MetaOp::Rename { from: from.to_owned(), to: to.to_owned(), inode });
        Ok(())
    }

    fn fsync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut fs = self.fs();
        if let Some(errno) = fs.begin("fsync_dir", dir)? {
            return Err(fault(errno));
        }
        if !fs.dirs.contains(dir) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        fs.make_durable(dir);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.fs();
        if let Some(errno) = fs.begin("remove_file", path)? {
            return Err(fault(errno));
        }
        fs.entries.remove(path).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        fs.pending_meta.push(MetaOp::Unlink { path: path.to_owned() });
        Ok(())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let fs = self.fs();
        Ok(fs.entries.contains_key(path) || fs.dirs.contains(path))
    }

    fn list_files(&self, dir: &Path) -> io::Result<Vec<String>> {
        let fs = self.fs();
        if !fs.dirs.contains(dir) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        Ok(fs
            .entries
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .collect())
    }

    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let fs = self.fs();
        fs.file(path).map(<[u8]>::to_vec).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
}
