"""The CPU, as far as int8 speed and exactness go: its model and its int8 instructions."""

from __future__ import annotations

import platform
import re
from pathlib import Path

# CPU features that decide how fast int8 runs (x86: VNNI, AMX; Arm: dot product, int8 matrix multiply)
INT8_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu_info(cpuinfo: str | None = None) -> dict:
    """The CPU's model (x86: its name; Arm: implementer and part numbers) and its int8 features, from
    /proc/cpuinfo (or ``cpuinfo``, its text) where there is one."""
    cpu, features, arm = platform.processor() or platform.machine(), set(), {}
    try:
        for line in (cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()).splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and cpu in (platform.processor(), platform.machine()):
                cpu = value
            elif key in ("flags", "Features"):
                features |= set(value.split())
            elif key in ("CPU implementer", "CPU part"):
                arm.setdefault(key, value)
    except OSError:
        pass
    if arm:
        cpu = f"{platform.machine()} (implementer {arm.get('CPU implementer', '?')}, part {arm.get('CPU part', '?')})"
    return {"cpu": cpu, "cpu_int8_features": [f for f in INT8_FEATURES if f in features]}


def int8_may_saturate(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """An x86 CPU without VNNI (AVX2, AVX-512F): ONNX Runtime's u8×s8 int8 products saturate there
    (its session.x64quantprecision takes the exact u8×u8 path). False with VNNI or AMX, on Arm, and
    where /proc/cpuinfo does not say (Windows, macOS): there ONNX Runtime's default stands. The
    exact path is not free where it is not needed: on this workplace's AVX-512 VNNI EPYC it made
    the INT8 Lite0 2.1x slower at batch 1 (0.47 -> 0.99x FP32) with identical logits."""
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    features = cpu_info(text)["cpu_int8_features"]
    has_flags = re.search(r"^flags\s*:", text, re.MULTILINE) is not None  # x86's list of features is there
    return has_flags and not any(f in features for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
