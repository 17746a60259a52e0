"""The saved run config of a training.py run, fed back through ``training.py --config``, resolves to itself."""
import json
from pathlib import Path

from flaxdiff.config import RunConfig


def assert_config_feeds_back(training, workdir: Path, capsys) -> dict:
    """``--config <run>/config.json --print-config`` prints the saved config with its relative paths resolved
    against the run directory; returns the saved dict."""
    saved = json.loads((Path(workdir) / "config.json").read_text())
    capsys.readouterr()
    assert training.main(["--config", str(Path(workdir) / "config.json"), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == RunConfig.from_dict(saved).resolved_paths(workdir).to_dict()
    checkpoint = sorted((Path(workdir) / "checkpoints").iterdir(), key=lambda p: int(p.name))[-1]
    assert json.loads((checkpoint / "config" / "metadata").read_text()) == saved
    return saved
