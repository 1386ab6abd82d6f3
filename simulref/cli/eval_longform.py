"""``eval --longform --doc-size D``: after the short-form runs, each document of D
consecutive sentences is decoded as one long-form stream (:mod:`simulref.longform`,
sentence boundaries from the data), re-segmented against the references and scored
(:func:`simulref.longform_metrics.longform_scores`); short-form and long-form go side by
side, per k, on the same sentences. Not resumable and not batched yet (one document at a
time); the group layout only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from simulref.cli.args import LONGFORM_OPTIONS, UsageError, positive_int


def add_options(parser) -> None:
    LONGFORM_OPTIONS["longform"].add(
        parser, help="also decode documents of --doc-size sentences as long-form streams "
                     "and score them (LongYAAL, ...) next to the short-form runs")
    parser.add_argument("--doc-size", type=positive_int, default=10, metavar="D",
                        help="with --longform: sentences per document (default: 10)")
    LONGFORM_OPTIONS["context_budget"].add(parser)
    LONGFORM_OPTIONS["max_history"].add(parser)
    LONGFORM_OPTIONS["eviction"].add(parser)
    LONGFORM_OPTIONS["one_turn"].add(parser)


def check(args, layouts) -> None:
    if args.longform and "group" not in layouts:
        raise UsageError("--longform: long-form decoding runs in the group layout; add "
                         "--layout group")


def run(args, model, tokenizer, pairs, base, ks, out: Path) -> list[dict]:
    """One row per k: the long-form scores over every document."""
    from dataclasses import replace

    from simulref.documents import build_documents
    from simulref.longform import translate_document
    from simulref.longform_metrics import longform_scores

    documents = build_documents(pairs, args.doc_size)
    rows = []
    for k in ks:
        config = replace(base, k=k, layout="group")
        outputs = []
        for i, document in enumerate(documents):
            print(f"simulref eval: long-form k={k}: document {i + 1}/{len(documents)}",
                  file=sys.stderr, flush=True)
            output, _ = translate_document(model, tokenizer, document, config,
                                           context_budget=args.context_budget,
                                           eviction=args.eviction,
                                           turns=not args.one_turn,
                                           max_history=args.max_history)
            outputs.append(output)
        scores = longform_scores(outputs)
        rows.append({"k": k, "doc_size": args.doc_size, "documents": len(documents),
                     "context_budget": args.context_budget, "eviction": args.eviction,
                     "turns": not args.one_turn, "max_history": args.max_history,
                     **{key: (None if isinstance(v, float) and v != v else v)
                        for key, v in scores.items()}})
    (out / "longform.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    return rows


def _short_row(summaries, k: int):
    return next((s for s in summaries if s.get("layout") == "group" and s.get("k") == k),
                None)


def plot(summaries, rows, out: Path) -> list[Path]:
    """``longform-quality-latency.{png,svg}``: BLEU against YAAL, one curve for the
    short-form runs (YAAL) and one for the long-form documents (LongYAAL), per k; the
    two latencies are the same measure cut at the sentence's end and at the document's."""
    from simulref.plots import plot_quality_latency

    if not rows:
        return []
    short_name = "short-form (YAAL)"
    long_name = f"long-form, documents of {rows[0]['doc_size']} (LongYAAL)"
    curves: dict[str, list] = {short_name: [], long_name: []}
    for row in rows:
        short = _short_row(summaries, row["k"])
        yaal = None if short is None else short["latency_reference_length"].get("YAAL")
        if yaal is not None and short.get("bleu") is not None:
            curves[short_name].append((yaal, short["bleu"], row["k"]))
        if row.get("LongYAAL") is not None and row.get("BLEU") is not None:
            curves[long_name].append((row["LongYAAL"], row["BLEU"], row["k"]))
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return []
    return plot_quality_latency(curves, out / "longform-quality-latency",
                                latency="YAAL / LongYAAL")


def table(summaries, rows):
    """Short-form (the group runs) and long-form, per k, on the same sentences."""
    from rich import box
    from rich.table import Table

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    out = Table(title="short-form vs long-form (latency in source words)",
                box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name in ("k", "form", "BLEU", "chrF", "YAAL", "LAAL"):
        out.add_column(name, justify="left" if name in ("k", "form") else "right")
    for row in rows:
        k = row["k"]
        short = _short_row(summaries, k)
        if short is not None:
            latency = short["latency_reference_length"]
            out.add_row(str(k), "short", fmt(short["bleu"]), fmt(short["chrf"]),
                        fmt(latency.get("YAAL")), fmt(latency.get("LAAL")))
        out.add_row(str(k), f"long (D={row['doc_size']})", fmt(row.get("BLEU")),
                    fmt(row.get("chrF")), fmt(row.get("LongYAAL")), fmt(row.get("LongLAAL")))
    return out
