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
