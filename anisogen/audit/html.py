"""The self-contained ``report.html``: metric tables (best value highlighted), run facts and figures.

Every figure is embedded as a base64 ``data:image/png`` URI, so the single HTML file can be mailed or
attached to a CI run on its own; each ``<img>`` also names its PNG file next to the report
(``data-file="plots/…png"``) and links to it, for tools that prefer files.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..report import format_cell

#: Columns of the per-folder table (unpaired + semantic + norms), in display order.
TABLE_COLUMNS = ["delta_mu", "G_Sigma", "C_lambda", "O_q", "JS_cos", "M_k_Z", "M_k_X", "nn_is_image_frac_Z",
                 "Phi", "Psi", "Omega_k", "norm_mean", "norm_max_dev"]
#: Columns of the paired-evaluation table.
PAIRED_COLUMNS = ["paired_Phi", "paired_Psi", "paired_Omega_k", "paired_delta_mu", "paired_M_k_Z", "paired_M_k_X",
                  "paired_A_r_T", "paired_A_r_T_centered"]
#: +1: higher is better, -1: lower is better (metrics not listed are not ranked).
BETTER = {
    "delta_mu": -1, "G_Sigma": -1, "JS_cos": -1, "norm_max_dev": -1, "C_lambda": 1, "O_q": 1, "M_k_Z": 1,
    "M_k_X": 1, "nn_is_image_frac_Z": 1, "Phi": 1, "Psi": 1, "Omega_k": 1, "paired_Phi": 1, "paired_Psi": 1,
    "paired_Omega_k": 1, "paired_delta_mu": -1, "paired_M_k_Z": 1, "paired_M_k_X": 1, "paired_A_r_T": -1,
    "paired_A_r_T_centered": -1,
}
HEADERS = {
    "delta_mu": "Δμ", "G_Sigma": "G<sub>Σ</sub>", "C_lambda": "C<sub>λ</sub>", "O_q": "O<sub>q</sub>",
    "JS_cos": "JS cos", "M_k_Z": "M<sub>k</sub><sup>Z</sup>", "M_k_X": "M<sub>k</sub><sup>X</sup>",
    "nn_is_image_frac_Z": "NN is image", "Phi": "Φ", "Psi": "Ψ", "Omega_k": "Ω<sub>k</sub>",
    "norm_mean": "mean ‖z‖", "norm_max_dev": "max |‖z‖−1|", "paired_Phi": "Φ", "paired_Psi": "Ψ",
    "paired_Omega_k": "Ω<sub>k</sub>", "paired_delta_mu": "Δμ", "paired_M_k_Z": "M<sub>k</sub><sup>Z</sup>",
    "paired_M_k_X": "M<sub>k</sub><sup>X</sup>", "paired_A_r_T": "A<sub>r</sub>(T)",
    "paired_A_r_T_centered": "A<sub>r</sub>(T) centred",
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}
td.name,th.name{text-align:left}td.best{background:#d9f2d9;font-weight:bold}td.fail{color:#b00020;font-weight:bold}
tr.reference td{color:#777;font-style:italic}
.status{padding:10px 14px;border-radius:6px;margin:12px 0;font-weight:bold}
.pass{background:#e6f4ea;color:#1e6b32}.failbox{background:#fce8e6;color:#a50e0e}.warn{background:#fff4e5;color:#7a4b00}
figure{margin:16px 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:0.85em;color:#555}
code{background:#f6f6f6;padding:1px 4px;border-radius:3px}dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px}
dt{font-weight:bold}dd{margin:0;word-break:break-all}
"""  # noqa: E501 -- CSS kept byte-identical (one rule set per line)


def _fmt(value) -> str:
    return html.escape(format_cell(value, 4, adaptive=True))


def best_rows(rows: Sequence[Mapping], column: str) -> set[int]:
    """Indices of the rows holding the best finite value of ``column`` (ties all win); empty if unranked."""
    sign = BETTER.get(column)
    values = [(i, r.get(column)) for i, r in enumerate(rows) if not r.get("reference")]
    values = [(i, v) for i, v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if sign is None or len(values) < 2:
        return set()
    best = max(sign * v for _, v in values)
    return {i for i, v in values if math.isclose(sign * v, best, rel_tol=1e-12, abs_tol=1e-15)}


def metrics_table(rows: Sequence[Mapping], columns: Sequence[str], failed: Iterable[tuple[str, str]] = ()) -> str:
    """An HTML table, one row per folder (``row["label"]``); best values get class ``best``; cells of
    (label, metric) pairs in ``failed`` get class ``fail``. Rows with ``reference`` are shown in grey."""
    failed = set(failed)
    rows = [r for r in rows if any(c in r for c in columns)]
    columns = [c for c in columns if any(c in r for r in rows)]
    best = {c: best_rows(rows, c) for c in columns}
    head = "".join(f'<th title="{html.escape(c)}">{HEADERS.get(c, html.escape(c))}</th>' for c in columns)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for c in columns:
            classes = [cls for cls, on in (("best", i in best[c]), ("fail", (row["label"], c) in failed)) if on]
            attr = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{attr}>{_fmt(row.get(c))}</td>")
        cls = ' class="reference"' if row.get("reference") else ""
        body.append(f'<tr{cls}><td class="name">{html.escape(str(row["label"]))}</td>{"".join(cells)}</tr>')
    return f'<table><tr><th class="name">shard folder</th>{head}</tr>{"".join(body)}</table>'


def embed_png(path: str | Path, rel: str, alt: str) -> str:
    """An ``<img>`` with the PNG at ``path`` inlined as base64, linked to ``rel`` (its file next to the report)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<a href="{html.escape(rel)}"><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" '
            f'data-file="{html.escape(rel)}"></a>')


def _dl(items: Mapping[str, object]) -> str:
    return "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{_fmt(v)}</dd>" for k, v in items.items()) + "</dl>"


def render_html(report: Mapping, figures: Sequence[tuple[str, str, str]], out_dir: str | Path) -> str:
    """The report page. ``figures``: (relative PNG path under ``out_dir``, title, caption) triples."""
    out_dir = Path(out_dir)
    gates = report.get("gates") or {}
    failed = {(f["folder"], f["metric"]) for f in gates.get("failures", [])}
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>anisogen audit</title>"
             f"<style>{CSS}</style></head><body>", "<h1>anisogen geometry audit</h1>"]
    if gates.get("rules"):
        if gates.get("passed"):
            parts.append(f'<div class="status pass">All {len(gates["rules"])} gate(s) passed: '
                         f'{html.escape(", ".join(gates["rules"]))}</div>')
        else:
            items = "".join(f"<li>{html.escape(f['message'])}</li>" for f in gates["failures"])
            parts.append(f'<div class="status failbox">Gates failed<ul>{items}</ul></div>')
    skipped = [s for f in report["folders"] for s in f.get("skipped", [])] + report["images"].get("skipped", [])
    if skipped:
        parts.append(f'<div class="status warn">Incomplete input: {len(skipped)} shard(s)/sample(s) were skipped '
                     f'(--skip-corrupt); see rejects.jsonl.<ul>'
                     + "".join(f"<li>{html.escape(str(s.get('shard')))} {html.escape(str(s.get('key') or ''))}: "
                               f"{html.escape(s['reason'])}</li>" for s in skipped[:20]) + "</ul></div>")
    for w in report.get("warnings", []):
        parts.append(f'<div class="status warn">{html.escape(w)}</div>')

    rows = [{"label": f["label"], "reference": f.get("reference", False), **f["metrics"]} for f in report["folders"]]
    settings = report["settings"]
    parts.append("<h2>Metrics against the images</h2>")
    parts.append(f"<p>Substitutes Z of each shard folder against the unpaired image embeddings X "
                 f"(k = {settings['k']}, q = {rows[0].get('q', '—') if rows else '—'}). Best value per column in "
                 f"green; cells failing a gate in red. Φ, Ψ, Ω<sub>k</sub> compare Z with the source text "
                 f"embeddings stored in <code>src.npy</code>. Δμ, G<sub>Σ</sub>, C<sub>λ</sub>, O<sub>q</sub> and "
                 f"the norms cover every row; the kNN and pairwise-cosine columns a seeded sample of "
                 f"{html.escape(str(settings.get('max_samples') or 'all'))} rows per input (see Inputs); shards "
                 f"verified: {html.escape(str(settings.get('verify', '—')))}.</p>")
    parts.append(metrics_table(rows, TABLE_COLUMNS, failed))
    if any("paired_Phi" in r for r in rows):
        parts.append("<h2>Paired evaluation set</h2>")
        parts.append(f"<p>Each folder's aligner artifact applied to the paired texts; "
                     f"{report['paired']['n_sampled']} pairs. AnisoAlign §5 metrics "
                     f"(<code>method_report</code>).</p>")
        parts.append(metrics_table(rows, PAIRED_COLUMNS, failed))

    parts.append("<h2>Figures</h2>")
    for rel, title, caption in figures:
        parts.append(f"<figure>{embed_png(out_dir / rel, rel, title)}<figcaption><b>{html.escape(title)}.</b> "
                     f"{html.escape(caption)}</figcaption></figure>")

    parts.append("<h2>Inputs</h2>")
    img = report["images"]
    parts.append(_dl({"images": img["path"], "images sampled / total": f"{img['n_sampled']} / {img['n_total']}",
                      "dimension d": report["d"], "CLIP model fingerprint": report.get("model_fingerprint")}))
    for f in report["folders"]:
        if f.get("reference"):
            continue
        knn = f.get("knn", {}).get("mixing", {})
        parts.append(f"<h3>{html.escape(f['label'])}</h3>")
        parts.append(_dl({
            "path": f["path"], "sampled / total": f"{f['n_sampled']} / {f['n_total']}",
            "aligner": (f.get("aligner") or {}).get("name"),
            "aligner fingerprint": (f.get("aligner") or {}).get("fingerprint"),
            "model fingerprint": f.get("model_fingerprint"),
            "kNN index": f"{knn.get('kind')} ({knn.get('backend')}, {knn.get('device')})"
                         + (f", nlist {knn['nlist']}, nprobe {knn['nprobe']}" if knn.get("nlist") else ""),
            "kNN recall@k (measured)": knn.get("recall"),
        }))
    parts.append("<h2>Run</h2>")
    parts.append(_dl({**{f"setting {k}": v for k, v in settings.items()},
                      **{f"version {k}": v for k, v in report.get("versions", {}).items()},
                      **{f"seconds {k}": v for k, v in report.get("timings", {}).items()}}))
    parts.append("<p>Full numbers: <a href=\"report.json\">report.json</a>.</p></body></html>")
    return "\n".join(parts)
