//! The protobuf codec of every generated client and server: prost, with a
//! small initial buffer. tonic's default buffer is 8 KiB for the encoder and
//! 8 KiB for the decoder of every call, held for as long as the call lives;
//! an agent's session is one long call of small messages, so at fleet scale
//! those two buffers were a quarter of the control plane's memory per
//! connected agent. Buffers still grow for large messages (artifact chunks).
//!
//! Bytes that are not a valid message are the sender's mistake, so the
//! decoder reports them as `InvalidArgument` (tonic's prost codec says
//! `Internal`, which reads as a bug of ours and is retried by some clients).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a call's encode and decode buffers.
pub const INITIAL_BUFFER_BYTES: usize = 1024;

/// Encoded bytes a stream yields after (tonic's default).
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// [`ProstCodec`] with [`INITIAL_BUFFER_BYTES`]; named by `codec_path` in
/// the build script, so generated code uses it.
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = LeanDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        LeanDecoder(ProstCodec::<T, U>::raw_decoder(settings()))
    }
}

/// [`ProstDecoder`] whose failures are `InvalidArgument`: it fails only on
/// bytes that do not decode as the expected message.
#[derive(Debug)]
pub struct LeanDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for LeanDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| match status.code() {
            Code::Internal => Status::invalid_argument(format!(
                "message is not a valid {}: {}",
                std::any::type_name::<U>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("protobuf message"),
                status.message()
            )),
            _ => status,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
