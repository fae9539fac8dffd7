"""What a result was produced with: library versions, the machine, and where a trial was trained."""

from __future__ import annotations

import os
import platform
import socket
import sys
from importlib import metadata

from .records import TrainedOn


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


def trained_on(kernels: str, device: str = "cpu") -> TrainedOn:
    """This process's host, CPU and the build of the step that trained with kernels here: called
    where a trial trains (a Ray worker's host is not the driver's, nor its native build)."""
    vector_bytes = compiler = target = None
    flags = ""
    if kernels == "native":
        from . import native

        lib = native.load()
        vector_bytes = lib.ln_vector_bytes() if lib is not None else None
        compiler, flags = native.compiler(), " ".join(native.extra_flags())
        target = " ".join(native.build_target() or ())
    info = machine_info(device)
    return TrainedOn(host=socket.gethostname(), cpu=info["cpu"], kernels=kernels,
                     vector_bytes=vector_bytes, compiler=compiler, target=target, flags=flags,
                     platform=info["platform"],
                     cpu_count=info["cpu_count"], gpu=info.get("gpu"))
