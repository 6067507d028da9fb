import pytest
import torch
from safetensors.torch import save_file

from sv_deploy.errors import UserError
from sv_deploy.model_file import load_model, read_header, save_model


def test_round_trip_gives_the_same_network(model_file, trained_small):
    stage, *_ = trained_small
    config, stages, digest = load_model(model_file)
    assert config.stages == ((2, 2, 2),) and len(digest) == 64
    x = torch.rand(1, 1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(stages[0](x), stage(x))


def test_edited_weights_fail_the_checksum(model_file, tmp_path):
    raw = bytearray(model_file.read_bytes())
    raw[-10] ^= 0xFF  # inside the tensor data
    bad = tmp_path / "edited.svmodel"
    bad.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum"):
        load_model(bad)


def test_files_that_are_not_ours_are_refused(tmp_path):
    junk = tmp_path / "junk.svmodel"
    junk.write_bytes(b"\x80\x04not a model")
    with pytest.raises(UserError, match="not an sv-deploy model"):
        read_header(junk)
    text = tmp_path / "notes.tif"  # named like an image, but it is not one
    text.write_text("hello")
    with pytest.raises(UserError, match="not an sv-deploy model file"):
        read_header(text)
    image = tmp_path / "stack.svmodel"  # an image under a model's name
    image.write_bytes(b"II*\x00" + bytes(100))
    with pytest.raises(UserError, match="is an image, not a model file"):
        read_header(image)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(UserError, match="not an sv-deploy model"):
        load_model(other)


def test_weights_of_another_type_are_refused_before_the_checksum(model_file, tmp_path):
    from safetensors.torch import load_file

    meta = read_header(model_file)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(model_file)).items()}
    bf16 = tmp_path / "bf16.svmodel"
    save_file(tensors, str(bf16), metadata=meta)
    with pytest.raises(UserError, match="holds bfloat16 weights"):
        load_model(bf16)


def test_a_model_file_is_readable_like_any_new_file(tmp_path):
    import stat

    from sv_deploy.config import ModelConfig
    from sv_deploy.model import SVStage

    from sv_deploy import volume_io

    save_model(tmp_path / "m.svmodel", ModelConfig(stages=((2, 2, 2),)), [SVStage((2, 2, 2))])
    assert stat.S_IMODE((tmp_path / "m.svmodel").stat().st_mode) == 0o666 & ~volume_io._UMASK


@pytest.mark.parametrize("edit, words", [
    ({"stages": [[1000, 1000, 1000]]}, "factors 1-8"),
    ({"stages": []}, "1 to 4 stages"),
    ({"arch": None}, "config cannot be read"),
    ({"axes": "Q"}, "ZYX or YX"),
    ({"norm": {"low_percentile": 1.0, "high_percentile": 500}}, "0 <= low < high <= 100"),
])
def test_a_config_out_of_range_is_refused_before_a_network_is_built(model_file, tmp_path, edit, words):
    """The checksum is not a signature: a config edited and the checksum recomputed must still be
    refused in one line, not build a network of any size it asks for."""
    import json

    from safetensors.torch import load_file

    from sv_deploy.model_file import _checksum

    meta = read_header(model_file)
    tensors = load_file(str(model_file))
    config = json.dumps({**json.loads(meta["config"]), **edit})
    crafted = tmp_path / "crafted.svmodel"
    save_file(tensors, str(crafted), metadata={**meta, "config": config, "sha256": _checksum(config, tensors)})
    with pytest.raises(UserError, match=words):
        load_model(crafted)


@pytest.mark.skipif(not hasattr(__import__("os"), "getuid"), reason="file-size limits (RLIMIT_FSIZE) are POSIX")
def test_a_model_or_volume_the_disk_cannot_hold_is_one_clear_error_and_no_file(tmp_path):
    """A full disk, a quota or a file-size limit, met after all the training: one line naming the
    file and the fix, not a traceback from the writer, and nothing at the name (here a limit of
    16 kB, which a run under `ulimit -f` meets the way a full disk is met)."""
    import subprocess
    import sys

    script = (
        "import resource, signal, sys, numpy as np\n"
        "from sv_deploy.config import ModelConfig\nfrom sv_deploy.model import SVStage\n"
        "from sv_deploy.model_file import save_model\nfrom sv_deploy.volume_io import write_volume\n"
        "from sv_deploy.errors import UserError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "for write in (lambda: save_model(sys.argv[1] + '/m.svmodel', ModelConfig(stages=((2, 2, 2),)),"
        " [SVStage((2, 2, 2))]),\n"
        "              lambda: write_volume(sys.argv[1] + '/v.ome.tif', [np.ones((8, 64, 64), np.uint16)],"
        " (8, 64, 64), np.uint16, 'ZYX', (1.0, 1.0, 1.0))):\n"
        "    try:\n        write()\n    except UserError as exc:\n        print(exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and not run.stderr, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2, run.stdout
    for line, name in zip(lines, ("m.svmodel", "v.ome.tif")):
        assert line.startswith(f"{tmp_path / name} could not be written ("), line
        assert line.endswith("free space on that disk or write it to another disk"), line
    assert not list(tmp_path.iterdir())
