"""Test-time adaptation on phantoms with a synthetic scanner shift, the guard, and label-free signals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from models.adaptation import AdaptConfig, adapt, scan_foreground_entropies
from models.guard import dice_per_class, implausible_change
from models.inference import onnx_predictor, onnx_session, torch_predictor
from models.phantom import PHANTOM_NETWORK, PHANTOM_PATCH, write_phantoms
from models.pipeline import load_scans, segment_batch
from models.terms import Method

FAST = AdaptConfig(steps=30, batch_size=2, lr=1e-3, ema=0.9, mask_block=(2, 8, 8), min_steps=100)


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """Target-domain phantoms from a noisier scanner."""
    return write_phantoms(tmp_path_factory.mktemp("target"), 4, seed=100, shift="noise")


def _dice(pred_dir, pairs):
    scores = []
    for img, lab in pairs:
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))
        out = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / img.name)))
        scores += dice_per_class(out, ref, 3)
    return float(np.mean(scores))


def test_mpl_improves_over_source_on_shifted_domain(tiny_bundle, shifted, tmp_path):
    inputs = [img for img, _ in shifted]
    none = segment_batch(inputs, tiny_bundle, tmp_path / "none", method="none")
    segment_batch(inputs, tiny_bundle, tmp_path / "mpl", method="mpl", adapt_config=FAST)
    d_none, d_mpl = _dice(tmp_path / "none", shifted), _dice(tmp_path / "mpl", shifted)
    assert d_mpl > d_none + 0.03, (d_none, d_mpl)
    assert none[0].quality["agreement_with_source"] == 1.0
    record = json.loads((tmp_path / "mpl" / "case00.json").read_text())
    assert record["method"] == "mpl" and record["steps_run"] == FAST.steps
    assert {"loss", "agreement", "teacher_entropy"} <= set(record["adaptation_signals"])
    # the noisier scanner leaves the source network less sure than on its held-out cases: the gate adapts
    assert not record["adaptation_skipped"] and record["adaptation_shift"]["ratio"] > FAST.shift_ratio


def test_mpl_leaves_a_batch_as_familiar_as_the_source_domain_to_the_source_network(
    tiny_bundle, phantom_dir, tmp_path
):
    reference = tiny_bundle.card.validation["foreground_entropy"]
    assert 0.0 < reference < 1.0  # training recorded it on the held-out source cases
    inputs = sorted((phantom_dir / "images").iterdir())[6:]  # the held-out source phantoms themselves
    none = segment_batch(inputs, tiny_bundle, tmp_path / "none", method="none")
    mpl = segment_batch(
        inputs,
        tiny_bundle,
        tmp_path / "mpl",
        method="mpl",
        adapt_config=FAST,
        save_adapted=tmp_path / "adapted",
    )
    record = json.loads(mpl[0].json_path.read_text())
    assert record["adaptation_skipped"] and record["steps_run"] == 0
    assert record["adaptation_shift"]["reference_entropy"] == round(reference, 4)
    assert record["adaptation_shift"]["ratio"] == pytest.approx(1.0, abs=0.02)
    for a, b in zip(none, mpl, strict=True):
        assert np.array_equal(_labels(a.label_path), _labels(b.label_path))
        assert b.source_label_file is None and b.fallback and b.fallback_reason.startswith("not adapted")
    assert not (tmp_path / "adapted").exists()  # nothing adapted, nothing to keep
    # without the gate the same batch adapts
    ungated = segment_batch(
        inputs,
        tiny_bundle,
        tmp_path / "ungated",
        method="mpl",
        adapt_config=FAST.model_copy(update={"shift_ratio": None}),
    )
    record = json.loads(ungated[0].json_path.read_text())
    assert (
        record["steps_run"] == FAST.steps
        and not record["adaptation_skipped"]
        and record["adaptation_shift"] == {}
    )


def test_the_gate_measures_the_served_source_model_as_training_measured_its_reference(
    tiny_bundle, phantom_dir, tmp_path
):
    inputs = sorted((phantom_dir / "images").iterdir())[6:]
    volumes = [s.array for s in load_scans(inputs, tiny_bundle, None)]
    patch = tiny_bundle.card.patch_size
    eager = scan_foreground_entropies(torch_predictor(tiny_bundle.load_network().eval()), volumes, patch)
    served = scan_foreground_entropies(onnx_predictor(onnx_session(tiny_bundle.onnx_path)), volumes, patch)
    assert min(eager) > 0.0 and np.allclose(served, eager, atol=1e-4)
    # the gate reads one prediction per window, as the reference was measured, whatever ensemble segments
    shifts = [
        json.loads(
            segment_batch(inputs, tiny_bundle, tmp_path / str(f), method="mpl", adapt_config=FAST, flips=f)[
                0
            ].json_path.read_text()
        )["adaptation_shift"]
        for f in ([], [1, 2])
    ]
    assert shifts[0] and shifts[0] == shifts[1]


def _labels(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_flip_ensemble_segments_every_scan_and_is_recorded(tiny_bundle, shifted, tmp_path):
    inputs = [img for img, _ in shifted[:2]]
    plain = segment_batch(inputs, tiny_bundle, tmp_path / "plain", method="none")
    flipped = segment_batch(inputs, tiny_bundle, tmp_path / "flips", method="none", flips=[1, 2])
    assert json.loads(plain[0].json_path.read_text())["test_time_flips"] == []  # the card's default
    assert json.loads(flipped[0].json_path.read_text())["test_time_flips"] == [1, 2]
    confidence = "mean_confidence_foreground"  # three predictions averaged: not the plain one's probabilities
    assert flipped[0].quality[confidence] != plain[0].quality[confidence]
    assert _dice(tmp_path / "flips", shifted[:2]) > 0.5


def test_every_method_runs_and_never_reads_labels(tiny_bundle, shifted, tmp_path, monkeypatch):
    from models.pipeline import load_scans

    scans = load_scans([img for img, _ in shifted], tiny_bundle, None)
    volumes = [s.array for s in scans]
    opened = []
    real_read = sitk.ReadImage
    monkeypatch.setattr(sitk, "ReadImage", lambda p, *a: opened.append(str(p)) or real_read(p, *a))
    net = tiny_bundle.load_network()
    for method in Method:
        result = adapt(net, volumes, tiny_bundle.card.patch_size, method=method, steps=3, cfg=FAST)
        assert result.method == method
        assert result.steps_run == (3 if method.takes_steps else 0)
    assert not any("labels" in p for p in opened)
    with pytest.raises(ValueError, match="unknown adaptation method"):
        adapt(net, volumes, tiny_bundle.card.patch_size, method="magic")


def test_guard_falls_back_when_adaptation_collapses(tiny_bundle, shifted, tmp_path, monkeypatch):
    import models.pipeline as pipeline

    real_adapt = pipeline.adapt

    def collapsing_adapt(*args, **kwargs):
        result = real_adapt(*args, **kwargs)
        head = result.net.head.conv.conv
        head.weight.data.zero_()
        head.bias.data[:] = -10.0
        head.bias.data[0] = 10.0  # everything becomes background
        return result

    monkeypatch.setattr(pipeline, "adapt", collapsing_adapt)
    results = segment_batch([shifted[0][0]], tiny_bundle, tmp_path, method="mpl", steps=1, adapt_config=FAST)
    source = segment_batch([shifted[0][0]], tiny_bundle, tmp_path / "src", method="none")
    assert results[0].fallback and "vanished" in results[0].fallback_reason
    assert results[0].volumes_ml == source[0].volumes_ml
    assert json.loads(results[0].json_path.read_text())["fallback"] is True


def test_guard_rules():
    assert implausible_change({"a": 10.0}, {"a": 12.0}) is None
    assert "vanished" in implausible_change({"a": 10.0}, {"a": 0.0})
    assert "beyond" in implausible_change({"a": 10.0}, {"a": 45.0})
    assert implausible_change({"a": 0.2}, {"a": 30.0}) is None  # absent in the source: nothing to compare
    # a large change that gathers scattered blobs into one organ is what a failing source model needs
    assert implausible_change({"a": 90.0}, {"a": 20.0}, connectedness=(0.4, 0.95)) is None
    assert "beyond" in implausible_change({"a": 90.0}, {"a": 20.0}, connectedness=(0.9, 0.95))
    assert "vanished" in implausible_change({"a": 90.0}, {"a": 0.0}, connectedness=(0.4, 0.0))
    # the card's source volume range: a structure the source model mis-sized may be resized into it ...
    anatomy = {"a": (15.0, 355.0)}
    assert implausible_change({"a": 6.6}, {"a": 32.0}, source_ranges=anatomy) is None
    assert implausible_change({"a": 400.0}, {"a": 120.0}, source_ranges=anatomy) is None
    # ... but a plausibly sized structure may not shrink or swell beyond x3, nor a mis-sized one move further off
    assert "beyond" in implausible_change({"a": 149.0}, {"a": 41.0}, source_ranges=anatomy)
    assert "beyond" in implausible_change({"a": 6.6}, {"a": 2.0}, source_ranges=anatomy)
    assert "beyond" in implausible_change({"a": 6.6}, {"a": 400.0}, source_ranges=anatomy)


def test_adapted_bundle_names_its_parent(tiny_bundle, shifted, tmp_path):
    from models.bundle import load_bundle

    segment_batch(
        [p for p, _ in shifted[:2]],
        tiny_bundle,
        tmp_path / "o",
        method="tent",
        steps=2,
        save_adapted=tmp_path / "adapted",
        adapt_config=FAST,
    )
    adapted = load_bundle(tmp_path / "adapted")
    assert adapted.card.parent["name"] == "phantom"
    assert adapted.card.parent["batch"] == ["case00", "case01"]
    assert adapted.card.version != tiny_bundle.card.version


def test_largest_component_keeps_one_heart_or_one_blob_per_structure():
    from models.postprocessing import LargestComponent, keep_largest_component

    labels = np.zeros((4, 24, 24), np.uint8)
    labels[:, 2:5, 2:5] = 1  # stray blob of structure 1, away from the heart
    labels[:, 10:18, 10:18] = 1  # structure 1 ...
    labels[:, 10:18, 18:21] = 2  # ... touching structure 2: one heart
    labels[:, 20:22, 2:4] = 2  # stray blob of structure 2
    heart = keep_largest_component(labels, 3, LargestComponent.foreground)
    assert (heart == 1).sum() == 4 * 64 and (heart == 2).sum() == 4 * 24
    each = keep_largest_component(labels, 3, LargestComponent.structures)
    assert (each == 1).sum() == 4 * 64 and (each == 2).sum() == 4 * 24
    assert (labels[:, 2:5, 2:5] == 1).all()  # the input is left as it was
    labels[:, 0:3, 10:22] = 2  # now the largest blob of structure 2 lies away from the heart
    assert (keep_largest_component(labels, 3, LargestComponent.foreground)[:, 0:3] == 0).all()
    assert (keep_largest_component(labels, 3, LargestComponent.structures)[:, 10:18, 18:21] == 0).all()
    assert keep_largest_component(labels, 3, LargestComponent.off) is labels


def test_snapshots_follow_the_adapted_weights(tiny_bundle, shifted):
    import torch

    from models.pipeline import load_scans

    volumes = [s.array for s in load_scans([img for img, _ in shifted], tiny_bundle, None)]
    net = tiny_bundle.load_network()
    result = adapt(
        net, volumes, tiny_bundle.card.patch_size, method="mpl", steps=4, cfg=FAST, snapshot_steps=(0, 2, 4)
    )
    assert sorted(result.snapshots) == [0, 2, 4]
    head = "head.conv.conv.weight"
    assert torch.equal(result.snapshots[0][head], net.state_dict()[head])
    assert not torch.equal(result.snapshots[2][head], result.snapshots[4][head])
    assert torch.equal(result.snapshots[4][head], result.net.state_dict()[head])


def test_mpl_keeps_the_source_share_asked_for_and_tent_none(tiny_bundle, shifted):
    import torch

    from models.pipeline import load_scans

    volumes = [s.array for s in load_scans([img for img, _ in shifted], tiny_bundle, None)]
    net = tiny_bundle.load_network()
    source = net.state_dict()

    def run(method: str, weight: float):
        cfg = FAST.model_copy(update={"source_weight": weight})
        return adapt(
            net, volumes, tiny_bundle.card.patch_size, method=method, steps=3, cfg=cfg, snapshot_steps=(3,)
        )

    raw, blended = run("mpl", 0.0), run("mpl", 0.25)
    moved = 0
    for name, weight in blended.net.state_dict().items():
        if weight.is_floating_point():
            expected = 0.25 * source[name] + 0.75 * raw.net.state_dict()[name]
            assert torch.allclose(weight, expected, atol=1e-6), name
            assert torch.equal(blended.snapshots[3][name], weight)
            moved += not torch.equal(weight, source[name])
    assert moved, "adaptation changed no weight"
    tent, tent_raw = run("tent", 0.25).net.state_dict(), run("tent", 0.0).net.state_dict()
    assert all(torch.equal(tent[name], tent_raw[name]) for name in tent)
    with pytest.raises(ValueError):
        AdaptConfig(source_weight=1.0)


def test_foreground_connectedness_penalises_scattered_structures():
    from models.postprocessing import foreground_connectedness

    labels = np.zeros((4, 32, 32), np.uint8)
    labels[:, 10:20, 10:20] = 3
    labels[:, 8:10, 10:20] = 2  # touches the cavity: one organ
    assert foreground_connectedness(labels) == 1.0
    labels[:, 28:30, 28:30] = 3  # a stray look-alike blob
    assert 0.9 < foreground_connectedness(labels) < 1.0
    assert foreground_connectedness(np.zeros_like(labels)) == 0.0


def test_pseudo_label_clean_up_drops_foreground_outside_the_global_organ():
    import torch

    from models.mpl import clean_pseudo_labels
    from models.postprocessing import LargestComponent

    pseudo_global = torch.zeros(1, 8, 32, 32, dtype=torch.long)
    pseudo_global[0, 2:6, 10:20, 10:20] = 2  # the organ
    pseudo_global[0, 2:4, 26:29, 26:29] = 1  # a stray look-alike blob
    pseudo_local = torch.ones(1, 8, 16, 16, dtype=torch.long)  # all foreground
    box = torch.tensor([[0.0, 0.5, 0.5, 1.0, 1.0, 1.0]])  # the quarter with the stray and the organ's corner
    local, global_ = clean_pseudo_labels(
        pseudo_local, pseudo_global, box, mode=LargestComponent.foreground, n_classes=4
    )
    assert (global_ == 1).sum() == 0 and (global_ == 2).sum() == 4 * 100
    # the organ's corner, dilated by one slice and two voxels in-plane, stays foreground; the stray does not
    assert (local[0, 1:7, :6, :6] == 1).all() and local.sum() == 6 * 6 * 6
    off = clean_pseudo_labels(pseudo_local, pseudo_global, box, mode=LargestComponent.off, n_classes=4)
    assert off[0] is pseudo_local and off[1] is pseudo_global


def test_adaptation_core_needs_no_imaging_stack():
    """A GPU host adapts packed arrays with torch, MONAI and pydantic only (benchmarks.adaptation_offload)."""
    code = (
        "import sys; sys.modules['SimpleITK'] = None\n"
        "import numpy as np\n"
        "from models.adaptation import adapt\n"
        "from models.network import GlobalLocalUNet, NetworkConfig\n"
        f"net = GlobalLocalUNet(NetworkConfig.model_validate_json({PHANTOM_NETWORK.model_dump_json()!r}))\n"
        "vol = np.random.default_rng(0).normal(size=(12, 40, 40)).astype(np.float32)\n"
        f"r = adapt(net, [vol], {tuple(PHANTOM_PATCH)!r}, method='mpl', steps=2)\n"
        "assert r.steps_run == 2\n"
        "import benchmarks.adaptation_offload\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_collapse_rule_needs_a_structure_to_shrink_in_a_share_of_the_scans():
    from models.adaptation import collapsed_structures

    cfg = AdaptConfig()  # 3x shrink in at least a quarter of the scans that have the structure
    source = np.tile([[0.02, 0.05, 0.04]], (8, 1))
    source[4:, 0] = 0.0  # structure 1 is absent from half the scans: only 4 count
    assert collapsed_structures(source, source * 2, cfg) == []  # growth is no collapse
    adapted = source.copy()
    adapted[0, 0] = 0.001  # one of 4 scans that show structure 1 loses it: a quarter
    assert collapsed_structures(source, adapted, cfg) == [1]
    adapted = source.copy()
    adapted[:2, 1] = 0.02  # structure 2 shrinks 2.5x in 2 of 8: not beyond 3x
    adapted[2, 2] = 0.0  # structure 3 vanishes in 1 of 8: under a quarter
    assert collapsed_structures(source, adapted, cfg) == []


def test_mpl_restarts_from_the_source_with_the_next_seed_after_a_collapse(tiny_bundle, shifted, monkeypatch):
    import torch

    import models.adaptation as adaptation
    from models.pipeline import load_scans

    volumes = [s.array for s in load_scans([img for img, _ in shifted], tiny_bundle, None)]
    net = tiny_bundle.load_network()
    seeds, verdicts = [], iter([[1], []])
    real_mpl = adaptation._mpl

    def recording_mpl(work, volumes, patch, cfg, *args):
        seeds.append(cfg.seed)
        source = net.state_dict()
        assert all(torch.equal(v, source[k]) for k, v in work.state_dict().items())  # from the source weights
        return real_mpl(work, volumes, patch, cfg, *args)

    monkeypatch.setattr(adaptation, "_mpl", recording_mpl)
    monkeypatch.setattr(adaptation, "collapsed_structures", lambda *a: next(verdicts))
    reported = []
    result = adapt(
        net,
        volumes,
        tiny_bundle.card.patch_size,
        method="mpl",
        steps=3,
        cfg=FAST.model_copy(update={"seed": 5}),
        progress=reported.append,
    )
    assert seeds == [5, 6] and result.restarts == 1 and result.collapsed == []
    assert reported[-1] == 100.0 and max(reported[:-1]) < 100.0  # done once, after the restart

    seeds.clear()
    monkeypatch.setattr(adaptation, "collapsed_structures", lambda *a: [2])
    result = adapt(
        net,
        volumes,
        tiny_bundle.card.patch_size,
        method="mpl",
        steps=3,
        cfg=FAST.model_copy(update={"restarts": 2}),
    )
    assert seeds == [0, 1, 2] and result.restarts == 2 and result.collapsed == [2]
    seeds.clear()
    adapt(
        net,
        volumes,
        tiny_bundle.card.patch_size,
        method="mpl",
        steps=3,
        cfg=FAST.model_copy(update={"restarts": 0}),
    )
    assert seeds == [0]


def test_mirrored_teacher_labels_a_mirrored_scan_as_the_mirror_image():
    """Averaging the teacher over mirrored views (box mirrored too) makes its pseudo-labels mirror-equivariant."""
    import torch

    from models.mpl import teacher_probabilities
    from models.network import GlobalLocalUNet

    torch.manual_seed(0)
    net = GlobalLocalUNet(PHANTOM_NETWORK).eval()
    local, gview = torch.randn(1, 1, *PHANTOM_PATCH), torch.randn(1, 1, *PHANTOM_PATCH)
    box = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.5, 1.0]])  # (z0, y0, x0, z1, y1, x1): an off-centre quarter
    mirrored_boxes = {1: [[0.0, 0.5, 0.5, 0.5, 1.0, 1.0]], 2: [[0.0, 0.0, 0.0, 0.5, 0.5, 0.5]]}
    for axis, mirrored_box in mirrored_boxes.items():
        mirrored = (local.flip(axis + 2), gview.flip(axis + 2), torch.tensor(mirrored_box))
        p_local, p_global, _ = teacher_probabilities(net, local, gview, box, flips=(axis,))
        m_local, m_global, _ = teacher_probabilities(net, *mirrored, flips=(axis,))
        assert torch.allclose(m_local, p_local.flip(axis + 2), atol=1e-5)
        assert torch.allclose(m_global, p_global.flip(axis + 2), atol=1e-5)
        plain, _, _ = teacher_probabilities(net, *mirrored, flips=())
        assert not torch.allclose(plain, p_local.flip(axis + 2), atol=1e-3)  # the plain teacher is not
    with pytest.raises(ValueError):
        AdaptConfig(teacher_flips=(3,))


def test_student_without_masks_runs_its_plain_view_once_at_the_weight_of_two():
    """With ``mask_ratio`` 0 the masked view equals the plain one: one forward pass, the same loss and gradient."""
    import torch

    from models.mpl import mpl_pseudo_labels, mpl_student_loss
    from models.mpl_config import MplConfig
    from models.network import GlobalLocalUNet
    from models.sampling import Views

    torch.manual_seed(0)
    student, teacher = GlobalLocalUNet(PHANTOM_NETWORK), GlobalLocalUNet(PHANTOM_NETWORK).eval()
    views = Views(
        torch.randn(2, 1, *PHANTOM_PATCH),
        torch.randn(2, 1, *PHANTOM_PATCH),
        torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.5, 0.5]] * 2),
    )
    cfg = MplConfig(mask_ratio=0.0, confidence=0.0)
    pseudo = mpl_pseudo_labels(teacher, views, cfg)
    calls = []
    student.register_forward_hook(lambda *_: calls.append(1))
    once = mpl_student_loss(student, views, pseudo, cfg).loss
    (grad_once,) = torch.autograd.grad(once, student.head.conv.conv.weight)
    plain = mpl_student_loss(
        student, views, pseudo, cfg.model_copy(update={"student_sees_unmasked": False})
    ).loss
    (grad_plain,) = torch.autograd.grad(plain, student.head.conv.conv.weight)
    assert len(calls) == 2  # one pass each
    assert torch.allclose(once, 2 * plain) and torch.allclose(grad_once, 2 * grad_plain)
    calls.clear()
    mpl_student_loss(student, views, pseudo, cfg.model_copy(update={"mask_ratio": 0.5}))
    assert len(calls) == 2  # masked and plain views


def test_views_mirrored_at_random_keep_image_box_and_labels_together():
    import itertools

    from models.sampling import make_views, mirror_randomly

    rng = np.random.default_rng(0)
    volumes = [rng.normal(size=(4, 24, 24)).astype(np.float32) for _ in range(16)]
    views = make_views(volumes, (1, 16, 16), rng, labels=[(v > 0.5).astype(np.uint8) for v in volumes])
    before = views.local.clone()
    mirrored = mirror_randomly(views, (1, 2), np.random.default_rng(1))
    assert bool((views.local == before).all())  # the views drawn are left as they were
    combos = []
    for i in range(16):
        for flip_y, flip_x in itertools.product((False, True), repeat=2):
            dims = [d for d, f in ((2, flip_y), (3, flip_x)) if f]
            box = views.box[i].clone()
            for axis, f in ((1, flip_y), (2, flip_x)):
                if f:
                    box[axis], box[axis + 3] = 1 - views.box[i, axis + 3], 1 - views.box[i, axis]
            if bool((mirrored.local[i] == views.local[i].flip(dims)).all()):
                assert bool((mirrored.local_labels[i] == views.local_labels[i].flip(dims)).all())
                assert bool((mirrored.global_view[i] == views.global_view[i].flip(dims)).all())
                assert np.allclose(mirrored.box[i].numpy(), box.numpy())
                combos.append((flip_y, flip_x))
                break
        else:
            raise AssertionError(f"view {i} is no mirror image of the one drawn")
    assert len(set(combos)) == 4  # every combination of the two axes occurs in 16 views


def test_adapted_network_is_ensembled_along_the_axes_its_views_were_mirrored(
    tiny_bundle, shifted, tmp_path, monkeypatch
):
    import models.adaptation
    from models.bundle import load_bundle

    axes = []
    real = models.adaptation.mirror_randomly
    monkeypatch.setattr(
        models.adaptation, "mirror_randomly", lambda v, a, rng: axes.append(tuple(a)) or real(v, a, rng)
    )
    tiny = FAST.model_copy(update={"steps": 2, "min_steps": 1, "restarts": 0})
    inputs = [img for img, _ in shifted[:2]]
    # the source model's ensemble alone: the adapted network saw no mirror image and predicts once
    plain = segment_batch(inputs, tiny_bundle, tmp_path / "a", method="mpl", adapt_config=tiny, flips=[1, 2])
    record = json.loads(plain[0].json_path.read_text())
    assert axes == [] and record["test_time_flips"] == [1, 2] and record["adapted_flips"] == []
    mirrored = tiny.model_copy(update={"view_flips": (1, 2)})
    saved = tmp_path / "adapted"
    both = segment_batch(
        inputs, tiny_bundle, tmp_path / "b", method="mpl", adapt_config=mirrored, save_adapted=saved
    )
    record = json.loads(both[0].json_path.read_text())
    assert axes and set(axes) == {(1, 2)}
    assert record["test_time_flips"] == [] and record["adapted_flips"] == [1, 2]
    assert load_bundle(saved).card.test_time_flips == (1, 2)  # the saved network keeps its ensemble


def test_mpl_learns_only_the_normalisation_layers_when_asked(tiny_bundle, shifted):
    import torch

    from models.adaptation import NORM_LAYERS
    from models.pipeline import load_scans

    volumes = [s.array for s in load_scans([img for img, _ in shifted], tiny_bundle, None)]
    net = tiny_bundle.load_network()
    source = net.state_dict()
    norm_names = {
        f"{module_name}.{param_name}"
        for module_name, module in net.named_modules()
        if isinstance(module, NORM_LAYERS)
        for param_name, _ in module.named_parameters(recurse=False)
    }
    assert norm_names, "the network has no normalisation parameters to learn"

    def moved(parameters: str) -> set[str]:
        cfg = FAST.model_copy(update={"source_weight": 0.0, "mpl_parameters": parameters})
        adapted = adapt(net, volumes, tiny_bundle.card.patch_size, method="mpl", steps=3, cfg=cfg).net
        # the teacher's EMA of an unchanged weight rounds it by a few ulp, far below what 3 steps learn
        return {
            name
            for name, w in adapted.state_dict().items()
            if w.is_floating_point() and not torch.allclose(w, source[name], rtol=1e-5, atol=1e-8)
        }

    only_norm = moved("norm")
    assert only_norm and only_norm <= norm_names
    assert moved("all") - norm_names, "every weight learns by default"
    assert all(p.requires_grad for p in net.parameters())
