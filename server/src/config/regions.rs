//! The settings of automatic region split and merge, under the names and
//! with the defaults of the TiKV and PD settings they mirror:
//! `[coprocessor]` (TiKV's split thresholds), `[raftstore]` (how often
//! regions are checked) and `[schedule]` (PD's merge thresholds).

use std::fmt;

use kvfeed_storage::region::{RegionSize, SplitLimits};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::units::{ReadableDuration, ReadableSize};

/// TiKV's default `region-split-size`.
const SPLIT_SIZE: ReadableSize = ReadableSize::mib(96);
/// TiKV's `batch-split-limit`: split points one check may find.
pub const BATCH_SPLIT_LIMIT: usize = 10;
/// The shortest check interval accepted.
const MIN_CHECK_INTERVAL_MS: u64 = 10;
const MIB: u64 = 1 << 20;

/// `[coprocessor]` section: when a region splits and into what. Names and
/// defaults are TiKV's; as in TiKV, the unset ones follow
/// `region-split-size`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct CoprocessorConfig {
    /// `region-max-size`: a region is split once it holds this many bytes.
    /// At least `region-split-size`. Default `region-split-size` × 3/2
    /// (144 MiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region_max_size: Option<ReadableSize>,
    /// `region-split-size`: the bytes each part of a split holds. Greater
    /// than zero. Default `"96MB"` (binary units: 96 MiB).
    pub region_split_size: ReadableSize,
    /// `region-max-keys`: a region is split once it holds this many keys
    /// (versions). At least `region-split-keys`. Default
    /// `region-split-keys` × 3/2 (1,440,000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region_max_keys: Option<u64>,
    /// `region-split-keys`: the keys each part of a split holds. At least 1.
    /// Default 10,000 per MiB of `region-split-size` (960,000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region_split_keys: Option<u64>,
}

impl Default for CoprocessorConfig {
    fn default() -> Self {
        CoprocessorConfig {
            region_max_size: None,
            region_split_size: SPLIT_SIZE,
            region_max_keys: None,
            region_split_keys: None,
        }
    }
}

impl CoprocessorConfig {
    /// `region-split-keys`, or TiKV's default for the split size (assuming
    /// 100-byte entries).
    pub fn split_keys(&self) -> u64 {
        self.region_split_keys.unwrap_or_else(|| {
            let mib = self.region_split_size.as_bytes() as f64 / MIB as f64;
            ((mib * 10_000.0) as u64).max(1)
        })
    }

    /// `region-max-size`, or its default.
    pub fn max_size(&self) -> u64 {
        self.region_max_size.map_or_else(
            || self.region_split_size.as_bytes() / 2 * 3,
            ReadableSize::as_bytes,
        )
    }

    /// `region-max-keys`, or its default.
    pub fn max_keys(&self) -> u64 {
        self.region_max_keys
            .unwrap_or_else(|| self.split_keys() / 2 * 3)
    }

    /// The thresholds as storage's split check takes them.
    pub fn split_limits(&self) -> SplitLimits {
        SplitLimits {
            split: RegionSize::new(self.region_split_size.as_bytes(), self.split_keys()),
            max: RegionSize::new(self.max_size(), self.max_keys()),
            batch: BATCH_SPLIT_LIMIT,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        let split_size = self.region_split_size.as_bytes();
        if split_size == 0 {
            return invalid(
                "coprocessor.region-split-size",
                "must be greater than 0".to_owned(),
            );
        }
        if self.max_size() < split_size {
            return invalid(
                "coprocessor.region-max-size",
                format!(
                    "must be at least region-split-size ({}), got {}",
                    self.region_split_size,
                    ReadableSize::bytes(self.max_size())
                ),
            );
        }
        if self.split_keys() == 0 {
            return invalid(
                "coprocessor.region-split-keys",
                "must be at least 1".to_owned(),
            );
        }
        if self.max_keys() < self.split_keys() {
            return invalid(
                "coprocessor.region-max-keys",
                format!(
                    "must be at least region-split-keys ({}), got {}",
                    self.split_keys(),
                    self.max_keys()
                ),
            );
        }
        Ok(())
    }
}

/// `[raftstore]` section: only the split check's interval, under TiKV's
/// name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RaftstoreConfig {
    /// `split-region-check-tick-interval`: how often regions written to
    /// are checked for a split and small neighbours for a merge. At least
    /// 10ms. Default `"10s"` (TiKV's).
    pub split_region_check_tick_interval: ReadableDuration,
}

impl Default for RaftstoreConfig {
    fn default() -> Self {
        RaftstoreConfig {
            split_region_check_tick_interval: ReadableDuration::secs(10),
        }
    }
}

/// `[schedule]` section: PD's merge thresholds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ScheduleConfig {
    /// `max-merge-region-size`: a region at most this big (and at most
    /// `max-merge-region-keys`) is merged with an adjacent region that is
    /// as small. A TOML integer counts MiB, as in PD; a string is a size
    /// (`"512KB"`). `0` turns automatic merge off. Default `20` (MiB).
    #[serde(deserialize_with = "mib_or_size")]
    pub max_merge_region_size: ReadableSize,
    /// `max-merge-region-keys`: the keys (versions) such a region holds at
    /// most. Default `200000`.
    pub max_merge_region_keys: u64,
    /// `split-merge-interval`: a region made by a split (automatic or
    /// asked for) is not merged within this time. Default `"1h"` (PD's).
    pub split_merge_interval: ReadableDuration,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            max_merge_region_size: ReadableSize::mib(20),
            max_merge_region_keys: 200_000,
            split_merge_interval: ReadableDuration::secs(3_600),
        }
    }
}

impl ScheduleConfig {
    /// The merge threshold; `None` when automatic merge is off.
    pub fn merge_limit(&self) -> Option<RegionSize> {
        let bytes = self.max_merge_region_size.as_bytes();
        (bytes > 0).then(|| RegionSize::new(bytes, self.max_merge_region_keys))
    }
}

/// Checks the three sections together.
pub(super) fn validate(
    coprocessor: &CoprocessorConfig,
    raftstore: &RaftstoreConfig,
) -> Result<(), ConfigError> {
    coprocessor.validate()?;
    let interval = raftstore.split_region_check_tick_interval;
    if interval.as_duration() < ReadableDuration::millis(MIN_CHECK_INTERVAL_MS).as_duration() {
        return Err(ConfigError::Invalid {
            key: "raftstore.split-region-check-tick-interval",
            reason: format!("must be at least {MIN_CHECK_INTERVAL_MS}ms, got {interval}"),
        });
    }
    Ok(())
}

/// PD's sizes are integers in MiB; a string is a size with its unit.
fn mib_or_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ReadableSize, D::Error> {
    struct MibVisitor;
    impl Visitor<'_> for MibVisitor {
        type Value = ReadableSize;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of MiB (as PD) or a size such as \"20MB\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<ReadableSize, E> {
            v.parse().map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<ReadableSize, E> {
            v.checked_mul(MIB)
                .map(ReadableSize)
                .ok_or_else(|| E::custom(format!("invalid size {v} MiB: too large")))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<ReadableSize, E> {
            let v = u64::try_from(v)
                .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))?;
            self.visit_u64(v)
        }
    }
    deserializer.deserialize_any(MibVisitor)
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::super::tests::invalid_key;
    use super::*;

    #[test]
    fn defaults_are_tikv_and_pd_defaults() {
        let cfg = Config::default();
        let limits = cfg.coprocessor.split_limits();
        assert_eq!(limits.split, RegionSize::new(96 << 20, 960_000));
        assert_eq!(limits.max, RegionSize::new(144 << 20, 1_440_000));
        assert_eq!(limits.batch, 10);
        assert_eq!(
            cfg.raftstore.split_region_check_tick_interval,
            ReadableDuration::secs(10)
        );
        assert_eq!(
            cfg.schedule.merge_limit(),
            Some(RegionSize::new(20 << 20, 200_000))
        );
        assert_eq!(
            cfg.schedule.split_merge_interval,
            ReadableDuration::secs(3_600)
        );
    }

    #[test]
    fn unset_thresholds_follow_the_split_size() {
        let cfg = Config::parse("[coprocessor]\nregion-split-size = \"4KB\"\n").expect("parse");
        cfg.validate().expect("valid");
        let limits = cfg.coprocessor.split_limits();
        assert_eq!(limits.split, RegionSize::new(4096, 39));
        assert_eq!(limits.max, RegionSize::new(6144, 57));
    }

    #[test]
    fn sections_parse_with_tikv_and_pd_names() {
        let cfg = Config::parse(
            r#"
            [coprocessor]
            region-max-size = "2KB"
            region-split-size = "1KB"
            region-max-keys = 30
            region-split-keys = 20
            [raftstore]
            split-region-check-tick-interval = "100ms"
            [schedule]
            max-merge-region-size = 1
            max-merge-region-keys = 5
            split-merge-interval = "0s"
            "#,
        )
        .expect("parse");
        cfg.validate().expect("valid");
        assert_eq!(
            cfg.coprocessor.split_limits().max,
            RegionSize::new(2048, 30)
        );
        assert_eq!(
            cfg.schedule.merge_limit(),
            Some(RegionSize::new(1 << 20, 5)),
            "an integer counts MiB, as in PD"
        );
        let cfg = Config::parse("[schedule]\nmax-merge-region-size = \"512B\"\n").expect("parse");
        assert_eq!(
            cfg.schedule.merge_limit(),
            Some(RegionSize::new(512, 200_000))
        );
        let off = Config::parse("[schedule]\nmax-merge-region-size = 0\n").expect("parse");
        assert_eq!(off.schedule.merge_limit(), None, "0 turns merging off");
        let err = Config::parse("[schedule]\nmax-merge-region-size = -1\n").expect_err("negative");
        assert!(err.to_string().contains("negative"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let mut cfg = Config::default();
        cfg.coprocessor.region_split_size = ReadableSize::bytes(0);
        assert_eq!(invalid_key(&cfg), "coprocessor.region-split-size");

        let mut cfg = Config::default();
        cfg.coprocessor.region_max_size = Some(ReadableSize::mib(10));
        assert_eq!(invalid_key(&cfg), "coprocessor.region-max-size");

        let mut cfg = Config::default();
        cfg.coprocessor.region_split_keys = Some(0);
        assert_eq!(invalid_key(&cfg), "coprocessor.region-split-keys");

        let mut cfg = Config::default();
        cfg.coprocessor.region_split_keys = Some(100);
        cfg.coprocessor.region_max_keys = Some(99);
        assert_eq!(invalid_key(&cfg), "coprocessor.region-max-keys");

        let mut cfg = Config::default();
        cfg.raftstore.split_region_check_tick_interval = ReadableDuration::millis(9);
        assert_eq!(
            invalid_key(&cfg),
            "raftstore.split-region-check-tick-interval"
        );
    }
}
