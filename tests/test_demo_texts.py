"""Tests of the plain-text distributions from Debian packages: fetching, parsing, chunking, splitting, caching.

Offline: tiny fake package trees stand in for the real ones (the fetch is monkeypatched, or a fake
`apt-get` on PATH hands out a tiny `.deb` built with `dpkg-deb -b`). One test fetches the real
`jargon-text` package and skips when the Debian archive cannot be reached.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from dem_hf import demo
from dem_hf.demo import debian, distributions, texts

SMALL = {"n_train": 6, "n_val": 2, "n_test": 2}
VERSIONS = {"bible-kjv-text": "4.38", "bible-kjv": "4.38", "python3.11-doc": "3.11.2-6+deb12u8",
            "jargon-text": "4.4.7-4.1", "fortunes": "1:1.99.1-7.3"}


def _sentence(tag: str, words: int = 14) -> str:
    return " ".join(f"{tag}w{i}" for i in range(words)) + "."


# -- fake unpacked packages -------------------------------------------------------------------------------

BOOKS = ("Ge", "Ex", "Le", "Nu", "De", "Jos", "Jud", "Ru", "1Sa", "2Sa", "Mt", "Mr")


def _bible_lines() -> list[str]:
    return [f"{book}{chapter}:{verse} {_sentence(f'{book}c{chapter}v{verse}')}"
            for book in BOOKS for chapter in (1, 2) for verse in range(1, 4)]


def _write_executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def fake_package(package: str, root: Path) -> None:
    """Write a tiny stand-in for the unpacked Debian `package` under `root`."""
    if package == "bible-kjv-text":
        (root / "usr/lib").mkdir(parents=True)
        (root / "usr/lib/bible.data").write_bytes(b"EC02Compressed Data File")
    elif package == "bible-kjv":  # the reader prints every verse, checking it was given the data folder
        lines = "\n".join(_bible_lines())
        _write_executable(root / "usr/bin/bible", f'#!/bin/sh\ntest -f "$3/bible.data" || exit 3\ncat <<"EOF"\n{lines}\nEOF\n')
    elif package == "python3.11-doc":
        sources = root / "usr/share/doc/python3.11/html/_sources"
        for index in range(12):
            document = sources / ("library" if index % 2 else "tutorial") / f"doc{index}.rst.txt"
            document.parent.mkdir(parents=True, exist_ok=True)
            body = f"Title {index}\n========\n\n{_sentence(f'd{index}p1')}\nsecond line of the paragraph.\n\n"
            body += f"   >>> code_{index}()\n   ...     indented\n\n{_sentence(f'd{index}p2', 30)}\n"
            document.write_text(body)
    elif package == "jargon-text":
        entries = "".join(f"   :term{index}: n.\n\n   {_sentence(f'j{index}a')}\n   wrapped line.\n\n   "
                          f"{_sentence(f'j{index}b', 6)}\n\n" + ("   B\n\n" if index == 5 else "")
                          for index in range(12))
        text = f"The Jargon File\n\n   Glossary\n\n   term0\n\n{entries}   Part III. Appendices\n\n   :not an entry: x\n"
        path = root / "usr/share/doc/jargon-text/jargon.txt.gz"
        path.parent.mkdir(parents=True)
        path.write_bytes(gzip.compress(text.encode()))
    elif package == "fortunes":
        folder = root / "usr/share/games/fortunes"
        folder.mkdir(parents=True)
        for name in ("art", "computers", "food", "law", "love", "news", "people", "pets", "science", "work", "zen", "tao"):
            fortunes = [f"{_sentence(f'{name}f{i}', 8)}\n\t\t-- Someone {i}" for i in range(6)]
            (folder / name).write_text("\n%\n".join(fortunes) + "\n%\n")
            (folder / f"{name}.dat").write_bytes(b"\x00\x02index")
            (folder / f"{name}.u8").symlink_to(name)
    else:
        raise KeyError(package)


@pytest.fixture
def fake_fetch(monkeypatch):
    """Replace `apt-get download` + `dpkg-deb -x` by writing the fake trees; records each fetch."""
    fetched: list[str] = []

    def download_and_unpack(package: str, into: Path) -> str:
        fetched.append(package)
        fake_package(package, into / "root")
        return VERSIONS[package]

    monkeypatch.setattr(debian, "_download_and_unpack", download_and_unpack)
    monkeypatch.setattr(debian.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    return fetched


def _no_partial_folders(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith((".partial", ".old"))]


# -- chunking ---------------------------------------------------------------------------------------------


def test_chunk_units_packs_whole_units_and_drops_oversized_and_tiny_ones():
    a, b, c = "a" * 60, "b" * 50, "c" * 70
    # a+b fit in 120 (60 + 2 + 50 = 112); c starts a new chunk; the 130-character unit is dropped and
    # ends the chunk before it; the lone "d" chunk is under the minimum of 100 characters.
    units = [a, b, c, "x" * 130, "d" * 40, "e" * 100]
    assert texts._chunk_units(units, 120) == [f"{a}\n\n{b}", "e" * 100]
    assert texts._chunk_units([a, b], 200, " ") == [f"{a} {b}"]
    assert texts._chunk_units([], 200) == []


def test_paragraphs_reflow_prose_and_keep_indented_blocks():
    text = "   First line\n   second  line.\n\n\n   >>> f()\n      indented more\n\t\n   Last."
    assert texts._paragraphs(text) == ["First line second line.", ">>> f()\n   indented more", "Last."]


def test_unique_items_keep_the_first_copy_of_a_chunk():
    items = texts._unique_items([("g1", ["Same  text", "other"]), ("g2", ["same text", "new"])])
    assert items == [("g1", {"text": "Same  text"}), ("g1", {"text": "other"}), ("g2", {"text": "new"})]


# -- parsers on the fake trees ---------------------------------------------------------------------------


def _roots(tmp_path: Path, *packages: str) -> dict[str, Path]:
    roots = {}
    for package in packages:
        fake_package(package, tmp_path / package)
        roots[package] = tmp_path / package
    return roots


def test_bible_records_are_whole_verses_of_one_chapter_grouped_by_book(tmp_path):
    items = texts._bible_items(_roots(tmp_path, "bible-kjv-text", "bible-kjv"), 300)
    assert len(_sentence("Gec1v1")) == 130  # two verses and a space fit in 300 characters, three do not
    assert items[:4] == [
        ("Ge", {"text": f"{_sentence('Gec1v1')} {_sentence('Gec1v2')}"}),
        ("Ge", {"text": _sentence("Gec1v3")}),
        ("Ge", {"text": f"{_sentence('Gec2v1')} {_sentence('Gec2v2')}"}),  # a new chapter starts a new chunk
        ("Ge", {"text": _sentence("Gec2v3")}),
    ]
    for group, record in items:
        words = record["text"].split()
        assert {w.split("c")[0] for w in words} == {group}  # one book
        assert len({w.split("v")[0] for w in words}) == 1  # one chapter
    assert {group for group, _ in items} == set(BOOKS)


def test_pydocs_records_are_paragraphs_of_the_rest_sources_grouped_by_document(tmp_path):
    items = texts._pydocs_items(_roots(tmp_path, "python3.11-doc"), 300)
    groups = {group for group, _ in items}
    assert groups == {f"{'library' if i % 2 else 'tutorial'}/doc{i}.rst.txt" for i in range(12)}
    first = [record["text"] for group, record in items if group == "tutorial/doc0.rst.txt"]
    # reST keeps its lines and indentation (headings, code blocks); only blank lines separate paragraphs.
    assert first == [f"Title 0\n========\n\n{_sentence('d0p1')}\nsecond line of the paragraph.\n\n"
                     "   >>> code_0()\n   ...     indented",
                     _sentence("d0p2", 30)]


def test_pydocs_falls_back_to_text_stripped_from_the_html(tmp_path):
    html = tmp_path / "usr/share/doc/python3.11/html"
    (html / "library").mkdir(parents=True)
    (html / "_static").mkdir()
    (html / "_static/x.html").write_text("<p>" + "static " * 30 + "</p>")
    (html / "genindex.html").write_text("<p>" + "index " * 30 + "</p>")
    (html / "library/os.html").write_text(
        "<html><head><title>os</title><script>var x = 1;</script></head><body><nav>Navigation</nav>"
        f"<h1>os &mdash; Miscellaneous</h1><p>{_sentence('p1')}\n{_sentence('p1b')}</p>"
        "<pre>def f():\n    return 1\n</pre></body></html>"
    )
    items = texts._pydocs_items({"python3.11-doc": tmp_path}, 1000)
    assert items == [("library/os.html", {"text": f"os — Miscellaneous\n\n{_sentence('p1')} {_sentence('p1b')}\n\n"
                                                  "def f():\n    return 1"})]


def test_jargon_records_are_whole_entries_of_the_lexicon(tmp_path):
    items = texts._jargon_items(_roots(tmp_path, "jargon-text"), 1000)
    assert [group for group, _ in items] == [f"term{i}" for i in range(12)]  # not the appendix's
    assert items[5][1]["text"] == f":term5: n.\n\n{_sentence('j5a')} wrapped line.\n\n{_sentence('j5b', 6)}"  # no "B"
    # A long entry is cut into whole paragraphs (the short last one is dropped).
    cut = texts._jargon_items(_roots(tmp_path / "again", "jargon-text"), 150)
    assert cut[0] == ("term0", {"text": f":term0: n.\n\n{_sentence('j0a')} wrapped line."})


def test_fortune_records_are_whole_fortunes_grouped_by_file(tmp_path):
    items = texts._fortunes_items(_roots(tmp_path, "fortunes"), 200)
    fortune = f"{_sentence('artf0', 8)}\n                -- Someone 0"  # tabs expanded
    assert items[0] == ("art", {"text": fortune + "\n\n" + fortune.replace("f0", "f1").replace("Someone 0", "Someone 1")})
    assert len({group for group, _ in items}) == 12 and all("%" not in r["text"] for _, r in items)


# -- prepare_distributions ---------------------------------------------------------------------------------


def _group_of(name: str, text: str) -> str:
    first = text.split()[0]
    return {"bible": lambda: first.split("c")[0], "pydocs": lambda: text.split()[1],
            "jargon": lambda: first, "fortunes": lambda: first.split("f")[0]}[name]()


@pytest.mark.parametrize("name", ["bible", "pydocs", "jargon", "fortunes"])
def test_prepare_text_distribution_splits_by_group_and_caches(tmp_path, fake_fetch, name, monkeypatch):
    data = demo.prepare_distributions(tmp_path, [name], **SMALL, max_chars=300)[name]
    assert {split: len(rows) for split, rows in data.items()} == {"train": 6, "validation": 2, "test": 2}
    assert all(data[split].column_names == ["text"] for split in data)
    groups = {split: {_group_of(name, text) for text in data[split]["text"]} for split in data}
    assert not groups["train"] & groups["validation"] and not groups["train"] & groups["test"]
    assert not groups["validation"] & groups["test"]
    assert all(100 <= len(text) <= 300 for split in data for text in data[split]["text"])

    packages = texts.DEBIAN_PACKAGES[name]
    assert fake_fetch == list(packages)
    for package in packages:
        info = json.loads((tmp_path / "debian" / package / "package.json").read_text())
        assert info == {"package": package, "version": VERSIONS[package]}
    [folder] = (tmp_path / "distributions").iterdir()
    tag = "+".join(f"{p}_{VERSIONS[p].replace(':', '%3a')}" for p in packages)
    assert folder.name.startswith(f"{name}-{tag}-n6-2-2-seed0-max300")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["source"] == tag and meta["format"] == "text" and meta["columns"] == ["text"]

    # The second call reads the cache: no fetch, no parsing.
    monkeypatch.setattr(texts, "TEXT_ITEMS", {})
    monkeypatch.setattr(distributions, "TEXT_ITEMS", {})
    again = demo.prepare_distributions(tmp_path, [name], **SMALL, max_chars=300)[name]
    assert fake_fetch == list(packages)
    assert all(list(again[split]["text"]) == list(data[split]["text"]) for split in data)
    assert _no_partial_folders(tmp_path)


def test_a_new_package_version_is_a_new_cache_folder(tmp_path, fake_fetch):
    demo.prepare_distributions(tmp_path, "jargon", **SMALL)
    info_file = tmp_path / "debian/jargon-text/package.json"
    info_file.write_text(json.dumps({"package": "jargon-text", "version": "4.4.8-1"}))
    demo.prepare_distributions(tmp_path, "jargon", **SMALL)
    names = sorted(p.name for p in (tmp_path / "distributions").iterdir())
    assert [n.split("-n6")[0] for n in names] == ["jargon-jargon-text_4.4.7-4.1", "jargon-jargon-text_4.4.8-1"]


def test_the_demo_defaults_stay_the_four_original_distributions():
    assert demo.DEFAULT_DISTRIBUTIONS == ("math", "chat", "champ", "code")
    assert set(demo.DISTRIBUTIONS) == set(demo.DEFAULT_DISTRIBUTIONS) | {"bible", "pydocs", "jargon", "fortunes"}
    from dem_hf.demo.pipeline import DemoConfig

    assert DemoConfig().distributions == ["math", "chat", "champ", "code"]
    assert DemoConfig(distributions=["bible", "fortunes"]).distributions == ["bible", "fortunes"]
    assert demo.install_commands(["bible", "pydocs", "jargon", "fortunes"], model=False) == []


# -- fetching: errors, and the real commands --------------------------------------------------------------


def test_missing_tools_name_the_commands_to_run_by_hand(tmp_path, monkeypatch):
    monkeypatch.setattr(debian.shutil, "which", lambda tool: None if tool == "dpkg-deb" else "/usr/bin/apt-get")
    with pytest.raises(RuntimeError, match=r"`dpkg-deb` is not on PATH") as error:
        demo.prepare_distributions(tmp_path, ["code", "jargon"], **SMALL)
    assert "apt-get download jargon-text && dpkg-deb -x jargon-text_*.deb" in str(error.value)
    assert not tmp_path.exists() or not list(tmp_path.iterdir())  # refused before any work, "code" included


def _fake_apt_get(tmp_path: Path, monkeypatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    _write_executable(bin_dir / "apt-get", "#!/bin/sh\n" + script)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_a_failed_download_gives_the_command_and_its_stderr_and_leaves_nothing(tmp_path, monkeypatch):
    if shutil.which("dpkg-deb") is None:
        monkeypatch.setattr(debian, "missing_tools", lambda *args: [])
    _fake_apt_get(tmp_path, monkeypatch, 'echo "E: Unable to locate package $2" >&2\nexit 100\n')
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=r"`apt-get download fortunes` failed with exit status 100:\n"
                                           r"E: Unable to locate package fortunes"):
        demo.prepare_distributions(cache, "fortunes", **SMALL)
    assert list((cache / "debian").iterdir()) == []


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")
def test_fetch_unpacks_a_real_deb_once_and_records_its_version(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    fake_package("jargon-text", tree)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN/control").write_text(
        "Package: jargon-text\nVersion: 1:4.4.7-4.1\nArchitecture: all\nMaintainer: Test <t@example.org>\n"
        "Description: test\n"
    )
    deb = tmp_path / "jargon-text_1%3a4.4.7-4.1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)], check=True, capture_output=True)
    log = tmp_path / "apt-get.log"
    _fake_apt_get(tmp_path, monkeypatch, f'echo "$@" >> "{log}"\ncp "{deb}" .\n')

    package = debian.fetch_debian_package(tmp_path / "cache", "jargon-text")
    assert package.version == "1:4.4.7-4.1"
    assert package.root == tmp_path / "cache/debian/jargon-text/root"
    assert (package.root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes() == (
        tree / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()
    assert debian.fetch_debian_package(tmp_path / "cache", "jargon-text") == package
    assert log.read_text() == "download jargon-text\n"  # fetched once
    data = demo.prepare_distributions(tmp_path / "cache", "jargon", **SMALL)["jargon"]
    assert len(data["train"]) == 6 and log.read_text() == "download jargon-text\n"
    assert (tmp_path / "cache/distributions").iterdir().__next__().name.startswith("jargon-jargon-text_1%3a4.4.7-4.1-")

    monkeypatch.chdir(tmp_path)  # a relative cache folder (the demo's default is `examples/.cache`)
    relative = debian.fetch_debian_package("relative-cache", "jargon-text")
    assert relative.version == "1:4.4.7-4.1" and (tmp_path / "relative-cache/debian/jargon-text/root/usr").is_dir()


def test_real_fetch_of_jargon_text(tmp_path, monkeypatch):
    """The real `apt-get download jargon-text` (650 kB); skipped where the Debian archive is out of reach."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get or dpkg-deb is not installed")
    monkeypatch.setattr(debian, "_COMMAND_TIMEOUT_S", 60)
    try:
        package = debian.fetch_debian_package(tmp_path, "jargon-text")
    except RuntimeError as error:
        pytest.skip(f"the Debian archive is out of reach: {error}")
    assert package.version and (package.root / "usr/share/doc/jargon-text/jargon.txt.gz").is_file()
    items = texts._jargon_items({"jargon-text": package.root}, demo.DEFAULT_MAX_CHARS["jargon"])
    assert len(items) > 2000 and len({group for group, _ in items}) > 1900
    assert any(record["text"].startswith(":hacker: n.") for _, record in items)
