//! INTERFACE STUB — to be implemented.
use kvfeed_client::feed::Row;
use kvfeed_types::TimeStamp;

use super::{Sink, SinkError};
use crate::def::ChangefeedDef;

/// POSTs to an HTTP endpoint.
#[derive(Debug)]
pub struct WebhookSink {}

impl Sink for WebhookSink {
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
/// stub
#[derive(Debug, Default)]
pub struct WebhookOptions {}
impl WebhookSink {
    /// stub
    pub fn new(url: String, dir: std::path::PathBuf, o: WebhookOptions) -> WebhookSink {
        todo!("{dir:?}{url}{o:?}")
    }
}
