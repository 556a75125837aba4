"""Target profiles: one TOML per device class, read into a frozen `Profile`.

A profile says how to build for a target (precision, workspace, builder level, DLA core) and
which keep ratios its TensorRT optimisation profiles cover. `--target` names one; a path to a
.toml file works too, for custom devices. `opset` and `ort_providers` are checked and kept on
the Profile, but nothing reads them: fastsam2-export's --opset sets the opset and fastsam2-run's
--backend the ONNX Runtime providers.

CPU targets also say which reduced precisions each graph may run in on CPU backends
(`cpu_precisions`, tried by export's agreement gate, fastest passing one wins) and, for
OpenVINO, the device and the precision fp32 graphs run in there (`openvino_device`: set on the
intel-* targets, which makes `--backend auto` try OpenVINO before ONNX Runtime's CPU provider).
These three fields are optional: a profile without them is fp32 everywhere.
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6's system Python): the same parser from PyPI
    import tomli as tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

from fastsam2.runtime.errors import InputError

PRECISIONS = ("fp32", "fp16", "int8")
CPU_PRECISIONS = ("fp32", "bf16", "int8")  # fastsam2.runtime.precision's, per graph on CPU backends
OPENVINO_DEVICES = ("", "CPU", "GPU", "NPU", "AUTO")  # "": OpenVINO not preferred (CPU when named)
OPENVINO_PRECISIONS = ("fp32", "fp16", "bf16")
# JetPack 6.0 ships TensorRT 8.6, whose ONNX parser stops at opset 17
MAX_OPSET = 17


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    device: str
    compute_capability: str  # "8.7"; "" where there is no GPU
    tensorrt: bool  # build native engines; False means ONNX Runtime only
    precision: str  # one of PRECISIONS
    workspace_mib: int
    builder_optimization_level: int  # 0..5
    dla_core: int  # -1: none
    keep_min: float
    keep_max: float
    opset: int  # informational: export's --opset sets the graphs' opset
    ort_providers: tuple  # informational: the runtime's --backend chooses the providers
    max_points: int  # prompt points per call: P in 1..max_points
    # {graph: candidate CPU precisions, preferred first}; empty: fp32 everywhere
    cpu_precisions: dict = field(default_factory=dict)
    openvino_device: str = ""
    openvino_precision: str = "fp32"


# field -> accepted TOML types (bool is an int in Python, so ints exclude it explicitly)
_TYPES = {
    "description": (str,),
    "device": (str,),
    "compute_capability": (str,),
    "tensorrt": (bool,),
    "precision": (str,),
    "workspace_mib": (int,),
    "builder_optimization_level": (int,),
    "dla_core": (int,),
    "keep_min": (float, int),
    "keep_max": (float, int),
    "opset": (int,),
    "ort_providers": (list,),
    "max_points": (int,),
    "cpu_precisions": (dict,),
    "openvino_device": (str,),
    "openvino_precision": (str,),
}
_OPTIONAL = {"cpu_precisions": {}, "openvino_device": "", "openvino_precision": "fp32"}
assert set(_TYPES) == {f.name for f in fields(Profile)} - {"name"}


def _profile_files() -> dict:
    root = resources.files(__package__)
    return {
        Path(p.name).stem: p
        for p in root.iterdir()
        if p.name.endswith(".toml") and p.is_file()
    }


def list_targets() -> list[str]:
    """Names of the shipped targets, sorted."""
    return sorted(_profile_files())


def load_profile(name: str) -> Profile:
    """The profile of a shipped target, or of a .toml file given by path."""
    if str(name).endswith(".toml") and Path(name).is_file():
        path = Path(name)
        return _parse(path.stem, str(path), path.read_bytes())
    files = _profile_files()
    if name not in files:
        raise InputError(f"unknown target {name!r}; known targets: {', '.join(sorted(files))}")
    return _parse(name, f"{name}.toml", files[name].read_bytes())


def _parse(name: str, where: str, raw: bytes) -> Profile:
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"profile {where}: not valid TOML ({e})") from None

    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        raise InputError(f"profile {where}: unknown field {unknown[0]!r}")
    values = {}
    for key, types in _TYPES.items():
        if key not in data and key in _OPTIONAL:
            values[key] = _OPTIONAL[key]
            continue
        if key not in data:
            raise InputError(f"profile {where}: missing field {key!r}")
        v = data[key]
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
            want = " or ".join(t.__name__ for t in types)
            raise InputError(f"profile {where}: field {key!r} must be {want}, got {v!r}")
        values[key] = v

    def bad(key, why):
        return InputError(f"profile {where}: field {key!r} {why}, got {values[key]!r}")

    if values["precision"] not in PRECISIONS:
        raise bad("precision", f"must be one of {', '.join(PRECISIONS)}")
    if not 0 <= values["builder_optimization_level"] <= 5:
        raise bad("builder_optimization_level", "must be in 0..5")
    if values["dla_core"] < -1:
        raise bad("dla_core", "must be -1 (none) or a core index")
    # the DLA runs fp16 and int8 only
    if values["dla_core"] >= 0 and (not values["tensorrt"] or values["precision"] == "fp32"):
        raise bad("dla_core", "needs tensorrt = true and precision fp16 or int8")
    if values["workspace_mib"] < 0:
        raise bad("workspace_mib", "must be >= 0")
    if values["tensorrt"] and values["workspace_mib"] == 0:
        raise bad("workspace_mib", "must be > 0 when tensorrt = true")
    if not 0.0 < values["keep_min"] <= 1.0:
        raise bad("keep_min", "must be in (0, 1]")
    if not values["keep_min"] <= values["keep_max"] <= 1.0:
        raise bad("keep_max", "must be in [keep_min, 1]")
    if not 7 <= values["opset"] <= MAX_OPSET:
        raise bad("opset", f"must be in 7..{MAX_OPSET} (TensorRT 8.6's ONNX parser)")
    if values["max_points"] < 1:
        raise bad("max_points", "must be >= 1")
    providers = values["ort_providers"]
    if not providers or not all(isinstance(p, str) for p in providers):
        raise bad("ort_providers", "must be a non-empty list of provider names")

    _check_cpu_fields(values, bad)
    values["keep_min"] = float(values["keep_min"])
    values["keep_max"] = float(values["keep_max"])
    values["ort_providers"] = tuple(providers)
    return Profile(name=name, **values)


def _check_cpu_fields(values: dict, bad) -> None:
    from fastsam2.runtime.contract import GRAPH_ORDER

    cp = values["cpu_precisions"]
    for g, cands in cp.items():
        if g not in GRAPH_ORDER:
            raise bad("cpu_precisions", f"names unknown graph {g!r} (graphs: {', '.join(GRAPH_ORDER)})")
        if (not isinstance(cands, list) or not cands or len(set(cands)) != len(cands)
                or not all(isinstance(p, str) and p in CPU_PRECISIONS for p in cands)):
            raise bad("cpu_precisions", f"must map each graph to a list of distinct precisions from "
                                        f"{', '.join(CPU_PRECISIONS)}")
    values["cpu_precisions"] = {g: tuple(c) for g, c in cp.items()}
    if values["openvino_device"] not in OPENVINO_DEVICES:
        raise bad("openvino_device", f"must be one of {', '.join(repr(d) for d in OPENVINO_DEVICES)}")
    if values["openvino_precision"] not in OPENVINO_PRECISIONS:
        raise bad("openvino_precision", f"must be one of {', '.join(OPENVINO_PRECISIONS)}")
