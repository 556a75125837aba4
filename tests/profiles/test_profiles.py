"""Target profiles: every shipped TOML loads into a valid Profile; bad ones fail in one line."""

import dataclasses
from importlib import resources

import pytest

from fastsam2.profiles import list_targets, load_profile
from fastsam2.runtime.errors import InputError

TARGETS = ["cpu", "desktop-ada", "desktop-ampere", "hopper", "intel-cpu", "intel-npu", "jetson-orin",
           "jetson-orin-nano"]


def test_list_targets_has_all_eight():
    assert list_targets() == TARGETS


@pytest.mark.parametrize("name", TARGETS)
def test_target_loads_with_valid_fields(name):
    p = load_profile(name)
    assert p.name == name
    assert p.description and p.device
    assert p.precision in {"fp32", "fp16", "int8"}
    assert p.opset <= 17  # JetPack 6.0's TensorRT 8.6 parser
    assert 0.0 < p.keep_min <= p.keep_max <= 1.0
    assert 0 <= p.builder_optimization_level <= 5
    assert p.dla_core >= -1
    assert p.max_points >= 1
    assert p.ort_providers and p.ort_providers[-1] == "CPUExecutionProvider"
    if p.tensorrt:
        assert p.workspace_mib > 0
        assert p.compute_capability.count(".") == 1
        assert p.ort_providers[0] == "TensorrtExecutionProvider"


def test_profile_is_frozen():
    p = load_profile("hopper")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.precision = "fp32"


def test_device_specifics():
    assert load_profile("jetson-orin").dla_core == 0
    assert load_profile("jetson-orin-nano").dla_core == -1  # the Orin Nano has no DLA
    assert load_profile("desktop-ada").dla_core == -1
    cpu = load_profile("cpu")
    assert cpu.tensorrt is False and cpu.precision == "fp32"
    assert cpu.ort_providers == ("CPUExecutionProvider",)
    assert all(load_profile(t).opset == 17 for t in TARGETS)


def test_unknown_target_lists_known_ones():
    with pytest.raises(InputError) as e:
        load_profile("jetson-tx2")
    msg = str(e.value)
    assert "\n" not in msg and "jetson-tx2" in msg
    assert all(t in msg for t in TARGETS)


def _shipped_text(name):
    return (resources.files("fastsam2.profiles") / f"{name}.toml").read_text()


def test_custom_profile_by_path(tmp_path):
    path = tmp_path / "my-orin.toml"
    path.write_text(_shipped_text("jetson-orin").replace("keep_min = 0.3", "keep_min = 0.5"))
    p = load_profile(str(path))
    assert p.name == "my-orin" and p.keep_min == 0.5


def test_malformed_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("precision = \n")
    with pytest.raises(InputError, match="broken.toml"):
        load_profile(str(path))


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda s: s.replace("opset = 17", ""), "opset"),  # missing
        (lambda s: s.replace('precision = "fp16"', 'precision = "fp8"'), "precision"),
        (lambda s: s.replace("opset = 17", "opset = 18"), "opset"),
        (lambda s: s.replace("keep_min = 0.3", "keep_min = 0"), "keep_min"),
        (lambda s: s.replace("keep_max = 1.0", "keep_max = 0.2"), "keep_max"),
        (lambda s: s.replace("dla_core = -1", 'dla_core = "none"'), "dla_core"),
        (lambda s: s + "\nworkspace = 12\n", "workspace"),  # unknown field, a typo
    ],
)
def test_bad_field_names_file_and_field(tmp_path, edit, field):
    path = tmp_path / "bad.toml"
    path.write_text(edit(_shipped_text("desktop-ada")))
    with pytest.raises(InputError) as e:
        load_profile(str(path))
    msg = str(e.value)
    assert "bad.toml" in msg and repr(field) in msg and "\n" not in msg


def test_cpu_precision_fields():
    """The intel-* pair asks for OpenVINO and lists CPU precisions per graph; the GPU targets
    leave the optional fields at their defaults (fp32 everywhere, OpenVINO not preferred)."""
    ic, npu = load_profile("intel-cpu"), load_profile("intel-npu")
    assert ic.openvino_device == "CPU" and ic.openvino_precision == "fp32"
    assert ic.cpu_precisions["image_encoder"] == ("bf16", "int8", "fp32")
    assert npu.openvino_device == "NPU" and npu.openvino_precision == "fp16"
    assert "image_encoder" not in npu.cpu_precisions  # static: it runs on the NPU itself
    for t in ("desktop-ada", "hopper", "jetson-orin"):
        p = load_profile(t)
        assert p.cpu_precisions == {} and p.openvino_device == "" and p.openvino_precision == "fp32"


@pytest.mark.parametrize("line, field", [
    ('cpu_precisions = { image_encoder = ["fp8"] }', "cpu_precisions"),
    ('cpu_precisions = { encoder = ["int8"] }', "cpu_precisions"),  # not a graph name
    ('cpu_precisions = { image_encoder = ["int8", "int8"] }', "cpu_precisions"),
    ('cpu_precisions = { image_encoder = [] }', "cpu_precisions"),
    ('cpu_precisions = ["int8"]', "cpu_precisions"),
    ('openvino_device = "TPU"', "openvino_device"),
    ('openvino_precision = "int4"', "openvino_precision"),
])
def test_bad_cpu_precision_fields(tmp_path, line, field):
    path = tmp_path / "bad.toml"
    path.write_text(_shipped_text("desktop-ada") + "\n" + line + "\n")
    with pytest.raises(InputError) as e:
        load_profile(str(path))
    msg = str(e.value)
    assert "bad.toml" in msg and repr(field) in msg and "\n" not in msg
