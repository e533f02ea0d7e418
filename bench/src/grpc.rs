//! Loopback gRPC streaming throughput: the ceiling the feed's transport
//! puts on `bench feed` and `bench scan`.
//!
//! An in-process tonic server answers `EventFeed` by streaming one
//! prebuilt `ChangeDataEvent` over and over; a client on a loopback TCP
//! connection reads for the given time. No storage, no feed logic: only
//! protobuf encoding, HTTP/2 framing and the kernel's loopback, with the
//! same tonic and the same message type as the real feed. The message is
//! cloned per send (as the feed produces a fresh one each time), so that
//! copy is part of the figure too.

use std::pin::Pin;
use std::time::{Duration, Instant};

use kvfeed_proto::cdcpb::change_data_client::ChangeDataClient;
use kvfeed_proto::cdcpb::change_data_server::{ChangeData, ChangeDataServer};
use kvfeed_proto::cdcpb::event::{Entries, LogType, Row, row::OpType};
use kvfeed_proto::cdcpb::{ChangeDataEvent, ChangeDataRequest, Event, event};
use prost::Message;
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::BenchError;
use super::subscribe::connect;

/// Largest message the measurement accepts (the feed's own cap).
pub const MAX_MESSAGE_SIZE: usize = kvfeed_client::feed::MAX_EVENT_SIZE;
/// Bytes of each row's value in the streamed message.
const ROW_VALUE: usize = 1024;
/// Bound on the messages one call streams, whatever the client does.
const MAX_MESSAGES: usize = 100_000_000;

/// What the client received.
#[derive(Debug, Clone, Copy)]
pub struct GrpcResult {
    /// Messages received and decoded before the time was up.
    pub messages: u64,
    /// Encoded size of each message.
    pub message_bytes: usize,
    /// Time spent reading: from the open call to the deadline (or the
    /// stream's end); messages / elapsed is the rate.
    pub elapsed: Duration,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ChangeDataEvent, Status>> + Send>>;

struct Source {
    message: ChangeDataEvent,
}

#[tonic::async_trait]
impl ChangeData for Source {
    type EventFeedStream = EventStream;
    type EventFeedV2Stream = EventStream;

    async fn event_feed(
        &self,
        _request: Request<Streaming<ChangeDataRequest>>,
    ) -> Result<Response<EventStream>, Status> {
        let messages = std::iter::repeat_n(self.message.clone(), MAX_MESSAGES).map(Ok);
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }

    async fn event_feed_v2(
        &self,
        _request: Request<Streaming<ChangeDataRequest>>,
    ) -> Result<Response<EventStream>, Status> {
        Err(Status::unimplemented(
            "the benchmark source serves EventFeed only",
        ))
    }
}

/// A message of rows of 1 KiB values, about `size` bytes
/// encoded (never less than one row).
pub fn message_of(size: usize) -> ChangeDataEvent {
    let mut entries = Entries::default();
    loop {
        let value_len = ROW_VALUE.min(size.saturating_sub(64)).max(1);
        entries.entries.push(Row {
            start_ts: 1,
            commit_ts: 2,
            r#type: LogType::Committed.into(),
            op_type: OpType::Put.into(),
            key: format!("bench/{:010}", entries.entries.len())
                .into_bytes()
                .into(),
            value: vec![b'v'; value_len].into(),
            ..Row::default()
        });
        // The framing around the rows is a few bytes: build the message
        // only when the rows alone come close.
        if entries.encoded_len() + 32 < size {
            continue;
        }
        let message = ChangeDataEvent {
            events: vec![Event {
                region_id: 1,
                request_id: 1,
                event: Some(event::Event::Entries(entries.clone())),
                ..Event::default()
            }],
            ..ChangeDataEvent::default()
        };
        if message.encoded_len() >= size {
            return message;
        }
    }
}

/// Streams messages of about `size` bytes for `duration` over loopback.
pub async fn measure(size: usize, duration: Duration) -> Result<GrpcResult, BenchError> {
    let message = message_of(size);
    let message_bytes = message.encoded_len();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| BenchError::Feed(format!("cannot listen on loopback: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BenchError::Feed(format!("no local address: {e}")))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service =
        ChangeDataServer::new(Source { message }).max_encoding_message_size(MAX_MESSAGE_SIZE);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    let result = async {
        let channel = connect(&addr.to_string()).await?;
        let mut client = ChangeDataClient::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE);
        // The request side stays open (and empty) while reading.
        let (_requests, rx) = tokio::sync::mpsc::channel::<ChangeDataRequest>(1);
        let mut events = client
            .event_feed(ReceiverStream::new(rx))
            .await
            .map_err(|s| BenchError::Feed(format!("EventFeed failed: {s}")))?
            .into_inner();
        let started = Instant::now();
        let until = tokio::time::Instant::now() + duration;
        let mut messages = 0u64;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                next = events.message() => match next {
                    Ok(Some(_)) => messages += 1,
                    Ok(None) => break,
                    Err(s) => return Err(BenchError::Feed(format!("the stream failed: {s}"))),
                },
            }
        }
        Ok(GrpcResult {
            messages,
            message_bytes,
            elapsed: started.elapsed(),
        })
    }
    .await;
    let _ = stop.send(());
    // The server ends once the client's connection is gone.
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_requested_size() {
        for size in [1, 100, 4096, 65_536, 1 << 20] {
            let m = message_of(size);
            let len = m.encoded_len();
            assert!(len >= size, "{size}: {len}");
            assert!(len <= size + ROW_VALUE + 128, "{size}: {len}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_flow_over_loopback() {
        let result = measure(4096, Duration::from_millis(100))
            .await
            .expect("loopback streaming works");
        assert!(result.messages > 0, "{result:?}");
        assert!(result.message_bytes >= 4096);
    }
}
