"""Packaging: one `lmport` import namespace that lives beside Hugging Face's `kernels` (which transformers imports).

The wheel must hold no top-level package but `lmport`; installing it must leave another distribution's files alone;
and HF `kernels` must keep working in the same process as a real lmport generation."""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def build_wheel(out: Path) -> Path:
    """Builds lmport's wheel (no dependencies, with this venv's setuptools) into `out`."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(out)], check=True, capture_output=True, text=True, timeout=300)
    [wheel] = out.glob("lmport-*.whl")
    return wheel


def test_the_wheels_only_top_level_package_is_lmport(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"lmport", f"lmport-{importlib.metadata.version('lmport')}.dist-info"}, top
    for package in ("engine", "kernels", "bridge"):
        assert f"lmport/{package}/__init__.py" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{sorted(top)[1]}/entry_points.txt").decode()
    assert "lmport = lmport.bridge.cli:main" in entry_points


def record_mismatches(site: Path, distribution: str) -> list[str]:
    """Files of `distribution` (from its RECORD) whose sha256 no longer matches, or that are gone."""
    [info] = site.glob(f"{distribution}-*.dist-info")
    bad = []
    for path, digest, _size in csv.reader((info / "RECORD").read_text().splitlines()):
        if not digest:
            continue
        algorithm, _, expected = digest.partition("=")
        file = site / path
        if not file.exists():
            bad.append(f"{path}: missing")
            continue
        actual = base64.urlsafe_b64encode(hashlib.new(algorithm, file.read_bytes()).digest()).rstrip(b"=").decode()
        if actual != expected:
            bad.append(f"{path}: changed")
    return bad


@pytest.mark.slow
def test_installing_lmport_beside_hf_kernels_leaves_their_files_untouched(tmp_path):
    """A fresh venv gets HF `kernels` (from the package index, the version this venv holds), then lmport's wheel:
    every file of `kernels` still matches its RECORD, and `kernels` and `lmport` each import from their own
    directory."""
    wheel = build_wheel(tmp_path / "wheel")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, f"kernels=={importlib.metadata.version('kernels')}"], check=True, timeout=600)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    assert record_mismatches(site, "kernels") == []
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, timeout=300)
    assert record_mismatches(site, "kernels") == []
    assert not (site / "engine").exists() and not (site / "bridge").exists()
    # lmport.engine.config imports no torch (it is what the manifest and the CLI read), so it imports here.
    check = textwrap.dedent("""
        import importlib.util, kernels, lmport, lmport.engine.config
        assert kernels.__file__.endswith("site-packages/kernels/__init__.py"), kernels.__file__
        assert importlib.util.find_spec("lmport.kernels").origin.endswith("site-packages/lmport/kernels/__init__.py")
        print(kernels.__version__, "ok")
    """)
    done = subprocess.run([str(python), "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr


@pytest.mark.slow
def test_hf_kernels_and_a_real_lmport_generation_in_one_process():
    """transformers' hub-kernels integration, a real generation on the bundled model, and HF `kernels`' public API
    (a hub-kernel layer kernelized with no mapping falls back to its own forward) all in one process, run from the
    repository root, where a top-level `kernels/` folder would shadow HF's."""
    code = textwrap.dedent("""
        import torch
        import transformers.integrations.hub_kernels
        import kernels
        from lmport.engine import LLM, SamplingParams
        llm = LLM("smollm2", max_model_len=256)
        out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
        assert out[0].outputs[0].token_ids, out
        llm.shutdown()

        @kernels.use_kernel_forward_from_hub("SiluAndMul")
        class SiluAndMul(torch.nn.Module):
            def forward(self, x):
                half = x.shape[-1] // 2
                return torch.nn.functional.silu(x[..., :half]) * x[..., half:]

        with kernels.use_kernel_mapping({}):
            layer = kernels.kernelize(torch.nn.Sequential(SiluAndMul()), mode=kernels.Mode.INFERENCE, device="cpu")
        x = torch.randn(3, 8)
        assert torch.equal(layer(x), SiluAndMul()(x))
        assert "site-packages" in kernels.__file__, kernels.__file__
        print("generated:", repr(out[0].outputs[0].text), "kernels", kernels.__version__)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "generated:" in done.stdout


def test_the_lock_pins_every_dependency_of_lmport_transitively():
    """Every distribution that lmport (with its test extra) needs, directly or through another, has a pin in
    requirements.lock, so `make test` installs nothing the lock does not name."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = {canonicalize_name(line.split("==")[0]): line.split("==")[1]
            for line in (REPO / "requirements.lock").read_text().splitlines() if line and not line.startswith("#")}
    needed, todo = set(), [("lmport", {"test"})]
    while todo:
        name, extras = todo.pop()
        for spec in importlib.metadata.requires(name) or []:
            requirement = Requirement(spec)
            if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in extras or {""}):
                continue
            key = canonicalize_name(requirement.name)
            if key not in needed:
                needed.add(key)
                todo.append((requirement.name, set(requirement.extras)))
    assert needed - lock.keys() == set()
    assert lock["torch"].startswith("2.13.0")
