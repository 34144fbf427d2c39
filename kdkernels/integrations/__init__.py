"""Optional adapters of kdkernels to other libraries, each behind an extra and imported only on request.

* :mod:`kdkernels.integrations.transformers` (``pip install kdkernels[hf]``): ``causal_lm_kd_loss`` distils one
  Hugging Face causal language model into another through ``kdkernels.linear_kd_loss`` (never the ``[N, V]``
  logits), and ``DistillationTrainer``, a ``transformers.Trainer`` that trains with it.
"""
