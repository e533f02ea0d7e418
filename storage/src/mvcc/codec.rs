//! Compact binary primitives shared by the lock and write record formats.
//!
//! Integers are LEB128 varints (timestamps and TTLs are mostly small deltas
//! from zero or fit in 7–9 bytes); byte strings are a varint length followed
//! by the bytes. The decoder is total: every malformed input — truncation, an
//! overlong varint, a length beyond the buffer, trailing bytes — becomes
//! [`Error::Corrupt`] naming the column family, and nothing is allocated
//! before its length has been checked against the remaining input.

use crate::{Error, Result};

/// Longest LEB128 encoding of a `u64`.
const MAX_VARINT_LEN: usize = 10;

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A cursor over one encoded record.
pub(crate) struct Decoder<'a> {
    buf: &'a [u8],
    cf: &'static str,
}

impl<'a> Decoder<'a> {
    pub(crate) fn new(buf: &'a [u8], cf: &'static str) -> Self {
        Decoder { buf, cf }
    }

    pub(crate) fn corrupt(&self, reason: impl std::fmt::Display) -> Error {
        Error::corrupt(self.cf, reason)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        let (&first, rest) = self
            .buf
            .split_first()
            .ok_or_else(|| self.corrupt("record truncated"))?;
        self.buf = rest;
        Ok(first)
    }

    pub(crate) fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for i in 0..MAX_VARINT_LEN {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7F);
            // The tenth byte may only carry the single remaining bit.
            if i == MAX_VARINT_LEN - 1 && bits > 1 {
                return Err(self.corrupt("varint overflows u64"));
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.corrupt("varint longer than ten bytes"))
    }

    pub(crate) fn bytes(&mut self) -> Result<Vec<u8>> {
        let len = self.varint()?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.buf.len())
            .ok_or_else(|| self.corrupt(format!("byte string of length {len} exceeds record")))?;
        let (bytes, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(bytes.to_vec())
    }

    /// Number of bytes left; used to bound list lengths before allocating.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Requires that the whole record was consumed.
    pub(crate) fn finish(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.corrupt(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip_and_limits() {
        for v in [
            0,
            1,
            127,
            128,
            300,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            let mut d = Decoder::new(&buf, "lock");
            assert_eq!(d.varint().ok(), Some(v));
            assert!(d.finish().is_ok());
        }
        let overflow = [0xFF; 9].into_iter().chain([0x02]).collect::<Vec<_>>();
        assert!(Decoder::new(&overflow, "lock").varint().is_err());
        assert!(Decoder::new(&[0x80; 11], "lock").varint().is_err());
        assert!(Decoder::new(&[0x05, 1, 2], "lock").bytes().is_err());
    }
}
