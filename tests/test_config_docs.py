"""The config reference: every field of every section has a description, and docs/config.md is what the generator
writes from them (so the checked-in reference cannot drift from megatron_amir/config.py)."""

import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from pydantic import Field

from launch.cli import main as cli_main
from megatron_amir.config import (
    REGENERATE,
    Config,
    ConfigError,
    _Section,
    config_reference,
    main,
    undocumented_fields,
)

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "docs" / "config.md"


def _all_keys(model=Config, prefix=""):
    for name, field in model.model_fields.items():
        key = prefix + name
        yield key, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, _Section):
            yield from _all_keys(field.annotation, key + ".")


def test_every_field_of_every_section_has_a_description():
    assert undocumented_fields() == [], "add a docstring under each of these fields in megatron_amir/config.py"
    keys = dict(_all_keys())
    assert len(keys) > 140  # every section is walked, nested ones (algorithm.amir, data.synthetic) included
    for key, field in keys.items():
        words = field.description.split()
        assert len(words) >= 3, f"{key}: description {field.description!r} says next to nothing"


class _Inner(_Section):
    """A section with one field left undocumented."""

    documented: int = 1
    """Has one."""
    bare: Optional[int] = Field(None, ge=1)


class _Outer(_Section):
    """Top level of the toy config."""

    inner: _Inner = Field(default_factory=_Inner)
    """The nested section."""


def test_undocumented_field_is_named_and_blocks_generation():
    assert undocumented_fields(_Outer) == ["inner.bare"]
    with pytest.raises(ConfigError, match=r"without a description.*inner\.bare"):
        config_reference(_Outer)


def test_checked_in_reference_is_current(tmp_path):
    out = tmp_path / "config.md"
    subprocess.run([sys.executable, "-m", "megatron_amir.config", "--out", str(out)], check=True, cwd=ROOT)
    assert CHECKED_IN.is_file(), f"docs/config.md is missing; generate it with `{REGENERATE}`"
    assert CHECKED_IN.read_text(encoding="utf-8") == out.read_text(encoding="utf-8"), (
        f"docs/config.md is stale: regenerate it with `{REGENERATE}` (or `megatron-amir config docs`) and commit it"
    )


def test_reference_has_one_row_per_key_with_type_default_and_description():
    text = config_reference()
    assert text == config_reference()  # deterministic
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert sorted(r.split("`")[1] for r in rows) == sorted(dict(_all_keys()))
    assert "| `train.lr` | float, >= 0 | `1e-06` | Peak learning rate of Adam. |" in rows
    assert any(r.startswith("| `algorithm.amir.lambda_down` | float, > 0, < 1 | `0.8` |") for r in rows)
    assert any(r.startswith("| `data.synthetic.kinds` | list of (add, sub, mul, linear, word), at least 1 item(s) "
                            "| `[\"add\", \"mul\"]` |") for r in rows)
    assert any(r.startswith("| `algorithm.amir` | section | see [algorithm.amir](#algorithmamir) |") for r in rows)
    # a "|" inside a description is escaped, so it cannot split the table row
    assert "KL(pi_theta \\|\\| pi_ref)" in text


def test_check_mode_and_cli_subcommand(tmp_path, capsys):
    out = tmp_path / "config.md"
    assert main(["--check", "--out", str(out)]) == 1  # missing
    assert "missing" in capsys.readouterr().err
    assert cli_main(["config", "docs", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == config_reference()
    assert main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text(encoding="utf-8").replace("Peak learning rate", "Learning rate"), encoding="utf-8")
    assert cli_main(["config", "docs", "--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err and REGENERATE in err
