"""One self-contained HTML page: counts, image histograms, outputs against the schema, a grid of
samples and the leakage found. Images and plots are inline (base64 PNG/JPEG); no script, no
network, no external stylesheet."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from engine.inspect.scan import IMAGE_PART, ScanResult
from engine.inspect.summary import Summary, exact_basis, image_changes

LISTED = 50  # groups or ids listed per leakage table


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _histogram(values: np.ndarray, title: str, xlabel: str, log: bool = False) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.6), dpi=90)
    if len(values):
        data = np.log10(np.maximum(values, 1)) if log else values
        ax.hist(
            data,
            bins=min(40, max(5, int(np.sqrt(len(values))))),
            color="#3b6fb6",
            edgecolor="white",
            linewidth=0.4,
        )
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(f"log10({xlabel})" if log else xlabel, fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return f'<figure class="plot"><img alt="{_e(title)}" src="{_b64(out.getvalue(), "image/png")}"></figure>'


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _ids(members, limit: int = 12) -> str:
    shown = ", ".join(f"{s}/{k}" for s, k in members[:limit])
    return shown + (f" … (+{len(members) - limit})" if len(members) > limit else "")


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:16px 24px}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d6dae1}
table{border-collapse:collapse;margin:6px 0 12px;background:#fff;font-size:13px}
th,td{border:1px solid #d6dae1;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}td.num,th.num{text-align:right}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:8px}
.plot{margin:0;background:#fff;border:1px solid #d6dae1}.plot img{width:100%;display:block}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:10px}
.card{display:flex;gap:8px;background:#fff;border:1px solid #d6dae1;padding:6px;overflow:hidden}
.card img{width:120px;height:120px;object-fit:contain;background:#e9ecf1;flex:none}
.card .none{width:120px;height:120px;background:#e9ecf1;flex:none;\
display:flex;align-items:center;justify-content:center}
.card pre{margin:0;font-size:11px;white-space:pre-wrap;word-break:break-all;\
max-height:160px;overflow:auto;flex:1}
.card .id{font-weight:600;font-size:12px;word-break:break-all}\
.ok{color:#1f7a3a}.bad{color:#b3261e}.warn{color:#8a5a00}
.muted{color:#667}
"""


def render_html(result: ScanResult, summary: Summary) -> str:
    ds = result.dataset
    parts = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>engine inspect: {_e(ds.root)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>Dataset report: {_e(ds.root)}</h1>",
        f'<p class="muted">layout {_e(summary.layout)}; {summary.num_rows:,} rows, '
        f"{summary.num_images:,} images; "
        f"images {'decoded' if result.decoded else 'not decoded (--no-decode)'}.</p>",
    ]
    parts += _counts(result, summary)
    parts += _images(result)
    parts += _outputs(result)
    parts += _samples(result)
    parts += _leakage(result)
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _counts(result: ScanResult, summary: Summary) -> list[str]:
    out = ['<section id="counts"><h2>Counts</h2>']
    out.append(
        _table(
            ["split", "rows", "images", "image bytes", "files", "file bytes"],
            [
                [
                    s.name,
                    f"{s.num_rows:,}",
                    f"{s.num_images:,}",
                    f"{s.image_bytes:,}",
                    len(s.files),
                    f"{s.file_bytes:,}",
                ]
                for s in summary.splits
            ],
        )
    )
    out.append(
        _table(
            ["shard", "split", "rows", "image bytes", "file bytes"],
            [
                [f.name, f.split, f"{f.num_rows:,}", f"{f.image_bytes:,}", f"{f.file_bytes:,}"]
                for s in summary.splits
                for f in s.files
            ],
        )
    )
    out.append(_table(["image format", "images"], [[k, f"{v:,}"] for k, v in result.formats.most_common()]))
    stats = result.dataset.stats
    if stats:
        written, passthrough = stats.get("num_written", 0), stats.get("num_passthrough", 0)
        share = f"{passthrough / written:.1%}" if written else "n/a"
        out.append(
            f"<p>From <code>stats.json</code>: {stats.get('num_input_rows', 0):,} input rows, "
            f"{written:,} written, {stats.get('num_rejected', 0):,} rejected; "
            f"{passthrough:,} images kept as they were (pass-through share {share}), "
            f"{written - passthrough:,} re-encoded (resized, rotated or converted).</p>"
        )
        rejected = stats.get("rejected_by_reason") or {}
        if rejected:
            examples = summary.reject_examples
            out.append(
                _table(
                    ["stage", "rejected", "first reasons"],
                    [[k, f"{v:,}", " | ".join(examples.get(k, []))] for k, v in rejected.items()],
                )
            )
        warnings = stats.get("warnings_by_kind") or stats.get("warnings") or {}
        if isinstance(warnings, dict) and warnings:
            out.append(_table(["warning", "count"], [[k, v] for k, v in warnings.items()]))
    out.append("</section>")
    return out


def _images(result: ScanResult) -> list[str]:
    w = np.frombuffer(result.widths, dtype=np.uint32).astype(np.float64)
    h = np.frombuffer(result.heights, dtype=np.uint32).astype(np.float64)
    b = np.frombuffer(result.sizes, dtype=np.uint64).astype(np.float64)
    out = ['<section id="images"><h2>Images</h2>']
    if len(w):
        out.append(
            f"<p>width {int(w.min())}–{int(w.max())} px (median {int(np.median(w))}), height "
            f"{int(h.min())}–{int(h.max())} px (median {int(np.median(h))}), stored bytes median "
            f"{int(np.median(b)):,}.</p>"
        )
    stats = result.dataset.stats or {}
    max_size = (stats.get("options") or {}).get("image", {}).get("max_size") if stats else None
    if max_size and len(w):
        at_max = int(np.sum(np.maximum(w, h) == max_size))
        out.append(
            f"<p>{at_max:,} images have their longest side at <code>--max-size</code> {max_size} px "
            f"(downscaled, or already that size).</p>"
        )
    changes = image_changes(stats, LISTED)
    if changes:
        out.append("<p>From <code>stats.json</code>, what the convert did to each image:</p>")
        out.append(
            _table(
                ["images", "count", "ids"],
                [
                    [kind, f"{count:,}", ", ".join(ids) + (f" and {more:,} more" if more else "")]
                    for kind, count, ids, more in changes
                ],
            )
        )
    cls = "bad" if result.num_rotated else "ok"
    out.append(
        f'<p class="{cls}">{result.num_rotated:,} images still carry an EXIF orientation other than 1 '
        f"(a reader would rotate them){': ' + _e(', '.join(result.rotated)) if result.rotated else ''}.</p>"
    )
    if result.num_undecodable:
        out.append(
            f'<p class="bad">{result.num_undecodable:,} images do not decode: '
            f"{_e('; '.join(f'{k}: {r}' for k, r in result.undecodable[:5]))}</p>"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.where(h > 0, w / np.maximum(h, 1), 0)
    out.append('<div class="plots">')
    out.append(_histogram(w, "width", "px"))
    out.append(_histogram(h, "height", "px"))
    out.append(_histogram(aspect, "aspect ratio (width / height)", "ratio"))
    out.append(_histogram(b, "stored bytes", "bytes", log=True))
    out.append(_histogram(w * h, "pixel count", "pixels", log=True))
    out.append("</div></section>")
    return out


def _outputs(result: ScanResult) -> list[str]:
    out = ['<section id="outputs"><h2>Outputs</h2>']
    if result.schema is None:
        out.append(
            '<p class="muted">No <code>config.json</code> JSON schema: properties are those found in '
            "the outputs.</p>"
        )
    n = result.num_outputs
    if result.schema is not None:
        cls = "bad" if result.num_invalid_outputs else "ok"
        out.append(
            f'<p class="{cls}">{result.num_invalid_outputs:,} of {n:,} outputs do not validate against '
            "the schema.</p>"
        )
        if result.invalid_outputs:
            out.append(_table(["row", "reason"], [list(x) for x in result.invalid_outputs]))
    rows = []

    def pct(k):
        return f"{k / n:.1%}" if n else "n/a"

    for name, p in result.properties.items():
        top = ", ".join(f"{v} ({c:,})" for v, c in p.values.most_common(5))
        rows.append([name, pct(p.present), pct(p.null), pct(p.empty), ", ".join(p.kinds), top])
    if rows:
        out.append(_table(["property", "present", "null", "empty", "types", "top values"], rows))
    plots = [
        _histogram(np.asarray(p.numbers), f"{name} ({p.num_numbers:,} numbers)", name)
        for name, p in result.properties.items()
        if p.numbers
    ]
    if plots:
        out.append('<div class="plots">' + "".join(plots) + "</div>")
    if result.token_mismatches or result.attachment_token:
        cls = "bad" if result.num_token_mismatches else "ok"
        out.append(
            f'<p class="{cls}">{result.num_token_mismatches:,} rows whose '
            f"{'image parts' if result.attachment_token == IMAGE_PART else 'attachment tokens'} "
            f"({_e(result.attachment_token)}) do not match their image count.</p>"
        )
        if result.token_mismatches:
            out.append(_table(["row", "problem"], [list(x) for x in result.token_mismatches]))
    out.append("</section>")
    return out


def _pretty(output: str | None) -> str:
    import orjson

    try:
        return orjson.dumps(orjson.loads(output), option=orjson.OPT_INDENT_2).decode() if output else ""
    except orjson.JSONDecodeError:
        return output or ""


def _samples(result: ScanResult) -> list[str]:
    out = [f'<section id="samples"><h2>Samples ({len(result.samples)}, seeded)</h2><div class="grid">']
    for s in result.samples:
        img = (
            f'<img alt="{_e(s.key)}" src="{_b64(s.thumbnail, "image/jpeg")}">'
            if s.thumbnail
            else '<div class="none">no image</div>'
        )
        if s.conversation is not None:
            text = "\n".join(f"{t.get('role')}: {t.get('content')}" for t in s.conversation)
        else:
            text = _pretty(s.output)
        out.append(
            f'<div class="card">{img}<div><div class="id">{_e(s.split)}/{_e(s.key)}</div>'
            f"<pre>{_e(text[:1500])}</pre></div></div>"
        )
    out.append("</div></section>")
    return out


def _leakage(result: ScanResult) -> list[str]:
    leak = result.leakage
    out = [
        '<section id="leakage"><h2>Leakage</h2>',
        f'<p class="muted">Exact duplicates {_e(exact_basis(result))}.</p>',
    ]
    by = "the decoded pixels" if leak.exact_by == "pixels" else "the stored bytes (images not decoded)"
    for title, groups in (
        ("Exact duplicates across splits", leak.exact_cross),
        ("Exact duplicates within a split", leak.exact_within),
    ):
        cls = "bad" if groups and "across" in title else "warn" if groups else "ok"
        extra = sum(len(g.members) - 1 for g in groups)
        out.append(
            f'<h3 class="{cls}">{title} (by a hash of {by}): {len(groups):,} groups, '
            f"{extra:,} extra copies</h3>"
        )
        if groups:
            out.append(
                _table(
                    ["copies", "splits", "rows"],
                    [[len(g.members), ", ".join(g.splits), _ids(g.members)] for g in groups[:LISTED]],
                )
            )
    if leak.near is None:
        out.append('<h3 class="muted">Near duplicates: not computed (perceptual hash off)</h3>')
    else:
        cross = leak.near_cross
        out.append(
            f'<h3 class="{"bad" if cross else "ok"}">Near duplicates (pHash within 4 bits, not '
            f"pixel-identical): {len(leak.near):,} groups, {len(cross):,} across splits</h3>"
        )
        if leak.near:
            out.append(
                _table(
                    ["images", "splits", "rows"],
                    [
                        [len(g.members), ", ".join(g.splits), _ids(g.members)]
                        for g in sorted(leak.near, key=lambda g: not g.cross_split)[:LISTED]
                    ],
                )
            )
    if not leak.has_ids:
        out.append('<h3 class="muted">Ids in two splits: the dataset has no image_id column</h3>')
    else:
        out.append(
            f'<h3 class="{"bad" if leak.shared_ids else "ok"}">'
            f"Ids in two splits: {len(leak.shared_ids):,}</h3>"
        )
        if leak.shared_ids:
            out.append(
                _table(
                    ["image_id", "splits"],
                    [[i, ", ".join(s)] for i, s in list(leak.shared_ids.items())[:LISTED]],
                )
            )
        if leak.repeated_ids:
            out.append(
                f'<p class="warn">{len(leak.repeated_ids):,} ids repeated within a split: '
                f"{_e(', '.join(list(leak.repeated_ids)[:20]))}</p>"
            )
    out.append("</section>")
    return out
