"""fastamp inside other libraries' training loops, changing only the objects it is given.

- :func:`apply_fastamp`: Hugging Face Accelerate's ``Accelerator`` or the Transformers ``Trainer``
  (``pip install 'fastamp[hf]'``).
- Lightning: :mod:`fastamp.integrations.lightning` (a precision plugin, since Lightning has an extension point).
"""

from __future__ import annotations

from .huggingface import apply_fastamp, grad_norms

__all__ = ["apply_fastamp", "grad_norms"]
