"""The documentation: the site builds with `mkdocs build --strict`, its generated references list every
flag and scorer, every public name has a docstring, and the README's links and commands hold."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import prune
import scoring
from prune.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


OTHER_TOOLS_FLAGS = {
    # torchrun, pip, benchmarks and mkdocs flags that the pages mention beside python -m prune's
    "--standalone", "--nproc_per_node", "--nnodes", "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id",
    "--quick", "--n-study", "--map-size-study", "--runtime", "--threads", "--channels-last", "--strict",
    "--test-per-class", "--deepest", "--finetune",
}


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text(page: Path) -> str:
    """A built page's visible text."""
    return html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def test_cli_reference_lists_every_flag_and_choice(site):
    text = _text(site / "reference" / "cli" / "index.html")
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{flag} missing from the CLI reference"
        for choice in action.choices or ():
            assert str(choice) in text, f"{action.option_strings[0]} choice {choice!r} missing from the CLI reference"


def test_scorer_page_lists_every_scorer(site):
    text = _text(site / "reference" / "scorers" / "index.html")
    for name in scoring.list_scorers():
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"scorer {name} missing from the scorer list"
        assert scoring.scorer_info(name).description in text, f"scorer {name}'s description missing"


def test_api_reference_lists_every_public_name(site):
    pages = {"prune": prune.__all__, "scoring": scoring.__all__,
             "finetune": [n for names in _hooks().finetune_public().values() for n in names]}
    for package, names in pages.items():
        text = _text(site / "reference" / f"api-{package}" / "index.html")
        for name in names:
            assert name in text, f"{package}.{name} missing from the API reference"


def _public_objects():
    """(label, griffe object) for every public name: prune.__all__, scoring.__all__, finetune's modules."""
    import griffe

    loader = griffe.GriffeLoader(search_paths=[str(ROOT)])
    packages = {name: loader.load(name) for name in ("prune", "scoring", "finetune")}
    loader.resolve_aliases(implicit=False, external=False)
    for package, names in (("prune", prune.__all__), ("scoring", scoring.__all__)):
        for name in names:
            yield f"{package}.{name}", packages[package][name]
    for module, names in _hooks().finetune_public().items():
        for name in names:
            yield f"{module}.{name}", packages["finetune"][module.removeprefix("finetune.")][name]


def test_every_public_name_has_a_docstring():
    missing = []
    for label, obj in _public_objects():
        target = obj.final_target if obj.is_alias else obj
        if not target.docstring or not target.docstring.value.strip():
            missing.append(label)
        if target.is_class:
            for name, member in target.members.items():
                if (not name.startswith("_") and not member.is_alias and member.is_function
                        and not member.docstring):
                    missing.append(f"{label}.{name}")
    assert not missing, f"public names without a docstring: {missing}"


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path = link.split("#")[0]
        assert (ROOT / path).exists(), f"README links to {link}, which does not exist"


def test_readme_test_command_is_what_ci_runs():
    readme = README.read_text(encoding="utf-8")
    assert 'pip install -e ".[test]" && ruff check . && python -m pytest' in readme
    ci = (ROOT / ".ci" / "run").read_text()
    for step in ('pip install -q -e ".[test]"', "ruff check .", "python -m pytest"):
        assert step in ci
    assert 'pip install -e ".[docs]" && mkdocs serve' in readme


def test_flags_written_in_the_docs_exist():
    known = {flag for action in build_parser()._actions for flag in action.option_strings} | OTHER_TOOLS_FLAGS
    pages = [README, *(ROOT / "docs").rglob("*.md")]
    for page in pages:
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*[a-z]", page.read_text(encoding="utf-8")):
            assert flag in known, f"{page.relative_to(ROOT)} mentions {flag}, which python -m prune does not take"
