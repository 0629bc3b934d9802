"""Compression: prune, distill, quantize, export, and the report that measures each step.

The Python API, one function per step, for composing them in a notebook::

    from tightfit.compression import compress, distill, export, prune, quantize

    pruned = prune(model, bundle, method="structured", sparsity=0.5, example_inputs=x[:1]).model
    int8 = quantize(pruned, "auto", example_batch=(x[:1], None), calibration_batches=loader).model
    files = export(pruned, (x[:1], None), "out/", calibration_batches=loader, verify_batches=loader)
    report = compress("runs/digits", "recipes/compress-digits.yaml", "compressed/")
"""

from tightfit.compression.distill import distill
from tightfit.compression.export import export, export_onnx, export_program, quantize_onnx, verify_onnx
from tightfit.compression.pipeline import Source, compress, load_source
from tightfit.compression.prune import MagnitudePruner, PolynomialSchedule, prune, sparsity_table, structured_prune
from tightfit.compression.qat import qat
from tightfit.compression.quantize import quantize
from tightfit.compression.recipe import Recipe, load_recipe
from tightfit.compression.training import FinetuneSettings, finetune

__all__ = [
    "FinetuneSettings",
    "MagnitudePruner",
    "PolynomialSchedule",
    "Recipe",
    "Source",
    "compress",
    "distill",
    "export",
    "export_onnx",
    "export_program",
    "finetune",
    "load_recipe",
    "load_source",
    "prune",
    "qat",
    "quantize",
    "quantize_onnx",
    "sparsity_table",
    "structured_prune",
    "verify_onnx",
]
