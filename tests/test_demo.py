import json

import pytest
from click.testing import CliRunner

from sv_deploy.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end_and_beats_the_baselines(tmp_path):
    """The README's first command, scored: ours must beat tricubic + back-projection."""
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", str(out)])
    assert result.exit_code == 0, result.output
    scored = CliRunner().invoke(
        main, ["evaluate", str(out / "beads_lr_x2.ome.tif"), str(out / "beads_hr.tif"), "--lowres", str(out / "beads_lr.tif"), "--json"]
    )
    rows = json.loads(scored.stdout)["rows"]
    ours, cubic, cubic_bp = (r["matched"]["psnr"] for r in rows)
    assert ours > cubic_bp > cubic
