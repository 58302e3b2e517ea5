"""``EndpointDistillationTask.compile``: one graph per compiled part (zero graph breaks), eager numbers unchanged.

The sweep compiles with Dynamo's ``eager`` backend (tracing only, so it is fast) and ``fullgraph=True``,
which raises on any graph break; numerics are compared with AOTAutograd (``aot_eager``) and inductor.
"""
from __future__ import annotations

import os

import pytest
import timm
import torch
import torch._dynamo
from _tiny_models import TINY, cait_teacher, deit, deit_teacher, lift, swin_teacher, widelast
from torch._dynamo.utils import counters

import timm_widelast  # noqa: F401
from timm_widelast.distill import EndpointDistillationTask, FrozenTeacher

TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])
pytestmark = pytest.mark.skipif(TORCH_VERSION < (2, 6), reason="zero-break compile is checked from torch 2.6 on "
                                "(older Dynamo may break at the taps' stop-early exception)")

STUDENTS = {"deit": deit, "lift": lift, "widelast": widelast}
TEACHERS = {"vit": deit_teacher, "cait": cait_teacher, "swin": swin_teacher}
FEATURE_LOSSES = ("mse", "spectral", "none")


@pytest.fixture
def dynamo(monkeypatch):
    """Fresh Dynamo caches and counters; room for every task of the sweep (one compiled step each)."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            monkeypatch.setattr(torch._dynamo.config, name, 64)
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def _task(student, teacher, feat_loss, **kw):
    return EndpointDistillationTask(student, teacher, distill_loss_weight=0.5, feat_loss=feat_loss,
                                    feat_weight=0.0 if feat_loss == "none" else 0.2, **kw)


def test_zero_graph_breaks_for_every_student_teacher_and_loss(dynamo):
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    for teacher_name, make_teacher in TEACHERS.items():
        teacher = FrozenTeacher(make_teacher())  # shared by the students: its graphs are traced once per layer set
        for student_name, make_student in STUDENTS.items():
            for feat_loss in FEATURE_LOSSES:
                task = _task(make_student(), teacher, feat_loss).train()
                eager = task(x, y)
                task.compile(backend="eager", fullgraph=True)  # fullgraph: any graph break raises here
                compiled = task(x, y)
                compiled["loss"].backward()
                case = f"{student_name} <- {teacher_name}, {feat_loss}"
                for key in ("loss", "task_loss", "kd_loss", "feat_loss"):
                    assert torch.allclose(compiled[key], eager[key], rtol=1e-6, atol=1e-7), (case, key)
    assert dict(dynamo["graph_break"]) == {}
    assert dynamo["stats"]["unique_graphs"] > 0  # compiled for real (identical graphs are shared by later cases)


def _grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def _same_grads(compiled, eager, **tol):
    assert compiled.keys() == eager.keys() and eager
    for name in eager:
        assert torch.allclose(compiled[name], eager[name], **tol), name


INDUCTOR = pytest.param("inductor", marks=pytest.mark.skipif(
    not os.environ.get("TIMM_WIDELAST_INDUCTOR_TESTS"),
    reason="inductor's C++ build of a training step takes minutes on a small CPU; "
           "TIMM_WIDELAST_INDUCTOR_TESTS=1 runs it"))


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_compiled_loss_and_gradients_equal_eager(dynamo, backend):
    """AOTAutograd traces forward and backward: loss terms and every gradient match the eager step."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    student, teacher = STUDENTS["deit"](), FrozenTeacher(TEACHERS["cait"]())
    state = {k: v.clone() for k, v in student.state_dict().items()}
    eager_task = _task(student, teacher, "spectral").train()  # 32-wide student, 64-wide teacher: pooled
    eager = eager_task(x, y)
    eager["loss"].backward()
    twin = STUDENTS["deit"]()
    twin.load_state_dict(state)
    task = _task(twin, teacher, "spectral").train()
    task.compile(backend=backend, fullgraph=True)
    compiled = task(x, y)
    compiled["loss"].backward()
    for key in ("loss", "task_loss", "kd_loss", "feat_loss"):
        assert torch.allclose(compiled[key], eager[key], rtol=1e-5, atol=1e-6), key
    _same_grads(_grads(twin), _grads(student), rtol=1e-4, atol=1e-6)
    assert dict(dynamo["graph_break"]) == {}


@pytest.mark.parametrize("student", ["widelast", "multi_lift"])
def test_whole_task_compiles_to_one_graph_with_paired_layers(dynamo, student):
    """``torch.compile(task)`` itself (the issue's case: two breaks per step before) is one graph, with two pairs."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    model = (STUDENTS["widelast"]() if student == "widelast" else
             timm.create_model("deit_tiny_lift", lift_dim=64, lift_start=0, **TINY))  # projectors on both blocks
    task = _task(model, FrozenTeacher(TEACHERS["vit"]()), "mse", student_layer=[0, 1], teacher_layer=[0, 1]).train()
    eager = task(x, y)
    compiled = torch.compile(task, backend="eager", fullgraph=True)(x, y)
    assert torch.allclose(compiled["loss"], eager["loss"], rtol=1e-6)
    assert dict(dynamo["graph_break"]) == {} and dynamo["stats"]["unique_graphs"] == 1


def test_compiled_teacher_stops_at_the_tap(dynamo):
    """Feature-only distillation: the compiled CaiT graph ends at the last SA block (no class attention, no head)."""
    graphs = []

    def recording_backend(gm, example_inputs):  # the teacher modules each traced graph calls into
        paths = {path for node in gm.graph.nodes for path, _ in (node.meta.get("nn_module_stack") or {}).values()}
        graphs.append({path.split(".model.", 1)[-1] for path in paths if ".model." in path})
        return gm.forward

    x = torch.randn(2, 3, 32, 32)
    for need_logits in (False, True):
        teacher = FrozenTeacher(TEACHERS["cait"]())
        teacher.compile(backend=recording_backend, fullgraph=True)
        logits, tokens, _ = teacher.endpoints(x, [None], need_logits=need_logits)
        assert (logits is None) is (not need_logits) and tokens[0].shape == (2, 64, 64)
    without_logits, with_logits = graphs
    assert {"blocks.1", "blocks.1.mlp.fc2"} <= without_logits
    assert not {"blocks_token_only.0", "norm", "head"} & without_logits
    assert {"blocks.1", "blocks_token_only.0", "norm", "head"} <= with_logits
    assert dict(dynamo["graph_break"]) == {}
