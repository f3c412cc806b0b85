//! PNG straight to RGB8, row by row.
//!
//! Decoding the whole image in its own format first and converting it afterwards (as the
//! `image` crate's `DynamicImage` does) held both at once: a 16-bit RGBA PNG cost 8 bytes per
//! pixel for its own format plus 3 for the RGB8 copy, so a 7000×7000 image, within the
//! default `maxImagePixels`, took 535 MB. Here each decoded row (interlaced passes included) is
//! converted into the RGB8 buffer as it comes out of the decoder: the image costs its 3 bytes
//! per pixel and one row. The conversion is the one `DynamicImage::into_rgb8` made: grey is
//! repeated into the three channels, alpha is dropped, 16-bit samples are rounded to 8 bits.

use std::io::Cursor;

use image::metadata::Orientation;

use super::image::{ImageError, Rgb8, check_size};

/// The Adam7 passes as (x offset, x step, y offset, y step), in the order they are stored.
const ADAM7: [(u32, u32, u32, u32); 7] = [
    (0, 8, 0, 8),
    (4, 8, 0, 8),
    (0, 4, 4, 8),
    (2, 4, 0, 4),
    (0, 2, 2, 4),
    (1, 2, 0, 2),
    (0, 1, 1, 2),
];

/// Where the rows the decoder hands out go: each is `count` pixels placed `dx` apart from
/// (`x0`, `y`).
struct RowPlace {
    x0: u32,
    dx: u32,
    y: u32,
    count: u32,
}

/// The places of an image's rows in the order the decoder hands them out: top to bottom, or
/// pass by pass for Adam7, skipping the passes an image too small has no pixels in.
fn row_places(width: u32, height: u32, interlaced: bool) -> Box<dyn Iterator<Item = RowPlace>> {
    if !interlaced {
        return Box::new((0..height).map(move |y| RowPlace {
            x0: 0,
            dx: 1,
            y,
            count: width,
        }));
    }
    Box::new(ADAM7.into_iter().flat_map(move |(x0, dx, y0, dy)| {
        let count = width.saturating_sub(x0).div_ceil(dx);
        let lines = if count == 0 {
            0
        } else {
            height.saturating_sub(y0).div_ceil(dy)
        };
        (0..lines).map(move |line| RowPlace {
            x0,
            dx,
            y: y0 + line * dy,
            count,
        })
    }))
}

/// Writes one decoded row of `channels` samples per pixel (16-bit ones when `wide`) into the
/// RGB8 image row `out_row` at `place`.
fn put_row(out_row: &mut [u8], place: &RowPlace, data: &[u8], channels: usize, wide: bool) {
    if place.dx == 1 && channels == 3 && !wide {
        out_row.copy_from_slice(data);
        return;
    }
    // Each piece starts at one of the row's pixels.
    let outs = out_row[place.x0 as usize * 3..].chunks_mut(place.dx as usize * 3);
    match (channels >= 3, wide) {
        (true, false) => {
            for (o, px) in outs.zip(data.chunks_exact(channels)) {
                o[..3].copy_from_slice(&px[..3]);
            }
        }
        (false, false) => {
            for (o, px) in outs.zip(data.chunks_exact(channels)) {
                o[..3].fill(px[0]);
            }
        }
        (true, true) => {
            for (o, px) in outs.zip(data.chunks_exact(channels * 2)) {
                o[..3].copy_from_slice(&[
                    to_u8(px[0], px[1]),
                    to_u8(px[2], px[3]),
                    to_u8(px[4], px[5]),
                ]);
            }
        }
        (false, true) => {
            for (o, px) in outs.zip(data.chunks_exact(channels * 2)) {
                o[..3].fill(to_u8(px[0], px[1]));
            }
        }
    }
}

/// A 16-bit sample rounded to 8 bits (`round(v × 255 / 65535)`).
fn to_u8(hi: u8, lo: u8) -> u8 {
    // At most (65535 + 128) / 257 = 255.
    u8::try_from((u32::from(u16::from_be_bytes([hi, lo])) + 128) / 257).unwrap_or(u8::MAX)
}

/// Width and height from a PNG's IHDR chunk (always the first chunk).
fn ihdr_size(data: &[u8]) -> Option<(u32, u32)> {
    let ihdr = data.get(12..24)?;
    if &ihdr[..4] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes([ihdr[4], ihdr[5], ihdr[6], ihdr[7]]);
    let h = u32::from_be_bytes([ihdr[8], ihdr[9], ihdr[10], ihdr[11]]);
    Some((w, h))
}

/// Decodes a PNG to RGB8 with its EXIF orientation (`eXIf` chunk) applied, refusing one whose
/// header declares more than `max_pixels` before anything is allocated.
pub(super) fn decode(encoded: &[u8], max_pixels: u64) -> Result<Rgb8, ImageError> {
    const NAME: &str = "PNG";
    // The decoder reads up to the first IDAT before it reports the size; check the IHDR first
    // so a bomb is named as such.
    let declared = ihdr_size(encoded);
    if let Some((width, height)) = declared {
        check_size(width, height, max_pixels)?;
    }
    // What the decoder may allocate: a few rows of at most 8 bytes per pixel, and the ancillary
    // chunks it reads. The image itself is in the RGB8 buffer, bounded by `max_pixels`.
    let rows = declared.map_or(0, |(width, _)| width as usize * 8 * 4);
    let mut decoder = png::Decoder::new_with_limits(
        Cursor::new(encoded),
        png::Limits {
            bytes: (64 << 20) + rows,
        },
    );
    // Palette to RGB(A), grey under 8 bits to 8 bits, tRNS to alpha; 16 bits kept, and rounded
    // below as `into_rgb8` did (the decoder's STRIP_16 truncates).
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(|e| ImageError::Header {
        format: NAME,
        reason: e.to_string(),
    })?;
    let info = reader.info();
    let (width, height, interlaced) = (info.width, info.height, info.interlaced);
    check_size(width, height, max_pixels)?;
    let orientation = info
        .exif_metadata
        .as_deref()
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);
    let (color, depth) = reader.output_color_type();
    let channels = color.samples();
    let sample_bytes = if depth == png::BitDepth::Sixteen {
        2
    } else {
        1
    };
    let pixel_bytes = channels * sample_bytes;
    // Within `max_pixels`, which the worker's configuration keeps far below `usize::MAX` / 3.
    let row_bytes = width as usize * 3;
    let mut pixels = vec![0u8; height as usize * row_bytes];
    let corrupt = |reason: String| ImageError::Decode {
        format: NAME,
        reason,
    };
    let mut places = row_places(width, height, interlaced);
    while let Some(row) = reader.next_row().map_err(|e| corrupt(e.to_string()))? {
        let place = places
            .next()
            .ok_or_else(|| corrupt("more rows than the image has".into()))?;
        let count = place.count as usize;
        let data = row
            .data()
            .get(..count * pixel_bytes)
            .ok_or_else(|| corrupt("a row shorter than the image is wide".into()))?;
        let out_row = &mut pixels[place.y as usize * row_bytes..][..row_bytes];
        put_row(out_row, &place, data, channels, sample_bytes == 2);
    }
    if places.next().is_some() {
        return Err(corrupt("image data ends before its last row".into()));
    }
    if orientation == Orientation::NoTransforms {
        return Ok(Rgb8 {
            width,
            height,
            pixels,
        });
    }
    let mut img = image::DynamicImage::ImageRgb8(
        image::RgbImage::from_raw(width, height, pixels)
            .ok_or_else(|| corrupt("pixel buffer of the wrong size".into()))?,
    );
    img.apply_orientation(orientation);
    Ok(Rgb8::from(img))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::ImageDecoder as _;
    use std::io::Write as _;

    /// Deterministic bytes for image data.
    fn noise(seed: u32, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 8) as u8
            })
            .collect()
    }

    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }

    /// A PNG written from the specification, independently of the decoder: colour type `color`
    /// (0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA) at `depth` bits, Adam7 when
    /// `interlaced`, every row unfiltered and filled with noise; with a `tRNS` chunk when
    /// `transparent` and an `eXIf` chunk giving `orientation` when set.
    fn encode(
        (width, height): (u32, u32),
        color: u8,
        depth: u8,
        interlaced: bool,
        transparent: bool,
        orientation: Option<u16>,
    ) -> Vec<u8> {
        let channels = match color {
            0 | 3 => 1,
            2 => 3,
            4 => 2,
            _ => 4,
        };
        let bits = u32::from(depth) * channels;
        let line = |samples: u32| (samples * bits).div_ceil(8) as usize;
        let mut raw = Vec::new();
        let mut seed = width * 31 + height;
        let mut row = |raw: &mut Vec<u8>, samples: u32| {
            seed += 1;
            raw.push(0);
            raw.extend(noise(seed, line(samples)));
        };
        if interlaced {
            for (x0, dx, y0, dy) in ADAM7 {
                let samples = width.saturating_sub(x0).div_ceil(dx);
                let lines = height.saturating_sub(y0).div_ceil(dy);
                if samples > 0 {
                    (0..lines).for_each(|_| row(&mut raw, samples));
                }
            }
        } else {
            (0..height).for_each(|_| row(&mut raw, width));
        }
        let mut out = vec![137, 80, 78, 71, 13, 10, 26, 10];
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[depth, color, 0, 0, u8::from(interlaced)]);
        chunk(&mut out, b"IHDR", &ihdr);
        if let Some(o) = orientation {
            let mut exif = b"MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
            exif.extend_from_slice(&o.to_be_bytes());
            exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            chunk(&mut out, b"eXIf", &exif);
        }
        if color == 3 {
            chunk(&mut out, b"PLTE", &noise(7, 3 << depth));
        }
        if transparent {
            match color {
                0 => chunk(&mut out, b"tRNS", &[0, 1]),
                2 => chunk(&mut out, b"tRNS", &[0, 1, 0, 2, 0, 3]),
                3 => chunk(&mut out, b"tRNS", &noise(9, 1 << depth)),
                _ => {}
            }
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&raw).unwrap();
        chunk(&mut out, b"IDAT", &z.finish().unwrap());
        chunk(&mut out, b"IEND", &[]);
        out
    }

    /// What the `image` crate made of it before: its own decode, then `into_rgb8`.
    fn through_image_crate(png: &[u8]) -> Rgb8 {
        let decoder = image::codecs::png::PngDecoder::new(Cursor::new(png)).unwrap();
        let mut decoder = decoder;
        let orientation = decoder.orientation().unwrap();
        let mut img = image::DynamicImage::from_decoder(decoder).unwrap();
        img.apply_orientation(orientation);
        Rgb8::from(img)
    }

    const KINDS: [(u8, &[u8]); 5] = [
        (0, &[1, 2, 4, 8, 16]),
        (2, &[8, 16]),
        (3, &[1, 2, 4, 8]),
        (4, &[8, 16]),
        (6, &[8, 16]),
    ];

    #[test]
    fn every_colour_type_and_depth_plain_or_interlaced_decodes_to_what_into_rgb8_made() {
        let mut cases = 0;
        for (color, depths) in KINDS {
            for &depth in depths {
                for interlaced in [false, true] {
                    for transparent in [false, true] {
                        for size in [(1, 1), (2, 3), (5, 9), (9, 5), (17, 13), (33, 2)] {
                            let png = encode(size, color, depth, interlaced, transparent, None);
                            let got = decode(&png, u64::MAX).unwrap();
                            let want = through_image_crate(&png);
                            let case = (color, depth, interlaced, transparent, size);
                            assert_eq!((got.width, got.height), (want.width, want.height));
                            assert!(got.pixels == want.pixels, "{case:?}");
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 15 * 2 * 2 * 6);
    }

    #[test]
    fn the_exif_orientation_is_applied_as_before() {
        for orientation in 1..=8 {
            let png = encode((7, 4), 2, 8, false, false, Some(orientation));
            let got = decode(&png, u64::MAX).unwrap();
            let want = through_image_crate(&png);
            let expected = if orientation >= 5 { (4, 7) } else { (7, 4) };
            assert_eq!((got.width, got.height), expected, "{orientation}");
            assert!(got.pixels == want.pixels, "{orientation}");
        }
    }

    #[test]
    fn sixteen_bit_samples_round_to_the_nearest_eight_bit_level() {
        assert_eq!(to_u8(0, 0), 0);
        assert_eq!(to_u8(0, 128), 0); // 128/257 = 0.498
        assert_eq!(to_u8(0, 129), 1); // 0.502
        assert_eq!(to_u8(0x80, 0x80), 128);
        assert_eq!(to_u8(0xff, 0x7f), 255); // 65407/257 = 254.5: rounds up
        assert_eq!(to_u8(0xff, 0xff), 255);
    }

    #[test]
    fn a_header_over_the_pixel_limit_is_refused_before_decoding_and_a_cut_stream_named() {
        let png = encode((40, 30), 6, 16, true, false, None);
        assert_eq!(
            decode(&png, 1199).unwrap_err(),
            ImageError::TooLarge {
                width: 40,
                height: 30,
                pixels: 1200,
                max: 1199
            }
        );
        let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
        let cut = &png[..idat + 20];
        assert!(
            matches!(
                decode(cut, u64::MAX),
                Err(ImageError::Decode { format: "PNG", .. })
            ),
            "{:?}",
            decode(cut, u64::MAX)
        );
    }
}
