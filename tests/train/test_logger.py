"""The training-curve PNG: the loss and the validation metric, and no empty legend."""

import warnings

from PIL import Image

from oneref.train.logger import plot_curve


def test_the_curve_is_drawn_with_and_without_rows(tmp_path):
    rows = [{"step": s, "split": "train", "loss": 2.0 / s} for s in range(1, 6)]
    rows += [{"step": 5, "split": "val", "acc@0.5": 0.4, "miou_box": 0.3}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns about a legend with no entries
        for name, logged in (("full.png", rows), ("empty.png", [])):
            with Image.open(plot_curve(logged, tmp_path / name, title="t")) as image:
                assert image.size == (770, 440)  # 7 x 4 inches at 110 dpi
