"""Static checks of the model repository's configs: they parse, the ensemble is wired, they match the ONNX."""
from __future__ import annotations

import pytest
from tritonclient.grpc.model_config_pb2 import ModelInstanceGroup

from tests.triton_configs import config_files, dims_compatible, onnx_io, tensor_specs
from tools.contract import (
    CONFIG_NAMES,
    MODELS_ROOT,
    load_repository,
    model_dirs,
    parameter,
    read_model_config,
    served_contract,
    tensor,
)
from tools.pipeline_math import load_model_module

CONTRACT = served_contract()
PIPELINE, DETECTOR = CONTRACT.pipeline_model, CONTRACT.detector_model
PYTHON_STEPS = (CONTRACT.preprocess_model, CONTRACT.postprocess_model)
MAX_BATCH_SIZE = 32  # the design's largest batch
# Parameters that may differ between the GPU and CPU variant of a model, and why.
DEVICE_PARAMETERS = {
    "FORCE_CPU_ONLY_INPUT_TENSORS",  # GPU steps accept tensors in GPU memory
    "onnx_file",  # the CPU detector runs ONNX Runtime; the GPU one a TensorRT plan
    "intra_op_threads",  # ONNX Runtime threads, CPU only
}
CONFIG_IDS = ["default", "cpu"]


@pytest.mark.parametrize("path", config_files(), ids=lambda p: str(p.relative_to(MODELS_ROOT)))
def test_every_config_parses_and_names_its_model(path):
    config = read_model_config(path)
    model_dir = path.parent if path.name == "config.pbtxt" else path.parent.parent
    assert config.name == model_dir.name
    # The pipeline and its steps batch up to the design's largest batch; the scan model takes a few scans.
    assert config.max_batch_size == (MAX_BATCH_SIZE if config.name != CONTRACT.scan_model else 4)


def test_the_repository_holds_the_contract_models():
    assert {d.name for d in model_dirs()} == {PIPELINE, DETECTOR, *PYTHON_STEPS, CONTRACT.scan_model}


@pytest.mark.parametrize("config_name", CONFIG_NAMES, ids=CONFIG_IDS)
def test_ensemble_steps_are_wired_with_matching_tensors(config_name):
    repository = load_repository(config_name)
    ensemble = repository[PIPELINE]
    assert ensemble.platform == "ensemble"
    available = tensor_specs(ensemble.input)  # ensemble tensor name -> (type, dims)
    optional_inputs = {t.name: t.optional for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = repository[step.model_name]
        assert model.max_batch_size >= ensemble.max_batch_size
        inputs, outputs = tensor_specs(model.input), tensor_specs(model.output)
        required = {t.name for t in model.input if not t.optional}
        assert required <= set(step.input_map) <= {t.name for t in model.input}, step.model_name
        for model_input, ensemble_tensor in step.input_map.items():
            assert ensemble_tensor in available, f"{step.model_name}: {ensemble_tensor} is not produced before it"
            (wanted_type, wanted_dims), (given_type, given_dims) = inputs[model_input], available[ensemble_tensor]
            # An optional ensemble input may only feed an optional step input (2.51 passes it through absent).
            assert not optional_inputs.get(ensemble_tensor) or model_input not in required, model_input
            assert wanted_type == given_type, f"{step.model_name}.{model_input}"
            assert dims_compatible(wanted_dims, given_dims), f"{step.model_name}.{model_input}"
        for model_output, ensemble_tensor in step.output_map.items():
            assert model_output in outputs, f"{step.model_name} has no output {model_output}"
            assert ensemble_tensor not in available, f"{ensemble_tensor} is produced twice"
            available[ensemble_tensor] = outputs[model_output]
    for name, (data_type, dims) in tensor_specs(ensemble.output).items():
        assert name in available, f"ensemble output {name} is never produced"
        assert available[name][0] == data_type and dims_compatible(available[name][1], dims), name


def test_pipeline_matches_the_contract():
    pipeline = load_repository()[PIPELINE]
    assert tensor_specs(pipeline.input) == {"IMAGE": ("TYPE_STRING", [1]), "TEMPLATE": ("TYPE_STRING", [1])}
    assert [t.name for t in pipeline.input if t.optional] == ["TEMPLATE"]
    contract = served_contract()
    assert (contract.image_input, contract.template_input, contract.registration_output) == (
        "IMAGE", "TEMPLATE", "REGISTRATION")
    assert "REGISTRATION" not in contract.output_names  # the detections' four, as Detections.from_padded takes
    k = tensor_specs(pipeline.output)["BOXES"][1][0]
    assert tensor_specs(pipeline.output) == {
        "NUM_DETECTIONS": ("TYPE_INT32", [1]),
        "BOXES": ("TYPE_FP32", [k, 4]),
        "SCORES": ("TYPE_FP32", [k]),
        "CLASSES": ("TYPE_INT32", [k]),
        "REGISTRATION": ("TYPE_FP32", [4]),
    }
    assert [step.model_name for step in pipeline.ensemble_scheduling.step] == ["preprocess", DETECTOR, "postprocess"]
    # postprocess learns from preprocess's REGISTRATION whether an image's template registered (its threshold)
    preprocess_step, _, postprocess_step = pipeline.ensemble_scheduling.step
    assert postprocess_step.input_map["REGISTRATION"] == preprocess_step.output_map["REGISTRATION"]
    postprocess_input = tensor(load_repository()["postprocess"].input, "REGISTRATION")
    assert postprocess_input.optional and list(postprocess_input.dims) == [4]


@pytest.mark.parametrize("model", [DETECTOR, *PYTHON_STEPS])
def test_gpu_and_cpu_variants_have_the_same_interface(model):
    default, cpu = load_repository()[model], load_repository("cpu")[model]
    assert (MODELS_ROOT / model / "configs" / "cpu.pbtxt").is_file()
    assert tensor_specs(default.input) == tensor_specs(cpu.input)
    assert tensor_specs(default.output) == tensor_specs(cpu.output)
    assert default.max_batch_size == cpu.max_batch_size


@pytest.mark.parametrize("onnx_file", ["model.onnx", "model.fp16.onnx", "model.int8.onnx"])
@pytest.mark.parametrize("config_name", CONFIG_NAMES, ids=CONFIG_IDS)
def test_detector_config_matches_the_onnx_model(config_name, onnx_file):
    """Every build (FP32, the FP16 graph engines are built from, the CPU config's INT8) takes the pixel type
    and shapes the configs declare."""
    detector = load_repository(config_name)[DETECTOR]
    onnx_inputs, onnx_outputs = onnx_io(CONTRACT.detector_version_dir / onnx_file)
    for config_tensors, onnx_tensors in ((detector.input, onnx_inputs), (detector.output, onnx_outputs)):
        assert set(tensor_specs(config_tensors)) == set(onnx_tensors)
        for name, (data_type, dims) in tensor_specs(config_tensors).items():
            onnx_type, onnx_dims = onnx_tensors[name]
            assert data_type == onnx_type, name
            assert onnx_dims[0] == -1, f"{name}: the ONNX batch dimension must be dynamic"
            assert dims == onnx_dims[1:], f"{name}: config {dims} vs ONNX {onnx_dims[1:]}"


def test_labels_cover_the_detector_classes():
    labels = (MODELS_ROOT / DETECTOR / "1" / "labels.txt").read_text().split()
    (output,) = load_repository()[DETECTOR].output
    assert len(labels) == output.dims[0] - 4


def test_gpu_detector_is_a_batched_tensorrt_engine_on_two_gpu_instances():
    detector = load_repository()[DETECTOR]
    assert detector.platform == "tensorrt_plan"
    assert detector.default_model_filename == "model.plan"
    assert list(detector.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert detector.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.count, g.kind) for g in detector.instance_group] == [(2, ModelInstanceGroup.KIND_GPU)]


@pytest.mark.parametrize("model", PYTHON_STEPS)
def test_gpu_python_steps_run_on_gpu_and_accept_gpu_tensors(model):
    config = load_repository()[model]
    assert config.backend == "python"
    assert parameter(config, "FORCE_CPU_ONLY_INPUT_TENSORS") == "no"
    assert config.instance_group and all(g.kind == ModelInstanceGroup.KIND_GPU for g in config.instance_group)


@pytest.mark.parametrize("model", [DETECTOR, *PYTHON_STEPS])
def test_cpu_configs_run_python_on_cpu_with_dynamic_batching(model):
    config = load_repository("cpu")[model]
    assert config.backend == "python"
    assert config.HasField("dynamic_batching")
    assert config.instance_group and all(g.kind == ModelInstanceGroup.KIND_CPU for g in config.instance_group)
    assert (MODELS_ROOT / model / "1" / "model.py").is_file()


def test_cpu_detector_parameters():
    detector = load_repository("cpu")[DETECTOR]
    served = CONTRACT.detector_version_dir / parameter(detector, "onnx_file")
    # model.onnx or a build of it in the same folder (tests/test_int8_conversion.py checks it is not stale)
    assert served.is_file() and served.parent == CONTRACT.detector_onnx.parent
    assert int(parameter(detector, "intra_op_threads")) >= 1


@pytest.mark.parametrize("config_name", CONFIG_NAMES, ids=CONFIG_IDS)
def test_preprocess_parameters(config_name):
    preprocess = load_repository(config_name)["preprocess"]
    assert 0 <= float(parameter(preprocess, "pad_value")) <= 255
    assert int(parameter(preprocess, "max_image_pixels")) > 0
    channels, height, width = tensor_specs(preprocess.output)["images"][1]
    assert channels in (1, 2, 3) and height > 0 and width > 0  # grey, grey + template, RGB (image_ops.py)
    assert tensor_specs(preprocess.output)["LETTERBOX"] == ("TYPE_FP32", [5])
    assert tensor_specs(preprocess.output)["REGISTRATION"] == ("TYPE_FP32", [4])
    assert 0 < float(parameter(preprocess, "registration_min_score")) < 1
    assert 0 < float(parameter(preprocess, "registration_scale")) <= 1
    assert float(parameter(preprocess, "registration_max_shift")) > 0
    assert float(parameter(preprocess, "registration_max_angle")) > 0
    assert int(parameter(preprocess, "template_size_tolerance")) >= 0


@pytest.mark.parametrize("config_name", CONFIG_NAMES, ids=CONFIG_IDS)
def test_postprocess_parameters(config_name):
    thresholds = load_model_module("postprocess", "thresholds")
    postprocess = load_repository(config_name)["postprocess"]
    for name in (*thresholds.THRESHOLD_NAMES, "template_score_threshold"):
        thresholds.parse_threshold(name, parameter(postprocess, name))
    k = tensor_specs(postprocess.output)["BOXES"][1][0]
    assert int(parameter(postprocess, "pre_nms_top_k")) >= k


@pytest.mark.parametrize("model", [DETECTOR, *PYTHON_STEPS])
def test_gpu_and_cpu_variants_carry_the_same_parameters(model):
    """The operating point (thresholds, K, pad value, pixel limit) must not depend on the device."""
    default, cpu = load_repository()[model], load_repository("cpu")[model]
    shared = (set(default.parameters) | set(cpu.parameters)) - DEVICE_PARAMETERS
    for key in sorted(shared):
        assert parameter(default, key) == parameter(cpu, key), f"{model}: {key} differs between GPU and CPU configs"


@pytest.mark.parametrize("config_name", CONFIG_NAMES, ids=CONFIG_IDS)
def test_the_contract_reads_the_same_facts_from_either_variant(config_name):
    contract = served_contract(config_name)
    assert contract.pipeline_model == PIPELINE
    assert contract.output_names == ("NUM_DETECTIONS", "BOXES", "SCORES", "CLASSES")
    assert contract.image_input == "IMAGE" and contract.max_batch_size == MAX_BATCH_SIZE
    assert contract.num_classes == len(contract.labels)
    detector = load_repository(config_name)[DETECTOR]
    assert list(detector.input[0].dims) == [contract.channels, contract.input_height, contract.input_width]
    assert contract.typical_batch_size in contract.preferred_batch_sizes
    gpu = served_contract()
    for field in ("score_threshold", "iou_threshold", "pre_nms_top_k", "max_detections", "pad_value",
                  "max_image_pixels", "labels", "input_height", "input_width", "channels"):
        assert getattr(contract, field) == getattr(gpu, field), field
