"""See what an adapter learned, and use the low-rank claim (issue 14).

- ``spectra``: pure maths on dW = s B A from its factors (norms, stable/effective/energy ranks, truncation).
- ``adapter``: an adapter folder -> per-module statistics (``slimtune inspect``).
- ``compress``: a smaller adapter by truncated SVD (``slimtune compress``).
- ``extract``: a LoRA from a fully fine-tuned model and its base (``slimtune extract``).
- ``plots`` and ``report``: the figures and the self-contained HTML report (``slimtune report``).

A capability package: it uses the core and the core never imports it.
"""
