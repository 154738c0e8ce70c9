"""The README's configuration table is what users read: it must list every variable the tool reads."""

from pathlib import Path

from otel_ebpf.config import SETTINGS_DOC

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented_with_its_default():
    for variable, default, _ in SETTINGS_DOC:
        row = next((line for line in README.splitlines() if line.startswith(f"| `{variable}` |")), None)
        assert row is not None, f"{variable} is missing from the README's configuration table"
        assert (f"`{default}`" if default else "—") in row, f"{variable}: README shows another default"


def test_the_two_commands_are_documented():
    assert "`make demo`" in README and "`make test`" in README
