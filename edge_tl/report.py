"""``OUT/report.html``: one self-contained page (images inlined) from a build's saved results.

Reads ``run/`` (history, learning curve), ``bundle/manifest.json``, ``check.json`` (with
per-image predictions) and ``bench.json``; ``edge-tl report OUT`` regenerates it.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from edge_tl.errors import UserError
from edge_tl.fileio import write_text
from edge_tl.runtime.bundle import Bundle

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.pass{color:#080}.fail{color:#b00}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0;width:120px;font-size:.75em;text-align:center}
.grid img{width:112px;height:112px;object-fit:cover;border:2px solid #b00}img.plot{max-width:100%}
code{background:#f4f4f4;padding:0 .2em}pre{background:#f4f4f4;padding:.6em;overflow-x:auto}"""


def _png(fig_or_path) -> str:
    if isinstance(fig_or_path, (str, Path)):
        data = Path(fig_or_path).read_bytes()
    else:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig_or_path.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig_or_path)
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _img(src: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="{src}">'


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows) + "</table>")


def per_class(labels: list[int], preds: list[int], classes: list[str]) -> list[list]:
    """Rows of class, precision, recall, support; "-" where undefined (a class never predicted has no
    precision, one without test images no recall: not a measured 0)."""
    y, p = np.asarray(labels), np.asarray(preds)
    rows = []
    for i, c in enumerate(classes):
        tp, predicted, support = int(((p == i) & (y == i)).sum()), int((p == i).sum()), int((y == i).sum())
        rows.append([c, tp / predicted if predicted else "-", tp / support if support else "-", support])
    return rows


def _confusion_png(labels, preds, classes, title) -> str:
    from edge_tl.finetune.plots import confusion_figure
    from edge_tl.finetune.train import confusion_matrix

    return _png(confusion_figure(confusion_matrix(labels, preds, len(classes)), classes, title))


def _latency_png(results: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["artifact"] for r in results))
    batches = sorted({r["batch"] for r in results})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        vals = [next((r["p50_ms"] / b for r in results if r["artifact"] == n and r["batch"] == b), 0) for n in names]
        ax.barh(names, vals, color=["C1" if n == "torch" else "C0" for n in names])
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set(title=f"batch {b}: p50 ms per image", xlabel="ms / image")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _thumb(path: str, golden_pixels: np.ndarray | None, size: int = 112) -> str | None:
    """A PNG data URL of an image the check read: a file, or ``golden.npz[i]`` (a check without
    ``--data`` runs on the bundle's golden images; their pixels are what the model saw)."""
    try:
        if path.startswith("golden.npz[") and golden_pixels is not None:
            img = Image.fromarray(golden_pixels[int(path[len("golden.npz["):-1])])
        else:
            from edge_tl.runtime.images import load_rgb

            img = load_rgb(path, min_shorter=2 * size)  # a large JPEG decoded at a fraction of its size
    except Exception:  # noqa: BLE001 - a missing image only drops its thumbnail
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _data_warnings(metrics: dict, check: dict) -> list[str]:
    """Training files the fine-tune skipped or will see poorly, a model no better than chance, and
    byte-identical images found by the fine-tune (train/val) and the check (test vs training)."""
    from edge_tl.build import test_copy_counts
    from edge_tl.finetune.data import describe_duplicates
    from edge_tl.runtime.check import chance_note

    found = {k: n for k, n in metrics.get("duplicates", {}).items() if k != "moved_to_train"}
    notes = describe_duplicates({**found, **test_copy_counts(check)})
    out = []
    if skipped := metrics.get("skipped_files"):
        out.append(f"<p><b class=\"fail\">Data:</b> {skipped} training files or folders were skipped (unreadable, not "
                   "images, or where training does not read): each is listed, with why, in run/skipped.txt.</p>")
    odd = metrics.get("odd_images", {})  # runs from before edge-tl counted them have none
    kinds = {"flat": "decode to one flat colour (blank frames, or 16-bit files holding 8-bit values)",
             "dark": "decode nearly black (12-bit data in 16-bit files, or frames shot too dark)",
             "upscaled": "are upscaled over 2 times (under half the resize size)",
             "cropped": "are so long that the centre crop keeps under a quarter of each"}
    found = [f"{n} {kinds[k]}" for k, n in odd.items() if n and k in kinds]
    if found:
        out.append(f"<p><b class=\"fail\">Data:</b> training and validation images the model sees poorly: "
                   f"{html.escape('; '.join(found))}: each listed in run/odd_images.txt.</p>")
    if note := chance_note(check):
        out.append(f"<p><b class=\"fail\">Model:</b> {html.escape(note)}.</p>")
    if notes:
        out.append(f"<p><b class=\"fail\">Data:</b> byte-identical files: {html.escape('; '.join(notes))} (each one "
                   "is listed in run/duplicates.txt and check.json's test_in_training).</p>")
    return out


def _e(value) -> str:
    """Any value of the build's JSON files as HTML text (they may come from someone else's build folder)."""
    return html.escape(str(value))


def write_report(out: str | Path, max_misclassified: int = 24) -> Path:
    """OUT/report.html from a build's saved results (check.json, bench.json and metrics.json are not
    hashed: one edited by hand into another shape is a UserError naming it, not a traceback)."""
    try:
        return _write_report(Path(out), max_misclassified)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise UserError(f"{out}: its check.json, bench.json or run/metrics.json is not as `edge-tl build` wrote it "
                        f"({type(exc).__name__}: {exc}); run `edge-tl build` again.") from None


def _write_report(out: Path, max_misclassified: int) -> Path:
    needed = [out / "bundle" / "manifest.json", out / "check.json", out / "bench.json", out / "run" / "metrics.json"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise UserError(f"{out}: not a finished build ({', '.join(missing)} missing); run `edge-tl build` first.")
    manifest = Bundle.load(out / "bundle").manifest  # verified: the page shows what the device will run
    check = json.loads(needed[1].read_text())
    bench = json.loads(needed[2].read_text())
    metrics = json.loads(needed[3].read_text())
    classes = manifest["classes"]
    arts = check["artifacts"]
    deployed = next((n for n in ("int8", "int8-cpu", "fp16") if n in arts), "fp32")
    parts = [f"<h1>edge-tl build: {html.escape(manifest['model'])} on {len(classes)} classes, target "
             f"{html.escape(manifest['target'])}</h1>",
             f"<p>Check: <b class=\"{'pass' if check['passed'] else 'fail'}\">{'PASSED' if check['passed'] else 'FAILED'}"
             f"</b> on {html.escape(check['data'])}. Bundle: <code>{html.escape(str(out / 'bundle'))}</code>. "
             f"Fine-tune: best validation accuracy {metrics['best_val_accuracy']:.4f} at epoch {_e(metrics['best_epoch'])} "
             f"of {_e(metrics['epochs'])} ({metrics['seconds'] / 60:.1f} min on {_e(metrics['device'])}), "
             f"{_e(metrics['num_train'])} train / {_e(metrics['num_val'])} val images, weights {_e(metrics['pretrained'])}.</p>"]
    parts += _data_warnings(metrics, check)
    from edge_tl.build import NOT_ACCEPTED

    exported = {a["name"]: a for a in manifest["artifacts"]}
    parts += ["<h2>Accuracy per artifact</h2>", _table(
        ["artifact", "precision", "backend", "accuracy", "reference", "drop (pts)", "golden agreement", "score ECE",
         "layers in float", "check"],
        [[n, r["precision"], r["backend"], r["accuracy"], r["reference_accuracy"] if r["reference_accuracy"] is not None
          else "-", "-" if r["drop"] is None else f"{r['drop']:+.2f}", r["agreement"],
          "-" if r.get("score_ece") is None else r["score_ece"], len(exported.get(n, {}).get("float_nodes", [])),
          ("ok" if r["passed"] else r["reason"]) if r.get("gated", True) else "not gated (not accepted at export)"]
         for n, r in arts.items()])]
    parts += [f"<p class=\"fail\">{html.escape(n)} was not accepted at export: "
              f"{html.escape(a.get('rejected', NOT_ACCEPTED))}. Apps use it only when they ask for it by name or "
              "precision, and the check measures it without gating on it.</p>"
              for n, a in exported.items() if not a.get("accepted", True)]
    parts += [f"<p class=\"fail\">{html.escape(n)} is {html.escape(a['not_default'])}.</p>"
              for n, a in exported.items() if a.get("not_default")]
    if scores := manifest.get("scores"):
        how = (f"plain softmax (temperature 1: {html.escape(scores['skipped'])}, too few to fit one)" if "skipped" in scores
               else f"softmax of logits / {_e(scores['temperature'])}, the temperature fitted on the {_e(scores['images'])} "
                    f"validation images (ECE {scores['ece'][0]:.3f} → {scores['ece'][1]:.3f})")
        parts.append(f"<p>Scores: {how}. Score ECE above: on the check's images, how far the scores are from the "
                     "frequency of being right (0 = a score of 0.8 is right 80 % of the time).</p>")
    if pre := check.get("preprocess"):
        jpeg = ("" if pre.get("jpeg_max_abs_diff") is None else
                f", and decoding its camera-sized JPEG: max |Δ| {_e(pre['jpeg_max_abs_diff'])}")
        parts.append(f"<p>Preprocessing here against export's, on golden.npz's {_e(pre['images'])} source images: max |Δ| "
                     f"{_e(pre['max_abs_diff'])} grey levels{jpeg}: <b class=\"{'pass' if pre['passed'] else 'fail'}\">"
                     f"{html.escape(pre['reason'])}</b></p>")
    if check["skipped"]:
        why = check.get("skipped_reasons", {})  # checks from before edge-tl recorded why have none
        parts.append(f"<p>Not runnable on this machine (run <code>edge-tl check</code> on the device): "
                     f"{html.escape('; '.join(n + (f' ({why[n]})' if n in why else '') for n in check['skipped']))}</p>")
    curve = out / "run" / "learning_curve.png"  # written after metrics.json: an interrupted run may lack it
    parts += ["<h2>Learning curve</h2>", _img(_png(curve), "learning curve") if curve.is_file() else
              f"<p>{html.escape(str(curve))} is missing (the fine-tune stopped while plotting): "
              "<code>edge-tl finetune --resume</code> on the run draws it again.</p>"]
    parts += _transfer_section(out)
    if "labels" in check:
        parts.append("<h2>Confusion matrix and per-class precision / recall</h2>")
        # past MANY_CLASSES one matrix (the deployed artifact's): two near-identical large ones only weigh the page
        for n in dict.fromkeys(["fp32", deployed] if len(classes) <= MANY_CLASSES else [deployed]):
            if n in arts and "predictions" in arts[n]:
                parts.append(_img(_confusion_png(check["labels"], arts[n]["predictions"], classes,
                                                 f"{n} on {check['data'].split(' (')[0]}"), f"confusion matrix {n}"))
        parts.append(_table(["class"] + [f"{h} {n}" for n in dict.fromkeys(["fp32", deployed]) if n in arts
                                         for h in ("precision", "recall")] + ["support"],
                            _merge_per_class(check, classes, [n for n in dict.fromkeys(["fp32", deployed]) if n in arts])))
        parts += _class_warnings(per_class(check["labels"], arts[deployed]["predictions"], classes), deployed)
        wrong = [i for i, (y, p) in enumerate(zip(check["labels"], arts[deployed]["predictions"])) if y != p]
        figs, golden = [], out / "bundle" / "golden.npz"
        with np.load(golden) if golden.is_file() else contextlib.nullcontext({}) as z:
            golden_pixels = z.get("pixels")
        for i in wrong[:max_misclassified]:
            src = _thumb(check["images"][i], golden_pixels)
            if src:
                figs.append(f"<figure>{_img(src, 'misclassified', 'thumb')}<figcaption>true {html.escape(classes[check['labels'][i]])}"
                            f"<br>pred {html.escape(classes[arts[deployed]['predictions'][i]])}</figcaption></figure>")
        shown = (f"first {len(figs)} shown" if figs or not wrong else
                 "their image files are no longer where the check read them, so none are shown")
        parts += [f"<h2>Misclassified by {deployed} ({len(wrong)} of {len(check['labels'])}, {shown})</h2>",
                  f"<div class=\"grid\">{''.join(figs)}</div>"]
    rows = [[r["artifact"], r["backend"], r["precision"], r["batch"], r["p50_ms"], r["p90_ms"], r["p99_ms"],
             r["throughput"], r.get("e2e_p50_ms", "-")] for r in bench["results"]]
    e2e = bench.get("e2e_input", "the golden images as JPEGs at the input size")  # bench.json from before it was said
    parts += ["<h2>Latency</h2>", _table(["artifact", "backend", "precision", "batch", "p50 ms", "p90 ms", "p99 ms",
                                         "images/s", "end-to-end p50 ms"], rows),
              f"<p>End to end: decode + preprocess + infer of {html.escape(e2e)} (<code>edge-tl bench BUNDLE --images "
              "DIR</code> times your own).</p>",
              _img(_latency_png(bench["results"]), "latency plot")]
    env = {**bench["machine"], **{f"bundle {k}": v for k, v in manifest["versions"].items()}}
    parts += ["<h2>Environment</h2>", _table(["", "value"], [[k, v] for k, v in env.items()])]
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>edge-tl report</title><style>{CSS}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")
    return write_text(out / "report.html", page)


def _transfer_section(out: Path) -> list[str]:
    """Pretrained vs scratch (``build --compare-scratch``): both validation curves, the effects."""
    from edge_tl.build import SCRATCH_RUN, scratch_comparison

    t = scratch_comparison(out)
    if t is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge_tl.finetune.plots import draw_transfer

    fig, ax = plt.subplots(figsize=(7, 4))
    draw_transfer(ax, {k: [v] for k, v in t["curves"].items()}, "validation accuracy")
    ax.set(title="pretrained vs scratch, same recipe and epochs")
    e, w = t["effects"], t["better"]
    rows = [[label, *("never above chance" if e[k][key] is None else e[k][key] for k in ("pretrained", "scratch")), w[win]]
            for key, label, win in (("start", "start: accuracy after epoch 1", "start"),
                                    ("slope_epochs_to_90pct_of_best", "slope: epochs to 90 % of own best", "slope"),
                                    ("asymptote", "asymptote: best accuracy", "asymptote"))]
    return ["<h2>Transfer learning: pretrained vs scratch</h2>",
            f"<p>The same recipe trained from random initialization for the same {t['epochs']} epochs "
            f"(<code>{SCRATCH_RUN}/</code>), measured on the validation split.</p>",
            _img(_png(fig), "pretrained vs scratch"), _table(["effect", "pretrained", "scratch", "better"], rows)]


MANY_CLASSES = 20


def _class_warnings(rows: list[list], artifact: str) -> list[str]:
    """Classes the headline accuracy hides: never right, or never tested; and the macro recall."""
    recalls = [r[2] for r in rows if r[2] != "-"]
    out = [f"<p>Macro recall of {html.escape(artifact)} (the mean of the classes' recalls, each class counting "
           f"alike): {np.mean(recalls):.4f}.</p>"] if recalls else []
    if never := [r[0] for r in rows if r[2] == 0]:
        out.append(f"<p><b class=\"fail\">Never right:</b> {html.escape(', '.join(never))} ({len(never)} of "
                   f"{len(rows)} classes have recall 0 with {html.escape(artifact)}): more training images of them, or "
                   "--class-weights sqrt, may help.</p>")
    if untested := [r[0] for r in rows if r[3] == 0]:
        out.append(f"<p><b class=\"fail\">Not tested:</b> {html.escape(', '.join(untested))} (no test images: "
                   "their recall is unknown).</p>")
    return out


def _merge_per_class(check: dict, classes: list[str], names: list[str]) -> list[list]:
    tables = [per_class(check["labels"], check["artifacts"][n]["predictions"], classes) for n in names]
    return [[c] + [v for t in tables for v in t[i][1:3]] + [tables[0][i][3]] for i, c in enumerate(classes)]


def open_image_count(page: str) -> int:
    """How many inlined PNGs in ``page`` decode (used by tests)."""
    count = 0
    for chunk in page.split('src="data:image/png;base64,')[1:]:
        Image.open(io.BytesIO(base64.b64decode(chunk.split('"', 1)[0]))).verify()
        count += 1
    return count
