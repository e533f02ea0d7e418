//! The file sink: NDJSON files in a directory, and their reader for
//! `kvfeed verify`.
//!
//! Layout of the directory:
//! - `changefeed.json`: the definition; `checkpoint.json`:
//!   `{"checkpoint_ts":N}`; `LOCK`: locked while a sink writes here.
//! - `<from:020>-<to:020>.ndjson`: the rows committed in `(from, to]`, one
//!   [`format::encode`]d row per line, in window order. Zero-padded, so the
//!   names sort by commit ts. A window without rows writes no data file;
//!   so the files still chain, a file's `from` is where the previous data
//!   file ended (the definition's start ts for the first one): the empty
//!   windows between are folded into it. Hence every data file's `from` is
//!   the `to` of the one before, which [`FileSinkReader`] checks.
//!
//! Crash safety (rule 2 of the sink contract): a window's rows go to
//! `<name>.tmp`, which is fsynced, renamed to `<name>` and the directory
//! fsynced before `checkpoint.json` is replaced. So a data file under its
//! final name is always complete, and since windows are written in order a
//! data file beyond `checkpoint.json` was durably delivered: `open` rolls
//! the checkpoint forward to the largest `to` of the data files and
//! deletes the `*.tmp` leftovers of an interrupted window.
//!
//! Rows are encoded on the caller's task into a buffer that goes to the
//! file (on the blocking pool) whenever it holds [`FLUSH_BYTES`], so a
//! window of any size streams through a bounded buffer. After any error or
//! a cancelled call the sink must be reopened; reopening recovers.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use kvfeed_client::feed::Row;
use kvfeed_types::TimeStamp;

use super::state::{self, StateDir, TMP_SUFFIX, blocking, fsync_dir, io_err, not_open};
use super::{Sink, SinkError};
use crate::def::ChangefeedDef;
use crate::format;

/// The checkpoint file of the file sink.
pub const CHECKPOINT_FILE: &str = "checkpoint.json";
/// The data files' suffix.
pub const DATA_SUFFIX: &str = ".ndjson";
/// Encoded rows are written to the file in chunks of about this size.
pub const FLUSH_BYTES: usize = 256 * 1024;

/// NDJSON files in a directory; see the module comment.
#[derive(Debug)]
pub struct FileSink {
    dir: PathBuf,
    /// Moved to the blocking pool during file I/O; `None` when not open.
    open: Option<Box<Open>>,
}

#[derive(Debug)]
struct Open {
    state: StateDir,
    /// Where the last data file ends (the start ts before the first one).
    covered: TimeStamp,
    window: Option<Window>,
}

#[derive(Debug)]
struct Window {
    from: TimeStamp,
    to: TimeStamp,
    /// The data file's name, `<covered>-<to>.ndjson`.
    name: String,
    /// `<name>.tmp`, created with the first flush.
    file: Option<File>,
    buf: Vec<u8>,
    rows: u64,
}

/// A complete data file, as its name describes it.
#[derive(Debug, Clone)]
struct DataFile {
    name: String,
    from: TimeStamp,
    to: TimeStamp,
}

fn data_name(from: TimeStamp, to: TimeStamp) -> String {
    format!(
        "{:020}-{:020}{DATA_SUFFIX}",
        from.into_inner(),
        to.into_inner()
    )
}

fn parse_data_name(name: &str) -> Option<DataFile> {
    let stem = name.strip_suffix(DATA_SUFFIX)?;
    let (from, to) = stem.split_once('-')?;
    let ts = |s: &str| {
        (s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok().map(TimeStamp::new))
            .flatten()
    };
    Some(DataFile {
        name: name.to_owned(),
        from: ts(from)?,
        to: ts(to)?,
    })
}

/// The complete data files in `dir`, in name (= commit ts) order.
fn data_files(dir: &Path) -> Result<Vec<DataFile>, SinkError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if let Some(file) = entry.file_name().to_str().and_then(parse_data_name) {
            files.push(file);
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

impl FileSink {
    /// A sink writing into `dir` (created by `open` if missing).
    pub fn new(dir: PathBuf) -> FileSink {
        FileSink { dir, open: None }
    }

    /// Runs `f` on the open state on the blocking pool; on an error the
    /// state is dropped (releasing the lock) and the sink must be reopened.
    async fn on_pool(
        &mut self,
        f: impl FnOnce(&mut Open) -> Result<(), SinkError> + Send + 'static,
    ) -> Result<(), SinkError> {
        let mut open = self.open.take().ok_or_else(not_open)?;
        let (open, result) = blocking(move || {
            let result = f(&mut open);
            (open, result)
        })
        .await?;
        if result.is_ok() {
            self.open = Some(open);
        }
        result
    }
}

impl Open {
    /// Appends the buffered rows to the window's temporary file.
    fn flush(&mut self) -> Result<(), SinkError> {
        let dir = self.state.dir();
        let Some(w) = self.window.as_mut() else {
            return Ok(());
        };
        let tmp = dir.join(format!("{}{TMP_SUFFIX}", w.name));
        let file = match &mut w.file {
            Some(file) => file,
            None => w.file.insert(File::create(&tmp).map_err(io_err(&tmp))?),
        };
        file.write_all(&w.buf).map_err(io_err(&tmp))?;
        w.buf.clear();
        Ok(())
    }

    /// Makes the window's data file durable under its final name, which
    /// makes the window's end the checkpoint; a window without rows writes
    /// the checkpoint file instead.
    fn commit(&mut self) -> Result<(), SinkError> {
        let Some(w) = &self.window else {
            return Err(SinkError::Protocol {
                reason: "commit_window without begin_window".to_owned(),
            });
        };
        let to = w.to;
        if w.rows > 0 {
            self.flush()?;
            let dir = self.state.dir().to_owned();
            if let Some(w) = self.window.as_mut()
                && let Some(file) = w.file.take()
            {
                let path = dir.join(&w.name);
                let tmp = dir.join(format!("{}{TMP_SUFFIX}", w.name));
                file.sync_data().map_err(io_err(&tmp))?;
                drop(file);
                fs::rename(&tmp, &path).map_err(io_err(&path))?;
                fsync_dir(&dir)?;
            }
            self.covered = to;
            // The data file's name ends with `to`, and `open` and the
            // reader roll the checkpoint forward to the last data file: two
            // fsyncs per window instead of four.
            self.state.note_checkpoint(to);
        } else {
            self.state.set_checkpoint(to)?;
        }
        self.window = None;
        Ok(())
    }
}

impl Sink for FileSink {
    async fn open(&mut self, def: &ChangefeedDef) -> Result<Option<TimeStamp>, SinkError> {
        // Release an earlier open's lock before taking it again.
        self.open = None;
        let dir = self.dir.clone();
        let def = def.clone();
        let (open, checkpoint) = blocking(move || {
            let lock = StateDir::lock(&dir)?;
            let files = data_files(&dir)?;
            let last = files.last().map(|f| f.to);
            let (state, checkpoint) = StateDir::adopt(&dir, lock, CHECKPOINT_FILE, &def, last)?;
            let covered = last.unwrap_or(state.def().start_ts);
            let open = Open {
                state,
                covered,
                window: None,
            };
            Ok::<_, SinkError>((open, checkpoint))
        })
        .await??;
        self.open = Some(Box::new(open));
        Ok(checkpoint)
    }

    async fn begin_window(&mut self, from: TimeStamp, to: TimeStamp) -> Result<(), SinkError> {
        let open = self.open.as_mut().ok_or_else(not_open)?;
        open.state.check_window(from, to, open.window.is_some())?;
        open.window = Some(Window {
            from,
            to,
            name: data_name(open.covered, to),
            file: None,
            buf: Vec::with_capacity(FLUSH_BYTES + FLUSH_BYTES / 4),
            rows: 0,
        });
        Ok(())
    }

    async fn write(&mut self, mut rows: &[Row]) -> Result<(), SinkError> {
        while !rows.is_empty() {
            let open = self.open.as_mut().ok_or_else(not_open)?;
            let def = open.state.def();
            let w = open.window.as_mut().ok_or_else(|| SinkError::Protocol {
                reason: "write without begin_window".to_owned(),
            })?;
            let mut done = 0;
            let mut misplaced = None;
            for row in rows {
                if row.commit_ts <= w.from || row.commit_ts > w.to {
                    misplaced = Some(format!(
                        "a row committed at {} in the window ({}, {}]",
                        row.commit_ts, w.from, w.to
                    ));
                    break;
                }
                format::encode(def, row, &mut w.buf);
                w.buf.push(b'\n');
                w.rows += 1;
                done += 1;
                if w.buf.len() >= FLUSH_BYTES {
                    break;
                }
            }
            if let Some(reason) = misplaced {
                // The window is broken: the sink must be reopened.
                self.open = None;
                return Err(SinkError::Protocol { reason });
            }
            rows = &rows[done..];
            if w.buf.len() >= FLUSH_BYTES {
                self.on_pool(Open::flush).await?;
            }
        }
        Ok(())
    }

    async fn commit_window(&mut self) -> Result<(), SinkError> {
        self.on_pool(Open::commit).await
    }
}

/// Reads a file sink's directory without changing it (no lock needed):
/// its definition, its checkpoint and its rows.
#[derive(Debug)]
pub struct FileSinkReader {
    dir: PathBuf,
    def: ChangefeedDef,
    checkpoint: Option<TimeStamp>,
    files: Vec<DataFile>,
}

/// One row of a data file, with where it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRow {
    /// The data file's name.
    pub file: String,
    /// 1-based line number in it.
    pub line: u64,
    /// The decoded row.
    pub row: Row,
}

impl FileSinkReader {
    /// Reads the definition and checkpoint of the file sink in `dir`.
    pub fn open(dir: &Path) -> Result<FileSinkReader, SinkError> {
        let def = state::read_def(dir)?.ok_or_else(|| SinkError::Corrupt {
            path: dir.join(state::DEF_FILE),
            reason: "missing: not a changefeed's file sink".to_owned(),
        })?;
        let files = data_files(dir)?;
        let in_file = state::read_checkpoint(dir, CHECKPOINT_FILE)?;
        Ok(FileSinkReader {
            dir: dir.to_owned(),
            def,
            checkpoint: in_file.max(files.last().map(|f| f.to)),
            files,
        })
    }

    /// The stored definition.
    pub fn def(&self) -> &ChangefeedDef {
        &self.def
    }

    /// The checkpoint, rolled forward over complete data files as `open`
    /// of the sink would; `None` when nothing was delivered.
    pub fn checkpoint(&self) -> Option<TimeStamp> {
        self.checkpoint
    }

    /// The data files' names, in commit ts order.
    pub fn data_files(&self) -> impl Iterator<Item = &str> {
        self.files.iter().map(|f| f.name.as_str())
    }

    /// Every row of every data file, in order, read as it goes. Damage is
    /// reported as an item and reading goes on: a line that does not decode
    /// ([`SinkError::BadRow`]), a data file that does not start where the
    /// previous one ended (a gap or an overlap) or a row outside its file's
    /// range ([`SinkError::Corrupt`]). An I/O error ends the iteration.
    pub fn rows(&self) -> FileRows {
        FileRows {
            dir: self.dir.clone(),
            def: self.def.clone(),
            files: self.files.iter().cloned().collect(),
            expected_from: self.def.start_ts,
            current: None,
            buf: Vec::new(),
            done: false,
        }
    }
}

/// The iterator of [`FileSinkReader::rows`].
#[derive(Debug)]
pub struct FileRows {
    dir: PathBuf,
    def: ChangefeedDef,
    files: VecDeque<DataFile>,
    expected_from: TimeStamp,
    current: Option<(DataFile, BufReader<File>, u64)>,
    buf: Vec<u8>,
    done: bool,
}

impl Iterator for FileRows {
    type Item = Result<FileRow, SinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            let Some((file, reader, line)) = &mut self.current else {
                let file = self.files.pop_front()?;
                let path = self.dir.join(&file.name);
                let reader = match File::open(&path) {
                    Ok(f) => BufReader::with_capacity(FLUSH_BYTES, f),
                    Err(e) => {
                        self.done = true;
                        return Some(Err(io_err(&path)(e)));
                    }
                };
                let expected = self.expected_from;
                self.expected_from = file.to;
                let chains = file.from == expected && file.from <= file.to;
                self.current = Some((file.clone(), reader, 0));
                if !chains {
                    let kind = if file.from > expected {
                        "a gap"
                    } else {
                        "an overlap"
                    };
                    return Some(Err(SinkError::Corrupt {
                        path,
                        reason: format!(
                            "{kind}: the data file starts at {} but the previous one (or the start ts) ends at {expected}",
                            file.from
                        ),
                    }));
                }
                continue;
            };
            self.buf.clear();
            match reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => {
                    self.current = None;
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(io_err(&self.dir.join(&file.name))(e)));
                }
            }
            *line += 1;
            let text = self.buf.strip_suffix(b"\n").unwrap_or(&self.buf);
            let path = || self.dir.join(&file.name);
            let row = match format::decode(self.def.format, text) {
                Ok(row) => row,
                Err(source) => {
                    return Some(Err(SinkError::BadRow {
                        path: path(),
                        line: *line,
                        source,
                    }));
                }
            };
            if row.commit_ts <= file.from || row.commit_ts > file.to {
                return Some(Err(SinkError::Corrupt {
                    path: path(),
                    reason: format!(
                        "line {line}: a row committed at {} outside the file's range",
                        row.commit_ts
                    ),
                }));
            }
            return Some(Ok(FileRow {
                file: file.name.clone(),
                line: *line,
                row,
            }));
        }
    }
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
