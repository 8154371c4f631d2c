from __future__ import annotations

import copy
import os
import platform
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import ProfileError
from edge_agent.model.formats import ARTIFACT_FORMATS, INT8_SCHEMES
from edge_agent.model.profiles import (
    PACKAGE_PROFILES_DIR,
    DeviceProfile,
    detect_host_profile,
    list_profiles,
    load_profile,
    parse_profile,
    profile_dirs,
    recommended_int8_schemes,
)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SHIPPED = (
    "raspberry-pi-4",
    "raspberry-pi-5",
    "raspberry-pi-zero-2w",
    "jetson-nano",
    "jetson-orin-nano",
    "x86-64",
)


@pytest.fixture(autouse=True)
def _no_env_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_PROFILES_DIR", raising=False)


def pi4_data() -> dict[str, Any]:
    with (PACKAGE_PROFILES_DIR / "raspberry-pi-4.toml").open("rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert Path(profile.source) == PACKAGE_PROFILES_DIR / f"{name}.toml"
    assert set(profile.formats) <= set(ARTIFACT_FORMATS)
    assert set(profile.int8_schemes) <= set(INT8_SCHEMES)
    assert 0 < profile.threads <= profile.cores
    assert profile.thermal.throttle_c < profile.thermal.critical_c
    assert profile.onnx_providers[-1] == "CPUExecutionProvider"


def test_list_profiles_has_the_shipped_six() -> None:
    assert set(SHIPPED) <= set(list_profiles())


def test_shipped_profiles_encode_the_hardware() -> None:
    pi4, pi5, zero = (load_profile(n) for n in SHIPPED[:3])
    nano, orin, x86 = (load_profile(n) for n in SHIPPED[3:])
    assert (pi4.cpu, pi5.cpu, zero.cpu) == ("cortex-a72", "cortex-a76", "cortex-a53")
    assert (nano.cpu, orin.cpu) == ("cortex-a57", "cortex-a78ae")
    assert zero.ram_mb == 512 and orin.cores == 6
    for pi in (pi4, pi5, zero):
        assert pi.formats == ("tflite-int8", "onnx-int8", "onnx-fp32")
        assert pi.onnx_providers == ("CPUExecutionProvider",) and not pi.fp16
        assert (pi.thermal.throttle_c, pi.thermal.critical_c) == (80.0, 85.0)
    for jetson in (nano, orin):
        assert jetson.formats == ("onnx-fp16", "onnx-int8", "onnx-fp32")
        assert jetson.onnx_providers[0] == "TensorrtExecutionProvider" and jetson.fp16
    assert x86.formats == ("onnx-int8", "onnx-fp32")
    assert pi5.has("dotprod") and orin.has("dotprod") and not pi4.has("dotprod")
    assert x86.has("avx2") and not x86.has("vnni")


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "jetson-orin-nano"])
def test_cpu_profiles_follow_the_scheme_rules(name: str) -> None:
    # The Nano's Maxwell GPU has no TensorRT int8, so its int8 runs on the CPU too.
    profile = load_profile(name)
    expected = recommended_int8_schemes(arch=profile.arch, features=profile.cpu_features)
    assert profile.int8_schemes == expected


def test_tensorrt_int8_profile_puts_symmetric_qdq_first() -> None:
    assert load_profile("jetson-orin-nano").int8_schemes[0] == "s8s8-qdq"


def test_scheme_rules() -> None:
    assert recommended_int8_schemes(arch="x86_64", features=["avx2"])[0] == "u8s8-rr-qop"
    assert recommended_int8_schemes(arch="x86_64", features=["avx2", "vnni"])[0] == "u8s8-qop"
    assert recommended_int8_schemes(arch="aarch64", features=["neon", "dotprod"])[0] == "s8s8-qop"
    assert recommended_int8_schemes(arch="aarch64", features=["neon"])[:2] == (
        "u8s8-qop",
        "u8u8-qop",
    )


def _set(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    *sections, last = key.split(".")
    table = data
    for section in sections:
        table = table[section]
    if value is _DELETE:
        del table[last]
    else:
        table[last] = value
    return data


_DELETE = object()

ERROR_CASES = [
    ("color", "red", "x.toml: color = 'red': unknown key"),
    ("cpu.speed_mhz", 1800, "x.toml: [cpu] speed_mhz = 1800: unknown key (known in [cpu]: arch,"),
    ("cpu", "cortex", "x.toml: cpu = 'cortex': must be a [cpu] table"),
    ("cpu.cores", "4", "x.toml: [cpu] cores = '4': must be an integer"),
    ("cpu.cores", True, "x.toml: [cpu] cores = True: must be an integer"),
    ("cpu.cores", 0, "x.toml: [cpu] cores = 0: must be > 0"),
    ("cpu.ram_mb", -1, "x.toml: [cpu] ram_mb = -1: must be > 0"),
    ("cpu.arch", "armv7l", "x.toml: [cpu] arch = 'armv7l': unknown architecture (known: aarch64"),
    ("cpu.features", ["neon", "sve"], "x.toml: [cpu] features = ['neon', 'sve']: unknown feature"),
    ("cpu.features", ["avx2"], "[cpu] features = ['avx2']: 'avx2' is not an aarch64 feature"),
    ("cpu.features", "neon", "x.toml: [cpu] features = 'neon': must be a list of strings"),
    (
        "quantization.int8_schemes",
        ["x"],
        "x.toml: [quantization] int8_schemes = ['x']: unknown scheme 'x' (known: u8s8-rr-qop, ",
    ),
    (
        "quantization.int8_schemes",
        [],
        "x.toml: [quantization] int8_schemes = []: [artifacts] formats lists tflite-int8",
    ),
    (
        "artifacts.formats",
        ["onnx-int4"],
        "x.toml: [artifacts] formats = ['onnx-int4']: unknown format 'onnx-int4' (known: onnx-fp32",
    ),
    ("artifacts.formats", ["onnx-fp32", "onnx-fp32"], "lists 'onnx-fp32' twice"),
    ("artifacts.formats", [], "x.toml: [artifacts] formats = []: list at least one"),
    ("runtime.threads", 0, "x.toml: [runtime] threads = 0: must be > 0"),
    ("runtime.threads", 8, "x.toml: [runtime] threads = 8: must be <= [cpu] cores = 4"),
    ("runtime.fp16", "no", "x.toml: [runtime] fp16 = 'no': must be true or false"),
    ("runtime.onnx_providers", ["CPU"], "[runtime] onnx_providers = ['CPU']: 'CPU' is not"),
    ("runtime.threads", _DELETE, "x.toml: [runtime] threads: missing"),
    ("thermal.critical_c", "hot", "x.toml: [thermal] critical_c = 'hot': must be a number"),
    (
        "thermal.throttle_c",
        90.0,
        "x.toml: [thermal] throttle_c = 90.0: must be below [thermal] critical_c = 85.0",
    ),
    ("name", "Raspberry Pi", "x.toml: name = 'Raspberry Pi': use lowercase"),
]


@pytest.mark.parametrize(("key", "value", "message"), ERROR_CASES)
def test_invalid_profile_names_the_key(key: str, value: Any, message: str) -> None:
    with pytest.raises(ProfileError) as info:
        parse_profile(_set(pi4_data(), key, value), source="x.toml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_valid_data_parses() -> None:
    profile = parse_profile(pi4_data(), source="x.toml")
    assert isinstance(profile, DeviceProfile) and profile.source == "x.toml"


def test_error_from_a_file_names_the_file(tmp_path: Path) -> None:
    text = (PACKAGE_PROFILES_DIR / "raspberry-pi-4.toml").read_text(encoding="utf-8")
    text = text.replace(
        'int8_schemes = ["u8s8-qop", "u8u8-qop", "s8s8-qdq"]', 'int8_schemes = ["x"]'
    )
    path = tmp_path / "raspberry-pi-4.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value).startswith(
        f"{path}: [quantization] int8_schemes = ['x']: unknown scheme 'x' (known: "
    )


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken"\n[cpu\narch = "aarch64"\n', encoding="utf-8")
    with pytest.raises(ProfileError, match=r"broken\.toml: invalid TOML: "):
        load_profile(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(tmp_path / "nope.toml")


def test_unknown_name_lists_known() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("raspberry-pi-6")
    message = str(info.value)
    assert message.startswith("unknown device profile 'raspberry-pi-6' (known: ")
    for name in SHIPPED:
        assert name in message


def _write_profile(directory: Path, name: str, *, threads: int) -> Path:
    text = (PACKAGE_PROFILES_DIR / "raspberry-pi-4.toml").read_text(encoding="utf-8")
    text = text.replace('name = "raspberry-pi-4"', f'name = "{name}"')
    text = text.replace("threads = 4", f"threads = {threads}")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_env_dirs_come_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    _write_profile(first, "raspberry-pi-4", threads=2)
    _write_profile(second, "raspberry-pi-4", threads=3)
    _write_profile(second, "my-board", threads=1)
    monkeypatch.setenv("EDGE_PROFILES_DIR", os.pathsep.join([str(first), str(second)]))
    assert profile_dirs()[:3] == [first, second, PACKAGE_PROFILES_DIR]
    shadowed = load_profile("raspberry-pi-4")
    assert shadowed.threads == 2 and shadowed.source == str(first / "raspberry-pi-4.toml")
    assert load_profile("my-board").threads == 1
    assert "my-board" in list_profiles() and "jetson-nano" in list_profiles()


def test_name_must_match_file_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_profile(tmp_path, "board-a", threads=1)
    path.rename(tmp_path / "board-b.toml")
    monkeypatch.setenv("EDGE_PROFILES_DIR", str(tmp_path))
    with pytest.raises(ProfileError, match=r"name = 'board-a': must match the file name 'board-b'"):
        load_profile("board-b")


def test_has_rejects_unknown_feature() -> None:
    with pytest.raises(ProfileError, match="unknown CPU feature 'sse9'"):
        load_profile("x86-64").has("sse9")


# --- host detection ------------------------------------------------------------------------


def _expected_features(cpuinfo: str, arch: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == ("flags" if arch == "x86_64" else "features"):
            flags = set(value.split())
            break
    else:
        return set()
    if arch == "x86_64":
        found = {"avx2"} & flags
        found |= {"avx512"} if "avx512f" in flags else set()
        found |= {"vnni"} if flags & {"avx512_vnni", "avx_vnni"} else set()
        return found
    names = {
        "asimd": "neon",
        "asimddp": "dotprod",
        "i8mm": "i8mm",
        "fphp": "fp16",
        "asimdhp": "fp16",
    }
    return {names[f] for f in flags if f in names}


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc/cpuinfo (Linux)")
def test_detect_host_profile_on_this_machine() -> None:
    profile = detect_host_profile()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower())
    arch = arch or platform.machine()
    assert profile.name == f"host-{arch}" and profile.arch == arch
    assert profile.source == "detected"
    cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    assert set(profile.cpu_features) == _expected_features(cpuinfo, arch)
    assert profile.cores == os.cpu_count() == profile.threads
    assert profile.ram_mb > 0
    assert profile.formats == ("onnx-int8", "onnx-fp32")
    assert profile.onnx_providers == ("CPUExecutionProvider",)
    assert profile.int8_schemes == recommended_int8_schemes(
        arch=arch, features=profile.cpu_features
    )


PI5_CPUINFO = (
    (
        "processor\t: 0\n"
        "BogoMIPS\t: 108.00\n"
        "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp "
        "cpuid asimdrdm lrcpc dcpop asimddp\n"
    )
    + """\
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x4
CPU part	: 0xd0b
CPU revision	: 1
"""
)

HASWELL_CPUINFO = """\
processor	: 0
model name	: Intel(R) Core(TM) i7-4770 CPU @ 3.40GHz
flags		: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi1 bmi2
"""


def test_detect_arm_features_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo, meminfo = tmp_path / "cpuinfo", tmp_path / "meminfo"
    cpuinfo.write_text(PI5_CPUINFO, encoding="utf-8")
    meminfo.write_text("MemTotal:        8245632 kB\nMemFree: 1 kB\n", encoding="utf-8")
    profile = detect_host_profile(machine="aarch64", cpuinfo_path=cpuinfo, meminfo_path=meminfo)
    assert profile.name == "host-aarch64" and profile.cpu == "cortex-a76"
    assert profile.cpu_features == ("neon", "dotprod", "fp16")
    assert profile.ram_mb == 8052
    assert profile.int8_schemes[0] == "s8s8-qop"
    assert profile.thermal.critical_c == 85.0


def test_detect_x86_without_vnni(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(HASWELL_CPUINFO, encoding="utf-8")
    profile = detect_host_profile(machine="AMD64", cpuinfo_path=cpuinfo)
    assert profile.cpu_features == ("avx2",)
    assert profile.int8_schemes == ("u8s8-rr-qop", "u8s8-rr-qdq", "s8s8-qdq")


def test_detect_unsupported_arch() -> None:
    with pytest.raises(ProfileError, match="unsupported architecture 'armv7l'"):
        detect_host_profile(machine="armv7l")
