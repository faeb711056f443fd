"""Plot committed decode results: tokens/s against batch size and against context, ours vs transformers.

    python -m bench.plot bench/results/decode_h200.json bench/results/decode_h200.png   (needs matplotlib)
"""
from __future__ import annotations

import json
import sys


def main(argv=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, dst = (argv or sys.argv[1:])[:2]
    data = json.loads(open(src).read())
    rows = data["rows"]
    impls = sorted({r["impl"] for r in rows})
    fig, (by_batch, by_ctx) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(impls, plt.rcParams["axes.prop_cycle"].by_key()["color"]))  # one colour per impl
    for impl in impls:
        mine = [r for r in rows if r["impl"] == impl]
        at512 = sorted((r["batch"], r["tokens_per_s"]) for r in mine if r["context"] == 512)
        bs1 = sorted((r["context"], r["tokens_per_s"]) for r in mine if r["batch"] == 1)
        style = "--o" if impl.startswith("transformers") else "-o"
        if len(at512) > 1:
            by_batch.plot(*zip(*at512), style, label=impl, color=colors[impl])
        if len(bs1) > 1:
            by_ctx.plot(*zip(*bs1), style, label=impl, color=colors[impl])
    by_batch.set(xscale="log", yscale="log", xlabel="batch size (context 512)", ylabel="tokens/s",
                 title="decode throughput vs batch")
    by_ctx.set(xscale="log", yscale="log", xlabel="context (batch 1)", ylabel="tokens/s",
               title="decode throughput vs context")
    for ax, key in ((by_batch, "batch"), (by_ctx, "context")):
        ticks = sorted({r[key] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    env = data["env"]
    fig.suptitle(f"StableLM-3B shape, bf16, {env.get('gpu')} - torch {env['torch']}, {env['date']}")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
