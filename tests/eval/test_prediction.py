"""Predictions from Python: the inputs of PIL images and expressions, the checks of
load_predictor, a prediction's JSON record and drawing (an empty RES mask has no box)."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from oneref import OneRef
from oneref.eval.predict import Prediction, Predictor, draw_prediction, load_predictor


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


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A save_pretrained folder of an untrained tiny model (no tokenizer recorded)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_model")
    OneRef.from_config("tiny").save_pretrained(folder)
    return folder


def _scene(size=(50, 40)):
    image = Image.new("RGB", size, (210, 210, 210))
    ImageDraw.Draw(image).ellipse((5, 5, 25, 25), fill=(220, 30, 30))
    return image


def test_a_saved_refshapes_model_predicts_with_the_named_built_in_vocabulary(tiny_folder):
    with pytest.raises(ValueError, match="no tokenizer is recorded.*'refshapes'"):
        load_predictor(tiny_folder)
    predictor = load_predictor(tiny_folder, tokenizer="refshapes")
    images, text_ids, lengths = predictor.inputs([_scene(), _scene((30, 60))],
                                                 ["the red circle", "the circle"])
    size = predictor.model.config.img_size
    assert images.shape == (2, 3, size, size) and images.dtype == torch.float32
    assert text_ids.shape == (2, predictor.model.config.max_text_len)
    assert lengths.tolist() == [5, 4]  # <s> words </s>
    box = predictor.predict(_scene(), "the red circle").box_xyxy
    assert 0 <= box[0] <= box[2] <= 50 and 0 <= box[1] <= box[3] <= 40


def test_any_image_mode_is_read_as_rgb_and_other_objects_are_refused(tiny_folder):
    predictor = load_predictor(tiny_folder, tokenizer="refshapes")
    rgb = _scene()
    want = predictor.predict(rgb, "the red circle")
    assert predictor.predict(rgb.convert("RGBA"), "the red circle") == want
    assert predictor.predict(rgb.convert("L"), "the red circle").score != want.score
    for wrong, kind in ((np.asarray(rgb), "ndarray"), ("scene.png", "str")):
        with pytest.raises(TypeError, match=f"image 0 must be a PIL image, got {kind}"):
            predictor.predict(wrong, "the red circle")
    with pytest.raises(ValueError, match="text 1 must be a non-empty expression"):
        predictor.predict_batch([rgb, rgb], ["the circle", "  "])


def test_words_outside_the_vocabulary_are_named(tiny_folder, caplog):
    predictor = load_predictor(tiny_folder, tokenizer="refshapes")
    with caplog.at_level(logging.WARNING, logger="oneref.eval.predict"):
        predictor.predict(_scene(), "the red circle")
        assert not caplog.records
        predictor.predict(_scene(), "the red circle.")
    assert "'the red circle.': 'circle.' not in the tokenizer's vocabulary" in caplog.text


def test_an_expression_longer_than_the_model_reads_is_named(tiny_folder, caplog):
    predictor = load_predictor(tiny_folder, tokenizer="refshapes")
    limit = predictor.model.config.max_text_len  # <s> and </s> included
    fits = " ".join(["red"] * (limit - 2))
    with caplog.at_level(logging.WARNING, logger="oneref.eval.predict"):
        predictor.predict(_scene(), fits)
        assert not caplog.records
        predictor.predict(_scene(), fits + " circle")
    assert f"is longer than the model's {limit} tokens (max_text_len): it reads {fits!r}" \
        in caplog.text


@pytest.mark.parametrize("task", ["rec", "res"])
def test_amp_runs_the_forward_under_autocast_where_it_says_bf16(tiny_folder, task):
    """auto is fp32 on the CPU (the same prediction as fp32); bf16 runs the forward under
    CPU autocast, to bf16 rounding of the fp32 prediction."""
    predictors = {amp: load_predictor(tiny_folder, task=task, tokenizer="refshapes", amp=amp)
                  for amp in ("auto", "fp32", "bf16")}
    auto, fp32 = (predictors[amp].predict(_scene(), "the red circle") for amp in ("auto", "fp32"))
    assert (auto.box_xyxy, auto.score) == (fp32.box_xyxy, fp32.score)
    assert task == "rec" or np.array_equal(auto.mask, fp32.mask)
    model, seen = predictors["bf16"].model, []
    forward = getattr(model, f"forward_{task}")
    setattr(model, f"forward_{task}",
            lambda *args: seen.append(torch.is_autocast_enabled("cpu")) or forward(*args))
    bf16 = predictors["bf16"].predict(_scene(), "the red circle")
    assert seen == [True]
    assert bf16.score == pytest.approx(fp32.score, abs=0.02)
    if task == "rec":
        np.testing.assert_allclose(bf16.box_xyxy, fp32.box_xyxy, atol=1.5)


def test_load_predictor_checks_task_and_device_before_reading_the_model(tmp_path):
    missing = tmp_path / "no_model"  # read first, it would fail for another reason
    with pytest.raises(ValueError, match="task must be rec or res, got 'seg'"):
        load_predictor(missing, task="seg")
    with pytest.raises(ValueError, match="amp must be auto, bf16 or fp32, got 'fp16'"):
        load_predictor(missing, amp="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' was requested but CUDA is not"):
            load_predictor(missing, device="cuda")
        with pytest.raises(ValueError, match="device 'cuda:1' was requested"):
            Predictor(OneRef.from_config("tiny"), None, device="cuda:1")
    with pytest.raises(ValueError, match=r"device 'gpu' is not a device name \(auto, cpu"):
        load_predictor(missing, device="gpu")
    with pytest.raises(ValueError, match="no_model does not exist"):
        load_predictor(missing)
