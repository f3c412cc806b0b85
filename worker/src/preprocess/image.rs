//! The image pipeline: encoded JPEG/PNG/WebP bytes → one item of the outgoing
//! tensor (`[3, H, W]` or `[H, W, 3]`, FP32 normalized or UINT8).
//!
//! Steps: sniff the format, read the header and refuse oversized images before
//! any pixel buffer is allocated (decompression bombs), decode once, apply the
//! EXIF orientation, convert grayscale/CMYK/alpha/16-bit to RGB8, resize with an
//! antialiasing convolution (Pillow-compatible filters via `fast_image_resize`)
//! into a small RGB8 scratch, then normalize through a per-channel lookup table
//! straight into the caller's slice of the batch tensor. Pure and synchronous:
//! it runs on the CPU pool.

use std::io::Cursor;

use fast_image_resize as fr;
use image::{DynamicImage, ImageDecoder, ImageFormat};

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

/// A configured image pipeline; cheap to share between threads.
#[derive(Debug, Clone)]
pub struct ImagePipeline {
    cfg: ImageConfig,
    max_pixels: u64,
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
        let item = self.item_bytes();
        let mut out = vec![0u8; item * items.len()];
        for (i, (encoded, slot)) in items.iter().zip(out.chunks_exact_mut(item)).enumerate() {
            self.process_into(encoded.as_ref(), slot)
                .map_err(|e| (i, e))?;
        }
        Ok(out)
    }

    /// Decodes, resizes and normalizes one image into `out`
    /// (exactly [`Self::item_bytes`] long).
    pub fn process_into(&self, encoded: &[u8], out: &mut [u8]) -> Result<(), ImageError> {
        let rgb = decode_rgb8(encoded, self.max_pixels)?;
        let (w, h) = (self.cfg.resize.width, self.cfg.resize.height);
        let mut scratch = vec![0u8; w as usize * h as usize * 3];
        resize_rgb8(
            &rgb,
            &mut scratch,
            w,
            h,
            self.cfg.resize.mode,
            self.cfg.resize.filter,
        )?;
        self.write_tensor(&scratch, out);
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

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        _ => "image",
    }
}

/// Decodes JPEG/PNG/WebP to RGB8 with the EXIF orientation applied, refusing
/// images whose header declares more than `max_pixels` before decoding.
pub fn decode_rgb8(encoded: &[u8], max_pixels: u64) -> Result<Rgb8, ImageError> {
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
            if !jpeg_has_end_marker(encoded) {
                return Err(ImageError::Decode {
                    format: name,
                    reason: "missing end-of-image marker".into(),
                });
            }
            decode_checked(
                image::codecs::jpeg::JpegDecoder::new(cursor).map_err(header)?,
                name,
                max_pixels,
            )?
        }
        ImageFormat::Png => {
            // The png crate reads up to the first IDAT before it reports the
            // size; check the IHDR ourselves so a bomb is named as such.
            if let Some((width, height)) = png_ihdr_size(encoded) {
                check_size(width, height, max_pixels)?;
            }
            decode_checked(
                image::codecs::png::PngDecoder::new(cursor).map_err(header)?,
                name,
                max_pixels,
            )?
        }
        ImageFormat::WebP => decode_checked(
            image::codecs::webp::WebPDecoder::new(cursor).map_err(header)?,
            name,
            max_pixels,
        )?,
        _ => return Err(ImageError::UnknownFormat),
    };
    let rgb = decoded.into_rgb8();
    let (width, height) = rgb.dimensions();
    Ok(Rgb8 {
        width,
        height,
        pixels: rgb.into_raw(),
    })
}

/// libjpeg refuses a stream without EOI only with a warning, but a stream cut
/// short is the common failure (truncated upload), and zune-jpeg pads missing
/// data silently; require the marker (trailing padding bytes tolerated).
fn jpeg_has_end_marker(data: &[u8]) -> bool {
    let tail = &data[data.len().saturating_sub(64)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Width and height from a PNG's IHDR chunk (always the first chunk).
fn png_ihdr_size(data: &[u8]) -> Option<(u32, u32)> {
    let ihdr = data.get(12..24)?;
    if &ihdr[..4] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes([ihdr[4], ihdr[5], ihdr[6], ihdr[7]]);
    let h = u32::from_be_bytes([ihdr[8], ihdr[9], ihdr[10], ihdr[11]]);
    Some((w, h))
}

fn check_size(width: u32, height: u32, max_pixels: u64) -> Result<(), ImageError> {
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

    #[test]
    fn empty_and_garbage_inputs_are_named_errors() {
        assert_eq!(decode_rgb8(b"", 100).unwrap_err(), ImageError::Empty);
        assert_eq!(
            decode_rgb8(b"hello world", 100).unwrap_err(),
            ImageError::UnknownFormat
        );
    }
}
