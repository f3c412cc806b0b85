//! The image pipeline: encoded JPEG/PNG/WebP bytes → one item of the outgoing
//! tensor (`[3, H, W]` or `[H, W, 3]`, FP32 normalized or UINT8).
//!
//! Steps: sniff the format, read the header and refuse oversized images before
//! any pixel buffer is allocated (decompression bombs; a JPEG with more than
//! [`MAX_JPEG_SCANS`] scans is refused too), decode once (JPEG with
//! libjpeg-turbo straight to RGB8; a JPEG much larger than the output is
//! decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, like Pillow's `draft`,
//! see [`JpegDraft`]; PNG row by row into RGB8 with the `png` crate, see [`super::png`];
//! CMYK JPEG and WebP with the `image` crate), apply
//! the EXIF orientation, convert grayscale/CMYK/alpha/16-bit to RGB8, resize
//! with an antialiasing convolution (Pillow-compatible filters via `fast_image_resize`)
//! into a small RGB8 scratch, then normalize through a per-channel lookup table
//! straight into the caller's slice of the batch tensor. Pure and synchronous:
//! it runs on the CPU pool. The JPEG decode buffer and the resize scratch are
//! kept per thread between images (see [`buffers`]).

use std::io::Cursor;

use fast_image_resize as fr;
use image::{DynamicImage, ImageDecoder, ImageFormat};

pub use crate::config::JpegDraft;
use crate::config::{ImageConfig, ImageDtype, Layout, ResizeFilter, ResizeMode};

/// Why one image could not be turned into a tensor; shown to clients.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// Zero bytes.
    #[error("image is empty (0 bytes)")]
    Empty,
    /// Not JPEG, PNG or WebP.
    #[error("unsupported or unrecognized image format (expected JPEG, PNG or WebP)")]
    UnknownFormat,
    /// The header could not be parsed.
    #[error("cannot read {format} header: {reason}")]
    Header {
        /// Detected format.
        format: &'static str,
        /// Decoder message.
        reason: String,
    },
    /// The header declares more pixels than allowed.
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {max} pixels")]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// width × height.
        pixels: u64,
        /// Configured limit.
        max: u64,
    },
    /// The header declares a zero dimension.
    #[error("image has a zero dimension ({width}x{height})")]
    ZeroSize {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
    },
    /// A JPEG with more scans than [`MAX_JPEG_SCANS`].
    #[error(
        "JPEG with more than {max} scans (a progressive JPEG has about ten); refused as a decompression bomb"
    )]
    TooManyScans {
        /// The limit.
        max: u32,
    },
    /// The pixel data is truncated or corrupt.
    #[error("cannot decode {format} data (truncated or corrupt): {reason}")]
    Decode {
        /// Detected format.
        format: &'static str,
        /// Decoder message.
        reason: String,
    },
    /// Resizing failed (an internal invariant broke).
    #[error("resize failed: {0}")]
    Resize(String),
}

impl JpegDraft {
    /// Minimum decoded-crop size per output pixel, per direction.
    fn min_oversample(self) -> Option<f64> {
        match self {
            JpegDraft::Off => None,
            JpegDraft::Quality => Some(2.0),
            JpegDraft::Fast => Some(1.0),
        }
    }
}

/// A configured image pipeline; cheap to share between threads.
#[derive(Debug, Clone)]
pub struct ImagePipeline {
    cfg: ImageConfig,
    max_pixels: u64,
    draft: JpegDraft,
    /// `lut[c][v] = (v/255 - mean[c]) / std[c]`.
    lut: Box<[[f32; 256]; 3]>,
}

impl ImagePipeline {
    /// Builds the pipeline; `max_pixels` bounds width × height from the header.
    pub fn new(cfg: ImageConfig, max_pixels: u64) -> Self {
        let mut lut = Box::new([[0f32; 256]; 3]);
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - cfg.normalize.mean[c]) / cfg.normalize.std[c];
            }
        }
        Self {
            draft: cfg.jpeg_draft,
            cfg,
            max_pixels,
            lut,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ImageConfig {
        &self.cfg
    }

    /// Tensor shape for a batch of `n` images.
    pub fn shape(&self, n: usize) -> Vec<i64> {
        let (w, h) = (
            i64::from(self.cfg.resize.width),
            i64::from(self.cfg.resize.height),
        );
        match self.cfg.layout {
            Layout::Nchw => vec![n as i64, 3, h, w],
            Layout::Nhwc => vec![n as i64, h, w, 3],
        }
    }

    /// OIP v2 datatype of the tensor.
    pub fn datatype(&self) -> &'static str {
        match self.cfg.dtype {
            ImageDtype::Fp32 => "FP32",
            ImageDtype::Uint8 => "UINT8",
        }
    }

    /// Bytes of one image in the tensor.
    pub fn item_bytes(&self) -> usize {
        let px = self.cfg.resize.width as usize * self.cfg.resize.height as usize * 3;
        match self.cfg.dtype {
            ImageDtype::Fp32 => px * 4,
            ImageDtype::Uint8 => px,
        }
    }

    /// Processes a batch into one freshly allocated tensor buffer. Errors carry
    /// the index of the first failing image.
    pub fn process_batch<T: AsRef<[u8]>>(
        &self,
        items: &[T],
    ) -> Result<Vec<u8>, (usize, ImageError)> {
        self.process_batch_while(items, || true)
            .map(Option::unwrap_or_default)
    }

    /// [`Self::process_batch`], asking `go_on` before each image: `Ok(None)` when it said no
    /// (the client went away, say), so that the rest of the batch costs nothing.
    pub fn process_batch_while<T: AsRef<[u8]>>(
        &self,
        items: &[T],
        go_on: impl Fn() -> bool,
    ) -> Result<Option<Vec<u8>>, (usize, ImageError)> {
        let item = self.item_bytes();
        let mut out = vec![0u8; item * items.len()];
        for (i, (encoded, slot)) in items.iter().zip(out.chunks_exact_mut(item)).enumerate() {
            if !go_on() {
                return Ok(None);
            }
            self.process_into(encoded.as_ref(), slot)
                .map_err(|e| (i, e))?;
        }
        Ok(Some(out))
    }

    /// Decodes, resizes and normalizes one image into `out`
    /// (exactly [`Self::item_bytes`] long).
    pub fn process_into(&self, encoded: &[u8], out: &mut [u8]) -> Result<(), ImageError> {
        let (w, h) = (self.cfg.resize.width, self.cfg.resize.height);
        let target = Target {
            width: w,
            height: h,
            mode: self.cfg.resize.mode,
            draft: self.draft,
        };
        let rgb = tracing::info_span!("decode", bytes = encoded.len())
            .in_scope(|| decode_rgb8_for(encoded, self.max_pixels, Some(target)))?;
        let _span = tracing::info_span!("resize_normalize").entered();
        let mut scratch = buffers::take(&buffers::RESIZED, w as usize * h as usize * 3);
        resize_rgb8(
            &rgb,
            &mut scratch,
            w,
            h,
            self.cfg.resize.mode,
            self.cfg.resize.filter,
        )?;
        self.write_tensor(&scratch, out);
        buffers::keep(&buffers::RESIZED, scratch);
        buffers::keep(&buffers::DECODED, rgb.pixels);
        Ok(())
    }

    /// Writes an RGB8 `H×W` buffer into `out` in the configured layout and dtype.
    fn write_tensor(&self, rgb: &[u8], out: &mut [u8]) {
        let hw = rgb.len() / 3;
        match (self.cfg.dtype, self.cfg.layout) {
            (ImageDtype::Uint8, Layout::Nhwc) => out.copy_from_slice(rgb),
            (ImageDtype::Uint8, Layout::Nchw) => {
                for (i, px) in rgb.chunks_exact(3).enumerate() {
                    for c in 0..3 {
                        out[c * hw + i] = px[c];
                    }
                }
            }
            (ImageDtype::Fp32, Layout::Nhwc) => {
                for (i, (v, dst)) in rgb.iter().zip(out.chunks_exact_mut(4)).enumerate() {
                    dst.copy_from_slice(&self.lut[i % 3][*v as usize].to_le_bytes());
                }
            }
            (ImageDtype::Fp32, Layout::Nchw) => {
                let (r, rest) = out.split_at_mut(hw * 4);
                let (g, b) = rest.split_at_mut(hw * 4);
                let planes = [r, g, b];
                let [r, g, b] = planes;
                for (((px, r), g), b) in rgb
                    .chunks_exact(3)
                    .zip(r.chunks_exact_mut(4))
                    .zip(g.chunks_exact_mut(4))
                    .zip(b.chunks_exact_mut(4))
                {
                    r.copy_from_slice(&self.lut[0][px[0] as usize].to_le_bytes());
                    g.copy_from_slice(&self.lut[1][px[1] as usize].to_le_bytes());
                    b.copy_from_slice(&self.lut[2][px[2] as usize].to_le_bytes());
                }
            }
        }
    }
}

/// A decoded RGB8 image.
#[derive(Debug, Clone)]
pub struct Rgb8 {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `height × width × 3` bytes, row-major.
    pub pixels: Vec<u8>,
}

impl From<DynamicImage> for Rgb8 {
    /// Its pixels as RGB8: grey repeated, alpha dropped, 16-bit samples rounded.
    fn from(img: DynamicImage) -> Self {
        let rgb = img.into_rgb8();
        let (width, height) = rgb.dimensions();
        Self {
            width,
            height,
            pixels: rgb.into_raw(),
        }
    }
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        _ => "image",
    }
}

/// What the decoded image will be resized to; lets a JPEG decode at a
/// reduced scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Output width.
    pub width: u32,
    /// Output height.
    pub height: u32,
    /// How the source is placed in the output.
    pub mode: ResizeMode,
    /// Downscaling policy.
    pub draft: JpegDraft,
}

/// Decodes JPEG/PNG/WebP to RGB8 at full size with the EXIF orientation
/// applied, refusing images whose header declares more than `max_pixels`
/// before decoding.
pub fn decode_rgb8(encoded: &[u8], max_pixels: u64) -> Result<Rgb8, ImageError> {
    decode_rgb8_for(encoded, max_pixels, None)
}

/// Images smaller than this are always decoded at full size: their full
/// decode takes well under a millisecond or two, and on small, detailed
/// images the reduced IDCT differs visibly from a full decode + antialiased
/// resize (up to 44 levels on the 97×61 test fixture at 1/2 scale).
pub const MIN_DRAFT_PIXELS: u64 = 512 * 512;

/// The JPEG DCT downscale factor (1, 2, 4 or 8) for an image of `sw×sh`
/// (as displayed, i.e. after EXIF orientation) resized to `target`: the
/// largest factor after which the source region that [`placement`] maps onto
/// the output still has `min_oversample` decoded pixels per output pixel in
/// both directions.
pub fn jpeg_draft_factor(sw: u32, sh: u32, target: Target) -> u32 {
    let Some(over) = target.draft.min_oversample() else {
        return 1;
    };
    if u64::from(sw) * u64::from(sh) < MIN_DRAFT_PIXELS {
        return 1;
    }
    let p = placement(sw, sh, target.width, target.height, target.mode);
    let (_, _, cw, ch) = p.src;
    let (_, _, rw, rh) = p.dst;
    [8u32, 4, 2]
        .into_iter()
        .find(|&k| {
            let k = f64::from(k);
            cw / k >= over * f64::from(rw) && ch / k >= over * f64::from(rh)
        })
        .unwrap_or(1)
}

/// Decodes like [`decode_rgb8`], but a JPEG may come out smaller (DCT-domain
/// downscaling, see [`jpeg_draft_factor`]) when `target` allows it.
pub fn decode_rgb8_for(
    encoded: &[u8],
    max_pixels: u64,
    target: Option<Target>,
) -> Result<Rgb8, ImageError> {
    if encoded.is_empty() {
        return Err(ImageError::Empty);
    }
    let format = image::guess_format(encoded).map_err(|_| ImageError::UnknownFormat)?;
    let name = format_name(format);
    let header = |e: image::ImageError| ImageError::Header {
        format: name,
        reason: e.to_string(),
    };
    let cursor = Cursor::new(encoded);
    let decoded = match format {
        ImageFormat::Jpeg => {
            let markers = jpeg_markers(encoded);
            if !markers.ends {
                return Err(ImageError::Decode {
                    format: name,
                    reason: "missing end-of-image marker".into(),
                });
            }
            if let Some(rgb) = decode_jpeg_turbo(encoded, max_pixels, target)? {
                return Ok(rgb);
            }
            // libjpeg-turbo enforces the scan limit itself; the fallback
            // decoder caps progressive scans at 100, but not the scans of a
            // sequential multi-scan JPEG, and it is reached for CMYK and for
            // files libjpeg-turbo rejects for another reason, which may have
            // any number of scans too.
            if markers.scans > MAX_JPEG_SCANS {
                return Err(ImageError::TooManyScans {
                    max: MAX_JPEG_SCANS,
                });
            }
            decode_checked(
                image::codecs::jpeg::JpegDecoder::new(cursor).map_err(header)?,
                name,
                max_pixels,
            )?
        }
        // Row by row straight into RGB8 (see `super::png`).
        ImageFormat::Png => return super::png::decode(encoded, max_pixels),
        ImageFormat::WebP => decode_checked(
            image::codecs::webp::WebPDecoder::new(cursor).map_err(header)?,
            name,
            max_pixels,
        )?,
        _ => return Err(ImageError::UnknownFormat),
    };
    Ok(Rgb8::from(decoded))
}

/// The most scans a JPEG may have. Each scan of a progressive JPEG makes the
/// decoder visit every block of its components again, and a scan that only
/// says "nothing here" costs a few bytes whatever the image size, so a 700 KB
/// 4096×4096 file repeating one scan 20,000 times costs about half a minute of
/// CPU. Encoders write about ten scans (libjpeg's default script: 10 for
/// colour, 6 for grey); 500 is the limit libjpeg-turbo recommends.
pub const MAX_JPEG_SCANS: u32 = 500;

/// Decodes a JPEG with libjpeg-turbo (tuned Huffman decoder, SIMD IDCT,
/// upsampling and colour conversion, straight into RGB8), at 1/2, 1/4 or 1/8 scale in the DCT
/// domain when `target` allows it ([`jpeg_draft_factor`]); the IDCT and
/// upsampling are the accurate ones (`ISLOW`, fancy upsampling), not the
/// fast ones Pillow's `draft` switches to.
///
/// `Ok(None)` hands the image to the regular decoder (zune-jpeg via `image`),
/// whose verdict and error message then stand, where libjpeg-turbo cannot
/// or should not be trusted to have the last word:
/// - CMYK/YCCK: libjpeg-turbo has no CMYK→RGB conversion;
/// - a header libjpeg-turbo rejects;
/// - a decode that fails or warns for a reason other than truncation
///   (e.g. 12-bit samples, which the 8-bit API refuses). The
///   TurboJPEG API reports libjpeg's warnings as failures, and some of them
///   are common on files that decode fine ("Corrupt JPEG data: 1 extraneous
///   bytes before marker 0xd9", written by many cameras; Pillow ignores it),
///   which the previous decoder accepted.
///
/// Truncation ("Premature end of JPEG file", "premature end of data
/// segment") is an error here and does not fall back: zune-jpeg would pad
/// the missing data with grey and succeed. Neither does a file over
/// [`MAX_JPEG_SCANS`] scans, which libjpeg-turbo stops reading at the first
/// scan over the limit.
fn decode_jpeg_turbo(
    encoded: &[u8],
    max_pixels: u64,
    target: Option<Target>,
) -> Result<Option<Rgb8>, ImageError> {
    use image::metadata::Orientation;
    use turbojpeg::{Colorspace, Decompressor, PixelFormat, ScalingFactor};

    let Ok(mut decoder) = Decompressor::new() else {
        return Ok(None);
    };
    if decoder.set_scan_limit(MAX_JPEG_SCANS).is_err() {
        return Ok(None);
    }
    let Ok(header) = decoder.read_header(encoded) else {
        return Ok(None);
    };
    // JPEG dimensions are 16-bit, so these conversions cannot saturate.
    let width = u32::try_from(header.width).unwrap_or(u32::MAX);
    let height = u32::try_from(header.height).unwrap_or(u32::MAX);
    check_size(width, height, max_pixels)?;
    if matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK) {
        return Ok(None);
    }
    // The EXIF segment (APP1) precedes the scan, so it is known before decoding.
    let orientation = jpeg_exif(encoded)
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);
    let swaps = matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    );
    let (shown_w, shown_h) = if swaps {
        (height, width)
    } else {
        (width, height)
    };
    // Lossless JPEG (SOF3) has no DCT to scale in.
    let k = match target {
        Some(target) if !header.is_lossless => jpeg_draft_factor(shown_w, shown_h, target),
        _ => 1,
    };
    let scale = ScalingFactor::new(1, k as usize);
    if decoder.set_scaling_factor(scale).is_err() {
        return Ok(None);
    }
    let scaled = header.scaled(scale);
    let pitch = scaled.width * 3;
    let mut pixels = buffers::take(&buffers::DECODED, pitch * scaled.height);
    let out = turbojpeg::Image {
        pixels: &mut pixels[..],
        width: scaled.width,
        pitch,
        height: scaled.height,
        format: PixelFormat::RGB,
    };
    if let Err(e) = decoder.decompress(encoded, out) {
        let reason = e.to_string();
        let lower = reason.to_ascii_lowercase();
        // libjpeg-turbo: "Progressive JPEG image has more than 500 scans".
        if lower.contains("more than") && lower.contains("scans") {
            return Err(ImageError::TooManyScans {
                max: MAX_JPEG_SCANS,
            });
        }
        if lower.contains("premature end") {
            return Err(ImageError::Decode {
                format: "JPEG",
                reason,
            });
        }
        return Ok(None);
    }
    let (w, h) = (
        u32::try_from(scaled.width).unwrap_or(u32::MAX),
        u32::try_from(scaled.height).unwrap_or(u32::MAX),
    );
    if orientation == Orientation::NoTransforms {
        return Ok(Some(Rgb8 {
            width: w,
            height: h,
            pixels,
        }));
    }
    let Some(img) = image::RgbImage::from_raw(w, h, pixels) else {
        return Ok(None);
    };
    let mut img = DynamicImage::ImageRgb8(img);
    img.apply_orientation(orientation);
    let rgb = img.into_rgb8();
    let (width, height) = rgb.dimensions();
    Ok(Some(Rgb8 {
        width,
        height,
        pixels: rgb.into_raw(),
    }))
}

/// Buffers kept per thread from one image to the next.
///
/// An image's decode buffer (~0.4 MB for a 1080p JPEG at 1/4 scale) and resize scratch are
/// too large for glibc's allocator to keep once freed: it hands them back to the kernel, and
/// the next image's fresh buffers are page-faulted in again, about 300 page faults per
/// request in the serving benchmark (docs/benchmarks.md). A CPU-pool thread keeps the last
/// buffer of each kind instead, unless it is over [`KEEP_AT_MOST`] (a huge image's buffer
/// is freed as before), so what stays allocated is bounded per thread.
mod buffers {
    use std::cell::Cell;
    use std::thread::LocalKey;

    /// The largest buffer a thread keeps.
    pub const KEEP_AT_MOST: usize = 16 << 20;

    thread_local! {
        /// Decoded RGB8 pixels.
        pub static DECODED: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
        /// The resized RGB8 image before normalization.
        pub static RESIZED: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
    }

    /// A zeroed buffer of `len` bytes, reusing the one this thread kept.
    pub fn take(slot: &'static LocalKey<Cell<Vec<u8>>>, len: usize) -> Vec<u8> {
        let mut buf = slot.take();
        buf.clear();
        buf.resize(len, 0);
        buf
    }

    /// Keeps `buf` for this thread's next [`take`] unless it is over [`KEEP_AT_MOST`].
    pub fn keep(slot: &'static LocalKey<Cell<Vec<u8>>>, buf: Vec<u8>) {
        if buf.capacity() <= KEEP_AT_MOST {
            slot.set(buf);
        }
    }
}

/// The EXIF payload (from the TIFF header on) of a JPEG's first `Exif` APP1
/// segment, found by walking the marker segments up to the first scan.
fn jpeg_exif(data: &[u8]) -> Option<&[u8]> {
    if data.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut pos = 2;
    loop {
        if *data.get(pos)? != 0xFF {
            return None;
        }
        // Any number of 0xFF fill bytes may precede a marker code.
        while *data.get(pos + 1)? == 0xFF {
            pos += 1;
        }
        let marker = *data.get(pos + 1)?;
        pos += 2;
        match marker {
            // Standalone markers (TEM, RSTn) carry no length.
            0x01 | 0xD0..=0xD7 => continue,
            // Start of scan or end of image: the header segments are over.
            0xD9 | 0xDA => return None,
            _ => {}
        }
        // The length counts itself (2 bytes); less is malformed.
        let len = usize::from(u16::from_be_bytes([*data.get(pos)?, *data.get(pos + 1)?]));
        if len < 2 {
            return None;
        }
        let body = data.get(pos + 2..pos + len)?;
        if marker == 0xE1
            && let Some(tiff) = body.strip_prefix(b"Exif\0\0")
        {
            return Some(tiff);
        }
        pos += len;
    }
}

/// What a walk over a JPEG's markers found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JpegMarkers {
    /// Start-of-scan markers before the end (or before the data ran out).
    scans: u32,
    /// Whether an end-of-image marker closes the frame. Bytes after it (camera makers'
    /// trailers, a Motion Photo's video) are not the image's and are ignored.
    ends: bool,
}

/// Walks a JPEG's markers from SOI: segments are skipped by their length (so an EXIF
/// thumbnail's own markers are not seen), entropy-coded data byte by byte (a 0xFF there is
/// followed by a stuffed 0x00 or an RSTn, so any other marker is real).
///
/// libjpeg refuses a stream without EOI only with a warning, but a stream cut short is the
/// common failure (truncated upload), and zune-jpeg pads missing data silently: the decoder
/// requires `ends`. The fallback decoder caps progressive scans but not the scans of a
/// sequential multi-scan JPEG, so it also checks `scans`.
fn jpeg_markers(data: &[u8]) -> JpegMarkers {
    let mut found = JpegMarkers {
        scans: 0,
        ends: false,
    };
    let mut pos = 2;
    while let Some(ff) = data.get(pos..).and_then(|rest| memchr::memchr(0xFF, rest)) {
        pos += ff + 1;
        // Any number of 0xFF fill bytes may precede a marker code.
        while data.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        let Some(&marker) = data.get(pos) else {
            break;
        };
        pos += 1;
        match marker {
            // A stuffed data byte and the standalone markers (TEM, RSTn, SOI).
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            0xD9 => {
                found.ends = true;
                break;
            }
            0xDA => found.scans = found.scans.saturating_add(1),
            _ => {}
        }
        let Some(len) = data.get(pos..pos + 2) else {
            break;
        };
        pos += usize::from(u16::from_be_bytes([len[0], len[1]]));
    }
    found
}

pub(super) fn check_size(width: u32, height: u32, max_pixels: u64) -> Result<(), ImageError> {
    let pixels = u64::from(width) * u64::from(height);
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSize { width, height });
    }
    if pixels > max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            pixels,
            max: max_pixels,
        });
    }
    Ok(())
}

fn decode_checked(
    mut decoder: impl ImageDecoder,
    name: &'static str,
    max_pixels: u64,
) -> Result<DynamicImage, ImageError> {
    let (width, height) = decoder.dimensions();
    check_size(width, height, max_pixels)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| ImageError::Decode {
        format: name,
        reason: e.to_string(),
    })?;
    img.apply_orientation(orientation);
    Ok(img)
}

fn filter(f: ResizeFilter) -> fr::ResizeAlg {
    match f {
        ResizeFilter::Bilinear => fr::ResizeAlg::Convolution(fr::FilterType::Bilinear),
        ResizeFilter::Lanczos3 => fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3),
    }
}

/// Where the source lands in the output: the source crop box (left, top,
/// width, height; fractional) and the destination rectangle (x, y, w, h).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// Source box, in source pixels.
    pub src: (f64, f64, f64, f64),
    /// Destination rectangle, in output pixels.
    pub dst: (u32, u32, u32, u32),
}

/// Computes the [`Placement`] of a `sw×sh` source in a `dw×dh` output.
pub fn placement(sw: u32, sh: u32, dw: u32, dh: u32, mode: ResizeMode) -> Placement {
    let (swf, shf, dwf, dhf) = (f64::from(sw), f64::from(sh), f64::from(dw), f64::from(dh));
    match mode {
        ResizeMode::Stretch => Placement {
            src: (0.0, 0.0, swf, shf),
            dst: (0, 0, dw, dh),
        },
        ResizeMode::CenterCrop => {
            let scale = (dwf / swf).max(dhf / shf);
            let (cw, ch) = ((dwf / scale).min(swf), (dhf / scale).min(shf));
            Placement {
                src: ((swf - cw) / 2.0, (shf - ch) / 2.0, cw, ch),
                dst: (0, 0, dw, dh),
            }
        }
        ResizeMode::FitPad => {
            let scale = (dwf / swf).min(dhf / shf);
            let rw = ((swf * scale).round() as u32).clamp(1, dw);
            let rh = ((shf * scale).round() as u32).clamp(1, dh);
            Placement {
                src: (0.0, 0.0, swf, shf),
                dst: ((dw - rw) / 2, (dh - rh) / 2, rw, rh),
            }
        }
    }
}

/// Resizes `src` into the zeroed `dst` (`dw×dh×3`) per `mode`.
pub fn resize_rgb8(
    src: &Rgb8,
    dst: &mut [u8],
    dw: u32,
    dh: u32,
    mode: ResizeMode,
    f: ResizeFilter,
) -> Result<(), ImageError> {
    let err = |e: &dyn std::fmt::Display| ImageError::Resize(e.to_string());
    let p = placement(src.width, src.height, dw, dh, mode);
    let src_img =
        fr::images::ImageRef::new(src.width, src.height, &src.pixels, fr::PixelType::U8x3)
            .map_err(|e| err(&e))?;
    let options = fr::ResizeOptions::new()
        .resize_alg(filter(f))
        .crop(p.src.0, p.src.1, p.src.2, p.src.3);
    let mut resizer = fr::Resizer::new();
    let mut dst_img =
        fr::images::Image::from_slice_u8(dw, dh, dst, fr::PixelType::U8x3).map_err(|e| err(&e))?;
    let (x, y, w, h) = p.dst;
    if (x, y, w, h) == (0, 0, dw, dh) {
        resizer
            .resize(&src_img, &mut dst_img, &options)
            .map_err(|e| err(&e))
    } else {
        let mut sub =
            fr::images::CroppedImageMut::new(&mut dst_img, x, y, w, h).map_err(|e| err(&e))?;
        resizer
            .resize(&src_img, &mut sub, &options)
            .map_err(|e| err(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn center_crop_takes_the_middle_of_the_long_side() {
        let p = placement(400, 200, 100, 100, ResizeMode::CenterCrop);
        assert_eq!(p.src, (100.0, 0.0, 200.0, 200.0));
        assert_eq!(p.dst, (0, 0, 100, 100));
    }

    #[test]
    fn fit_pad_centers_the_scaled_image() {
        let p = placement(400, 200, 100, 100, ResizeMode::FitPad);
        assert_eq!(p.dst, (0, 25, 100, 50));
    }

    fn target(draft: JpegDraft) -> Target {
        Target {
            width: 224,
            height: 224,
            mode: ResizeMode::CenterCrop,
            draft,
        }
    }

    #[test]
    fn a_1080p_frame_cropped_to_224_decodes_at_half_scale_for_quality_and_quarter_for_speed() {
        assert_eq!(jpeg_draft_factor(1920, 1080, target(JpegDraft::Quality)), 2);
        assert_eq!(jpeg_draft_factor(1920, 1080, target(JpegDraft::Fast)), 4);
        assert_eq!(jpeg_draft_factor(1920, 1080, target(JpegDraft::Off)), 1);
    }

    #[test]
    fn an_image_close_to_the_output_size_is_never_draft_decoded() {
        assert_eq!(jpeg_draft_factor(300, 300, target(JpegDraft::Quality)), 1);
        assert_eq!(jpeg_draft_factor(300, 300, target(JpegDraft::Fast)), 1);
    }

    #[test]
    fn a_small_jpeg_is_decoded_at_full_size_even_for_a_tiny_output() {
        let t = Target {
            width: 24,
            height: 24,
            ..target(JpegDraft::Fast)
        };
        assert_eq!(jpeg_draft_factor(97, 61, t), 1);
        assert_eq!(jpeg_draft_factor(511, 511, t), 1);
        assert_eq!(jpeg_draft_factor(512, 512, t), 8);
    }

    #[test]
    fn the_draft_factor_follows_the_side_that_limits_the_crop() {
        // 8000x500 stretched to 224x224: the short side allows no reduction.
        let t = Target {
            mode: ResizeMode::Stretch,
            ..target(JpegDraft::Fast)
        };
        assert_eq!(jpeg_draft_factor(8000, 500, t), 2);
        assert_eq!(jpeg_draft_factor(500, 8000, t), 2);
    }

    /// A `w×h` output with bilinear resizing and the default normalization.
    fn bilinear_config(
        (width, height): (u32, u32),
        mode: ResizeMode,
        layout: Layout,
        dtype: ImageDtype,
    ) -> ImageConfig {
        ImageConfig {
            resize: crate::config::Resize {
                width,
                height,
                mode,
                filter: ResizeFilter::Bilinear,
            },
            normalize: crate::config::Normalize::default(),
            layout,
            dtype,
            jpeg_draft: JpegDraft::default(),
        }
    }

    /// A smooth synthetic photo-like frame, JPEG-encoded.
    fn gradient_jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            image::Rgb([
                (255.0 * fx) as u8,
                (255.0 * fy) as u8,
                (128.0 + 100.0 * (fx * 12.0).sin() * (fy * 7.0).cos()) as u8,
            ])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92)
            .encode_image(&img)
            .unwrap();
        out
    }

    #[test]
    fn a_draft_decoded_jpeg_comes_out_smaller_and_matches_the_full_decode_after_resize() {
        let jpeg = gradient_jpeg(960, 540);
        let to_112 = |draft| Target {
            width: 112,
            height: 112,
            ..target(draft)
        };
        let half = decode_rgb8_for(&jpeg, 1 << 30, Some(to_112(JpegDraft::Quality))).unwrap();
        assert_eq!((half.width, half.height), (480, 270));
        let quarter = decode_rgb8_for(&jpeg, 1 << 30, Some(to_112(JpegDraft::Fast))).unwrap();
        assert_eq!((quarter.width, quarter.height), (240, 135));
        let full = decode_rgb8_for(&jpeg, 1 << 30, Some(to_112(JpegDraft::Off))).unwrap();
        assert_eq!((full.width, full.height), (960, 540));

        let cfg = bilinear_config(
            (112, 112),
            ResizeMode::CenterCrop,
            Layout::Nhwc,
            ImageDtype::Uint8,
        );
        // The policy comes from the pipeline's configuration (`jpegDraft`).
        let run = |jpeg_draft| {
            let cfg = ImageConfig {
                jpeg_draft,
                ..cfg.clone()
            };
            ImagePipeline::new(cfg, 1 << 30)
                .process_batch(&[&jpeg])
                .unwrap()
        };
        let full = run(JpegDraft::Off);
        for draft in [JpegDraft::Quality, JpegDraft::Fast] {
            let got = run(draft);
            assert_ne!(got, full, "{draft:?} decodes at a smaller scale than Off");
            let mean = got
                .iter()
                .zip(&full)
                .map(|(a, b)| f64::from(a.abs_diff(*b)))
                .sum::<f64>()
                / full.len() as f64;
            assert!(mean < 1.5, "{draft:?}: mean |diff| {mean} levels");
        }
    }

    #[test]
    fn a_draft_decode_still_refuses_oversized_jpegs_before_decoding() {
        let jpeg = gradient_jpeg(960, 540);
        let err = decode_rgb8_for(&jpeg, 1000, Some(target(JpegDraft::Quality))).unwrap_err();
        assert!(matches!(err, ImageError::TooLarge { .. }), "{err:?}");
    }

    #[test]
    fn a_large_jpeg_is_decoded_by_libjpeg_turbo_at_one_eighth_scale_with_odd_sides_rounded_up() {
        let jpeg = gradient_jpeg(1001, 601);
        let to_24 = Target {
            width: 24,
            height: 24,
            ..target(JpegDraft::Fast)
        };
        assert_eq!(jpeg_draft_factor(1001, 601, to_24), 8);
        let rgb = decode_rgb8_for(&jpeg, 1 << 30, Some(to_24)).unwrap();
        assert_eq!((rgb.width, rgb.height), (126, 76));
        assert_eq!(rgb.pixels.len(), 126 * 76 * 3);
        // The gradient survives: red grows left to right, green top to bottom.
        let px = |x: usize, y: usize| &rgb.pixels[(y * 126 + x) * 3..][..3];
        assert!(
            px(120, 38)[0] > px(5, 38)[0] + 200,
            "{:?} {:?}",
            px(5, 38),
            px(120, 38)
        );
        assert!(
            px(63, 70)[1] > px(63, 5)[1] + 200,
            "{:?} {:?}",
            px(63, 5),
            px(63, 70)
        );
    }

    #[test]
    fn a_large_grayscale_jpeg_is_draft_decoded_to_equal_rgb_channels() {
        let gray = image::GrayImage::from_fn(800, 600, |x, y| image::Luma([((x + y) / 6) as u8]));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode_image(&gray)
            .unwrap();
        let rgb = decode_rgb8_for(&jpeg, 1 << 30, Some(target(JpegDraft::Quality))).unwrap();
        // 600/2 = 300 >= 2 × 224 fails, so Quality keeps full size; Fast halves.
        assert_eq!((rgb.width, rgb.height), (800, 600));
        let rgb = decode_rgb8_for(&jpeg, 1 << 30, Some(target(JpegDraft::Fast))).unwrap();
        assert_eq!((rgb.width, rgb.height), (400, 300));
        assert!(
            rgb.pixels
                .chunks_exact(3)
                .all(|p| p[0] == p[1] && p[1] == p[2])
        );
        assert!(rgb.pixels[(150 * 400 + 399) * 3] > rgb.pixels[150 * 400 * 3] + 50);
    }

    /// `jpeg` with an EXIF APP1 segment (little-endian TIFF, one IFD entry:
    /// Orientation = `orientation`) inserted after SOI.
    fn with_exif_orientation(jpeg: &[u8], orientation: u8) -> Vec<u8> {
        let tiff: [u8; 26] = [
            b'I',
            b'I',
            42,
            0,
            8,
            0,
            0,
            0, // header, IFD at 8
            1,
            0, // one entry
            0x12,
            0x01,
            3,
            0,
            1,
            0,
            0,
            0,
            orientation,
            0,
            0,
            0, // Orientation, SHORT, 1
            0,
            0,
            0,
            0, // no next IFD
        ];
        let len = (2 + 6 + tiff.len()) as u16;
        let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(b"Exif\0\0");
        out.extend_from_slice(&tiff);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn an_exif_rotated_jpeg_is_draft_decoded_by_its_displayed_size_and_then_rotated() {
        let jpeg = with_exif_orientation(&gradient_jpeg(960, 540), 6);
        assert!(jpeg_exif(&jpeg).is_some());
        let to_112 = Target {
            width: 112,
            height: 112,
            ..target(JpegDraft::Fast)
        };
        // Displayed 540×960: the 540-pixel side limits the crop to 1/4.
        assert_eq!(jpeg_draft_factor(540, 960, to_112), 4);
        let rgb = decode_rgb8_for(&jpeg, 1 << 30, Some(to_112)).unwrap();
        assert_eq!((rgb.width, rgb.height), (135, 240));
        let full = decode_rgb8(&jpeg, 1 << 30).unwrap();
        assert_eq!((full.width, full.height), (540, 960));
        // Rotated 90° clockwise: the source's top row (green = 0) is now the
        // right column, its left column (red = 0) the top row.
        let px = |x: usize, y: usize| &rgb.pixels[(y * 135 + x) * 3..][..3];
        assert!(
            px(134, 120)[1] < 20 && px(0, 120)[1] > 200,
            "{:?} {:?}",
            px(134, 120),
            px(0, 120)
        );
        assert!(
            px(67, 0)[0] < 20 && px(67, 239)[0] > 200,
            "{:?} {:?}",
            px(67, 0),
            px(67, 239)
        );
    }

    #[test]
    fn malformed_jpeg_segments_yield_no_exif_instead_of_a_panic() {
        assert_eq!(jpeg_exif(b"\xFF\xD8\xFF\xE1\x00\x01Exif"), None);
        assert_eq!(jpeg_exif(b"\xFF\xD8\xFF\xE1\xFF\xFFExif\0\0II"), None);
        assert_eq!(jpeg_exif(b"\xFF\xD8\xFF\xFF\xFF"), None);
        assert_eq!(jpeg_exif(b"\xFF\xD8\x00"), None);
        assert_eq!(jpeg_exif(b"\xFF\xD8\xFF\xDA\x00\x08"), None);
    }

    #[test]
    fn a_jpeg_cut_short_is_refused_as_truncated() {
        let jpeg = gradient_jpeg(960, 540);
        let cut = &jpeg[..jpeg.len() / 2];
        let err = decode_rgb8_for(cut, 1 << 30, Some(target(JpegDraft::Fast))).unwrap_err();
        assert!(err.to_string().contains("truncated or corrupt"), "{err}");
    }

    #[test]
    fn a_jpeg_whose_scan_is_cut_but_still_ends_with_an_end_marker_is_refused_as_truncated() {
        let jpeg = gradient_jpeg(960, 540);
        let mut cut = jpeg[..jpeg.len() / 2].to_vec();
        cut.extend_from_slice(&[0xFF, 0xD9]);
        for draft in [JpegDraft::Off, JpegDraft::Fast] {
            let err = decode_rgb8_for(&cut, 1 << 30, Some(target(draft))).unwrap_err();
            assert!(
                matches!(&err, ImageError::Decode { reason, .. } if reason.to_ascii_lowercase().contains("premature end")),
                "{draft:?}: {err}"
            );
        }
    }

    #[test]
    fn bytes_after_the_end_marker_are_ignored_like_a_cameras_trailer() {
        let jpeg = gradient_jpeg(960, 540);
        let want = decode_rgb8_for(&jpeg, 1 << 30, Some(target(JpegDraft::Fast))).unwrap();
        // A Motion Photo appends a video, markers and all; other cameras a metadata block.
        let mut trailer = b"\0\0\0\x18ftypmp42".to_vec();
        trailer.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xDA, 0xFF, 0xD9, 0xFF]);
        trailer.extend((0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
        let mut trailed = jpeg.clone();
        trailed.extend_from_slice(&trailer);
        for draft in [JpegDraft::Off, JpegDraft::Fast] {
            let got = decode_rgb8_for(&trailed, 1 << 30, Some(target(draft))).unwrap();
            let plain = decode_rgb8_for(&jpeg, 1 << 30, Some(target(draft))).unwrap();
            assert_eq!(got.pixels, plain.pixels, "{draft:?}");
        }
        assert_eq!(
            decode_rgb8_for(&trailed, 1 << 30, Some(target(JpegDraft::Fast)))
                .unwrap()
                .pixels,
            want.pixels
        );
    }

    #[test]
    fn an_end_marker_inside_a_segment_does_not_hide_a_cut() {
        // An APP segment holding a whole small JPEG (as an EXIF thumbnail does), then the
        // frame cut in half: the thumbnail's end marker is not the frame's.
        let jpeg = gradient_jpeg(960, 540);
        let thumb = gradient_jpeg(16, 16);
        let mut with_thumb = jpeg[..2].to_vec();
        with_thumb.extend_from_slice(&[0xFF, 0xE2]);
        with_thumb.extend_from_slice(&u16::try_from(thumb.len() + 2).unwrap().to_be_bytes());
        with_thumb.extend_from_slice(&thumb);
        with_thumb.extend_from_slice(&jpeg[2..]);
        assert!(jpeg_markers(&with_thumb).ends);
        let cut = &with_thumb[..with_thumb.len() / 2];
        assert!(!jpeg_markers(cut).ends);
        let err = decode_rgb8_for(cut, 1 << 30, Some(target(JpegDraft::Fast))).unwrap_err();
        assert!(
            err.to_string().contains("missing end-of-image marker"),
            "{err}"
        );
    }

    /// The gradient frame encoded by libjpeg-turbo with the given settings.
    fn turbo_jpeg(
        w: u32,
        h: u32,
        format: turbojpeg::PixelFormat,
        configure: impl FnOnce(&mut turbojpeg::Compressor),
    ) -> Vec<u8> {
        let rgb = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(255 * x / w) as u8, (255 * y / h) as u8, 128])
        }));
        let pixels = match format {
            turbojpeg::PixelFormat::RGB => rgb.into_rgb8().into_raw(),
            // Inverted CMYK as Photoshop writes it: 255 = no ink.
            turbojpeg::PixelFormat::CMYK => rgb
                .into_rgb8()
                .pixels()
                .flat_map(|p| [p[0], p[1], p[2], 255])
                .collect(),
            other => panic!("unsupported test format {other:?}"),
        };
        let mut compressor = turbojpeg::Compressor::new().unwrap();
        compressor.set_quality(90).unwrap();
        configure(&mut compressor);
        let image = turbojpeg::Image {
            pixels: &pixels[..],
            width: w as usize,
            pitch: w as usize * format.size(),
            height: h as usize,
            format,
        };
        compressor.compress_to_vec(image).unwrap()
    }

    #[test]
    fn progressive_arithmetic_and_unsubsampled_jpegs_are_draft_decoded_like_baseline_ones() {
        use turbojpeg::{PixelFormat, Subsamp};
        let baseline = turbo_jpeg(960, 540, PixelFormat::RGB, |_| {});
        let base = decode_rgb8_for(&baseline, 1 << 30, Some(target(JpegDraft::Fast))).unwrap();
        assert_eq!((base.width, base.height), (480, 270));
        type Configure = fn(&mut turbojpeg::Compressor);
        let variants: [(&str, Configure); 4] = [
            ("progressive", |c| c.set_progressive(true).unwrap()),
            ("arithmetic", |c| c.set_arithmetic(true).unwrap()),
            ("4:4:4", |c| c.set_subsamp(Subsamp::None).unwrap()),
            ("4:2:2", |c| c.set_subsamp(Subsamp::Sub2x1).unwrap()),
        ];
        for (name, configure) in variants {
            let jpeg = turbo_jpeg(960, 540, PixelFormat::RGB, configure);
            let got = decode_rgb8_for(&jpeg, 1 << 30, Some(target(JpegDraft::Fast))).unwrap();
            assert_eq!((got.width, got.height), (480, 270), "{name}");
            let mean = got
                .pixels
                .iter()
                .zip(&base.pixels)
                .map(|(a, b)| f64::from(a.abs_diff(*b)))
                .sum::<f64>()
                / base.pixels.len() as f64;
            assert!(mean < 1.0, "{name}: mean |diff| {mean} levels");
        }
    }

    #[test]
    fn a_lossless_jpeg_has_no_dct_to_scale_and_is_decoded_at_full_size() {
        let jpeg = turbo_jpeg(960, 540, turbojpeg::PixelFormat::RGB, |c| {
            c.set_lossless(true).unwrap()
        });
        let rgb = decode_rgb8_for(&jpeg, 1 << 30, Some(target(JpegDraft::Fast))).unwrap();
        assert_eq!((rgb.width, rgb.height), (960, 540));
        // Lossless: the gradient comes back exactly.
        assert_eq!(&rgb.pixels[..3], &[0, 0, 128]);
        assert_eq!(&rgb.pixels[(539 * 960 + 959) * 3..], &[254, 254, 128]);
    }

    #[test]
    fn a_large_cmyk_jpeg_falls_back_to_the_full_size_decoder_and_comes_out_rgb() {
        let jpeg = turbo_jpeg(960, 540, turbojpeg::PixelFormat::CMYK, |_| {});
        let header = turbojpeg::read_header(&jpeg).unwrap();
        assert!(matches!(
            header.colorspace,
            turbojpeg::Colorspace::YCCK | turbojpeg::Colorspace::CMYK
        ));
        let rgb = decode_rgb8_for(&jpeg, 1 << 30, Some(target(JpegDraft::Fast))).unwrap();
        assert_eq!((rgb.width, rgb.height), (960, 540));
        assert_eq!(rgb.pixels.len(), 960 * 540 * 3);
    }

    #[test]
    fn empty_and_garbage_inputs_are_named_errors() {
        assert_eq!(decode_rgb8(b"", 100).unwrap_err(), ImageError::Empty);
        assert_eq!(
            decode_rgb8(b"hello world", 100).unwrap_err(),
            ImageError::UnknownFormat
        );
    }

    #[test]
    fn a_kept_buffer_comes_back_zeroed_and_an_oversized_one_is_not_kept() {
        let mut buf = buffers::take(&buffers::DECODED, 16);
        buf.fill(7);
        buffers::keep(&buffers::DECODED, buf);
        let again = buffers::take(&buffers::DECODED, 32);
        assert_eq!(again, vec![0; 32]);
        buffers::keep(&buffers::DECODED, vec![1; buffers::KEEP_AT_MOST + 1]);
        assert_eq!(buffers::take(&buffers::DECODED, 0).capacity(), 0);
    }

    #[test]
    fn images_of_other_sizes_in_between_on_one_thread_do_not_change_an_images_tensor() {
        let cfg = bilinear_config((64, 48), ResizeMode::FitPad, Layout::Nchw, ImageDtype::Fp32);
        let pipeline = ImagePipeline::new(cfg, 1 << 30);
        // Drafted to 1/4 (a 240x135 decode), full size, and a full decode larger than both.
        let images = [
            gradient_jpeg(960, 540),
            gradient_jpeg(97, 61),
            gradient_jpeg(400, 300),
        ];
        let run = |jpeg: &Vec<u8>| pipeline.process_batch(&[jpeg]).unwrap();
        let fresh: Vec<Vec<u8>> = images
            .iter()
            .map(|jpeg| std::thread::scope(|s| s.spawn(|| run(jpeg)).join().unwrap()))
            .collect();
        for order in [[0, 1, 2, 0, 2, 1], [2, 0, 1, 1, 0, 2]] {
            for i in order {
                assert!(
                    run(&images[i]) == fresh[i],
                    "image {i} after another image differs"
                );
            }
        }
    }

    /// `jpeg` (a 64×64 progressive JPEG) with `repeats` more scans before its
    /// EOI, each a valid first AC pass over the first component that codes
    /// every block as "no more coefficients" (one bit per block), so they
    /// leave the image unchanged: what scanbomb-style files repeat thousands
    /// of times. A new AC Huffman table (table 3, one 1-bit code for EOB)
    /// precedes them.
    fn with_repeated_scans(jpeg: &[u8], repeats: usize) -> Vec<u8> {
        let sof = jpeg
            .windows(2)
            .position(|w| w == [0xFF, 0xC2])
            .expect("a progressive JPEG");
        // FF C2, length (2), precision, height (2), width (2), components, then the first id.
        let first_id = jpeg[sof + 10];
        assert_eq!(&jpeg[sof + 5..sof + 9], &[0, 64, 0, 64], "a 64x64 image");
        let eoi = jpeg.len() - 2;
        assert_eq!(&jpeg[eoi..], &[0xFF, 0xD9]);
        let mut out = jpeg[..eoi].to_vec();
        let mut counts = [0u8; 16];
        counts[0] = 1;
        out.extend_from_slice(&[0xFF, 0xC4, 0, 20, 0x13]);
        out.extend_from_slice(&counts);
        out.push(0x00);
        for _ in 0..repeats {
            // One component; DC table 0, AC table 3; Ss=1, Se=63, Ah=Al=0.
            out.extend_from_slice(&[0xFF, 0xDA, 0, 8, 1, first_id, 0x03, 1, 63, 0]);
            // 8×8 blocks, one 0 bit each.
            out.extend_from_slice(&[0u8; 64 / 8]);
        }
        out.extend_from_slice(&[0xFF, 0xD9]);
        out
    }

    fn progressive_64(format: turbojpeg::PixelFormat) -> Vec<u8> {
        turbo_jpeg(64, 64, format, |c| c.set_progressive(true).unwrap())
    }

    /// libjpeg-turbo's own verdict on an RGB `jpeg` under `scan_limit` (0 = none).
    fn turbo_verdict(jpeg: &[u8], scan_limit: u32) -> turbojpeg::Result<()> {
        let mut decompressor = turbojpeg::Decompressor::new()?;
        decompressor.set_scan_limit(scan_limit)?;
        let header = decompressor.read_header(jpeg)?;
        let mut image = turbojpeg::Image {
            pixels: vec![0u8; header.width * header.height * 3],
            width: header.width,
            pitch: header.width * 3,
            height: header.height,
            format: turbojpeg::PixelFormat::RGB,
        };
        decompressor.decompress(jpeg, image.as_deref_mut())
    }

    /// A bilinear center crop to 32×32, FP32 NCHW.
    fn small_crop_pipeline() -> ImagePipeline {
        let cfg = bilinear_config(
            (32, 32),
            ResizeMode::CenterCrop,
            Layout::Nchw,
            ImageDtype::Fp32,
        );
        ImagePipeline::new(cfg, 1 << 30)
    }

    #[test]
    fn a_progressive_jpeg_repeating_a_scan_a_thousand_times_is_refused_as_too_many_scans() {
        let bomb = with_repeated_scans(&progressive_64(turbojpeg::PixelFormat::RGB), 1000);
        // A valid file: with no scan limit, libjpeg-turbo decodes it without a warning.
        turbo_verdict(&bomb, 0).unwrap();
        for draft in [JpegDraft::Off, JpegDraft::Fast] {
            let err = decode_rgb8_for(&bomb, 1 << 30, Some(target(draft))).unwrap_err();
            assert_eq!(err, ImageError::TooManyScans { max: 500 }, "{draft:?}");
            assert!(err.to_string().contains("more than 500 scans"), "{err}");
        }
        let pipeline = small_crop_pipeline();
        assert_eq!(
            pipeline.process_batch(&[&bomb]).unwrap_err(),
            (0, ImageError::TooManyScans { max: 500 })
        );
    }

    #[test]
    fn a_batch_stops_before_the_next_image_once_told_to_and_otherwise_matches_process_batch() {
        let jpeg = progressive_64(turbojpeg::PixelFormat::RGB);
        let pipeline = small_crop_pipeline();
        let items = [&jpeg, &jpeg, &jpeg];
        let asked = std::cell::Cell::new(0);
        let stopped = pipeline.process_batch_while(&items, || {
            asked.set(asked.get() + 1);
            asked.get() < 2
        });
        assert_eq!(stopped, Ok(None));
        assert_eq!(
            asked.get(),
            2,
            "asked before the first and second image only"
        );
        assert_eq!(
            pipeline.process_batch_while(&items, || true),
            Ok(Some(pipeline.process_batch(&items).unwrap()))
        );
    }

    #[test]
    fn a_progressive_jpeg_with_a_few_extra_scans_decodes_like_the_ordinary_one() {
        let jpeg = progressive_64(turbojpeg::PixelFormat::RGB);
        let plain = decode_rgb8(&jpeg, 1 << 30).unwrap();
        assert_eq!((plain.width, plain.height), (64, 64));
        // Ten scans of its own, 490 more: at the limit, still decoded by
        // libjpeg-turbo, to the same pixels.
        assert_eq!(jpeg_markers(&jpeg).scans, 10);
        let at_limit = with_repeated_scans(&jpeg, 490);
        turbo_verdict(&at_limit, MAX_JPEG_SCANS).unwrap();
        let decoded = decode_rgb8(&at_limit, 1 << 30).unwrap();
        assert_eq!(decoded.pixels, plain.pixels);
        let over = with_repeated_scans(&jpeg, 491);
        assert_eq!(
            decode_rgb8(&over, 1 << 30).unwrap_err(),
            ImageError::TooManyScans { max: 500 }
        );
    }

    #[test]
    fn a_cmyk_jpeg_with_too_many_scans_is_refused_before_the_fallback_decoder() {
        let jpeg = progressive_64(turbojpeg::PixelFormat::CMYK);
        let few = with_repeated_scans(&jpeg, 5);
        let rgb = decode_rgb8(&few, 1 << 30).unwrap();
        assert_eq!((rgb.width, rgb.height), (64, 64));
        let bomb = with_repeated_scans(&jpeg, 1000);
        assert_eq!(
            decode_rgb8(&bomb, 1 << 30).unwrap_err(),
            ImageError::TooManyScans { max: 500 }
        );
    }

    #[test]
    fn the_marker_walk_skips_segment_payloads_and_counts_every_scan() {
        let jpeg = progressive_64(turbojpeg::PixelFormat::RGB);
        // A comment segment full of SOS-like bytes right after SOI.
        let mut commented = jpeg[..2].to_vec();
        let payload: Vec<u8> = [0xFF, 0xDA].repeat(600);
        let len = u16::try_from(payload.len() + 2).unwrap();
        commented.extend_from_slice(&[0xFF, 0xFE]);
        commented.extend_from_slice(&len.to_be_bytes());
        commented.extend_from_slice(&payload);
        commented.extend_from_slice(&jpeg[2..]);
        assert_eq!(jpeg_markers(&commented).scans, 10);
        assert!(decode_rgb8(&commented, 1 << 30).is_ok());
        let bomb = with_repeated_scans(&jpeg, 20_000);
        assert_eq!(jpeg_markers(&bomb).scans, 20_010);
        assert_eq!(
            jpeg_markers(b"\xFF\xD8\xFF\xDA"),
            JpegMarkers {
                scans: 1,
                ends: false
            }
        );
        assert_eq!(
            jpeg_markers(b"\xFF\xD8"),
            JpegMarkers {
                scans: 0,
                ends: false
            }
        );
    }
}
