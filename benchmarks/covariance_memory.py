"""REMIX's Laplace-kernel covariance against a dense Gaussian, per BatchNorm width: what each stores, how long a
fit and an NLL take (`cl_inversion/inversion/covariance.py`). Both arms score the same batch under the same
formula; the dense arm's covariance is the observed one, the Laplace arm's is fitted to its correlation.

    python -m benchmarks.covariance_memory [--quick] [--threads 1]

Stored: the model's parameters (Laplace: u, w, a = 3C floats; dense: mean + C×C covariance). At scoring time the
reference code builds the dense C×C Σ, its Cholesky factor and precision from either (`DeepInversionLaplaceHook`),
so the NLL's working memory is C² in both arms; `nll_state_bytes` reports it.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn

from cl_inversion.inversion.covariance import LaplaceCovariance, LaplaceNLL, StreamingCovariance


def timed(fn, repeats: int) -> float:
    fn()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats


class DenseNLL(LaplaceNLL):
    """The hook's NLL with the observed dense covariance in place of the Laplace one (same arithmetic)."""

    def __init__(self, layer: nn.BatchNorm2d, sigma: torch.Tensor) -> None:
        self.layer, self.value = layer, None
        self.handle = layer.register_forward_hook(self._hook)
        cholesky = torch.linalg.cholesky(sigma + torch.eye(len(sigma)) * 1e-5)
        self.logdet = 2 * torch.log(torch.diagonal(cholesky)).sum()
        self.precision = torch.cholesky_inverse(cholesky).contiguous()


def measure(channels: int, epochs: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    mixing = torch.randn(channels, channels) / math.sqrt(channels)
    data = [(torch.randn(batch, 4, 4, channels) @ mixing).permute(0, 3, 1, 2) for _ in range(4)]
    stream = StreamingCovariance()
    for x in data:
        stream.update(x)
    layer = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        layer.running_mean.copy_(stream.mean)
        layer.running_var.copy_(torch.diagonal(stream.m2) / (stream.n - 1))
    target = stream.correlation()
    model = LaplaceCovariance(channels)
    fit_s = timed(lambda: LaplaceCovariance(channels).fit(target, epochs=epochs), 1)
    model.fit(target, epochs=epochs)
    probe = data[0]
    arms = {}
    for name, hook in (("laplace", LaplaceNLL(layer, model)), ("dense", DenseNLL(layer, stream.m2 / (stream.n - 1)))):
        layer(probe)
        arms[name] = (timed(hook.nll, repeats), float(hook.nll()))
        hook.remove()
    floats = 4
    return {"channels": channels,
            "laplace_stored_bytes": 3 * channels * floats,
            "dense_stored_bytes": (channels + channels * channels) * floats,
            "nll_state_bytes": (channels * channels + 1) * floats,
            "laplace_fit_s": fit_s, "fit_epochs": epochs,
            "correlation_fit_mse": float(torch.nn.functional.mse_loss(model.correlation().detach(), target)),
            "laplace_nll_ms": 1000 * arms["laplace"][0], "dense_nll_ms": 1000 * arms["dense"][0],
            "laplace_nll": arms["laplace"][1], "dense_nll": arms["dense"][1]}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 fit epochs, 3 NLL repeats")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 256, 768])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs, repeats = (20, 3) if args.quick else (200, 20)
    rows = [measure(c, epochs, 32, repeats) for c in args.channels]
    result = {"threads": args.threads, "quick": args.quick, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
