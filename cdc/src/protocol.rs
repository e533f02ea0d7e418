//! What a client speaks: its protocol version and requested features.
//!
//! TiKV decides a connection's wire behaviour once, from the *first*
//! request's `header.ticdc_version`, and never revisits it: a client that
//! later sent another version would otherwise see the resolved-ts format
//! change under it. [`ProtocolVersion`] is therefore computed once per
//! connection (see `Connection::handle`) and is `Copy`.
//!
//! Parsing follows semver strictly, as TiKV does with the `semver` crate: a
//! string that is not `MAJOR.MINOR.PATCH[-PRE][+BUILD]` (a leading `v`,
//! leading zeros, missing parts) is version 0.0.0, the most conservative
//! behaviour. Only comparisons against release versions are needed, so a
//! pre-release is kept as a flag: `5.3.0-alpha` is below `5.3.0`, as in
//! semver precedence.
//!
//! [`Features`] come from the `features` metadata of `EventFeedV2` (a comma
//! list). An unknown feature is an error naming it, so the server can answer
//! UNIMPLEMENTED before anything is registered, as TiKV does.

use std::cmp::Ordering;
use std::fmt;

use kvfeed_proto::cdcpb::ChangeDataRequest;

use crate::error::FeedError;

/// A client's semantic version, reduced to what the feed compares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProtocolVersion {
    major: u64,
    minor: u64,
    patch: u64,
    pre_release: bool,
}

impl ProtocolVersion {
    /// The version of a client that sent none (or an invalid one).
    pub const ZERO: ProtocolVersion = ProtocolVersion::new(0, 0, 0);
    /// From this version on, resolved timestamps are batched in
    /// `ChangeDataEvent.resolved_ts`; older clients get per-region
    /// `Event.resolved_ts`.
    pub const BATCH_RESOLVED_TS: ProtocolVersion = ProtocolVersion::new(4, 0, 8);
    /// From this version on, the request's cluster id is checked.
    pub const VALIDATE_CLUSTER_ID: ProtocolVersion = ProtocolVersion::new(5, 3, 0);

    /// A release version (no pre-release part).
    pub const fn new(major: u64, minor: u64, patch: u64) -> Self {
        ProtocolVersion {
            major,
            minor,
            patch,
            pre_release: false,
        }
    }

    /// Parses `text` as semver; anything invalid is [`ProtocolVersion::ZERO`].
    pub fn parse(text: &str) -> ProtocolVersion {
        parse_semver(text).unwrap_or(ProtocolVersion::ZERO)
    }

    /// The version a request declares in its header (0.0.0 without one).
    pub fn of_request(req: &ChangeDataRequest) -> ProtocolVersion {
        req.header
            .as_ref()
            .map_or(ProtocolVersion::ZERO, |h| Self::parse(&h.ticdc_version))
    }

    /// Whether resolved timestamps go in batched form.
    pub fn batches_resolved_ts(self) -> bool {
        self >= Self::BATCH_RESOLVED_TS
    }

    /// Whether requests' cluster ids are validated.
    pub fn validates_cluster_id(self) -> bool {
        self >= Self::VALIDATE_CLUSTER_ID
    }

    fn precedence(self) -> (u64, u64, u64, bool) {
        // A release sorts above its pre-releases.
        (self.major, self.minor, self.patch, !self.pre_release)
    }
}

impl PartialOrd for ProtocolVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ProtocolVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        self.precedence().cmp(&other.precedence())
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        if self.pre_release {
            f.write_str("-pre")?;
        }
        Ok(())
    }
}

fn parse_semver(text: &str) -> Option<ProtocolVersion> {
    let (rest, _build) = match text.split_once('+') {
        Some((rest, build)) => (rest, Some(identifiers(build, false)?)),
        None => (text, None),
    };
    let (core, pre_release) = match rest.split_once('-') {
        Some((core, pre)) => {
            identifiers(pre, true)?;
            (core, true)
        }
        None => (rest, false),
    };
    let mut parts = core.split('.');
    let major = numeric(parts.next()?)?;
    let minor = numeric(parts.next()?)?;
    let patch = numeric(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    Some(ProtocolVersion {
        major,
        minor,
        patch,
        pre_release,
    })
}

/// A version number: digits, no leading zero (except `0` itself).
fn numeric(part: &str) -> Option<u64> {
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if part.len() > 1 && part.starts_with('0') {
        return None;
    }
    part.parse().ok()
}

/// Dot-separated identifiers of `[0-9A-Za-z-]`, none empty. In a
/// pre-release, purely numeric identifiers may not have leading zeros.
fn identifiers(list: &str, pre_release: bool) -> Option<()> {
    for id in list.split('.') {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return None;
        }
        if pre_release && id.bytes().all(|b| b.is_ascii_digit()) && numeric(id).is_none() {
            return None;
        }
    }
    Some(())
}

/// Optional protocol features a connection negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Features {
    /// `stream-multiplexing`: one connection carries many request ids (the
    /// feed supports this on every connection; the flag is recorded so it
    /// can be reported).
    pub stream_multiplexing: bool,
}

impl Features {
    /// The name of the only feature known today.
    pub const STREAM_MULTIPLEXING: &'static str = "stream-multiplexing";

    /// Parses the `features` metadata value: names separated by commas,
    /// surrounding whitespace and empty entries ignored.
    pub fn parse(list: &str) -> Result<Features, FeedError> {
        let mut features = Features::default();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                Self::STREAM_MULTIPLEXING => features.stream_multiplexing = true,
                other => return Err(FeedError::UnknownFeature(other.to_owned())),
            }
        }
        Ok(features)
    }

    /// The enabled features' names.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.stream_multiplexing {
            names.push(Self::STREAM_MULTIPLEXING);
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strict_semver() {
        let cases = [
            ("5.3.0", ProtocolVersion::new(5, 3, 0)),
            ("4.0.8+build.7", ProtocolVersion::new(4, 0, 8)),
            ("10.20.30", ProtocolVersion::new(10, 20, 30)),
            ("v5.3.0", ProtocolVersion::ZERO),
            ("5.3", ProtocolVersion::ZERO),
            ("5.3.0.1", ProtocolVersion::ZERO),
            ("05.3.0", ProtocolVersion::ZERO),
            ("5.3.0-", ProtocolVersion::ZERO),
            ("5.3.0-01", ProtocolVersion::ZERO),
            ("5.3.0+", ProtocolVersion::ZERO),
            ("", ProtocolVersion::ZERO),
            ("garbage", ProtocolVersion::ZERO),
        ];
        for (text, want) in cases {
            assert_eq!(ProtocolVersion::parse(text), want, "{text:?}");
        }
        let pre = ProtocolVersion::parse("5.3.0-alpha.1+abc");
        assert_ne!(pre, ProtocolVersion::ZERO);
        assert!(pre < ProtocolVersion::new(5, 3, 0));
        assert!(pre > ProtocolVersion::new(5, 2, 99));
    }

    #[test]
    fn thresholds() {
        let v = ProtocolVersion::parse;
        assert!(!v("4.0.7").batches_resolved_ts());
        assert!(!v("4.0.8-rc").batches_resolved_ts());
        assert!(v("4.0.8").batches_resolved_ts());
        assert!(!v("5.2.9").validates_cluster_id());
        assert!(!v("5.3.0-alpha").validates_cluster_id());
        assert!(v("5.3.0").validates_cluster_id());
        assert!(v("8.5.1").validates_cluster_id());
        assert!(!v("invalid").batches_resolved_ts());
    }

    #[test]
    fn features() {
        assert_eq!(Features::parse("").ok(), Some(Features::default()));
        let f = Features::parse(" stream-multiplexing ,").ok();
        assert_eq!(
            f.map(|f| f.names()),
            Some(vec![Features::STREAM_MULTIPLEXING])
        );
        match Features::parse("stream-multiplexing,teleport") {
            Err(FeedError::UnknownFeature(name)) => assert_eq!(name, "teleport"),
            other => panic!("expected UnknownFeature, got {other:?}"),
        }
    }
}
