"""The deployable forms of a model: a ``torch.export`` program and ONNX, and an ONNX Runtime session to run it.

What ``l0sweep export`` writes and what the latency objective times, made one way for both.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn


def to_onnx(model: nn.Module | torch.export.ExportedProgram, example: torch.Tensor, f: str | os.PathLike | IO[bytes],
            ) -> None:
    """Write ``model`` (a module, or its exported program) as ONNX with a dynamic batch dimension.

    The torch.export-based exporter (``dynamo=True``; the TorchScript one is deprecated and slated for removal)."""
    program = model if isinstance(model, torch.export.ExportedProgram) else export_program(model, example)
    onnx_program = torch.onnx.export(program, dynamo=True, input_names=["input"], output_names=["output"],
                                     verbose=False)
    data = onnx_program.model_proto.SerializeToString()  # weights inline: one file (models under 2 GB)
    if hasattr(f, "write"):
        f.write(data)
    else:
        Path(f).write_bytes(data)


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of an eval-mode ``model`` with a dynamic batch dimension."""
    # A batch of two: torch.export specialises a dimension of size one.
    x = example[:1].expand(2, *example.shape[1:]).contiguous()
    return torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))


def onnx_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """``model`` as ONNX with a dynamic batch dimension (input ``input``, output ``output``), via torch.export."""
    buf = io.BytesIO()
    to_onnx(model, example, buf)
    return buf.getvalue()


def onnx_session(model: bytes | str) -> Any:
    """An ONNX Runtime CPU session using as many threads as torch does."""
    import onnxruntime as ort  # imported when a session is made: every worker imports this module, few need it

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are not the user's
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
