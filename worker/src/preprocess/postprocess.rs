//! Post-processing of inference outputs (pure): classification softmax +
//! top-k with labels, and the output comparisons used for shadow parity.

/// Per-row classification result for a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    /// `[N, K]` probabilities, best first.
    pub probabilities: Vec<f32>,
    /// `[N, K]` labels matching `probabilities`.
    pub labels: Vec<String>,
    /// K actually used (≤ number of classes).
    pub k: usize,
}

/// Numerically stable softmax of one row.
pub fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Softmax + top-k over `logits` `[n, classes]`. Labels come from `labels`
/// when it has an entry for the class index, else the index as text.
pub fn classify(logits: &[f32], n: usize, classes: usize, k: usize, labels: &[String]) -> TopK {
    let k = k.min(classes);
    let mut probabilities = Vec::with_capacity(n * k);
    let mut out_labels = Vec::with_capacity(n * k);
    for row in logits.chunks_exact(classes.max(1)).take(n) {
        let p = softmax(row);
        let mut idx: Vec<usize> = (0..p.len()).collect();
        // Ties broken by class index so results are deterministic.
        idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        for &i in idx.iter().take(k) {
            probabilities.push(p[i]);
            out_labels.push(labels.get(i).cloned().unwrap_or_else(|| i.to_string()));
        }
    }
    TopK {
        probabilities,
        labels: out_labels,
        k,
    }
}

/// Parses a labels file: one label per line, blank trailing lines ignored.
pub fn parse_labels(text: &str) -> Vec<String> {
    let mut labels: Vec<String> = text.lines().map(|l| l.trim().to_owned()).collect();
    while labels.last().is_some_and(String::is_empty) {
        labels.pop();
    }
    labels
}

/// The 1000 ImageNet-1k class names, index order.
pub fn imagenet_labels() -> Vec<String> {
    parse_labels(include_str!("../../data/imagenet_labels.txt"))
}

/// Result of comparing a shadow output with the live one, row by row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// Smallest per-row cosine similarity.
    pub min_cosine: f64,
    /// Largest absolute element difference.
    pub max_abs_diff: f64,
    /// Rows whose argmax differs.
    pub top1_disagreements: u64,
    /// Rows compared.
    pub rows: u64,
}

/// Compares two `[rows, width]` outputs; `None` when their sizes differ.
pub fn compare(live: &[f32], shadow: &[f32], width: usize) -> Option<Comparison> {
    if live.len() != shadow.len() || width == 0 || !live.len().is_multiple_of(width) {
        return None;
    }
    let mut c = Comparison {
        min_cosine: 1.0,
        max_abs_diff: 0.0,
        top1_disagreements: 0,
        rows: 0,
    };
    for (a, b) in live.chunks_exact(width).zip(shadow.chunks_exact(width)) {
        let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
        for (&x, &y) in a.iter().zip(b) {
            let (x, y) = (f64::from(x), f64::from(y));
            dot += x * y;
            na += x * x;
            nb += y * y;
            c.max_abs_diff = c.max_abs_diff.max((x - y).abs());
        }
        let cos = if na == 0.0 && nb == 0.0 {
            1.0
        } else if na == 0.0 || nb == 0.0 {
            0.0
        } else {
            dot / (na.sqrt() * nb.sqrt())
        };
        c.min_cosine = c.min_cosine.min(cos);
        if argmax(a) != argmax(b) {
            c.top1_disagreements += 1;
        }
        c.rows += 1;
    }
    Some(c)
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv { (i, v) } else { (bi, bv) }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_survives_large_logits() {
        let p = softmax(&[1000.0, 1000.0, -1000.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((p[0] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn classify_returns_best_k_with_labels_per_row() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let r = classify(&[0.0, 2.0, 1.0, 5.0, 0.0, 0.0], 2, 3, 2, &labels);
        assert_eq!(r.labels, vec!["b", "c", "a", "b"]);
        assert_eq!(r.k, 2);
        assert!(r.probabilities[0] > r.probabilities[1]);
    }

    #[test]
    fn classify_clamps_k_and_falls_back_to_indices_without_labels() {
        let r = classify(&[0.0, 1.0], 1, 2, 10, &[]);
        assert_eq!(r.k, 2);
        assert_eq!(r.labels, vec!["1", "0"]);
    }

    #[test]
    fn comparison_reports_worst_cosine_max_diff_and_top1_flips() {
        let c = compare(&[1.0, 0.0, 0.0, 1.0], &[1.0, 0.0, 1.0, 0.0], 2).unwrap();
        assert_eq!(c.rows, 2);
        assert!((c.min_cosine - 0.0).abs() < 1e-9);
        assert!((c.max_abs_diff - 1.0).abs() < 1e-9);
        assert_eq!(c.top1_disagreements, 1);
        assert!(compare(&[1.0], &[1.0, 2.0], 1).is_none());
    }

    #[test]
    fn the_builtin_imagenet_labels_have_1000_entries() {
        let l = imagenet_labels();
        assert_eq!(l.len(), 1000);
        assert!(l.iter().all(|s| !s.is_empty()));
    }
}
