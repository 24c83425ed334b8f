"""Scenarios and the command line of every tool for a scenario."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.corpora import Corpus

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    corpus: str
    layout: str  # parquet | arrow
    mode: str  # resize | passthrough
    description: str


SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            name="photos-parquet",
            corpus="photos",
            layout="parquet",
            mode="resize",
            description="12 MP phone photos → Parquet, longest side 1024, JPEG q90",
        ),
        Scenario(
            name="small-passthrough",
            corpus="small",
            layout="parquet",
            mode="passthrough",
            description="upright 1024 px JPEGs → Parquet, bytes kept (--image-format keep)",
        ),
        Scenario(
            name="photos-arrow",
            corpus="photos",
            layout="arrow",
            mode="resize",
            description="12 MP phone photos → packed Arrow (save_to_disk), raw-image",
        ),
        Scenario(
            name="mixed-parquet",
            corpus="mixed",
            layout="parquet",
            mode="resize",
            description="PNG RGB/RGBA/palette, rotated JPEG and broken files → Parquet",
        ),
    )
}

PEERS = ("limit-write", "hf-datasets", "serial-pillow", "ray-data", "img2dataset")
TOOLS = ("engine", "limit") + PEERS
REF_TOOL = "engine-ref"  # the engine at another commit (`bench run --ref REV`), for before/after batches
_PEER_MODULES = {
    "limit": "limit",
    "limit-write": "limit",
    "hf-datasets": "hf_datasets",
    "serial-pillow": "serial_pillow",
    "ray-data": "ray_data",
    "img2dataset": "img2dataset",
}
_PEER_FLAGS = {"limit-write": ["--write"]}
_NO_ARROW = {
    "ray-data": "Ray Data has no save_to_disk (packed Arrow) writer",
    "img2dataset": "img2dataset has no save_to_disk (packed Arrow) writer",
}
_PASSTHROUGH_ONLY = {
    "limit-write": "writing is a small part of resizing; limit-write is the pass-through floor"
}


class NotApplicable(Exception):
    """The tool cannot express this scenario."""


def engine_command(
    *,
    manifest: Path,
    config: Path,
    out: Path,
    layout: str,
    mode: str,
    workers: int,
    max_size: int = 1024,
    quality: int = 90,
) -> list[str]:
    return [
        PYTHON,
        "-m",
        "engine",
        "convert",
        "--manifest",
        str(manifest),
        "--config",
        str(config),
        "--out",
        str(out),
        "--layout",
        layout,
        "--max-size",
        str(max_size),
        "--image-format",
        "keep" if mode == "passthrough" else "jpeg",
        "--quality",
        str(quality),
        "--workers",
        str(workers),
        "--overwrite",
        "--quiet",
    ]


def tool_command(
    tool: str, scenario: Scenario, corpus: Corpus, out: Path, *, workers: int, ref_dir: Path | None = None
) -> list[str]:
    if tool in ("engine", REF_TOOL):
        command = engine_command(
            manifest=corpus.manifest,
            config=corpus.config,
            out=out,
            layout=scenario.layout,
            mode=scenario.mode,
            workers=workers,
        )
        if tool == REF_TOOL:  # the same command line, with the reference checkout's engine first on sys.path
            run = (
                "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
                "runpy.run_module('engine', run_name='__main__')"
            )
            command = [PYTHON, "-c", run, str(ref_dir)] + command[3:]
        return command
    if tool not in _PEER_MODULES:
        raise ValueError(f"unknown tool {tool!r}; choose from {', '.join(TOOLS)}")
    if scenario.layout == "arrow" and tool in _NO_ARROW:
        raise NotApplicable(_NO_ARROW[tool])
    if scenario.mode != "passthrough" and tool in _PASSTHROUGH_ONLY:
        raise NotApplicable(_PASSTHROUGH_ONLY[tool])
    return [
        PYTHON,
        "-m",
        f"bench.peers.{_PEER_MODULES[tool]}",
        "--manifest",
        str(corpus.manifest),
        "--config",
        str(corpus.config),
        "--out",
        str(out),
        "--layout",
        scenario.layout,
        "--mode",
        scenario.mode,
        "--max-size",
        "1024",
        "--quality",
        "90",
        "--workers",
        str(workers),
    ] + _PEER_FLAGS.get(tool, [])


def ref_checkout(rev: str, workdir: Path) -> Path:
    """A detached worktree of ``rev`` under ``workdir`` (made once per commit)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    path = workdir / f"ref-{sha[:12]}"
    if not (path / "engine").is_dir():
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--force", str(path), sha],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        )
    return path


def engine_available() -> str | None:
    """None when ``python -m engine convert --help`` works, else the reason."""
    if not (REPO_ROOT / "engine" / "cli.py").exists():
        return "engine/cli.py does not exist yet"
    proc = subprocess.run(
        [PYTHON, "-m", "engine", "convert", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        return _last_line(proc.stderr or proc.stdout) or f"exit code {proc.returncode}"
    return None


def ensure_img2dataset(venv: Path) -> str | None:
    """Create ``venv`` with img2dataset if needed; None when usable, else the error text."""
    binary = venv / "bin" / "img2dataset"
    if binary.exists():
        return None
    log.info("installing img2dataset into %s", venv)
    for command in (
        ["python3", "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--quiet", "img2dataset"],
    ):
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"{' '.join(command[:3])}: {err}"
        if proc.returncode != 0:
            return f"{' '.join(command[:3])}: {_last_line(proc.stderr or proc.stdout)}"
    return None if binary.exists() else "img2dataset entry point missing after install"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def failure_reason(stderr_tail: str, returncode: int) -> str:
    return _last_line(stderr_tail) or f"exit code {returncode}"
