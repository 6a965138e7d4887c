"""The `structure-ops` command: help, version, and user mistakes as one-line errors with exit code 2.

Each mistake is checked through ``main(argv)``: exit code 2, exactly one line on stderr naming the problem,
no traceback. The real entry point runs in a subprocess for help, --version and one error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from structure_ops.cli import main as cli

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, argv, *needles) -> str:
    code = cli(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{argv}: expected one line, got:\n{err}"
    assert "Traceback" not in err and lines[0].startswith("structure-ops")
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _precomputed_run(tmp_path, name="run") -> str:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    save_file({"a": x, "b": x.tanh()}, str(tmp_path / "img.safetensors"))
    save_file({"t": x @ torch.randn(6, 5, generator=g)}, str(tmp_path / "txt.safetensors"))
    run = str(tmp_path / name)
    assert cli(["extract", "--image-features", str(tmp_path / "img.safetensors"), "--text-features",
                str(tmp_path / "txt.safetensors"), "--out", run]) == 0
    return run


TRAIN = ["--layers", "a,t", "--epochs", "2", "--dim", "4", "--lr", "1e-2", "--batch-size", "16", "--warmup", "1"]


# ---------------------------------------------------------------------------------------------------------
def test_entry_point_help_version_and_one_error():
    exe = [sys.executable, "-m", "structure_ops"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bare = subprocess.run(exe, capture_output=True, text=True, env=env, timeout=120)
    assert bare.returncode == 0 and bare.stdout.startswith("usage: structure-ops") and "zero-shot" in bare.stdout
    ver = subprocess.run([*exe, "--version"], capture_output=True, text=True, env=env, timeout=120)
    from structure_ops import __version__

    assert ver.returncode == 0 and ver.stdout.strip() == f"structure-ops {__version__}"
    bad = subprocess.run([*exe, "train", "--run", "/nonexistent-run-folder"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert "manifest.json not found" in bad.stderr


def test_help_shows_defaults(capsys):
    for cmd, needles in (("train", ("default: 512", "default: auto")), ("extract", ("default: minilm",)),
                         ("zero-shot", ("default: 3",)), ("embed", ("default: 32",))):
        with pytest.raises(SystemExit) as e:
            cli([cmd, "--help"])
        assert e.value.code == 0
        out = " ".join(capsys.readouterr().out.split())
        for n in needles:
            assert n in out, (cmd, n)


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["train", "--run", "r", "--epochs", "many"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "--epochs" in err
    with pytest.raises(SystemExit) as e:
        cli(["no-such-command"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_and_backend_without_cuda(tmp_path, capsys):
    run = _precomputed_run(tmp_path)
    _one_line_error(capsys, ["train", "--run", run, *TRAIN, "--device", "cuda"], "--device cuda", "CUDA is not available")
    _one_line_error(capsys, ["train", "--run", run, *TRAIN, "--backend", "cuda"], "--backend cuda", "cannot run")
    _one_line_error(capsys, ["demo", "--backend", "cuda", "--out", str(tmp_path / "d")], "--backend cuda")
    _one_line_error(capsys, ["select-layers", "--run", run, "--backend", "cuda"], "--backend cuda")


def test_bad_device_and_backend_names(tmp_path, capsys):
    run = _precomputed_run(tmp_path)
    _one_line_error(capsys, ["train", "--run", run, *TRAIN, "--device", "gpu0"], "--device 'gpu0'")
    _one_line_error(capsys, ["train", "--run", run, *TRAIN, "--backend", "fast"], "--backend", "'fast'")


def test_out_naming_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    _one_line_error(capsys, ["demo", "--quick", "--out", str(f)], "is a file")
    _one_line_error(capsys, ["extract", "--image-features", "i.safetensors", "--text-features", "t.safetensors",
                             "--out", str(f)], "is a file")
    _one_line_error(capsys, ["export", "--run", str(tmp_path), "--out", str(f)], "is a file")
    _one_line_error(capsys, ["extract", "--image-features", "i.safetensors", "--out", str(f / "below")], "is a file")
    _one_line_error(capsys, ["embed", "--model", str(tmp_path), "--texts", "a", "--out", str(tmp_path)], "is a folder")


def test_read_only_run_folder(tmp_path, capsys, monkeypatch):
    """A run folder the user cannot write: refused up front. As root (who may write anywhere) the check is
    exercised by reporting the folder as unwritable, which is what ``os.access`` says for other users."""
    run = _precomputed_run(tmp_path)
    os.chmod(run, 0o555)
    try:
        if os.geteuid() == 0:
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == Path(run).absolute() and mode & os.W_OK
                                else real(p, mode, **k))
        for argv in (["train", "--run", run, *TRAIN], ["select-layers", "--run", run], ["evaluate", "--run", run]):
            _one_line_error(capsys, argv, "read-only", run)
        assert not (Path(run) / "train").exists()
    finally:
        os.chmod(run, 0o755)


def test_permission_error_during_work_is_one_line(tmp_path, capsys, monkeypatch):
    """Whatever the up-front checks miss: an OSError while writing still ends as one line naming the file."""
    import tempfile

    run = _precomputed_run(tmp_path)

    def deny(*_a, dir=None, **_k):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", deny)  # every atomic write of the package starts with mkstemp
    line = _one_line_error(capsys, ["select-layers", "--run", run], "permission denied")
    assert run in line


def test_truncated_feature_file_in_train(tmp_path, capsys):
    run = _precomputed_run(tmp_path)
    feats = sorted(Path(run).glob("**/*image*.safetensors")) or sorted(Path(run).glob("**/*.safetensors"))
    data = feats[0].read_bytes()
    feats[0].write_bytes(data[: len(data) // 2])
    _one_line_error(capsys, ["train", "--run", run, *TRAIN], str(feats[0].name))


def test_foreign_checkpoint_on_resume(tmp_path, capsys):
    run = _precomputed_run(tmp_path)
    assert cli(["train", "--run", run, *TRAIN]) == 0
    ckpts = list(Path(run).glob("**/checkpoint.pt"))
    assert ckpts, "train wrote no checkpoint"
    for content in (b"not a checkpoint at all", None):
        for c in ckpts:
            if content is None:
                torch.save({"model": {"w": torch.zeros(2)}}, c)  # a valid torch file, not ours
            else:
                c.write_bytes(content)
        capsys.readouterr()
        _one_line_error(capsys, ["train", "--run", run, *TRAIN, "--resume"], "cannot resume")


def test_mistyped_model_folder_fails_before_any_hub_lookup(tmp_path, capsys, monkeypatch):
    import structure_ops.train.aligned as aligned

    (tmp_path / "imgs").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "pairs.csv").write_text("image,caption\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(aligned, "hub_reachable", lambda *a, **k: pytest.fail("a hub lookup for a local path"))
    base = ["extract", "--captions", "pairs.csv", "--images", "imgs", "--out", "run", "--text", "minilm"]
    for typo in ("./modles/vit", "models/vti", "/no/such/folder/vit", "vit-base"):
        t = time.perf_counter()
        _one_line_error(capsys, [*base, "--vision", typo], typo, "no such local folder")
        assert time.perf_counter() - t < 5
    (tmp_path / "models" / "empty").mkdir()
    _one_line_error(capsys, [*base, "--vision", "models/empty"], "no config.json")


def test_offline_hub_name_fails_fast(tmp_path, capsys, monkeypatch):
    (tmp_path / "pairs.csv").write_text("image,caption\n")
    base = ["extract", "--captions", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "run"), "--text", "minilm"]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", c.HF_HUB_OFFLINE)  # restored after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    _one_line_error(capsys, [*base, "--vision", "someorg/not-cached-model"], "not in the local Hugging Face cache",
                    "HF_HUB_OFFLINE")
    # no HF_HUB_OFFLINE, but the hub does not answer (a closed local port): refused after the short probe
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    _one_line_error(capsys, [*base, "--vision", "someorg/not-cached-model"], "unreachable")
    assert time.perf_counter() - t < 15


def test_bench_never_writes_into_the_source_tree(monkeypatch, capsys):
    import structure_ops.cli as cli_mod

    calls = []
    monkeypatch.setattr(cli_mod.subprocess, "call", lambda args: calls.append(args) or 0)
    if not (REPO / "benchmarks" / "bench_structure.py").is_file():
        pytest.skip("not a source checkout")
    with pytest.raises(SystemExit):
        cli(["bench", "structure", "--quick"])
    args = calls[-1]
    out = Path(args[args.index("--out") + 1]).resolve()
    assert REPO not in out.parents and out != REPO
    with pytest.raises(SystemExit):
        cli(["bench", "structure", "--out", "mine"])
    assert calls[-1].count("--out") == 1 and calls[-1][-1] == "mine"


def test_embed_and_zero_shot_input_errors(tmp_path, capsys):
    _one_line_error(capsys, ["embed", "--model", str(tmp_path), "--images", str(tmp_path / "none.png"), "--out",
                             str(tmp_path / "e.safetensors")], "none.png")
    _one_line_error(capsys, ["embed", "--model", str(tmp_path), "--texts", "a", "--out", str(tmp_path / "e.npy")],
                    ".safetensors")
    _one_line_error(capsys, ["embed", "--model", str(tmp_path), "--texts", "a", "--out", str(tmp_path / "e.safetensors")],
                    "aligned.json")
    _one_line_error(capsys, ["zero-shot", "--run", str(tmp_path), "--images", str(tmp_path)], "--classes")
    _one_line_error(capsys, ["zero-shot", "--run", str(tmp_path), "--images", str(tmp_path), "--classes", "cat"],
                    "at least 2 classes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_backend_from_the_environment_that_cannot_run(tmp_path, capsys, monkeypatch):
    run = _precomputed_run(tmp_path)
    monkeypatch.setenv("STRUCTURE_OPS_BACKEND", "cuda")
    _one_line_error(capsys, ["train", "--run", run, *TRAIN], "STRUCTURE_OPS_BACKEND", "cannot run them")
