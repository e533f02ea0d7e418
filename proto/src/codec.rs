//! The protobuf codec every generated client and server uses: prost's,
//! with smaller starting buffers.
//!
//! tonic gives each call an encode buffer and a decode buffer of
//! `BufferSettings::buffer_size` bytes (8 KiB by default) when the call
//! starts, and keeps both for the call's whole life. A change-feed call
//! lives as long as its consumer: an idle connection with one subscription
//! would hold 16 KiB of buffers it almost never uses, which is about half of
//! what such a connection costs the server. Starting at 1 KiB costs nothing
//! in correctness: both buffers grow on demand to the size of the message at
//! hand (`BytesMut::reserve`), so large messages still encode and decode in
//! one piece, only after a reallocation or two. The yield threshold, the
//! amount of encoded output tonic gathers before handing it to HTTP/2, stays
//! at tonic's default, so streaming throughput is unchanged.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Starting size of a call's encode and decode buffers.
pub const BUFFER_SIZE: usize = 1024;

/// How much encoded output a streaming call gathers before handing it to
/// HTTP/2 (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

/// prost encoding with [`BUFFER_SIZE`] starting buffers; named in the
/// generated code through `tonic_prost_build::Builder::codec_path`.
#[derive(Debug, Clone, Copy)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}

#[cfg(test)]
mod tests {
    use tonic::codec::{Decoder, Encoder};

    use super::*;
    use crate::cdcpb::{ChangeDataEvent, ChangeDataRequest};

    #[test]
    fn both_halves_start_small_and_keep_the_default_yield_threshold() {
        // `BufferSettings` has no getters; its Debug output names both fields.
        let expected = format!("{:?}", BufferSettings::new(1024, 32 * 1024));
        let mut codec = LeanCodec::<ChangeDataEvent, ChangeDataRequest>::default();
        assert_eq!(format!("{:?}", codec.encoder().buffer_settings()), expected);
        assert_eq!(format!("{:?}", codec.decoder().buffer_settings()), expected);
        assert_ne!(expected, format!("{:?}", BufferSettings::default()));
    }
}
