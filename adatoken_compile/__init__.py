"""adatoken-compile: calibrate, compile and run spatial-token pruning for LLaVA-3D-style models.

The public API (each with a docstring and an example)::

    load_model   a checkpoint directory or bundled name -> model adapter (PyTorch)
    calibrate    attention statistics on the user's questions -> validated pruning schedule
    compile      model + schedule -> ONNX Runtime artifact (token-drop nodes in the graph)
    load         artifact -> Runtime (ONNX Runtime + numpy + tokenizers, no torch)
    generate     answer questions with an artifact or the PyTorch reference
    evaluate     accuracy on a question set, paired against the unpruned model
    bench        pruned vs unpruned latency, FLOPs, realised fraction, KV cache
    compare      every selection rule and peer at matched prefill FLOPs, paired intervals

Attributes load on first use, so ``import adatoken_compile`` needs neither torch nor
transformers (the runtime install has neither).
"""

__version__ = "0.2.0"
__all__ = ["bench", "calibrate", "compare", "compile", "evaluate", "generate", "load", "load_model"]


def __getattr__(name):
    if name in __all__:
        from adatoken_compile import api  # PEP 562: resolve the public names lazily

        return getattr(api, name)
    raise AttributeError(f"module 'adatoken_compile' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
