//! Deterministic pseudo-random tensors, bit-identical to `model/tools/detrand.py`.
//!
//! Golden tests compare candle against ultralytics on randomly initialised networks without
//! committing their weights: both sides derive each tensor from splitmix64 seeded by the FNV-1a
//! hash of its name, compute in f64 and round once to f32.

fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3))
}

/// `n` uniforms in [0, 1): the top 53 bits of splitmix64 outputs.
pub fn uniforms(seed: u64, n: usize) -> Vec<f64> {
    (1..=n as u64)
        .map(|k| {
            let mut z = seed.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

/// The value of a parameter or buffer, by the role its name gives it.
pub fn tensor_values(name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let u = uniforms(fnv1a64(name), n);
    let fan_in: usize = if shape.len() > 1 { shape[1..].iter().product() } else { 1 };
    let bound = 1.0 / (fan_in as f64).sqrt();
    u.into_iter()
        .map(|u| {
            let v = if name.ends_with("running_var") {
                0.5 + u
            } else if name.ends_with("bn.weight") {
                0.5 + 0.5 * u
            } else if name.ends_with("running_mean") || name.ends_with("bias") {
                0.1 * (2.0 * u - 1.0)
            } else {
                (2.0 * u - 1.0) * bound
            };
            v as f32
        })
        .collect()
}

/// A deterministic image in [0, 1).
pub fn image(seed: u64, n: usize) -> Vec<f32> {
    uniforms(seed, n).into_iter().map(|u| u as f32).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_values() {
        // Pinned so a change on either side is caught without running Python.
        assert_eq!(super::uniforms(0, 2), vec![0.8833108082136426, 0.43152799704850997]);
        assert_eq!(super::fnv1a64("model.0.conv.weight"), 17120615480838471646);
        let w = super::tensor_values("model.0.conv.weight", &[2, 3]);
        assert_eq!(w[0], -0.4085107147693634_f64 as f32);
        assert_eq!(w[5], 0.20802366733551025_f64 as f32);
    }
}
