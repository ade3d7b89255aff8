"""Configuration precedence and the shipped config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from rkllmd.config import OPTIONS, ConfigError, load, tomllib  # tomli on Python 3.10
from rkllmd.paths import default_socket, default_text_dir

ROOT = Path(__file__).resolve().parent.parent

ROOT = Path(__file__).resolve().parent.parent


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    config_file = tmp_path / "rkllmd.toml"
    config_file.write_text('[daemon]\nmax_queue = 5\nlog_level = "warning"\n[sampling]\ntop_k = 7\n[cache]\ndebounce_ms = 50\n')
    env = {"RKLLMD_MAX_QUEUE": "6", "RKLLMD_SAMPLING_TOP_K": "8"}
    config = load(config_file, environ=env, flags={"daemon.max_queue": 9})
    assert config["daemon.max_queue"] == 9 and config.sources["daemon.max_queue"] == "command line"
    assert config["sampling.top_k"] == 8 and config.sources["sampling.top_k"] == "RKLLMD_SAMPLING_TOP_K"
    assert config["daemon.log_level"] == "warning" and config.sources["daemon.log_level"] == str(config_file)
    assert config["cache.debounce_ms"] == 50
    assert config["model.context_length"] == 4096 and config.sources["model.context_length"] == "default"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[daemon]\nmax_queue = 'many'\n", "daemon.max_queue"),
        ("[daemon]\nno_such_key = 1\n", "unknown key daemon.no_such_key"),
        ("[daemon\n", "rkllmd.toml"),
        ("daemon = 3\n", "must be a table"),
        ("[models.m]\npath = '/m.gguf'\ntokenizer = '/t.json'\n", r"\[models.m\]: tokenizer .* goes with a .rkllm path"),
        ("[models.m]\nfrom = 'x'\ntokenizer = '/t.json'\n", r"\[models.m\]: tokenizer .* goes with a .rkllm path"),
        ("[models.m]\npath = '/m.rkllm'\ntokenizer = 3\n", r"\[models.m\]: tokenizer must be a string"),
    ],
)
def test_bad_config_files_are_refused_with_the_key(tmp_path: Path, text: str, message: str) -> None:
    config_file = tmp_path / "rkllmd.toml"
    config_file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load(config_file, environ={})


@pytest.mark.parametrize(
    "text, message",
    [
        ("[daemon]\nmax_queue = -1\n", "daemon.max_queue .*expected 1 to 100000, got -1"),
        ("[daemon]\nmax_queue = 2.5\n", "daemon.max_queue .*expected int"),
        ("[daemon]\nmax_queue = true\n", "daemon.max_queue .*expected int"),
        ("[daemon]\nlog_level = 'loud'\n", "daemon.log_level .*expected one of debug, info, warning, error"),
        ("[daemon]\nbackend = 'gpu'\n", "daemon.backend"),
        ("[daemon]\nslow_client_timeout = nan\n", "slow_client_timeout .*finite"),
        ("[daemon]\nsocket = 5\n", "daemon.socket .*expected str"),
        ("[model]\nkernels = 'fast'\n", "model.kernels .*auto, c, numpy"),
        ("[model]\nkeep_weights = 'no'\n", "model.keep_weights .*expected bool"),
        ("[sampling]\ntop_p = 1.5\n", "sampling.top_p"),
        ("[sampling]\nmax_tokens = 5000\n", "sampling.max_tokens .*daemon.max_tokens_limit"),
        ("[rkllm]\nruntime = '2.0'\n", "rkllm.runtime"),
        ("[cache]\nmemory_budget_mb = -5\n", "cache.memory_budget_mb"),
    ],
)
def test_values_out_of_range_or_choices_are_refused_at_load(tmp_path: Path, text: str, message: str) -> None:
    config_file = tmp_path / "rkllmd.toml"
    config_file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load(config_file, environ={})


def test_environment_booleans_are_words_not_anything_else() -> None:
    assert load(None, environ={"RKLLMD_MODEL_KEEP_WEIGHTS": "off", "RKLLMD_CONFIG": ""}).model.keep_weights is False
    assert load(None, environ={"RKLLMD_MODEL_KEEP_WEIGHTS": "Yes", "RKLLMD_CONFIG": ""}).model.keep_weights is True
    with pytest.raises(ConfigError, match="RKLLMD_MODEL_KEEP_WEIGHTS.*'maybe'"):
        load(None, environ={"RKLLMD_MODEL_KEEP_WEIGHTS": "maybe", "RKLLMD_CONFIG": ""})


def test_sections_are_typed_objects() -> None:
    config = load(None, environ={"RKLLMD_SAMPLING_TOP_P": "0.5", "RKLLMD_CONFIG": ""})
    assert config.sampling.top_p == 0.5 and config["sampling.top_p"] == 0.5
    assert config.daemon.slow_client_timeout == 10.0 and isinstance(config.daemon.slow_client_timeout, float)
    assert config.model_differs(load(None, environ={"RKLLMD_MODEL_CONTEXT_LENGTH": "512", "RKLLMD_CONFIG": ""}))
    assert not config.model_differs(load(None, environ={"RKLLMD_SAMPLING_TOP_K": "5", "RKLLMD_CONFIG": ""}))


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="RKLLMD_MAX_QUEUE"):
        load(None, environ={"RKLLMD_MAX_QUEUE": "lots", "RKLLMD_CONFIG": ""})


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "absent.toml", environ={})


def test_shipped_config_documents_every_key_with_its_default() -> None:
    text = (ROOT / "etc" / "rkllmd.toml").read_text()
    uncommented = "\n".join(line[2:] if line.startswith("# ") and " = " in line else line for line in text.splitlines())
    table = tomllib.loads(uncommented)
    documented = {f"{s}.{k}": v for s, keys in table.items() for k, v in keys.items()}
    assert documented == {o.dotted: o.default for o in OPTIONS}
    for option in OPTIONS:  # each key's line says what the typed configuration says of it
        assert f"# {option.help} ({option.env})\n# {option.key} = " in text, option.dotted
    assert load(ROOT / "etc" / "rkllmd.toml", environ={})["daemon.backend"] == "auto"


def test_text_caches_default_to_the_users_state_folder_even_from_a_checkout(tmp_path: Path) -> None:
    """Not the checkout's cache/ (its examples): a user's caches would show in ``git status``."""
    assert (ROOT / "cache").is_dir() and (ROOT / "pyproject.toml").is_file()  # this code runs from a checkout
    assert default_text_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "rkllmd" / "caches"
    assert default_text_dir({}) == Path.home() / ".local" / "state" / "rkllmd" / "caches"
    assert default_text_dir({"STATE_DIRECTORY": "/var/lib/rkllmd", "XDG_STATE_HOME": str(tmp_path)}) == Path("/var/lib/rkllmd")


def test_socket_default_order(tmp_path: Path) -> None:
    assert default_socket({"RKLLMD_SOCKET": "/x/y.sock", "RUNTIME_DIRECTORY": "/run/a"}) == Path("/x/y.sock")
    assert default_socket({"RUNTIME_DIRECTORY": "/run/rkllmd"}) == Path("/run/rkllmd/rkllmd.sock")
    assert default_socket({"XDG_RUNTIME_DIR": str(tmp_path)}) == tmp_path / "rkllmd" / "rkllmd.sock"
    assert str(default_socket({})).startswith("/tmp/rkllmd-")
