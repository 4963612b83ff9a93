"""Deterministic pseudo-random tensors, bit-identical to src/analysis/detector/detrand.rs.

Golden tests need the same randomly initialised weights on both sides without committing
megabytes of them: each tensor's values come from splitmix64 seeded by the FNV-1a hash of its
name, turned into f64 uniforms and scaled in f64, then rounded once to f32.
"""
import numpy as np

MASK = (1 << 64) - 1


def fnv1a64(text: str) -> int:
    h = 0xCBF29CE484222325
    for b in text.encode():
        h ^= b
        h = (h * 0x100000001B3) & MASK
    return h


def uniforms(seed: int, n: int) -> np.ndarray:
    """n uniforms in [0, 1) as f64: splitmix64 outputs' top 53 bits."""
    with np.errstate(over="ignore"):
        k = np.arange(1, n + 1, dtype=np.uint64)
        x = np.uint64(seed) + k * np.uint64(0x9E3779B97F4A7C15)
        z = x
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def tensor_for(name: str, shape) -> np.ndarray:
    """The value of a parameter or buffer, by the role its name gives it."""
    n = int(np.prod(shape)) if len(shape) else 1
    u = uniforms(fnv1a64(name), n)
    if name.endswith("running_var"):
        v = 0.5 + u
    elif name.endswith("bn.weight"):
        v = 0.5 + 0.5 * u
    elif name.endswith("running_mean") or name.endswith("bias"):
        v = 0.1 * (2.0 * u - 1.0)
    else:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        v = (2.0 * u - 1.0) * (1.0 / np.sqrt(fan_in))
    return v.astype(np.float32).reshape(shape)


def image(seed: int, shape) -> np.ndarray:
    return uniforms(seed, int(np.prod(shape))).astype(np.float32).reshape(shape)
