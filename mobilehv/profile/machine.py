"""The machine a profile ran on: a short slug for folder names and the facts for machine.json."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess

RUNTIME_PACKAGES = ("torch", "onnx", "onnxruntime", "ai-edge-litert", "litert-torch",
                    "coremltools", "numpy")


def cpu_model() -> str:
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def slug(threads: int, cpu: str | None = None) -> str:
    """'Intel(R) Xeon(R) Processor' + 1 thread -> 'intel-xeon-1t';
    'Apple M2 Pro' + 4 -> 'apple-m2-pro-4t'."""
    text = (cpu or cpu_model()).lower()
    text = re.sub(r"\((r|tm)\)|@.*$|\bcpu\b|\bprocessor\b|\d+(th|rd|nd|st) gen\b|\bcore\(tm\)", " ", text)
    words = re.findall(r"[a-z0-9]+", text)
    return "-".join(words[:4] or ["cpu"]) + f"-{threads}t"


def facts(threads: int) -> dict:
    versions = {}
    for pkg in RUNTIME_PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    import mobilehv

    versions["mobilehv"] = mobilehv.__version__
    return {
        "slug": slug(threads),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }
