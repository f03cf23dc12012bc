"""The configs ship inside the package: a wheel installed away from the repository trains and generates."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_package_of_mft_is_listed_for_the_wheel():
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mft").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)


@pytest.mark.slow
def test_wheel_trains_and_generates_outside_the_repository(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("mft-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    work = tmp_path / "empty"
    work.mkdir()
    # Only the installed copy is importable: no repository on the path, nothing relative to it in cwd.
    env = {**os.environ, "PYTHONPATH": str(site), "HYDRA_FULL_ERROR": "0"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True)

    probe = run("-c", "import mft, mft.compose; print(mft.__file__, mft.compose.CONFIG_PATH)")
    assert probe.stdout.split() == [str(site / "mft" / "__init__.py"), "pkg://mft.conf"], probe.stderr
    trained = run("-m", "mft.train", "max_steps=3", "progress=false", "eval_every=0", "eval_batches=1", "batch_size=2",
                  "data.seq_len=128", "data.cache_dir=null", "hydra.run.dir=run")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (work / "run" / "checkpoints" / "step_000003" / "adapter.safetensors").is_file()
    generated = run("-m", "mft.generate", f"run_dir={work / 'run'}", "prompt=hi", "max_new_tokens=3")
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert "3 generated" in generated.stderr
