"""lmport's integer matmuls on AVX-512 VNNI (lmport.kernels.cpu_vnni: W4A8 and W8A8 with `vpdpbusd`) against torch's
`_weight_int4pack_mm_for_cpu` and `_weight_int8pack_mm` (which widen the weights and multiply in floating point), as
a decode step of the bundled model calls them. Reproduce:

    .venv/bin/python docs/experiments/vnni_gemv.py [--bits 4 8] [--rows 1 2 4 8 32]

A "token" is every matmul of the model once, on distinct weights (30 layers of q/k/v, o, gate/up and down, then
lm_head), so each call reads its weight from memory, as in a decode step. This script times the package's own build
of the kernels. lmport's and torch's tokens alternate, in rounds; the best round of each is kept (the machine may be
shared).
"""

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from lmport import kernels
from lmport.engine.quantization import Int4Weight, Int8Weight
from lmport.kernels import cpu

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # a layer: qkv, o, gate_up, down
LM_HEAD = (49152, 576)
LAYERS = 30


def best_of(fns: list[Callable[[], object]], rounds: int = 5) -> list[float]:
    """Seconds per call of each fn: the best of `rounds` calls, the fns' calls interleaved."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def forms(weight: torch.Tensor, bits: int) -> tuple[object, object]:
    """(lmport's form, torch's form) of a bf16 weight."""
    def make() -> object:
        return Int4Weight.quantize(weight, 32) if bits == 4 else Int8Weight.quantize(weight)
    own = make()
    with kernels.use_backend("torch"):
        theirs = make()
    return own, theirs


def nbytes(form: object) -> int:
    return sum(t.nbytes for t in (getattr(form, name, None) for name in ("weight", "packed", "scales", "offsets"))
               if isinstance(t, torch.Tensor))


def token(matmuls: list[tuple[object, object, int]], inputs: dict[int, torch.Tensor], side: int) -> None:
    for *pair, k in matmuls:
        pair[side].matmul(inputs[k])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=[4, 8])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    args = parser.parse_args()
    assert cpu.vnni_matmul_supported(), "needs lmport's CPU kernels built for AVX-512 VNNI"
    torch.manual_seed(0)
    torch.set_num_threads(2)
    for bits in args.bits:
        layers = [shape for _ in range(LAYERS) for shape in SHAPES]
        matmuls = [(*forms(torch.randn(n, k, dtype=torch.bfloat16) * 0.05, bits), k) for n, k in layers]
        lm_head = torch.randn(*LM_HEAD, dtype=torch.bfloat16)
        matmuls.append((*forms(lm_head, bits), LM_HEAD[1]))
        sizes = [nbytes(own) for own, _, _ in matmuls], [nbytes(theirs) for _, theirs, _ in matmuls]
        x = torch.randn(4, LM_HEAD[1], dtype=torch.bfloat16)
        exact = x.double() @ lm_head.double().T
        errors = [((form.matmul(x).double() - exact).norm() / exact.norm()).item() for form in matmuls[-1][:2]]
        print(f"int{bits}: weights {sum(sizes[0]) / 1e6:.0f} MB (lmport's layout), {sum(sizes[1]) / 1e6:.0f} MB "
              f"(torch's); lm_head relative error against the bf16 weight: lmport {errors[0]:.1e}, "
              f"torch {errors[1]:.1e}")
        for m in args.rows:
            inputs = {k: torch.randn(m, k, dtype=torch.bfloat16) for _, k in SHAPES}
            times = best_of([partial(token, matmuls, inputs, 0), partial(token, matmuls, inputs, 1)])
            print(f"int{bits} M={m}: lmport {times[0] * 1e3:.2f} ms a token ({sum(sizes[0]) / times[0] / 1e9:.1f} "
                  f"GB/s), torch {times[1] * 1e3:.2f} ms ({sum(sizes[1]) / times[1] / 1e9:.1f} GB/s), "
                  f"{times[1] / times[0]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
