"""`autoresearch prepare --force` with no --source rebuilds the active dataset as it was made,
which is what every damaged-data message tells the user to run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autoresearch.workspace import init_workspace


@pytest.mark.slow  # rebuilds the whole stdlib dataset: about a minute on two cores
def test_force_without_source_rebuilds_the_active_dataset(
    tmp_path: Path, stdlib_prepared: Path
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(stdlib_prepared, cache)
    ws = init_workspace(tmp_path / "ws")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env["AUTORESEARCH_CACHE"] = str(cache)
    (cache / "stdlib" / "tokenizer.pkl").unlink()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "autoresearch", *args, "--workspace", str(ws)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    broken = cli("train", "--preset", "cpu", "--device", "cpu")
    assert broken.returncode == 2 and "prepare --force" in broken.stderr
    fixed = cli("prepare", "--force")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "rebuilding the active dataset (stdlib)" in fixed.stdout
    assert (cache / "stdlib" / "tokenizer.pkl").is_file()
    assert (cache / "ACTIVE").read_text().strip() == "stdlib"
    assert (
        json.loads((cache / "stdlib" / "manifest.json").read_text())["args"]["source"] == "stdlib"
    )
