"""Generated Triton block kernels vs SDPA (flash backend) and FlexAttention on one GPU.

Forward and forward+backward TFLOP/s, bfloat16, S = 4096/8192/16384, head dim 64/128,
causal and not, all three measured side by side in one run on the same GPU. The block
kernels run as the ring runs them at N = 1: one block pair covering the whole sequence.
Writes JSON (``--out``) and prints a Markdown table for BENCHMARKS.md.

    python benchmarks/triton_gpu.py --out benchmarks/results/triton_gpu.json

Needs a CUDA GPU; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def flops(B: int, H: int, S: int, D: int, causal: bool, backward: bool) -> float:
    """FlashAttention convention: 4*B*H*S^2*D forward (half for causal), backward 2.5x forward."""
    f = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


def ours(q, k, v, causal: bool):
    from ringcompile import mods
    from ringcompile.kernels.triton import triton_block_kernels
    from ringcompile.spec import AttentionSpec

    mask = mods.causal() if causal else None
    kernels = triton_block_kernels(AttentionSpec(mask=mask, kernel="triton"), forced=True)
    S, scale = q.shape[2], q.shape[-1] ** -0.5
    dout = torch.randn_like(q)

    def fwd():
        return kernels.forward(q, k, v, scale=scale, seq_len=S, mask=mask)

    out, lse = fwd()

    def fwd_bwd():
        o, lse_ = fwd()
        kernels.backward(q, k, v, o, dout, lse_, scale=scale, seq_len=S, mask=mask)

    return fwd, fwd_bwd, out


def sdpa_flash(q, k, v, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    dout = torch.randn_like(q)

    def fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def fwd_bwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
        torch.autograd.grad(o, (qg, kg, vg), dout)

    return fwd, fwd_bwd, fwd()


def flex(q, k, v, causal: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    B, H, S, _ = q.shape
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, qi, kv: kv <= qi, None, None, S, S, device=q.device)
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    dout = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            return compiled(q, k, v, block_mask=block_mask)

    def fwd_bwd():
        o = compiled(qg, kg, vg, block_mask=block_mask)
        torch.autograd.grad(o, (qg, kg, vg), dout)

    return fwd, fwd_bwd, fwd()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/triton_gpu.json")
    parser.add_argument("--seqlens", default="4096,8192,16384")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden // head_dim")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one (see BENCHMARKS.md)")
        return 1
    import triton

    rows = []
    for D in (int(x) for x in args.head_dims.split(",")):
        H = args.hidden // D
        for S in (int(x) for x in args.seqlens.split(",")):
            for causal in (False, True):
                g = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = (torch.randn(args.batch, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
                           for _ in range(3))
                row = {"S": S, "D": D, "H": H, "B": args.batch, "causal": causal}
                ref = None
                for name, make in (("sdpa_flash", sdpa_flash), ("flex", flex), ("ringcompile_triton", ours)):
                    try:
                        fwd, fwd_bwd, out = make(q, k, v, causal)
                        if ref is None:
                            ref = out.float()
                        row[f"{name}_max_err_vs_sdpa"] = (out.float() - ref).abs().max().item()
                        row[f"{name}_fwd_tflops"] = (flops(args.batch, H, S, D, causal, False)
                                                     / bench(fwd) / 1e9)
                        row[f"{name}_fwd_bwd_tflops"] = (flops(args.batch, H, S, D, causal, True)
                                                         / bench(fwd_bwd) / 1e9)
                    except Exception as exc:  # report, keep measuring the others
                        row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(markdown(rows, meta))
    return 0


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"GPU: {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}", "",
             "| S | D | causal | SDPA-flash fwd | Flex fwd | ours fwd | ours/SDPA fwd | SDPA-flash f+b | "
             "Flex f+b | ours f+b | ours/SDPA f+b |", "|" + "---|" * 11]

    def get(r, key):
        v = r.get(key)
        return f"{v:.1f}" if isinstance(v, float) else "err"

    for r in rows:
        ratio_f = (r.get("ringcompile_triton_fwd_tflops", 0) / r["sdpa_flash_fwd_tflops"]
                   if r.get("sdpa_flash_fwd_tflops") else float("nan"))
        ratio_b = (r.get("ringcompile_triton_fwd_bwd_tflops", 0) / r["sdpa_flash_fwd_bwd_tflops"]
                   if r.get("sdpa_flash_fwd_bwd_tflops") else float("nan"))
        lines.append(f"| {r['S']} | {r['D']} | {r['causal']} | {get(r, 'sdpa_flash_fwd_tflops')} | "
                     f"{get(r, 'flex_fwd_tflops')} | {get(r, 'ringcompile_triton_fwd_tflops')} | "
                     f"{ratio_f:.0%} | "
                     f"{get(r, 'sdpa_flash_fwd_bwd_tflops')} | {get(r, 'flex_fwd_bwd_tflops')} | "
                     f"{get(r, 'ringcompile_triton_fwd_bwd_tflops')} | {ratio_b:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
