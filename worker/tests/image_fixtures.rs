//! The image pipeline against expected tensors made independently with
//! Pillow + NumPy by `tests/python/preprocess/gen_image_fixtures.py`.

use std::path::PathBuf;

use serde::Deserialize;
use tandem_worker::config::{
    ImageConfig, ImageDtype, Layout, Normalize, Resize, ResizeFilter, ResizeMode,
};
use tandem_worker::preprocess::image::ImagePipeline;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Case {
    input: String,
    width: u32,
    height: u32,
    mode: ResizeMode,
    filter: ResizeFilter,
    layout: Layout,
    dtype: ImageDtype,
    mean: [f32; 3],
    std: [f32; 3],
    expected: String,
    tolerance_pixels: f32,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    cases: Vec<Case>,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

/// Output values converted back to the 0..255 pixel scale, so one tolerance
/// in pixel levels applies to FP32 and UINT8 alike.
fn to_pixels(bytes: &[u8], case: &Case) -> Vec<f32> {
    let hw = (case.width * case.height) as usize;
    match case.dtype {
        ImageDtype::Uint8 => bytes.iter().map(|&b| f32::from(b)).collect(),
        ImageDtype::Fp32 => bytes
            .chunks_exact(4)
            .enumerate()
            .map(|(i, c)| {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                let ch = match case.layout {
                    Layout::Nchw => i / hw,
                    Layout::Nhwc => i % 3,
                };
                (v * case.std[ch] + case.mean[ch]) * 255.0
            })
            .collect(),
    }
}

#[test]
fn every_fixture_case_matches_pillow_and_numpy_within_its_tolerance() {
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(dir().join("manifest.json")).unwrap()).unwrap();
    assert!(manifest.cases.len() >= 10);
    let mut failures = Vec::new();
    for case in &manifest.cases {
        let pipeline = ImagePipeline::new(
            ImageConfig {
                resize: Resize {
                    width: case.width,
                    height: case.height,
                    mode: case.mode,
                    filter: case.filter,
                },
                normalize: Normalize {
                    mean: case.mean,
                    std: case.std,
                },
                layout: case.layout,
                dtype: case.dtype,
                jpeg_draft: Default::default(),
            },
            10_000_000,
        );
        let input = std::fs::read(dir().join(&case.input)).unwrap();
        let expected = std::fs::read(dir().join(&case.expected)).unwrap();
        let got = match pipeline.process_batch(&[input]) {
            Ok(b) => b,
            Err(e) => {
                failures.push(format!("{} {:?}: {e:?}", case.input, case.mode));
                continue;
            }
        };
        assert_eq!(got.len(), expected.len(), "{}: tensor size", case.expected);
        let (g, e) = (to_pixels(&got, case), to_pixels(&expected, case));
        let max = g
            .iter()
            .zip(&e)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let mean = g.iter().zip(&e).map(|(a, b)| (a - b).abs()).sum::<f32>() / g.len() as f32;
        let within_one = g
            .iter()
            .zip(&e)
            .filter(|(a, b)| (*a - *b).abs() <= 1.01)
            .count() as f32
            / g.len() as f32;
        println!(
            "{} {:?} {:?} {:?} {:?} {}x{}: max |diff| {max:.3} levels, mean {mean:.4}, within one level {:.2}%",
            case.input,
            case.mode,
            case.filter,
            case.layout,
            case.dtype,
            case.width,
            case.height,
            within_one * 100.0
        );
        if max > case.tolerance_pixels + 0.01 || mean > 1.0 || within_one < 0.98 {
            failures.push(format!(
                "{} ({}): max diff {max}, mean {mean}, tolerance {}",
                case.input, case.expected, case.tolerance_pixels
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
