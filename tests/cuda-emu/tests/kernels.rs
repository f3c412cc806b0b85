//! Each CUDA kernel, run on the CPU stand-in with the engine's launch configuration, against
//! the CPU engine's op (or, where that op is private, a direct reference written here).
//! Sizes are MiniLM's and EfficientNet-Lite0's where the launch depends on them (a 384-wide
//! row takes a 512-thread block; a 7×7 plane a 64-thread one), plus odd ones.

use tandem_cuda_emu as emu;
use tandem_engine::cpu::ops;

/// Deterministic values in [-2, 2).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (i, diff) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .fold((0, 0.0f32), |m, (i, d)| if d > m.1 { (i, d) } else { m });
    assert!(
        diff <= tol,
        "{what}: |diff| {diff} at {i} (got {}, want {})",
        got[i],
        want[i]
    );
}

#[test]
fn embedding_gather_sums_word_position_and_type_rows() {
    let (vocab, max_pos, hidden, seq_len) = (50, 16, 384, 7);
    let word = values(vocab * hidden, 1);
    let pos = values(max_pos * hidden, 2);
    let type_emb = values(2 * hidden, 3);
    let ids: Vec<i64> = (0..2 * seq_len as i64).map(|i| (i * 7 + 3) % 50).collect();
    let types: Vec<i64> = (0..2 * seq_len as i64).map(|i| i % 2).collect();
    let got = emu::embedding_gather(&ids, &types, &word, &pos, &type_emb, seq_len, hidden);
    let mut want = Vec::new();
    for (row, (&id, &ty)) in ids.iter().zip(&types).enumerate() {
        let p = row % seq_len;
        for j in 0..hidden {
            want.push(
                word[id as usize * hidden + j]
                    + pos[p * hidden + j]
                    + type_emb[ty as usize * hidden + j],
            );
        }
    }
    assert_close(&got, &want, 0.0, "embedding_gather");
}

#[test]
fn layer_norm_matches_the_cpu_engine_for_minilm_and_odd_widths() {
    for (dim, rows) in [(384, 5), (1280, 2), (7, 3), (33, 2)] {
        let x = values(dim * rows, dim as u64);
        let gamma = values(dim, 10);
        let beta = values(dim, 11);
        let mut got = x.clone();
        emu::layer_norm(&mut got, dim, &gamma, &beta, 1e-12);
        let mut want = x;
        ops::layer_norm(&mut want, dim, &gamma, &beta, 1e-12);
        assert_close(&got, &want, 2e-5, &format!("layer_norm dim {dim}"));
    }
}

#[test]
fn bias_gelu_matches_the_cpu_engines_bias_then_exact_gelu() {
    let width = 1536;
    let x = values(width * 3, 4);
    let bias = values(width, 5);
    let mut got = x.clone();
    emu::bias_gelu(&mut got, &bias);
    let mut want = x;
    ops::add_bias(&mut want, &bias);
    ops::gelu(&mut want);
    assert_close(&got, &want, 2e-6, "bias_gelu");
}

#[test]
fn masked_softmax_gives_masked_keys_no_weight_and_matches_softmax_over_the_rest() {
    let (batch, heads, len, scale) = (2, 3, 6, 0.125);
    let scores = values(batch * heads * len * len, 6);
    // The second sequence has two padding tokens.
    let mask: Vec<i64> = (0..batch * len)
        .map(|i| i64::from(!(i / len == 1 && i % len >= 4)))
        .collect();
    let mut got = scores.clone();
    emu::masked_softmax(&mut got, &mask, heads, len, scale);
    let mut want = Vec::new();
    for (r, row) in scores.chunks(len).enumerate() {
        let b = r / (heads * len);
        let keep: Vec<usize> = (0..len).filter(|&k| mask[b * len + k] != 0).collect();
        let mut kept: Vec<f32> = keep.iter().map(|&k| row[k] * scale).collect();
        ops::softmax(&mut kept);
        let mut full = vec![0.0f32; len];
        for (&k, v) in keep.iter().zip(kept) {
            full[k] = v;
        }
        want.extend(full);
    }
    assert_close(&got, &want, 1e-6, "masked_softmax");
}

#[test]
fn mean_pool_normalize_averages_unmasked_tokens_and_normalizes_to_unit_length() {
    let (batch, len, hidden) = (3, 5, 384);
    let x = values(batch * len * hidden, 7);
    let mask: Vec<i64> = (0..batch * len)
        .map(|i| i64::from(i % len < 5 - i / len))
        .collect();
    let got = emu::mean_pool_normalize(&x, &mask, len, hidden);
    let mut want = Vec::new();
    for b in 0..batch {
        let tokens: Vec<usize> = (0..len).filter(|&t| mask[b * len + t] != 0).collect();
        let mean: Vec<f32> = (0..hidden)
            .map(|j| {
                tokens
                    .iter()
                    .map(|&t| x[(b * len + t) * hidden + j])
                    .sum::<f32>()
                    / tokens.len() as f32
            })
            .collect();
        let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt();
        want.extend(mean.iter().map(|v| v / norm));
    }
    assert_close(&got, &want, 1e-6, "mean_pool_normalize");
}

#[test]
fn bias_act_adds_the_channels_bias_and_clamps_as_asked() {
    let (n, c, hw) = (2, 5, 9);
    let x: Vec<f32> = values(n * c * hw, 8).iter().map(|v| v * 4.0).collect();
    let bias = values(c, 9);
    for act in [emu::Act::None, emu::Act::Relu, emu::Act::Relu6] {
        let mut got = x.clone();
        emu::bias_act_nchw(&mut got, &bias, hw, act);
        let want: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let v = v + bias[(i / hw) % c];
                match act {
                    emu::Act::None => v,
                    emu::Act::Relu => v.max(0.0),
                    emu::Act::Relu6 => v.clamp(0.0, 6.0),
                }
            })
            .collect();
        assert_close(&got, &want, 0.0, &format!("bias_act {act:?}"));
    }
}

#[test]
fn depthwise_conv_matches_the_cpu_engine_for_efficientnets_kernel_sizes_and_strides() {
    let (n_img, c) = (2, 4);
    for (h, w, k, stride) in [(14, 14, 3, 1), (14, 13, 5, 2), (7, 7, 5, 1), (9, 8, 3, 2)] {
        let pad = k / 2;
        let x = values(n_img * c * h * w, (h * k) as u64);
        let weight = values(c * k * k, 12);
        let bias = values(c, 13);
        let (got, ho, wo) =
            emu::depthwise_conv(&x, &weight, &bias, h, w, k, stride, pad, emu::Act::Relu6);
        let conv = ops::Conv {
            cout: c,
            cin: c,
            k,
            stride,
            pad,
            depthwise: true,
            weight: weight.clone(),
            bias: bias.clone(),
            act: ops::Act::Relu6,
        };
        let mut want = Vec::new();
        for img in x.chunks(c * h * w) {
            let (y, cho, cwo) = conv.forward(img, h, w, 1);
            assert_eq!((cho, cwo), (ho, wo));
            want.extend(y);
        }
        assert_close(
            &got,
            &want,
            1e-5,
            &format!("depthwise {h}x{w} k{k} s{stride}"),
        );
    }
}

#[test]
fn im2col_matches_the_cpu_engine_for_the_efficientnet_stem() {
    let (c, h, w, k, stride, pad) = (3, 17, 16, 3, 2, 1);
    let (ho, wo) = (
        (h + 2 * pad - k) / stride + 1,
        (w + 2 * pad - k) / stride + 1,
    );
    let x = values(c * h * w, 14);
    let got = emu::im2col(&x, c, h, w, k, stride, pad, ho, wo);
    let want = ops::im2col(&x, c, h, w, k, stride, pad, ho, wo);
    assert_close(&got, &want, 0.0, "im2col");
}

#[test]
fn u8_normalize_applies_each_channels_mean_and_std() {
    let (n, hw) = (2, 11);
    let x: Vec<u8> = (0..n * 3 * hw).map(|i| (i * 37 % 256) as u8).collect();
    let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
    let got = emu::u8_normalize(&x, mean, std, hw);
    let want: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = (i / hw) % 3;
            (f32::from(v) / 255.0 - mean[c]) / std[c]
        })
        .collect();
    assert_close(&got, &want, 1e-6, "u8_normalize");
}

#[test]
fn global_avg_pool_matches_the_cpu_engine_for_a_7x7_head_and_odd_planes() {
    for (planes, hw) in [(320, 49), (3, 1), (5, 1500)] {
        let x = values(planes * hw, hw as u64);
        let got = emu::global_avg_pool(&x, hw);
        let want = ops::global_avg_pool(&x, planes, hw);
        assert_close(&got, &want, 1e-6, &format!("global_avg_pool hw {hw}"));
    }
}

#[test]
fn add_inplace_adds_the_residual_and_applies_relu_only_when_asked() {
    let x = values(1000, 15);
    let r = values(1000, 16);
    for relu in [false, true] {
        let mut got = x.clone();
        emu::add_inplace(&mut got, &r, relu);
        let want: Vec<f32> = x
            .iter()
            .zip(&r)
            .map(|(a, b)| if relu { (a + b).max(0.0) } else { a + b })
            .collect();
        assert_close(&got, &want, 0.0, &format!("add_inplace relu {relu}"));
    }
}
