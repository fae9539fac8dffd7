"""What a result was produced with: library versions and the machine."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in ("lenetlab", "torch", "numpy", "torchmetrics", "matplotlib", "scipy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
