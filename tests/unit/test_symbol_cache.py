"""otel_ebpf.symbols.cache: parsed symbol tables kept across runs. Each run here is a new Python process, as a
new otel-ebpf run would be; the in-process cache does not hide anything."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from otel_ebpf.symbols import cache
from tests.unit.debug_builds import build_app, place_by_build_id

REPO = Path(__file__).resolve().parents[2]
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
# One run: resolve patterns in a binary with the cache under a given home, report names and the time it took.
RUN = """
import json, sys, time
from otel_ebpf import symbols
binary, patterns, home, debug_root = json.loads(sys.argv[1])
options = symbols.Options(cache_home=home, symbol_cache=True, debug_root=debug_root or "/usr/lib/debug")
started = time.perf_counter()
try:
    found = symbols.resolve(binary, patterns, options)
except symbols.UserError as err:
    print(json.dumps({"error": str(err)}))
else:
    print(json.dumps({"names": [f.demangled for f in found], "seconds": time.perf_counter() - started}))
"""


def run(binary, patterns, home, debug_root=None) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, json.dumps([str(binary), patterns, str(home), debug_root])],
                          capture_output=True, text=True, timeout=120, cwd=REPO, check=True)
    return json.loads(done.stdout)


def tables(home: Path) -> list[Path]:
    return sorted((home / "otel-ebpf" / "symbols").glob("*.json"))


def tamper(table: Path, name: str, replacement: str) -> None:
    """Rename a function inside a stored table: a run that shows the new name read the cache."""
    value = json.loads(table.read_text())
    for entry in value["entries"]:
        if entry[0] == name:
            entry[1] = replacement
            entry[5].append(replacement)
    table.write_text(json.dumps(value))


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return build_app(tmp_path_factory.mktemp("build"))


def test_table_is_shared_by_every_copy_with_the_same_build_id(build, tmp_path):
    home = tmp_path / "home"
    assert run(build.original, ["exported_work"], home)["names"] == ["exported_work"]
    (table,) = tables(home)
    tamper(table, "exported_work", "from_the_cache")
    copy = tmp_path / "elsewhere" / "app"
    copy.parent.mkdir()
    copy.write_bytes(build.original.read_bytes())
    assert run(copy, ["from_the_cache"], home)["names"] == ["from_the_cache"]


def test_without_build_id_the_path_size_time_and_inode_are_the_key(tmp_path):
    plain = build_app(tmp_path / "plain", flags=("-Wl,--build-id=none",))
    home = tmp_path / "home"
    run(plain.original, ["exported_work"], home)
    (table,) = tables(home)
    tamper(table, "exported_work", "from_the_cache")
    assert run(plain.original, ["from_the_cache"], home)["names"] == ["from_the_cache"]
    copy = tmp_path / "copy"
    copy.write_bytes(plain.original.read_bytes())
    assert run(copy, ["exported_work"], home)["names"] == ["exported_work"]
    os.utime(plain.original, ns=(0, 0))
    assert run(plain.original, ["exported_work"], home)["names"] == ["exported_work"]


def test_a_debug_file_installed_later_is_not_hidden_by_the_cache(build, tmp_path):
    home, root = tmp_path / "home", tmp_path / "debug"
    root.mkdir()
    assert "is stripped" in run(build.stripped, ["local_helper"], home, str(root))["error"]
    place_by_build_id(build.debug, root, build.build_id)
    assert run(build.stripped, ["local_helper"], home, str(root))["names"] == ["local_helper"]


@pytest.mark.parametrize("damage", ["not json", "wrong shape"])
def test_damaged_table_is_read_again(build, tmp_path, damage):
    home = tmp_path / "home"
    run(build.original, ["exported_work"], home)
    (table,) = tables(home)
    table.write_text("{" if damage == "not json" else json.dumps({"entries": [[1, 2]], "kind": 3}))
    assert run(build.original, ["exported_work"], home)["names"] == ["exported_work"]
    assert json.loads(table.read_text())["kind"] == "symtab"


def test_unwritable_cache_is_silently_skipped(build, tmp_path):
    home = tmp_path / "a-file"  # nothing can be made under it, as on a read-only root filesystem
    home.write_text("")
    assert run(build.original, ["exported_work"], home)["names"] == ["exported_work"]


def test_at_most_64_tables_are_kept(tmp_path):
    directory = str(tmp_path / "symbols")
    for number in range(70):
        cache.store(directory, f"table{number:02}", {"n": number})
        os.utime(os.path.join(directory, f"table{number:02}.json"), ns=(number * 10**9, number * 10**9))
    kept = sorted(path.name for path in Path(directory).glob("*.json"))
    assert len(kept) == 64 and kept[0] == "table06.json" and cache.load(directory, "table69") == {"n": 69}


def test_libc_resolves_faster_from_the_cache(tmp_path, capsys):
    home = tmp_path / "home"
    cold = run(LIBC, ["_int_malloc", "str*"], home)
    warm = run(LIBC, ["_int_malloc", "str*"], home)
    assert warm["names"] == cold["names"] and "_int_malloc" in cold["names"]
    assert warm["seconds"] * 3 < cold["seconds"], (cold["seconds"], warm["seconds"])
    with capsys.disabled():
        print(f"\nresolving _int_malloc and str* in libc: {cold['seconds'] * 1000:.0f} ms without the cache, "
              f"{warm['seconds'] * 1000:.0f} ms with it ({len(cold['names'])} functions)")
