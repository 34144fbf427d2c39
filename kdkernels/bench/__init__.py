"""``kdkernels bench``: time and peak memory of the fused KD loss against PyTorch eager and ``torch.compile``.

For every shape ``[N, V]`` and dtype it runs forward + backward (student requires grad, teacher detached,
``T = 4``) of

* ``kdkernels:auto`` (``kdkernels.kd_loss(..., backend="auto")``; the backend it resolved to is recorded) and
  ``kdkernels:<name>`` for every other available non-reference backend on the device (e.g. ``triton`` on a GPU),
* ``eager``: ``kdkernels.reference.softmax_kl.eager_hinton_kd`` (``F.kl_div(log_softmax(s/T), log_softmax(t/T),
  log_target=True, reduction="batchmean") * T**2``, in the input dtype, as users write it),
* ``compile``: ``torch.compile(eager_hinton_kd, dynamic=False)``; compilation is done (and timed separately) before
  any measurement,

and reports the median time with p20/p80, the peak extra memory of one call, the speed-up vs eager and vs compile,
and the achieved bandwidth against the bytes-moved floor of a two-pass fused kernel, **5U** with
``U = N·V·itemsize`` (read the student and teacher logits twice, write the gradient once; the absolute floor,
row resident on chip, is 3U).

Results go to ``benchmarks/results/<device-name>/kd_loss.{json,md,png}``; see ``benchmarks/README.md``.

    kdkernels bench                         # default shapes, fp32 + bf16
    kdkernels bench --quick                 # CI smoke test (< 30 s on CPU), writes to a temp dir
    python -m kdkernels.bench --shapes 1024x1000 --dtypes fp32 --no-compile
"""
from kdkernels.bench.run import main

__all__ = ["main"]
