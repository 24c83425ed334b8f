"""The command line: help text for every command and option, and usage/config errors that end
in exit code 2 with one line on stderr and no traceback."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imagegen
import pytest
from conftest import CONFIG_BYTES, REPO, Output, convert, row, run_main, write_input
from PIL import Image

CONVERT_OPTIONS = [
    "--manifest",
    "--config",
    "--out",
    "--layout",
    "--split",
    "--max-size",
    "--image-format",
    "--quality",
    "--shard-rows",
    "--max-shard-size",
    "--workers",
    "--runner",
    "--ray-address",
    "--overwrite",
    "--quiet",
    "--max-reject-ratio",
]


def help_of(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        from engine.cli import main

        main(argv)
    assert exc.value.code in (0, None), f"{argv} exited {exc.value.code}"
    out = capsys.readouterr().out
    assert out.strip(), f"{argv} printed no help"
    return out


def option_descriptions(help_text: str) -> dict[str, str]:
    """Map each long option in an argparse/click-style help text to its description."""
    result: dict[str, str] = {}
    current: list[str] = []
    for line in help_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("-"):
            head, desc = _split_head(stripped)
            current = re.findall(r"--[\w-]+", head)
            for opt in current:
                result[opt] = desc.strip()
        elif current and stripped and line.startswith(" " * 6):
            for opt in current:
                result[opt] = (result[opt] + " " + stripped).strip()
        else:
            current = []
    return result


def _split_head(stripped: str) -> tuple[str, str]:
    """'--out OUT   Where to write.' -> ('--out OUT', 'Where to write.')"""
    parts = re.split(r"\s{2,}", stripped, maxsplit=1)
    return parts[0], parts[1] if len(parts) > 1 else ""


def subcommands(help_text: str) -> list[str]:
    """Subcommand names from a top-level help: a `{a,b}` choice list, or the indented
    `name   description` lines that argparse prints under a COMMAND metavar."""
    m = re.search(r"\{([\w,-]+)\}", help_text)
    if m:
        return m.group(1).split(",")
    return re.findall(r"^ {2,8}([a-z][\w-]*) {2,}\S", help_text, re.M)


# --- help ------------------------------------------------------------------------------------


def test_top_level_help_lists_convert(capsys):
    text = help_of(capsys, ["--help"])
    assert "convert" in subcommands(text), text


def test_every_subcommand_has_help(capsys):
    top = help_of(capsys, ["--help"])
    cmds = subcommands(top)
    assert cmds
    for cmd in cmds:
        text = help_of(capsys, [cmd, "--help"])
        described = option_descriptions(text)
        assert described, f"{cmd} --help lists no options"
        undescribed = [o for o, d in described.items() if not d]
        assert not undescribed, f"{cmd}: options without help text: {undescribed}\n{text}"
        # every subcommand is introduced in the top-level help, with words
        m = re.search(rf"^\s+{re.escape(cmd)}\s{{2,}}(\S.*)$", top, re.M)
        assert m, f"{cmd} has no one-line description in the top-level help"


def test_convert_help_describes_every_option(capsys):
    described = option_descriptions(help_of(capsys, ["convert", "--help"]))
    missing = [o for o in CONVERT_OPTIONS if o not in described]
    assert not missing, f"convert --help does not mention {missing}"
    empty = [o for o in CONVERT_OPTIONS if len(described[o]) < 10]
    assert not empty, f"options without a real description: {empty}"


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "convert" in proc.stdout


def test_version_names_the_engine_and_the_pillow_build():
    import importlib.metadata as md

    import PIL

    proc = subprocess.run(
        [sys.executable, "-m", "engine", "--version"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line, line
    assert line.startswith(f"engine {md.version('engine')} ("), line
    simd = any(d.metadata["Name"].lower() == "pillow-simd" for d in md.distributions())
    assert f"{'Pillow-SIMD' if simd else 'Pillow'} {PIL.__version__}," in line, line
    assert f"pyarrow {md.version('pyarrow')}" in line and f"datasets {md.version('datasets')}" in line, line


def test_console_script_declared():
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    scripts = meta.get("project", {}).get("scripts", {})
    assert any(v.startswith("engine.cli:") for v in scripts.values()), scripts


# --- errors ----------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    return write_input(tmp_path / "in", [row("a", "a.jpg")], {"a.jpg": imagegen.jpeg()})


def assert_usage_error(capsys, argv, *must_mention: str, out_dir=None):
    code = run_main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected exactly one line on stderr, got: {err!r}"
    if must_mention:
        assert any(m.lower() in lines[0].lower() for m in must_mention), (
            f"{lines[0]!r} names none of {must_mention}"
        )
    if out_dir is not None:
        assert not list(out_dir.glob("data/*.parquet")), "a config error must fail before any data is written"
    return lines[0]


def _argv(inp, out, config=None, manifest=None):
    return [
        "convert",
        "--manifest",
        str(manifest or inp.manifest),
        "--config",
        str(config or inp.config),
        "--out",
        str(out),
        "--runner",
        "local",
        "--quiet",
    ]


def test_missing_manifest(capsys, good, tmp_path):
    missing = tmp_path / "no-such-manifest.jsonl"
    assert_usage_error(
        capsys, _argv(good, tmp_path / "out", manifest=missing), "no-such-manifest", out_dir=tmp_path / "out"
    )


@pytest.mark.parametrize(
    "content", [b"", b"\n\n   \n", b"\xef\xbb\xbf\r\n"], ids=["empty", "blank", "bom-only"]
)
def test_manifest_without_rows_is_a_usage_error_that_keeps_the_output(capsys, good, tmp_path, content):
    """Almost certainly the wrong file: one line, exit 2, and even --overwrite leaves OUT alone."""
    manifest = tmp_path / "in" / "empty.jsonl"
    manifest.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier dataset")
    assert_usage_error(
        capsys, _argv(good, out, manifest=manifest) + ["--overwrite"], "empty.jsonl", "no rows"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_manifest_is_a_directory(capsys, good, tmp_path):
    line = assert_usage_error(capsys, _argv(good, tmp_path / "out", manifest=good.root), str(good.root))
    assert "resume" not in line, line
    assert not (tmp_path / "out").exists()


def test_missing_config_file(capsys, good, tmp_path):
    missing = tmp_path / "no-such-config.json"
    assert_usage_error(
        capsys, _argv(good, tmp_path / "out", config=missing), "no-such-config", out_dir=tmp_path / "out"
    )


@pytest.mark.parametrize(
    "content,mention",
    [
        (b'{"instructions": "x"}', "json_schema"),
        (json.dumps({"json_schema": {"type": "object"}}).encode(), "instructions"),
        (json.dumps({"instructions": "x", "json_schema": {"type": "bogus"}}).encode(), "schema"),
        (
            json.dumps(
                {"instructions": "x", "json_schema": {"type": "object", "required": "price"}}
            ).encode(),
            "schema",
        ),
        (b'{"instructions": "x", "json_schema": ', "json"),
        (b"\xff\xfe not utf-8 \x00", "config"),
        (b"[]", "config"),
    ],
    ids=[
        "no-json_schema",
        "no-instructions",
        "bogus-type",
        "required-not-array",
        "truncated-json",
        "binary",
        "not-object",
    ],
)
def test_bad_config(capsys, good, tmp_path, content, mention):
    cfg = tmp_path / "bad-config.json"
    cfg.write_bytes(content)
    assert_usage_error(
        capsys, _argv(good, tmp_path / "out", config=cfg), mention, "bad-config", out_dir=tmp_path / "out"
    )


def test_config_is_a_directory(capsys, good, tmp_path):
    cfg = tmp_path / "cfgdir"
    cfg.mkdir()
    assert_usage_error(capsys, _argv(good, tmp_path / "out", config=cfg), "cfgdir", "config")


def test_non_empty_out_needs_overwrite(capsys, good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_usage_error(capsys, _argv(good, out), "overwrite", str(out))
    assert (out / "precious.txt").read_text() == "keep me"
    assert not (out / "data").exists()

    assert run_main(_argv(good, out) + ["--overwrite"]) == 0
    assert Output(out).stats["num_written"] == 1


def test_empty_out_dir_is_fine(good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert run_main(_argv(good, out)) == 0
    assert (out / "config.json").read_bytes() == CONFIG_BYTES


@pytest.mark.parametrize(
    "extra",
    [
        ["--layout", "nonsense"],
        ["--image-format", "gif"],
        ["--max-shard-size", "lots"],
        ["--runner", "spark"],
    ],
    ids=["layout", "image-format", "max-shard-size", "runner"],
)
def test_bad_option_values_exit_2(capsys, good, tmp_path, extra):
    code = run_main(_argv(good, tmp_path / "out") + extra)
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert "Traceback" not in err
    assert not list((tmp_path / "out").glob("data/*.parquet"))


def test_config_error_from_a_real_process(good, tmp_path):
    """Through `python -m engine`: real stderr, real exit status."""
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"instructions": "x", "json_schema": {"type": "bogus"}}))
    argv = [sys.executable, "-m", "engine"] + _argv(good, tmp_path / "out", config=cfg)
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr


def test_quiet_is_quiet_and_default_reports(capsys, good, tmp_path):
    assert convert(good, tmp_path / "q", quiet=True) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "", f"--quiet still wrote to stderr: {captured.err!r}"
    assert convert(good, tmp_path / "loud", quiet=False) == 0
    err = capsys.readouterr().err
    assert err.strip(), "without --quiet the run should report progress and a summary on stderr"


def _processes_mentioning(marker: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if marker in text:
            found.append(text[:160])
    return found


def test_console_process_with_embedded_ray_exits_clean(tmp_path):
    """`python -m engine` starting its own Ray (ENGINE_RAY_START=eager): the output is complete,
    stderr holds no Ray noise, and no Ray process outlives the command, although the command
    skips the interpreter's teardown and stops Ray's monitor early."""
    names = [f"p{i}" for i in range(40)]
    inp = write_input(
        tmp_path / "in",
        [row(n, f"{n}.jpg") for n in names],
        {
            f"{n}.jpg": imagegen.oriented(6) if i % 3 == 0 else imagegen.noise_jpeg(seed=i)
            for i, n in enumerate(names)
        },
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="eng-ray-", dir="/tmp"))  # short: Ray's socket paths
    try:
        env = dict(os.environ, ENGINE_RAY_START="eager", RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0")
        argv = [
            sys.executable,
            "-m",
            "engine",
            "convert",
            "--manifest",
            str(inp.manifest),
            "--config",
            str(inp.config),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "2",
            "--quiet",
        ]
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.strip() == "", proc.stderr
        out = Output(tmp_path / "out")
        assert out.stats["num_written"] == len(names)
        rows = out.by_id()
        assert sorted(rows) == sorted(names)
        assert out.stats["workers"] == 2
        for i in range(0, len(names), 3):  # rotated on the way: upright quadrants
            imagegen.assert_quadrants(Image.open(io.BytesIO(rows[f"p{i}"]["image"]["bytes"])))
        deadline = time.monotonic() + 10
        while (left := _processes_mentioning(str(ray_tmp))) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"Ray processes outlived the command: {left}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


_LIST_RAY_PROCESSES = """
import json, os, sys
from pathlib import Path
from engine.runners.ray_runner import RayRunner

with RayRunner(workers=1, lazy_start=False) as runner:
    squares = sorted(runner.map_unordered(pow, [(n, 2) for n in range(6)]))
    mine = os.environ["RAY_TMPDIR"]
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if mine in text:
            found.append(text)
print(json.dumps({"squares": squares, "processes": found}))
"""


@pytest.mark.ray
@pytest.mark.parametrize("head", ["lean", "full"])
def test_embedded_ray_starts_without_unused_head_processes(head):
    """An embedded Ray has no autoscaler monitor, log monitor or API server (ENGINE_RAY_HEAD=full
    keeps them): GCS, raylet and workers only, and tasks still run."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="eng-ray-", dir="/tmp"))
    try:
        env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0", ENGINE_RAY_HEAD=head)
        proc = subprocess.run(
            [sys.executable, "-c", _LIST_RAY_PROCESSES],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        assert report["squares"] == [n * n for n in range(6)]
        cmdlines = " ".join(report["processes"])
        assert "gcs_server" in cmdlines and "raylet" in cmdlines
        unused = ["autoscaler/_private/monitor.py", "_private/log_monitor.py", "dashboard/dashboard.py"]
        if head == "lean":
            assert not [p for p in unused if p in cmdlines], report["processes"]
        else:
            assert all(p in cmdlines for p in unused), report["processes"]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# A fresh interpreter in which s3fs cannot be imported, as on an install without the s3 extra.
_WITHOUT_S3FS = (
    "import sys; sys.modules['s3fs'] = None; from engine.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize("where", ["--out", "--manifest", "--config"])
def test_missing_filesystem_package_is_one_line_naming_the_extra(good, tmp_path, where):
    argv = _argv(good, tmp_path / "out")
    argv[argv.index(where) + 1] = "s3://bucket/some/path"
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_S3FS, *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert where in lines[0] and "s3fs" in lines[0] and "engine[s3]" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_unknown_url_protocol_is_a_usage_error(capsys, good, tmp_path):
    assert_usage_error(capsys, _argv(good, "nosuchfs://bucket/out"), "nosuchfs")


def test_mixed_text_and_conversations_rows_exit_2(capsys, tmp_path):
    (tmp_path / "p.jpg").write_bytes(imagegen.jpeg())
    token = "<|reserved_special_token_0|>"
    rows = [
        {"text": f"{token} a caption", "modalities": [{"type": "image", "value": "p.jpg"}]},
        {
            "conversations": [{"role": "user", "content": token}, {"role": "assistant", "content": "x"}],
            "modalities": [{"type": "image", "value": "p.jpg"}],
        },
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "convert",
        "--manifest",
        str(manifest),
        "--out",
        str(tmp_path / "out"),
        "--layout",
        "arrow",
        "--runner",
        "local",
        "--quiet",
    ]
    assert_usage_error(capsys, argv, "mixes")


def test_missing_package_of_a_filesystem_built_into_fsspec_is_named(good, tmp_path):
    """fsspec's own HTTP filesystem needs aiohttp: its message, not a wrong package name."""
    code = (
        "import sys; sys.modules['aiohttp'] = None; from engine.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = _argv(good, tmp_path / "out", manifest="https://127.0.0.1:9/m.jsonl")
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "--manifest" in lines[0] and "aiohttp" in lines[0], lines[0]


@pytest.mark.ray
def test_embedded_ray_ignores_a_cluster_that_ray_start_left_on_the_machine(tmp_path):
    """Without --ray-address the engine starts a Ray of its own, even when `ray start` runs a cluster
    on this machine (plain ``ray.init`` would join that one, and refuse the engine's num_cpus)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="eng-ray-", dir="/tmp"))
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    try:
        started = subprocess.run(
            [ray_cli, "start", "--head", "--num-cpus", "1", "--include-dashboard", "false"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert started.returncode == 0, started.stderr
        names = [f"c{i}" for i in range(6)]
        inp = write_input(
            tmp_path / "in",
            [row(n, f"{n}.jpg") for n in names],
            {f"{n}.jpg": imagegen.noise_jpeg(seed=i) for i, n in enumerate(names)},
        )
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "engine",
                "convert",
                "--manifest",
                str(inp.manifest),
                "--config",
                str(inp.config),
                "--out",
                str(tmp_path / "out"),
                "--workers",
                "2",
                "--quiet",
            ],
            cwd=REPO,
            env=dict(env, ENGINE_RAY_START="eager"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert Output(tmp_path / "out").stats["num_written"] == len(names)
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)
