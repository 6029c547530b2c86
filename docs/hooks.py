"""MkDocs hook: the pages that are generated from the code and the committed results at build time.

- `reference/cli.md` from `prune.cli.build_parser()`: every flag, default, choice and help text is the
  parser's own.
- `reference/scorers.md` from `scoring.list_scorers()`: each scorer's `ScorerInfo`, options and class.
- `reference/api-*.md`: mkdocstrings directives for `prune.__all__`, `scoring.__all__` and the public
  names of `finetune`'s modules.
- `benchmarks/results/`: every plot (and the top-level JSON) is served under `results/`, next to the
  result pages, and a page line `<!-- include benchmarks/results/X.md -->` is replaced by that file,
  its headings moved one level down, so a table on the site is the file the benchmark wrote.
- `<!-- table NAME -->` becomes a table computed from the committed JSON (`TABLES`: the criteria
  summary, Table 12, speed, aligned widths, topology engine, memory), for the numbers no benchmark
  writes as a table of its own.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
INCLUDE = re.compile(r"^<!-- include (\S+) -->$", re.MULTILINE)
TABLE = re.compile(r"^<!-- table (\S+) -->$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~)")


def on_config(config):
    """Import this checkout's packages (not another installed copy)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return config


def on_files(files: Files, config) -> Files:
    """Add the generated pages and the result plots / JSON."""
    pages = {
        "reference/cli.md": cli_reference(),
        "reference/scorers.md": scorer_reference(),
        "reference/api-prune.md": api_prune(),
        "reference/api-scoring.md": api_scoring(),
        "reference/api-finetune.md": api_finetune(),
    }
    for uri, text in pages.items():
        files.append(File.generated(config, uri, content=text))
    for path in sorted([*RESULTS.rglob("*.png"), *RESULTS.glob("*.json")]):
        files.append(File.generated(config, f"results/{path.relative_to(RESULTS).as_posix()}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace include lines by the result files and table lines by their tables."""
    markdown = INCLUDE.sub(lambda m: included(m.group(1)), markdown)
    return TABLE.sub(lambda m: TABLES[m.group(1)](), markdown)


def included(relative: str) -> str:
    """A results file with its headings one level down (the page has its own title)."""
    path = ROOT / relative
    if not path.is_file():
        raise FileNotFoundError(f"docs include: {relative} does not exist")
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        lines.append("#" + line if not fenced and line.startswith("#") else line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def _flag_rows(parser: argparse.ArgumentParser) -> list[str]:
    formatter = argparse.HelpFormatter(parser.prog)  # the help text without the appended "(default: ...)"
    rows = []
    for action in parser._actions:
        flags = ", ".join(f"`{s}`" for s in action.option_strings)
        if action.metavar is not None:
            flags += f" `{action.metavar}`"
        elif action.nargs != 0 and action.choices is None:
            flags += f" `{action.dest.upper()}`"
        if action.default is argparse.SUPPRESS or action.nargs == 0:
            default = "—"
        else:
            default = f"`{action.default!r}`" if action.default not in (None, []) else f"`{action.default}`"
        choices = ", ".join(f"`{c}`" for c in action.choices) if action.choices is not None else ""
        help_text = formatter._expand_help(action) if action.help else ""
        rows.append(f"| {flags} | {_cell(default)} | {_cell(choices)} | {_cell(help_text)} |")
    return rows


def cli_reference() -> str:
    """The CLI page, from the parser `python -m prune` uses."""
    from prune.cli import build_parser

    parser = build_parser()
    return "\n".join([
        "# CLI reference",
        "",
        "Generated from `prune.cli.build_parser()` when the site is built: every flag, default and choice",
        "below is the parser's own. `python -m prune --help` prints the same.",
        "",
        f"`{parser.prog}`: {parser.description}",
        "",
        "| flag | default | choices | what |",
        "|---|---|---|---|",
        *_flag_rows(parser),
        "",
        "`--ratio` and `--epochs` have no parser default: a run without them takes `PruneConfig`'s",
        "(stated in their help), and `--epochs` given with `--reinit` overrides a shipped model's recipe.",
        "",
        "## `--help`",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
        "",
    ])


# ------------------------------------------------------------------------------------------- scorers


def scorer_reference() -> str:
    """The scorer list, from the registry."""
    import scoring
    from scoring.registry import _lookup

    rows, sections = [], []
    for name in scoring.list_scorers():
        info = scoring.scorer_info(name)
        cls = _lookup(name)
        options = scoring.scorer_options(name)
        opts = ", ".join(f"`{k}={v!r}`" for k, v in options.items()) or "—"
        rows.append(f"| [`{name}`](#{name}) | {'yes' if info.needs_data else 'no'} | {_cell(info.description)} | {opts} |")
        sections += [
            f"## `{name}` {{ #{name} }}",
            "",
            f"{info.description}. Needs data: {'yes' if info.needs_data else 'no'}. "
            f"Class `{cls.__module__}.{cls.__qualname__}`; options: {opts}.",
            "",
            f"::: {cls.__module__}.{cls.__qualname__}",
            "    options:",
            "      show_root_heading: false",
            "      show_root_toc_entry: false",
            "      members: false",
            "",
        ]
    return "\n".join([
        "# Scorers",
        "",
        "Generated from `scoring.list_scorers()` when the site is built: each registered scorer's",
        "`ScorerInfo` (whether it needs data, its description with the method's reference), its options",
        "(`--scorer-opt KEY=VALUE`, with their defaults) and its class's docstring. Every scorer returns",
        "a 1-D float tensor `[C]` over the layer's output channels, **higher = more important = keep**.",
        "How they compare: [scorer comparison](../results/compare.md), [criteria vs oracle](../results/criteria.md);",
        "how to write one: [Scorers](../scorers.md).",
        "",
        "| name | data | description (reference) | options |",
        "|---|---|---|---|",
        *rows,
        "",
        *sections,
    ])


# ---------------------------------------------------------------------------------------- Python API


def _directive(path: str) -> list[str]:
    return [f"::: {path}", ""]


def api_prune() -> str:
    """Every name of `prune.__all__`, through the module that defines it."""
    import prune

    lines = ["# `prune`", "", "Generated from `prune.__all__` when the site is built.", ""]
    lines += ["::: prune", "    options:", "      members: false", "      show_root_heading: false", ""]
    for name in prune.__all__:
        if name == "__version__":
            lines += ["## `prune.__version__`", "", f"The installed version, `{prune.__version__}`: "
                      "defined once, in `prune/version.py`.", ""]
            continue
        module = prune._EXPORTS[name]
        lines += _directive(f"{module}.{name}")
    return "\n".join(lines)


def api_scoring() -> str:
    """Every name of `scoring.__all__`."""
    import scoring

    lines = ["# `scoring`", "", "Generated from `scoring.__all__` when the site is built.", "",
             "::: scoring", "    options:", "      members: false", "      show_root_heading: false", ""]
    for name in scoring.__all__:
        obj = getattr(scoring, name)
        lines += _directive(f"{obj.__module__}.{name}")
    return "\n".join(lines)


def finetune_public() -> dict[str, list[str]]:
    """finetune's modules and the public names each defines (not imported), in source order."""
    import importlib
    import inspect
    import pkgutil

    import finetune

    public = {}
    for info in pkgutil.iter_modules(finetune.__path__):
        module = importlib.import_module(f"finetune.{info.name}")
        names = getattr(module, "__all__", None)
        if names is None:
            source = inspect.getsource(module)
            names = [n for n in re.findall(r"^(?:def|class) (\w+)|^(\w+)\s*[:=]", source, re.MULTILINE)
                     for n in n if n]
            names = [n for n in dict.fromkeys(names) if not n.startswith("_") and n != "logger"]
        public[module.__name__] = list(names)
    return public


def api_finetune() -> str:
    """The public names of finetune's modules."""
    lines = ["# `finetune`", "", "Generated from the public names of `finetune`'s modules when the site is built.", "",
             "::: finetune", "    options:", "      members: false", "      show_root_heading: false", ""]
    for module, names in finetune_public().items():
        lines += [f"## `{module}`", "", f"::: {module}", "    options:", "      members: false",
                  "      show_root_heading: false", ""]
        for name in names:
            lines += [f"::: {module}.{name}", "    options:", "      heading_level: 3", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- criteria summary


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def criteria_summary() -> str:
    """Per testbed and criterion, over the layers: ρ range (mean), layers whose interval excludes 0,
    top-20% recall, split-half ρ and layer top-1, from `criteria.json`."""
    data = json.loads((RESULTS / "criteria.json").read_text())
    out = ["| testbed | criterion | ρ with the oracle, per layer (mean) | layers whose interval excludes 0 | "
           "top-20% recall | split-half ρ | layer top-1, half zeroed |", "|---|---|---|---|---|---|---|"]
    for testbed in data["settings"]["testbeds"]:
        for scorer in data["settings"]["arms"]:
            rows = [r for r in data["rows"] if r["testbed"] == testbed and r["scorer"] == scorer]
            if not rows:
                continue
            rho = [r["rho"] for r in rows]
            negative = sum(r["rho_high"] < 0 for r in rows)
            excluded = sum(r["rho_low"] > 0 for r in rows) + negative
            note = "" if not negative else (" (both negative)" if negative == excluded == 2 else f" ({negative} negative)")
            halves = [r["split_half"] for r in rows if r["split_half"] is not None]
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            out.append(
                f"| {testbed} | {scorer} | {_signed(min(rho))} … {_signed(max(rho))} ({_signed(mean(rho))}) | "
                f"{excluded} of {len(rows)}{note} | {mean([r['top20_recall'] for r in rows]):.2f} | "
                f"{f'{mean(halves):.2f}' if halves else '—'} | {mean([r['layer_top1'] for r in rows]):.3f} |")
    random = []
    for testbed in data["settings"]["testbeds"]:
        layers = [r for r in data["layers"] if r["testbed"] == testbed]
        stats = [sum(r[k] for r in layers) / len(layers) for k in ("random_top1_min", "random_top1_mean", "random_top1_max")]
        random.append(f"`{testbed}` worst {stats[0]:.3f}, mean {stats[1]:.3f}, best {stats[2]:.3f}")
    return "\n".join(out) + "\n\nRandom halves, mean over layers: " + "; ".join(random) + "."


# --------------------------------------------------------------------------------- other JSON tables


def _json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def table12() -> str:
    """VGG16 params and FLOPs beside the paper's Table 12."""
    data = _json("table12.json")
    out = [f"VGG16 at 224², rounding `{data['rounding']}`:", "",
           "| ratio | params | paper | FLOPs | paper | params diff | FLOPs diff |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['ratio']} | {r['params'] / 1e6:.1f}M | {r['paper_params'] / 1e6:.1f}M | "
                   f"{r['flops'] / 1e9:.2f}G | {r['paper_flops'] / 1e9:.2f}G | {r['params_rel_diff']:+.2%} | "
                   f"{r['flops_rel_diff']:+.2%} |")
    return "\n".join(out)


RUNTIMES = {"eager": "eager NCHW", "eager_channels_last": "channels-last", "onnxruntime": "ONNX Runtime"}


def speed() -> str:
    """Unpruned and pruned img/s of every `speed-*.json`."""
    out = ["| file | runtime | threads | batch | unpruned img/s | pruned img/s | speed-up | FLOPs ratio |",
           "|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("speed-*.json")):
        data = json.loads(path.read_text())
        runs = data.get("runtimes") or {("eager_channels_last" if data["unpruned"]["channels_last"] else "eager"): data}
        for runtime, run in runs.items():
            runtime = RUNTIMES[runtime]
            u, p = run["unpruned"], run["pruned"]
            out.append(f"| `{path.name}` | {runtime} | {u['threads']} | {u['batch_size']} | "
                       f"{u['img_per_s']:.1f} | {p['img_per_s']:.1f} | {run['speedup']:.2f}× | {data['flops_ratio']:.2f}× |")
    return "\n".join(out)


def round_to() -> str:
    """Speed-up ÷ FLOPs ratio per `--round-to` N and runtime, from `round_to-*.json`."""
    out = ["| model, ratio (eager / channels-last / ONNX Runtime) | N = 1 | N = 8 | N = 16 | N = 32 |",
           "|---|---|---|---|---|"]
    for model, label in (("vgg16", "VGG16"), ("resnet50", "ResNet-50")):
        for ratio in ("0.5", "0.3"):
            path = RESULTS / f"round_to-{model}-r{ratio}-cpu.json"
            if not path.exists():
                continue
            data = json.loads(path.read_text())
            cells = [" / ".join(f"{row['speedup_over_flops'][k]:.2f}" for k in ("eager", "eager_channels_last", "onnxruntime"))
                     for row in data["round_to"].values()]
            out.append(f"| {label} {ratio} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def topology() -> str:
    """Birth-time engine against gudhi per map side, and VGG16's topology against its forward pass."""
    data = _json("topology.json")
    out = ["| m | maps | engine ms / unit | gudhi ms / unit | speed-up |", "|---|---|---|---|---|"]
    for r in data["sizes"]:
        out.append(f"| {r['m']} | {r['family']} | {r['engine_ms']:.4f} | {r['gudhi_ms']:.2f} | {r['speedup']:,.0f}× |")
    v = data["vgg16"]
    return "\n".join(out) + (f"\n\nVGG16, {v['layers']} conv layers, {v['images']} images at 224²: birth times "
                             f"{v['topology_s']:.1f} s, the forward passes {v['forward_s']:.1f} s (ratio {v['ratio']:.2f}).")


def memory() -> str:
    """Peak memory and seconds per layer of every scorer on VGG16: the table benchmarks.memory writes."""
    if not (RESULTS / "memory.md").is_file():
        return "Not measured yet: run `python -m benchmarks.memory`."
    return included("benchmarks/results/memory.md")


TABLES = {
    "criteria-summary": criteria_summary,
    "table12": table12,
    "speed": speed,
    "round-to": round_to,
    "topology": topology,
    "memory": memory,
}
