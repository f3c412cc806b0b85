//! Reading a REST request body: bounded in size and in time, and decoded from the
//! `Content-Encoding` tritonclient.http sends with `request_compression_algorithm` (gzip or
//! deflate).
//!
//! A client that declares more than the limit is refused without keeping anything it sends
//! (over HTTP/1.1 the body is read and dropped first, up to [`DRAIN_FACTOR`] times the limit,
//! so the client gets the answer, not a reset); one that stops sending half-way is cut off after [`BODY_READ_TIMEOUT`] instead of holding its
//! buffer until it closes; a compressed body may not expand past the same limit.
//! [`bytes_to_reserve`] says what reading a body may hold, for the worker's
//! [`budget`](super::budget) before it is read.

use std::io::Read as _;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, Version, header};
use http_body_util::BodyExt as _;

/// The longest a client may take to send a request body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A body declared over the limit, up to this many times the limit, is read and dropped before
/// it is refused; one declared larger is refused at once, and the connection closed under it
/// (draining part of it would not spare the client the reset).
pub const DRAIN_FACTOR: usize = 4;

/// Why a body was not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// Declared or sent (or decompressed to) more than the limit.
    #[error("request body is over the limit of {0} bytes")]
    TooLarge(usize),
    /// Not all sent within [`BODY_READ_TIMEOUT`].
    #[error("request body not received within {} s", BODY_READ_TIMEOUT.as_secs())]
    Timeout,
    /// A `Content-Encoding` other than gzip, deflate or identity.
    #[error("unsupported Content-Encoding {0:?} (gzip, deflate or identity)")]
    Encoding(String),
    /// The body broke off, or its compressed data is corrupt.
    #[error("request body could not be read: {0}")]
    Read(String),
}

impl BodyError {
    /// The HTTP status that answers it.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::Encoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Read(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// The body's declared `Content-Length`, if any.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// How many bytes [`read_body`] may hold for this body, to reserve before reading it: the
/// declared `Content-Length` of an uncompressed body; `limit` for a body whose length is not
/// declared (chunked) or that may expand to it (gzip, deflate); nothing for one it refuses
/// before reading (declared over the limit, an unknown encoding).
pub fn bytes_to_reserve(headers: &HeaderMap, limit: usize) -> usize {
    match (Encoding::of(headers), declared_length(headers)) {
        (Err(_), _) => 0,
        (Ok(_), Some(n)) if n > limit as u64 => 0,
        // Within the limit, so within a usize.
        (Ok(Encoding::Identity), Some(n)) => usize::try_from(n).unwrap_or(limit),
        (Ok(_), _) => limit,
    }
}

/// Reads `body` (at most `limit` bytes, within [`BODY_READ_TIMEOUT`]) and decodes its
/// `Content-Encoding` to at most `limit` bytes. A body declared over the limit is refused
/// without being kept, after it is [`discard`]ed up to [`DRAIN_FACTOR`] times the limit.
pub async fn read_body(
    version: Version,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, BodyError> {
    let declared = declared_length(headers);
    if let Some(n) = declared.filter(|n| *n > limit as u64) {
        let drain = limit.saturating_mul(DRAIN_FACTOR);
        if n <= drain as u64 {
            discard(version, headers, body, drain).await;
        }
        return Err(BodyError::TooLarge(limit));
    }
    let encoding = Encoding::of(headers)?;
    // Within the limit, so within a usize.
    let expected = declared.map_or(0, |n| usize::try_from(n).unwrap_or(limit));
    let raw = tokio::time::timeout(BODY_READ_TIMEOUT, collect(body, expected, limit))
        .await
        .map_err(|_| BodyError::Timeout)??;
    match encoding {
        Encoding::Identity => Ok(raw),
        // Decompressing up to the limit is CPU work: off the async threads.
        compressed => tokio::task::spawn_blocking(move || compressed.decode(&raw, limit))
            .await
            .map_err(|e| BodyError::Read(e.to_string()))?,
    }
}

/// `body`'s bytes in one buffer of `expected` bytes to start with (the declared length), each
/// piece copied in as it arrives and let go: the body takes its own size while it is read, not
/// twice that as when all its pieces are kept and then joined.
async fn collect(mut body: Body, expected: usize, limit: usize) -> Result<Bytes, BodyError> {
    let mut out = bytes::BytesMut::with_capacity(expected);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > limit {
                return Err(BodyError::TooLarge(limit));
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out.freeze())
}

/// Reads `body` to its end, dropping each piece as it arrives (at most `limit` bytes, within
/// [`BODY_READ_TIMEOUT`]), before an answer that did not need it. An HTTP/1.1 client that sends
/// its whole body before it reads the answer (Python's `http.client`, tritonclient's HTTP
/// client) otherwise sees its connection reset under the unread body, not the answer. Skipped
/// where the body need not be read: HTTP/2, where the answer ends the stream by itself, and a
/// client waiting for `100 Continue`, which is then not sent, so the client sends nothing more.
pub async fn discard(version: Version, headers: &HeaderMap, body: Body, limit: usize) {
    let waits_for_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if version >= Version::HTTP_2 || waits_for_continue {
        return;
    }
    let drain = async {
        let mut body = body;
        let mut read = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, Bytes::len);
            if read > limit {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(BODY_READ_TIMEOUT, drain).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
    Deflate,
}

impl Encoding {
    fn of(headers: &HeaderMap) -> Result<Self, BodyError> {
        let Some(v) = headers.get(header::CONTENT_ENCODING) else {
            return Ok(Self::Identity);
        };
        let name = v.to_str().unwrap_or_default().trim().to_ascii_lowercase();
        match name.as_str() {
            "" | "identity" => Ok(Self::Identity),
            "gzip" | "x-gzip" => Ok(Self::Gzip),
            "deflate" => Ok(Self::Deflate),
            _ => Err(BodyError::Encoding(name)),
        }
    }

    /// `raw` decoded, refused once it passes `limit` bytes.
    fn decode(self, raw: &[u8], limit: usize) -> Result<Bytes, BodyError> {
        let reader: Box<dyn std::io::Read> = match self {
            Self::Identity => return Ok(Bytes::copy_from_slice(raw)),
            Self::Gzip => Box::new(flate2::read::GzDecoder::new(raw)),
            // HTTP's "deflate" is the zlib format (RFC 9110), which tritonclient sends.
            Self::Deflate => Box::new(flate2::read::ZlibDecoder::new(raw)),
        };
        let mut out = Vec::new();
        reader
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| BodyError::Read(format!("{self:?} data: {e}")))?;
        if out.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;
    use std::io::Write as _;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), v.parse().unwrap());
        }
        h
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[tokio::test]
    async fn gzip_and_deflate_bodies_are_decoded_and_plain_ones_passed_through() {
        let data = b"{\"inputs\": []}".repeat(100);
        for (encoding, body) in [
            (None, data.clone()),
            (Some("gzip"), gzip(&data)),
            (Some("deflate"), zlib(&data)),
        ] {
            let h = encoding.map_or_else(HeaderMap::new, |e| {
                headers(&[(header::CONTENT_ENCODING, e)])
            });
            let got = read_body(Version::HTTP_11, &h, Body::from(body), 1 << 20)
                .await
                .unwrap();
            assert_eq!(got.as_ref(), data.as_slice(), "{encoding:?}");
        }
    }

    #[tokio::test]
    async fn a_body_that_would_expand_past_the_limit_is_refused() {
        // 10 MiB of zeros compress to ~10 KiB.
        let bomb = gzip(&vec![0u8; 10 << 20]);
        let h = headers(&[(header::CONTENT_ENCODING, "gzip")]);
        assert_eq!(
            read_body(Version::HTTP_11, &h, Body::from(bomb), 1 << 20)
                .await
                .unwrap_err(),
            BodyError::TooLarge(1 << 20)
        );
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_before_reading_over_http2() {
        let h = headers(&[(header::CONTENT_LENGTH, "1000000000000000")]);
        // A body that never ends: only the declared length can have refused it.
        let never = Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
        assert_eq!(
            read_body(Version::HTTP_2, &h, never, 1 << 20)
                .await
                .unwrap_err(),
            BodyError::TooLarge(1 << 20)
        );
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_drained_over_http1_only_within_the_drain_factor() {
        use std::sync::atomic::Ordering::SeqCst;
        let h = headers(&[(header::CONTENT_LENGTH, "102400")]);
        // 100 KiB declared and sent against a 40 KiB limit: all of it read, none of it kept.
        let (body, read) = counted(100);
        assert_eq!(
            read_body(Version::HTTP_11, &h, body, 40 * 1024)
                .await
                .unwrap_err(),
            BodyError::TooLarge(40 * 1024)
        );
        assert_eq!(read.load(SeqCst), 100);
        // Against a 10 KiB limit, past 4 × 10 KiB: refused without reading.
        let (body, read) = counted(100);
        assert_eq!(
            read_body(Version::HTTP_11, &h, body, 10 * 1024)
                .await
                .unwrap_err(),
            BodyError::TooLarge(10 * 1024)
        );
        assert_eq!(read.load(SeqCst), 0);
        // A client that declares 1 GiB and sends 3 bytes is answered at once, not after
        // BODY_READ_TIMEOUT (it waited 30 s for its 413).
        let h = headers(&[(header::CONTENT_LENGTH, "1073741824")]);
        let never = Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
        let answered = tokio::time::timeout(
            Duration::from_secs(5),
            read_body(Version::HTTP_11, &h, never, 4 << 20),
        )
        .await
        .expect("answered without waiting for the body");
        assert_eq!(answered.unwrap_err(), BodyError::TooLarge(4 << 20));
    }

    #[tokio::test]
    async fn a_sent_body_over_the_limit_and_an_unknown_encoding_are_refused() {
        assert_eq!(
            read_body(
                Version::HTTP_11,
                &HeaderMap::new(),
                Body::from(vec![1u8; 100]),
                10
            )
            .await
            .unwrap_err(),
            BodyError::TooLarge(10)
        );
        let h = headers(&[(header::CONTENT_ENCODING, "br")]);
        assert_eq!(
            read_body(Version::HTTP_11, &h, Body::from("x"), 10)
                .await
                .unwrap_err(),
            BodyError::Encoding("br".into())
        );
    }

    #[test]
    fn a_declared_plain_body_reserves_its_length_and_an_undeclared_or_compressed_one_the_limit() {
        let plain = headers(&[(header::CONTENT_LENGTH, "1000")]);
        assert_eq!(bytes_to_reserve(&plain, 1 << 20), 1000);
        let chunked = HeaderMap::new();
        assert_eq!(bytes_to_reserve(&chunked, 1 << 20), 1 << 20);
        for encoding in ["gzip", "deflate"] {
            let compressed = headers(&[
                (header::CONTENT_LENGTH, "1000"),
                (header::CONTENT_ENCODING, encoding),
            ]);
            assert_eq!(
                bytes_to_reserve(&compressed, 1 << 20),
                1 << 20,
                "{encoding}"
            );
        }
        // Refused before anything is read: nothing to reserve.
        let over = headers(&[(header::CONTENT_LENGTH, "2000000")]);
        assert_eq!(bytes_to_reserve(&over, 1 << 20), 0);
        let brotli = headers(&[(header::CONTENT_ENCODING, "br")]);
        assert_eq!(bytes_to_reserve(&brotli, 1 << 20), 0);
    }

    /// A body of `chunks` chunks of 1 KiB that counts those read.
    fn counted(chunks: usize) -> (Body, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let read = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = std::sync::Arc::clone(&read);
        let stream = futures::stream::iter(0..chunks).map(move |_| {
            r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 1024]))
        });
        (Body::from_stream(stream), read)
    }

    #[tokio::test]
    async fn a_discarded_http1_body_is_read_to_its_end_or_the_limit() {
        use std::sync::atomic::Ordering::SeqCst;
        let (body, read) = counted(100);
        discard(Version::HTTP_11, &HeaderMap::new(), body, 1 << 20).await;
        assert_eq!(read.load(SeqCst), 100);
        let (body, read) = counted(100);
        discard(Version::HTTP_11, &HeaderMap::new(), body, 10 * 1024).await;
        assert_eq!(read.load(SeqCst), 11, "stops once past the limit");
    }

    #[tokio::test]
    async fn a_body_is_not_read_over_http2_nor_from_a_client_waiting_for_100_continue() {
        let (body, read) = counted(100);
        discard(Version::HTTP_2, &HeaderMap::new(), body, 1 << 20).await;
        assert_eq!(read.load(std::sync::atomic::Ordering::SeqCst), 0);
        let (body, read) = counted(100);
        let h = headers(&[(header::EXPECT, "100-Continue")]);
        discard(Version::HTTP_11, &h, body, 1 << 20).await;
        assert_eq!(read.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_is_cut_off() {
        let stalled =
            Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
        assert_eq!(
            read_body(Version::HTTP_11, &HeaderMap::new(), stalled, 1 << 20)
                .await
                .unwrap_err(),
            BodyError::Timeout
        );
    }
}
