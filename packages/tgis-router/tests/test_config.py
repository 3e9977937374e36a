"""Launcher options: flags over env vars over defaults, one clear line per bad value."""

from pathlib import Path

import pytest

from tgis_router.config import ConfigError, ignored_options, num_shards, options_markdown, parse_config
from tgis_router.launcher import _child_env, clamp_max_new_tokens, shard_serve_args


def test_defaults_match_tgis():
    config = parse_config([], environ={})
    assert config.max_batch_size == 12
    assert config.max_concurrent_requests == 512
    assert config.max_new_tokens == 1024
    assert config.grpc_port == 8033
    assert config.port == 3000
    assert config.deployment_framework is None  # the launcher chooses (test_engine_choice)
    assert config.default_include_stop_seqs is True


def test_flag_wins_over_env_var():
    config = parse_config(["--max-batch-size", "3"], environ={"MAX_BATCH_SIZE": "7", "MAX_NEW_TOKENS": "99"})
    assert config.max_batch_size == 3
    assert config.max_new_tokens == 99


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--max-batch-size", "abc"], {}, "--max-batch-size"),
        ([], {"MAX_BATCH_SIZE": "0"}, "MAX_BATCH_SIZE: must be > 0"),
        ([], {"DTYPE_STR": "float8"}, "DTYPE_STR: must be one of"),
        ([], {"OUTPUT_SPECIAL_TOKENS": "maybe"}, "OUTPUT_SPECIAL_TOKENS"),
        ([], {"NUM_GPUS": "2", "NUM_SHARD": "4"}, "NUM_GPUS (2) and NUM_SHARD (4) disagree"),
        ([], {"TLS_CERT_PATH": "/c.pem"}, "TLS_CERT_PATH and TLS_KEY_PATH"),
        ([], {"ESTIMATE_MEMORY": "sometimes"}, "ESTIMATE_MEMORY"),
        (["--max-prefill-padding", "1.5"], {}, "--max-prefill-padding"),
    ],
)
def test_bad_values_name_the_option(argv, environ, message):
    with pytest.raises(ConfigError, match=r"invalid value|disagree|must be given|needs") as e:
        parse_config(argv, environ=environ)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, 1),
        ({"CUDA_VISIBLE_DEVICES": ""}, 1),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
        ({"CUDA_VISIBLE_DEVICES": "0,1", "NUM_GPUS": "1"}, 1),
        ({"NUM_SHARD": "2"}, 2),
        ({"NVIDIA_VISIBLE_DEVICES": "0,1"}, 2),
        ({"NVIDIA_VISIBLE_DEVICES": "all"}, 1),
        ({"NVIDIA_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES": "3"}, 1),
    ],
)
def test_shard_count_from_num_gpus_or_visible_devices(environ, expected):
    assert num_shards(parse_config([], environ=environ)) == expected


@pytest.mark.parametrize(("value", "expected"), [("true", "true"), ("false", "false")])
def test_shards_inherit_the_log_format_and_level(value, expected):
    config = parse_config([], environ={"JSON_OUTPUT": value, "LOG_LEVEL": "debug"})
    env = _child_env(config)
    assert env["JSON_OUTPUT"] == expected
    assert env["LOG_LEVEL"] == config.log_level


def test_engine_options_reach_every_shard_s_serve_command():
    plain = shard_serve_args(parse_config([], environ={}), "/model", 256, rank=1)
    assert "--pt2-compile" not in plain
    assert "--no-cuda-graphs" not in plain
    assert "--no-prompt-graphs" not in plain
    assert "--no-fused-kernels" not in plain
    assert "--no-hf-paged-cache" not in plain
    assert "--decode-kernel" in plain
    assert plain[plain.index("--uds-path") + 1].endswith("-1")
    environ = {
        "PT2_COMPILE": "true",
        "CUDA_GRAPHS": "false",
        "PROMPT_GRAPHS": "false",
        "FUSED_KERNELS": "false",
        "HF_PAGED_CACHE": "false",
        "DECODE_KERNEL": "false",
        "KV_CACHE_MANAGER_NUM_GPU_BLOCKS": "64",
    }
    args = shard_serve_args(parse_config([], environ=environ), "/model", 256, rank=0)
    assert {
        "--pt2-compile",
        "--no-cuda-graphs",
        "--no-prompt-graphs",
        "--no-fused-kernels",
        "--no-hf-paged-cache",
        "--no-decode-kernel",
    } <= set(args)
    assert args[args.index("--kv-cache-blocks") + 1] == "64"


def test_max_new_tokens_is_clamped_below_the_sequence_length_as_tgis_does():
    config = parse_config(["--max-new-tokens", "1024"], environ={})
    assert clamp_max_new_tokens(config, 256).max_new_tokens == 255
    assert clamp_max_new_tokens(config, 1025).max_new_tokens == 1024


def test_tgis_flag_forms_bare_booleans_and_short_flags():
    config = parse_config(["--json-output", "-p", "3001", "-g", "8034", "--output-special-tokens", "false"], environ={})
    assert config.json_output is True
    assert config.output_special_tokens is False
    assert (config.port, config.grpc_port) == (3001, 8034)


@pytest.mark.parametrize("level", ["info", "WARN", "trace", "warn,tgis_router=debug,tgis_shard.server=error"])
def test_log_level_takes_tgis_forms(level):
    assert parse_config([], environ={"LOG_LEVEL": level}).log_level == level


def test_unknown_log_level_is_one_clear_line():
    with pytest.raises(ConfigError, match=r"invalid value for LOG_LEVEL: unknown log level 'loud'"):
        parse_config([], environ={"LOG_LEVEL": "info,tgis_router=loud"})


def test_quantize_is_refused_and_tgis_weight_limits_are_ignored_with_a_warning():
    with pytest.raises(ConfigError, match="QUANTIZE=gptq is not supported yet"):
        parse_config([], environ={"QUANTIZE": "gptq"})
    assert ignored_options(parse_config([], environ={})) == []
    config = parse_config(["--max-batch-weight", "47185920"], environ={"MAX_PREFILL_WEIGHT": "100"})
    assert [w.split()[0] for w in ignored_options(config)] == ["MAX_BATCH_WEIGHT", "MAX_PREFILL_WEIGHT"]


def test_the_readme_table_lists_every_option_with_its_default():
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    assert options_markdown() in readme  # regenerate it with tgis_router.config.options_markdown()


def test_a_removed_option_stops_the_launcher_naming_its_replacement():
    replaced_by = "MAX_STEP_TOKENS_WHILE_DECODING is gone: set MAX_PROMPT_TOKENS_WHILE_DECODING"
    with pytest.raises(ConfigError, match=replaced_by):
        parse_config([], environ={"MAX_STEP_TOKENS_WHILE_DECODING": "512"})
    assert parse_config([], environ={"MAX_PROMPT_TOKENS_WHILE_DECODING": "128"}).max_prompt_tokens_while_decoding == 128


def test_dtype_is_tgis_s_other_name_for_dtype_str_and_both_must_agree():
    assert parse_config([], environ={"DTYPE": "float16"}).dtype_str == "float16"
    assert parse_config([], environ={"DTYPE": "float16", "DTYPE_STR": "float16"}).dtype_str == "float16"
    with pytest.raises(ConfigError, match=r"DTYPE \(float16\) and DTYPE_STR \(bfloat16\) disagree"):
        parse_config([], environ={"DTYPE": "float16", "DTYPE_STR": "bfloat16"})


def test_shards_get_tgis_s_environment_unless_the_operator_set_it(monkeypatch):
    monkeypatch.setenv("TORCH_NCCL_AVOID_RECORD_STREAMS", "0")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")
    env = _child_env(parse_config([], environ={"CUDA_PROCESS_MEMORY_FRACTION": "0.5"}))
    assert env["NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["SAFETENSORS_FAST_GPU"] == "1"
    assert env["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "0"  # the operator's value wins
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env  # empty means unset, as in TGIS
    assert env["CUDA_PROCESS_MEMORY_FRACTION"] == "0.5"
    with pytest.raises(ConfigError, match="CUDA_PROCESS_MEMORY_FRACTION"):
        parse_config([], environ={"CUDA_PROCESS_MEMORY_FRACTION": "1.5"})


def test_hf_cache_variables_must_name_one_folder_which_shards_get_as_hf_hub_cache():
    assert parse_config([], environ={}).hub_cache is None
    config = parse_config([], environ={"TRANSFORMERS_CACHE": "/models/hub/", "HUGGINGFACE_HUB_CACHE": "/models/hub"})
    assert config.hub_cache == "/models/hub"
    assert _child_env(config)["HF_HUB_CACHE"] == "/models/hub"
    with pytest.raises(
        ConfigError, match=r"HF cache variables name different folders \(HF_HUB_CACHE=/a, TRANSFORMERS_CACHE=/b\)"
    ):
        parse_config([], environ={"HF_HUB_CACHE": "/a", "TRANSFORMERS_CACHE": "/b"})
