//! Human-readable sizes and durations for the configuration file.
//!
//! The formats follow TiKV's so that a TiKV `[cdc]` section can be pasted in
//! unchanged:
//! - sizes: a number (decimals allowed) and an optional unit `B`, `KB`, `MB`,
//!   `GB`, `TB`, `PB` (also `K`…`P` and `KiB`…`PiB`), case-insensitive. As in
//!   TiKV every unit is a power of 1024: `"512MB"` is 512 MiB, not 512·10⁶
//!   bytes. A bare number, or a TOML integer, counts bytes.
//! - durations: one or more number+unit parts, units `ms`, `s`, `m`, `h`, `d`,
//!   e.g. `"10ms"`, `"1s"`, `"1m30s"`, `"1.5h"`. A bare `"0"` is zero.
//!
//! Parsing never panics on input: every malformed value becomes a
//! [`UnitError`] that quotes the value and says what was expected.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Why a size or duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// A [`ReadableSize`] could not be parsed.
    #[error("invalid size {value:?}: {reason} (expected e.g. \"512MB\", \"1GiB\", \"0\")")]
    Size {
        /// The text as given, quoted in the message so the user can find it.
        value: String,
        /// What is wrong with it (missing number, unknown unit, ...).
        reason: &'static str,
    },
    /// A [`ReadableDuration`] could not be parsed.
    #[error("invalid duration {value:?}: {reason} (expected e.g. \"10ms\", \"1s\", \"1m30s\")")]
    Duration {
        /// The text as given, quoted in the message so the user can find it.
        value: String,
        /// What is wrong with it (missing unit, overflow, ...).
        reason: &'static str,
    },
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const PIB: u64 = 1 << 50;

/// A byte count written with a binary unit (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReadableSize(pub u64);

impl ReadableSize {
    /// A size of `n` bytes.
    pub const fn bytes(n: u64) -> Self {
        ReadableSize(n)
    }

    /// A size of `n` MiB (`n · 2²⁰` bytes), for defaults written in code.
    /// `n` must be below 2⁴⁴: a larger one overflows, which fails the build
    /// in a `const` and panics in a debug build otherwise.
    pub const fn mib(n: u64) -> Self {
        ReadableSize(n * MIB)
    }

    /// The size in bytes.
    pub const fn as_bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ReadableSize {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, UnitError> {
        let err = |reason| UnitError::Size {
            value: s.to_owned(),
            reason,
        };
        let text = s.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        if number.is_empty() {
            return Err(err("missing number"));
        }
        let unit = unit.trim();
        let multiplier = match unit.to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "K" | "KB" | "KIB" => KIB,
            "M" | "MB" | "MIB" => MIB,
            "G" | "GB" | "GIB" => GIB,
            "T" | "TB" | "TIB" => TIB,
            "P" | "PB" | "PIB" => PIB,
            _ => return Err(err("unknown unit (use B, KB, MB, GB, TB or PB)")),
        };
        scale(number, multiplier)
            .map(ReadableSize)
            .ok_or_else(|| err("malformed or out-of-range number"))
    }
}

impl fmt::Display for ReadableSize {
    /// The largest unit that represents the value exactly, so that the printed
    /// form parses back to the same number.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, name) in [
            (PIB, "PB"),
            (TIB, "TB"),
            (GIB, "GB"),
            (MIB, "MB"),
            (KIB, "KB"),
        ] {
            if n != 0 && n.is_multiple_of(unit) {
                return write!(f, "{}{name}", n / unit);
            }
        }
        write!(f, "{n}B")
    }
}

impl Serialize for ReadableSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ReadableSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ReadableSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"512MB\" or a byte count")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ReadableSize, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ReadableSize, E> {
                Ok(ReadableSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ReadableSize, E> {
                u64::try_from(v)
                    .map(ReadableSize)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A duration written as number+unit parts (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReadableDuration(pub Duration);

impl ReadableDuration {
    /// A duration of `ms` milliseconds.
    pub const fn millis(ms: u64) -> Self {
        ReadableDuration(Duration::from_millis(ms))
    }

    /// A duration of `s` seconds.
    pub const fn secs(s: u64) -> Self {
        ReadableDuration(Duration::from_secs(s))
    }

    /// The duration, for timers and deadlines.
    pub const fn as_duration(self) -> Duration {
        self.0
    }
}

impl FromStr for ReadableDuration {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, UnitError> {
        let err = |reason| UnitError::Duration {
            value: s.to_owned(),
            reason,
        };
        let text = s.trim();
        if text.is_empty() {
            return Err(err("empty"));
        }
        if text == "0" {
            return Ok(ReadableDuration(Duration::ZERO));
        }
        // Sum in whole nanoseconds so that "1m30s" is exact.
        let mut total_nanos: u128 = 0;
        let mut rest = text;
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let (number, after) = rest.split_at(num_end);
            if number.is_empty() {
                return Err(err("expected a number before each unit"));
            }
            let unit_end = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let (unit, next) = after.split_at(unit_end);
            let nanos_per_unit: u64 = match unit {
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60 * 1_000_000_000,
                "h" => 3_600 * 1_000_000_000,
                "d" => 86_400 * 1_000_000_000,
                "" => return Err(err("missing unit (use ms, s, m, h or d)")),
                _ => return Err(err("unknown unit (use ms, s, m, h or d)")),
            };
            let part = scale(number, nanos_per_unit)
                .ok_or_else(|| err("malformed or out-of-range number"))?;
            total_nanos += u128::from(part);
            rest = next;
        }
        let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| err("too long"))?;
        // The remainder of a division by 10⁹ always fits in u32.
        let sub = (total_nanos % 1_000_000_000) as u32;
        Ok(ReadableDuration(Duration::new(secs, sub)))
    }
}

impl fmt::Display for ReadableDuration {
    /// Hours, minutes, seconds and milliseconds, largest first, omitting zero
    /// parts; a sub-millisecond remainder is dropped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, name) in [(3_600_000, "h"), (60_000, "m"), (1_000, "s"), (1, "ms")] {
            if ms >= unit {
                write!(f, "{}{name}", ms / unit)?;
                ms %= unit;
            }
        }
        Ok(())
    }
}

impl Serialize for ReadableDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ReadableDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = ReadableDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"1s\" or \"10ms\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ReadableDuration, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(DurationVisitor)
    }
}

/// `number × multiplier` for a non-negative decimal `number` (digits with at
/// most one dot), rounded down to an integer; `None` on malformed input or
/// overflow. Computed in integers so "1.5GB" is exact.
fn scale(number: &str, multiplier: u64) -> Option<u64> {
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int_part) || !all_digits(frac_part) {
        return None;
    }
    let int: u64 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().ok()?
    };
    let whole = int.checked_mul(multiplier)?;
    // The fraction as digits / 10^len, exact in u128. Digits past the 20th
    // are worth less than one unit of any multiplier used here, so they are
    // dropped; this also bounds the product below 2^128.
    let frac_digits = &frac_part[..frac_part.len().min(20)];
    let mut numerator: u128 = 0;
    let mut denominator: u128 = 1;
    for digit in frac_digits.bytes() {
        numerator = numerator * 10 + u128::from(digit - b'0');
        denominator *= 10;
    }
    let fraction = u64::try_from(numerator * u128::from(multiplier) / denominator).ok()?;
    whole.checked_add(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(s: &str) -> Result<u64, UnitError> {
        s.parse::<ReadableSize>().map(ReadableSize::as_bytes)
    }

    fn dur(s: &str) -> Result<Duration, UnitError> {
        s.parse::<ReadableDuration>()
            .map(ReadableDuration::as_duration)
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(size("0"), Ok(0));
        assert_eq!(size("123"), Ok(123));
        assert_eq!(size("7B"), Ok(7));
        assert_eq!(size("1KB"), Ok(1024));
        assert_eq!(size("512MB"), Ok(512 * 1024 * 1024));
        assert_eq!(size("512mb"), Ok(512 * 1024 * 1024));
        assert_eq!(size("1GiB"), Ok(1 << 30));
        assert_eq!(size("1G"), Ok(1 << 30));
        assert_eq!(size(" 2 TB "), Ok(2 << 40));
        assert_eq!(size("1.5GB"), Ok(3 << 29));
        assert_eq!(size("0.5KB"), Ok(512));
        assert_eq!(size("0.1KB"), Ok(102), "rounded down");
        assert_eq!(size(".25MB"), Ok(1 << 18));
        assert_eq!(size("1.000000000000000000000001GB"), Ok(1 << 30));
        assert_eq!(size("1PB"), Ok(1 << 50));
    }

    #[test]
    fn bad_sizes_name_the_value() {
        for bad in [
            "",
            "MB",
            "12XB",
            "-1MB",
            "1..5MB",
            "1.2.3",
            ".",
            "99999999PB",
        ] {
            let e = size(bad).expect_err(bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert!(
            size("12XB")
                .unwrap_err()
                .to_string()
                .contains("unknown unit")
        );
    }

    #[test]
    fn size_display_round_trips() {
        for n in [
            0,
            1,
            1000,
            1024,
            3 << 29,
            512 << 20,
            5 << 40,
            1 << 50,
            u64::MAX,
        ] {
            let printed = ReadableSize(n).to_string();
            assert_eq!(size(&printed), Ok(n), "{printed}");
        }
        assert_eq!(ReadableSize::mib(512).to_string(), "512MB");
    }

    #[test]
    fn durations() {
        assert_eq!(dur("0"), Ok(Duration::ZERO));
        assert_eq!(dur("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(dur("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(dur("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(dur("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(dur("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(dur("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(dur("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(dur("1h2m3s4ms"), Ok(Duration::from_millis(3_723_004)));
    }

    #[test]
    fn bad_durations_name_the_value() {
        for bad in ["", "s", "10", "10 ms", "10us", "1x", "-1s", "1s2", "1..2s"] {
            let e = dur(bad).expect_err(bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert!(dur("10").unwrap_err().to_string().contains("missing unit"));
        assert!(
            dur("99999999999999999999d")
                .unwrap_err()
                .to_string()
                .contains("out-of-range")
        );
    }

    #[test]
    fn duration_display_round_trips() {
        for ms in [0, 1, 10, 999, 1000, 90_000, 3_723_004] {
            let d = ReadableDuration::millis(ms);
            assert_eq!(dur(&d.to_string()), Ok(d.0), "{d}");
        }
        assert_eq!(ReadableDuration::millis(1500).to_string(), "1s500ms");
    }
}
