"""screening: the out-of-distribution distance is the textbook Mahalanobis distance, over the
image statistics their definition gives."""

from __future__ import annotations

import numpy as np

from pipeline.serving.screening import (
    THRESHOLD_MARGIN,
    VAL_ACCEPT,
    Mahalanobis,
    appearance,
    content_reason,
)


def _two_classes(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat([0, 1], n // 2)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features, as a network's are
    return rng.normal(size=(n, d)) @ mix + 3.0 * labels[:, None] * rng.normal(size=d), labels


def test_the_score_is_the_squared_distance_to_the_nearest_class_mean_over_the_threshold():
    rng = np.random.default_rng(0)
    feats, labels = _two_classes(rng, 600, 24)
    val, _ = _two_classes(rng, 200, 24)
    m = Mahalanobis.fit(feats, labels, val)
    probe = np.concatenate([val[:20], 4.0 * rng.normal(size=(20, 24))])
    precision = m.precision.astype(np.float64)
    want = np.min([np.einsum("nd,de,ne->n", probe - mu, precision, probe - mu)
                   for mu in m.means.astype(np.float64)], axis=0) / m.threshold
    np.testing.assert_allclose(m.score(probe), want, rtol=1e-4)
    # the threshold: the validation quantile times the margin, so that share scores 1/margin or less
    assert np.mean(m.score(val) <= 1 / THRESHOLD_MARGIN + 1e-6) >= VAL_ACCEPT
    again = Mahalanobis.from_state(m.state())
    np.testing.assert_array_equal(again.score(probe), m.score(probe))


def test_a_precision_cholesky_cannot_factor_still_gives_the_quadratic_form():
    rng = np.random.default_rng(2)
    basis = rng.normal(size=(6, 3))
    precision = (basis @ basis.T).astype(np.float32)  # rank 3 of 6: no Cholesky factor
    means = rng.normal(size=(2, 6)).astype(np.float32)
    m = Mahalanobis(means, precision, 2.0)
    probe = rng.normal(size=(10, 6))
    want = np.min([np.einsum("nd,de,ne->n", probe - mu, precision.astype(np.float64), probe - mu)
                   for mu in means.astype(np.float64)], axis=0) / 2.0
    np.testing.assert_allclose(m.score(probe), want, rtol=1e-4, atol=1e-5)


def test_appearance_is_colour_mean_and_spread_then_border_centre_and_detail():
    rng = np.random.default_rng(1)
    px = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    px[1] = 120 + rng.integers(0, 3, (16, 16, 3))  # low contrast: spread near zero
    x = px / 255.0  # float64, the definition
    strips = [x[:, :2], x[:, -2:], x[:, :, :2], x[:, :, -2:]]  # a ring of 16 // 8 pixels
    want = np.column_stack([
        x.mean((1, 2)), x.std((1, 2)),
        np.concatenate([s.reshape(5, -1, 3) for s in strips], 1).mean((1, 2)),
        x[:, 4:12, 4:12].mean((1, 2, 3)),
        np.abs(np.diff(x, axis=1)).mean((1, 2, 3)) + np.abs(np.diff(x, axis=2)).mean((1, 2, 3)),
    ])
    got = appearance(px)
    assert got.shape == (5, 9) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_content_is_near_uniform_below_two_levels_of_deviation_in_every_colour():
    flat = np.full((30, 20, 3), 200, np.uint8)
    flat[0, 0] = 190  # one odd pixel: deviation 0.4 of 255
    assert "near-uniform" in content_reason(flat)
    striped = flat.copy()
    striped[::2, :, 2] = 205  # blue alone deviates by 2.5
    assert content_reason(striped) is None
