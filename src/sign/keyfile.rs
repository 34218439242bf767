//! Writing a new key pair to disk: create-only, with the right modes from
//! the first instant, synced, and cleaned up on failure.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::keys::{generate, SignError};

/// The secret key file is readable by its owner only, from the moment it
/// exists (it is created with this mode, never chmod-ed afterwards).
const SECRET_KEY_MODE: u32 = 0o600;

/// The public key file is meant to be copied to every CP and agent.
const PUBLIC_KEY_MODE: u32 = 0o644;

/// (mode 0644). Neither file is ever overwritten: an existing key may be the
/// only copy of a release key that every host trusts. On any failure the
/// files this call created are removed, so a retry starts clean.
pub fn write_keypair(prefix: &Path) -> Result<(PathBuf, PathBuf), SignError> {
    let key = generate()?;
    let key_path = with_suffix(prefix, ".key");
    let pub_path = with_suffix(prefix, ".pub");

    let key_file = create_new(&key_path, SECRET_KEY_MODE)?;
    let pub_file = match create_new(&pub_path, PUBLIC_KEY_MODE) {
        Ok(file) => file,
        Err(err) => {
            remove_created(&[&key_path]);
            return Err(err);
        }
    };

    let written = (|| {
        // The umask may have narrowed 0644; the public key must stay
        // readable by the CP and agent users it is copied for.
        pub_file
            .set_permissions(<std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(PUBLIC_KEY_MODE))?;
        write_line_and_sync(key_file, &key.to_text())?;
        write_line_and_sync(pub_file, &key.public_key().to_text())?;
        sync_parent_dir(&key_path)
    })();
    if let Err(err) = written {
        remove_created(&[&key_path, &pub_path]);
        return Err(err);
    }
    Ok((key_path, pub_path))
}

/// replace a dotted prefix such as `release.2026`.
fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Create a file that must not exist yet, with `mode` from the first
/// instant (no window where a secret is world-readable).
fn create_new(path: &Path, mode: u32) -> Result<fs_err::File, SignError> {
    use fs_err::os::unix::fs::OpenOptionsExt as _;
    fs_err::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|err| {
        if err.kind() == std::io::ErrorKind::AlreadyExists {
            SignError::KeyExists { path: path.to_owned() }
        } else {
            SignError::Io(err)
        }
    })
}

fn write_line_and_sync(mut file: fs_err::File, line: &str) -> Result<(), SignError> {
    file.write_all(line.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok(())
}

/// fsync the directory so the new names survive a crash, not just the data.
fn sync_parent_dir(path: &Path) -> Result<(), SignError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs_err::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Best-effort removal of files this process just created. Failure is
/// ignored on purpose: the caller is already returning the error that
/// matters, and a leftover file is reported by `KeyExists` on retry.
fn remove_created(paths: &[&Path]) {
    for path in paths {
        let _ = fs_err::remove_file(path);
    }
}
