"""The wheels that the lent GPU machine lacks, gathered in `.whl/`, and an offline check that they install there.

The lent machine (an H200; its image as the device notes read it, 2026-11) has Python 3.12, torch 2.11 (cu130),
transformers 5.17, accelerate 1.15, triton 3.6, peft, pyarrow and the rest of `DEVICE_PACKAGES`, but no trl,
datasets, deepspeed, liger-kernel or math-verify, and an older transformers than the package needs (>= 5.20).
Nothing outside it can be reached, and one call carries 64 MiB in all (working tree and carried paths). So the
bundle is exactly what is missing there, pinned to the versions this test suite runs with (`PINS`, py3.12 manylinux
wheels), DeepSpeed built here as a pure-Python wheel (PyPI has its sdist only; `DS_BUILD_OPS=0`: it compiles what it
needs on first use), and the package itself. pyarrow (~45 MB) is on the image and not carried.

    python benchmarks/gpu_bundle.py            # build .whl/, measure it, check that it resolves offline for py3.12
    # then on the lent machine (a device run carrying ".whl"): bash benchmarks/gpu_check.sh

The check installs nothing real: in a Python 3.12 virtual environment whose site-packages holds metadata-only
stand-ins for the device's packages (known versions where the notes give them, else this machine's version, said
"assumed"), it runs the device's install command with `--dry-run --no-index`, so pip's own resolver says whether
the bundle plus the image satisfy every requirement.
"""

from __future__ import annotations

import argparse
import configparser
import glob
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL_DIR = os.path.join(ROOT, ".whl")
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CALL_LIMIT_MIB = 64  # working tree + carried paths, per device call
BUNDLE_GOAL_MIB = 60
# What the device's install command asks for: the package with the extras the GPU check uses.
INSTALL_TARGET = "trl-laser[deepspeed,liger]"
# Versions the device notes give (its pip list, 2026-11).
DEVICE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}
# Every Python package of the device image (the device notes' list, 2026-11-17).
DEVICE_PACKAGES = frozenset(
    canonicalize_name(name)
    for name in """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
    cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
    fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
    joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
    markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
    mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
    nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
    nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
    protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
    requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
    tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
    """.split()
)
# Missing on the device (or too old there), pinned to what the test suite runs with.
PINS = {
    "transformers": "5.23.0",  # the device's 5.17 is below the package's >= 5.20
    "trl": "1.16.0",
    "datasets": "5.2.0",
    "dill": "0.4.1",
    "multiprocess": "0.70.19",
    "fsspec": "2026.9.0",  # datasets caps fsspec; taken only if the device's is newer
    "math-verify": "0.9.0",
    "latex2sympy2-extended": "1.11.0",
    "antlr4-python3-runtime": "4.13.2",
    "liger-kernel": "0.8.5",
    "hjson": "3.1.0",
    "pydantic": "2.13.4",
    "pydantic-core": "2.46.4",
    "annotated-types": "0.7.0",
    "typing-inspection": "0.4.2",
    "peft": "0.21.2",  # taken only if the device's is older than the package's >= 0.17
    "regex": "2026.5.9",  # taken only if the device's is older than transformers' >= 2025.10.22
}
# Built here: DeepSpeed has no wheel on PyPI; without its ops it is pure Python.
DEEPSPEED = "0.19.8"


def package_requirements(setup_cfg: str, extras: Iterable[str] = ("deepspeed", "liger")) -> list[Requirement]:
    """The package's install requirements and those of `extras`, from setup.cfg."""
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    lines = config["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += config["options.extras_require"][extra].splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]


def uncovered(requirements: Iterable[Requirement]) -> list[str]:
    """Requirements that neither the device image nor the bundle provides, or that a known device version fails
    and no pin replaces (a pin must satisfy them)."""
    gaps = []
    for req in requirements:
        name = canonicalize_name(req.name)
        pinned = {canonicalize_name(k): v for k, v in {**PINS, "deepspeed": DEEPSPEED}.items()}.get(name)
        if pinned is not None:
            if not req.specifier.contains(pinned, prereleases=True):
                gaps.append(f"{req} (pinned {pinned})")
        elif name not in DEVICE_PACKAGES:
            gaps.append(f"{req} (not on the device, not bundled)")
        elif name in DEVICE_VERSIONS and not req.specifier.contains(DEVICE_VERSIONS[name], prereleases=True):
            gaps.append(f"{req} (device has {DEVICE_VERSIONS[name]})")
    return gaps


def wheel_requirements(path: str) -> list[Requirement]:
    """A wheel's requirements that apply on the device (Python 3.12, Linux), its own extras' excluded."""
    with zipfile.ZipFile(path) as wheel:
        metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        text = wheel.read(metadata).decode()
    environment = {**default_environment(), "python_version": DEVICE_PYTHON, "python_full_version": "3.12.3"}
    requirements = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate({**environment, "extra": ""}):
                requirements.append(req)
    return requirements


def run(command: list[str], **kwargs) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def build(wheel_dir: str) -> None:
    """Download the pins, build DeepSpeed's and the package's wheels; one version of each name in `wheel_dir`."""
    shutil.rmtree(wheel_dir, ignore_errors=True)
    os.makedirs(wheel_dir)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    pins = [f"{name}=={version}" for name, version in PINS.items()]
    run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", wheel_dir, *pins]
    )
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["-w", wheel_dir, f"deepspeed=={DEEPSPEED}"],
        env=env,
    )
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", wheel_dir, ROOT])
    names = sorted(os.listdir(wheel_dir))
    deepspeed = [n for n in names if n.startswith("deepspeed-")]
    if deepspeed != [f"deepspeed-{DEEPSPEED}-py3-none-any.whl"]:
        raise SystemExit(f"DeepSpeed's wheel is not the pure-Python one (DS_BUILD_OPS=0): {deepspeed}")


def tree_mib() -> float:
    """What a device call carries besides the bundle: tracked and untracked, not ignored, files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = [os.path.join(ROOT, p.decode()) for p in listed if p]
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) / 2**20


def bundle_report(wheel_dir: str) -> dict:
    """Size of the bundle and of the working tree, and the requirements of the bundle the image must meet."""
    wheels = sorted(n for n in os.listdir(wheel_dir) if n.endswith(".whl"))
    size = sum(os.path.getsize(os.path.join(wheel_dir, n)) for n in wheels) / 2**20
    bundled = {canonicalize_name(re.split(r"-\d", n, maxsplit=1)[0].replace("_", "-")) for n in wheels}
    outside = [
        req
        for n in wheels
        for req in wheel_requirements(os.path.join(wheel_dir, n))
        if canonicalize_name(req.name) not in bundled
    ]
    return {
        "wheels": wheels,
        "bundle_mib": round(size, 2),
        "tree_mib": round(tree_mib(), 2),
        "gaps": sorted(set(uncovered(outside))),
        "assumed": sorted(
            {f"{req}" for req in outside if canonicalize_name(req.name) not in DEVICE_VERSIONS and str(req.specifier)}
        ),
    }


def stand_in_version(name: str) -> str:
    """The device's version of `name` if the notes give it, else this machine's (an assumption), else 0."""
    if name in DEVICE_VERSIONS:
        return DEVICE_VERSIONS[name]
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "0"


def check_resolution(wheel_dir: str, python: str) -> bool:
    """pip's resolver, offline, for Python 3.12 against stand-ins of the device's packages: the device command."""
    with tempfile.TemporaryDirectory() as venv:
        run([python, "-m", "venv", venv])
        site = subprocess.run(
            [os.path.join(venv, "bin", "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for name in sorted(DEVICE_PACKAGES - {"pip", "setuptools", "wheel"}):
            folder = f"{name.replace('-', '_')}-{stand_in_version(name)}.dist-info"
            files = {
                "METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {stand_in_version(name)}\n",
                "INSTALLER": "pip\n",
                "RECORD": "".join(f"{folder}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")),
            }
            os.makedirs(os.path.join(site, folder))
            for file_name, text in files.items():  # a RECORD of its own files: an upgrade removes the stand-in
                with open(os.path.join(site, folder, file_name), "w", encoding="utf-8") as f:
                    f.write(text)
        python_bin = os.path.join(venv, "bin", "python")
        report = os.path.join(venv, "report.json")
        command = [python_bin, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", wheel_dir]
        command += ["--report", report, "--quiet", INSTALL_TARGET]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_FIND_LINKS", "PIP_INDEX_URL")}
        try:
            run(command, env=env)
        except subprocess.CalledProcessError:
            return False
        with open(report, encoding="utf-8") as f:
            planned = [item["metadata"] for item in json.load(f)["install"]]
        print("would install: " + ", ".join(f"{m['name']} {m['version']}" for m in planned))
        # Then the device's own install half, for real, into the stand-ins.
        script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
        results = os.path.join(venv, "results")
        env = {**env, "PYTHON": python_bin, "OUT": results}
        done = subprocess.run(["bash", script, "--install-only"], cwd=os.path.dirname(wheel_dir), env=env)
        return done.returncode == 0


def find_python312() -> str | None:
    """A Python 3.12 that runs: `python3.12` on the PATH, else one of pyenv's."""
    candidates = [
        shutil.which("python3.12"),
        *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12"))),
    ]
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel-dir", default=WHEEL_DIR)
    parser.add_argument("--no-build", action="store_true", help="check an existing bundle only")
    parser.add_argument("--python312", default=find_python312(), help="for the resolution check")
    args = parser.parse_args()
    if not args.no_build:
        build(args.wheel_dir)
    report = bundle_report(args.wheel_dir)
    total = report["bundle_mib"] + report["tree_mib"]
    print(f"{len(report['wheels'])} wheels, {report['bundle_mib']:.1f} MiB; working tree {report['tree_mib']:.1f} MiB")
    print(f"one device call carries {total:.1f} of {CALL_LIMIT_MIB} MiB")
    for line in report["assumed"]:
        print(f"assumed on the device image (version unknown): {line}")
    problems = [f"not provided: {gap}" for gap in report["gaps"]]
    if report["bundle_mib"] > BUNDLE_GOAL_MIB or total > CALL_LIMIT_MIB:
        problems.append(f"too large: bundle {report['bundle_mib']:.1f} MiB, call {total:.1f} MiB")
    if args.python312 is None:
        print("no python3.12 here: the offline resolution check is skipped")
    elif not check_resolution(args.wheel_dir, args.python312):
        problems.append("pip could not resolve the install offline for Python 3.12 (see above)")
    for problem in problems:
        print(problem)
    if problems:
        raise SystemExit(1)
    print("bundle ready: carry .whl and run `bash benchmarks/gpu_check.sh` on the GPU machine")


if __name__ == "__main__":
    main()
