"""The markdown of a benchmark session (``bench/results.md``) from its JSON document."""

from __future__ import annotations

from collections.abc import Sequence


def fmt(value, digits: int = 2) -> str:
    """A number for a table: fixed digits, '-' for a missing value."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |"
              for row in rows]
    return lines


def spread(s: dict, digits: int = 2) -> str:
    """``median (p5-p95, n)`` of a :func:`benchlib.summary`."""
    if not s or not s.get("n"):
        return "-"
    return (f"{fmt(s['median'], digits)} ({fmt(s['p5'], digits)}-{fmt(s['p95'], digits)}, "
            f"n={s['n']})")


def _machine(doc: dict) -> list[str]:
    m = doc["machine"]
    ob = m.get("openblas") or {}
    kind = ob.get("kind") or "openblas"
    name, threads = (("MKL", "MKL_NUM_THREADS") if kind == "mkl"
                     else ("OpenBLAS", "OPENBLAS_NUM_THREADS"))
    blas = (f"{name} preloaded (" + (ob.get("preloaded") or "?") + ", "
            + (f"{threads}={ob['threads']}" if ob.get("threads")
               else "default threads") + ")") if ob.get("active") else "wheel's BLAS"
    load = " -> ".join(fmt(x) if x is not None else "-" for x in (
        (m.get("load_average_start") or [None])[0], (m.get("load_average_end") or [None])[0]))
    return [
        f"- machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}",
        f"- MLX {m['mlx']}, mlx-lm {m['mlx_lm']}, device {m['device']}, {blas}",
        f"- load average (1 min) at start -> end: {load}",
        f"- command: `{doc['command']}`, runtime {fmt(doc['runtime_s'], 0)} s, {doc['created']}",
    ]


def _by(doc: dict, section: str) -> list[dict]:
    return [r for r in doc["results"] if r["section"] == section]


def _decode(results: list[dict]) -> list[str]:
    if not results:
        return []
    out = ["", "## Decoding: simulref / mlx-lm, same prompt, lockstep blocks", "",
           "Ratio = our tokens/s over `mlx_lm.stream_generate`'s in adjacent blocks: median "
           "(p5-p95, n blocks) and pooled (all tokens / all time). Offline: k >= N, the "
           "same tokens as mlx-lm. Wait-k: k = 3, reads included, per engine (all engines "
           "wrote the same traces: the 'agree' column).", ""]
    rows = []
    for r in results:
        m = r["metrics"]
        rows.append([r["model"], r.get("weights", r.get("dtype", "-")),
                     f"{m['sentences']} ({m['same_tokens']} same)",
                     spread(m["decode_ratio"]), fmt(m["decode_ratio_pooled"]),
                     f"{fmt(m['decode_tps'], 1)} / {fmt(m['decode_tps_mlx_lm'], 1)}"])
    out += table(["model", "weights", "sentences", "offline ratio", "pooled",
                  "tok/s ours / mlx-lm"], rows)
    out += ["", "Wait-k (k = 3), known source. Forwards / token: model calls after the "
                "first (the prefilled source, or the prefix), per target token written.", ""]
    rows = []
    for r in results:
        m = r["metrics"]
        for engine, e in m["engines"].items():
            rows.append([r["model"], engine, f"{m['engines_agree']}/{m['sentences']}",
                         spread(e["waitk_ratio"]), fmt(e["waitk_ratio_pooled"]),
                         fmt(e["waitk_tps"], 1), fmt(e["forwards_per_token"]),
                         fmt(e["extra_target_forwards_per_word"]),
                         fmt(e["source_forwards_per_word"])])
    out += table(["model", "engine", "agree", "wait-k ratio", "pooled", "tok/s",
                  "forwards / token", "extra target fwd / word", "source fwd / word"], rows)
    out += ["", "## Whole translation, prefill included (k = 3)", "",
            "`translate()` against `mlx_lm.stream_generate` on the full chat prompt making "
            "the same number of tokens (EOS suppressed), timed A B B A per sentence: mlx-lm's "
            "time over ours, pooled over all sentences and per sentence.", ""]
    rows = []
    for r in results:
        for engine, w in r["metrics"].get("whole_run", {}).items():
            rows.append([r["model"], engine, fmt(w["ratio_pooled"]), spread(w["ratio"]),
                         w["tokens"]])
    out += table(["model", "engine", "ratio (pooled)", "per sentence", "tokens"], rows)
    out += ["", "## Live source: read-to-write latency and forwards (wait-k, k = 3)", "",
            "Words from an iterator, read as they come. From feeding a word read after "
            "target tokens to the first token of the next word, in mlx-lm decode steps (its "
            "mean per-token time on the same sentence, measured alongside) and in seconds: "
            "median (p5-p95, n reads).", ""]
    rows = []
    for r in results:
        live = r["metrics"].get("live", {})
        for engine in (e for e in live if e not in ("agree", "sentences")):
            x = live[engine]
            rows.append([r["model"], engine, f"{live['agree']}/{live['sentences']}",
                         spread(x["latency_steps"]), spread(x["latency_s"], 3),
                         fmt(x["forwards_per_token"])])
    out += table(["model", "engine", "agree", "steps", "seconds", "forwards / token"], rows)
    out += ["", "## Prefill", "",
            "First read: system prompt + k words + assistant header, fed as the decoder "
            "does (one forward per segment) against mlx-lm's `prompt_tps` on the same "
            "tokens. Full prompt: the whole source read first (offline). Ratios per "
            "sentence: median (p5-p95, n).", ""]
    out += table(["model", "first read tok/s ours / mlx-lm", "first read ratio",
                  "full prompt ratio"], [
        [r["model"], f"{fmt(r['metrics']['first_read_tps']['median'], 1)} / "
                     f"{fmt(r['metrics']['first_read_tps_mlx_lm']['median'], 1)}",
         spread(r["metrics"]["first_read_prefill_ratio"]),
         spread(r["metrics"]["full_prompt_prefill_ratio"])] for r in results])
    return out


def _scaling(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        m = r["metrics"]
        runs = {(x["layout"], x["words"]): x for x in m["runs"]}
        lengths = sorted({x["words"] for x in m["runs"]})
        out += ["", f"## Scaling with source length ({r['model']}, k = {m['settings']['k']}, "
                    "every word read)", ""]
        rows = []
        for n in lengths:
            g, e = runs.get(("group", n)), runs.get(("reencode", n))
            rows.append([n, fmt(g and g["seconds"], 1), fmt(e and e["seconds"], 1),
                         fmt(e["seconds"] / g["seconds"]) if g and e else "-",
                         fmt(g and g["tokens_fed"]), fmt(e and e["tokens_fed"])])
        out += table(["words", "group s", "reencode s", "reencode / group",
                      "tokens fed (group)", "tokens fed (reencode)"], rows)
        out += [""] + [
            f"- {layout}: time ~ N^{fmt(m[layout]['time_exponent'])} "
            f"(between the two longest: N^{fmt(m[layout]['time_exponent_last'])}), "
            f"tokens fed ~ N^{fmt(m[layout]['tokens_fed_exponent'])}"
            for layout in ("group", "reencode") if layout in m]
    return out


def _blas(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        m = r["metrics"]
        out += ["", "## BLAS on the CPU (float32 SmolLM2-135M, fresh process per run)", ""]
        if not m.get("applicable"):
            out.append(f"Not applicable here: {m['reason']}")
            continue
        rows = [[v, len(d["runs"]), fmt(d["load_s"], 1), fmt(d["prefill_tps"], 1),
                 fmt(d["decode_tps"], 2),
                 fmt(m["speedup"].get(v, {}).get("prefill")) if v != "reference" else "1",
                 fmt(m["speedup"].get(v, {}).get("decode")) if v != "reference" else "1"]
                for v, d in sorted(m["variants"].items())]
        out += [f"Prompt of {m['prompt_tokens']} tokens; OpenBLAS: `{m['library']}`; "
                "medians over runs.", ""]
        out += table(["variant", "runs", "load s", "prefill tok/s", "decode tok/s",
                      "prefill x", "decode x"], rows)
    return out


def _batch(results: list[dict]) -> list[str]:
    if not results:
        return []
    first = results[0]["metrics"]["settings"]
    ks = ", ".join(map(str, first["k"]))
    out = ["", f"## Evaluation throughput by batch size (wait-k k = {ks}, "
               f"{first['layout']} layout, {first['sentences']} sentences)", "",
           f"One `simulref eval` ({first['items']} (run, sentence) items), decoded one at a "
           "time (batch size 1: today's path, `translate` per sentence) and batched "
           "(`--batch-size B`: every run's sentences in one continuous batch), in the same "
           "session. Throughput: target tokens / wall time of the whole eval. Agree: batched "
           "traces equal to the one-at-a-time ones.", ""]
    rows = []
    for r in results:
        for run in r["metrics"]["runs"]:
            rows.append([r["model"], run["batch_size"], fmt(run["seconds"], 1),
                         run["tokens"], fmt(run["tokens_per_s"], 1), fmt(run["ratio"]),
                         f"{run['agree']}/{r['metrics']['settings']['items']}",
                         fmt(run["busy_rows_per_step"], 1), run["steps"],
                         fmt(run["peak_cache_mib"], 0)])
    out += table(["model", "B", "seconds", "tokens", "tok/s", "x B=1", "agree",
                  "busy rows / step", "steps", "batch KV MiB"], rows)
    return out


def _step_vs_torch(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        m = r["metrics"]
        out += ["", f"## A model call against PyTorch ({r.get('model')}, float32, fresh "
                    "process per side)", ""]
        if not m.get("applicable"):
            out.append(f"Not applicable here: {m['reason']}")
            continue
        out += [f"Prompt of {m['prompt_tokens']} tokens; ms per call, medians of two runs "
                "in mirrored order; x: over torch's (below 1: faster than torch).", ""]
        rows = []
        for threads, entry in m["threads"].items():
            torch = entry["torch"]
            rows.append([threads, "torch (transformers)", fmt(torch["step_ms"], 1), "-",
                         fmt(torch["prefill_ms"], 0), "1", "1"])
            for side, f in entry.items():
                if side == "torch":
                    continue
                rows.append([threads, side, fmt(f["step_ms"], 1), fmt(f["engine_step_ms"], 1),
                             fmt(f["prefill_ms"], 0), fmt(f["step_vs_torch"]),
                             fmt(f["prefill_vs_torch"])])
        out += table(["threads", "side", "decode step ms (mlx-lm)", "engine step ms",
                      "prefill ms", "step x", "prefill x"], rows)
        out += ["", "Parts of a decode step (ms):", ""]
        parts = []
        for threads, entry in m["threads"].items():
            for side, f in entry.items():
                p = f["parts"]
                if side == "torch":
                    parts.append([threads, side, fmt(p["matmuls_ms"], 1), "-",
                                  fmt(p["attention_ms"], 1), fmt(p["other_ops_ms"], 1), "-"])
                else:
                    parts.append([threads, side, fmt(p["body_linears_ms"], 1),
                                  fmt(p["head_ms"], 1), "-", fmt(p["rest_ms"], 1),
                                  fmt(p["graph_build_ms"], 1)])
        out += table(["threads", "side", "matmuls (body)", "head", "attention",
                      "rest / other ops", "graph building"], parts)
    return out


def _policies(agreement: list[dict], confidence: list[dict]) -> list[str]:
    out = []
    if agreement:
        out += ["", "## LocalAgreement-2: the draft path against its token-by-token twin", "",
                "Sources of 20-40 words (dev messages joined); wall time A B B A per source."
                "", ""]
        rows = []
        for r in agreement:
            m = r["metrics"]["summary"]
            rows.append([r["model"], f"{m['same_traces']}/{m['sentences']}",
                         fmt(m["fast_calls_per_committed_token"]),
                         fmt(m["twin_calls_per_committed_token"]), fmt(m["speedup"])])
        out += table(["model", "same traces", "calls / committed token (draft)",
                      "(twin)", "wall x"], rows)
    if confidence:
        out += ["", "## Confidence: what a look costs in forwards", "",
                "Target forwards per target token written: Confidence 0.5, a count-only "
                "policy replaying its schedule, and wait-3.", ""]
        rows = []
        for r in confidence:
            m = r["metrics"]
            p = m["policies"]
            if "replay" not in p:
                continue
            rows.append([r["model"], m["sentences"], fmt(p["confidence:0.5"]["calls_per_token"], 3),
                         fmt(p["replay"]["calls_per_token"], 3), fmt(m["ratio"], 3),
                         f"{m['same_schedule']}/{m['sentences']}", m["header_looks"],
                         fmt(p["wait-3"]["calls_per_token"], 3)])
        out += table(["model", "sources", "confidence", "replayed", "x", "same schedule",
                      "looks before the first word", "wait-3"], rows)
    return out


def _kept(max_history) -> str:
    """Finished pairs kept in the conversation: a number, or all the budget holds."""
    return "all" if max_history is None or max_history == "all" else str(max_history)


def _longform(flat: list[dict], latency: list[dict], bleu: list[dict]) -> list[str]:
    out = []
    for r in flat:
        m = r["metrics"]
        out += ["", f"## A {m['sentences']}-sentence stream (tiny model, context budget "
                    f"{m['context_budget']})", "", "Last 10% of the stream over the first 10%:", ""]
        out += table(["peak KV slots", "cache columns", "MLX active memory", "max position",
                      "time per word"],
                     [[fmt(m["peak_slots_last_over_first"], 3),
                       fmt(m["peak_cache_columns_last_over_first"], 3),
                       fmt(m["peak_active_bytes_last_over_first"], 3),
                       fmt(m["peak_position_last_over_first"], 3),
                       fmt(m["time_per_word_last_over_first"], 3)]])
    if latency:
        out += ["", "## Read-to-write latency along a document (a live stream, k = 3)", ""]
        out += table(["model", "sentences", "median first 20 s", "median last 20 s", "x",
                      "peak context", "budget", "pairs kept", "sentences without a write"],
                     [[r["model"], r["metrics"]["sentences"],
                       fmt(r["metrics"]["median_first_s"], 3),
                       fmt(r["metrics"]["median_last_s"], 3),
                       fmt(r["metrics"]["ratio_last_over_first"], 3),
                       r["metrics"]["peak_context"], r["metrics"]["context_budget"],
                       _kept(r["metrics"].get("max_history", "all")),
                       len(r["metrics"].get("sentences_without_a_write", []))]
                      for r in latency])
    if bleu:
        out += ["", "## Long-form against short-form BLEU (k = 3, the same sentences)", ""]
        out += table(["model", "sentences", "document size", "short-form",
                      "long-form (default)", "difference", "every pair kept",
                      "one turn (every pair kept)"],
                     [[r["model"], r["metrics"]["sentences"], r["metrics"]["doc_size"],
                       fmt(r["metrics"]["short_bleu"]), fmt(r["metrics"]["long_bleu"]),
                       fmt(r["metrics"]["difference"]),
                       fmt(r["metrics"].get("all_pairs_bleu")),
                       fmt(r["metrics"].get("one_turn_bleu"))] for r in bleu])
    return out


def markdown(doc: dict) -> str:
    lines = ["# simulref benchmarks", "", *_machine(doc)]
    lines += _decode(_by(doc, "decode"))
    lines += _batch(_by(doc, "batch"))
    lines += _scaling(_by(doc, "scaling"))
    lines += _blas(_by(doc, "blas"))
    lines += _step_vs_torch(_by(doc, "step_vs_torch"))
    lines += _policies(_by(doc, "local_agreement"), _by(doc, "confidence_forwards"))
    lines += _longform(_by(doc, "longform_flat"), _by(doc, "longform_latency"),
                       _by(doc, "longform_bleu"))
    return "\n".join(lines) + "\n"
