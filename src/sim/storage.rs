//! An in-memory [`Storage`] for the simulated agents' REAL queues. The
//! simulator kills agent processes, not machines: everything written
//! before a kill is still there afterwards (the kernel keeps it), which is
//! the crash the agent sees most. Power loss, with its torn and vanished
//! un-synced writes, is enumerated exhaustively by the queue's own
//! `queue::sim` tests and is not repeated here. Bit rot can be injected
//! ([`MemStorage::corrupt`]) to exercise the queue's corrupt-file path.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::queue::Storage;

#[derive(Debug, Default)]
struct Files {
    dirs: BTreeSet<PathBuf>,
    files: BTreeMap<PathBuf, BTreeMap<String, Vec<u8>>>,
}

/// Cheap to clone; clones share the files (they outlive an agent process).
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    inner: Arc<Mutex<Files>>,
}

fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    let dir = path.parent().ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok((dir.to_owned(), name.to_owned()))
}

impl MemStorage {
    fn lock(&self) -> MutexGuard<'_, Files> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Names of the files in `dir`, sorted.
    pub fn names(&self, dir: &Path) -> Vec<String> {
        self.lock().files.get(dir).map(|f| f.keys().cloned().collect()).unwrap_or_default()
    }

    pub fn read(&self, path: &Path) -> Option<Vec<u8>> {
        let (dir, name) = split(path).ok()?;
        self.lock().files.get(&dir).and_then(|f| f.get(&name)).cloned()
    }

    /// Flips a byte in the middle of a file (bit rot); false if absent.
    pub fn corrupt(&self, path: &Path) -> bool {
        let Ok((dir, name)) = split(path) else { return false };
        let mut files = self.lock();
        match files.files.get_mut(&dir).and_then(|f| f.get_mut(&name)) {
            Some(bytes) if !bytes.is_empty() => {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x20;
                true
            }
            _ => false,
        }
    }
}

impl Storage for MemStorage {
    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        let mut files = self.lock();
        for anc in dir.ancestors() {
            files.dirs.insert(anc.to_owned());
        }
        Ok(())
    }

    fn write_file(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let (dir, name) = split(path)?;
        let mut files = self.lock();
        if !files.dirs.contains(&dir) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        files.files.entry(dir).or_default().insert(name, bytes.to_vec());
        Ok(())
    }

    fn fsync_file(&self, _path: &Path) -> io::Result<()> {
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from_dir, from_name) = split(from)?;
        let (to_dir, to_name) = split(to)?;
        let mut files = self.lock();
        let bytes = files
            .files
            .get_mut(&from_dir)
            .and_then(|f| f.remove(&from_name))
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        files.files.entry(to_dir).or_default().insert(to_name, bytes);
        Ok(())
    }

    fn fsync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let (dir, name) = split(path)?;
        match self.lock().files.get_mut(&dir).and_then(|f| f.remove(&name)) {
            Some(_) => Ok(()),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let files = self.lock();
        if files.dirs.contains(path) {
            return Ok(true);
        }
        let (dir, name) = split(path)?;
        Ok(files.files.get(&dir).is_some_and(|f| f.contains_key(&name)))
    }

    fn list_files(&self, dir: &Path) -> io::Result<Vec<String>> {
        let files = self.lock();
        if !files.dirs.contains(dir) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        Ok(files.files.get(dir).map(|f| f.keys().cloned().collect()).unwrap_or_default())
    }

    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.read(path).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
}
