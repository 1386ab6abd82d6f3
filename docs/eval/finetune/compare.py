"""Table and plot of several `simulref eval` result directories, side by side.

    python docs/eval/finetune/compare.py NAME=DIR [NAME=DIR ...] --out docs/eval/finetune

Writes ``table.md`` (BLEU, chrF, AL with |Y| = reference length and with |Y| = hypothesis
length, LAAL, finish reasons) and ``quality-latency.png`` / ``.svg`` (BLEU against AL, one
curve per model through k = 1, 3, 5, ...; offline as a star of the same colour), and
copies each directory's ``results.json`` next to them as ``results-NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def load(spec: str) -> tuple[str, list[dict]]:
    name, _, path = spec.partition("=")
    runs = json.loads((Path(path) / "results.json").read_text())["runs"]
    return name, runs


def table(models: list[tuple[str, list[dict]]]) -> str:
    head = ("| model | run | n | BLEU | chrF | AL (ref len) | AL (hyp len) | LAAL | "
            "finish |\n|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for name, runs in models:
        for r in runs:
            ref, hyp = r["latency_reference_length"], r["latency_hypothesis_length"]
            finish = ", ".join(f"{k} {v}" for k, v in sorted(r["finish_reasons"].items()))
            rows.append(f"| {name} | {r['run']} | {r['sentences']} | {r['bleu']:.2f} | "
                        f"{r['chrf']:.2f} | {ref['AL']:.2f} | {hyp['AL']:.2f} | "
                        f"{ref['LAAL']:.2f} | {finish} |")
    return head + "\n".join(rows) + "\n"


def plot(models: list[tuple[str, list[dict]]], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"svg.hashsalt": "simulref"}):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for name, runs in models:
            points = sorted((r for r in runs if r["k"] is not None), key=lambda r: r["k"])
            xs = [r["latency_reference_length"]["AL"] for r in points]
            (line,) = ax.plot(xs, [r["bleu"] for r in points], marker="o", label=name)
            for r, x in zip(points, xs, strict=True):
                ax.annotate(f"k={r['k']}", (x, r["bleu"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8, color=line.get_color())
            for r in runs:
                if r["k"] is None:
                    ax.plot([r["latency_reference_length"]["AL"]], [r["bleu"]], marker="*",
                            markersize=13, linestyle="none", color=line.get_color())
        ax.set_xlabel("AL (source words, |Y| = reference length)")
        ax.set_ylabel("BLEU")
        ax.set_title("SmolLM2-135M, postgres-en-fr (stars: offline)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"))
        fig.savefig(stem.with_suffix(".svg"), metadata={"Date": None})
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", metavar="NAME=DIR")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = [load(spec) for spec in args.runs]
    (out / "table.md").write_text(table(models), encoding="utf-8")
    plot(models, out / "quality-latency")
    for spec in args.runs:
        name, _, path = spec.partition("=")
        shutil.copy(Path(path) / "results.json", out / f"results-{name}.json")
    print(table(models))


if __name__ == "__main__":
    main()
