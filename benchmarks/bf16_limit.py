"""How far bfloat16 can take a base text query on this CPU: the matrix products' own speed-up
against the encoder's, as ratios in one run (issue #25).

- `Linear` layers of a base query's shapes (128 latents × 768 ↔ 3072), float32 against
  bfloat16, and bfloat16 with oneDNN-prepacked weights (pvl_search/model/packed_linear.py, what
  the runner uses): ms and GFLOP/s;
- the base text encoder (random weights: the cost does not depend on them), one query at a time,
  p50 over `--queries` queries × `--rounds` rounds in each of the three forms, the forms
  alternated per round.

The products are most of a base query's time, so their bf16 / float32 ratio bounds how low a
query's can go. Prints the CPU's bf16 flags; on a CPU without native bf16 the ratios say so.

    python benchmarks/bf16_limit.py [--queries 30] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pvl_search.model.packed_linear import PackedLinear, pack_linears  # noqa: E402
from pvl_search.precision import describe_cpu  # noqa: E402

SHAPES = ((128, 768, 768), (128, 768, 3072), (128, 3072, 768), (128, 768, 2304))


def per_call_ms(fn, repeats: int = 100) -> float:  # noqa: ANN001 - a callable
    for _ in range(10):
        fn()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {describe_cpu()}; torch {torch.__version__}, {args.threads} threads")

    print("\n| Linear (rows × in → out) | float32 ms | bf16 ms | packed bf16 ms | bf16 / f32 | GFLOP/s f32 / bf16 |")
    print("|---|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for rows, fan_in, fan_out in SHAPES:
            linear = nn.Linear(fan_in, fan_out).eval()
            x = torch.randn(rows, fan_in)
            xb, wb, bb = x.bfloat16(), linear.weight.bfloat16(), linear.bias.bfloat16()
            packed = PackedLinear(nn.Linear(fan_in, fan_out).bfloat16(), rows)  # the runner's layer
            f32 = per_call_ms(lambda: linear(x))  # noqa: B023 - called within the iteration
            b16 = per_call_ms(lambda: nn.functional.linear(xb, wb, bb))  # noqa: B023
            pk = per_call_ms(lambda: packed(xb))  # noqa: B023
            flops = 2 * rows * fan_in * fan_out
            print(f"| {rows} × {fan_in} → {fan_out} | {f32:.3f} | {b16:.3f} | {pk:.3f} | {b16 / f32:.2f} | "
                  f"{flops / f32 / 1e6:.0f} / {flops / b16 / 1e6:.0f} |")

    from pvl_search.model.config import preset
    from pvl_search.model.perceiver import PerceiverVL
    from pvl_search.model.tokenizer import Tokenizer

    torch.manual_seed(0)
    forms = {"float32": PerceiverVL(preset("base")).eval()}
    for name in ("bfloat16", "packed bfloat16"):
        model = PerceiverVL(preset("base")).eval()
        model.load_state_dict(forms["float32"].state_dict())
        forms[name] = model.bfloat16()
    with torch.inference_mode():
        pack_linears(forms["packed bfloat16"].encoder, forms["float32"].config.latents)
    tokenizer = Tokenizer(forms["float32"].config.text_length)
    queries = [tokenizer.encode([f"a person number {i} is cooking pasta in a small kitchen"])[0]
               for i in range(args.queries)]
    times: dict[str, list[float]] = {name: [] for name in forms}
    with torch.inference_mode():
        for round_ in range(args.rounds):
            order = list(forms) if round_ % 2 == 0 else list(reversed(forms))
            for name in order:
                model = forms[name]
                for _ in range(2):
                    model.encode_text(queries[0])
                for ids in queries:
                    began = time.perf_counter()
                    model.encode_text(ids)
                    times[name].append((time.perf_counter() - began) * 1e3)
    base = statistics.median(times["float32"])
    print("\n| base text encoder, one query | p50 ms | / float32 |")
    print("|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / base:.3f} |")


if __name__ == "__main__":
    main()
