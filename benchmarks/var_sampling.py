"""Sampling time per image: M-VAR with state carry vs M-VAR re-scanning (official) vs VAR with a KV cache.

Equal depth (default 16), the 256^2 schedule (10 scales, L = 680), random weights, fp32 on the CPU, batch
``--batch`` images with classifier-free guidance (the doubled batch), top-k 900 / top-p 0.96. Each width in
``--widths`` builds the three models at depth ``--depth`` (heads = width / 64, the official head width; 1024 is
the real d16 width). Tokenizer decoding is not timed (it is the same for all three): the codec is a random 4096 x 32
codebook with identity phi.

Three measurements per width and thread count:

* ``generate``: a whole ``generate()`` call per contender, seconds per image;
* ``mamba work``: one M-VAR block's Mamba-2 calls over the ten scales of one sampling run, with the state carried
  (:meth:`ratelab.layers.mamba2.Mamba2.chunk` on the p_k^2 new tokens) vs re-run on the whole prefix (the
  official algorithm: 1710 token-steps instead of 680);
* before timing, the equivalence of the two M-VAR paths (same tokens from the same seed, logits max abs diff).

Also printed and recorded: the attention accounting of the M-VAR paper (section 2.2 of the research note): intra-scale
pairs sum_k p_k^4 as a share of the dense L^2 (23.9 % at 256^2, 30.3 % at 512^2) and of VAR's block-causal pairs.

Targets (issue 13): state carry >= 2x re-scan on the Mamba work, M-VAR >= 1.2x VAR end to end at equal depth.

    python benchmarks/var_sampling.py --threads 1 2 --json benchmarks/records/<date>/var_sampling.json
    python benchmarks/var_sampling.py --quick          # smoke run: depth 2, width 64, 1 repeat
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import (  # noqa: E402
    LoadMonitor,
    add_protocol_args,
    device_name,
    fmt_range,
    fmt_ratio,
    machine_info,
    machine_line,
    print_header,
    ratio_summary,
    set_threads,
    summary,
    time_interleaved,
    write_record,
)

from ratelab.models.var.config import VAR_PATCH_NUMS_256, VAR_PATCH_NUMS_512  # noqa: E402
from ratelab.models.var.mvar import mvar_d16  # noqa: E402
from ratelab.models.var.sampling import ResidualCodec  # noqa: E402
from ratelab.models.var.var import var_d16  # noqa: E402


def attention_accounting(patch_nums) -> dict:
    """Pair counts of one head of one layer: dense L^2, VAR's block-causal pairs, intra-scale pairs sum p^4."""
    sizes = [p * p for p in patch_nums]
    L = sum(sizes)
    intra = sum(n * n for n in sizes)
    causal = sum(n * sum(sizes[: i + 1]) for i, n in enumerate(sizes))
    prefix = sum(sum(sizes[: i + 1]) for i in range(len(sizes)))
    return {"L": L, "dense_pairs": L * L, "block_causal_pairs": causal, "intra_scale_pairs": intra,
            "intra_share_of_dense": intra / (L * L), "intra_share_of_block_causal": intra / causal,
            "rescan_mamba_token_steps": prefix}


def block_macs_per_token(width: int, patch_nums, d_state: int = 64) -> dict:
    """Multiply-adds per token per block during sampling, averaged over the L tokens (projections and attention
    scores/values; AdaLN is per image, not per token): VAR = qkv + proj + FFN (12 C^2) + attention over the KV
    cache (2 C x keys seen); M-VAR = the same projections + Mamba-2's in_proj (C x (4C + 2N + H)) and out_proj
    (2C x C) + the SSD state update and read (about 3 d_in N) + intra-scale attention."""
    a = attention_accounting(patch_nums)
    C, L = width, a["L"]
    heads = 2 * C // 64
    var = 12 * C * C + 2 * C * a["block_causal_pairs"] / L
    mamba = C * (4 * C + 2 * d_state + heads) + 2 * C * C + 3 * 2 * C * d_state
    mvar = 12 * C * C + 2 * C * a["intra_scale_pairs"] / L + mamba
    return {"var": var, "mvar": mvar, "mvar_over_var": mvar / var}


def build(width: int, depth: int, seed: int, patch_nums) -> dict[str, torch.nn.Module]:
    heads = max(width // 64, 1)
    common = dict(depth=depth, embed_dim=width, num_heads=heads, patch_nums=patch_nums)
    torch.manual_seed(seed)
    models = {"mvar": mvar_d16(**common), "var": var_d16(**common)}
    with torch.no_grad():  # random, non-degenerate weights: the official init's ~0 gates would hide no cost anyway
        for m in models.values():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return {k: m.eval() for k, m in models.items()}


def equivalence(mvar, codec, labels, seed: int) -> dict:
    kw = dict(cfg=1.5, top_k=900, top_p=0.96, seed=seed, codec=codec, return_logits=True)
    a = mvar.generate(labels, state_carry=True, **kw)
    b = mvar.generate(labels, state_carry=False, **kw)
    same = all(torch.equal(x, y) for x, y in zip(a.idx_list, b.idx_list))
    diff = max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits))
    return {"same_tokens": same, "logits_max_abs_diff": diff}


def mamba_calls(mixer, width: int, batch2: int, seed: int, patch_nums) -> dict:
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(batch2, p * p, width, generator=g) for p in patch_nums]

    @torch.no_grad()
    def carry():
        conv, ssm = mixer.allocate_inference_cache(batch2)
        for u in chunks:
            _, conv, ssm = mixer.chunk(u, conv, ssm)

    @torch.no_grad()
    def rescan():
        prefix = None
        for u in chunks:
            prefix = u if prefix is None else torch.cat([prefix, u], 1)
            mixer(prefix)[:, -u.shape[1]:]

    return {"carry": carry, "rescan": rescan}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_protocol_args(ap)  # the protocol's 5 repeats (docs/benchmarks.md: medians of >= 5)
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 1024], help="model widths (default 256 1024)")
    ap.add_argument("--depth", type=int, default=16, help="blocks of every model (default 16)")
    ap.add_argument("--batch", type=int, default=1, help="images per generate() call (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: depth 2, width 64, 4 scales (1, 2, 4, 8), 1 repeat, no warm-up")
    args = ap.parse_args(argv)
    pn = VAR_PATCH_NUMS_256
    if args.quick:
        args.depth, args.widths, args.repeats, args.warmup = 2, [64], 1, 0
        pn = (1, 2, 4, 8)

    log = lambda s: print(s, flush=True)  # noqa: E731
    info = machine_info(packages=("timm",))
    print_header(f"VAR / M-VAR sampling, patch_nums {pn}, depth {args.depth}, widths {args.widths}, batch "
                 f"{args.batch} (+CFG), fp32, {device_name('cpu')}", info, log)
    acc = {"256": attention_accounting(VAR_PATCH_NUMS_256), "512": attention_accounting(VAR_PATCH_NUMS_512)}
    for k, a in acc.items():
        log(f"attention accounting {k}^2: L={a['L']}, intra-scale pairs {a['intra_scale_pairs']:,} = "
            f"{100 * a['intra_share_of_dense']:.1f}% of L^2 ({100 * a['intra_share_of_block_causal']:.1f}% of the "
            f"{a['block_causal_pairs']:,} block-causal pairs); re-scan Mamba work {a['rescan_mamba_token_steps']} "
            f"token-steps vs {a['L']}")
    codec = ResidualCodec(torch.randn(4096, 32, generator=torch.Generator().manual_seed(args.seed)), pn)
    labels = torch.arange(args.batch) % 1000
    results: dict = {}
    loads: dict = {}
    lines = ["| width | threads | M-VAR carry s/img | M-VAR re-scan s/img | VAR KV s/img | carry vs re-scan | "
             "M-VAR carry vs VAR | Mamba work: carry vs re-scan |", "|---|---|---|---|---|---|---|---|"]
    for width in args.widths:
        models = build(width, args.depth, args.seed, pn)
        params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
        macs = block_macs_per_token(width, pn)
        log(f"width {width}: M-VAR {params['mvar'] / 1e6:.1f}M, VAR {params['var'] / 1e6:.1f}M parameters; "
            f"multiply-adds per token per block while sampling: M-VAR {macs['mvar'] / 1e6:.2f}M, VAR (KV cache) "
            f"{macs['var'] / 1e6:.2f}M, ratio {macs['mvar_over_var']:.2f}")
        results[f"{width}/macs_per_token_block"] = macs
        set_threads(args.threads[0])
        eq = equivalence(models["mvar"], codec, labels, args.seed)
        log(f"  state carry vs re-scan: same tokens {eq['same_tokens']}, logits max abs diff "
            f"{eq['logits_max_abs_diff']:.3g}")
        if not eq["same_tokens"]:
            log("  ABORT: the two M-VAR paths sampled different tokens")
            return 1
        kw = dict(cfg=1.5, top_k=900, top_p=0.96, seed=args.seed, codec=codec)
        mv, va = models["mvar"], models["var"]
        gen = {
            "mvar_carry": lambda mv=mv, kw=kw: mv.generate(labels, state_carry=True, **kw),
            "mvar_rescan": lambda mv=mv, kw=kw: mv.generate(labels, state_carry=False, **kw),
            "var_kv": lambda va=va, kw=kw: va.generate(labels, **kw),
        }
        mamba = mamba_calls(mv.blocks[0].mixer, width, 2 * args.batch, args.seed, pn)
        for t in args.threads:
            set_threads(t)
            with LoadMonitor() as mon:
                tg = time_interleaved(gen, repeats=args.repeats, warmup=args.warmup, log=log,
                                      label=f"w{width} {t} thr generate ")
                tm = time_interleaved(mamba, repeats=args.repeats, warmup=args.warmup, log=log,
                                      label=f"w{width} {t} thr mamba ")
            loads[f"{width}/{t}"] = mon.record
            log(f"  {t} thread(s): {mon.line()}")
            per_img = {k: [s / args.batch for s in v] for k, v in tg.items()}
            r = {"generate_s_per_image": per_img, "mamba_s": tm,
                 "summary": {k: summary(v) for k, v in {**per_img, **{f"mamba_{k}": v for k, v in tm.items()}}.items()},
                 "carry_vs_rescan": ratio_summary(per_img["mvar_rescan"], per_img["mvar_carry"]),
                 "mvar_vs_var": ratio_summary(per_img["var_kv"], per_img["mvar_carry"]),
                 "mamba_carry_vs_rescan": ratio_summary(tm["rescan"], tm["carry"])}
            results[f"{width}/{t}"] = r
            s = r["summary"]
            lines.append(f"| {width} | {t} | {fmt_range(s['mvar_carry'], digits=3)} | "
                         f"{fmt_range(s['mvar_rescan'], digits=3)} | {fmt_range(s['var_kv'], digits=3)} | "
                         f"{fmt_ratio(r['carry_vs_rescan'])} | {fmt_ratio(r['mvar_vs_var'])} | "
                         f"{fmt_ratio(r['mamba_carry_vs_rescan'])} |")
        results[f"{width}/params"] = params
        results[f"{width}/equivalence"] = eq
    log("")
    log(f"machine: {machine_line(info)}")
    log(f"median [IQR] of {args.repeats} interleaved repeats after {args.warmup} warm-up call(s); ratios = median "
        "[IQR] of per-repeat ratios (>1: the first-named is faster)")
    for k, rec in loads.items():
        log(f"load, width/threads {k}: 1-min load average {rec['loadavg_before'][0]:.2f} -> "
            f"{rec['loadavg_after'][0]:.2f}, other processes {100 * rec.get('other_cpu_frac', float('nan')):.0f}% "
            "of the CPU time")
    table = "\n".join(lines)
    log(table)
    if args.json:
        write_record(args.json, args, argv, machine=info, device=device_name("cpu"), patch_nums=pn, accounting=acc,
                     results=results, load=loads, table=table)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
