"""xrayfeat.cams: Grad-CAM on models with a known answer, and on a real trained run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from figure_checks import assert_nonblank_png
from xrayfeat.cams import gradcam_maps, write_gradcam_overlays
from xrayfeat.errors import UsageError

# --------------------------------------------------------------------------- Grad-CAM

QUADRANTS = {  # name -> ((crop top, crop bottom), (crop left, crop right)) as fractions
    "top-left": ((0, 1), (0, 1)),
    "top-right": ((0, 1), (1, 0)),
    "bottom-left": ((1, 0), (0, 1)),
}


def region_model(size: int, quadrant: str | None):
    """A classifier that sees only one quadrant of its input (or, with None, all of it).

    The input is cut to the quadrant and zero-padded back (built-in layers, so tf-keras-vis
    can clone the model); a conv layer with a fixed positive kernel and a ReLU feed a dense
    layer whose class-1 weights are positive and class-0 weights zero.
    """
    import keras
    from keras import layers

    half = size // 2
    inputs = keras.Input((size, size, 1), name="image")
    x = layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    if quadrant is not None:
        (t, b), (l, r) = QUADRANTS[quadrant]
        crop = ((t * half, b * half), (l * half, r * half))
        x = layers.Cropping2D(crop, name="see_one_quadrant")(x)
        x = layers.ZeroPadding2D(crop, name="zero_elsewhere")(x)
    conv = layers.Conv2D(4, 3, padding="same", name="block2_conv2")
    x = conv(x)
    x = layers.Activation("relu", name="block2_relu2")(x)
    x = layers.Flatten(name="flatten")(x)
    dense = layers.Dense(2, activation="softmax", name="predictions")
    outputs = dense(x)
    model = keras.Model(inputs, outputs)
    conv.set_weights([np.full((3, 3, 1, 4), 0.1, np.float32), np.zeros(4, np.float32)])
    w = np.zeros((size * size * 4, 2), np.float32)
    w[:, 1] = 0.01
    dense.set_weights([w, np.zeros(2, np.float32)])
    return model


def quadrant_mass(cam: np.ndarray) -> dict[str, float]:
    h, w = cam.shape
    total = float(cam.sum()) or 1.0
    top, bottom = cam[: h // 2], cam[h // 2 :]
    return {"top-left": float(top[:, : w // 2].sum()) / total,
            "top-right": float(top[:, w // 2 :].sum()) / total,
            "bottom-left": float(bottom[:, : w // 2].sum()) / total,
            "bottom-right": float(bottom[:, w // 2 :].sum()) / total}


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
@pytest.mark.parametrize("quadrant", sorted(QUADRANTS))
def test_gradcam_finds_the_only_region_the_model_sees(quadrant, method):
    size = 32
    rng = np.random.default_rng(0)
    images = rng.uniform(60, 255, (3, size, size, 1)).astype(np.float32)  # content everywhere
    cams = gradcam_maps(region_model(size, quadrant), images, [1, 1, 1], method)
    assert cams.shape == (3, size, size) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1 and np.isclose(cams.max(), 1, atol=1e-3)
    for cam in cams:
        mass = quadrant_mass(cam)
        assert mass[quadrant] > 0.9, (quadrant, mass)  # nearly all the heat, in the right place


def test_gradcam_control_model_that_sees_everything_spreads_heat():
    size = 32
    images = np.random.default_rng(1).uniform(60, 255, (2, size, size, 1)).astype(np.float32)
    for cam in gradcam_maps(region_model(size, None), images, [1, 1]):
        mass = quadrant_mass(cam)
        assert max(mass.values()) < 0.5, mass  # the known-answer test is not trivially passed


def test_gradcam_maps_on_a_trained_run(trained_run, examples_h5):
    import h5py

    from xrayfeat.runs import load_run

    model = load_run(trained_run).load_model()
    with h5py.File(examples_h5, "r") as h5:
        x = h5["images"][:2][..., None].astype(np.float32)
    for method in ("gradcam", "gradcam++", "scorecam"):
        cams = gradcam_maps(model, x, [0, 1], method)
        assert cams.shape == (2, *x.shape[1:3])
        assert np.all((cams >= 0) & (cams <= 1)) and np.isfinite(cams).all()
    with pytest.raises(UsageError, match="unknown CAM method"):
        gradcam_maps(model, x, [0, 1], "lime")


def test_write_gradcam_overlays_api(trained_run, examples_h5, tmp_path):
    """The shared API ``predict --gradcam`` calls: predicted class, safe unique names."""
    import h5py

    from xrayfeat.runs import load_run

    model = load_run(trained_run).load_model()
    with h5py.File(examples_h5, "r") as h5:
        x = h5["images"][:3][..., None].astype(np.float32)
    paths = [Path("a/scan.jpeg"), Path("b/scan.jpeg"), Path("..\u2028evil.jpeg")]
    out = tmp_path / "cams"
    written = write_gradcam_overlays(model, paths, x, out)
    assert len(written) == 3 and len(set(written)) == 3
    for path in written:
        assert path.parent == out and path.name.endswith("_gradcam.png")
        assert_nonblank_png(path)
    assert written[2].name == "evil_gradcam.png"


