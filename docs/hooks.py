"""MkDocs hook: pages generated from the package itself, so they cannot drift from it.

- ``figures/<spec>.md``: one page per shipped experiment spec (what it runs, per preset, the
  commands, which of the study's claims ``flatprior claims`` checks on its runs);
- ``measures.md``: the measure registry (:data:`flatprior.measures.REGISTRY`) as a table;
- ``api/flatprior.md``: the top-level names of ``import flatprior as fp``.

Reads only flatprior's torch-free modules (specs, config, measures); no network.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

#: which claims (letters of flatprior.analysis.claims) each spec's runs feed
CLAIMS_OF_SPEC = {
    "fig2-boolean": "d",
    "fig3": "ab",
    "fig4": "ab",
    "figS18": "ab",
    "figS11-16": "abf",
    "fig5": "cf",
    "figS9": "cf",
    "figS19": "ab",
}


def _claims() -> dict[str, str]:
    """Claim letter -> its description, from the claims module's docstring (torch-free read)."""
    text = (Path(__file__).resolve().parents[1] / "src/flatprior/analysis/claims.py").read_text()
    doc = text.split('"""')[1]
    items = re.findall(r"^- \*\*\((\w)\)\*\* (.+?)(?=^- \*\*|^\S|\Z)", doc, re.S | re.M)
    return {k: " ".join(v.split()) for k, v in items}


def _spec_page(name: str, spec, claims: dict[str, str]) -> str:
    from flatprior.experiments.specs import PRESETS, resolve

    how = ("compatible runs are trained together as ensembles (`--ensemble auto`; "
           "`--ensemble off` for one task per run)" if spec.ensemble == "auto"
           else "one task per run (`--ensemble off`; `--ensemble auto` trains compatible runs "
           "together)")
    lines = [f"# {spec.reproduces}: `{name}`", "", f"**{spec.title}**", "",
             spec.description, "", f"`flatprior run {name}` default: {how}.", ""]
    for v in list(spec.variants) or [None]:
        head = f"## Variant `{v}`" if v else "## Runs"
        lines += [head, ""]
        if v and spec.variants[v].description:
            lines += [spec.variants[v].description, ""]
        lines += ["| preset | runs | sharpness | needs | command |", "|---|---|---|---|---|"]
        for p in PRESETS:
            r = resolve(spec, p, v, build=False)
            cmd = f"flatprior run {name}{' ' + v if v else ''} --preset {p} --out results.db"
            needs = (r.needs or "–").replace("|", "\\|")
            lines.append(f"| `{p}` | {r.n_runs} | {r.sharpness_settings()} | {needs} | "
                         f"`{cmd}` |")
        lines.append("")
        lines += _config_table(spec, v)
    lines += ["## Analysis", "",
              "```bash",
              "flatprior report results.db --out report.html   # figures and correlations",
              "flatprior claims results.db                     # verdicts on the claims below",
              "```", "", "Claims whose verdicts these runs feed:", ""]
    for letter in CLAIMS_OF_SPEC.get(name, ""):
        lines.append(f"- **({letter})** {claims.get(letter, '')}")
    return "\n".join(lines) + "\n"


def _config_table(spec, variant) -> list[str]:
    """Run fields per preset: a value, or the swept values."""
    from flatprior.experiments.specs import PRESETS, resolve, sweep_for_display

    res = {p: resolve(spec, p, variant, build=False) for p in PRESETS}
    shown = {p: sweep_for_display(r.sweep) for p, r in res.items()}
    names = list(dict.fromkeys(k for r in res.values() for k in (*r.base, *r.sweep)))

    def cell(p, k):
        r = res[p]
        if k in r.sweep:
            return "sweep " + json.dumps(shown[p][k], default=str)
        return json.dumps(r.base[k], default=str) if k in r.base else "(default)"

    lines = ["| run field | " + " | ".join(f"`{p}`" for p in PRESETS) + " |",
             "|---|" + "---|" * len(PRESETS)]
    for k in names:
        row = " | ".join(cell(p, k).replace("|", "\\|") for p in PRESETS)
        lines.append(f"| `{k}` | {row} |")
    return [*lines, ""]


def _figures_index(specs) -> str:
    lines = ["# Paper figures", "",
             "Every experiment of the study is a spec shipped with the package "
             "(`flatprior list` shows them). Each page says what the spec runs per preset "
             "(`quick`: a laptop CPU; `paper`: the study's sizes), the command, and which of "
             "the study's claims `flatprior claims` decides from its runs.", "",
             "| spec | reproduces | title |", "|---|---|---|"]
    for name, s in specs.items():
        lines.append(f"| [`{name}`]({name}.md) | {s.reproduces} | {s.title} |")
    return "\n".join(lines) + "\n"


def _measures_page() -> str:
    from flatprior.measures import REGISTRY

    lines = ["# Measures", "",
             "The measure registry `flatprior.measures.REGISTRY`: every measure a run can take "
             "(`RunConfig.measures`, `flatprior train --measures`). The pipeline, the analysis "
             "and the CLI read this table; adding a measure is one `Measure(...)` entry plus "
             "its function (see [config and measures](api/config.md)).", "",
             "| name | kind | what | unit | cost | column | log10 in Pearson | writes |",
             "|---|---|---|---|---|---|---|---|"]
    for m in REGISTRY.values():
        keys = ", ".join(f"`{k}`" for k in m.keys)
        lines.append(f"| `{m.name}` | {m.kind} | {m.doc} | {m.unit} | {m.cost} | "
                     f"`{m.column}` | {'yes' if m.log_scale else 'no'} | {keys} |")
    return "\n".join(lines) + "\n"


def _top_level_page() -> str:
    import flatprior

    lines = ["::: flatprior", "    options:", "      members: false", "",
             "## Top-level names", "",
             "| `fp.` name | defined in |", "|---|---|"]
    for name, (module, attr) in sorted(flatprior._EXPORTS.items()):
        where = f"`{module}.{attr}`"
        lines.append(f"| `{name}` | {where} |")
    return "\n".join(lines) + "\n"


def on_files(files, config):
    """Add the generated pages to the site's files."""
    from flatprior.experiments.specs import list_specs

    specs = list_specs()
    claims = _claims()
    pages = {"figures/index.md": _figures_index(specs), "measures.md": _measures_page(),
             "api/flatprior.md": _top_level_page()}
    for name, spec in specs.items():
        pages[f"figures/{name}.md"] = _spec_page(name, spec, claims)
    for uri, content in pages.items():
        old = files.get_file_from_path(uri)
        if old is not None:
            files.remove(old)
        files.append(File.generated(config, uri, content=content))
    return files
