"""Rendering for `rlrt inspect`: a self-contained HTML page and a PNG, both colouring each
token by D_t = q_t - s_t = log P_T - log P_S (the paper's sign) on the same diverging scale
(red: D < 0, the student was more sure than the teacher, a self-driven token RLRT up-weights;
blue: D > 0, the teacher predicted it).

The HTML keeps every number on the token's span (data-s/q/d/w/adv, and a tooltip), so the
page is both the picture and the data; inspect.json holds the same numbers for scripts.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlrt.inspect_rollouts import Report, Shown

# Invisible characters get a visible stand-in (the page and the PNG show tokens, and a token
# that is only a tab or a carriage return would otherwise be an empty coloured box).
_VISIBLE = {"\n": "\u21b5\n", "\t": "\u2192\t", "\r": "\u2190"}

CMAP = "RdBu"  # diverging: red (D < 0, self-driven) - white (0) - blue (D > 0)
PNG_RESPONSES = 3
PNG_WIDTH_CHARS = 100
PNG_WIDTH_IN = 11.0
_LEFT, _RIGHT = 0.075, 0.97  # figure fractions; the left margin holds the histogram's labels
# A monospace glyph advances ~0.6 em: the font size that fills one grid cell of the figure.
_CELL_FONT = (_RIGHT - _LEFT) * PNG_WIDTH_IN * 72 / PNG_WIDTH_CHARS / 0.6 * 0.95


def visible(text: str) -> str:
    """`text` with newlines, tabs and other control characters marked (the newline and tab
    themselves are kept, so `white-space: pre-wrap` still lays the text out)."""
    return "".join(_VISIBLE.get(c, "\u00b7" if ord(c) < 32 or ord(c) == 127 else c)
                   for c in text)


def d_scale(report: Report) -> float:
    """Half-width of the colour scale: the 95th percentile of |D| over shown tokens (so one
    outlier does not wash out the rest), at least log(1 + eps_w), where w_t clips for A > 0."""
    ds = sorted(abs(t.d) for r in report.shown for t in r.tokens)
    p95 = ds[int(0.95 * (len(ds) - 1))] if ds else 0.0
    return max(p95, math.log1p(report.eps_w) if report.eps_w > 0 else 0.1, 1e-3)


def colour(d: float, vmax: float) -> tuple[str, str]:
    """(background, text colour) for one D value: hex from the colormap, black or white text
    by luminance so the token stays readable."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    r, g, b, _ = colormaps[CMAP](0.5 + 0.5 * max(-1.0, min(1.0, d / vmax)))
    lum = 0.299 * r + 0.587 * g + 0.114 * b
    return to_hex((r, g, b)), "#000" if lum > 0.5 else "#fff"


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:70em;color:#222}
.resp{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:1em 0}
.hdr{font-weight:600;margin-bottom:.3em}.meta{color:#555;font-size:.9em}
.toks{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.9;margin:.5em 0}
.tok{border-radius:2px;padding:1px 0}
#showw:checked~.resp .tok::after{content:attr(data-w);font-size:.6em;vertical-align:sub;
 color:#444;background:#fff8;margin-left:1px}
.legend{display:flex;align-items:center;gap:.5em;font-size:.9em}
.bar{width:18em;height:1em;border:1px solid #999}
details{margin:.3em 0}pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}
"""


def _span(tok, vmax: float) -> str:  # noqa: ANN001 -- TokenInfo, kept light for the renderer
    bg, fg = colour(tok.d, vmax)
    tip = (f"token {tok.id}: s={tok.s:.4f} q={tok.q:.4f} D=q-s={tok.d:+.4f} "
           f"w={tok.w:.4f} A_kt={tok.adv:+.4f}")
    text = html.escape(visible(tok.text))
    return (f'<span class="tok" style="background:{bg};color:{fg}" data-id="{tok.id}" '
            f'data-s="{tok.s:.7g}" data-q="{tok.q:.7g}" data-d="{tok.d:.7g}" '
            f'data-w="{tok.w:.3f}" data-adv="{tok.adv:.7g}" title="{html.escape(tip)}">'
            f"{text}</span>")


def _response(r: Shown, vmax: float) -> str:
    ds = [t.d for t in r.tokens]
    share = sum(d < 0 for d in ds) / len(ds) if ds else 0.0
    mean_w = sum(t.w for t in r.tokens) / len(ds) if ds else 1.0
    demo = ("sibling response #" + str(r.demo_index) if r.demo_mode == "sibling"
            else r.demo_mode.replace("_", " "))
    rewards = " ".join(f"{x:g}" for x in r.group_rewards)
    return (
        f'<div class="resp" id="p{r.prompt_index}r{r.response_index}">'
        f'<div class="hdr">prompt {r.prompt_index} &middot; response {r.response_index} &middot; '
        f"reward {r.reward:g} &middot; A<sub>k</sub> = {r.adv:+.4f}</div>"
        f'<div class="meta">group rewards [{rewards}] &middot; {len(ds)} tokens '
        f"({r.finish_reason}) &middot; self-driven share (D&lt;0) {share:.0%} &middot; "
        f"mean w {mean_w:.3f} &middot; demonstration: {html.escape(demo)}</div>"
        f"<details><summary>prompt</summary><pre>{html.escape(r.prompt)}</pre>"
        f"reference: <code>{html.escape(r.answer)}</code></details>"
        f"<details><summary>demonstration shown to the teacher ({html.escape(demo)})</summary>"
        f"<pre>{html.escape(r.demo_text)}</pre></details>"
        f'<div class="toks">{"".join(_span(t, vmax) for t in r.tokens)}</div></div>'
    )


def render_html(report: Report) -> str:
    vmax = d_scale(report)
    stops = ", ".join(colour(v * vmax, vmax)[0] for v in (-1, -0.5, 0, 0.5, 1))
    s = report.summary
    summary = (
        f"{s['prompts']} prompts &times; G={s['group_size']}: {s['correct']}/{s['responses']} "
        f"correct; groups mixed {s['mixed_groups']}, all correct {s['all_correct_groups']}, "
        f"all wrong {s['all_wrong_groups']}; teacher-scored {s['teacher_scored']}; "
        f"shown {s['shown']} correct scored responses. Over them: self-driven share "
        f"{s['self_driven_share']:.1%}, mean D {s['mean_D_correct']:+.4f}, mean w "
        f"{s['weight_mean']:.3f}."
    )
    body = "".join(_response(r, vmax) for r in report.shown) or (
        "<p><b>No correct response of a mixed group had a teacher context</b>: nothing to "
        "colour. Try more prompts (--n), a larger group (--g), or a stronger model.</p>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rlrt inspect: D = q - s</title>
<style>{_CSS}</style></head><body>
<h1>Which tokens did RLRT treat as self-driven?</h1>
<p>Preset <b>{html.escape(report.preset)}</b>, eps_w = {report.eps_w:g}, lambda = {report.lam:g},
sampling temperature {report.temperature:g}. Model <code>{html.escape(str(s['model']))}</code>,
data <code>{html.escape(str(s['data']))}</code>, seed {s['seed']}.</p>
<p>{summary}</p>
<div class="legend"><span>D = q &minus; s:</span><span>{-vmax:+.2f}</span>
<span class="bar" style="background:linear-gradient(to right, {stops})"></span>
<span>{vmax:+.2f}</span><span class="meta">(full colour at |D| = log(1 + eps_w), where w
clips for A &gt; 0, or at the 95th percentile of |D| when that is larger)</span></div>
<p class="meta">Each token's background is the paper's D<sub>t</sub> = q<sub>t</sub> &minus;
s<sub>t</sub> = log P<sub>T</sub> &minus; log P<sub>S</sub> (teacher log-prob with the
demonstration in context minus student log-prob). Red (D &lt; 0): the student was more
confident than the teacher &mdash; a <i>self-driven</i> token, w<sub>t</sub> =
clip(exp(&minus;sign(A) D<sub>t</sub>), 1&minus;eps_w, 1+eps_w) &gt; 1 for a positive advantage.
Blue: the teacher predicted it better (w &lt; 1). Hover a token for s, q, D, w and
A<sub>kt</sub> = A<sub>k</sub>((1&minus;&lambda;) + &lambda; w<sub>t</sub>). The symbol
&crarr; marks a newline.</p>
<input type="checkbox" id="showw"><label for="showw"> show w<sub>t</sub> under each token</label>
{body}
</body></html>
"""


# --------------------------------------------------------------------------- PNG


def _layout(pieces: list[str], width: int) -> list[tuple[int, int, str]]:
    """(line, column, visible text) per token on a fixed character grid, wrapping at `width`
    and breaking after newline tokens (shown as a return mark)."""
    out, line, col = [], 0, 0
    for p in pieces:
        vis = visible(p).replace("\n", "").replace("\t", "") or "\u2205"
        if col and col + len(vis) > width:
            line, col = line + 1, 0
        out.append((line, col, vis[:width]))
        col += len(vis[:width])
        if "\n" in p:
            line, col = line + 1, 0
    return out


def render_png(report: Report, path: str | Path) -> None:
    """The first few shown responses, tokens coloured as in the HTML, over a histogram of D
    on all shown tokens with the clip points of w marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    vmax = d_scale(report)
    picks = report.shown[:PNG_RESPONSES]
    layouts = [_layout([t.text for t in r.tokens], PNG_WIDTH_CHARS) for r in picks]
    heights = [max((ln for ln, _, _ in lay), default=0) + 2 for lay in layouts] + [8]
    fig, axes = plt.subplots(len(heights), 1, figsize=(PNG_WIDTH_IN, 0.24 * sum(heights) + 1.2),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, r, lay, h in zip(axes[:, 0], picks, layouts, heights, strict=False):
        ax.set_xlim(0, PNG_WIDTH_CHARS)
        ax.set_ylim(h - 1, -1)
        ax.axis("off")
        ax.set_title(f"prompt {r.prompt_index} response {r.response_index}: reward {r.reward:g}, "
                     f"A_k {r.adv:+.3f}, demo {r.demo_mode}", fontsize=8, loc="left")
        for tok, (ln, col, vis) in zip(r.tokens, lay, strict=True):
            bg, fg = colour(tok.d, vmax)
            ax.add_patch(Rectangle((col, ln - 0.45), len(vis), 0.9, color=bg, lw=0))
            for j, ch in enumerate(vis):  # one glyph per grid cell: exact alignment
                ax.text(col + j + 0.5, ln, ch, ha="center", va="center", fontsize=_CELL_FONT,
                        family="monospace", color=fg)
    ax = axes[-1, 0]
    ds = [t.d for r in report.shown for t in r.tokens]
    if ds:
        lo, hi = min(ds), max(ds)
        bins = 40 if hi > lo else 1
        counts, edges, patches = ax.hist(ds, bins=bins)
        for p, a, b in zip(patches, edges[:-1], edges[1:], strict=True):
            p.set_facecolor(colour((a + b) / 2, vmax)[0])
            p.set_edgecolor("#666")
        for x, label in ((-math.log1p(report.eps_w), "w clips at 1+eps_w (A>0)"),
                         (-math.log(1 - report.eps_w) if report.eps_w < 1 else None,
                          "w clips at 1-eps_w (A>0)")):
            margin = 0.1 * (hi - lo) + 1e-6  # a clip point far off the data would squash it
            if x is not None and lo - margin <= x <= hi + margin:
                ax.axvline(x, color="k", ls="--", lw=0.8, label=label)
        ax.axvline(0, color="#888", lw=0.8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        share = sum(d < 0 for d in ds) / len(ds)
        ax.set_title(f"D = q - s on {len(ds)} tokens of {len(report.shown)} correct responses "
                     f"(self-driven share {share:.0%})", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no correct teacher-scored responses", ha="center", va="center")
    ax.set_xlabel("D_t = q_t - s_t (paper's sign)")
    ax.set_ylabel("tokens")
    # Fixed margins, not tight_layout: the token panels' width must stay what _CELL_FONT was
    # sized for.
    h_in = fig.get_size_inches()[1]
    fig.subplots_adjust(left=_LEFT, right=_RIGHT, top=1 - 0.35 / h_in, bottom=0.6 / h_in,
                        hspace=0.6)
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
