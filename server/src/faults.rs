//! Test-only fault injection into the change feed, so that consumers'
//! recovery can be tested against the real server.
//!
//! Off unless `kvfeed serve` runs with the hidden `--fault-injection` flag;
//! then `GET /debug/fault/feed?inject=KIND` on the status address makes
//! every open feed call, at once:
//! - `epoch_not_match`, `not_leader`, `region_not_found`, `server_is_busy`:
//!   end each of its live subscriptions with that region error, exactly as
//!   the server ends one on a real region change: the error event, then
//!   nothing more for that subscription (it is deregistered, and anything
//!   already queued for it is dropped on the way out);
//! - `drop_stream`: end the call with UNAVAILABLE, as a lost connection
//!   looks to the client.
//!
//! Invariant: without an injection, a call behaves exactly as without this
//! module — the hook adds one branch to the request loop and one check on
//! the way out, nothing else.

use std::collections::HashSet;
use std::str::FromStr;

use kvfeed_proto::cdcpb::change_data_request::{self, Deregister};
use kvfeed_proto::cdcpb::{self, ChangeDataEvent, ChangeDataRequest};
use kvfeed_proto::errorpb::{EpochNotMatch, NotLeader, RegionNotFound, ServerIsBusy};
use tokio::sync::{mpsc, watch};

/// What to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedFault {
    EpochNotMatch,
    NotLeader,
    RegionNotFound,
    ServerIsBusy,
    DropStream,
}

impl FromStr for FeedFault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "epoch_not_match" => FeedFault::EpochNotMatch,
            "not_leader" => FeedFault::NotLeader,
            "region_not_found" => FeedFault::RegionNotFound,
            "server_is_busy" => FeedFault::ServerIsBusy,
            "drop_stream" => FeedFault::DropStream,
            other => return Err(format!("unknown feed fault {other:?}")),
        })
    }
}

impl FeedFault {
    /// The region error this fault sends, `None` for a dropped stream.
    fn region_error(self, region_id: u64) -> Option<cdcpb::Error> {
        let mut error = cdcpb::Error::default();
        match self {
            FeedFault::EpochNotMatch => error.epoch_not_match = Some(EpochNotMatch::default()),
            FeedFault::NotLeader => {
                error.not_leader = Some(NotLeader {
                    region_id,
                    ..NotLeader::default()
                });
            }
            FeedFault::RegionNotFound => {
                error.region_not_found = Some(RegionNotFound { region_id });
            }
            FeedFault::ServerIsBusy => {
                error.server_is_busy = Some(ServerIsBusy {
                    reason: "injected".to_owned(),
                    ..ServerIsBusy::default()
                });
            }
            FeedFault::DropStream => return None,
        }
        Some(error)
    }
}

/// The node's switch: injections reach every call open at that moment.
#[derive(Debug, Clone)]
pub struct FeedFaults {
    tx: watch::Sender<Option<FeedFault>>,
}

impl Default for FeedFaults {
    fn default() -> Self {
        FeedFaults {
            tx: watch::Sender::new(None),
        }
    }
}

impl FeedFaults {
    /// Injects `fault` into every open call.
    pub fn inject(&self, fault: FeedFault) {
        self.tx.send_replace(Some(fault));
    }

    /// The hook of one call: its request side and its response side.
    pub(crate) fn call(&self) -> (RequestHook, ResponseHook) {
        let (tx, rx) = mpsc::unbounded_channel();
        let request = RequestHook {
            faults: self.tx.subscribe(),
            live: HashSet::new(),
            pending: Vec::new(),
            injected: tx,
        };
        let response = ResponseHook {
            injected: rx,
            killed: HashSet::new(),
        };
        (request, response)
    }
}

/// What the request side tells the response side.
#[derive(Debug)]
pub(crate) enum Injected {
    /// Send this error for (request id, region id), then nothing more of it.
    Error(u64, u64, Box<cdcpb::Error>),
    /// End the call with UNAVAILABLE.
    Drop,
}

/// The request side: knows the call's live subscriptions and deregisters
/// them when a region error is injected.
#[derive(Debug)]
pub(crate) struct RequestHook {
    faults: watch::Receiver<Option<FeedFault>>,
    live: HashSet<(u64, u64)>,
    /// Deregister requests still to hand to the connection.
    pending: Vec<ChangeDataRequest>,
    injected: mpsc::UnboundedSender<Injected>,
}

impl RequestHook {
    /// Notes what a client request does to the live set.
    pub(crate) fn saw(&mut self, request: &ChangeDataRequest) {
        let key = (request.request_id, request.region_id);
        match &request.request {
            None | Some(change_data_request::Request::Register(_)) => {
                self.live.insert(key);
            }
            Some(change_data_request::Request::Deregister(_)) if request.region_id == 0 => {
                self.live.retain(|(id, _)| *id != request.request_id);
            }
            Some(change_data_request::Request::Deregister(_)) => {
                self.live.remove(&key);
            }
            Some(_) => {}
        }
    }

    /// A request the hook makes on the client's behalf, if any is due.
    pub(crate) fn next_injected(&mut self) -> Option<ChangeDataRequest> {
        self.pending.pop()
    }

    /// Waits for an injection and turns it into requests and events.
    /// Never resolves once the switch is gone.
    pub(crate) async fn injection(&mut self) {
        if self.faults.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        let Some(fault) = *self.faults.borrow_and_update() else {
            return;
        };
        if fault == FeedFault::DropStream {
            let _ = self.injected.send(Injected::Drop);
            return;
        }
        for (request_id, region_id) in self.live.drain() {
            let Some(error) = fault.region_error(region_id) else {
                continue;
            };
            // The response side hears first, so nothing queued after the
            // error can slip out before the deregistration lands.
            let _ = self
                .injected
                .send(Injected::Error(request_id, region_id, Box::new(error)));
            self.pending.push(ChangeDataRequest {
                request_id,
                region_id,
                request: Some(change_data_request::Request::Deregister(Deregister {})),
                ..ChangeDataRequest::default()
            });
        }
    }
}

/// The response side: sends injected errors and hides what follows them.
#[derive(Debug)]
pub(crate) struct ResponseHook {
    injected: mpsc::UnboundedReceiver<Injected>,
    killed: HashSet<(u64, u64)>,
}

/// What the response stream should do next.
pub(crate) enum Outgoing {
    Event(ChangeDataEvent),
    Drop,
}

impl ResponseHook {
    /// An injection ready to go out, if any.
    pub(crate) fn poll_injected(&mut self, cx: &mut std::task::Context<'_>) -> Option<Outgoing> {
        match self.injected.poll_recv(cx) {
            std::task::Poll::Ready(Some(Injected::Error(request_id, region_id, error))) => {
                self.killed.insert((request_id, region_id));
                Some(Outgoing::Event(ChangeDataEvent {
                    events: vec![cdcpb::Event {
                        region_id,
                        request_id,
                        event: Some(cdcpb::event::Event::Error(*error)),
                        ..cdcpb::Event::default()
                    }],
                    resolved_ts: None,
                }))
            }
            std::task::Poll::Ready(Some(Injected::Drop)) => Some(Outgoing::Drop),
            std::task::Poll::Ready(None) | std::task::Poll::Pending => None,
        }
    }

    /// `event` without what belongs to subscriptions ended by an injected
    /// error; `None` when nothing is left of it.
    pub(crate) fn filter(&self, mut event: ChangeDataEvent) -> Option<ChangeDataEvent> {
        if self.killed.is_empty() {
            return Some(event);
        }
        let killed = |rid: u64, region: u64| self.killed.contains(&(rid, region));
        event.events.retain(|e| !killed(e.request_id, e.region_id));
        if let Some(resolved) = &mut event.resolved_ts {
            let rid = resolved.request_id;
            resolved.regions.retain(|r| !killed(rid, *r));
            if resolved.regions.is_empty() {
                event.resolved_ts = None;
            }
        }
        (!event.events.is_empty() || event.resolved_ts.is_some()).then_some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfeed_proto::cdcpb::ResolvedTs;

    #[test]
    fn kinds_parse_and_unknown_ones_are_refused() {
        assert_eq!("not_leader".parse(), Ok(FeedFault::NotLeader));
        assert_eq!("drop_stream".parse(), Ok(FeedFault::DropStream));
        assert!("split".parse::<FeedFault>().is_err());
    }

    #[tokio::test]
    async fn an_injected_error_deregisters_and_hides_what_follows() {
        let faults = FeedFaults::default();
        let (mut requests, mut responses) = faults.call();
        let register = |request_id, region_id| ChangeDataRequest {
            request_id,
            region_id,
            ..ChangeDataRequest::default()
        };
        requests.saw(&register(1, 2));
        requests.saw(&register(1, 3));
        faults.inject(FeedFault::EpochNotMatch);
        requests.injection().await;
        let mut deregistered = [requests.next_injected(), requests.next_injected()];
        deregistered.sort_by_key(|r| r.as_ref().map(|r| r.region_id));
        assert_eq!(
            deregistered
                .iter()
                .map(|r| r.as_ref().map(|r| (r.request_id, r.region_id)))
                .collect::<Vec<_>>(),
            [Some((1, 2)), Some((1, 3))]
        );
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        for _ in 0..2 {
            let Some(Outgoing::Event(event)) = responses.poll_injected(&mut cx) else {
                panic!("an error event");
            };
            assert!(matches!(
                &event.events[0].event,
                Some(cdcpb::event::Event::Error(e)) if e.epoch_not_match.is_some()
            ));
        }
        let late = ChangeDataEvent {
            events: vec![cdcpb::Event {
                request_id: 1,
                region_id: 2,
                ..cdcpb::Event::default()
            }],
            resolved_ts: Some(ResolvedTs {
                regions: vec![2, 3],
                ts: 9,
                request_id: 1,
            }),
        };
        assert_eq!(responses.filter(late), None);
    }
}
