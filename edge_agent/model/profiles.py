"""Device profiles: what a target can run, loaded from ``device_profiles/<name>.toml``.

A profile says which artifact formats a device prefers, which int8 schemes to try in order, the
onnxruntime providers and thread count to use, and when the device throttles. The converter reads
it to decide what to build; the agent reads it to decide what to load.

Profiles are searched in :func:`profile_dirs` order: ``$EDGE_PROFILES_DIR`` (``os.pathsep``
separated), the ``device_profiles/`` directory shipped next to the package, then
``/etc/edge-agent/profiles``. The first file named ``<name>.toml`` wins.

Every error is a :class:`~edge_agent.errors.ProfileError` whose message is one line of the form
``<file>: [section] key = value: what is wrong``.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edge_agent.errors import ProfileError
from edge_agent.model.formats import ARTIFACT_FORMATS, INT8_SCHEMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on the Python 3.9/3.10 devices
    import tomli as tomllib

ARCHES = ("aarch64", "x86_64")
#: CPU features a profile may list, per architecture.
ARCH_FEATURES = {
    "aarch64": ("neon", "dotprod", "i8mm", "fp16"),
    "x86_64": ("avx2", "avx512", "vnni"),
}
CPU_FEATURES = ARCH_FEATURES["aarch64"] + ARCH_FEATURES["x86_64"]
SYSTEM_PROFILES_DIR = Path("/etc/edge-agent/profiles")
PACKAGE_PROFILES_DIR = Path(__file__).resolve().parents[2] / "device_profiles"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_INT8_FORMATS = tuple(f for f in ARTIFACT_FORMATS if "int8" in f)

# DeviceProfile field -> where it lives in the TOML file (section, key); section "" is top level.
_FIELD_KEYS = {
    "name": ("", "name"),
    "description": ("", "description"),
    "arch": ("cpu", "arch"),
    "cpu": ("cpu", "core"),
    "cpu_features": ("cpu", "features"),
    "cores": ("cpu", "cores"),
    "ram_mb": ("cpu", "ram_mb"),
    "formats": ("artifacts", "formats"),
    "int8_schemes": ("quantization", "int8_schemes"),
    "threads": ("runtime", "threads"),
    "onnx_providers": ("runtime", "onnx_providers"),
    "fp16": ("runtime", "fp16"),
    "throttle_c": ("thermal", "throttle_c"),
    "critical_c": ("thermal", "critical_c"),
}


def _label(section: str, key: str) -> str:
    return f"[{section}] {key}" if section else key


def _show(value: object) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _bad(source: str, field_name: str, value: object, message: str) -> ProfileError:
    label = _label(*_FIELD_KEYS[field_name])
    prefix = f"{source}: " if source else ""
    return ProfileError(f"{prefix}{label} = {_show(value)}: {message}")


@dataclass(frozen=True)
class ThermalLimits:
    """Temperatures in °C: above ``throttle_c`` the agent slows down, above ``critical_c`` it
    stops inferring."""

    throttle_c: float
    critical_c: float

    def __post_init__(self) -> None:
        for name in ("throttle_c", "critical_c"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise _bad("", name, value, "must be a temperature in °C above 0")
        if self.throttle_c >= self.critical_c:
            raise _bad(
                "",
                "throttle_c",
                self.throttle_c,
                f"must be below [thermal] critical_c = {self.critical_c!r}",
            )


@dataclass(frozen=True)
class DeviceProfile:
    """One target device. Construct with :func:`load_profile`, :func:`parse_profile` or
    :func:`detect_host_profile`; direct construction validates the same rules."""

    name: str
    description: str
    arch: str  # "aarch64" | "x86_64"
    cpu: str  # core name, e.g. "cortex-a72"
    cpu_features: tuple[str, ...]  # from CPU_FEATURES, valid for arch
    cores: int
    ram_mb: int
    formats: tuple[str, ...]  # preferred artifact formats, best first
    int8_schemes: tuple[str, ...]  # int8 schemes to try, best first
    threads: int  # onnxruntime intra-op threads, at most cores
    onnx_providers: tuple[str, ...]  # onnxruntime execution providers, in priority order
    fp16: bool  # the device has a GPU fp16 path
    thermal: ThermalLimits
    source: str  # the file it was loaded from, or "detected"

    def __post_init__(self) -> None:
        src = self.source
        if not _NAME_RE.match(self.name):
            raise _bad(src, "name", self.name, "use lowercase letters, digits, '.', '-' and '_'")
        if not self.cpu:
            raise _bad(src, "cpu", self.cpu, "must not be empty")
        if self.arch not in ARCHES:
            raise _bad(src, "arch", self.arch, f"unknown architecture (known: {', '.join(ARCHES)})")
        _check_members(src, "cpu_features", self.cpu_features, CPU_FEATURES, "feature")
        for feature in self.cpu_features:
            if feature not in ARCH_FEATURES[self.arch]:
                raise _bad(
                    src,
                    "cpu_features",
                    self.cpu_features,
                    f"'{feature}' is not an {self.arch} feature "
                    f"(known for {self.arch}: {', '.join(ARCH_FEATURES[self.arch])})",
                )
        for name in ("cores", "ram_mb", "threads"):
            if getattr(self, name) <= 0:
                raise _bad(src, name, getattr(self, name), "must be > 0")
        if self.threads > self.cores:
            raise _bad(
                src,
                "threads",
                self.threads,
                f"must be <= [cpu] cores = {self.cores} (oversubscribed)",
            )
        _check_members(src, "formats", self.formats, ARTIFACT_FORMATS, "format")
        if not self.formats:
            raise _bad(src, "formats", self.formats, "list at least one artifact format")
        _check_members(src, "int8_schemes", self.int8_schemes, INT8_SCHEMES, "scheme")
        int8 = [f for f in self.formats if f in _INT8_FORMATS]
        if int8 and not self.int8_schemes:
            raise _bad(
                src,
                "int8_schemes",
                self.int8_schemes,
                f"[artifacts] formats lists {int8[0]}; list at least one int8 scheme to try",
            )
        if not self.onnx_providers:
            raise _bad(
                src,
                "onnx_providers",
                self.onnx_providers,
                'list at least one, e.g. ["CPUExecutionProvider"]',
            )
        for provider in self.onnx_providers:
            if not provider.endswith("ExecutionProvider"):
                raise _bad(
                    src,
                    "onnx_providers",
                    self.onnx_providers,
                    f"{provider!r} is not an onnxruntime provider name "
                    "(they end in 'ExecutionProvider', e.g. 'CPUExecutionProvider')",
                )
        if len(set(self.onnx_providers)) != len(self.onnx_providers):
            raise _bad(src, "onnx_providers", self.onnx_providers, "lists a provider twice")

    def has(self, feature: str) -> bool:
        """True if the CPU has ``feature`` (one of :data:`CPU_FEATURES`)."""
        if feature not in CPU_FEATURES:
            raise ProfileError(
                f"unknown CPU feature {feature!r} (known: {', '.join(CPU_FEATURES)})"
            )
        return feature in self.cpu_features


def _check_members(
    source: str, field_name: str, values: tuple[str, ...], known: Iterable[str], what: str
) -> None:
    known = tuple(known)
    for value in values:
        if value not in known:
            raise _bad(
                source,
                field_name,
                values,
                f"unknown {what} {value!r} (known: {', '.join(known)})",
            )
    if len(set(values)) != len(values):
        dup = next(v for v in values if values.count(v) > 1)
        raise _bad(source, field_name, values, f"lists {dup!r} twice")


def recommended_int8_schemes(*, arch: str, features: Iterable[str]) -> tuple[str, ...]:
    """The int8 schemes to try on a CPU, best first (the rules the shipped profiles encode).

    - x86-64 with VNNI: u8s8 has no saturation problem, so plain u8s8 first.
    - x86-64 without VNNI (AVX2, AVX-512F): u8s8 can saturate (onnxruntime docs), so
      reduce_range first.
    - aarch64 with dotprod: SDOT makes s8s8 fastest.
    - aarch64 without dotprod: uint8 activations (u8s8, u8u8).
    """
    feats = set(features)
    if arch == "x86_64":
        if "vnni" in feats:
            return ("u8s8-qop", "u8s8-rr-qop", "s8s8-qop", "s8s8-qdq", "u8s8-rr-qdq")
        return ("u8s8-rr-qop", "u8s8-rr-qdq", "s8s8-qdq")
    if "dotprod" in feats:
        return ("s8s8-qop", "u8s8-qop", "s8s8-qdq")
    return ("u8s8-qop", "u8u8-qop", "s8s8-qdq")


# --- loading -------------------------------------------------------------------------------


def profile_dirs() -> list[Path]:
    """Directories searched for ``<name>.toml``, first match wins (existing or not)."""
    dirs = [Path(p) for p in os.environ.get("EDGE_PROFILES_DIR", "").split(os.pathsep) if p]
    return [*dirs, PACKAGE_PROFILES_DIR, SYSTEM_PROFILES_DIR]


def list_profiles() -> list[str]:
    """Names of every profile found in :func:`profile_dirs`, sorted."""
    names: set[str] = set()
    for directory in profile_dirs():
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*.toml") if p.is_file())
    return sorted(names)


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a profile by name (searched in :func:`profile_dirs`) or from a ``.toml`` path."""
    if isinstance(name_or_path, Path) or str(name_or_path).endswith(".toml"):
        return _load_file(Path(name_or_path), expect_name=None)
    name = name_or_path
    if _NAME_RE.match(name):
        for directory in profile_dirs():
            path = directory / f"{name}.toml"
            if path.is_file():
                return _load_file(path, expect_name=name)
    known = ", ".join(list_profiles()) or "none found"
    raise ProfileError(
        f"unknown device profile {name!r} (known: {known}); "
        "give one of these or a path to a .toml file"
    )


def _load_file(path: Path, *, expect_name: str | None) -> DeviceProfile:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: invalid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc}") from exc
    profile = parse_profile(data, source=str(path))
    if expect_name is not None and profile.name != expect_name:
        raise _bad(
            str(path), "name", profile.name, f"must match the file name {expect_name!r}; rename one"
        )
    return profile


# section -> its keys, in file order ("" is the top level)
_SECTIONS = {
    section: tuple(k for s, k in _FIELD_KEYS.values() if s == section)
    for section, _ in _FIELD_KEYS.values()
}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


_TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "arch": (lambda v: isinstance(v, str), "a string"),
    "cpu": (lambda v: isinstance(v, str), "a string"),
    "cpu_features": (_is_str_list, "a list of strings"),
    "cores": (_is_int, "an integer"),
    "ram_mb": (_is_int, "an integer"),
    "formats": (_is_str_list, "a list of strings"),
    "int8_schemes": (_is_str_list, "a list of strings"),
    "threads": (_is_int, "an integer"),
    "onnx_providers": (_is_str_list, "a list of strings"),
    "fp16": (lambda v: isinstance(v, bool), "true or false"),
    "throttle_c": (_is_number, "a number"),
    "critical_c": (_is_number, "a number"),
}


def parse_profile(data: Mapping[str, Any], *, source: str) -> DeviceProfile:
    """Build a profile from parsed TOML. ``source`` (a file path) prefixes every error."""
    top_level = _SECTIONS[""]
    tables = [s for s in _SECTIONS if s]
    for key, value in data.items():
        if key in tables:
            if not isinstance(value, Mapping):
                raise ProfileError(f"{source}: {key} = {value!r}: must be a [{key}] table")
            unknown = [k for k in value if k not in _SECTIONS[key]]
            if unknown:
                raise ProfileError(
                    f"{source}: [{key}] {unknown[0]} = {value[unknown[0]]!r}: unknown key "
                    f"(known in [{key}]: {', '.join(_SECTIONS[key])})"
                )
        elif key not in top_level:
            raise ProfileError(
                f"{source}: {key} = {value!r}: unknown key "
                f"(known: {', '.join([*top_level, *(f'[{s}]' for s in tables)])})"
            )
    values: dict[str, Any] = {}
    for field_name, (section, key) in _FIELD_KEYS.items():
        table = data.get(section, {}) if section else data
        if key not in table:
            raise ProfileError(f"{source}: {_label(section, key)}: missing (required)")
        value = table[key]
        check, expected = _TYPES[field_name]
        if not check(value):
            raise _bad(source, field_name, value, f"must be {expected}")
        values[field_name] = tuple(value) if isinstance(value, list) else value
    try:
        thermal = ThermalLimits(
            throttle_c=float(values.pop("throttle_c")), critical_c=float(values.pop("critical_c"))
        )
    except ProfileError as exc:
        raise ProfileError(f"{source}: {exc}") from None
    return DeviceProfile(**values, thermal=thermal, source=source)


# --- host detection ------------------------------------------------------------------------

_MACHINE_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
# /proc/cpuinfo spelling -> profile feature.
_X86_FLAGS = {"avx2": "avx2", "avx512f": "avx512", "avx512_vnni": "vnni", "avx_vnni": "vnni"}
_ARM_FLAGS = {
    "asimd": "neon",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "fphp": "fp16",
    "asimdhp": "fp16",
}
# "CPU part" values of Arm's own cores (implementer 0x41).
_ARM_PARTS = {
    "0xd03": "cortex-a53",
    "0xd07": "cortex-a57",
    "0xd08": "cortex-a72",
    "0xd0b": "cortex-a76",
    "0xd41": "cortex-a78",
    "0xd42": "cortex-a78ae",
}


def _cpuinfo_fields(path: Path) -> dict[str, str]:
    """The first value of each ``key : value`` line of /proc/cpuinfo ({} when unreadable)."""
    fields: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def _ram_mb(meminfo_path: Path) -> int:
    try:
        for line in meminfo_path.read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (AttributeError, ValueError, OSError) as exc:
        raise ProfileError(
            f"{meminfo_path}: cannot read the RAM size; pick a profile by name instead"
        ) from exc


def detect_host_profile(
    *,
    machine: str | None = None,
    cpuinfo_path: Path = Path("/proc/cpuinfo"),
    meminfo_path: Path = Path("/proc/meminfo"),
) -> DeviceProfile:
    """A profile for the machine this runs on, named ``host-<arch>``.

    Reads the architecture from ``platform.machine()`` and CPU features from /proc/cpuinfo
    (``flags`` on x86, ``Features`` on ARM). The keyword arguments point it at another machine's
    files (tests, or a cpuinfo copied off a device).
    """
    raw_machine = machine if machine is not None else platform.machine()
    arch = _MACHINE_ARCH.get(raw_machine.lower())
    if arch is None:
        raise ProfileError(
            f"unsupported architecture {raw_machine!r} (supported: {', '.join(ARCHES)}); "
            f"pick a profile by name instead (known: {', '.join(list_profiles())})"
        )
    fields = _cpuinfo_fields(cpuinfo_path)
    if arch == "x86_64":
        flags, table = fields.get("flags", ""), _X86_FLAGS
        cpu = fields.get("model name", "") or "x86-64"
    else:
        flags, table = fields.get("features", ""), _ARM_FLAGS
        part = fields.get("cpu part", "").lower()
        cpu = _ARM_PARTS.get(part, f"arm-part-{part}" if part else "aarch64")
    found = {table[flag] for flag in flags.split() if flag in table}
    features = tuple(f for f in ARCH_FEATURES[arch] if f in found)
    cores = os.cpu_count() or 1
    return DeviceProfile(
        name=f"host-{arch}",
        description=f"this machine ({cpu}), detected from {cpuinfo_path}",
        arch=arch,
        cpu=cpu,
        cpu_features=features,
        cores=cores,
        ram_mb=max(_ram_mb(meminfo_path), 1),
        formats=("onnx-int8", "onnx-fp32"),
        int8_schemes=recommended_int8_schemes(arch=arch, features=features),
        threads=cores,
        onnx_providers=("CPUExecutionProvider",),
        fp16=False,
        thermal=ThermalLimits(throttle_c=90.0, critical_c=100.0)
        if arch == "x86_64"
        else ThermalLimits(throttle_c=80.0, critical_c=85.0),
        source="detected",
    )


__all__ = [
    "ARCHES",
    "ARCH_FEATURES",
    "CPU_FEATURES",
    "DeviceProfile",
    "ThermalLimits",
    "detect_host_profile",
    "list_profiles",
    "load_profile",
    "parse_profile",
    "profile_dirs",
    "recommended_int8_schemes",
]


#: Substrings of /proc/device-tree/model and the profile each one means.
_BOARD_MODELS = (
    ("Raspberry Pi 5", "raspberry-pi-5"),
    ("Raspberry Pi 4", "raspberry-pi-4"),
    ("Raspberry Pi Zero 2", "raspberry-pi-zero-2w"),
    ("Orin Nano", "jetson-orin-nano"),
    ("Jetson Nano", "jetson-nano"),
)


def detect_device_profile(
    *,
    device_tree_model: Path = Path("/proc/device-tree/model"),
    tegra_release: Path = Path("/etc/nv_tegra_release"),
) -> DeviceProfile:
    """The shipped profile for this board when it is one we know (Raspberry Pi from the device
    tree, Jetson from the device tree or /etc/nv_tegra_release), else the detected host."""
    model = ""
    with contextlib.suppress(OSError):
        model = device_tree_model.read_bytes().decode("utf-8", "replace").strip("\x00\n ")
    for needle, name in _BOARD_MODELS:
        if needle in model:
            return load_profile(name)
    if tegra_release.exists():
        return load_profile("jetson-orin-nano" if "Orin" in model else "jetson-nano")
    return detect_host_profile()
