"""Hugging Face LlamaForCausalLM directory -> k2jax Orbax weights directory, streaming.

Peak memory: one read buffer and one re-layout buffer, each the size of the largest tensor
(plus TensorStore's copy of the tensor being written), whatever the model size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from k2jax.convert import dtypes
from k2jax.convert.atomic import atomic_output_dir, check_output
from k2jax.convert.buffers import ReusableBuffer, copy_into
from k2jax.convert.expected import check_tensors, expected_tensors, model_config_from_hf_dir
from k2jax.convert.hf_reader import HFCheckpoint, iter_tensors, open_hf_checkpoint
from k2jax.convert.orbax_writer import StreamingParamsWriter
from k2jax.convert.progress import Progress
from k2jax.hf import name_map


def default_dtype(checkpoint: HFCheckpoint, names) -> str:
    """bf16 if every tensor is bf16, else fp32 (exact for fp16 and mixed sources)."""
    codes = {checkpoint.tensors[name].dtype for name in names}
    return "bf16" if codes == {"BF16"} else "fp32"


def convert_hf_to_orbax(hf_dir: str, out_dir: str, dtype: Optional[str] = None,
                        force: bool = False, progress: bool = True) -> Path:
    """Check everything, then write `out_dir` (atomically). Returns the output path.

    dtype: "fp32" or "bf16" for the stored weights; None keeps bf16 sources in bf16 and
    stores anything else in fp32.
    """
    out_path = check_output(out_dir, force, inputs=(hf_dir,))
    checkpoint = open_hf_checkpoint(hf_dir)
    where = str(Path(hf_dir) / "config.json")
    config = model_config_from_hf_dir(checkpoint.config, where)
    check_tensors(checkpoint.tensors.values(), config, where)

    expected = expected_tensors(config)
    out_dtype = dtypes.CLI_TO_NUMPY[dtype or default_dtype(checkpoint, expected)]
    infos = [checkpoint.tensors[name] for name in expected]
    largest = max(info.nbytes for info in infos)
    read_buffer = ReusableBuffer(largest if checkpoint.format == "safetensors" else 0)
    layout_buffer = ReusableBuffer()

    with atomic_output_dir(out_path, force) as staging, Progress(
            "hf-to-orbax", sum(i.nbytes for i in infos), len(infos), progress) as bar:
        writer = StreamingParamsWriter(staging, config, out_dtype)
        for info, array in iter_tensors(checkpoint, set(expected), read_buffer.raw):
            entry = expected[info.name]
            view = name_map.hf_to_k2jax(array, entry.mapping, config)
            if not (view.flags.c_contiguous and view.dtype == out_dtype):
                view = copy_into(view, layout_buffer.view(view.shape, out_dtype))
            writer.write(entry.mapping, entry.layer, view)
            bar.update(info.nbytes)
        writer.close()
    return out_path
