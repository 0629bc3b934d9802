"""Compression: prune, distill, quantize, export, and the report that measures each step."""
