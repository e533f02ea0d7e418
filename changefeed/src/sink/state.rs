//! A changefeed's definition, checkpoint and lock in a directory: the part
//! of a sink's state that the file sink keeps beside its data and the
//! webhook sink keeps locally (an HTTP endpoint cannot be read back).
//!
//! Invariants:
//! - Every state file is replaced atomically: written under `<name>.tmp`,
//!   fsynced, renamed into place, and the directory fsynced. A crash leaves
//!   the old or the new content, never a mix; leftover `*.tmp` files are
//!   deleted when the directory is next locked.
//! - `LOCK` is locked exclusively (`File::try_lock`) for as long as the
//!   [`StateDir`] lives, so two sinks never write one directory; the OS
//!   drops the lock when the process dies.
//!
//! All functions here block; the sinks call them on the blocking pool.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use kvfeed_types::TimeStamp;
use serde::{Deserialize, Serialize};

use super::SinkError;
use crate::def::ChangefeedDef;

/// The stored definition.
pub(crate) const DEF_FILE: &str = "changefeed.json";
/// The lock file.
pub(crate) const LOCK_FILE: &str = "LOCK";
/// The suffix of files not yet renamed into place.
pub(crate) const TMP_SUFFIX: &str = ".tmp";

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    checkpoint_ts: u64,
}

/// An I/O error on `path` after the sink was opened.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SinkError + '_ {
    move |source| SinkError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Makes the directory's entries (creations, renames, removals) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), SinkError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Replaces `dir/name` with `bytes` atomically and durably.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    fsync_dir(dir)
}

/// The definition stored in `dir`, if any.
pub(crate) fn read_def(dir: &Path) -> Result<Option<ChangefeedDef>, SinkError> {
    let path = dir.join(DEF_FILE);
    let Some(text) = read_optional(&path)? else {
        return Ok(None);
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| SinkError::Corrupt {
            path,
            reason: format!("not a changefeed definition: {e}"),
        })
}

/// The checkpoint stored in `dir/name`, if any.
pub(crate) fn read_checkpoint(dir: &Path, name: &str) -> Result<Option<TimeStamp>, SinkError> {
    let path = dir.join(name);
    let Some(text) = read_optional(&path)? else {
        return Ok(None);
    };
    serde_json::from_slice::<Checkpoint>(&text)
        .map(|c| Some(TimeStamp::new(c.checkpoint_ts)))
        .map_err(|e| SinkError::Corrupt {
            path,
            reason: format!("not a checkpoint: {e}"),
        })
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, SinkError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// A locked state directory.
#[derive(Debug)]
pub(crate) struct StateDir {
    dir: PathBuf,
    checkpoint_file: &'static str,
    /// Held for the lock; closing it releases the lock.
    _lock: File,
    def: ChangefeedDef,
    checkpoint: Option<TimeStamp>,
}

impl StateDir {
    /// Creates `dir` if missing, locks it and deletes leftover `*.tmp`
    /// files. Then the caller learns what else the directory holds and
    /// calls [`StateDir::adopt`].
    pub(crate) fn lock(dir: &Path) -> Result<File, SinkError> {
        let unwritable = |path: &Path| {
            let path = path.to_owned();
            move |source| SinkError::Unwritable { path, source }
        };
        fs::create_dir_all(dir).map_err(unwritable(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(unwritable(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(SinkError::Locked { path: lock_path }),
            Err(TryLockError::Error(e)) => return Err(unwritable(&lock_path)(e)),
        }
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            if entry.file_name().to_string_lossy().ends_with(TMP_SUFFIX) {
                fs::remove_file(entry.path()).map_err(unwritable(&entry.path()))?;
            }
        }
        Ok(lock)
    }

    /// Takes the locked directory for `def`: refuses another changefeed,
    /// rolls the checkpoint forward to `durable` (what the caller found
    /// durably delivered beyond the checkpoint file, e.g. complete data
    /// files) and stores the definition when the sink has none. Answers
    /// where to resume: the checkpoint, or the stored start ts when the
    /// changefeed has a definition here but no checkpoint yet; `None` for
    /// a fresh sink.
    pub(crate) fn adopt(
        dir: &Path,
        lock: File,
        checkpoint_file: &'static str,
        def: &ChangefeedDef,
        durable: Option<TimeStamp>,
    ) -> Result<(StateDir, Option<TimeStamp>), SinkError> {
        let stored = read_def(dir)?;
        if let Some(stored) = &stored
            && !def.same_feed(stored)
        {
            return Err(SinkError::DefMismatch {
                path: dir.join(DEF_FILE),
                stored: stored.id.clone(),
                given: def.id.clone(),
            });
        }
        let in_file = read_checkpoint(dir, checkpoint_file)?;
        let durable = in_file.max(durable);
        // A stored definition wins, with its start ts: a changefeed that
        // stopped before its first checkpoint resumes from where it began,
        // not from a later "now" it was restarted with.
        let (def, checkpoint) = match stored {
            Some(stored) => {
                let from = durable.unwrap_or(stored.start_ts);
                (stored, Some(from))
            }
            None => {
                let text = serde_json::to_vec_pretty(def).map_err(|e| SinkError::Corrupt {
                    path: dir.join(DEF_FILE),
                    reason: e.to_string(),
                })?;
                write_atomic(dir, DEF_FILE, &text)?;
                (def.clone(), durable)
            }
        };
        let state = StateDir {
            dir: dir.to_owned(),
            checkpoint_file,
            _lock: lock,
            def,
            checkpoint: in_file,
        };
        let mut state = state;
        if let Some(ts) = durable
            && in_file != durable
        {
            state.set_checkpoint(ts)?;
        }
        Ok((state, checkpoint))
    }

    /// The definition the sink holds.
    pub(crate) fn def(&self) -> &ChangefeedDef {
        &self.def
    }

    /// The directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the next window must start: the checkpoint, or the start ts of
    /// a fresh changefeed.
    pub(crate) fn next_from(&self) -> TimeStamp {
        self.checkpoint.unwrap_or(self.def.start_ts)
    }

    /// Checks that `(from, to]` is the next window and none is `open`.
    pub(crate) fn check_window(
        &self,
        from: TimeStamp,
        to: TimeStamp,
        open: bool,
    ) -> Result<(), SinkError> {
        check_window(self.next_from(), from, to, open)
    }

    /// Makes `ts` the checkpoint without writing the checkpoint file, for
    /// a caller whose own durable write already records it (a data file
    /// named after its window's end: readers roll forward to it).
    pub(crate) fn note_checkpoint(&mut self, ts: TimeStamp) {
        self.checkpoint = Some(ts);
    }

    /// Durably makes `ts` the checkpoint.
    pub(crate) fn set_checkpoint(&mut self, ts: TimeStamp) -> Result<(), SinkError> {
        let text = serde_json::to_vec(&Checkpoint {
            checkpoint_ts: ts.into_inner(),
        })
        .map_err(|e| SinkError::Corrupt {
            path: self.dir.join(self.checkpoint_file),
            reason: e.to_string(),
        })?;
        write_atomic(&self.dir, self.checkpoint_file, &text)?;
        self.checkpoint = Some(ts);
        Ok(())
    }
}

/// Checks that `(from, to]` is the window after checkpoint `expected`, and
/// that no window is `open` already: the runner's side of the protocol.
pub(crate) fn check_window(
    expected: TimeStamp,
    from: TimeStamp,
    to: TimeStamp,
    open: bool,
) -> Result<(), SinkError> {
    if from != expected || to < from || open {
        return Err(SinkError::Protocol {
            reason: format!(
                "window ({from}, {to}] does not start at the checkpoint {expected}, or another window is open"
            ),
        });
    }
    Ok(())
}

/// Runs blocking `f` on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SinkError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SinkError::Task {
            reason: e.to_string(),
        })
}

/// The error for a call on a sink that is not open.
pub(crate) fn not_open() -> SinkError {
    SinkError::Protocol {
        reason: "the sink is not open (never opened, or an earlier call failed or was cancelled: reopen it)".to_owned(),
    }
}
