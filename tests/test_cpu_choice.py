import dataclasses
import json

import pytest

from sv_deploy import cpu_choice
from sv_deploy.config import ArchConfig, ModelConfig


def test_onnxruntime_only_where_it_is_clearly_faster():
    assert cpu_choice.faster({"onnxruntime": 0.5, "torch": 1.0}) == "onnxruntime"
    assert cpu_choice.faster({"onnxruntime": 1.0, "torch": 0.5}) == "torch"
    # within the margin torch keeps it (far less memory)
    assert cpu_choice.faster({"onnxruntime": 1.0, "torch": 1.0}) == "torch"
    assert cpu_choice.faster({"onnxruntime": 1.0, "torch": 1.04}) == "torch"
    assert cpu_choice.faster({"onnxruntime": 1.0, "torch": 1.06}) == "onnxruntime"


def test_the_workload_tells_2d_3d_ensemble_stage_and_architecture_apart():
    three = ModelConfig(stages=((2, 2, 2), (2, 2, 2)))
    keys = {json.dumps(cpu_choice.workload(c, e), sort_keys=True)
            for c in (three, dataclasses.replace(three, axes="YX", stages=((1, 2, 2),)),
                      dataclasses.replace(three, arch=ArchConfig(mid_layers=4)),
                      dataclasses.replace(three, stages=((1, 2, 2),)))
            for e in (True, False)}
    assert len(keys) == 8
    assert cpu_choice.workload(three, True)["factors"] == [2, 2, 2]


def test_kept_choices_round_trip_keep_the_newest_and_ignore_what_is_not_theirs(tmp_path):
    path = tmp_path / "sub" / cpu_choice.FILE
    assert cpu_choice.read_choices(path) == {}  # no file yet
    entries = {f"k{i}": {"backend": "torch", "measured": f"2026-12-07T10:{i:02d}:00+00:00"}
               for i in range(cpu_choice.KEEP + 3)}
    entries["k9"]["backend"] = "onnxruntime"
    cpu_choice.write_choices(path, entries)
    kept = cpu_choice.read_choices(path)
    assert len(kept) == cpu_choice.KEEP and "k0" not in kept and kept["k9"]["backend"] == "onnxruntime"
    assert [p.name for p in path.parent.iterdir()] == [cpu_choice.FILE]  # no temporary left
    path.write_text(json.dumps({"entries": {"a": {"backend": "tensorrt"}, "b": {"backend": "torch"}, "c": 3}}))
    assert list(cpu_choice.read_choices(path)) == ["b"]
    for text in ("[]", "{bad", '{"entries": []}'):
        path.write_text(text)
        assert cpu_choice.read_choices(path) == {}


@pytest.mark.parametrize("ensemble", [True, False])
def test_the_timed_pass_runs_the_models_stage_as_infer_does(model_file, ensemble):
    """Both backends time the same block; each really ran (the record is a time, not a default)."""
    from sv_deploy.backends import open_backend
    from sv_deploy.model_file import load_model

    config = load_model(model_file)[0]
    block = (10, 48, 48)
    for name in cpu_choice.CHOICES:
        _, runner = open_backend(str(model_file), name, "cpu", log=lambda m: None, ensemble=ensemble)
        calls = []
        predict = runner.predict
        runner.predict = lambda stage, x: calls.append(x.shape) or predict(stage, x)
        assert cpu_choice.time_pass(runner, config.stages[0], ensemble, _block(block)) > 0
        passes = 1 if (not ensemble or name == "onnxruntime") else 8  # folded on ONNX Runtime
        batches = 1 if passes == 1 else 2  # the ensemble's members in two batches of like shape
        assert len(calls) == (1 + cpu_choice.REPEATS) * batches
        assert sum(shape[0] for shape in calls) == (1 + cpu_choice.REPEATS) * passes


def _block(shape):
    import numpy as np

    return np.random.default_rng(0).random(shape, dtype=np.float32)


def test_runs_started_together_time_once_and_agree(model_file, tmp_path, monkeypatch):
    """The second waits on the lock while the first times, then reads its answer."""
    import threading

    from sv_deploy.model_file import load_model

    monkeypatch.setitem(cpu_choice.TIMED_BLOCK, "3d", (10, 48, 48))
    config = load_model(model_file)[0]
    notes, answers = [], []

    def one():
        answers.append(cpu_choice.choose(str(model_file), config, False, notes.append, folder=tmp_path))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 2 and answers[0] == answers[1] in cpu_choice.CHOICES
    assert sum(n.startswith("timing ONNX Runtime and torch") for n in notes) == 1, notes
    assert len(cpu_choice.read_choices(tmp_path / cpu_choice.FILE)) == 1


def test_a_backend_chosen_on_first_use_resolves_once_and_a_failure_ends_the_run():
    from sv_deploy.backends import BackendUnavailable, ChosenOnFirstUse, TorchBackend
    from sv_deploy.model import SVStage

    import torch

    calls = []

    def choose():
        calls.append(1)
        return TorchBackend([SVStage((2, 2, 2))], torch.device("cpu"))

    lazy = ChosenOnFirstUse(choose)
    assert getattr(lazy, "tile", None) is None and calls == []  # asked before any input: not resolved
    assert lazy.name == "torch (cpu)" and lazy.resolve() is lazy.resolve() and calls == [1]

    def fails():
        calls.append(2)
        raise MemoryError("no room")

    broken = ChosenOnFirstUse(fails)
    for _ in range(2):
        with pytest.raises(BackendUnavailable, match="could not choose the CPU backend .*--backend torch"):
            getattr(broken, "folded_ensemble", False)  # not swallowed as a missing attribute
    assert calls == [1, 2]  # the failure is kept, not retried per file
