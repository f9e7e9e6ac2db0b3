"""A prediction's JSON record and drawing; an empty RES mask has no box."""

import numpy as np
from PIL import Image

from oneref.eval.predict import Prediction, draw_prediction


def _prediction(mask):
    return Prediction((10.0, 5.0, 30.0, 25.0), (0.5, 0.5, 0.2, 0.2), 0.8765432, mask)


def test_a_box_prediction_is_recorded_and_drawn():
    image = Image.new("RGB", (40, 32), (200, 200, 200))
    record = _prediction(None).to_json()
    assert record == {"box_xyxy": [10.0, 5.0, 30.0, 25.0], "score": 0.8765}
    drawn = np.asarray(draw_prediction(image, _prediction(None)))
    assert tuple(drawn[5, 20]) == (255, 0, 0) and tuple(drawn[15, 20]) == (200, 200, 200)


def test_an_empty_mask_has_no_box_and_draws_nothing():
    image = Image.new("RGB", (40, 32), (200, 200, 200))
    empty = _prediction(np.zeros((32, 40), bool))
    assert empty.empty and empty.to_json() == {"box_xyxy": None, "score": 0.8765,
                                               "mask_area": 0}
    assert np.array_equal(np.asarray(draw_prediction(image, empty)), np.asarray(image))
    mask = np.zeros((32, 40), bool)
    mask[10:20, 12:28] = True
    shown = _prediction(mask)
    assert not shown.empty and shown.to_json()["mask_area"] == 160
    drawn = np.asarray(draw_prediction(image, shown)).astype(int)
    assert drawn[15, 20, 0] > drawn[15, 20, 1]  # the translucent red mask
