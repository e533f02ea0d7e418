//! INTERFACE STUB — to be implemented.
use kvfeed_client::feed::Row;
use kvfeed_types::TimeStamp;

use super::{Sink, SinkError};
use crate::def::ChangefeedDef;

/// NDJSON files in a directory.
#[derive(Debug)]
pub struct FileSink {}

impl Sink for FileSink {
    async fn open(&mut self, def: &ChangefeedDef) -> Result<Option<TimeStamp>, SinkError> {
        todo!("{def:?}")
    }
    async fn begin_window(&mut self, from: TimeStamp, to: TimeStamp) -> Result<(), SinkError> {
        todo!("{from} {to}")
    }
    async fn write(&mut self, rows: &[Row]) -> Result<(), SinkError> {
        todo!("{rows:?}")
    }
    async fn commit_window(&mut self) -> Result<(), SinkError> {
        todo!()
    }
}
impl FileSink {
    /// stub
    pub fn new(dir: std::path::PathBuf) -> FileSink {
        todo!("{dir:?}")
    }
}
/// stub
#[derive(Debug)]
pub struct FileSinkReader {}
impl FileSinkReader {
    /// stub
    pub fn open(dir: &std::path::Path) -> Result<FileSinkReader, SinkError> {
        todo!("{dir:?}")
    }
    /// stub
    pub fn def(&self) -> &ChangefeedDef {
        todo!()
    }
    /// stub
    pub fn checkpoint(&self) -> Option<TimeStamp> {
        todo!()
    }
    /// stub
    pub fn rows(
        &self,
    ) -> Result<impl Iterator<Item = Result<(Row, String), SinkError>>, SinkError> {
        Ok(std::iter::empty())
    }
}
