"""The README's examples work: its nft rules load, its Python imports and names exist."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as f:
    README = f.read()


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_starts_with_the_two_commands():
    first = [line.strip() for line in README.splitlines() if line.startswith("    make ")][:2]
    assert [line.split("#")[0].strip() for line in first] == ["make run", "make test"]


def test_nft_rules_load(netns):
    lines = [line for b in blocks("sh") for line in b.splitlines() if line.startswith("nft ")]
    assert len(lines) >= 4
    for line in lines:
        res = netns.run("sh", "-c", line, check=False)
        assert res.returncode == 0, f"{line}: {res.stderr}"
    ruleset = netns.run("nft", "list", "ruleset").stdout
    assert "log group 5" in ruleset and 'log prefix "in " group 0 snaplen 128' in ruleset


@pytest.mark.parametrize("code", blocks("python"))
def test_python_snippets_import_what_they_use(code):
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = __import__(node.module, fromlist=["_"])
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
