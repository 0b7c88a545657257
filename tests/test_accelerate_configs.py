"""The example accelerate configs in docs/accelerate/ load with accelerate's own parsers.

Nothing is launched: each YAML goes through ``load_config_from_file`` (the ``ClusterConfig`` that
``accelerate launch --config_file`` builds), then through the launcher's validation and the
environment it would hand to the training processes, and the FSDP one through
``FullyShardedDataParallelPlugin`` built from that environment, as the trainer's Accelerator does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

accelerate = pytest.importorskip("accelerate")

from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[1] / "docs" / "accelerate"

EXPECTED_TYPE = {
    "ddp.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
}

#: top-level keys the README documents for every file
COMMON_KEYS = {"compute_environment", "distributed_type", "mixed_precision", "num_machines", "num_processes",
               "machine_rank"}

FSDP_KEYS = {
    "fsdp_version": 2,
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_reshard_after_forward": True,
    "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_cpu_ram_efficient_loading": True,
    "fsdp_activation_checkpointing": False,
}

ZERO_KEYS = {
    "deepspeed_zero2.yaml": {"zero_stage": 2, "gradient_accumulation_steps": 1},
    "deepspeed_zero3.yaml": {"zero_stage": 3, "gradient_accumulation_steps": 1, "zero3_init_flag": True,
                             "zero3_save_16bit_model": True},
}


def _launch_args(name: str, *extra: str):
    """Parse and validate ``accelerate launch --config_file <name> ...`` the way the CLI does."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = ["--config_file", str(CONFIG_DIR / name), "--num_processes", "2", "--main_process_port", "0", *extra,
            "pipelines/train.py"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    return args, defaults


def test_all_documented_configs_exist():
    present = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert present == sorted(EXPECTED_TYPE)
    readme = (CONFIG_DIR / "README.md").read_text(encoding="utf-8")
    for name in EXPECTED_TYPE:
        assert name in readme, f"README.md does not mention {name}"


@pytest.mark.parametrize("name", sorted(EXPECTED_TYPE))
def test_config_parses_and_loads(name):
    path = CONFIG_DIR / name
    text = path.read_text(encoding="utf-8")
    assert text.lstrip().startswith("#"), f"{name} should open with a comment saying what it is for"
    raw = yaml.safe_load(text)
    assert isinstance(raw, dict)
    assert COMMON_KEYS <= set(raw), f"{name} lacks {COMMON_KEYS - set(raw)}"
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type == EXPECTED_TYPE[name]
    assert cfg.mixed_precision == "bf16"
    assert cfg.num_machines == 1 and cfg.num_processes >= 1 and cfg.machine_rank == 0
    assert not cfg.use_cpu


@pytest.mark.parametrize("name", sorted(EXPECTED_TYPE))
def test_launcher_accepts_config(name):
    args, _ = _launch_args(name)
    assert args.num_processes == 2
    assert args.mixed_precision == "bf16"
    assert args.use_fsdp == (name == "fsdp.yaml")
    assert args.use_deepspeed == name.startswith("deepspeed")
    assert args.multi_gpu == (name == "ddp.yaml")


def test_fsdp_selects_version_2_and_documented_keys(monkeypatch):
    cfg = load_config_from_file(str(CONFIG_DIR / "fsdp.yaml"))
    for key, value in FSDP_KEYS.items():
        assert cfg.fsdp_config.get(key) == value, key

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _ = _launch_args("fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == "2"
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env  # the model names its own layer classes
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "false"

    # what the trainer's Accelerator sees in each launched process
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.activation_checkpointing is False
    assert plugin.transformer_cls_names_to_wrap is None
    # ... which the trainer's EmbeddingLM reports from the LM, through a PEFT wrapper too
    from peft import LoraConfig, get_peft_model

    from anisogen.train.lm import load_lm
    from anisogen.train.model import EmbeddingLM
    from anisogen.train.projector import build_projector

    lm, _, _ = load_lm("tiny")
    lm = get_peft_model(lm, LoraConfig(r=1, target_modules=["q_proj"]))
    plugin.set_auto_wrap_policy(EmbeddingLM(lm, build_projector("linear", 8, 64), 6))
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]


def test_fsdp_layer_class_can_be_overridden_on_the_command_line():
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _ = _launch_args("fsdp.yaml", "--fsdp_transformer_layer_cls_to_wrap", "Qwen2DecoderLayer")
    assert prepare_multi_gpu_env(args)["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "Qwen2DecoderLayer"


@pytest.mark.parametrize("name", sorted(ZERO_KEYS))
def test_deepspeed_configs(name):
    cfg = load_config_from_file(str(CONFIG_DIR / name))
    for key, value in ZERO_KEYS[name].items():
        assert cfg.deepspeed_config.get(key) == value, key
    # clipping is left to the trainer (--max-grad-norm), not fixed in the file
    assert "gradient_clipping" not in cfg.deepspeed_config

    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults = _launch_args(name)
    args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)  # as launch_command sets it
    _, env = prepare_deepspeed_cmd_env(args)  # single machine: no deepspeed import, no command
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(ZERO_KEYS[name]["zero_stage"])
    assert env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "1"
    assert "ACCELERATE_GRADIENT_CLIPPING" not in env
    if name == "deepspeed_zero3.yaml":
        assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
        assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
