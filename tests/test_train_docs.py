"""docs/TRAINING.md stays true: its config reference lists every key of every section with
the default the code uses, and nothing else; its full example is a valid config."""
import os
import re
import tomllib

from flame.train import config as C

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "TRAINING.md")


def doc_text():
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def reference_tables(text):
    """{section: {key: default cell}} from the '### [section]' tables."""
    out, section = {}, None
    for line in text.splitlines():
        m = re.match(r"^### \[\[?(\w+)\]?\]$", line)
        if m:
            section = m.group(1)
            out[section] = {}
            continue
        m = re.match(r"^\| `(\w+)` \|.*?\| `([^`]*)` \|", line)
        if m and section:
            out[section][m.group(1)] = m.group(2)
        elif line.startswith("## "):
            section = None
    return out


def default_cell(key):
    if key.default is C.REQUIRED:
        return "required"
    if key.default is None:
        return "unset"
    if isinstance(key.default, bool):
        return str(key.default).lower()
    return repr(key.default).replace("'", '"')


def test_reference_lists_every_key_with_its_default():
    tables = reference_tables(doc_text())
    assert set(tables) == set(C.KEYS)
    for s, keys in C.KEYS.items():
        assert list(tables[s]) == list(keys), s
        for k, key in keys.items():
            assert tables[s][k] == default_cell(key), f"{s}.{k}"


def test_full_example_is_a_valid_config():
    text = doc_text()
    block = text.split("## A full example", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = C.from_dict(tomllib.loads(block), "docs/TRAINING.md", "/base")
    assert cfg["network"]["conv_rank"] == 8 and len(cfg["data"]) == 2
    assert cfg["data"][1]["missing_caption"] == "skip"
