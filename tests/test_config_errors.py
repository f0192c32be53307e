"""Config files and the command line: one loader whose errors name the file, line and column, params
typos that suggest the field meant, and every CLI command ending a user error in one line, status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import yaml

import tokenprune as tp
from tokenprune.config import read_mapping
from tokenprune.lab.cli import main
from tokenprune.lab.config import load_ablation_config
from tokenprune.registry import Registry

BROKEN_YAML = "reduction:\n  strategy: fastv\n  stages: [1, 2\n  ratio: 0.5\n"  # the flow list never closes
BROKEN_JSON = '{"strategy": "fastv",\n "ratio": 0.5,,\n}'  # line 2, column 15: the second comma


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- the one loader -------------------------------------------------------------------------------


def test_read_mapping_reads_yaml_and_json(tmp_path: Path) -> None:
    data = {"strategy": "fastv", "stages": [{"layer": 2, "ratio": 0.5}]}
    assert read_mapping(write(tmp_path / "a.yaml", yaml.safe_dump(data))) == data
    assert read_mapping(write(tmp_path / "a.json", json.dumps(data))) == data


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.yaml", BROKEN_YAML)
    with pytest.raises(tp.ConfigError) as caught:
        read_mapping(path)
    message = str(caught.value)
    assert message.startswith(f"{path}, line 4, column 8: invalid YAML: ")  # where `ratio:` follows
    assert "expected ',' or ']'" in message and "\n" not in message
    assert isinstance(caught.value.__cause__, yaml.YAMLError)


def test_a_json_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.json", BROKEN_JSON)
    with pytest.raises(tp.ConfigError, match=r"broken\.json, line 2, column 15: invalid JSON: Expecting"):
        read_mapping(path)


@pytest.mark.parametrize(
    ("text", "found"), [("", "an empty file"), ("- 1\n- 2\n", "a list"), ("3\n", "a int")]
)
def test_a_file_holding_no_mapping_says_what_it_holds(tmp_path: Path, text: str, found: str) -> None:
    with pytest.raises(tp.ConfigError, match=f"expected a mapping of fields, found {found}$"):
        read_mapping(write(tmp_path / "x.yaml", text))


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(tp.ConfigError, match=r"cannot read .*absent\.yaml"):
        read_mapping(tmp_path / "absent.yaml")


def test_load_config_raises_config_error_for_syntax_and_fields(tmp_path: Path) -> None:
    with pytest.raises(tp.ConfigError, match=r"broken\.yaml, line 4, column 8: invalid YAML"):
        tp.load_config(write(tmp_path / "broken.yaml", BROKEN_YAML))
    with pytest.raises(tp.ConfigError, match=r"broken\.json, line 2, column 15"):
        tp.load_config(write(tmp_path / "broken.json", BROKEN_JSON))
    typo = write(tmp_path / "typo.yaml", "strategy: fastv\nlayer: 2\nratoi: 0.5\n")
    with pytest.raises(tp.ConfigError, match=r"typo\.yaml: .*ratoi: .* \(did you mean `ratio`\?\)"):
        tp.load_config(typo)
    good = write(tmp_path / "good.yaml", "reduction:\n  strategy: fastv\n  layer: 2\n  ratio: 0.5\n")
    assert tp.load_config(good) == tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.5)


# -- params typos -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "params", "meant"),
    [
        ("tome", {"rr": 4}, "r"),
        ("feather", {"strid": 3}, "stride"),
        ("dart", {"image_pivot": 2}, "image_pivots"),
    ],
)
def test_a_params_typo_suggests_the_closest_field(strategy: str, params: dict, meant: str) -> None:
    typo = next(iter(params))
    with pytest.raises(pydantic.ValidationError) as caught:
        tp.ReductionConfig(strategy=strategy, layer=2, ratio=0.5, params=params)
    assert f"params of strategy {strategy!r}: {typo}: Extra inputs are not permitted" in str(caught.value)
    assert f"(did you mean `{meant}`?)" in str(caught.value)


def test_a_params_name_close_to_no_field_gets_no_suggestion() -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        tp.ReductionConfig(strategy="tome", layer=2, ratio=0.5, params={"zzzzzz": 1})
    assert "zzzzzz: Extra inputs are not permitted" in str(caught.value)
    assert "did you mean" not in str(caught.value)


# -- the command line: one line, status 2, for every command ---------------------------------------


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line a failed command wrote to stderr: no traceback, nothing on stdout.

    (torch may log a warning of its own on stderr the first time a command imports a model library.)
    """
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("tokenprune: error: ")]
    assert len(errors) == 1 and "Traceback" not in err and not out, err
    return errors[0]


@pytest.mark.parametrize("command", ["run", "ablate"])
def test_config_commands_report_a_syntax_error_in_one_line(tmp_path, capsys, command: str) -> None:
    path = write(tmp_path / "broken.yaml", BROKEN_YAML)
    assert main([command, str(path)]) == 2
    assert f"{path}, line 4, column 8: invalid YAML" in error_line(capsys)


@pytest.mark.parametrize("command", ["run", "ablate"])
def test_config_commands_report_a_missing_file_in_one_line(tmp_path, capsys, command: str) -> None:
    assert main([command, str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in error_line(capsys)


def test_report_on_a_folder_without_results_is_one_line(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert str(tmp_path) in error_line(capsys)


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (tp.PluginError("strategy 'x' from pkg:X failed to load"), "strategy 'x' from pkg:X failed to load"),
        (
            yaml.YAMLError("mapping values are not allowed here\n  in <file>, line 2"),
            "here in <file>, line 2",
        ),
        (json.JSONDecodeError("Expecting value", "{\n,", 2), "Expecting value: line 2 column 1 (char 2)"),
        (
            pydantic.ValidationError.from_exception_data(
                "Run", [{"type": "missing", "loc": ("model",), "input": {}}]
            ),
            "model: Field required",
        ),
    ],
    ids=["plugin", "yaml", "json", "pydantic"],
)
def test_listing_commands_end_any_user_error_in_one_line(
    monkeypatch, capsys, error: Exception, line: str
) -> None:
    """`strategies` and `adapters` parse no file; a user error reaching them still ends in one line."""

    def fail(*args: object) -> list[str]:
        raise error

    monkeypatch.setattr(Registry, "names", fail)
    for command in ("strategies", "adapters"):
        assert main([command]) == 2
        assert error_line(capsys).endswith(line)


def test_the_console_command_prints_no_traceback(tmp_path: Path) -> None:
    """In a fresh interpreter, as a user runs it: status 2, one error line, no traceback."""
    path = write(tmp_path / "broken.yaml", BROKEN_YAML)
    done = subprocess.run(
        [sys.executable, "-m", "tokenprune.lab.cli", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and not done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("tokenprune: error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{path}, line 4, column 8: invalid YAML" in errors[0]


def test_a_broken_plugin_in_an_ablation_grid_stays_a_plugin_error(tmp_path, monkeypatch) -> None:
    def broken(name: str) -> type:
        raise tp.PluginError(f"strategy {name!r} from pkg:Broken failed to load: needs `missing_lib`")

    monkeypatch.setattr(tp, "strategy_class", broken)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"grid": {"strategies": ["broken"]}}))
    with pytest.raises(tp.PluginError, match="missing_lib"):  # not a ConfigError about the field
        load_ablation_config(path)
